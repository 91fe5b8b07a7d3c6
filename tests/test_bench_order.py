"""The audit benchmark's order of turns: no server keeps a place in every round."""

from __future__ import annotations

import collections
import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


@pytest.mark.parametrize("count", [3, 5])
def test_every_server_takes_every_place_equally_often(bench: ModuleType, count: int) -> None:
    names = [f"server {i}" for i in range(count)]
    places: collections.Counter[tuple[str, int]] = collections.Counter()
    before: collections.Counter[tuple[str, str]] = collections.Counter()
    for n in range(2 * count):
        order = bench._turns(names, n)
        assert sorted(order) == names
        places.update((name, place) for place, name in enumerate(order))
        before.update(itertools.pairwise(order))
    assert set(places.values()) == {2}
    assert len(places) == count * count
    for (first, second), times in before.items():
        assert before[(second, first)] == times


def test_no_server_keeps_the_middle_of_the_round(bench: ModuleType) -> None:
    names = ["aaau control", "aaau off", "aaau on"]
    middles = {bench._turns(names, n)[1] for n in range(6)}
    assert middles == set(names)

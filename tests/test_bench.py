"""The benchmark's smoke run: seconds, no thresholds, so the harness never rots."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aaau.cgroups import Hierarchies

from .helpers import root

pytestmark = root
BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"
NOBODY = 65534


@pytest.fixture
def killed_run() -> Iterator[list[Path]]:
    """What a killed run leaves: a server's directories, a session's cgroup in its base
    (removed here too, whatever the benchmark did)."""
    leftovers = [Path("/tmp/aaau-bench-killed"), Path("/run/aaau-bench-killed-asys")]
    where = Hierarchies.discover().v2
    cgroup = [where / "aaau-bench-killed" / "_session"] if where is not None else []
    for leftover in leftovers:
        (leftover / "log").mkdir(parents=True)
    for made in cgroup:
        made.mkdir(parents=True)
    planted = Path("/tmp/aaau-bench-planted")  # someone else's, under a name like ours
    planted.mkdir()
    os.chown(planted, NOBODY, NOBODY)
    yield [*leftovers, *(made.parent for made in cgroup)]
    survived = planted.is_dir()
    for leftover in [*leftovers, planted]:
        shutil.rmtree(leftover, ignore_errors=True)
    for made in cgroup:
        for directory in (made, made.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()
    assert survived  # not root's: the sweep left it alone


def test_benchmark_smoke_run_measures_every_scenario(killed_run: list[Path]) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["size"] == "smoke"
    assert [leftover for leftover in killed_run if leftover.exists()] == []  # swept first
    # its init put completions and man pages in its own directory, not the machine's
    assert not list(Path("/usr/local/share").rglob("*aaau*"))
    assert set(out) >= {"machine", "throughput", "echo", "scale", "slow", "audit", "startup", "mcp"}
    assert out["mcp"]["start_ms_median"] > 0 and out["mcp"]["call_ms_median"] > 0
    assert not list(Path("/run").glob("aaau-bench-*"))  # its endpoints' directories went too
    startup = out["startup"]["median_ms"]
    assert startup["aaau ls"] > 0 and startup["aaau -p true"] > 0
    for row in out["throughput"]["readers"].values():
        assert row["aaau_every_byte"] is True
        assert row["raw_s"] > 0 and row["aaau_s"] > 0
        assert row["payload_bytes"] > 20_000
    assert out["echo"]["hot"]["aaau"]["p50_ms"] > 0
    assert out["echo"]["typing"]["aaau"]["p50_ms"] > 0
    assert out["scale"]["sessions"] == 3 and out["scale"]["clients"] == 9
    assert out["slow"]["others_every_byte"] is True
    audit = out["audit"]
    assert audit["on_off_throughput"] > 0 and audit["control_ratio"] > 0
    assert audit["server_cpu_on_s"] > 0 and len(audit["control_iqr"]) == 2

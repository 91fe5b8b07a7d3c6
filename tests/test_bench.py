"""The benchmark's smoke run: seconds, no thresholds, so the harness never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .helpers import root

pytestmark = root
BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def test_benchmark_smoke_run_measures_every_scenario() -> None:
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

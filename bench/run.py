"""aaau benchmarks: raw PTY vs tmux vs aaau, side by side, in one invocation.

Run as root from the repository, with the project's venv:

    /opt/aaau-test/bin/python bench/run.py [--quick | --smoke] [--json] [--only NAME ...]
        [--baseline PYTHON]

``--baseline PYTHON`` adds "before": the aaau installed for that interpreter (a venv
built from an earlier commit), run alternately with this one in the same invocation.

Scenarios (docs/benchmarks.md has the method and the latest results):
  throughput   ~15 MB of seq output, 1/10/50 readers; time until every reader has it all
  echo         one byte in, its echo out, through `cat` in raw mode: p50/p99/max
  scale        200 sessions x 3 clients, a line per session every 5 s: server CPU, RSS,
               create/join times
  slow         throughput with one observer that never reads; server memory stays bounded
  audit        throughput with output recording on and off: paired rounds, median ratio
  startup      aaau --help, aaau ls, aaau -p true beside tmux ls, tmux new-session -d and
               python -c 'import json, socket': medians of 10, ratios to the bare Python
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h

from aaau import __version__, codec
from aaau import messages as m
from aaau.cgroups import Hierarchies
from aaau.framing import FramedStream
from aaau.protocol import Kind

#: the interpreter of a baseline installation (--baseline), or None
BASELINE: str | None = None

SIZES = {
    # name: (seq lines, runs, reader counts, echo samples, scale sessions, scale idle seconds)
    "full": (2_000_000, 9, (1, 10, 50), 2000, 200, 10.0),
    "quick": (2_000_000, 3, (1, 10), 500, 50, 3.0),
    "smoke": (20_000, 1, (1, 2), 20, 3, 0.5),
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> dict[str, Any]:
    tmux = subprocess.run(["tmux", "-V"], capture_output=True, text=True, check=False).stdout
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "tmux": tmux.strip() or None,
        "aaau": __version__,
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
    }


def check_bytes(expected: h.Reader, readers: list[h.Reader]) -> bool:
    return all(r.bytes == expected.bytes and r.tail == expected.tail for r in readers)


def _timing(times: list[float], raw_med: float, complete: bool, prefix: str) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        f"{prefix}_s": round(med, 3),
        f"{prefix}_ratio": round(raw_med / med, 3),
        f"{prefix}_every_byte": complete,
    }


@asynccontextmanager
async def _contestants(*extra: str) -> AsyncIterator[dict[str, h.AaauServer]]:
    """This aaau, and the baseline one if --baseline named it."""
    async with h.aaau_server(*extra) as server:
        if BASELINE is None:
            yield {"aaau": server}
            return
        async with h.aaau_server(*extra, python=BASELINE) as before:
            yield {"aaau": server, "before": before}


async def throughput(size: str) -> dict[str, Any]:
    lines, runs, counts, *_ = SIZES[size]
    out: dict[str, Any] = {"lines": lines, "runs": runs, "readers": {}}
    async with _contestants() as servers:
        for n in counts:
            raw_t, tmux_t = [], []
            times: dict[str, list[float]] = {name: [] for name in servers}
            complete = dict.fromkeys(servers, True)
            tmux_bytes, payload = [], 0
            for _ in range(runs):  # alternate them all, same invocation
                t, raw_reader = await h.raw_throughput(lines)
                raw_t.append(t)
                payload = raw_reader.bytes
                if h.tmux_available():
                    t, readers = await h.tmux_throughput(lines, n)
                    tmux_t.append(t)
                    tmux_bytes.append(min(r.bytes for r in readers))
                for name, server in servers.items():
                    t, readers = await h.aaau_throughput(server, lines, n)
                    times[name].append(t)
                    complete[name] = complete[name] and check_bytes(raw_reader, readers)
            raw_med = statistics.median(raw_t)
            row: dict[str, Any] = {"payload_bytes": payload, "raw_s": round(raw_med, 3)}
            for name in servers:
                row.update(_timing(times[name], raw_med, complete[name], name))
            if tmux_t:
                row["tmux_s"] = round(statistics.median(tmux_t), 3)
                row["tmux_ratio"] = round(raw_med / statistics.median(tmux_t), 3)
                row["tmux_bytes_per_client"] = min(tmux_bytes)
            out["readers"][str(n)] = row
    return out


async def echo(size: str) -> dict[str, Any]:
    """Back to back ("hot": CPUs never idle) and with a pause between keys ("typing")."""
    samples = SIZES[size][3]
    result: dict[str, Any] = {"samples": samples, "typing_gap_ms": h.TYPING_GAP * 1000}
    async with _contestants() as servers:
        ways: dict[str, Any] = {"raw": h.raw_echo}
        for name, server in servers.items():
            ways[name] = functools.partial(h.aaau_echo, server)
        if h.tmux_available():
            ways["tmux"] = h.tmux_echo
        for mode, gap in (("hot", 0.0), ("typing", h.TYPING_GAP)):
            result[mode] = {}
            for name, fn in ways.items():
                values = await fn(samples, gap)
                result[mode][name] = {
                    "p50_ms": round(pct(values, 0.5) * 1000, 3),
                    "p99_ms": round(pct(values, 0.99) * 1000, 3),
                    "max_ms": round(max(values) * 1000, 3),
                }
    return result


async def scale(size: str) -> dict[str, Any]:
    result = await _scale(size, h.PY)
    if BASELINE is not None:
        result["before"] = await _scale(size, BASELINE)
    return result


async def _scale(size: str, python: str) -> dict[str, Any]:
    sessions, idle_s = SIZES[size][4], SIZES[size][5]
    # mostly idle: each agent prints one line every 5 seconds
    trickle = ["sh", "-c", "while :; do sleep 5; echo tick; done"]
    async with h.aaau_server(python=python) as server:
        rss_before = h.rss_kb(server.pid)
        creates, joins, clients = [], [], []
        for _ in range(sessions):
            start = time.perf_counter()
            creator = await h.Client.connect(server, h.create(trickle))
            creates.append(time.perf_counter() - start)
            assert creator.welcome is not None
            clients.append(creator)
            for _ in range(2):
                start = time.perf_counter()
                clients.append(await h.Client.connect(server, h.join(creator.welcome.session_id)))
                joins.append(time.perf_counter() - start)
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.drain)
            await trio.sleep(1.0)
            ticks0, t0 = h.cpu_ticks(server.pid), time.perf_counter()
            await trio.sleep(idle_s)
            ticks1, t1 = h.cpu_ticks(server.pid), time.perf_counter()
            rss_after = h.rss_kb(server.pid)
            nursery.cancel_scope.cancel()
        for client in clients:
            await client.aclose()
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "sessions": sessions,
        "clients": len(clients),
        "idle_seconds": idle_s,
        "server_cpu_pct": round(100 * (ticks1 - ticks0) / hz / (t1 - t0), 2),
        "server_rss_kb_before": rss_before,
        "server_rss_kb_after": rss_after,
        "rss_kb_per_session": round((rss_after - rss_before) / sessions, 1),
        "create_p50_ms": round(pct(creates, 0.5) * 1000, 2),
        "create_p99_ms": round(pct(creates, 0.99) * 1000, 2),
        "join_p50_ms": round(pct(joins, 0.5) * 1000, 2),
        "join_p99_ms": round(pct(joins, 0.99) * 1000, 2),
    }


async def _watch_rss(pid: int, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], h.rss_kb(pid))
        await trio.sleep(0.02)


async def slow(size: str) -> dict[str, Any]:
    """The same readers with and without one more observer that never reads (order alternates)."""
    lines, runs, counts, *_ = SIZES[size]
    others = max(counts) - 1 if size == "smoke" else 9
    queue = 4 << 20
    times: dict[bool, list[float]] = {False: [], True: []}
    peak, complete = 0, True
    async with h.aaau_server("--client-queue-bytes", str(queue)) as server:
        for run in range(runs):
            for stalled in (run % 2 == 0, run % 2 == 1):
                rss0 = h.rss_kb(server.pid)
                peak_box = [rss0]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_rss, server.pid, peak_box)
                    t, readers = await h.aaau_throughput(
                        server, lines, others, stalled=int(stalled)
                    )
                    nursery.cancel_scope.cancel()
                times[stalled].append(t)
                if stalled:
                    peak = max(peak, peak_box[0] - rss0)
                    _, raw_reader = await h.raw_throughput(lines)
                    complete = complete and check_bytes(raw_reader, readers)
    base, with_slow = statistics.median(times[False]), statistics.median(times[True])
    return {
        "readers": others,
        "without_stalled_s": round(base, 3),
        "with_stalled_s": round(with_slow, 3),
        "others_lose_pct": round(100 * (with_slow - base) / base, 1),
        "others_every_byte": complete,
        "server_rss_growth_kb": peak,
        "client_queue_kb": queue // 1024,
    }


#: rounds of the audit scenario: more than the others, its figure is a small difference
AUDIT_ROUNDS = {"full": 60, "quick": 12, "smoke": 1}


async def audit(size: str) -> dict[str, Any]:
    """Wall time hides the cost (a busier reader reads bigger chunks): server CPU shows it.

    Each round runs every server once, in an order that gives each server
    every place in the round equally often (:func:`_turns`), and yields one
    paired ratio off/on per build: a round's pair shares the machine's mood,
    so the median of those ratios (with its interquartile range) is steadier
    than a ratio of medians, which is given too.
    A second server with recording off runs in the same rounds as a control:
    its ratio to the first (``control_ratio``, ideally 1.000) shows how far two
    identical servers drift apart in this run, the figure's resolution.
    With --baseline, the baseline's on/off pair runs in the same rounds."""
    lines, *_ = SIZES[size]
    rounds = AUDIT_ROUNDS[size]
    builds = {"aaau": h.PY} | ({"before": BASELINE} if BASELINE else {})
    times: dict[str, list[float]] = {f"{b} {m}": [] for b in builds for m in ("on", "off")}
    ticks = dict.fromkeys(times, 0)
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for build, python in builds.items():
            servers[f"{build} on"] = await stack.enter_async_context(h.aaau_server(python=python))
            servers[f"{build} off"] = await stack.enter_async_context(
                h.aaau_server("--no-record-output", python=python)
            )
        servers["aaau control"] = await stack.enter_async_context(
            h.aaau_server("--no-record-output")
        )
        times["aaau control"], ticks["aaau control"] = [], 0
        for server in servers.values():  # warm: the first run of a server pays its imports
            await h.aaau_throughput(server, lines // 10, 1)
        for n in range(rounds):
            for name in _turns(sorted(servers), n):
                server = servers[name]
                before = h.cpu_ticks(server.pid)
                t, _ = await h.aaau_throughput(server, lines, 1)
                ticks[name] += h.cpu_ticks(server.pid) - before
                times[name].append(t)
    out: dict[str, Any] = {"rounds": rounds}
    for build in builds:
        row = _audit_row(
            times[f"{build} on"],
            times[f"{build} off"],
            rounds,
            ticks[f"{build} on"],
            ticks[f"{build} off"],
        )
        if build == "aaau":
            out.update(row)
            control = _paired(times["aaau control"], times["aaau off"])
            out["control_ratio"], out["control_iqr"] = control
        else:
            out[build] = row
    return out


def _audit_row(
    on_t: list[float], off_t: list[float], rounds: int, on_ticks: int, off_ticks: int
) -> dict[str, Any]:
    hz = os.sysconf("SC_CLK_TCK")
    on, off = statistics.median(on_t), statistics.median(off_t)
    ratio, iqr = _paired(on_t, off_t)
    cpu_on, cpu_off = on_ticks / hz / rounds, off_ticks / hz / rounds
    return {
        "on_off_throughput": ratio,
        "on_off_iqr": iqr,
        "ratio_of_medians": round(off / on, 3),
        "recording_on_s": round(on, 3),
        "recording_off_s": round(off, 3),
        "server_cpu_on_s": round(cpu_on, 3),
        "server_cpu_off_s": round(cpu_off, 3),
        "cpu_cost_pct": round(100 * (cpu_on - cpu_off) / cpu_off, 1) if cpu_off else None,
    }


def _turns(names: list[str], n: int) -> list[str]:
    """Round ``n``'s order: rotated by one each round, reversed every other cycle.

    Over ``2 * len(names)`` rounds each name takes each place equally often,
    and is as often just before as just after each neighbour. A fixed or
    merely alternating order kept one server in the middle of every round,
    and that place alone was worth 2-3 % (the control's ratio in the runs
    that found it).
    """
    k = len(names)
    shift = n % k
    order = names[shift:] + names[:shift]
    return order[::-1] if (n // k) % 2 else order


def _paired(slow_t: list[float], fast_t: list[float]) -> tuple[float, list[float]]:
    """The median of the per-round throughput ratios (``fast_t``'s time over
    ``slow_t``'s) and their interquartile range."""
    paired = sorted(b / a for a, b in zip(slow_t, fast_t, strict=True))
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    return round(statistics.median(paired), 3), [round(quartiles[0], 3), round(quartiles[2], 3)]


def _wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - start


async def startup(size: str) -> dict[str, Any]:
    """Start-up of typed commands, medians, beside tmux and a bare Python (issue 12)."""
    runs = 3 if size == "smoke" else 10
    aaau = str(Path(sys.executable).parent / "aaau")
    commands: dict[str, list[str]] = {
        "python -c 'import json, socket'": [sys.executable, "-c", "import json, socket"],
        "aaau --help": [aaau, "--help"],
        "aaau ls": [aaau, "ls"],
        "aaau -p true": [aaau, "-p", "true"],
    }
    tmux = h.Tmux() if h.tmux_available() else None
    if tmux is not None:
        tmux.cmd("new-session", "-d", "-s", "keep", "sleep 600")
        base = ["tmux", "-S", tmux.sock, "-f", "/dev/null"]
        commands["tmux ls"] = [*base, "ls"]
        commands["tmux new-session -d"] = [*base, "new-session", "-d", "true"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    try:
        async with h.aaau_server() as server:
            env = {**os.environ, "AAAU_SOCKET": str(server.sock)}
            for _ in range(runs):  # alternate them, same invocation
                for name, argv in commands.items():
                    times[name].append(_wall(argv, env))
    finally:
        if tmux is not None:
            tmux.kill()
    medians = {name: statistics.median(t) for name, t in times.items()}
    bare = medians["python -c 'import json, socket'"]
    return {
        "runs": runs,
        "median_ms": {name: round(t * 1000, 1) for name, t in medians.items()},
        "ratio_to_python": {name: round(t / bare, 2) for name, t in medians.items()},
        "targets": {"aaau ls": 3, "aaau --help": 3, "aaau -p true": 6},
    }


#: run by the agent inside a session: starts `aaau mcp` RUNS times (spawn -> initialize
#: answered), then times CALLS tool calls (SYS_HELLO) on one of them; one JSON line
_MCP_AGENT = r"""
import json, os, statistics, subprocess, sys, time
runs, calls, cmd = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def send(p, obj):
    p.stdin.write((json.dumps(obj) + "\n").encode()); p.stdin.flush()
def answer(p):
    reply = json.loads(p.stdout.readline())
    assert "result" in reply, reply
    return reply
init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {},
    "clientInfo": {"name": "bench", "version": "1"}}}
starts, trips = [], []
for i in range(runs):
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    send(p, init); answer(p)
    starts.append(time.perf_counter() - t)
    send(p, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    if i == runs - 1:
        for n in range(calls):
            t = time.perf_counter()
            send(p, {"jsonrpc": "2.0", "id": n + 1, "method": "tools/call",
                     "params": {"name": "SYS_HELLO", "arguments": {}}})
            reply = answer(p)
            trips.append(time.perf_counter() - t)
            assert reply["result"]["structuredContent"]["sw"] == "9000", reply
    p.stdin.close(); p.wait()
t = time.perf_counter()
subprocess.run([sys.executable, "-c", "import mcp.server.lowlevel, mcp.server.stdio"], check=True)
sdk = time.perf_counter() - t
trips.sort()
print("@@MCP@@" + json.dumps({
    "cold_start_ms": round(starts[0] * 1000, 1),
    "start_ms_median": round(statistics.median(starts[1:]) * 1000, 1),
    "start_ms_max": round(max(starts[1:]) * 1000, 1),
    "call_ms_median": round(statistics.median(trips) * 1000, 2),
    "call_ms_p99": round(trips[int(len(trips) * 0.99) - 1] * 1000, 2),
    "sdk_import_in_a_process_ms": round(sdk * 1000, 1),
}) + "@@", flush=True)
"""


async def mcp(size: str) -> dict[str, Any]:
    """``aaau mcp`` as claude starts it, run by a real agent in a session (issue 13)."""
    runs, calls = (3, 50) if size == "smoke" else (11, 1000)
    aaau = str(Path(sys.executable).parent / "aaau")
    # the per-session rate limit (20 calls/s) would measure itself: lifted for the bench
    lifted = ("--agent-asys-rate", "1000000", "--agent-asys-burst", "1000000")
    async with h.aaau_server(*lifted) as server:
        argv = [sys.executable, "-c", _MCP_AGENT, str(runs), str(calls), aaau, "mcp"]
        stream = await trio.open_unix_socket(str(server.sock))
        framed = FramedStream(stream, 1 << 24)
        await framed.send(h.create(argv))
        output = bytearray()
        with trio.fail_after(300):
            while (frame := await framed.next_frame()) is not None:
                if frame.kind is Kind.DATA:
                    output += frame.payload
                elif isinstance(codec.decode_server(frame.payload), m.Exited):
                    break
        await framed.aclose()
    text = output.decode("utf-8", "replace").replace("\r\n", "")
    match = re.search(r"@@MCP@@(.*?)@@", text)
    if match is None:
        raise RuntimeError(f"the agent's MCP bench failed: {text[-2000:]}")
    result: dict[str, Any] = json.loads(match.group(1))
    result.update(runs=runs, calls=calls, targets={"start_ms": 300, "call_ms": 5})
    return result


SCENARIOS = {
    "throughput": throughput,
    "echo": echo,
    "scale": scale,
    "slow": slow,
    "audit": audit,
    "startup": startup,
    "mcp": mcp,
}


def report(results: dict[str, Any]) -> str:
    lines = [f"machine: {results['machine']}"]
    tp = results.get("throughput")
    if tp:
        lines.append(f"\nthroughput ({tp['lines']} lines, median of {tp['runs']}):")
        lines.append(
            f"{'readers':>8} {'raw s':>8} {'tmux s':>8} {'tmux/raw':>9} {'aaau s':>8} "
            f"{'aaau/raw':>9} {'every byte':>11}"
        )
        for n, row in tp["readers"].items():
            lines.append(
                f"{n:>8} {row['raw_s']:>8} {row.get('tmux_s', '-'):>8} "
                f"{row.get('tmux_ratio', '-'):>9} {row['aaau_s']:>8} "
                f"{row['aaau_ratio']:>9} {row['aaau_every_byte']!s:>11}"
                + (
                    f"   before {row['before_s']} s, {row['before_ratio']} of raw"
                    if "before_s" in row
                    else ""
                )
            )
    ec = results.get("echo")
    if ec:
        for mode in ("hot", "typing"):
            lines.append(f"\necho latency, {mode} ({ec['samples']} keystrokes), ms:")
            for way in ("raw", "tmux", "aaau", "before"):
                if way in ec[mode]:
                    row = ec[mode][way]
                    lines.append(
                        f"{way:>8} p50 {row['p50_ms']:>7} p99 {row['p99_ms']:>7} "
                        f"max {row['max_ms']:>7}"
                    )
    for name in ("scale", "slow", "audit", "startup", "mcp"):
        if name in results:
            lines.append(f"\n{name}: {json.dumps(results[name])}")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    results: dict[str, Any] = {"machine": machine(), "size": size, "baseline": BASELINE}
    for name in args.only or SCENARIOS:
        results[name] = await SCENARIOS[name](size)
    return results


def cli() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs and samples")
    parser.add_argument("--smoke", action="store_true", help="seconds: checks the harness only")
    parser.add_argument("--json", action="store_true", help="machine-readable results")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS))
    parser.add_argument(
        "--baseline", metavar="PYTHON", help="also run the aaau installed for this interpreter"
    )
    args = parser.parse_args()
    global BASELINE
    BASELINE = args.baseline
    if os.geteuid() != 0:
        print("bench/run.py must run as root (it starts the aaau server)", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    baseline_pam = Path("/etc/pam.d/aaau")
    had_baseline_pam = baseline_pam.exists()
    h.remove_accounts()  # a killed run's, if any
    h.sweep_leftovers()
    try:
        results = trio.run(main, args)
    finally:
        h.remove_accounts()
        if BASELINE is not None:
            if not had_baseline_pam:
                baseline_pam.unlink(missing_ok=True)  # the baseline build's init wrote it
            # an earlier build's cgroup base; rmdir only takes it if no session is in it
            v2 = Hierarchies.discover().v2
            if v2 is not None:
                with contextlib.suppress(OSError):
                    (v2 / "aaau").rmdir()
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""The read-only Core ISA: SYS_CAPS, SYS_HELLO, SYS_STATUS, SYS_PROCS, and their samplers.

SYS_STATUS comes from one background sampler shared by every session (a
fixed 1 s window, never a blocking sleep); SYS_PROCS from an on-demand
sampler with a fixed window that concurrent callers share, scanning all of
/proc. Values saturate (percentages are clamped to 0..100, counters that go
backwards count as zero) instead of wrapping.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import platform
import pwd
import shutil
import time
from typing import Any

import attrs
import structlog
import trio

from .. import __version__, procfs, reaper
from ..cgroups import Hierarchies
from ..messages import PROTOCOL_VERSION
from .base import SW, AsysError, Context, Instruction, NoArgs

log = structlog.get_logger("aaau.asys")

ASYS_VERSION = "1.0"
_NODE_ID_APP_KEY = b"aaau node id v1"


def _clamp_pct(value: float) -> float:
    return round(min(100.0, max(0.0, value)), 1)


def _mb(n_bytes: int) -> int:
    return n_bytes // (1 << 20)


# --- SYS_CAPS -------------------------------------------------------------------------


@functools.cache
def machine_facts() -> dict[str, Any]:
    """Static facts, read once per server."""
    mem = procfs.parse_meminfo(procfs.read_text("/proc/meminfo"))
    st = os.statvfs("/")
    return {
        "cpu_cores": os.cpu_count() or 1,
        "cpu_arch": platform.machine(),
        "total_ram_mb": mem.get("MemTotal", 0) // 1024,
        "total_swap_mb": mem.get("SwapTotal", 0) // 1024,
        "root_size_mb": _mb(st.f_blocks * st.f_frsize),
        "root_fs_type": procfs.root_fs_type(),
        "kernel_version": os.uname().release,
        "psi_available": procfs.psi("cpu") is not None,
        "cgroup2_available": Hierarchies.discover().v2 is not None,
        "nftables_available": shutil.which("nft") is not None,
    }


async def sys_caps(ctx: Context, _args: NoArgs) -> dict[str, Any]:
    from . import allowed_instructions

    return {**machine_facts(), "role": ctx.role_name, "instructions": allowed_instructions(ctx)}


# --- SYS_HELLO --------------------------------------------------------------------------


@functools.cache
def node_id() -> str | None:
    """An application-specific keyed hash of the machine id, never the id itself."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            raw = procfs.read_text(path).strip()
        except OSError:
            continue
        if raw:
            return hmac.new(raw.encode(), _NODE_ID_APP_KEY, hashlib.sha256).hexdigest()[:32]
    return None


async def sys_hello(_ctx: Context, _args: NoArgs) -> dict[str, Any]:
    return {
        "node_id": node_id(),
        "server_time_ns": time.time_ns(),
        "server_version": __version__,
        "protocol_version": PROTOCOL_VERSION,
        "asys_version": ASYS_VERSION,
    }


# --- SYS_STATUS ---------------------------------------------------------------------------


@attrs.frozen
class _Raw:
    at_ns: int
    cpu: procfs.CpuTimes
    rx: int
    tx: int


def _raw() -> _Raw:
    cpu = procfs.parse_cpu_times(procfs.read_text("/proc/stat"))
    loopbacks = procfs.loopback_interfaces()
    rx = tx = 0
    for name, (r, t) in procfs.parse_net_dev(procfs.read_text("/proc/net/dev")).items():
        if name not in loopbacks:
            rx, tx = rx + r, tx + t
    return _Raw(time.monotonic_ns(), cpu, rx, tx)


def status_snapshot(prev: _Raw, cur: _Raw) -> dict[str, Any]:
    """SYS_STATUS fields from two raw samples plus the instantaneous readings."""
    window_ms = max(1, (cur.at_ns - prev.at_ns) // 1_000_000)
    d_total = max(0, cur.cpu.total - prev.cpu.total)
    d_idle = max(0, cur.cpu.idle - prev.cpu.idle)
    d_iowait = max(0, cur.cpu.iowait - prev.cpu.iowait)
    cpu_pct = 100.0 * (d_total - d_idle) / d_total if d_total else 0.0
    iowait_pct = 100.0 * d_iowait / d_total if d_total else 0.0
    load1, load5, load15 = procfs.parse_loadavg(procfs.read_text("/proc/loadavg"))
    mem = procfs.parse_meminfo(procfs.read_text("/proc/meminfo"))
    st = os.statvfs("/")
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    usable = used + st.f_bavail * st.f_frsize
    ncpu = os.cpu_count() or 1
    psi = {r: procfs.psi(r) for r in ("cpu", "memory", "io")}
    if psi["cpu"] is not None:
        rpi, rpi_source = min(100, int(psi["cpu"].get("some_avg10", 0.0))), "psi"
    else:
        rpi, rpi_source = min(100, int(100 * load1 / ncpu)), "load"
    return {
        "load_1min": load1,
        "load_5min": load5,
        "load_15min": load15,
        "cpu_pct": _clamp_pct(cpu_pct),
        "io_wait_pct": _clamp_pct(iowait_pct),
        "cpu_window_ms": window_ms,
        "available_mb": mem.get("MemAvailable", 0) // 1024,
        "total_ram_mb": mem.get("MemTotal", 0) // 1024,
        "root_used_pct": _clamp_pct(100.0 * used / usable if usable else 0.0),
        "root_used_mb": _mb(used),
        "root_available_mb": _mb(st.f_bavail * st.f_frsize),
        "net_in_bytes_per_s": max(0, cur.rx - prev.rx) * 1000 // window_ms,
        "net_out_bytes_per_s": max(0, cur.tx - prev.tx) * 1000 // window_ms,
        "net_window_ms": window_ms,
        "rpi": rpi,
        "rpi_source": rpi_source,
        "psi_cpu_some_avg10": (psi["cpu"] or {}).get("some_avg10"),
        "psi_memory_some_avg10": (psi["memory"] or {}).get("some_avg10"),
        "psi_memory_full_avg10": (psi["memory"] or {}).get("full_avg10"),
        "psi_io_some_avg10": (psi["io"] or {}).get("some_avg10"),
        "psi_io_full_avg10": (psi["io"] or {}).get("full_avg10"),
        "sampled_at_ns": time.time_ns(),
    }


class StatusSampler:
    """One background task that refreshes the SYS_STATUS snapshot every ``interval``."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.snapshot: dict[str, Any] | None = None
        self._ready = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """For the server's life; a failed read (no fds left, say) is logged and skipped."""
        prev: _Raw | None = None
        task_status.started()
        while True:
            try:
                cur = _raw()
            except OSError as exc:
                log.warning("status-sample-failed", error=str(exc))
            else:
                if prev is not None:
                    self.snapshot = status_snapshot(prev, cur)
                    self._ready.set()
                prev = cur
            await trio.sleep(self.interval)

    async def get(self) -> dict[str, Any]:
        await self._ready.wait()
        assert self.snapshot is not None
        return self.snapshot


async def sys_status(ctx: Context, _args: NoArgs) -> dict[str, Any]:
    snapshot: dict[str, Any] = await ctx.server.status.get()
    return snapshot


# --- SYS_PROCS --------------------------------------------------------------------------------


@attrs.frozen
class ProcsArgs:
    count: int = 5


@attrs.frozen
class _Scan:
    cpu_total: int
    procs: dict[tuple[int, int], tuple[procfs.ProcStat, int | None]]  # (pid, start) -> stat, uid


def _scan() -> _Scan:
    cpu = procfs.parse_cpu_times(procfs.read_text("/proc/stat"))
    procs = {}
    for pid in procfs.pids():
        st = procfs.read_proc_stat(pid)
        if st is not None:
            procs[(pid, st.starttime)] = (st, procfs.proc_uid(pid))
    return _Scan(cpu.total, procs)


@attrs.frozen
class ProcSample:
    window_ms: int
    cpu_total_delta: int
    rows: list[tuple[procfs.ProcStat, int | None, int]]  # stat, uid, tick delta
    taken_at: float


class ProcSampler:
    """Samples every process over a fixed window; callers within ``max_age`` share it."""

    def __init__(self, window: float = 0.5, max_age: float = 1.0) -> None:
        self.window = window
        self.max_age = max_age
        self._last: ProcSample | None = None
        self._inflight: trio.Event | None = None

    async def sample(self) -> ProcSample:
        while True:
            last = self._last
            if last is not None and trio.current_time() - last.taken_at <= self.max_age:
                return last
            if self._inflight is None:
                break
            await self._inflight.wait()
        self._inflight = done = trio.Event()
        try:
            first = _scan()
            start = trio.current_time()
            await trio.sleep(self.window)
            second = _scan()
            window_ms = int((trio.current_time() - start) * 1000)
            rows = []
            for key, (st, uid) in second.procs.items():
                before = first.procs.get(key)
                # a process born inside the window used all its ticks inside it
                delta = st.ticks - before[0].ticks if before else st.ticks
                rows.append((st, uid, max(0, delta)))
            self._last = ProcSample(
                window_ms, max(1, second.cpu_total - first.cpu_total), rows, trio.current_time()
            )
            return self._last
        finally:
            self._inflight = None
            done.set()


@functools.lru_cache(maxsize=1024)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def session_pids(ctx: Context) -> set[int]:
    """The pids that belong to this session's agent (its tty session and its cgroup)."""
    if ctx.session is None:
        return set()
    pids = reaper.session_members(ctx.session.tty_session)
    if ctx.session.cgroups is not None:
        pids.update(ctx.session.cgroups.pids())
    return pids


async def sys_procs(ctx: Context, args: ProcsArgs) -> dict[str, Any]:
    if not 1 <= args.count <= 50:
        raise AsysError(SW.WRONG_DATA, f"count must be 1..50, got {args.count}")
    sample: ProcSample = await ctx.server.procs.sample()
    ncpu = os.cpu_count() or 1
    mem_total_kb = procfs.parse_meminfo(procfs.read_text("/proc/meminfo")).get("MemTotal", 1)
    page_kb = os.sysconf("SC_PAGESIZE") // 1024
    mine = session_pids(ctx)
    top = sorted(sample.rows, key=lambda row: (-row[2], row[0].pid))[: args.count]
    return {
        "total_procs": len(sample.rows),
        "window_ms": sample.window_ms,
        "procs": [
            {
                "pid": st.pid,
                "user": _user_name(uid) if uid is not None else None,
                "uid": uid,
                "comm": st.comm,
                "state": st.state,
                "cpu_pct": round(100.0 * ticks * ncpu / sample.cpu_total_delta, 2),
                "mem_pct": round(100.0 * st.rss_pages * page_kb / mem_total_kb, 2),
                "zombie": st.state == "Z",
                "d_state": st.state == "D",
                "stopped": st.state in ("T", "t"),
                "root": uid == 0,
                "kernel_thread": st.kernel_thread,
                "this_session": st.pid in mine,
            }
            for st, uid, ticks in top
        ],
    }


INSTRUCTIONS = (
    Instruction(
        "SYS_CAPS",
        sys_caps,
        NoArgs,
        read_only=True,
        summary="static machine facts and the instructions this caller may use",
    ),
    Instruction(
        "SYS_HELLO", sys_hello, NoArgs, read_only=True, summary="node id, server time, versions"
    ),
    Instruction(
        "SYS_STATUS",
        sys_status,
        NoArgs,
        read_only=True,
        summary="load, CPU, memory, disk, network, pressure",
    ),
    Instruction(
        "SYS_PROCS",
        sys_procs,
        ProcsArgs,
        read_only=True,
        summary="process count and the top N by CPU",
    ),
)

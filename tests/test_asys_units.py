"""ASys pieces that need no server: /proc parsers, validation, expiry, dispatch rules."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from aaau import asys, procfs
from aaau.asys import process, system, tasks
from aaau.asys.base import SW, AsysError, Context, SessionScope
from aaau.config import Config
from aaau.messages import Role

STAT = "4242 (my (weird) proc) S 1 4242 4242 34816 4242 4194560 100 0 0 0 25 17 0 0 20 0 1 0 777 1000 3 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"


def test_proc_stat_parser_handles_parentheses_in_comm() -> None:
    st = procfs.parse_proc_stat(STAT)
    assert (st.pid, st.comm, st.state, st.ppid, st.session) == (
        4242,
        "my (weird) proc",
        "S",
        1,
        4242,
    )
    assert (st.ticks, st.starttime, st.rss_pages) == (42, 777, 3)
    assert not st.kernel_thread


def test_kernel_thread_flag() -> None:
    st = procfs.parse_proc_stat(STAT.replace(" 4194560 ", f" {procfs.PF_KTHREAD} "))
    assert st.kernel_thread


def test_cpu_meminfo_loadavg_psi_netdev_parsers() -> None:
    cpu = procfs.parse_cpu_times("cpu  10 1 5 100 4 0 0 0 0 0\ncpu0 1 1 1 1 1 1 1 1\n")
    assert (cpu.total, cpu.idle, cpu.iowait) == (120, 104, 4)
    assert procfs.parse_meminfo("MemTotal:  2048 kB\nMemAvailable: 1024 kB\n") == {
        "MemTotal": 2048,
        "MemAvailable": 1024,
    }
    assert procfs.parse_loadavg("0.50 1.25 30.00 1/100 999\n") == (0.5, 1.25, 30.0)
    psi = procfs.parse_psi(
        "some avg10=1.50 avg60=0.00 avg300=0.00 total=1\n"
        "full avg10=0.25 avg60=0.00 avg300=0.00 total=1\n"
    )
    assert psi == {"some_avg10": 1.5, "full_avg10": 0.25}
    netdev = (
        "Inter-|   Receive\n face |bytes packets\n"
        "    lo: 100 1 0 0 0 0 0 0 200 2 0 0 0 0 0 0\n"
        "  eth0: 300 3 0 0 0 0 0 0 400 4 0 0 0 0 0 0\n"
    )
    assert procfs.parse_net_dev(netdev) == {"lo": (100, 200), "eth0": (300, 400)}


def test_status_saturates_instead_of_wrapping() -> None:
    prev = system._Raw(0, procfs.CpuTimes(1000, 500, 10), rx=5000, tx=5000)
    cur = system._Raw(1_000_000_000, procfs.CpuTimes(900, 400, 5), rx=10, tx=10)  # reset
    snap = system.status_snapshot(prev, cur)
    assert snap["cpu_pct"] == 0.0 and snap["io_wait_pct"] == 0.0
    assert snap["net_in_bytes_per_s"] == 0 and snap["net_out_bytes_per_s"] == 0
    assert snap["cpu_window_ms"] == 1000


def test_status_fields_are_in_range() -> None:
    """TC-CORE-003, over a real second of this machine."""
    prev = system._Raw(0, procfs.CpuTimes(0, 0, 0), 0, 0)
    snap = system.status_snapshot(prev, system._raw())
    for key in ("cpu_pct", "io_wait_pct", "root_used_pct"):
        assert 0 <= snap[key] <= 100
    assert 0 <= snap["rpi"] <= 100
    assert snap["rpi_source"] in ("psi", "load")
    assert snap["available_mb"] > 0 and snap["total_ram_mb"] >= snap["available_mb"]


def test_caps_facts() -> None:
    """TC-CORE-001 value checks."""
    facts = system.machine_facts()
    assert facts["cpu_cores"] > 0 and facts["total_ram_mb"] > 0 and facts["root_size_mb"] > 0
    assert re.match(r"\d+\.\d+", facts["kernel_version"])
    assert facts["cpu_arch"]


def test_node_id_is_a_keyed_hash_not_the_machine_id() -> None:
    if not Path("/etc/machine-id").exists():
        pytest.skip("this machine has no /etc/machine-id")
    node = system.node_id()
    raw = Path("/etc/machine-id").read_text().strip()
    assert node is not None
    assert re.fullmatch(r"[0-9a-f]{32}", node)
    assert raw[:8] not in node and node != raw


@pytest.mark.parametrize(
    "name",
    ["A", "Nginx", "../etc/passwd", "nginx.service", "-h", "", ".hidden", "a" * 65, "a b", "x;rm"],
)
def test_invalid_service_names_are_refused(name: str) -> None:
    """TC-SVC-003..006, -008 and option injection."""
    with pytest.raises(AsysError) as info:
        tasks.validate_service(name)
    assert info.value.sw == SW.WRONG_DATA


@pytest.mark.parametrize("name", ["nginx", "a" * 64, "getty@tty1", "my_svc-2.x"])
def test_valid_service_names(name: str) -> None:
    tasks.validate_service(name)  # TC-SVC-007


async def test_results_expire_after_completion_not_creation() -> None:
    """TC-QUERY-011: a finished result lives task_ttl after it finished; pending never expires."""
    book = {
        "old": tasks.Task("old", "a", state="success", finished_at=trio.current_time() - 10),
        "new": tasks.Task("new", "b", state="failed", finished_at=trio.current_time()),
        "run": tasks.Task("run", "c"),
    }
    tasks.sweep(book, ttl=5)
    assert set(book) == {"new", "run"}


class _Server:
    config = Config()


def _ctx(role: Role, session: SessionScope | None = None) -> Context:
    return Context(role, "u", 1000, frozenset({1000}), _Server(), session)


async def test_dispatch_status_words_before_any_handler() -> None:
    scope = SessionScope("s", 999, 1, None)
    sw, _, msg = await asys.dispatch("NO_SUCH", {}, _ctx(Role.ADMIN))
    assert (sw, msg) == (SW.NOT_FOUND, "unknown instruction 'NO_SUCH'")  # TC-SW-001
    sw, _, msg = await asys.dispatch(
        "PROC_THROTTLE", {"pid": 5, "action": "stop"}, _ctx(Role.ADMIN)
    )
    assert sw == SW.NOT_FOUND and "inside a session" in msg
    sw, _, msg = await asys.dispatch(
        "PROC_THROTTLE", {"pid": 5, "action": "stop"}, _ctx(Role.READONLY, scope)
    )
    assert sw == SW.DENIED and "readonly" in msg  # TC-PROC-001
    sw, _, msg = await asys.dispatch("SVC_RESTART", {"service": "x"}, _ctx(Role.INTERACTIVE, scope))
    assert sw == SW.DENIED  # TC-SVC-001: Admin only by default
    sw, _, msg = await asys.dispatch(
        "PROC_THROTTLE", {"pid": "5", "action": "stop"}, _ctx(Role.ADMIN, scope)
    )
    assert sw == SW.WRONG_LENGTH and "pid" in msg  # TC-PROC-002
    sw, _, msg = await asys.dispatch("TASK_QUERY", {}, _ctx(Role.READONLY, scope))
    assert sw == SW.WRONG_LENGTH and "handle" in msg  # TC-QUERY-001
    sw, _, msg = await asys.dispatch("SYS_PROCS", {"count": 5, "extra": 1}, _ctx(Role.ADMIN))
    assert sw == SW.WRONG_LENGTH and "extra" in msg


@pytest.mark.parametrize(
    ("pid", "action"),
    [(0, "stop"), (1, "stop"), (-1, "stop"), (2**32 - 1, "stop"), (5000, "pause")],
)
async def test_throttle_refuses_bad_targets_without_signalling(pid: int, action: str) -> None:
    """TC-PROC-003/004/007 and the holes: pid 1, -1, 0xFFFFFFFF, unknown action."""
    scope = SessionScope("s", 999, 1, None)
    sw, _, msg = await asys.dispatch(
        "PROC_THROTTLE", {"pid": pid, "action": action}, _ctx(Role.ADMIN, scope)
    )
    assert sw == SW.WRONG_DATA, msg


async def test_throttle_refuses_the_server_itself() -> None:
    scope = SessionScope("s", os.getuid(), os.getpid(), None)
    sw, _, msg = await asys.dispatch(
        "PROC_THROTTLE", {"pid": os.getpid(), "action": "stop"}, _ctx(Role.ADMIN, scope)
    )
    assert sw == SW.DENIED and "aaau server" in msg


async def test_resume_stopped_continues_through_the_kept_pidfd() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        pidfd = os.pidfd_open(child.pid)
        signal.pidfd_send_signal(pidfd, signal.SIGSTOP)
        with trio.fail_after(5):
            while (st := procfs.read_proc_stat(child.pid)) is None or st.state != "T":
                await trio.sleep(0.01)
        scope = SessionScope("s", 0, 1, None, stopped={child.pid: pidfd})
        await process.resume_stopped(scope)
        with trio.fail_after(5):
            while (st := procfs.read_proc_stat(child.pid)) is not None and st.state == "T":
                await trio.sleep(0.01)
        assert scope.stopped == {}
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("error", "sw"),
    [
        (OSError(12, "Cannot allocate memory"), SW.OUT_OF_MEMORY),  # TC-SVC-012: fork ENOMEM
        (MemoryError(), SW.OUT_OF_MEMORY),
        (OSError(5, "Input/output error"), SW.SYSTEM_ERROR),
    ],
)
async def test_os_failures_map_to_6f_status_words(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, sw: str
) -> None:
    async def failing(_ctx: Context, _args: object) -> dict[str, object]:
        raise error

    fake = asys.Instruction("FAKE", failing, system.NoArgs, read_only=True)
    monkeypatch.setitem(asys.TABLE, "FAKE", fake)
    got, result, _ = await asys.dispatch("FAKE", {}, _ctx(Role.READONLY))
    assert (got, result) == (sw, None)


def test_every_instruction_is_documented() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "asys.md").read_text()
    for name in asys.TABLE:
        assert f"### {name}" in doc
    for sw in SW:
        assert f"`{sw}`" in doc


async def test_sys_procs_flags_stopped_zombie_root_and_this_sessions_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def row(pid: int, state: str, uid: int, ticks: int) -> tuple[procfs.ProcStat, int, int]:
        text = STAT.replace("4242 (my (weird) proc) S", f"{pid} (p) {state}")
        return (procfs.parse_proc_stat(text), uid, ticks)

    class Server:
        config = Config()
        procs = system.ProcSampler()

    ctx = Context(Role.READONLY, "u", 1000, frozenset(), Server(), SessionScope("s", 1000, 7, None))
    monkeypatch.setattr(system, "session_pids", lambda _ctx: {30})
    ctx.server.procs._last = system.ProcSample(
        500,
        200,
        [row(30, "T", 1000, 0), row(40, "Z", 1000, 9), row(50, "R", 0, 100)],
        trio.current_time(),
    )
    result = await system.sys_procs(ctx, system.ProcsArgs(count=3))
    by_pid = {p["pid"]: p for p in result["procs"]}
    assert [p["pid"] for p in result["procs"]] == [50, 40, 30]  # by CPU, then pid
    assert by_pid[30]["stopped"] and not by_pid[30]["zombie"]
    assert by_pid[40]["zombie"] and by_pid[50]["root"] and not by_pid[40]["root"]
    assert [p["this_session"] for p in result["procs"]] == [False, False, True]
    # what ps shows anyone: never a command line or an environment
    assert set(result["procs"][0]) == {
        "pid",
        "user",
        "uid",
        "comm",
        "state",
        "cpu_pct",
        "mem_pct",
        "zombie",
        "d_state",
        "stopped",
        "root",
        "kernel_thread",
        "this_session",
    }
    assert result["total_procs"] == 3 and result["window_ms"] == 500


async def test_net_isolate_without_nft_is_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    from aaau.asys import network

    monkeypatch.setattr(network.shutil, "which", lambda *_a, **_k: None)
    scope = SessionScope("s", 1000, 7, Path("/nonexistent-cgroup"))
    sw, result, msg = await asys.dispatch("NET_ISOLATE", {}, _ctx(Role.ADMIN, scope))
    assert (sw, result) == (SW.NOT_SUPPORTED, None) and "nft" in msg

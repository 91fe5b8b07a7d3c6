"""PROC_THROTTLE: stop or continue one process of this session's agent, through a pidfd."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import attrs
import trio

from .. import procfs
from .base import SW, AsysError, Context, Instruction, SessionScope
from .system import session_pids

#: after a signal, how long PROC_THROTTLE waits to see the process change state
_STATE_WAIT = 1.0
_STATE_POLL = 0.01


@attrs.frozen
class ThrottleArgs:
    pid: int
    action: str  # "stop" or "cont"


def _server_and_ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        st = procfs.read_proc_stat(pid)
        if st is None:
            break
        pid = st.ppid
    return pids


def _refuse_target(ctx: Context, scope: SessionScope, pid: int) -> None:
    """Raise unless ``pid`` is a live user process of this session's agent."""
    st = procfs.read_proc_stat(pid)
    if st is None:
        raise AsysError(SW.WRONG_DATA, f"no process {pid}")
    if st.kernel_thread:
        raise AsysError(SW.DENIED, f"process {pid} ({st.comm}) is a kernel thread")
    uid = procfs.proc_uid(pid)
    if uid != scope.agent_uid:
        raise AsysError(
            SW.DENIED,
            f"process {pid} ({st.comm}) belongs to uid {uid}, not to this session's agent user",
        )
    if pid not in session_pids(ctx):
        raise AsysError(SW.DENIED, f"process {pid} ({st.comm}) is not part of this session")


async def _state_after(pid: int, want: set[str]) -> str:
    """The process state once the signal has landed (bounded wait)."""
    state = "?"
    with trio.move_on_after(_STATE_WAIT):
        while True:
            st = procfs.read_proc_stat(pid)
            state = st.state if st else "gone"
            if state in want or st is None:
                break
            await trio.sleep(_STATE_POLL)
    return state


async def proc_throttle(ctx: Context, args: ThrottleArgs) -> dict[str, Any]:
    scope = ctx.session
    assert scope is not None
    if args.action not in ("stop", "cont"):
        raise AsysError(SW.WRONG_DATA, f"action must be 'stop' or 'cont', got {args.action!r}")
    pid, limit = args.pid, procfs.pid_max()
    if not 1 < pid <= limit:
        raise AsysError(SW.WRONG_DATA, f"pid must be between 2 and {limit}, got {pid}")
    if pid in _server_and_ancestors():
        raise AsysError(SW.DENIED, f"process {pid} is the aaau server or one of its ancestors")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise AsysError(SW.WRONG_DATA, f"no process {pid}") from None
    keep = False
    try:
        _refuse_target(ctx, scope, pid)
        sig = signal.SIGSTOP if args.action == "stop" else signal.SIGCONT
        # the checks above read /proc by number; the pidfd pins the process they
        # describe: if it died (and the pid was reused) this raises instead
        signal.pidfd_send_signal(pidfd, sig)
        if args.action == "stop":
            old = scope.stopped.pop(pid, None)
            if old is not None:
                os.close(old)
            scope.stopped[pid] = pidfd
            keep = True
        else:
            old = scope.stopped.pop(pid, None)
            if old is not None:
                os.close(old)
    except ProcessLookupError:
        raise AsysError(SW.WRONG_DATA, f"process {pid} has exited") from None
    finally:
        if not keep:
            os.close(pidfd)
    want = {"T", "t"} if args.action == "stop" else {"R", "S", "D", "I"}
    return {"pid": pid, "action": args.action, "state": await _state_after(pid, want)}


async def resume_stopped(scope: SessionScope) -> None:
    """At session end: continue every process this session stopped."""
    for pidfd in scope.stopped.values():
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGCONT)
        os.close(pidfd)
    scope.stopped.clear()


INSTRUCTIONS = (
    Instruction(
        "PROC_THROTTLE",
        proc_throttle,
        ThrottleArgs,
        read_only=False,
        needs_session=True,
        summary="SIGSTOP/SIGCONT a process of this session's agent",
    ),
)

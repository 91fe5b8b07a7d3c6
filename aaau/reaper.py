"""Ending every process a session started: process groups, tty session, cgroup.

A shell's background jobs live in process groups of their own, so killing the
agent's group is not enough: we signal every process group whose tty session
is the agent's (it is the session leader), and, where cgroup v2 is writable, the session's cgroup
(which also holds processes that left the tty session with setsid).
"""

from __future__ import annotations

import contextlib
import os
import signal

import trio

from .cgroups import SessionCgroups

#: how often /proc and cgroup.procs are looked at while waiting for processes to go
_POLL = 0.02


def session_members(sid: int) -> set[int]:
    """The live (not zombie) pids whose tty session id is ``sid``, from /proc."""
    members = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after the parenthesised comm: state ppid pgrp session ...
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) > 3 and rest[0] != b"Z" and int(rest[3]) == sid:
            members.add(int(entry.name))
    return members


def _signal_all(sid: int, cgroups: SessionCgroups | None, sig: int) -> bool:
    """Send ``sig`` to every process of the session; True if any was found."""
    members = session_members(sid)
    groups = set()
    for pid in members:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
    found = bool(members)
    if cgroups is not None and cgroups.pids():
        found = True
        cgroups.signal(sig)
    return found


def _alive(sid: int, cgroups: SessionCgroups | None) -> bool:
    return bool(session_members(sid)) or bool(cgroups is not None and cgroups.pids())


async def terminate(sid: int, cgroups: SessionCgroups | None, grace: float) -> None:
    """SIGHUP and SIGTERM to all of the session, ``grace`` seconds, then SIGKILL."""
    if not _signal_all(sid, cgroups, signal.SIGHUP):
        return
    _signal_all(sid, cgroups, signal.SIGTERM)
    with trio.move_on_after(grace):
        while _alive(sid, cgroups):  # noqa: ASYNC110 - /proc offers no event to wait on
            await trio.sleep(_POLL)
        return
    _signal_all(sid, cgroups, signal.SIGKILL)
    with trio.move_on_after(grace):
        while _alive(sid, cgroups):  # noqa: ASYNC110 - /proc offers no event to wait on
            await trio.sleep(_POLL)

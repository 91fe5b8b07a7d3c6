"""Ending every process a session started: process groups, tty session, cgroup.

A shell's background jobs live in process groups of their own, so killing the
agent's group is not enough: we signal every process group whose tty session
is the agent's (it is the session leader), and, where cgroup v2 is writable, the session's cgroup
(which also holds processes that left the tty session with setsid).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path

import trio

#: how often /proc and cgroup.procs are looked at while waiting for processes to go
_POLL = 0.02
#: how long an emptied cgroup may take to become removable (the kernel empties it lazily)
_RMDIR_WAIT = 2.0


def cgroup2_mount() -> Path | None:
    """Where cgroup v2 is mounted, from /proc/mounts (None if nowhere)."""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    return Path(fields[1])
    except OSError:
        pass
    return None


def make_session_cgroup(session_id: str) -> Path | None:
    """A fresh cgroup for one session under ``<cgroup2>/aaau``, or None if we cannot."""
    mount = cgroup2_mount()
    if mount is None:
        return None
    base = mount / "aaau"
    try:
        base.mkdir(mode=0o755, exist_ok=True)
        path = base / session_id
        path.mkdir(mode=0o755)
        if not (path / "cgroup.kill").exists():
            path.rmdir()
            return None
    except OSError:
        return None
    return path


def cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


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


def _signal_all(sid: int, cgroup: Path | None, sig: int) -> bool:
    """Send ``sig`` to every process of the session; True if any was found."""
    found = False
    groups = set()
    for pid in session_members(sid):
        found = True
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
    if cgroup is not None:
        pids = cgroup_pids(cgroup)
        found = found or bool(pids)
        if sig == signal.SIGKILL and pids:
            with contextlib.suppress(OSError):
                (cgroup / "cgroup.kill").write_text("1")
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
    return found


def _alive(sid: int, cgroup: Path | None) -> bool:
    if session_members(sid):
        return True
    return bool(cgroup is not None and cgroup_pids(cgroup))


async def terminate(sid: int, cgroup: Path | None, grace: float) -> None:
    """SIGHUP and SIGTERM to all of the session, ``grace`` seconds, then SIGKILL."""
    if not _signal_all(sid, cgroup, signal.SIGHUP):
        return
    _signal_all(sid, cgroup, signal.SIGTERM)
    with trio.move_on_after(grace):
        while _alive(sid, cgroup):  # noqa: ASYNC110 - /proc offers no event to wait on
            await trio.sleep(_POLL)
        return
    _signal_all(sid, cgroup, signal.SIGKILL)
    with trio.move_on_after(grace):
        while _alive(sid, cgroup):  # noqa: ASYNC110 - /proc offers no event to wait on
            await trio.sleep(_POLL)


async def remove_cgroup(cgroup: Path) -> None:
    """Remove an emptied session cgroup (the kernel empties it asynchronously)."""
    with trio.move_on_after(_RMDIR_WAIT):
        while True:
            try:
                cgroup.rmdir()  # noqa: ASYNC240 - cgroupfs, never blocks
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return
            await trio.sleep(_POLL)

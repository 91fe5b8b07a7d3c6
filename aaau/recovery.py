"""What a server that died without ending its sessions leaves, and the next one ends.

:class:`Ledger` keeps one file per running session in ``<state_dir>/sessions``
(root only): who started it, what it runs, as whom, in which cgroups. It is
written when the agent has started and removed when the session has ended,
so after a crash (``kill -9``, power loss) the files that remain name the
sessions nobody ended. :func:`recover`, at the next start and before anyone
can connect, kills every process in their cgroups (an agent that ignores
SIGHUP survived the server), removes the cgroups, and writes ``session_end``
with ``lost`` and what is known. Cgroups under this server's base without a
file (a crash between spawn and file) are ended and removed too.

The cgroup base is locked (flock on its cgroup2 directory) for the server's
life: two servers never share one, so neither ends the other's sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any, Final

import structlog
import trio

from . import cgroups, paths
from .audit import AuditLog

log = structlog.get_logger("aaau.recovery")

#: how long the processes of a lost session may take to die after SIGKILL
_KILL_WAIT: Final = 5.0
_POLL: Final = 0.02


class Ledger:
    """``<state_dir>/sessions/<id>.json``: the sessions this server has running."""

    def __init__(self, state_dir: str) -> None:
        self.directory = os.path.join(state_dir, "sessions")

    def _dir(self) -> int:
        return paths.open_dir(self.directory, create=(0, 0, 0o700))

    def started(self, session_id: str, facts: dict[str, Any]) -> None:
        dir_fd = self._dir()
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            fd = paths.open_file(dir_fd, f"{session_id}.json", flags, 0o600, self.directory)
            with os.fdopen(fd, "w") as f:
                json.dump({"session_id": session_id, "started": time.time(), **facts}, f)
        finally:
            os.close(dir_fd)

    def ended(self, session_id: str) -> None:
        dir_fd = self._dir()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{session_id}.json", dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def entries(self) -> list[dict[str, Any]]:
        dir_fd = self._dir()
        found = []
        try:
            for name in sorted(os.listdir(dir_fd)):
                if not name.endswith(".json"):
                    continue
                with contextlib.suppress(OSError, ValueError):
                    fd = paths.open_file(dir_fd, name, os.O_RDONLY, 0, self.directory)
                    with os.fdopen(fd) as f:
                        entry = json.load(f)
                    if isinstance(entry, dict) and "session_id" in entry:
                        found.append(entry)
        finally:
            os.close(dir_fd)
        return found


class BaseLock:
    """Holds ``<cgroup2>/<base>`` (flock) for the server's life."""

    def __init__(self, base: str, where: cgroups.Hierarchies) -> None:
        self._fd = -1
        if where.v2 is None:
            return
        directory = where.v2 / base
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o755)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fd = paths.hold(
            fd,
            f"another aaau server keeps its sessions' cgroups under {directory} "
            "(give each server its own cgroup_base)",
        )

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def _end(group: cgroups.SessionCgroups) -> int:
    """SIGKILL everything in the cgroups, wait for them to empty, remove them."""
    killed = len(group.pids())
    with trio.move_on_after(_KILL_WAIT):
        while group.pids():
            group.signal(signal.SIGKILL)
            await trio.sleep(_POLL)
    await group.remove()
    return killed


def _group_of(
    entry: dict[str, Any], base: str, where: cgroups.Hierarchies
) -> cgroups.SessionCgroups:
    """The cgroups a ledger entry names, if they are still under this server's base."""
    found = cgroups.SessionCgroups()
    for leftover in cgroups.leftovers(base, where):
        dirs = leftover.dirs
        if dirs and dirs[0].name == entry["session_id"]:
            return leftover
    return found


async def recover(ledger: Ledger, base: str, audit: AuditLog) -> list[str]:
    """End what a predecessor left behind; the lost sessions' ids."""
    where = cgroups.Hierarchies.discover()
    lost = []
    for entry in ledger.entries():
        session_id = str(entry["session_id"])
        group = _group_of(entry, base, where)
        killed = await _end(group)
        audit.note(
            "session_end",
            session_id=session_id,
            user=str(entry.get("creator", "-")),
            uid=entry.get("creator_uid"),
            content="lost: the server stopped without ending it",
            metadata={
                "lost": True,
                "exit_code": None,
                "signal": None,
                "processes_killed": killed,
                "started": entry.get("started"),
                "argv": entry.get("argv"),
                "agent_user": entry.get("agent_user"),
                "agent_pid": entry.get("agent_pid"),
            },
        )
        ledger.ended(session_id)
        lost.append(session_id)
        log.warning("session-lost", session_id=session_id, processes_killed=killed)
    for group in cgroups.leftovers(base, where):  # no ledger entry: made, then a crash
        name = group.dirs[0].name if group.dirs else "?"
        killed = await _end(group)
        audit.note(
            "cgroup_removed",
            content=f"{name}: a session's cgroups that no session owned",
            metadata={"processes_killed": killed, "dirs": [str(d) for d in group.dirs]},
        )
    return lost

"""Per-session cgroups: every process of a session, and its resource caps.

A session gets a cgroup in the cgroup2 hierarchy (membership: listing and
``cgroup.kill``, and NET_ISOLATE's ``socket cgroupv2`` match) and caps on
processes (``pids``), memory (``memory``) and a fair CPU share (``cpu``). Each
cap uses the cgroup2 controller where the machine enables it, else the cgroup
v1 hierarchy of that controller (hybrid machines mount them beside cgroup2),
else nothing: the launcher's rlimits are the last line (RLIMIT_NPROC for the
identity, RLIMIT_NOFILE per process). :attr:`SessionCgroups.enforced` says
which, per cap, and ``session_start`` records it.

The hierarchies are found in /proc/mounts, never assumed. Under a systemd
unit with ``Delegate=yes`` the cgroup2 subtree of the unit is the server's
(systemd marks it with the ``trusted.delegate`` attribute): the sessions'
cgroups go below it, so ``systemctl status``, the unit's ``MemoryMax=`` and
``TasksMax=`` and a restart's ``KillMode=`` cover them; the server moves
itself to a leaf of its own (``server``), as cgroup2's "no processes in
inner nodes" rule wants (:func:`take_delegated`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs
import trio

#: how long an emptied cgroup may take to become removable (the kernel empties it lazily)
_RMDIR_WAIT: Final = 2.0
_POLL: Final = 0.02
#: the caps and, per hierarchy, the file that sets each
_V2_FILES: Final = {"pids": "pids.max", "memory": "memory.max"}
_V1_FILES: Final = {"pids": "pids.max", "memory": "memory.limit_in_bytes"}
#: where swap would let a memory cap leak, the file that closes it, and its value
_SWAP_FILES: Final = {"cgroup2": "memory.swap.max", "cgroup1": "memory.memsw.limit_in_bytes"}
CONTROLLERS: Final = ("pids", "memory", "cpu")


@attrs.frozen
class Caps:
    """What one session may use (None: no cap)."""

    pids_max: int | None = None
    memory_max: int | None = None  # bytes

    def value(self, controller: str) -> int | None:
        return {"pids": self.pids_max, "memory": self.memory_max}.get(controller)


@attrs.frozen
class Hierarchies:
    """The cgroup hierarchies this machine mounts."""

    v2: Path | None  # where cgroup2 paths begin: the mount, or a subtree delegated to us
    v1: dict[str, Path] = attrs.field(factory=dict)  # controller -> its v1 mount
    v2_mount: Path | None = attrs.field(default=attrs.Factory(lambda h: h.v2, takes_self=True))

    @classmethod
    def discover(cls, mounts: str = "/proc/mounts", own: str = "/proc/self/cgroup") -> Hierarchies:
        try:
            text = Path(mounts).read_text()
        except OSError:
            return cls(None)
        found = cls.parse(text)
        if found.v2 is not None and (delegated := _delegated(found.v2, own)) is not None:
            return attrs.evolve(found, v2=delegated)
        return found

    @property
    def delegated(self) -> bool:
        return self.v2 != self.v2_mount

    @classmethod
    def parse(cls, text: str) -> Hierarchies:
        v2, v1 = None, {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 4:
                continue
            if fields[2] == "cgroup2" and v2 is None:
                v2 = Path(fields[1])
            elif fields[2] == "cgroup":
                for option in fields[3].split(","):
                    if option in CONTROLLERS and option not in v1:
                        v1[option] = Path(fields[1])
        return cls(v2, v1)


def _own_cgroup(own: str = "/proc/self/cgroup") -> str | None:
    """This process's cgroup2 path ("0::/system.slice/aaau.service" -> that path)."""
    with contextlib.suppress(OSError):
        for line in Path(own).read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    return None


def _delegated(mount: Path, own: str = "/proc/self/cgroup") -> Path | None:
    """The nearest cgroup at or above ours that systemd delegated (Delegate=yes), if any."""
    path = _own_cgroup(own)
    if path is None:
        return None
    node = mount / path.lstrip("/")
    while node != mount and mount in node.parents:
        with contextlib.suppress(OSError):
            if os.getxattr(node, "trusted.delegate") == b"1":
                return node
        node = node.parent
    return None


#: the leaf of a delegated subtree the server itself lives in
SERVER_LEAF: Final = "server"


def take_delegated(where: Hierarchies) -> Path | None:
    """In a delegated subtree, move this process out of its top into ``server`` (so
    controllers can be enabled for the sessions beside it); the leaf, or None."""
    if not where.delegated or where.v2 is None or where.v2_mount is None:
        return None
    own = _own_cgroup()
    if own is None or where.v2_mount / own.lstrip("/") != where.v2:
        return None  # already in a leaf below it
    leaf = where.v2 / SERVER_LEAF
    with contextlib.suppress(FileExistsError):
        leaf.mkdir(mode=0o755)
    (leaf / "cgroup.procs").write_text(str(os.getpid()))
    return leaf


def _write(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
    except OSError:
        return False
    return True


def _v2_enable(base: Path, mount: Path, controller: str) -> bool:
    """Enable ``controller`` from the cgroup2 root down to ``base``'s children."""
    if controller not in (mount / "cgroup.controllers").read_text().split():
        return False
    node, chain = mount, [mount]
    for part in base.relative_to(mount).parts:
        node = node / part
        chain.append(node)
    return all(_write(d / "cgroup.subtree_control", f"+{controller}") for d in chain)


@attrs.define
class SessionCgroups:
    """The cgroups of one session; ``dirs`` are the ones its launcher joins."""

    v2: Path | None = None
    v1: dict[str, Path] = attrs.field(factory=dict)  # controller -> the session's v1 cgroup
    enforced: dict[str, str] = attrs.field(factory=dict)  # cap -> cgroup2 | cgroup1 | none

    @property
    def dirs(self) -> list[Path]:
        return ([self.v2] if self.v2 else []) + list(self.v1.values())

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(x) for x in (directory / "cgroup.procs").read_text().split())
        return found

    def signal(self, signum: int) -> None:
        """Signal every member; SIGKILL through ``cgroup.kill`` where there is one."""
        if signum == signal.SIGKILL and self.v2 and _write(self.v2 / "cgroup.kill", "1"):
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    async def remove(self) -> None:
        """Remove the emptied cgroups (the kernel empties them asynchronously)."""
        for directory in self.dirs:
            await _rmdir(directory)


async def _rmdir(directory: Path) -> None:
    with trio.move_on_after(_RMDIR_WAIT):
        while True:
            try:
                directory.rmdir()  # noqa: ASYNC240 - cgroupfs, never blocks
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return
            await trio.sleep(_POLL)


def create(base: str, session_id: str, caps: Caps, where: Hierarchies) -> SessionCgroups:
    """The cgroups of a new session under ``base`` in each hierarchy, with its caps set."""
    made = SessionCgroups()
    if where.v2 is not None:
        made.v2 = _mkdir(where.v2 / base / session_id, need="cgroup.kill")
    for controller in CONTROLLERS:
        made.enforced[controller] = _cap(made, controller, base, session_id, caps, where)
    return made


def _close_swap(directory: Path, kind: str, value: int | None) -> None:
    """Memory plus swap capped like memory (a machine without swap has no such file)."""
    if value is not None:
        path = directory / _SWAP_FILES[kind]
        if path.exists():
            _write(path, "0" if kind == "cgroup2" else str(value))


def _cap(
    made: SessionCgroups,
    controller: str,
    base: str,
    session_id: str,
    caps: Caps,
    where: Hierarchies,
) -> str:
    value = caps.value(controller)
    text = "max" if value is None else str(value)
    if made.v2 is not None and where.v2 is not None and _v2_enable(
        made.v2.parent, where.v2, controller
    ):
        setting = _V2_FILES.get(controller)
        if setting is None or _write(made.v2 / setting, text):
            if controller == "memory":
                _close_swap(made.v2, "cgroup2", value)
            return "cgroup2"
    mount = where.v1.get(controller)
    if mount is not None:
        directory = _mkdir(mount / base / session_id)
        if directory is not None:
            setting = _V1_FILES.get(controller)
            v1_text = "-1" if value is None and controller == "memory" else text
            if setting is None or _write(directory / setting, v1_text):
                made.v1[controller] = directory
                if controller == "memory":
                    _close_swap(directory, "cgroup1", value)
                return "cgroup1"
            with contextlib.suppress(OSError):
                directory.rmdir()
    return "none"


def _mkdir(path: Path, need: str | None = None) -> Path | None:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.mkdir(mode=0o755)
    except FileExistsError:
        pass
    except OSError:
        return None
    if need is not None and not (path / need).exists():
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return path


def leftovers(base: str, where: Hierarchies) -> Iterator[SessionCgroups]:
    """Session cgroups under ``base`` that exist now (a predecessor's, after a crash)."""
    by_name: dict[str, SessionCgroups] = {}
    roots = ([("v2", where.v2)] if where.v2 else []) + list(where.v1.items())
    for kind, mount in roots:
        with contextlib.suppress(OSError):
            for entry in (mount / base).iterdir():
                if entry.is_dir():
                    group = by_name.setdefault(entry.name, SessionCgroups())
                    if kind == "v2":
                        group.v2 = entry
                    else:
                        group.v1[kind] = entry
    yield from by_name.values()

"""What every ASys handler shares: status words, errors, the call context, the table entry.

The protocol layer (messages, codec) knows nothing of this package; the server
hands :func:`aaau.asys.dispatch` an instruction name, plain-data arguments and
a :class:`Context`, and gets back a status word and a JSON-ready result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs

from ..audit import AuditLog, BoundAudit
from ..cgroups import SessionCgroups
from ..messages import Role, StatusWord

#: the status words (an enum of the protocol's vocabulary), under ASys's short name
SW = StatusWord
#: calls one connection may have running at once; one more is answered 6400 at once
IN_FLIGHT = 4


class AsysError(Exception):
    """A handler's refusal: the status word and a message for the caller."""

    def __init__(self, sw: StatusWord, message: str) -> None:
        super().__init__(message)
        self.sw = sw


@attrs.define(eq=False)
class SessionScope:
    """What ASys keeps per session: stopped processes, tasks, network isolation.

    Owned by the session; :meth:`close` runs when the session ends.
    """

    session_id: str
    agent_uid: int
    tty_session: int  # the agent is its session leader: sid == the agent's pid
    cgroups: SessionCgroups | None
    #: pid -> pidfd of processes this session stopped (resumed on close)
    stopped: dict[int, int] = attrs.field(factory=dict)
    #: closers registered by instruction families (tasks, isolation)
    closers: list[Callable[[], Awaitable[None]]] = attrs.field(factory=list)
    extras: dict[str, Any] = attrs.field(factory=dict)
    #: what the agent may call through the session's endpoint; Admins revoke live
    agent_grants: set[str] = attrs.field(factory=set)
    #: called when ``agent_grants`` changed (the MCP connections tell their clients)
    on_grants_changed: set[Callable[[], None]] = attrs.field(factory=set)

    def has_process(self, pid: int) -> bool:
        """Is ``pid`` a live process of this session (its cgroup, else its tty session)?"""
        if self.cgroups is not None and self.cgroups.dirs:
            return pid in self.cgroups.pids()
        return _tty_session_of(pid) == self.tty_session

    @property
    def cgroup(self) -> Path | None:
        """The session's cgroup2 directory (NET_ISOLATE matches it), if there is one."""
        return self.cgroups.v2 if self.cgroups is not None else None

    async def close(self) -> None:
        for closer in self.closers:
            await closer()
        self.closers.clear()


@attrs.define(eq=False)
class Context:
    """One call: who asks, in which role, in which session (None: outside any)."""

    role: Role
    user: str
    uid: int
    groups: frozenset[int]
    server: Any  # aaau.asys.ServerScope; Any to keep the import graph one-way
    session: SessionScope | None = None
    #: "human", or "agent": the session's agent, through its endpoint, held to ``grants``
    source: str = "human"
    grants: frozenset[str] | None = None

    @property
    def is_agent(self) -> bool:
        return self.source == "agent"

    @property
    def role_name(self) -> str:
        """What SYS_CAPS and the audit call this caller: its role, or ``agent``."""
        return "agent" if self.is_agent else self.role.value

    def bind_audit(self) -> BoundAudit:
        """The audit log with this caller filled in."""
        audit: AuditLog = self.server.audit
        return audit.bind(
            source=self.source,
            user=self.user,
            uid=self.uid,
            role=self.role_name,
            session_id=self.session.session_id if self.session else None,
        )


def _tty_session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat[stat.rfind(b")") + 2 :].split()  # state ppid pgrp session ...
    return int(rest[3]) if len(rest) > 3 and rest[0] != b"Z" else None


Handler = Callable[[Context, Any], Awaitable[dict[str, Any]]]


@attrs.frozen
class Instruction:
    """A table entry: the handler, its argument class, and who may call it where."""

    name: str
    handler: Handler
    args: type
    read_only: bool
    needs_session: bool = False
    summary: str = ""


@attrs.frozen
class NoArgs:
    pass

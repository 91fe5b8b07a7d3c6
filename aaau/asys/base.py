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

from ..messages import Role


class SW:
    """ASys status words, as strings, with the names clients see in ``status``."""

    OK = "9000"
    BLOCKED = "6400"  # transient: back off (quota)
    WRONG_LENGTH = "6700"  # missing, extra or mistyped arguments
    DENIED = "6982"  # identity fine, operation refused: do not retry
    WRONG_DATA = "6A80"  # an argument's value is refused: do not retry it
    NOT_FOUND = "6A81"  # no such instruction (for this caller, here)
    NOT_SUPPORTED = "6D00"  # this machine cannot do it; never simulated
    SYSTEM_ERROR = "6F00"
    OUT_OF_MEMORY = "6F01"

    NAMES = {
        "9000": "ok",
        "6400": "blocked",
        "6700": "wrong_length",
        "6982": "access_denied",
        "6A80": "wrong_data",
        "6A81": "not_found",
        "6D00": "not_supported",
        "6F00": "system_error",
        "6F01": "out_of_memory",
    }


class AsysError(Exception):
    """A handler's refusal: the status word and a message for the caller."""

    def __init__(self, sw: str, message: str) -> None:
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
    cgroup: Path | None
    #: pid -> pidfd of processes this session stopped (resumed on close)
    stopped: dict[int, int] = attrs.field(factory=dict)
    #: closers registered by instruction families (tasks, isolation)
    closers: list[Callable[[], Awaitable[None]]] = attrs.field(factory=list)
    extras: dict[str, Any] = attrs.field(factory=dict)

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

"""ASys instructions served as typed control messages: the table and the dispatcher.

Handlers are plain async functions, one module per family (:mod:`.system`,
:mod:`.process`, :mod:`.tasks`, :mod:`.network`), registered in :data:`TABLE`.
See docs/asys.md for every instruction, field, unit and status word.
"""

from __future__ import annotations

import errno
import grp
import os
from typing import Any

import attrs
import cattrs
import structlog
import trio

from .. import codec
from .. import messages as m
from ..audit import AuditLog, AuditUnavailable
from ..cgroups import SessionCgroups
from ..config import Config
from ..messages import Role
from . import network, process, system, tasks
from .base import IN_FLIGHT, SW, AsysError, Context, Instruction, SessionScope

__all__ = [
    "DEFAULT_AGENT_GRANTS",
    "IN_FLIGHT",
    "SW",
    "TABLE",
    "Context",
    "Instruction",
    "ServerScope",
    "SessionScope",
    "agent_grants",
    "call",
    "dispatch",
    "refused",
    "session_scope",
]

log = structlog.get_logger("aaau.asys")

TABLE: dict[str, Instruction] = {
    i.name: i
    for i in (
        *system.INSTRUCTIONS,
        *tasks.INSTRUCTIONS,
        *process.INSTRUCTIONS,
        *network.INSTRUCTIONS,
    )
}


@attrs.define(eq=False)
class ServerScope:
    """What handlers share across sessions: config, samplers, the task nursery, audit."""

    config: Config
    audit: AuditLog
    nursery: trio.Nursery
    status: system.StatusSampler = attrs.field(factory=system.StatusSampler)
    procs: system.ProcSampler = attrs.field(factory=system.ProcSampler)
    path: str = attrs.field(factory=lambda: os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))


def session_scope(
    session_id: str, agent_uid: int, tty_session: int, cgroups: SessionCgroups | None
) -> SessionScope:
    scope = SessionScope(session_id, agent_uid, tty_session, cgroups)

    async def resume() -> None:
        await process.resume_stopped(scope)

    async def unisolate() -> None:
        await network.close(scope)

    scope.closers += [resume, unisolate]
    return scope


#: what a session's agent may call when its creator chose nothing: the read-only facts
DEFAULT_AGENT_GRANTS: tuple[str, ...] = tuple(n for n, i in TABLE.items() if i.read_only)


def _in_groups(names: tuple[str, ...], groups: frozenset[int]) -> bool:
    for name in names:
        try:
            if grp.getgrnam(name).gr_gid in groups:
                return True
        except KeyError:
            continue
    return False


def agent_grants(
    wanted: tuple[str, ...] | None, config: Config, groups: frozenset[int], admin: bool
) -> frozenset[str]:
    """What a creator may let the agent call: ``wanted`` (None: the read-only facts),
    checked against the table and the ceiling (``agent_grants``; root and admins: any).

    Raises ValueError naming what is unknown or above the ceiling."""
    if wanted is None:
        return frozenset(DEFAULT_AGENT_GRANTS)
    unknown = sorted(set(wanted) - TABLE.keys())
    if unknown:
        raise ValueError(
            f"no such ASys instruction: {', '.join(unknown)} (known: {', '.join(TABLE)})"
        )
    above = sorted(
        name
        for name in set(wanted)
        if not TABLE[name].read_only
        and not admin
        and not _in_groups(config.agent_grants.get(name, ()), groups)
    )
    if above:
        raise ValueError(
            f"you may not grant {', '.join(above)} to an agent: the server's agent_grants "
            "names the groups that may (an admin can add yours)"
        )
    return frozenset(wanted)


def _granted(instr: Instruction, ctx: Context) -> bool:
    if ctx.grants is not None:  # the agent: exactly what its session grants, nothing by role
        return instr.name in ctx.grants
    if instr.read_only or ctx.role is Role.ADMIN:
        return True
    if ctx.role is Role.READONLY:
        return False
    return _in_groups(ctx.server.config.asys_grants.get(instr.name, ()), ctx.groups)


def _available(instr: Instruction, ctx: Context) -> bool:
    return ctx.session is not None or not instr.needs_session


def allowed_instructions(ctx: Context) -> list[str]:
    """What this caller may use here: SYS_CAPS reports it, the dispatcher enforces it."""
    return [
        name for name, instr in TABLE.items() if _available(instr, ctx) and _granted(instr, ctx)
    ]


def refused(msg: m.AsysCall | m.AsysRequest, sw: SW, message: str) -> m.AsysResult:
    """The answer to a call that did not run (busy, rate, no audit): no result."""
    return m.AsysResult(msg.request_id, msg.instruction, sw, sw.label, None, message)


async def call(ctx: Context, msg: m.AsysCall | m.AsysRequest) -> m.AsysResult:
    """One instruction for a caller: recorded before it runs and after, with its answer."""
    audit = ctx.bind_audit()
    try:
        audit.write(
            "asys_request",
            content=msg.instruction,
            metadata={"request_id": msg.request_id, "args": msg.args},
        )
    except AuditUnavailable as exc:  # never run unrecorded; transient: back off
        return refused(msg, SW.BLOCKED, f"the audit log cannot record it now ({exc}): not run")
    sw, result, message = await dispatch(msg.instruction, msg.args, ctx)
    audit.note(
        "asys_result",
        content=f"{msg.instruction} {sw}",
        metadata={"request_id": msg.request_id, "sw": sw, "message": message, "result": result},
    )
    return m.AsysResult(msg.request_id, msg.instruction, sw, sw.label, result, message)


async def dispatch(name: str, args: dict[str, Any], ctx: Context) -> tuple[SW, Any, str]:
    """Run one instruction: (status word, result or None, message)."""
    instr = TABLE.get(name)
    if instr is None:
        return SW.NOT_FOUND, None, f"unknown instruction {name!r}"
    if not _available(instr, ctx):
        return SW.NOT_FOUND, None, f"{name} works inside a session only: use -n SESSION_ID"
    if not _granted(instr, ctx):
        if ctx.is_agent:
            return SW.DENIED, None, f"{name} is not granted to this session's agent"
        return SW.DENIED, None, f"{name} is not allowed for role {ctx.role.value}"
    try:
        typed: Any = codec.converter.structure(args, instr.args)
    except cattrs.BaseValidationError as exc:
        return (SW.WRONG_LENGTH, None, f"invalid arguments for {name}: {codec.describe_error(exc)}")
    try:
        return SW.OK, await instr.handler(ctx, typed), ""
    except AsysError as exc:
        return exc.sw, None, str(exc)
    except MemoryError:
        return SW.OUT_OF_MEMORY, None, f"{name}: out of memory"
    except OSError as exc:
        if exc.errno == errno.ENOMEM:  # e.g. fork() failing on a node near OOM
            return SW.OUT_OF_MEMORY, None, f"{name}: out of memory ({exc.strerror})"
        log.exception("asys-failed", instruction=name)
        return SW.SYSTEM_ERROR, None, f"{name} failed: {exc.strerror or exc}"

"""What an attached client's frames mean: a table, checked once, at dispatch.

Each in-session message type has one :class:`Rule`: who may send it, whether
it is recorded as a ``control`` record, and its handler. A frame that the
client's role may not send is refused in one place (:meth:`Requests._deny`):
a ``denied`` record, a ``forbidden`` error to that client, nothing else
happens. DATA frames (typed input) follow the same table.

Typed input is pushed into the client's :class:`aaau.inflow.Inflow` (never
waited on here), so a control message is acted on at once even while the
agent is not reading. ASys requests run in tasks of their own in the
connection's nursery, so nothing waits behind a slow instruction; at most
:data:`ASYS_IN_FLIGHT` run at once per connection, and one more is answered
``6400`` (busy: back off) at once.

Control messages are limited per client (``control_rate``/``control_burst``):
past that they are dropped, the client hears so once per episode, and one
``rate_limited`` record says how many. A request whose record the audit log
cannot take is refused (``audit-unavailable``), never acted on unrecorded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import structlog
import trio

from . import asys, codec, policy
from . import messages as m
from .audit import AuditUnavailable
from .errors import ErrorCode, ProtocolError
from .inflow import Inflow
from .limits import Overflow, TokenBucket
from .members import Attachment
from .protocol import Frame, Kind
from .session import Session

log = structlog.get_logger("aaau.requests")

#: ASys calls one connection may have running at once
ASYS_IN_FLIGHT: Final = asys.IN_FLIGHT


class Detached(Exception):
    """The client asked to leave."""


@attrs.frozen
class Rule:
    """One message type: the permission, the ``control`` record, the handler."""

    handler: Callable[[Requests, Any], Awaitable[None]]
    permitted: Callable[[Attachment, Session], bool] | None = None
    action: str = ""  # the name in a ``denied`` record
    refusal: str = ""  # what the client is told when refused
    control_record: bool = True


def _may_write(att: Attachment, _session: Session) -> bool:
    return policy.may_write(att.role)


def _may_kill(att: Attachment, session: Session) -> bool:
    return policy.may_kill(att.role, att.identity.uid, creator_uid=session.creator.uid)


_READ_ONLY_INPUT = "read-only clients cannot send input"


class Requests:
    """Dispatches one attached client's frames to its session."""

    def __init__(
        self,
        session: Session,
        att: Attachment,
        asys_scope: asys.ServerScope,
        nursery: trio.Nursery,
        inflow: Inflow,
    ) -> None:
        self.session = session
        self.att = att
        self._asys = asys_scope
        self._nursery = nursery
        self._inflow = inflow
        self._asys_running = 0
        cfg = session.config
        self._rate = TokenBucket(cfg.control_rate, cfg.control_burst)
        self._dropped = Overflow()

    async def dispatch(self, frame: Frame) -> None:
        """Act on one frame. Raises Detached, or ProtocolError for a bad one."""
        if not self.session.alive:
            # the agent has ended: nothing more is acted on; the exit status is on its way
            return
        if frame.kind is Kind.DATA:
            msg: Any = frame.payload
            rule: Rule | None = _INPUT
        else:
            msg = codec.decode_client(frame.payload)
            rule = _RULES.get(type(msg))
            if not self._within_rate():
                return
        if rule is None:
            raise ProtocolError(
                f"{codec.tag_of(type(msg))} is not allowed inside a session",
                code=ErrorCode.BAD_MESSAGE,
            )
        if rule.permitted is not None and not rule.permitted(self.att, self.session):
            self._deny(rule)
            return
        try:
            if rule.control_record:
                self.att.audit.write("control", content=codec.tag_of(type(msg)))
            await rule.handler(self, msg)
        except AuditUnavailable as exc:
            what = "input" if frame.kind is Kind.DATA else codec.tag_of(type(msg))
            text = f"the audit log cannot record it now ({exc}): {what} refused"
            self.att.send(m.Error(ErrorCode.AUDIT, text))

    def _within_rate(self) -> bool:
        if self._rate.take(trio.current_time()):
            if dropped := self._dropped.allow():
                self.att.audit.note(
                    "rate_limited", source="system", metadata={"messages_dropped": dropped}
                )
            return True
        if self._dropped.refuse():
            cfg = self.session.config
            self.att.send(
                m.Error(
                    ErrorCode.RATE,
                    f"more than {cfg.control_rate:g} control messages a second "
                    f"(bursts of {cfg.control_burst}): dropping them until you slow down",
                )
            )
        return False

    def _deny(self, rule: Rule) -> None:
        self.att.audit.note("denied", content=rule.action)
        log.info(
            "request-refused",
            action=rule.action,
            user=self.att.identity.user,
            session_id=self.session.id,
        )
        self.att.send(m.Error(ErrorCode.FORBIDDEN, rule.refusal))

    # --- handlers ------------------------------------------------------------------

    async def _input(self, data: bytes) -> None:
        self._inflow.push(data)

    async def _input_eof(self, _msg: m.InputEof) -> None:
        self._inflow.push_eof()

    async def _resize(self, msg: m.Resize) -> None:
        self.session.resize(self.att, msg.rows, msg.cols)

    async def _viewport(self, msg: m.Viewport) -> None:
        session = self.session
        session.views.viewport(self.att, (msg.rows, msg.cols), (session.rows, session.cols))

    async def _ping(self, msg: m.Ping) -> None:
        self.att.send(m.Pong(msg.nonce))

    async def _status(self, _msg: m.GetStatus) -> None:
        self.att.send(m.Status(self.session.info(), self.session.alive))

    async def _kill(self, _msg: m.ForceKill) -> None:
        self.session.force_kill(self.att.audit)

    async def _detach(self, _msg: m.Detach) -> None:
        raise Detached

    async def _asys_request(self, msg: m.AsysRequest) -> None:
        if self._asys_running >= ASYS_IN_FLIGHT:
            text = f"{ASYS_IN_FLIGHT} ASys calls are already running on this connection"
            self.att.send(asys.refused(msg, asys.SW.BLOCKED, text))
            return
        self._asys_running += 1
        self._nursery.start_soon(self._run_asys, msg)

    async def _run_asys(self, msg: m.AsysRequest) -> None:
        try:
            att = self.att
            ctx = asys.Context(
                att.role,
                att.identity.user,
                att.identity.uid,
                att.identity.groups,
                self._asys,
                self.session.asys,
            )
            self.att.send(await asys.call(ctx, msg))
        finally:
            self._asys_running -= 1


_INPUT = Rule(Requests._input, _may_write, "input", _READ_ONLY_INPUT, control_record=False)
_RULES: dict[type, Rule] = {
    m.Resize: Rule(
        Requests._resize,
        _may_write,
        "resize",
        "read-only clients cannot resize",
        control_record=False,  # the session writes a ``resize`` record with the sizes
    ),
    m.InputEof: Rule(
        Requests._input_eof,
        _may_write,
        "input_eof",
        _READ_ONLY_INPUT,
        control_record=False,  # the input path writes ``input_eof`` when it takes effect
    ),
    m.Viewport: Rule(Requests._viewport),
    m.Ping: Rule(Requests._ping),
    m.GetStatus: Rule(Requests._status),
    m.ForceKill: Rule(
        Requests._kill,
        _may_kill,
        "force_kill",
        "only an admin or the session's creator may kill it",
    ),
    m.Detach: Rule(Requests._detach),
    # recorded as asys_request / asys_result, with the arguments and the answer
    m.AsysRequest: Rule(Requests._asys_request, control_record=False),
}

"""One client connection, from admission to hang-up.

:class:`Connection` owns its stream: it identifies the peer (SO_PEERCRED and
the user database, through the :class:`Hub`), takes the hello
(:func:`aaau.codec.decode_hello`), answers one-shot requests (list, status,
kill, ASys outside a session), or attaches the client to a session and then
runs two loops in its own nursery:

- the read loop: frames -> :class:`aaau.requests.Requests` -> the session;
- the write loop: the client's :class:`aaau.outbox.Outbox` -> the socket.

The session puts frames into the outbox and closes it to hang up (the agent
ended, the client fell too far behind, its rights were revoked); the write
loop flushes what is left within the outbox's grace, says ``too-slow`` if it
overflowed, and ends the connection. Whatever goes wrong ends this connection
only: the peer is told why, and the audit log records it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Final

import attrs
import structlog
import trio

from . import asys, codec, credentials, policy
from . import messages as m
from .audit import AuditLog, AuditUnavailable, BoundAudit
from .config import Config
from .errors import ErrorCode, ProtocolError, RequestError
from .framing import FramedStream
from .inflow import Inflow
from .members import Attachment
from .occupancy import Occupancy
from .outbox import FLUSH_GRACE, Outbox, socket_writer
from .policy import Groups, Identity, Refusal, Standing
from .requests import Detached, Requests
from .session import Session
from .sessions import Sessions

log = structlog.get_logger("aaau.connection")

#: beyond the kill grace (SIGTERM -> SIGKILL, then SIGKILL -> gone), how long a
#: one-shot ``kill`` waits for the session to end before answering anyway
KILL_ANSWER_SLACK: Final = 2.0

PeerOf = Callable[[trio.abc.Stream], tuple[int, int, int]]


def socket_peer(stream: trio.abc.Stream) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``stream``, from the kernel."""
    if not isinstance(stream, trio.SocketStream):
        raise TypeError("SO_PEERCRED needs a socket")
    return credentials.peer_credentials(stream.socket)  # type: ignore[arg-type]


@attrs.define(eq=False)
class Hub:
    """What every connection shares; the server replaces ``config`` and ``groups`` on reload."""

    config: Config
    groups: Groups
    audit: AuditLog
    sessions: Sessions
    asys: asys.ServerScope
    identify: Callable[[int, int, int], Identity] = credentials.identify
    peer_of: PeerOf = socket_peer
    occupancy: Occupancy = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.occupancy = Occupancy(self.config)


class Connection:
    def __init__(self, stream: trio.abc.Stream, hub: Hub) -> None:
        self._hub = hub
        # until the hello: small frames only, so a half-sent hello costs little memory
        limit = min(hub.config.max_hello, hub.config.max_frame)
        self._framed = FramedStream(stream, limit)
        self._audit: BoundAudit = hub.audit.bind()
        self._peer: dict[str, int] = {}

    async def serve(self) -> None:
        """The whole life of the connection; never raises (but Cancelled)."""
        async with self._framed.stream:
            try:
                await self._serve()
            except (ProtocolError, RequestError) as exc:
                kind = "protocol_error" if isinstance(exc, ProtocolError) else "request_failed"
                self._audit.note(kind, content=str(exc), metadata={"code": exc.code})
                await self._last_word(m.Error(exc.code, str(exc)))
            except AuditUnavailable as exc:  # nothing may happen unrecorded: say why
                text = f"the audit log cannot be written now ({exc}); try again later"
                await self._last_word(m.Error(ErrorCode.AUDIT, text))
            except Exception as exc:  # a bug in one connection must not end the server
                log.exception("connection-failed")
                self._audit.note("internal_error", content=repr(exc))
                await self._last_word(m.Error(ErrorCode.INTERNAL, "internal server error (logged)"))

    async def _last_word(self, message: m.ServerMessage) -> None:
        with trio.move_on_after(FLUSH_GRACE):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._framed.send(message)

    async def _serve(self) -> None:
        pid, uid, gid = self._hub.peer_of(self._framed.stream)
        self._audit = self._hub.audit.bind(user=f"#{uid}", uid=uid)
        occupancy = self._hub.occupancy
        if (full := occupancy.arrive(uid)) is not None:
            await self._refuse_limit(uid, full)
            return
        said_hello = False
        try:
            admitted = await self._admit(pid, uid, gid)
            if admitted is None:
                return
            self._audit.write("connection_accepted", content=admitted[1].value, metadata=self._peer)
            hello = await self._receive_hello()
            occupancy.hello(uid)
            said_hello = True
            if hello is None:
                return
            # who they are now: a membership removed while they were connecting counts
            admitted = await self._admit(pid, uid, gid)
            if admitted is None:
                return
            self._audit = self._audit.bind(session_id=getattr(hello, "session_id", None))
            self._audit.write("control", source="human", content=codec.tag_of(type(hello)))
            self._framed.max_payload = self._hub.config.max_frame
            await self._answer(hello, *admitted)
        finally:
            if not said_hello:
                occupancy.hello(uid)
            occupancy.leave(uid)

    async def _refuse_limit(self, uid: int, why: str) -> None:
        earlier = self._hub.occupancy.record_refusal(uid, trio.current_time())
        if earlier is not None:
            self._audit = self._audit.bind(user=credentials.user_name(uid))
            self._audit.note("connection_refused", content=why, metadata={"not_recorded": earlier})
            log.warning("connection-refused", uid=uid, reason=why, not_logged=earlier)
        await self._last_word(m.Error(ErrorCode.LIMIT, why))

    async def _admit(self, pid: int, uid: int, gid: int) -> tuple[Identity, Standing] | None:
        """Who the peer is, from the user database now; None if refused (and told)."""
        self._peer = {"peer_pid": pid, "peer_gid": gid}
        try:
            identity = self._hub.identify(pid, uid, gid)
        except credentials.UnknownPeer as exc:
            standing: Standing | Refusal = Refusal(str(exc))
        else:
            self._audit = self._audit.bind(user=identity.user)
            standing = policy.admit(identity, self._hub.groups)
        if isinstance(standing, Refusal):
            self._audit.note("connection_refused", content=standing.reason, metadata=self._peer)
            log.warning("connection-refused", uid=uid, pid=pid, reason=standing.reason)
            await self._last_word(m.Error(ErrorCode.REFUSED, standing.reason))
            return None
        return identity, standing

    async def _receive_hello(self) -> m.Hello | None:
        """The hello, or None if the peer left or said nothing in time (it is told)."""
        timeout = self._hub.config.handshake_timeout
        with trio.move_on_after(timeout) as scope:
            frame = await self._framed.next_frame()
        if scope.cancelled_caught:
            self._audit.note("handshake_timeout", content=f"no hello within {timeout} s")
            await self._last_word(
                m.Error(ErrorCode.TIMEOUT, f"no handshake within {timeout} seconds")
            )
            return None
        return None if frame is None else codec.decode_hello(frame)

    async def _answer(self, hello: m.Hello, identity: Identity, standing: Standing) -> None:
        hub = self._hub
        if isinstance(hello, m.ListSessions):
            await self._framed.send(m.Sessions(hub.sessions.listing()))
        elif isinstance(hello, m.QueryStatus):
            session = hub.sessions.find(hello.session_id)
            await self._framed.send(m.Status(session.info(), session.alive))
        elif isinstance(hello, m.Kill):
            await self._kill(hub.sessions.find(hello.session_id), identity, standing)
        elif isinstance(hello, m.Revoke):
            await self._revoke(hub.sessions.find(hello.session_id), identity, standing, hello)
        elif isinstance(hello, m.AsysCall):
            role = policy.max_role(standing, identity.uid)
            ctx = asys.Context(role, identity.user, identity.uid, identity.groups, hub.asys)
            await self._framed.send(await asys.call(ctx, hello))
        elif isinstance(hello, m.Create):
            outbox = self._outbox()
            session, att = await hub.sessions.create(identity, standing, hello, outbox)
            await self._attached(session, att)
        else:
            session = hub.sessions.find(hello.session_id)
            size = (hello.rows, hello.cols) if hello.rows and hello.cols else None
            att = session.attach(
                identity, standing, self._outbox(), hello.role, created=False, size=size
            )
            await self._attached(session, att)

    def _outbox(self) -> Outbox:
        stream = self._framed.stream
        direct = socket_writer(stream.socket) if isinstance(stream, trio.SocketStream) else None
        return Outbox(self._hub.config.client_queue_bytes, direct)

    async def _kill(self, session: Session, identity: Identity, standing: Standing) -> None:
        """FORCE_KILL from outside the session, by the same rule as inside it."""
        role = policy.max_role(
            standing, identity.uid, creator_uid=session.creator.uid, shared=session.shared
        )
        audit = self._audit.bind(source="human", role=role)
        if not policy.may_kill(role, identity.uid, creator_uid=session.creator.uid):
            audit.note("denied", content="force_kill")
            raise RequestError(
                "only an admin or the session's creator may kill it", code=ErrorCode.FORBIDDEN
            )
        session.force_kill(audit.bind(peer_pid=identity.pid))
        with trio.move_on_after(3 * session.config.kill_grace + KILL_ANSWER_SLACK):
            await session.wait_ended()
        await self._framed.send(m.Done(f"session {session.id} killed"))

    async def _revoke(
        self, session: Session, identity: Identity, standing: Standing, req: m.Revoke
    ) -> None:
        """Withdraw grants from the session's agent: its Admins and its creator may."""
        role = policy.max_role(
            standing, identity.uid, creator_uid=session.creator.uid, shared=session.shared
        )
        audit = self._audit.bind(source="human", role=role)
        if not policy.may_kill(role, identity.uid, creator_uid=session.creator.uid):
            audit.note("denied", content="revoke", metadata={"instructions": req.instructions})
            raise RequestError(
                "only an admin or the session's creator may revoke its agent's grants",
                code=ErrorCode.FORBIDDEN,
            )
        left = session.revoke_grants(req.instructions, audit)
        await self._framed.send(
            m.Done(
                f"revoked {', '.join(req.instructions)}; the agent may call: "
                f"{', '.join(left) or 'nothing'}"
            )
        )

    # --- an attached client -------------------------------------------------------------

    async def _attached(self, session: Session, att: Attachment) -> None:
        """Serve an attached client until it leaves, the session ends or it is cut off."""
        reason = "connection closed"
        inflow = _inflow(session, att)
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(self._write_loop, att.outbox, scope)
            nursery.start_soon(inflow.run)
            # once the outbox is closed, the write loop has its grace to flush, no more
            att.outbox.on_close = functools.partial(_flush_deadline, scope)
            if att.outbox.closed:  # closed before we got here (the agent ended at once)
                _flush_deadline(scope, att.outbox.flush_grace)
            try:
                requests = Requests(session, att, self._hub.asys, nursery, inflow)
                reason = await self._read_loop(requests)
            except ProtocolError as exc:
                reason = f"protocol error: {exc}"
                att.audit.note(
                    "protocol_error", source="system", content=str(exc), metadata={"code": exc.code}
                )
                att.send(m.Error(exc.code, str(exc)))
            finally:
                # leave at once; the write loop gets the outbox's grace to flush
                inflow.close()
                session.detach(att, reason)
                att.outbox.close()

    async def _read_loop(self, requests: Requests) -> str:
        while (frame := await self._framed.next_frame()) is not None:
            try:
                await requests.dispatch(frame)
            except Detached:
                return "detached"
        return "connection closed"

    async def _write_loop(self, outbox: Outbox, scope: trio.CancelScope) -> None:
        try:
            while (data := await outbox.get()) is not None:
                await self._framed.send_frame(data)
            if outbox.overflowed:
                await self._framed.send(
                    m.Error(
                        ErrorCode.TOO_SLOW,
                        f"disconnected: more than {outbox.limit} bytes of output unread",
                    )
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()


def _inflow(session: Session, att: Attachment) -> Inflow:
    """The client's input: to the session, credit back to the client, refusals told."""

    async def deliver(data: bytes | None) -> None:
        if data is None:
            await session.input_eof(att)
        else:
            await session.input(att, data)

    return Inflow(
        att.input_window,
        deliver,
        grant=lambda n: att.send(m.InputCredit(n)),
        refuse=lambda text: att.send(m.Error(ErrorCode.AUDIT, text)),
    )


def _flush_deadline(scope: trio.CancelScope, grace: float) -> None:
    scope.deadline = min(scope.deadline, trio.current_time() + grace)

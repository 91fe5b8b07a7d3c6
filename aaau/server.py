"""The Trio server: the Unix socket, connections, sessions, signals, shutdown.

Bytes come in, :class:`aaau.protocol.FrameDecoder` and :mod:`aaau.codec`
turn them into messages, :mod:`aaau.policy` decides, :class:`Session` acts.
Every connection runs in its own nursery with a reader and a writer task;
whatever goes wrong in one connection ends that connection only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import secrets
import signal
import socket as _socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from . import asys, codec, credentials, policy, reaper, spawn
from . import messages as m
from .audit import AuditLog
from .config import Config, load
from .policy import Identity, Refusal, Standing
from .protocol import FrameDecoder, Kind, ProtocolError
from .session import Attachment, Session, SessionError

log = structlog.get_logger("aaau.server")

_RECEIVE_SIZE = 65536


class StartupError(Exception):
    pass


class _Connection:
    """Frames in from one stream (the writer side is the attachment's queue)."""

    def __init__(self, stream: trio.SocketStream, max_frame: int) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(max_frame)
        self._pending: list[Any] = []
        self.eof = False

    async def next_frame(self) -> Any:
        """The next frame, or None at a clean EOF."""
        while not self._pending:
            if self.eof:
                return None
            try:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.decoder.receive_data(data)
            self.eof = not data
            self._pending = self.decoder.frames()
        return self._pending.pop(0)

    async def send(self, message: m.ServerMessage) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(codec.encode(message))


class Server:
    def __init__(
        self,
        config: Config,
        *,
        config_file: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.config_file = config_file
        self.overrides = overrides or {}
        self.sessions: dict[str, Session] = {}
        self.groups = credentials.resolve_groups(
            config.agent_user, config.group, config.admin_group
        )
        self._shutdown = trio.Event()
        self._lock_fd = -1
        self.audit: AuditLog | None = None

    # --- start and stop ------------------------------------------------------------

    def _check_agent(self) -> pwd.struct_passwd:
        try:
            agent = pwd.getpwnam(self.config.agent_user)
        except KeyError:
            raise StartupError(
                f"agent user {self.config.agent_user!r} does not exist (run aaau-server init)"
            ) from None
        if agent.pw_uid == 0 or agent.pw_gid == 0:
            raise StartupError(f"agent user {agent.pw_name} has uid or gid 0: refusing to start")
        gids = set(os.getgrouplist(agent.pw_name, agent.pw_gid))
        for gid in (self.groups.human_gid, self.groups.admin_gid):
            if gid is not None and gid in gids:
                raise StartupError(
                    f"agent user {agent.pw_name} is a member of group {gid}: it could "
                    "connect to its own server; remove it from the aaau groups"
                )
        if self.groups.human_gid is None:
            raise StartupError(f"group {self.config.group!r} does not exist (run aaau-server init)")
        return agent

    def _take_lock(self) -> None:
        path = self.config.socket + ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another aaau server holds {path}") from None
        self._lock_fd = fd

    def _prepare_socket_path(self) -> str:
        """Make the directory, take the lock, clear a stale socket; the temporary name."""
        path = self.config.socket
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o750)
            os.chown(directory, 0, self.groups.human_gid or 0)
        self._take_lock()
        if os.path.exists(path):
            probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody listens
            else:
                raise StartupError(f"a server is already listening on {path}")
            finally:
                probe.close()
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        return tmp

    async def _listen(self) -> trio.SocketListener:
        """Bind to a temporary name, set owner and mode, then rename into place."""
        tmp = self._prepare_socket_path()
        sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                await sock.bind(tmp)
            finally:
                os.umask(old)
            os.chown(tmp, 0, self.groups.human_gid or 0)
            os.chmod(tmp, 0o660)
            sock.listen(128)
            os.rename(tmp, self.config.socket)
        except BaseException:
            sock.close()
            raise
        return trio.SocketListener(sock)

    def _open_audit(self) -> AuditLog:
        log_dir = Path(self.config.log_dir)
        if not log_dir.is_dir():
            log_dir.mkdir(mode=0o750, parents=True)
            os.chown(log_dir, 0, self.groups.admin_gid or 0)
        return AuditLog(str(log_dir / "audit.jsonl"), gid=self.groups.admin_gid)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if os.geteuid() != 0:
            raise StartupError("aaau-server run must be started as root")
        self._check_agent()
        self.audit = audit = self._open_audit()
        listener = await self._listen()
        audit.write(
            "server_start",
            content=f"pid {os.getpid()}",
            metadata={
                "socket": self.config.socket,
                "pid": os.getpid(),
                "agent_user": self.config.agent_user,
            },
        )
        log.info("listening", socket=self.config.socket, pid=os.getpid())
        try:
            async with trio.open_nursery() as sessions_nursery:
                self._sessions_nursery = sessions_nursery
                self.asys = asys.ServerScope(self.config, audit, sessions_nursery)
                await sessions_nursery.start(self.asys.status.run)
                async with trio.open_nursery() as conns:
                    # signals are ours before anyone is told we are ready
                    await conns.start(self._watch_signals)
                    accept_scope = trio.CancelScope()
                    conns.start_soon(self._accept, listener, accept_scope, conns)
                    task_status.started()
                    await self._shutdown.wait()
                    accept_scope.cancel()
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.config.socket)
                    for session in list(self.sessions.values()):
                        session.notify_all(
                            m.Error(m.ErrorCode.SHUTDOWN, "the server is shutting down")
                        )
                        session.kill_all()
                    with trio.move_on_after(
                        self.config.shutdown_grace + 2 * self.config.kill_grace
                    ):
                        while self.sessions:
                            await next(iter(self.sessions.values())).ended.wait()
                    conns.cancel_scope.deadline = trio.current_time() + 1
                sessions_nursery.cancel_scope.cancel()
        finally:
            if self._shutdown.is_set():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.config.socket)
            audit.write(
                "server_stop",
                content=f"pid {os.getpid()}",
                metadata={"sessions_left": len(self.sessions)},
            )
            audit.close()
            log.info("stopped")

    async def _accept(
        self, listener: trio.SocketListener, scope: trio.CancelScope, conns: trio.Nursery
    ) -> None:
        with scope:
            async with listener:
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                            log.warning("accept-capacity", error=str(exc))
                            await trio.sleep(0.1)
                            continue
                        raise
                    conns.start_soon(self._connection, stream)

    def stop(self) -> None:
        self._shutdown.set()

    async def _watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    log.info("shutdown", signal=signal.Signals(signum).name)
                    self.stop()
                    return

    def reload(self) -> None:
        """SIGHUP: re-read the config file and group membership, apply them to everyone."""
        assert self.audit is not None
        try:
            fresh = load(self.config_file).with_overrides(**self.overrides)
        except Exception as exc:
            log.error("reload-failed", error=str(exc))
            self.audit.write("reload_failed", content=str(exc))
            return
        # the socket, agent user and log directory only change on restart
        self.config = fresh.with_overrides(
            agent_user=self.config.agent_user,
            socket=self.config.socket,
            log_dir=self.config.log_dir,
        )
        self.groups = credentials.resolve_groups(
            self.config.agent_user, self.config.group, self.config.admin_group
        )
        self.audit.reopen(gid=self.groups.admin_gid)
        self.asys.config = self.config
        self.audit.write("reload", content="configuration and group membership reloaded")
        for session in list(self.sessions.values()):
            session.config = self.config
            for att in list(session.clients.values()):
                self._recheck(session, att)

    def _recheck(self, session: Session, att: Attachment) -> None:
        ident = att.identity
        try:
            fresh = credentials.identify(ident.pid, ident.uid, ident.gid)
        except credentials.UnknownPeer as exc:
            session.revoke(att, str(exc))
            return
        standing = policy.admit(fresh, self.groups)
        if isinstance(standing, Refusal):
            session.revoke(att, f"access revoked: {standing.reason}")
            return
        allowed = policy.max_role(
            standing, fresh.uid, creator_uid=session.creator.uid, shared=session.shared
        )
        att.identity, att.standing = fresh, standing
        if att.role.rank > allowed.rank:
            assert self.audit is not None
            self.audit.write(
                "role_changed",
                user=fresh.user,
                uid=fresh.uid,
                role=allowed,
                session_id=session.id,
                content=f"{att.role.value} -> {allowed.value}",
                metadata={"client_id": att.client_id},
            )
            att.role = allowed
            att.send(m.RoleChanged(allowed, "group membership changed"))

    # --- one connection -------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        audit = self.audit
        assert audit is not None
        who: dict[str, Any] = {}
        async with stream:
            try:
                pid, uid, gid = credentials.peer_credentials(stream.socket)  # type: ignore[arg-type]
                who = {"user": f"#{uid}", "uid": uid}
                try:
                    identity = credentials.identify(pid, uid, gid)
                except credentials.UnknownPeer as exc:
                    standing: Standing | Refusal = Refusal(str(exc))
                else:
                    who["user"] = identity.user
                    standing = policy.admit(identity, self.groups)
                peer = {"peer_pid": pid, "peer_gid": gid}
                if isinstance(standing, Refusal):
                    audit.write("connection_refused", content=standing.reason, metadata=peer, **who)
                    await _Connection(stream, 0).send(m.Error(m.ErrorCode.REFUSED, standing.reason))
                    return
                audit.write("connection_accepted", content=standing.value, metadata=peer, **who)
                await self._serve(_Connection(stream, self.config.max_frame), identity, standing)
            except ProtocolError as exc:
                audit.write("protocol_error", content=str(exc), metadata={"code": exc.code}, **who)
                with trio.move_on_after(1):
                    await _Connection(stream, 0).send(m.Error(exc.code, str(exc)))
            except Exception as exc:  # a bug in one connection must not end the server
                log.exception("connection-failed")
                audit.write("internal_error", content=repr(exc), **who)
                with trio.move_on_after(1):
                    await _Connection(stream, 0).send(
                        m.Error(m.ErrorCode.INTERNAL, "internal server error (logged)")
                    )

    async def _serve(self, conn: _Connection, identity: Identity, standing: Standing) -> None:
        assert self.audit is not None
        with trio.move_on_after(self.config.handshake_timeout) as scope:
            frame = await conn.next_frame()
        if scope.cancelled_caught:
            self.audit.write(
                "handshake_timeout",
                user=identity.user,
                uid=identity.uid,
                content=f"no hello within {self.config.handshake_timeout} s",
            )
            await conn.send(
                m.Error(
                    m.ErrorCode.TIMEOUT,
                    f"no handshake within {self.config.handshake_timeout} seconds",
                )
            )
            return
        if frame is None:
            return
        if frame.kind is not Kind.CONTROL:
            raise ProtocolError("the first frame must be a control message (hello)")
        hello = codec.decode_client(frame.payload)
        if not isinstance(hello, m.Hello):
            raise ProtocolError(
                f"expected create, join, list_sessions, query_status or kill, "
                f"got {codec.tag_of(type(hello))}",
                code=m.ErrorCode.BAD_MESSAGE,
            )
        if hello.version != m.PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {hello.version} is not supported "
                f"(this server speaks {m.PROTOCOL_VERSION})",
                code=m.ErrorCode.VERSION,
            )
        who: dict[str, Any] = {"user": identity.user, "uid": identity.uid}
        self.audit.write(
            "control",
            source="human",
            content=codec.tag_of(type(hello)),
            session_id=getattr(hello, "session_id", None),
            **who,
        )
        try:
            if isinstance(hello, m.ListSessions):
                await conn.send(
                    m.Sessions(tuple(s.info() for s in self.sessions.values() if s.alive))
                )
            elif isinstance(hello, m.QueryStatus):
                session = self._find(hello.session_id)
                await conn.send(m.Status(session.info(), session.alive))
            elif isinstance(hello, m.Kill):
                session = self._find(hello.session_id)
                allowed = standing is Standing.ADMIN or identity.uid == session.creator.uid
                if not allowed:
                    self._deny(identity, None, session.id, "force_kill")
                    raise SessionError(
                        m.ErrorCode.FORBIDDEN, "only an admin or the session's creator may kill it"
                    )
                session.force_kill(identity, _standing_role(standing))
                with trio.move_on_after(3 * self.config.kill_grace + 2):
                    await session.ended.wait()
                await conn.send(m.Done(f"session {session.id} killed"))
            elif isinstance(hello, m.AsysCall):
                role = m.Role.ADMIN if standing is Standing.ADMIN else m.Role.READONLY
                ctx = asys.Context(role, identity.user, identity.uid, identity.groups, self.asys)
                await conn.send(await self._asys_call(ctx, hello))
            elif isinstance(hello, m.Create):
                session, att = await self._create(identity, standing, hello, _direct_send(conn))
                await self._attached(conn, session, att)
            else:
                session = self._find(hello.session_id)
                att = session.attach(
                    identity, standing, hello.role, created=False, send_nowait=_direct_send(conn)
                )
                await self._attached(conn, session, att)
        except SessionError as exc:
            self.audit.write(
                "request_failed",
                content=str(exc),
                metadata={"code": exc.code},
                session_id=getattr(hello, "session_id", None),
                **who,
            )
            await conn.send(m.Error(exc.code, str(exc)))

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    def _find(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or not session.alive:
            raise SessionError(m.ErrorCode.UNKNOWN_SESSION, f"no session {session_id}")
        return session

    def _deny(
        self, identity: Identity, role: m.Role | None, session_id: str | None, action: str
    ) -> None:
        assert self.audit is not None
        self.audit.write(
            "denied",
            source="human",
            user=identity.user,
            uid=identity.uid,
            role=role,
            session_id=session_id,
            content=action,
        )

    async def _create(
        self,
        identity: Identity,
        standing: Standing,
        req: m.Create,
        send_nowait: Callable[[bytes], int],
    ) -> tuple[Session, Attachment]:
        cfg = self.config
        if len(self.sessions) >= cfg.max_sessions:
            raise SessionError(
                m.ErrorCode.LIMIT,
                f"the server already runs {len(self.sessions)} sessions (limit {cfg.max_sessions})",
            )
        mine = sum(1 for s in self.sessions.values() if s.creator.uid == identity.uid)
        if mine >= cfg.sessions_per_user:
            raise SessionError(
                m.ErrorCode.LIMIT,
                f"{identity.user} already runs {mine} sessions (limit {cfg.sessions_per_user})",
            )
        try:
            agent = pwd.getpwnam(cfg.agent_user)
        except KeyError:
            raise SessionError(
                m.ErrorCode.SPAWN_FAILED, f"agent user {cfg.agent_user} does not exist"
            ) from None
        session_id = secrets.token_urlsafe(16)
        try:
            plan = spawn.plan(
                cfg,
                agent,
                session_id=session_id,
                argv=req.argv,
                term=req.term,
                cwd=req.cwd,
                extra_env=req.env,
                cgroup=reaper.make_session_cgroup(session_id),
            )
        except spawn.SpawnError as exc:
            raise SessionError(m.ErrorCode.SPAWN_FAILED, str(exc)) from None
        assert self.audit is not None
        session = Session(
            session_id,
            identity,
            argv=plan.argv,
            shared=req.share,
            rows=req.rows,
            cols=req.cols,
            config=cfg,
            audit=self.audit,
            on_end=self._forget,
        )
        # registered before it starts: limits count it, and an agent that ends at once
        # takes it out again (ls and join skip sessions that are not alive)
        self.sessions[session_id] = session
        try:
            try:
                att: Attachment = await self._sessions_nursery.start(
                    partial(session.run, plan, creator_standing=standing, send_nowait=send_nowait)
                )
            except OSError as exc:  # openpty, pipes, fds: the machine refused, say so
                raise spawn.SpawnError(f"cannot start the agent: {exc.strerror or exc}") from exc
        except spawn.SpawnError as exc:
            self.sessions.pop(session_id, None)
            self.audit.write(
                "spawn_failed",
                user=identity.user,
                uid=identity.uid,
                session_id=session_id,
                content=str(exc),
                metadata={"argv": list(plan.argv)},
            )
            raise SessionError(m.ErrorCode.SPAWN_FAILED, str(exc)) from None
        log.info("session-started", session_id=session_id, user=identity.user)
        return session, att

    async def _attached(self, conn: _Connection, session: Session, att: Attachment) -> None:
        """Serve an attached client until it leaves, the session ends or it is cut off."""
        identity = att.identity
        reason = "connection closed"
        async with trio.open_nursery() as nursery:
            att.scope = nursery.cancel_scope
            nursery.start_soon(self._pump_out, conn, att, nursery.cancel_scope)
            try:
                reason = await self._pump_in(conn, session, att)
            except ProtocolError as exc:
                reason = f"protocol error: {exc}"
                assert self.audit is not None
                self.audit.write(
                    "protocol_error",
                    user=identity.user,
                    uid=identity.uid,
                    role=att.role,
                    session_id=session.id,
                    content=str(exc),
                    metadata={"code": exc.code, "client_id": att.client_id},
                )
                att.send(m.Error(exc.code, str(exc)))
            finally:
                # leave at once; the writer gets a moment to flush what is queued
                session.detach(att, reason)
                att.cut_off(1.0)

    async def _pump_out(self, conn: _Connection, att: Attachment, scope: trio.CancelScope) -> None:
        try:
            while (data := await att.queue.get()) is not None:
                await conn.stream.send_all(data)
            if att.queue.overflowed:
                with trio.move_on_after(1):
                    await conn.stream.send_all(
                        codec.encode(
                            m.Error(
                                m.ErrorCode.TOO_SLOW,
                                f"disconnected: more than {att.queue.limit} bytes of output unread",
                            )
                        )
                    )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            scope.cancel()

    async def _pump_in(self, conn: _Connection, session: Session, att: Attachment) -> str:
        while (frame := await conn.next_frame()) is not None:
            if not session.alive:
                # the agent has ended: nothing more is acted on; the exit status is on
                # its way through the queue, and the writer closes the connection after it
                continue
            if frame.kind is Kind.DATA:
                if policy.may_write(att.role):
                    if frame.payload:
                        await session.send_input(att, frame.payload)
                else:
                    self._refuse(session, att, "input", "read-only clients cannot send input")
                continue
            msg = codec.decode_client(frame.payload)
            if isinstance(msg, m.Detach):
                return "detached"
            if isinstance(msg, m.AsysRequest):
                ctx = asys.Context(
                    att.role,
                    att.identity.user,
                    att.identity.uid,
                    att.identity.groups,
                    self.asys,
                    session.asys,
                )
                att.send(await self._asys_call(ctx, msg))
                continue
            self._handle(session, att, msg)
            if isinstance(msg, m.InputEof) and policy.may_write(att.role):
                await session.send_input(att, b"")
        return "connection closed"

    def _handle(self, session: Session, att: Attachment, msg: m.ClientMessage) -> None:
        assert self.audit is not None
        if not isinstance(msg, m.Resize):
            self.audit.write(
                "control",
                source="human",
                user=att.identity.user,
                uid=att.identity.uid,
                role=att.role,
                session_id=session.id,
                content=codec.tag_of(type(msg)),
                metadata={"client_id": att.client_id},
            )
        if isinstance(msg, m.Resize):
            if policy.may_write(att.role):
                session.resize(att, msg.rows, msg.cols)
            else:
                self._refuse(session, att, "resize", "read-only clients cannot resize")
        elif isinstance(msg, m.Ping):
            att.send(m.Pong(msg.nonce))
        elif isinstance(msg, m.GetStatus):
            att.send(m.Status(session.info(), session.alive))
        elif isinstance(msg, m.ForceKill):
            if policy.may_kill(att.role, att.identity.uid, creator_uid=session.creator.uid):
                session.force_kill(att.identity, att.role)
            else:
                self._refuse(
                    session, att, "force_kill", "only an admin or the session's creator may kill it"
                )
        elif isinstance(msg, m.InputEof):
            if not policy.may_write(att.role):
                self._refuse(session, att, "input_eof", "read-only clients cannot send input")
        else:
            raise ProtocolError(
                f"{codec.tag_of(type(msg))} is not allowed inside a session",
                code=m.ErrorCode.BAD_MESSAGE,
            )

    async def _asys_call(self, ctx: asys.Context, msg: m.AsysCall | m.AsysRequest) -> m.AsysResult:
        """Audit, run, audit: one ASys instruction."""
        assert self.audit is not None
        who: dict[str, Any] = {
            "source": "human",
            "user": ctx.user,
            "uid": ctx.uid,
            "role": ctx.role,
            "session_id": ctx.session.session_id if ctx.session else None,
        }
        self.audit.write(
            "asys_request",
            content=msg.instruction,
            **who,
            metadata={"request_id": msg.request_id, "args": msg.args},
        )
        sw, result, message = await asys.dispatch(msg.instruction, msg.args, ctx)
        reply = m.AsysResult(
            msg.request_id, msg.instruction, sw, asys.SW.NAMES[sw], result, message
        )
        self.audit.write(
            "asys_result",
            content=f"{msg.instruction} {sw}",
            **who,
            metadata={"request_id": msg.request_id, "sw": sw, "message": message, "result": result},
        )
        return reply

    def _refuse(self, session: Session, att: Attachment, action: str, message: str) -> None:
        self._deny(att.identity, att.role, session.id, action)
        att.send(m.Error(m.ErrorCode.FORBIDDEN, message))


def _direct_send(conn: _Connection) -> Callable[[bytes], int]:
    """A non-blocking write on the client's socket, for the fan-out fast path.

    The attachment's queue is closed before the stream is, so this never
    writes to an fd number that was closed and reused.
    """
    fd = conn.stream.socket.fileno()
    return lambda data: os.write(fd, data)


def _standing_role(standing: Standing) -> m.Role:
    return m.Role.ADMIN if standing is Standing.ADMIN else m.Role.INTERACTIVE

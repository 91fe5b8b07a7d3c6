"""A session's ASys endpoint: the one way its agent calls ASys.

Each session gets a Unix socket ``{endpoint_dir}/{session_id}`` (the agent
finds it in ``$AAAU_ASYS``), made before the agent starts and removed when the
session ends. Three gates, each enough on its own against a different caller:

1. the directory is root's, mode 0711 (no listing, no planting); the socket is
   root's, group the agent user's, mode 0660: people and other members' agents
   cannot connect at all;
2. the peer's uid (SO_PEERCRED) must be the session's agent user;
3. the peer's process must be inside the session: its cgroup (else its tty
   session), checked by pid while a pidfd taken at connect time (SO_PEERPIDFD)
   pins that process, so a pid reused in between is not mistaken for it.
   Another session of the same member runs as the same uid: this is what
   refuses it.

The endpoint carries no terminal: a connection is either ASys (``asys_request``
frames answered by ``asys_result``) or, after ``mcp_open``, MCP relayed by
``aaau mcp`` (:mod:`aaau.mcpserver`). Joining, creating and killing sessions
are refused. Calls run with the session's grants, at most
``agent_asys_rate``/s (bursts of ``agent_asys_burst``) per session, 4 at once
per connection; each is audited with ``source: agent``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from typing import Any, Final

import structlog
import trio

from . import asys, codec, credentials, paths
from . import messages as m
from .audit import AuditUnavailable, BoundAudit
from .config import Config
from .errors import ErrorCode, ProtocolError, innermost
from .framing import FramedStream
from .limits import Overflow, TokenBucket
from .outbox import FLUSH_GRACE
from .protocol import Frame, Kind
from .spawn import SpawnError

log = structlog.get_logger("aaau.endpoint")

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: refusals and bad frames recorded per endpoint: per second, in a burst
_NOTE_RATE: Final = 5.0
_NOTE_BURST: Final = 20
#: after accept() failed (no fds left), how long before trying again
_ACCEPT_BACKOFF: Final = 0.1
#: Linux 6.5: a pidfd of the process that connected (not yet in Python's socket module)
_SO_PEERPIDFD: Final = 77
_NOT_HERE: Final = (
    "the ASys endpoint carries no terminal: it serves asys_request and mcp_open only "
    "(it cannot join, create or kill sessions)"
)


def prepare_dir(directory: str) -> None:
    """The endpoints' directory: root's, 0711, emptied of a previous run's sockets.

    Its ancestors are checked as every directory root writes in
    (:func:`aaau.paths.open_dir`); the directory itself is opened without
    following a link and refused (OSError) if it is a symlink, a file, or
    someone else's: an attacker could have prepared it.
    """
    where = os.path.abspath(directory)
    parent = paths.open_dir(os.path.dirname(where))
    name = os.path.basename(where)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o711, dir_fd=parent)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError:  # ELOOP, ENOTDIR: a link or a file stands there
            fd = -1
    finally:
        os.close(parent)
    try:
        if fd < 0 or os.fstat(fd).st_uid != 0:
            raise OSError(f"{where} is not a directory of root's: refusing to use it")
        os.fchmod(fd, 0o711)
        for entry in os.listdir(fd):
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def path_for(config: Config, session_id: str) -> str:
    return os.path.join(config.endpoint_dir, session_id)


def bind(path: str, gid: int) -> socket.socket:
    """A listening socket at ``path`` that only root and group ``gid`` may connect to."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)  # the server's umask (022) leaves it connectable by root only
        os.chown(path, 0, gid, follow_symlinks=False)
        os.chmod(path, 0o660)
        sock.listen(16)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock


def _peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd of the connecting process: the kernel's own, else one opened by pid now."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4)
        return int.from_bytes(raw, "little", signed=True)
    except OSError:
        try:
            return os.pidfd_open(pid)
        except OSError:
            return None


def refusal(sock: socket.socket, scope: asys.SessionScope) -> tuple[str | None, int, int]:
    """Why this peer may not use the session's endpoint (None: it may); its pid and uid."""
    pid, uid, _gid = credentials.peer_credentials(sock)
    if uid != scope.agent_uid:
        return f"uid {uid} is not this session's agent user", pid, uid
    pidfd = _peer_pidfd(sock, pid)
    if pidfd is None:
        return f"process {pid} is gone", pid, uid
    try:
        if not scope.has_process(pid):
            return f"process {pid} is not part of session {scope.session_id}", pid, uid
        signal.pidfd_send_signal(pidfd, 0)  # still the process that connected?
    except ProcessLookupError:
        return f"process {pid} exited before it could be checked", pid, uid
    finally:
        os.close(pidfd)
    return None, pid, uid


def open_for(
    server: asys.ServerScope | None, session_id: str, gid: int, audit: BoundAudit
) -> Endpoint | None:
    """A session's endpoint, listening before its agent can look for it (None: no ASys)."""
    if server is None:
        return None
    try:
        return Endpoint.open(session_id, gid, audit, server)
    except OSError as exc:
        raise SpawnError(f"cannot make the session's ASys endpoint: {exc}") from None


def close(endpoint: Endpoint | None) -> None:
    if endpoint is not None:
        endpoint.close()


def revoke(scope: asys.SessionScope, names: tuple[str, ...], audit: BoundAudit) -> frozenset[str]:
    """Withdraw grants from a session's agent, from its next call on; what it keeps."""
    audit.note(
        "asys_grant_revoked",
        content=",".join(names),
        metadata={"instructions": list(names), "before": sorted(scope.agent_grants)},
    )
    scope.agent_grants.difference_update(names)
    for changed in list(scope.on_grants_changed):
        changed()
    return frozenset(scope.agent_grants)


class Endpoint:
    """One session's endpoint: its socket, its budget, the calls it runs."""

    def __init__(
        self,
        path: str,
        sock: socket.socket,
        audit: BoundAudit,
        server: asys.ServerScope,
    ) -> None:
        self.path = path
        self._sock = sock
        self._server = server
        self._audit = audit
        self._rate = TokenBucket(server.config.agent_asys_rate, server.config.agent_asys_burst)
        self._over = Overflow()
        self._notes = TokenBucket(_NOTE_RATE, _NOTE_BURST)
        self._unnoted = 0
        self._open = 0

    @classmethod
    def open(
        cls, session_id: str, gid: int, audit: BoundAudit, server: asys.ServerScope
    ) -> Endpoint:
        path = path_for(server.config, session_id)
        return cls(path, bind(path, gid), audit, server)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def serve(self, scope: asys.SessionScope, agent_user: str) -> None:
        """Accept and serve the agent's connections until cancelled (the session ends)."""
        self._scope, self._user = scope, agent_user
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and the like: wait, never end the session
                    log.warning("endpoint-accept-failed", error=str(exc))
                    await trio.sleep(_ACCEPT_BACKOFF)
                    continue
                nursery.start_soon(self._connection, stream)

    @property
    def _config(self) -> Config:
        """The server's configuration now: a reload (SIGHUP) applies from the next call."""
        config: Config = self._server.config
        return config

    # --- one connection ---------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            framed = FramedStream(stream, self._config.max_frame)
            try:
                why, pid, uid = refusal(stream.socket, self._scope)  # type: ignore[arg-type]
            except OSError as exc:  # gone before it could be asked who it is
                why, pid, uid = f"cannot identify the peer: {exc.strerror}", 0, -1
            if why is None and self._open >= self._config.agent_endpoint_connections:
                why = (
                    f"the endpoint already serves {self._open} connections "
                    f"(agent_endpoint_connections {self._config.agent_endpoint_connections})"
                )
            if why is not None:
                self._note_limited(
                    "asys_endpoint_refused", content=why, metadata={"pid": pid, "uid": uid}
                )
                await _say(framed, m.Error(ErrorCode.REFUSED, f"refused: {why}"))
                return
            self._open += 1
            try:
                await self._serve(framed)
            except Exception as exc:  # nurseries group what they raise: look inside
                await self._failed(framed, innermost(exc))
            finally:
                self._open -= 1

    async def _failed(self, framed: FramedStream, exc: BaseException) -> None:
        """Tell the peer why its connection ends; one connection never ends the session."""
        if isinstance(exc, ProtocolError):
            self._note_limited("protocol_error", content=str(exc))
            await _say(framed, m.Error(exc.code, str(exc)))
        elif isinstance(exc, AuditUnavailable):
            text = f"the audit log cannot be written now ({exc}); try again later"
            await _say(framed, m.Error(ErrorCode.AUDIT, text))
        elif not isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
            log.error(
                "endpoint-connection-failed",
                session_id=self._scope.session_id,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            self._audit.note("internal_error", content=repr(exc))
            await _say(framed, m.Error(ErrorCode.INTERNAL, "internal server error (logged)"))

    async def _serve(self, framed: FramedStream) -> None:
        send_lock = trio.Lock()
        running = 0

        async def answer(msg: m.AsysRequest) -> None:
            nonlocal running
            try:
                result = await self.call(msg)
                async with send_lock:
                    await framed.send(result)
            finally:
                running -= 1

        first = True
        async with trio.open_nursery() as nursery:
            while (frame := await framed.next_frame()) is not None:
                msg = await self._message(frame, framed, send_lock, first)
                first = False
                if isinstance(msg, m.McpOpen):
                    await self._mcp(framed, msg)
                    return
                if msg is None:
                    continue
                if running >= asys.IN_FLIGHT:
                    text = f"{asys.IN_FLIGHT} calls already running on this connection"
                    async with send_lock:
                        await framed.send(asys.refused(msg, asys.SW.BLOCKED, text))
                    continue
                running += 1
                nursery.start_soon(answer, msg)

    async def _message(
        self, frame: Frame, framed: FramedStream, send_lock: trio.Lock, first: bool
    ) -> m.AsysRequest | m.McpOpen | None:
        """The frame as a request, or None once the peer has been told why not."""
        error: m.Error | None = None
        msg: m.ClientMessage | None = None
        if frame.kind is not Kind.CONTROL:
            error = m.Error(ErrorCode.BAD_MESSAGE, f"{_NOT_HERE}; a DATA frame needs mcp_open")
        else:
            try:
                msg = codec.decode_client(frame.payload)
            except ProtocolError as exc:
                error = m.Error(exc.code, str(exc))
        if isinstance(msg, m.McpOpen) and msg.version != m.PROTOCOL_VERSION:
            error = m.Error(ErrorCode.VERSION, f"protocol version {msg.version} is not supported")
        elif isinstance(msg, m.McpOpen) and not first:
            error = m.Error(ErrorCode.FORBIDDEN, "mcp_open must be a connection's first frame")
        elif msg is not None and not isinstance(msg, m.AsysRequest | m.McpOpen):
            error = m.Error(ErrorCode.FORBIDDEN, f"{codec.tag_of(type(msg))}: {_NOT_HERE}")
        if error is None:
            return msg  # type: ignore[return-value]
        self._note_limited("protocol_error", content=error.message)
        async with send_lock:
            await framed.send(error)
        return None

    def _note_limited(self, command_type: str, **fields: Any) -> None:
        """Refusals and bad frames, recorded within a budget: a flood of them (from the
        agent, or from another session knocking) must not fill the log."""
        if not self._notes.take(trio.current_time()):
            self._unnoted += 1
            return
        metadata = {**fields.pop("metadata", {}), "not_recorded_before": self._unnoted}
        self._unnoted = 0
        self._audit.note(command_type, source="agent", metadata=metadata, **fields)

    async def _mcp(self, framed: FramedStream, _hello: m.McpOpen) -> None:
        from . import mcpserver

        self._audit.note("mcp_open", source="agent", user=self._user, uid=self._scope.agent_uid)
        scope = self._scope
        await mcpserver.serve(
            framed, self.call, lambda: frozenset(scope.agent_grants), scope.on_grants_changed
        )

    # --- one call ---------------------------------------------------------------

    async def call(self, msg: m.AsysRequest) -> m.AsysResult:
        """One instruction for the agent: within the session's rate, with its grants."""
        scope, cfg = self._scope, self._config
        self._rate.rate, self._rate.burst = cfg.agent_asys_rate, cfg.agent_asys_burst
        if not self._rate.take(trio.current_time()):
            if self._over.refuse():
                self._note_rate("start", msg.instruction)
            text = (
                f"rate limit: this session's agent may make {cfg.agent_asys_rate:g} "
                f"calls/s (bursts of {cfg.agent_asys_burst}); back off"
            )
            return asys.refused(msg, asys.SW.BLOCKED, text)
        if refused := self._over.allow():
            self._note_rate("end", msg.instruction, refused)
        ctx = asys.Context(
            m.Role.INTERACTIVE,
            self._user,
            scope.agent_uid,
            frozenset(),
            self._server,
            scope,
            source="agent",
            grants=frozenset(scope.agent_grants),
        )
        return await asys.call(ctx, msg)

    def _note_rate(self, state: str, instruction: str, refused: int = 0) -> None:
        """Said once per episode, not per refused call: the limit also guards the log."""
        audit: BoundAudit = self._audit.bind(
            source="agent", user=self._user, uid=self._scope.agent_uid, role="agent"
        )
        audit.note(
            "asys_rate_limited",
            content=f"{state}: {instruction}",
            metadata={
                "state": state,
                "refused": refused,
                "rate": self._config.agent_asys_rate,
                "burst": self._config.agent_asys_burst,
            },
        )


async def _say(framed: FramedStream, message: m.ServerMessage) -> None:
    with trio.move_on_after(FLUSH_GRACE):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await framed.send(message)

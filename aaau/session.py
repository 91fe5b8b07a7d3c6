"""One agent on one PTY, and the people attached to it.

A session owns three tasks in its own nursery: the single PTY reader (which
audits output, keeps the scrollback and fans every chunk out to each client's
bounded queue without ever waiting on a client), the single PTY writer (fed
by a bounded channel from all clients, so input is written whole, in arrival
order, each piece audited just before it is written), and the waiter on the
agent (the server's child), whose exit ends the session.

Slow clients: a client's queue holds at most ``client_queue_bytes``; one that
falls further behind is disconnected with a ``too-slow`` error (it can rejoin
and repaint from the scrollback). Nobody else, and not the agent, waits.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import signal
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from . import asys, codec, policy, reaper
from . import messages as m
from .audit import AuditLog
from .config import Config
from .policy import Identity, Standing
from .protocol import data_frame
from .spawn import Agent, SpawnPlan, close_pam_session, set_winsize, spawn

#: the most one PTY read burst publishes as a chunk (also kept under a quarter
#: of the client queue limit, so one chunk never evicts a client on its own)
_READ_SIZE = 128 * 1024


class SessionError(Exception):
    """A request on a session failed; ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ClientQueue:
    """A client's outgoing frames, bounded in bytes; never blocks the producer.

    The bound covers what is queued plus what the writer holds but has not
    finished sending, so a stalled client costs at most ``limit`` bytes.

    Fast path: when nothing is queued or being sent, ``put`` hands the frame
    straight to ``send_nowait`` (a non-blocking write on the client's socket),
    so a client that keeps up costs one syscall per chunk and no task switch.
    Whatever the socket does not take is queued for the connection's writer.
    """

    def __init__(self, limit: int, send_nowait: Callable[[bytes], int] | None = None) -> None:
        self.limit = limit
        self.overflowed = False
        self.send_nowait = send_nowait
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._closed = False
        self._busy = False  # the writer holds data it has not finished sending
        self._inflight = 0  # bytes the writer holds: they count against the limit too
        self._lot = trio.lowlevel.ParkingLot()

    def put(self, frame: bytes) -> bool:
        """Send or queue ``frame``; False (and the queue closes) if it does not fit."""
        if self._closed:
            return not self.overflowed
        if not self._busy and not self._chunks and self.send_nowait is not None:
            try:
                sent = self.send_nowait(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # the writer will meet the error and end the connection
            if sent == len(frame):
                return True
            frame = frame[sent:]
        if self._size + self._inflight + len(frame) > self.limit:
            self.overflowed = True
            self._chunks.clear()
            self._size = 0
            self.close()
            return False
        self._chunks.append(frame)
        self._size += len(frame)
        self._lot.unpark_all()
        return True

    def close(self) -> None:
        self._closed = True
        self._lot.unpark_all()

    async def get(self) -> bytes | None:
        """Everything queued, joined; None once closed and drained.

        Calling it again means the previous data was sent in full.
        """
        self._busy, self._inflight = False, 0
        while not self._chunks:
            if self._closed:
                return None
            await self._lot.park()
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._busy, self._inflight = True, len(data)
        return data


_client_ids = itertools.count(1)


@attrs.define(eq=False)
class Attachment:
    """One client connection attached to a session."""

    identity: Identity
    standing: Standing
    role: m.Role
    queue: ClientQueue
    client_id: int = attrs.field(factory=lambda: next(_client_ids))
    #: the connection's cancel scope, so the session can cut a client off
    scope: trio.CancelScope | None = None

    def info(self) -> m.ClientInfo:
        return m.ClientInfo(self.client_id, self.identity.user, self.identity.uid, self.role)

    def send(self, message: m.ServerMessage) -> bool:
        return self.queue.put(codec.encode(message))

    def cut_off(self, grace: float) -> None:
        """Close the queue and give the connection ``grace`` seconds to flush."""
        self.queue.close()
        if self.scope is not None:
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + grace)


class Session:
    def __init__(
        self,
        session_id: str,
        creator: Identity,
        *,
        argv: tuple[str, ...],
        shared: bool,
        rows: int,
        cols: int,
        config: Config,
        audit: AuditLog,
        on_end: Callable[[Session], None],
    ) -> None:
        self.id = session_id
        self.creator = creator
        self.argv = argv
        self.shared = shared
        self.rows, self.cols = rows, cols
        self.config = config
        self.audit = audit
        self.created_at = time.time()
        self.clients: dict[int, Attachment] = {}
        self.alive = False
        self.ended = trio.Event()
        self.exit_status: m.Exited | None = None
        self._on_end = on_end
        self._agent: Agent | None = None
        self._pty: trio.lowlevel.FdStream | None = None
        self._cgroup: Path | None = None
        self._scrollback = bytearray()
        self._input_send, self._input_recv = trio.open_memory_channel[
            tuple[Attachment, bytes, bool]
        ](32)
        self._input_pending = 0  # items handed to the writer and not yet written
        self._reader_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._killing = False
        self._last_input_byte = b"\n"

    # --- lifecycle ----------------------------------------------------------------

    async def run(
        self,
        plan: SpawnPlan,
        *,
        creator_standing: Standing,
        send_nowait: Callable[[bytes], int] | None = None,
        task_status: trio.TaskStatus[Attachment] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Spawn the agent, attach its creator, then serve it until it exits.

        The creator is attached before anything can end the session, so even an
        agent that dies at once reports its exit to the one who started it. A
        spawn failure is raised to the caller of ``nursery.start``; nothing is
        left behind.
        """
        self._cgroup = Path(plan.cgroup) if plan.cgroup else None
        try:
            agent = await spawn(plan, rows=self.rows, cols=self.cols)
        except BaseException:
            if self._cgroup is not None:
                await reaper.remove_cgroup(self._cgroup)
            raise
        self._agent = agent
        self.asys = asys.session_scope(self.id, plan.uid, agent.process.pid, self._cgroup)
        self._pty = trio.lowlevel.FdStream(agent.master_fd)
        self.alive = True
        self.audit.write(
            "session_start",
            user=self.creator.user,
            uid=self.creator.uid,
            session_id=self.id,
            content=f"Agent PID {agent.pid}",
            metadata={
                "argv": list(plan.argv),
                "executable": plan.executable,
                "agent_pid": agent.pid,
                "pty": agent.pty,
                "cwd": plan.cwd,
                "agent_user": plan.user,
                "env_names": sorted(plan.env),
                "shared": self.shared,
                "rows": self.rows,
                "cols": self.cols,
                "cgroup": plan.cgroup,
            },
        )
        task_status.started(
            self.attach(self.creator, creator_standing, None, created=True, send_nowait=send_nowait)
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_pty)
                nursery.start_soon(self._write_pty)
                await agent.process.wait()
                self.alive = False
                # resume what ASys stopped, lift isolation, then end what is left
                await self.asys.close()
                # whatever the agent left behind in its tty session or cgroup ends with it
                await reaper.terminate(agent.process.pid, self._cgroup, self.config.kill_grace)
                with trio.move_on_after(1):
                    await self._reader_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.alive = False
            with trio.CancelScope(shield=True):
                await self.asys.close()
                if agent.process.returncode is None:  # cancelled (shutdown): no orphans
                    await reaper.terminate(agent.process.pid, self._cgroup, self.config.kill_grace)
                    with trio.move_on_after(1):
                        await agent.process.wait()
                await self._finish(agent.process.returncode)
                await close_pam_session(plan)

    async def _finish(self, returncode: int | None) -> None:
        if returncode is None:
            code, sig = None, None
        elif returncode < 0:
            code, sig = None, -returncode
        else:
            code, sig = returncode, None
        self.exit_status = m.Exited(code=code, signal=sig)
        self.audit.write(
            "session_end",
            session_id=self.id,
            user=self.creator.user,
            uid=self.creator.uid,
            content=f"exit code {code}" if sig is None else f"killed by signal {sig}",
            metadata={"exit_code": code, "signal": sig, "force_killed": self._killing},
        )
        frame = codec.encode(self.exit_status)
        for att in list(self.clients.values()):
            att.queue.put(frame)
            att.cut_off(self.config.shutdown_grace)
        self.clients.clear()
        self._input_send.close()
        if self._pty is not None:
            await self._pty.aclose()
        if self._cgroup is not None:
            await reaper.remove_cgroup(self._cgroup)
        self._on_end(self)
        self.ended.set()

    # --- the PTY ------------------------------------------------------------------------

    async def _read_pty(self) -> None:
        """The single PTY reader: drain what is there, publish it as one chunk.

        Reading until EAGAIN (up to _READ_SIZE) before publishing turns a burst
        of small tty reads into one audit record, one frame and one wake-up per
        client, which is what keeps the fan-out cheap under heavy output.
        """
        assert self._agent is not None
        fd = self._agent.master_fd  # non-blocking: the FdStream set it
        limit = max(4096, min(_READ_SIZE, self.config.client_queue_bytes // 4))
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                chunks, size, eof = [], 0, False
                while size < limit:
                    try:
                        data = os.read(fd, limit - size)
                    except BlockingIOError:
                        break
                    except OSError:  # EIO: every slave fd is closed
                        eof = True
                        break
                    if not data:
                        eof = True
                        break
                    chunks.append(data)
                    size += len(data)
                if chunks:
                    self._publish(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                if eof:
                    return
        except trio.ClosedResourceError:
            pass
        finally:
            self._reader_done.set()

    def _publish(self, data: bytes) -> None:
        """Fan a chunk out to every client, then record it (no await in between)."""
        frame = data_frame(data)
        for att in list(self.clients.values()):
            if not att.queue.put(frame):
                self._evict(att)
        # output is recorded right after it is handed on, off the echo's critical path;
        # input, which has an effect, is recorded before it is written
        if self.config.record_output:
            self.audit.write_bytes("output", data, source="agent", session_id=self.id)
        sb = self._scrollback
        sb += data
        limit = self.config.scrollback_bytes
        if len(sb) > 2 * limit:
            del sb[: len(sb) - limit]

    def scrollback(self) -> bytes:
        """The recent output, starting at a line boundary where it was trimmed."""
        limit = self.config.scrollback_bytes
        data = bytes(self._scrollback[-limit:])
        if len(self._scrollback) > limit:
            cut = data.find(b"\n")
            if cut >= 0:
                data = data[cut + 1 :]
        return data

    async def _write_pty(self) -> None:
        """The PTY writer: input that could not be written at once, in arrival order."""
        assert self._pty is not None
        async for att, data, audited in self._input_recv:
            if not audited:
                who = self._who(att)
                if data:
                    self.audit.write_bytes("input", data, source="human", **who)
                else:
                    data = self._eof_bytes()
                    self.audit.write("input_eof", source="human", **who)
            try:
                await self._pty.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                self._input_pending -= 1
            self._last_input_byte = data[-1:]

    def _eof_bytes(self) -> bytes:
        """What makes the agent's terminal report end of input (VEOF, twice mid-line)."""
        assert self._agent is not None
        try:
            veof = termios.tcgetattr(self._agent.master_fd)[6][termios.VEOF]
        except termios.error:
            veof = b"\x04"
        if isinstance(veof, int):
            veof = bytes([veof])
        assert isinstance(veof, bytes)
        return veof if self._last_input_byte in (b"\n", b"\r") else veof * 2

    # --- clients ----------------------------------------------------------------------------

    def _who(self, att: Attachment, **metadata: Any) -> dict[str, Any]:
        """The audit fields naming a client, plus ``metadata``."""
        return {
            "user": att.identity.user,
            "uid": att.identity.uid,
            "role": att.role,
            "session_id": self.id,
            "metadata": {"client_id": att.client_id, **metadata},
        }

    def attach(
        self,
        identity: Identity,
        standing: Standing,
        requested: m.Role | None,
        *,
        created: bool,
        send_nowait: Callable[[bytes], int] | None = None,
    ) -> Attachment:
        """Add a client: Welcome, then the scrollback, then live output."""
        if not self.alive:
            raise SessionError(m.ErrorCode.UNKNOWN_SESSION, f"session {self.id} has ended")
        if len(self.clients) >= self.config.clients_per_session:
            raise SessionError(
                m.ErrorCode.LIMIT,
                f"session {self.id} already has {len(self.clients)} clients "
                f"(limit {self.config.clients_per_session})",
            )
        allowed = policy.max_role(
            standing, identity.uid, creator_uid=self.creator.uid, shared=self.shared
        )
        role = policy.grant(allowed, requested)
        queue = ClientQueue(self.config.client_queue_bytes, send_nowait)
        att = Attachment(identity, standing, role, queue)
        self.audit.write(
            "join",
            source="human",
            **self._who(
                att,
                created=created,
                requested_role=requested.value if requested else None,
                peer_pid=identity.pid,
            ),
        )
        att.send(
            m.Welcome(
                version=m.PROTOCOL_VERSION,
                session_id=self.id,
                role=role,
                created=created,
                rows=self.rows,
                cols=self.cols,
                client_id=att.client_id,
            )
        )
        history = self.scrollback()
        if history:
            att.queue.put(data_frame(history))
        self._broadcast(m.Joined(att.info()))
        self.clients[att.client_id] = att
        if not created:
            self._redraw()
        return att

    def detach(self, att: Attachment, reason: str) -> None:
        if self.clients.pop(att.client_id, None) is None:
            return
        self.audit.write("leave", source="human", content=reason, **self._who(att))
        self._broadcast(m.Left(att.info()))

    def _evict(self, att: Attachment) -> None:
        self.clients.pop(att.client_id, None)
        self.audit.write(
            "client_evicted",
            content=f"client fell more than {self.config.client_queue_bytes} bytes behind",
            **self._who(att),
        )
        att.cut_off(1.0)
        self._broadcast(m.Left(att.info()))

    def revoke(self, att: Attachment, reason: str) -> None:
        """Disconnect a client whose right to be here is gone."""
        self.clients.pop(att.client_id, None)
        self.audit.write("client_revoked", content=reason, **self._who(att))
        att.send(m.Error(m.ErrorCode.REVOKED, reason))
        att.cut_off(1.0)
        self._broadcast(m.Left(att.info()))

    def _broadcast(self, message: m.ServerMessage) -> None:
        frame = codec.encode(message)
        for att in list(self.clients.values()):
            if not att.queue.put(frame):
                self._evict(att)

    def _redraw(self) -> None:
        """SIGWINCH to the foreground process group, so a full-screen program repaints."""
        assert self._agent is not None
        if not self.alive:  # the master fd may be closed, its number reused
            return
        with contextlib.suppress(OSError):
            os.killpg(os.tcgetpgrp(self._agent.master_fd), signal.SIGWINCH)

    # --- requests from attached clients -----------------------------------------------------

    async def send_input(self, att: Attachment, data: bytes) -> None:
        """Write or queue input (b"" for end of input); waits while the agent is not reading.

        Fast path: with nothing queued before it, input is audited and written
        to the PTY at once, without waking the writer task (a keystroke's
        latency); whatever the PTY does not take goes to the writer, in order.
        """
        audited = False
        if data and not self._input_pending and self.alive and self._agent is not None:
            self.audit.write_bytes("input", data, source="human", **self._who(att))
            audited = True
            try:
                written = os.write(self._agent.master_fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # the agent's terminal is gone; the session is ending
            if written:
                self._last_input_byte = data[written - 1 : written]
            data = data[written:]
            if not data:
                await trio.lowlevel.checkpoint()
                return
        self._input_pending += 1
        try:
            await self._input_send.send((att, data, audited))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._input_pending -= 1

    def resize(self, att: Attachment, rows: int, cols: int) -> None:
        """Set the PTY size (ignored once the agent has ended: its fd may be gone)."""
        assert self._agent is not None
        if not self.alive:
            return
        self.audit.write(
            "resize",
            source="human",
            content=f"{rows}x{cols}",
            **self._who(att, rows=rows, cols=cols, previous=f"{self.rows}x{self.cols}"),
        )
        set_winsize(self._agent.master_fd, rows, cols)
        self.rows, self.cols = rows, cols

    def force_kill(self, actor: Identity, role: m.Role | None) -> None:
        """End every process of the session: SIGHUP/SIGTERM, a grace, then SIGKILL."""
        self.audit.write(
            "force_kill",
            source="human",
            user=actor.user,
            uid=actor.uid,
            role=role,
            session_id=self.id,
            content="FORCE_KILL",
            metadata={"peer_pid": actor.pid},
        )
        self.kill_all()

    def kill_all(self) -> None:
        if self._killing or not self.alive or self._nursery is None or self._agent is None:
            return
        self._killing = True
        self._nursery.start_soon(
            reaper.terminate, self._agent.process.pid, self._cgroup, self.config.kill_grace
        )

    def notify_all(self, message: m.ServerMessage) -> None:
        self._broadcast(message)

    def info(self) -> m.SessionInfo:
        agent = self._agent
        return m.SessionInfo(
            session_id=self.id,
            creator=self.creator.user,
            creator_uid=self.creator.uid,
            argv=self.argv,
            pid=agent.pid if agent else 0,
            pty=agent.pty if agent else "",
            created_at=self.created_at,
            rows=self.rows,
            cols=self.cols,
            shared=self.shared,
            clients=tuple(att.info() for att in self.clients.values()),
        )

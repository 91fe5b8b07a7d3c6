"""One agent on one PTY, and the people attached to it.

A session runs in the registry's nursery. :meth:`Session.run` starts the
agent, attaches its creator, then owns three tasks: the PTY reader (every
chunk goes to :class:`aaau.output.SessionOutput`, which fans it out to each
client's :class:`aaau.outbox.Outbox` without waiting, filtered per role,
records it and keeps it for late joiners), the PTY input writer, and the wait
for the agent, whose exit ends the session. Its life is :class:`SessionState`.

The session knows clients only through :class:`aaau.members.Members`
(attachments with an outbox): it puts frames in and closes outboxes; it never
touches a socket and never reaches into a connection.
"""

from __future__ import annotations

import enum
import functools
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from . import asys, endpoint, eof, reaper
from . import messages as m
from .asys import ServerScope
from .audit import AuditLog, BoundAudit
from .config import Config
from .endpoint import Endpoint
from .errors import ErrorCode, RequestError
from .members import Attachment, Members
from .outbox import Outbox
from .output import SessionOutput
from .policy import Identity, Standing
from .protocol import data_frame
from .pty import PtyInput, PtyMaster, PtyReader
from .spawn import Agent, Spawner, SpawnPlan
from .views import Views

#: the most one PTY read burst publishes as a chunk (also kept under a quarter
#: of the client queue limit, so one chunk never evicts a client on its own)
READ_SIZE: Final = 128 * 1024
#: after the agent exits, how long the output it left in the PTY may take to drain
OUTPUT_DRAIN: Final = 1.0
#: after a cancelled session's agent was told to end, how long to wait for it
REAP_WAIT: Final = 1.0


class SessionState(enum.Enum):
    """A session's life, in order; it never goes back."""

    STARTING = "starting"  # registered, the agent being spawned
    RUNNING = "running"  # input, resize, join, kill are acted on
    KILLING = "killing"  # FORCE_KILL under way; still running until the agent ends
    ENDING = "ending"  # the agent has ended: nothing more is acted on
    ENDED = "ended"  # clients told, resources given back, out of the registry


class Session:
    # from the agent's start on (state RUNNING and later); see run()
    asys: asys.SessionScope
    _agent: Agent
    _pty: PtyMaster
    _input: PtyInput
    _nursery: trio.Nursery

    def __init__(
        self,
        session_id: str,
        creator: Identity,
        *,
        argv: tuple[str, ...],
        shared: bool,
        end_with_clients: bool = False,
        rows: int,
        cols: int,
        config: Config,
        audit: AuditLog,
        spawner: Spawner,
        on_end: Callable[[Session], Awaitable[None]],
        on_started: Callable[[Session, Agent], None] = lambda _s, _a: None,
        grants: frozenset[str] = frozenset(),
        asys_server: ServerScope | None = None,
    ) -> None:
        self.id = session_id
        #: what the agent may call through its endpoint (served only with ``asys_server``)
        self.grants = grants
        self._asys_server = asys_server
        self._endpoint: Endpoint | None = None
        self.creator = creator
        self.argv = argv
        self.shared = shared
        self.end_with_clients = end_with_clients
        self.rows, self.cols = rows, cols
        self.config = config
        self.created_at = time.time()
        self.state = SessionState.STARTING
        self.exit_status: m.Exited | None = None
        #: why the session was ended, if it was (a person, the server, its pipe client)
        self.end_reason: str | None = None
        self.audit = audit.bind(session_id=session_id)
        self.members = Members(
            session_id, self.audit, creator_uid=creator.uid, shared=shared, config=config
        )
        self.output = SessionOutput(self.members, self.audit, config, cols, rows)
        self.views = Views(self.members, self.output)
        self._spawner = spawner
        self._on_end = on_end
        self._on_started = on_started
        self._ended = trio.Event()

    @property
    def alive(self) -> bool:
        """True while requests are acted on: from the agent's start to its end."""
        return self.state in (SessionState.RUNNING, SessionState.KILLING)

    async def wait_ended(self) -> None:
        await self._ended.wait()

    # --- lifecycle ----------------------------------------------------------------

    async def run(
        self,
        plan: SpawnPlan,
        creator: tuple[Standing, Outbox],
        *,
        task_status: trio.TaskStatus[Attachment] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Spawn the agent, attach its creator, then serve until the agent exits.

        The creator is attached before anything can end the session, so even an
        agent that dies at once reports its exit to the one who started it. A
        spawn failure is raised to the caller of ``nursery.start``.
        """
        self._endpoint = endpoint.open_for(self._asys_server, self.id, plan.gid, self.audit)
        try:
            agent = await self._spawner.start(plan, rows=self.rows, cols=self.cols)
        except BaseException:
            endpoint.close(self._endpoint)
            raise
        self._agent = agent
        self._pty = PtyMaster(agent.master_fd)
        self._input = PtyInput(self._pty, _reads(agent, self._pty), sticky_eof=plan.pipe)
        self.asys = asys.session_scope(self.id, plan.uid, agent.pid, agent.cgroups)
        self.asys.agent_grants.update(self.grants)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.state = SessionState.RUNNING
                _audit_start(self, agent)
                self._on_started(self, agent)
                task_status.started(self.attach(self.creator, *creator, None, created=True))
                out = self.output
                reader = PtyReader(self._pty, self._read_size(), out.publish, out)
                nursery.start_soon(reader.run)
                nursery.start_soon(self._input.run)
                nursery.start_soon(self.views.serve)
                if self._endpoint is not None:
                    nursery.start_soon(self._endpoint.serve, self.asys, plan.user)
                await agent.process.wait()
                self.state = SessionState.ENDING
                await self._end_processes(agent)
                with trio.move_on_after(OUTPUT_DRAIN):
                    await reader.done.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._finish(agent)

    def revoke_grants(self, names: tuple[str, ...], audit: BoundAudit) -> list[str]:
        """Withdraw grants from the agent, from its next call on; what it keeps."""
        self.grants = endpoint.revoke(self.asys, names, audit)
        return sorted(self.grants)

    def _read_size(self) -> int:
        return max(4096, min(READ_SIZE, self.config.client_queue_bytes // 4))

    async def _end_processes(self, agent: Agent) -> None:
        """Resume what ASys stopped, lift isolation, end whatever the agent left behind."""
        await self.asys.close()
        await reaper.terminate(agent.pid, agent.cgroups, self.config.kill_grace)

    async def _finish(self, agent: Agent) -> None:
        """Tell everyone how the agent ended, hang up, give everything back."""
        self.state = SessionState.ENDING
        if agent.process.returncode is None:  # cancelled (shutdown): no orphans
            await self._end_processes(agent)
            with trio.move_on_after(REAP_WAIT):
                await agent.process.wait()
        else:
            await self.asys.close()
        endpoint.close(self._endpoint)
        self.exit_status = _exit_status(agent.process.returncode, self.end_reason)
        _audit_end(self, self.exit_status)
        self.members.hang_up_all(self.exit_status, self.config.shutdown_grace)
        self._input.abandon()
        await self._pty.aclose()
        await self._spawner.release(agent)
        self.state = SessionState.ENDED
        await self._on_end(self)
        self._ended.set()

    # --- output ------------------------------------------------------------------------

    def attach(
        self,
        identity: Identity,
        standing: Standing,
        outbox: Outbox,
        requested: m.Role | None,
        *,
        created: bool,
        size: tuple[int, int] | None = None,
    ) -> Attachment:
        """Add a client: welcome, then the screen as it is (for a joiner), then live output.

        ``size`` is the joiner's terminal (rows, cols): the screen is drawn for it.
        """
        if not self.alive:
            raise RequestError(f"session {self.id} has ended", code=ErrorCode.UNKNOWN_SESSION)
        att = self.members.join(identity, standing, outbox, requested, created=created)
        att.view = size or (self.rows, self.cols)
        att.send(_welcome(self, att, created))
        if not created:
            outbox.put(data_frame(self.output.rendering(att.view[1], att.view[0])))
        self.members.add(att)
        self.views.update(att, (self.rows, self.cols), joined=True)
        if not created:  # a full-screen program repaints for the newcomer
            self._pty.signal_foreground(signal.SIGWINCH)
        return att

    def detach(self, att: Attachment, reason: str) -> None:
        self.members.leave(att, reason)
        if self.end_with_clients and not len(self.members):
            self.kill_all("ended: its last client, in pipe mode, left (aaau --keep keeps it)")

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration: limits apply from now on."""
        self.config = config
        self.members.config = config
        self.output.reconfigure(config)

    # --- requests ---------------------------------------------------------------------

    async def input(self, att: Attachment, data: bytes) -> None:
        """Typed bytes from ``att`` (checked by the caller); may wait for the agent."""
        if self.alive:
            self.members.typist = att
            await self._input.send(att.audit, data)

    async def input_eof(self, att: Attachment) -> None:
        if self.alive:
            await self._input.send_eof(att.audit)

    def resize(self, att: Attachment, rows: int, cols: int) -> None:
        if not self.alive:
            return
        att.audit.write(
            "resize",
            content=f"{rows}x{cols}",
            metadata={"rows": rows, "cols": cols, "previous": f"{self.rows}x{self.cols}"},
        )
        self._pty.resize(rows, cols)
        self.output.resize(cols, rows)
        self.rows, self.cols = rows, cols
        self.views.resized(att, (rows, cols))

    def force_kill(self, audit: BoundAudit) -> None:
        """FORCE_KILL by whoever ``audit`` is bound to (the caller checked the right)."""
        # never refused for want of a record: it may be what stops an agent filling the disk
        record = audit.note("force_kill", source="human", content="FORCE_KILL")
        who = f"{record.user} ({record.role})" if record.role else record.user
        self.kill_all(f"killed by {who}")

    def kill_all(self, reason: str) -> None:
        """End every process of the session: SIGHUP/SIGTERM, a grace, then SIGKILL.

        ``reason`` is what its clients are told ("killed by ada (admin)").
        """
        if self.state is not SessionState.RUNNING:
            return
        self.state = SessionState.KILLING
        self.end_reason = reason
        self._nursery.start_soon(
            reaper.terminate, self._agent.pid, self._agent.cgroups, self.config.kill_grace
        )

    def info(self) -> m.SessionInfo:
        return _info(self)


def _info(session: Session) -> m.SessionInfo:
    agent = getattr(session, "_agent", None)
    return m.SessionInfo(
        session_id=session.id,
        creator=session.creator.user,
        creator_uid=session.creator.uid,
        argv=session.argv,
        pid=agent.pid if agent else 0,
        pty=agent.pty if agent else "",
        created_at=session.created_at,
        rows=session.rows,
        cols=session.cols,
        shared=session.shared,
        clients=session.members.infos(),
        agent_grants=tuple(sorted(session.grants)),
    )


def _audit_start(session: Session, agent: Agent) -> None:
    session.audit.note(
        "session_start",
        user=session.creator.user,
        uid=session.creator.uid,
        content=f"Agent PID {agent.pid}",
        metadata={
            **_start_metadata(agent, session.shared, session.rows, session.cols),
            "agent_grants": sorted(session.grants),
        },
    )


def _audit_end(session: Session, status: m.Exited) -> None:
    code, sig = status.code, status.signal
    session.audit.note(
        "session_end",
        user=session.creator.user,
        uid=session.creator.uid,
        content=f"exit code {code}" if sig is None else f"killed by signal {sig}",
        metadata={
            "exit_code": code,
            "signal": sig,
            "force_killed": session.end_reason is not None,
            "end_reason": session.end_reason,
            **session.output.end_metadata(),
        },
    )


def _start_metadata(agent: Agent, shared: bool, rows: int, cols: int) -> dict[str, object]:
    """What ``session_start`` records: what runs, as whom, where (env names, never values)."""
    plan = agent.plan
    return {
        "argv": list(plan.argv),
        "executable": plan.executable,
        "agent_pid": agent.pid,
        "pty": agent.pty,
        "cwd": plan.cwd,
        "agent_user": plan.user,
        "env_names": sorted(plan.env),
        "term": plan.env.get("TERM"),
        "shared": shared,
        "rows": rows,
        "cols": cols,
        "cgroup": str(agent.cgroups.v2) if agent.cgroups and agent.cgroups.v2 else None,
        "sandbox": agent.notes,
    }


def _reads(agent: Agent, pty: PtyMaster) -> Callable[[], Awaitable[None]]:
    """Returns once the agent reads its terminal (see :mod:`aaau.eof`)."""

    def look() -> eof.Reading:
        return eof.probe(agent.pid, pty.fd, agent.pty)

    return functools.partial(eof.until_read, look)


def _welcome(session: Session, att: Attachment, created: bool) -> m.Welcome:
    return m.Welcome(
        m.PROTOCOL_VERSION,
        session.id,
        att.role,
        created,
        session.rows,
        session.cols,
        att.client_id,
        att.input_window,
    )


def _exit_status(returncode: int | None, reason: str | None) -> m.Exited:
    if returncode is None:
        return m.Exited(code=None, signal=None, reason=reason)
    if returncode < 0:
        return m.Exited(code=None, signal=-returncode, reason=reason)
    return m.Exited(code=returncode, signal=None, reason=reason)

"""The server: start, readiness, signals, reload, shutdown.

Start-up checks the agent user and groups, opens the audit log and the socket
(:mod:`aaau.listener`), then serves it with :func:`trio.serve_listeners`:
each accepted stream becomes a :class:`aaau.connection.Connection` in the
connections nursery, and sessions run in the sessions nursery
(:class:`aaau.sessions.Sessions`). SIGHUP reloads; SIGTERM/SIGINT shut down
the way hypercorn does: stop accepting, tell clients, end the agents, give
connections a deadline, record ``server_stop``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import AsyncIterator
from typing import Any, Final

import structlog
import trio

from . import _sandbox, asys, credentials, endpoint, notify, oplog
from .audit import AuditLog
from .cgroups import Hierarchies, take_delegated
from .config import Config, load
from .connection import Connection, Hub
from .errors import StartupError
from .identities import Identities
from .journal import JournalSink
from .journal import Mode as JournalMode
from .listener import activated, listen
from .policy import Groups
from .recovery import BaseLock, Ledger, recover
from .sessions import Sessions
from .spawn import Spawner

log = structlog.get_logger("aaau.server")

#: settings that only a restart changes (SIGHUP keeps the running values)
RESTART_ONLY: Final = (
    "agent_user",
    "identity",
    "agent_pool",
    "state_dir",
    "cgroup_base",
    "socket",
    "log_dir",
    "journald",
    "journal_socket",
    "asys_dir",
)
#: after the sessions ended (or their deadline passed), how long connections
#: get to deliver their last frames before they are cancelled
CONNECTION_DRAIN: Final = 1.0

#: how often the operational log's file is checked for a rotation
LOG_CHECK_INTERVAL: Final = 1.0

__all__ = ["Server", "StartupError"]


def _raise_fd_limit() -> None:
    """Every fd the hard limit allows: systemd's default soft limit (1024) is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _check_endpoint_dir(cfg: Config) -> None:
    """Agents with a /tmp of their own (private_tmp) cannot see an endpoint under it."""
    where = os.path.abspath(cfg.endpoint_dir)
    for private in _sandbox.PRIVATE_DIRS if cfg.private_tmp else ():
        if where == private or where.startswith(private + "/"):
            raise StartupError(
                f"the agents' ASys endpoints would be in {where}, but each agent has a "
                f"{private} of its own (private_tmp): set asys_dir (--asys-dir) elsewhere, "
                "e.g. /run/aaau-asys"
            )


class Server:
    def __init__(
        self,
        config: Config,
        *,
        config_file: str | None = None,
        overrides: dict[str, Any] | None = None,
        spawner: Spawner | None = None,
    ) -> None:
        self.config = config
        self.config_file = config_file
        self.overrides = overrides or {}
        self._spawner = spawner
        self._shutdown = trio.Event()
        self._sessions: Sessions | None = None
        self._activated: int | None = None  # the fd of a socket systemd passed
        self._log_reopen_failed = False

    def stop(self) -> None:
        self._shutdown.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stopped; ``task_status.started()`` once clients can connect."""
        async with self._resources() as (identities, groups, audit, listener):
            cfg = self.config
            ledger = Ledger(cfg.state_dir)
            await recover(ledger, cfg.cgroup_base, audit)
            for user in await identities.recover():
                audit.note("identity_reset", content=user, metadata={"reason": "start"})
            async with trio.open_nursery() as sessions_nursery:
                await sessions_nursery.start(audit.keep)
                sessions_nursery.start_soon(self._follow_log)
                scope = asys.ServerScope(cfg, audit, sessions_nursery)
                self._sessions = sessions = Sessions(
                    cfg,
                    audit,
                    sessions_nursery,
                    identities,
                    spawner=self._spawner,
                    ledger=ledger,
                    asys_server=scope,
                )
                self._hub = Hub(cfg, groups, audit, sessions, scope)
                await sessions_nursery.start(scope.status.run)
                async with trio.open_nursery() as connections:
                    await self._serve(listener, connections, task_status)
                    await self._shut_down(sessions)
                    connections.cancel_scope.deadline = trio.current_time() + CONNECTION_DRAIN
                sessions_nursery.cancel_scope.cancel()

    @contextlib.asynccontextmanager
    async def _resources(
        self,
    ) -> AsyncIterator[tuple[Identities, Groups, AuditLog, trio.SocketListener]]:
        """What the server holds for its life, taken in order, given back in any case."""
        if os.geteuid() != 0:
            raise StartupError("aaau-server run must be started as root")
        _raise_fd_limit()
        cfg = self.config
        if (leaf := take_delegated(Hierarchies.discover())) is not None:
            log.info(
                "cgroup-delegated", server=str(leaf), sessions=str(leaf.parent / cfg.cgroup_base)
            )
        identities = Identities(cfg)
        groups = credentials.resolve_groups(identities.agent_uids(), cfg.group, cfg.admin_group)
        identities.check(groups)
        audit = AuditLog.open_in(cfg.log_dir, gid=groups.admin_gid)
        if cfg.journald is not JournalMode.OFF:
            audit.journal = JournalSink(cfg.journald, cfg.journal_socket)
        with contextlib.ExitStack() as held:
            held.callback(audit.close)
            self._activated = activated()
            listener, lock = await listen(
                cfg.socket, groups.human_gid or 0, groups.admin_gid, inherited=self._activated
            )
            held.callback(lock.release)
            held.callback(self._remove_socket, listener)
            _check_endpoint_dir(cfg)
            try:
                endpoint.prepare_dir(cfg.endpoint_dir)
            except OSError as exc:
                raise StartupError(f"the agents' ASys endpoints: {exc}") from None
            identities.lock()
            held.callback(identities.unlock)
            held.callback(BaseLock(cfg.cgroup_base, Hierarchies.discover()).release)
            pid = os.getpid()
            audit.note(
                "server_start",
                content=f"pid {pid}",
                metadata={"socket": cfg.socket, "pid": pid, "agent_user": cfg.agent_user},
            )
            log.info("listening", socket=cfg.socket, pid=pid)
            try:
                yield identities, groups, audit, listener
            finally:
                left = len(self._sessions) if self._sessions is not None else 0
                audit.note("server_stop", content=f"pid {pid}", metadata={"sessions_left": left})
                log.info("stopped")

    async def _follow_log(self) -> None:
        """Reopen the operational log's file once logrotate moved it (no signal needed)."""
        while True:
            await trio.sleep(LOG_CHECK_INTERVAL)
            if oplog.moved():
                self._reopen_log()

    def _reopen_log(self) -> None:
        """Said once while it keeps failing (its directory gone): the check runs every second."""
        try:
            reopened = oplog.reopen()
        except OSError as exc:
            if not self._log_reopen_failed:
                log.error("log-reopen-failed", error=str(exc))
            self._log_reopen_failed = True
            return
        self._log_reopen_failed = False
        if reopened:
            log.info("log-reopened", path=reopened)

    def _remove_socket(self, listener: trio.SocketListener) -> None:
        listener.socket.close()
        if self._activated is None:  # systemd's socket stays: it starts us again
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket)

    async def _serve(
        self,
        listener: trio.SocketListener,
        connections: trio.Nursery,
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Accept until told to stop; signals are ours before anyone hears we are ready."""
        await connections.start(self._watch_signals)
        accepting = trio.CancelScope()
        connections.start_soon(self._accept, listener, connections, accepting)
        task_status.started()
        await self._shutdown.wait()
        accepting.cancel()

    async def _accept(
        self, listener: trio.SocketListener, connections: trio.Nursery, scope: trio.CancelScope
    ) -> None:
        with scope:
            await trio.serve_listeners(self._handle, [listener], handler_nursery=connections)

    async def _handle(self, stream: trio.SocketStream) -> None:
        await Connection(stream, self._hub).serve()

    async def _shut_down(self, sessions: Sessions) -> None:
        """No new clients; every client told; every agent ended, within a deadline.

        A socket systemd passed stays: a client that connects now waits in its
        queue for the next start (that is what socket activation is for)."""
        if self._activated is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.socket)
        sessions.shutdown()
        with trio.move_on_after(self.config.shutdown_grace + 2 * self.config.kill_grace):
            await sessions.wait_all_ended()

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
                    notify.notify("STOPPING=1", "STATUS=stopping: ending sessions")
                    self.stop()
                    return

    def reload(self) -> None:
        """SIGHUP: re-read the config file and group membership, apply them to everyone."""
        notify.reloading()
        try:
            self._reload()
        finally:
            notify.notify("READY=1", f"STATUS=listening on {self.config.socket}")

    def _reload(self) -> None:
        hub = self._hub
        try:
            fresh = load(self.config_file).with_overrides(**self.overrides)
        except Exception as exc:
            log.error("reload-failed", error=str(exc))
            hub.audit.note("reload_failed", content=str(exc))
            return
        # the socket, the agent users and the directories only change on restart
        cfg = fresh.with_overrides(
            **{name: getattr(self.config, name) for name in RESTART_ONLY},
        )
        groups = credentials.resolve_groups(hub.sessions.agent_uids(), cfg.group, cfg.admin_group)
        self._reopen_log()
        try:
            hub.audit.reopen(gid=groups.admin_gid)
        except OSError as exc:  # keep writing to the file we have
            why = f"cannot reopen {hub.audit.path}: {exc.strerror or exc}; kept the open file"
            log.error("reload-failed", error=why)
            hub.audit.note("reload_failed", content=why)
        self.config = hub.config = hub.asys.config = hub.occupancy.config = cfg
        hub.groups = groups
        hub.audit.note("reload", content="configuration and group membership reloaded")
        log.info("reloaded", config_file=self.config_file)
        hub.sessions.reload(cfg, groups, hub.identify)

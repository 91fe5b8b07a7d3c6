"""The sessions of one server: limits, create, find, list, forget, reload, shutdown.

The registry owns the nursery the sessions run in (the server hands it over).
A session is registered before its agent starts, so the limits count it, and
forgets itself when it has ended.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from functools import partial

import structlog
import trio

from . import agentconfig, asys, credentials, endpoint, policy, spawn
from . import messages as m
from .audit import AuditLog
from .config import Config
from .errors import ErrorCode, RequestError
from .identities import Account, Identities
from .members import Attachment, Members
from .outbox import Outbox
from .policy import Groups, Identity, Refusal, Standing
from .recovery import Ledger
from .session import Session

log = structlog.get_logger("aaau.sessions")

Identify = Callable[[int, int, int], Identity]


def new_session_id() -> str:
    """128 random bits, URL-safe; never starting with "-", which a command line would
    take for an option."""
    while (session_id := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return session_id


class Sessions:
    def __init__(
        self,
        config: Config,
        audit: AuditLog,
        nursery: trio.Nursery,
        identities: Identities,
        *,
        spawner: spawn.Spawner | None = None,
        ledger: Ledger | None = None,
        asys_server: asys.ServerScope | None = None,
    ) -> None:
        self.config = config
        #: what the sessions' ASys endpoints serve with (None: no endpoints)
        self.asys_server = asys_server
        self._audit = audit
        self._nursery = nursery
        self._identities = identities
        self._spawner = spawner or spawn.Launcher(config.cgroup_base)
        self._ledger = ledger
        self._sessions: dict[str, Session] = {}
        self._accounts: dict[str, Account] = {}  # session id -> the agent user it runs as

    def agent_uids(self) -> frozenset[int]:
        """Every agent user's uid (they are refused at the socket), as the database says now."""
        return self._identities.agent_uids()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def find(self, session_id: str) -> Session:
        """A live session, or the ``unknown-session`` error."""
        session = self._sessions.get(session_id)
        if session is None or not session.alive:
            raise RequestError(f"no session {session_id}", code=ErrorCode.UNKNOWN_SESSION)
        return session

    def listing(self) -> tuple[m.SessionInfo, ...]:
        return tuple(s.info() for s in self._sessions.values() if s.alive)

    def _check_limits(self, identity: Identity) -> None:
        cfg = self.config
        if len(self._sessions) >= cfg.max_sessions:
            raise RequestError(
                f"the server already runs {len(self._sessions)} sessions "
                f"(limit {cfg.max_sessions}): see them with `aaau ls`; an admin can end one "
                "with `aaau kill ID`",
                code=ErrorCode.LIMIT,
            )
        mine = sum(1 for s in self._sessions.values() if s.creator.uid == identity.uid)
        if mine >= cfg.sessions_per_user:
            raise RequestError(
                f"{identity.user} already runs {mine} sessions (limit {cfg.sessions_per_user}): "
                "see yours with `aaau ls`, end one with `aaau kill ID` "
                "or join it with `aaau -n ID`",
                code=ErrorCode.LIMIT,
            )

    def _grants(self, identity: Identity, standing: Standing, req: m.Create) -> frozenset[str]:
        """What the agent may call (checked against the ceiling before anything starts)."""
        try:
            return asys.agent_grants(
                req.grants, self.config, identity.groups, standing is Standing.ADMIN
            )
        except ValueError as exc:
            raise RequestError(str(exc), code=ErrorCode.FORBIDDEN) from None

    def _plan(
        self, session_id: str, req: m.Create, account: Account, grants: frozenset[str]
    ) -> spawn.SpawnPlan:
        with_endpoint = grants and self.asys_server is not None
        return spawn.plan(
            self.config,
            account,
            session_id=session_id,
            argv=req.argv,
            term=req.term,
            cwd=req.cwd,
            extra_env=req.env,
            pipe=req.pipe,
            endpoint=endpoint.path_for(self.config, session_id) if with_endpoint else None,
            mcp=req.mcp,
        )

    async def create(
        self, identity: Identity, standing: Standing, req: m.Create, outbox: Outbox
    ) -> tuple[Session, Attachment]:
        """Start a session for ``identity``; its creator is attached with ``outbox``."""
        self._check_limits(identity)
        grants = self._grants(identity, standing, req)
        if not self._audit.available:
            raise RequestError(
                f"the audit log cannot be written now ({self._audit.failure}): "
                "no new sessions until it can",
                code=ErrorCode.AUDIT,
            )
        session_id = new_session_id()
        audit = self._audit.bind(user=identity.user, uid=identity.uid, session_id=session_id)
        account = self._identities.acquire(identity, session_id)
        try:
            plan = self._plan(session_id, req, account, grants)
        except spawn.SpawnError as exc:
            await self._identities.release(account)
            raise RequestError(str(exc), code=ErrorCode.SPAWN_FAILED) from None
        session = Session(
            session_id,
            identity,
            argv=plan.argv,
            shared=req.share,
            end_with_clients=req.pipe and not req.keep,
            rows=req.rows,
            cols=req.cols,
            config=self.config,
            audit=self._audit,
            spawner=self._spawner,
            on_end=self._ended,
            on_started=self._started,
            grants=grants,
            asys_server=self.asys_server if plan.env.get(agentconfig.ENV) else None,
        )
        # registered before it starts: the limits count it, and an agent that ends
        # at once takes it out again (list and join skip what is not alive)
        self._sessions[session_id] = session
        self._accounts[session_id] = account
        try:
            att: Attachment = await self._nursery.start(
                partial(session.run, plan, (standing, outbox))
            )
        except BaseException as exc:
            self._sessions.pop(session_id, None)
            with trio.CancelScope(shield=True):
                await self._identities.release(self._accounts.pop(session_id))
            if isinstance(exc, OSError):  # openpty, pipes, fds: the machine refused, say so
                exc = spawn.SpawnError(f"cannot start the agent: {exc.strerror or exc}")
            if not isinstance(exc, spawn.SpawnError):
                raise
            audit.note("spawn_failed", content=str(exc), metadata={"argv": list(plan.argv)})
            raise RequestError(str(exc), code=ErrorCode.SPAWN_FAILED) from None
        if plan.mcp_registered:
            from . import mcpserver  # its SDK loads in a thread while the agent starts

            self._nursery.start_soon(mcpserver.load_sdk)
        log.info("session-started", session_id=session_id, user=identity.user)
        return session, att

    def _started(self, session: Session, agent: spawn.Agent) -> None:
        """Into the ledger: if the server dies now, its successor ends this session."""
        if self._ledger is None:
            return
        try:
            self._ledger.started(
                session.id,
                {
                    "creator": session.creator.user,
                    "creator_uid": session.creator.uid,
                    "argv": list(session.argv),
                    "agent_user": agent.plan.user,
                    "agent_pid": agent.pid,
                },
            )
        except OSError as exc:
            log.error("ledger-failed", session_id=session.id, error=str(exc))

    async def _ended(self, session: Session) -> None:
        """The session is over and its processes gone: forget it, give its account back."""
        self._sessions.pop(session.id, None)
        if self._ledger is not None:
            with contextlib.suppress(OSError):
                self._ledger.ended(session.id)
        log.info("session-ended", session_id=session.id, status=str(session.exit_status))
        account = self._accounts.pop(session.id, None)
        if account is not None:
            await self._identities.release(account)
            if account.ephemeral:
                self._audit.note(
                    "identity_reset",
                    session_id=session.id,
                    content=account.user,
                    metadata={"reason": "session end"},
                )

    def reload(self, config: Config, groups: Groups, identify: Identify) -> None:
        """New limits for every session; every client's right to be attached re-checked."""
        self.config = config
        for session in self:
            session.reconfigure(config)
            for att in session.members:
                _recheck(session.members, att, groups, identify)

    def shutdown(self) -> None:
        """Tell every client the server is going, and end every agent."""
        for session in self:
            session.members.broadcast(m.Error(ErrorCode.SHUTDOWN, "the server is shutting down"))
            session.kill_all("ended: the server is shutting down")

    async def wait_all_ended(self) -> None:
        while self._sessions:
            await next(iter(self._sessions.values())).wait_ended()


def _recheck(members: Members, att: Attachment, groups: Groups, identify: Identify) -> None:
    ident = att.identity
    try:
        fresh = identify(ident.pid, ident.uid, ident.gid)
    except credentials.UnknownPeer as exc:
        members.revoke(att, str(exc))
        return
    standing = policy.admit(fresh, groups)
    if isinstance(standing, Refusal):
        members.revoke(att, f"access revoked: {standing.reason}")
    else:
        members.change_role(att, fresh, standing)

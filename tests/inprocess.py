"""The server's middle in-process: real connections, requests, sessions and PTYs.

No root, no server subprocess, no socket: each client is one end of
``trio.testing.memory_stream_pair()`` (or a lockstep pair), the other end is
served by a real :class:`aaau.connection.Connection`. Users are fake
identities the hub's ``identify`` returns; the agent runs as the current user
on a real PTY (``setsid --ctty`` makes it a session leader with that PTY as
its terminal, as the launcher does), with no setuid, PAM or cgroup.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from aaau import asys, credentials
from aaau import messages as m
from aaau.audit import AuditLog
from aaau.config import Config, IdentityMode
from aaau.connection import Connection, Hub
from aaau.identities import Identities
from aaau.policy import Groups, Identity
from aaau.pty import set_winsize
from aaau.sessions import Sessions
from aaau.spawn import Agent, SpawnError, SpawnPlan, quiet_terminal

from .helpers import AuditView, Peer

V = m.PROTOCOL_VERSION
MEMBERS_GID, ADMINS_GID, AGENT_UID = 5000, 5001, 65534

#: fake people: name -> (uid, groups)
PEOPLE = {
    "alice": (4001, {MEMBERS_GID}),
    "bob": (4002, {MEMBERS_GID}),
    "ada": (4003, {MEMBERS_GID, ADMINS_GID}),
    "eve": (4004, set()),
    "nobody": (AGENT_UID, {MEMBERS_GID, ADMINS_GID}),  # the agent user, whatever its groups
}


def identify_fake(pid: int, uid: int, gid: int, people: dict[str, Any] = PEOPLE) -> Identity:
    for name, (p_uid, groups) in people.items():
        if p_uid == uid:
            return Identity(uid=uid, gid=gid, pid=pid, user=name, groups=frozenset(groups))
    raise credentials.UnknownPeer(f"uid {uid} has no user")


#: every agent a LocalSpawner started, for :func:`reap_agents`
_STARTED: list[Agent] = []


@pytest.fixture(autouse=True)
async def reaped_agents() -> AsyncIterator[None]:
    """Kill and wait for every agent a test's in-process server left running
    (autouse in the modules that import it).

    A session cut short by the test's end leaves its agent's ``trio.Process``
    unwaited: its pidfd would be closed by the garbage collector, in whatever
    later test that happens, as a ResourceWarning (an error in this suite)."""
    yield
    while _STARTED:
        process = _STARTED.pop().process
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(10):
            await process.wait()


class LocalSpawner:
    """Runs the agent's argv as the current user on a fresh PTY."""

    def __init__(self) -> None:
        self.started: list[Agent] = []
        self.released: list[Agent] = []

    async def start(self, plan: SpawnPlan, *, rows: int, cols: int) -> Agent:
        if shutil.which(plan.argv[0], path=plan.env["PATH"]) is None:
            raise SpawnError(f"program not found: {plan.argv[0]}")
        master, slave = os.openpty()
        try:
            set_winsize(master, rows, cols)
            if plan.pipe:
                quiet_terminal(slave)
            pty = os.ttyname(slave)
            process = await trio.lowlevel.open_process(
                ["setsid", "--ctty", *plan.argv],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env={**plan.env, "HOME": "/"},
                cwd="/",
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        agent = Agent(process=process, master_fd=master, pty=pty, pid=process.pid, plan=plan)
        self.started.append(agent)
        _STARTED.append(agent)
        return agent

    async def release(self, agent: Agent) -> None:
        self.released.append(agent)


def config(**overrides: Any) -> Config:
    """Small limits and graces, so a test's worst case is short."""
    base: dict[str, Any] = {
        "agent_user": "nobody",
        "identity": IdentityMode.SHARED,
        "kill_grace": 0.3,
        "shutdown_grace": 1.0,
        "scrollback_bytes": 16 * 1024,
        "client_queue_bytes": 256 * 1024,
    }
    return Config(**{**base, **overrides})


@attrs.define
class InProcess(AuditView):
    """A server's middle with memory clients; build it with :func:`open_in_process`."""

    hub: Hub
    nursery: trio.Nursery
    audit_path: Path
    spawner: LocalSpawner
    _peers: dict[int, tuple[int, int, int]] = attrs.field(factory=dict)
    _pids: Any = attrs.field(factory=lambda: iter(range(7000, 10**6)))

    def _peer_of(self, stream: trio.abc.Stream) -> tuple[int, int, int]:
        return self._peers[id(stream)]

    async def connect(
        self,
        user: str,
        hello: m.ClientMessage | None = None,
        *,
        pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = (
            trio.testing.memory_stream_pair
        ),
    ) -> Peer:
        """A client as ``user``, its connection served in the nursery."""
        ours, theirs = pair()
        uid = PEOPLE[user][0] if user in PEOPLE else 9999
        self._peers[id(theirs)] = (next(self._pids), uid, uid)
        self.nursery.start_soon(Connection(theirs, self.hub).serve)
        peer = Peer(ours)
        if hello is not None:
            await peer.send(hello)
        return peer

    async def create(self, user: str, argv: tuple[str, ...], **kw: Any) -> tuple[Peer, m.Welcome]:
        peer = await self.connect(
            user, m.Create(V, rows=24, cols=80, term="xterm", argv=argv, **kw)
        )
        reply = await peer.expect(m.Welcome | m.Error)
        assert isinstance(reply, m.Welcome), reply
        return peer, reply

    async def join(
        self, user: str, session_id: str, role: m.Role | None = None, **kw: Any
    ) -> tuple[Peer, m.ServerMessage]:
        peer = await self.connect(user, m.Join(V, session_id, role), **kw)
        return peer, await peer.expect(m.Welcome | m.Error)


def open_in_process(tmp_path: Path, nursery: trio.Nursery, **overrides: Any) -> InProcess:
    cfg = config(**overrides)
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(audit_path))
    spawner = LocalSpawner()
    sessions = Sessions(cfg, audit, nursery, Identities(cfg), spawner=spawner)
    groups = Groups(agent_uids=frozenset({AGENT_UID}), human_gid=MEMBERS_GID, admin_gid=ADMINS_GID)
    hub = Hub(cfg, groups, audit, sessions, asys.ServerScope(cfg, audit, nursery))
    ip = InProcess(hub, nursery, audit_path, spawner)
    nursery.start_soon(audit.release_when_held)  # the server's keep() without the retries
    hub.identify = identify_fake
    hub.peer_of = ip._peer_of
    return ip

"""Helpers shared by the tests: test accounts, real peers, the server process, waiting.

Imported explicitly (``from .helpers import ...``); fixtures live in conftest.py.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from aaau import codec
from aaau import messages as m
from aaau.framing import FramedStream
from aaau.protocol import Kind, data_frame

PY = sys.executable
PREFIX = "aaut"
AGENT = f"{PREFIX}-agent"
GROUP = f"{PREFIX}-users"
ADMIN_GROUP = f"{PREFIX}-admins"
ALICE = f"{PREFIX}-alice"  # member
BOB = f"{PREFIX}-bob"  # member
EVE = f"{PREFIX}-eve"  # not a member
ADA = f"{PREFIX}-ada"  # admin (and member)
ADLER = f"{PREFIX}-adler"  # admin only: reaches the socket through its ACL
USERS = {ALICE: [GROUP], BOB: [GROUP], EVE: [], ADA: [GROUP, ADMIN_GROUP], ADLER: [ADMIN_GROUP]}

#: tests that need euid 0 (real users, setuid, chown); skipped otherwise (see conftest)
root = pytest.mark.root


#: pool users AGENT-01 ... AGENT-06 (one per member, or per session)
POOL_SIZE = 6
POOL = [f"{AGENT}-{n:02d}" for n in range(1, POOL_SIZE + 1)]
#: the agent homes' parent, and the PAM service: the tests' own, never the real ones
HOMES = Path(f"/var/lib/{PREFIX}")
PAM_SERVICE = PREFIX
CGROUP_BASE = PREFIX
NAMES = [
    "--agent-user",
    AGENT,
    "--agents",
    str(POOL_SIZE),
    "--group",
    GROUP,
    "--admin-group",
    ADMIN_GROUP,
    "--pam-service",
    PAM_SERVICE,
]


def init_argv(base_dir: Path, sysconf: str = "etc") -> list[str]:
    """``aaau-server init`` for the test accounts."""
    return [
        PY,
        "-m",
        "aaau",
        "server",
        "init",
        *NAMES,
        "--socket",
        str(base_dir / "init-run" / "aaau.sock"),
        "--log-dir",
        str(base_dir / "init-log"),
        "--home",
        str(HOMES / AGENT),
        "--sysconf-dir",
        str(base_dir / sysconf),
        "--share-dir",
        str(base_dir / "share"),
    ]


async def start_daemon(sock: Path, log_dir: Path) -> int:
    """``aaau-server run --daemon`` for the test accounts: the pid, from its pid file."""
    result = await trio.run_process(server_argv(sock, log_dir, "--daemon"), cwd="/", check=False)
    assert result.returncode == 0
    return int((sock.parent / "aaau-server.pid").read_text())


def server_env() -> dict[str, str]:
    """The environment test servers start with (a secret the agent must never see)."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "AAAU_TEST_SECRET": "server-secret-must-not-leak",
    }


def server_argv(sock: Path | str, log_dir: Path | str, *extra: str) -> list[str]:
    """``aaau-server run`` for the test accounts; every test server shares one state dir."""
    return [
        PY,
        "-m",
        "aaau",
        "server",
        "run",
        *NAMES,
        "--socket",
        str(sock),
        "--log-dir",
        str(log_dir),
        "--state-dir",
        str(Path(log_dir).parent / "state"),
        "--cgroup-base",
        CGROUP_BASE,
        *extra,
    ]


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def account(name: str) -> tuple[int, int, list[int]]:
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid, os.getgrouplist(name, pw.pw_gid)


def gid_of(name: str) -> int:
    return grp.getgrnam(name).gr_gid


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not (value := predicate()):
            await trio.sleep(0.02)
    return value


# --- clients that are real peers ------------------------------------------------------------

_CONNECT = r"""
import socket, sys
path, fd = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(path)
except OSError as e:
    socket.socket(fileno=fd).sendall(("ERR " + str(e)).encode())
    sys.exit(0)
socket.send_fds(socket.socket(fileno=fd), [b"OK"], [s.fileno()])
"""


async def connect_as(
    user: str, path: str, extra_groups: list[int] | None = None
) -> trio.SocketStream:
    """A connection to ``path`` made by a process running as ``user``.

    ``extra_groups`` replaces the process's supplementary groups (to model a
    login session whose groups are older than the user database).
    """
    uid, gid, groups = account(user)
    ours, theirs = socket.socketpair()
    try:
        await trio.run_process(
            [PY, "-I", "-c", _CONNECT, path, str(theirs.fileno())],
            user=uid,
            group=gid,
            extra_groups=groups if extra_groups is None else extra_groups,
            pass_fds=(theirs.fileno(),),
            cwd="/",
            env={},
        )
        theirs.close()
        msg, fds, _, _ = socket.recv_fds(ours, 1024, 1)
    finally:
        ours.close()
        theirs.close()
    if not fds:
        raise ConnectionRefusedError(msg.decode())
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fds[0]))
    return trio.SocketStream(sock)


class Peer:
    """A test client speaking the protocol over any Trio stream (socket or memory)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.framed = FramedStream(stream, 1 << 26)
        self.output = bytearray()
        self.controls: list[m.ServerMessage] = []
        self.closed = False

    @property
    def stream(self) -> trio.abc.Stream:
        return self.framed.stream

    async def send(self, message: m.ClientMessage) -> None:
        await self.framed.send(message)

    async def type(self, data: bytes) -> None:
        await self.framed.send_frame(data_frame(data))

    async def _pump(self) -> None:
        frame = await self.framed.next_frame()
        if frame is None:
            self.closed = True
        elif frame.kind is Kind.DATA:
            self.output += frame.payload
        else:
            self.controls.append(codec.decode_server(frame.payload))

    async def until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Read until ``predicate()`` holds (or fail after ``timeout``)."""
        with trio.fail_after(timeout):
            while not (value := predicate()):
                if self.closed:
                    raise AssertionError(
                        f"connection closed; controls={self.controls!r}, "
                        f"output tail={bytes(self.output[-300:])!r}"
                    )
                await self._pump()
        return value

    async def expect(self, cls: type, timeout: float = 10.0) -> Any:
        def found() -> Any:
            for i, msg in enumerate(self.controls):
                if isinstance(msg, cls):
                    return self.controls.pop(i)
            return None

        return await self.until(found, timeout)

    async def expect_output(self, needle: bytes, timeout: float = 10.0) -> None:
        """Read until ``needle`` is in the output (searching only what is new each time)."""
        start = 0

        def found() -> bool:
            nonlocal start
            if self.output.find(needle, start) >= 0:
                return True
            start = max(0, len(self.output) - len(needle) + 1)
            return False

        await self.until(found, timeout)

    async def until_closed(self, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while not self.closed:
                await self._pump()

    async def aclose(self) -> None:
        await self.stream.aclose()


def read_audit(path: Path) -> list[dict[str, Any]]:
    """The records of an audit file, less the hash chain's own (``audit_chain``).

    Only whole lines: the server may be in the middle of writing the last one
    (a large output record is more than one page; a reader can see part of it).
    """
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    records = [json.loads(line) for line in whole.splitlines()]
    return [r for r in records if r["command_type"] != "audit_chain"]


class AuditView:
    """Reading a server's audit log; the class says where it is (``audit_path``)."""

    audit_path: Path

    def audit(self) -> list[dict[str, Any]]:
        return read_audit(self.audit_path)

    def records(self, command_type: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.audit()
            if r["command_type"] == command_type and all(r.get(k) == v for k, v in match.items())
        ]


class ServerProc(AuditView):
    def __init__(self, process: trio.Process, socket_path: Path, log_dir: Path) -> None:
        self.process = process
        self.socket = socket_path
        self.log_dir = log_dir
        self.peers: list[Peer] = []
        self.audit_path = log_dir / "audit.jsonl"

    def agent_user(self, session_id: str) -> str:
        """The agent user a session runs as (from its ``session_start`` record)."""
        (start,) = self.records("session_start", session_id=session_id)
        return str(start["metadata"]["agent_user"])

    def bound_agent(self, member: str) -> str:
        """The pool user bound to ``member`` (from the server's state file)."""
        state = json.loads((self.log_dir.parent / "state" / "identities.json").read_text())
        return str(state["members"][str(account(member)[0])])

    async def peer(self, user: str, hello: m.ClientMessage | None = None, **kw: Any) -> Peer:
        peer = Peer(await connect_as(user, str(self.socket), **kw))
        self.peers.append(peer)
        if hello is not None:
            await peer.send(hello)
        return peer

    async def create(
        self, user: str, argv: tuple[str, ...] | None, **kw: Any
    ) -> tuple[Peer, m.Welcome]:
        peer = await self.peer(
            user, m.Create(m.PROTOCOL_VERSION, rows=24, cols=80, term="xterm", argv=argv, **kw)
        )
        welcome = await peer.until(
            lambda: next((c for c in peer.controls if isinstance(c, m.Welcome | m.Error)), None)
        )
        peer.controls.remove(welcome)
        assert isinstance(welcome, m.Welcome), welcome
        return peer, welcome

    async def join(
        self, user: str, session_id: str, role: m.Role | None = None
    ) -> tuple[Peer, m.ServerMessage]:
        peer = await self.peer(user, m.Join(m.PROTOCOL_VERSION, session_id, role))
        reply = await peer.until(
            lambda: next((c for c in peer.controls if isinstance(c, m.Welcome | m.Error)), None)
        )
        peer.controls.remove(reply)
        return peer, reply


ServerFactory = Callable[..., Awaitable[ServerProc]]


async def run_cli(
    user: str,
    args: list[str],
    sock: Path | str,
    *,
    stdin: bytes = b"",
    timeout: float = 30,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``aaau`` client as ``user`` with piped stdin (and ``env`` added)."""
    kwargs = as_client(user, sock)
    kwargs["env"] = {**kwargs["env"], **(env or {})}
    with trio.fail_after(timeout):
        return await trio.run_process(
            [PY, "-m", "aaau", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            **kwargs,
        )


def as_client(user: str, sock: Path | str) -> dict[str, Any]:
    """run_process arguments that run the ``aaau`` client as ``user`` against ``sock``."""
    uid, gid, groups = account(user)
    return {
        "user": uid,
        "group": gid,
        "extra_groups": groups,
        "cwd": "/",
        "env": {"AAAU_SOCKET": str(sock), "PATH": "/usr/bin:/bin", "TERM": "xterm"},
    }

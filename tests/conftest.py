"""Shared fixtures: real users, a real server subprocess, clients that are real peers.

Testing rules for this suite:
- Root-only tests (marked ``root``) create real users and groups with the
  ``aaut`` prefix, run ``aaau-server init`` for them, start the real server as
  a subprocess and connect as those users: a helper process drops to the
  user's uid, connects, and hands the connected socket back (SCM_RIGHTS), so
  SO_PEERCRED on the server sees that user.
- No sleeps as synchronisation: ``wait_for`` polls a condition under a deadline.
- Every async test has an absolute bound through ``fail_after``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from aaau import codec
from aaau import messages as m
from aaau.protocol import FrameDecoder, Kind, data_frame

PY = sys.executable
PREFIX = "aaut"
AGENT = f"{PREFIX}-agent"
GROUP = f"{PREFIX}-users"
ADMIN_GROUP = f"{PREFIX}-admins"
ALICE = f"{PREFIX}-alice"  # member
BOB = f"{PREFIX}-bob"  # member
EVE = f"{PREFIX}-eve"  # not a member
ADA = f"{PREFIX}-ada"  # admin (and member, to reach the socket)
USERS = {ALICE: [GROUP], BOB: [GROUP], EVE: [], ADA: [GROUP, ADMIN_GROUP]}

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real users, setuid, chown")


NAMES = ["--agent-user", AGENT, "--group", GROUP, "--admin-group", ADMIN_GROUP]


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
        f"/var/lib/{AGENT}",
        "--sysconf-dir",
        str(base_dir / sysconf),
    ]


def server_argv(sock: Path | str, log_dir: Path | str, *extra: str) -> list[str]:
    """``aaau-server run`` for the test accounts."""
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
        *extra,
    ]


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="session")
def base_dir() -> Iterator[Path]:
    """A scratch directory every test user can traverse (tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="aaau-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def accounts(base_dir: Path) -> dict[str, Any]:
    """The test agent user and groups (via the real init), and the human test users."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    result = subprocess.run(
        init_argv(base_dir), capture_output=True, text=True, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr
    for user, groups in USERS.items():
        try:
            pwd.getpwnam(user)
        except KeyError:
            _run(["useradd", "--no-create-home", "--shell", "/bin/sh", user])
        _run(["usermod", "-G", ",".join(groups), user] if groups else ["usermod", "-G", "", user])
    return {"init_output": result.stdout}


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
    """A test client speaking the protocol over a real connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(1 << 26)
        self.output = bytearray()
        self.controls: list[m.ServerMessage] = []
        self.closed = False

    async def send(self, message: m.ClientMessage) -> None:
        await self.stream.send_all(codec.encode(message))

    async def type(self, data: bytes) -> None:
        await self.stream.send_all(data_frame(data))

    async def _pump(self) -> None:
        try:
            data = await self.stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.closed = True
            return
        self.decoder.receive_data(data)
        for frame in self.decoder.frames():
            if frame.kind is Kind.DATA:
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


# --- the server -------------------------------------------------------------------------------


class ServerProc:
    def __init__(self, process: trio.Process, socket_path: Path, log_dir: Path) -> None:
        self.process = process
        self.socket = socket_path
        self.log_dir = log_dir
        self.peers: list[Peer] = []

    @property
    def audit_path(self) -> Path:
        return self.log_dir / "audit.jsonl"

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def records(self, command_type: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.audit()
            if r["command_type"] == command_type and all(r.get(k) == v for k, v in match.items())
        ]

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

_counter = iter(range(10**6))


@pytest.fixture
async def start_server(
    accounts: dict[str, Any], base_dir: Path, nursery: trio.Nursery
) -> AsyncIterator[ServerFactory]:
    """Start real servers (subprocesses); all are stopped with SIGTERM at the end."""
    started: list[ServerProc] = []

    async def start(
        *args: str,
        env: dict[str, str] | None = None,
        expect_ready: bool = True,
        socket_path: Path | None = None,
    ) -> ServerProc:
        n = next(_counter)
        log_dir = base_dir / f"log-{n}"
        sock = socket_path or base_dir / f"run-{n}" / "aaau.sock"
        r, w = os.pipe()
        log_dir.mkdir(mode=0o750, exist_ok=True)
        stderr_path = log_dir / "server.stderr"
        stderr_file = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        argv = server_argv(sock, log_dir, "--ready-fd", str(w), "--kill-grace", "0.5", *args)
        process = await nursery.start(
            lambda task_status: trio.run_process(
                argv,
                pass_fds=(w,),
                cwd="/",
                check=False,
                env=env or _server_env(),
                task_status=task_status,
                stderr=stderr_file,
            )
        )
        os.close(w)
        os.close(stderr_file)
        ready = trio.lowlevel.FdStream(r)
        with trio.fail_after(20):
            line = await ready.receive_some(64)
        await ready.aclose()
        srv = ServerProc(process, sock, log_dir)
        started.append(srv)
        if expect_ready:
            assert line.startswith(b"READY"), (
                f"server did not start: {process.returncode}: {stderr_path.read_text()[-2000:]}"
            )
        return srv

    try:
        yield start
    finally:
        for srv in started:
            for peer in srv.peers:
                await peer.aclose()
            if srv.process.returncode is None:
                srv.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(15):
            for srv in started:
                await srv.process.wait()


def _server_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "AAAU_TEST_SECRET": "server-secret-must-not-leak",
    }


@pytest.fixture
async def server(start_server: ServerFactory) -> ServerProc:
    return await start_server()


async def run_cli(
    user: str, args: list[str], sock: Path | str, *, stdin: bytes = b"", timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``aaau`` client as ``user`` with piped stdin."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [PY, "-m", "aaau", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            **as_client(user, sock),
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

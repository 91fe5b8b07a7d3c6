"""The three ways to run a workload: a raw PTY, tmux with attached clients, and aaau.

Every runner starts the same command on a fresh PTY, waits for ``go`` on its
input (so start-up is not timed), then times until every reader has seen
everything. Runs as root: aaau needs its agent user, and clients here are root
(Admin) connections in this process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.lowlevel

from aaau import codec
from aaau import messages as m
from aaau.cgroups import Hierarchies
from aaau.framing import FramedStream
from aaau.protocol import Kind, data_frame

PY = sys.executable
AGENT, GROUP, ADMIN_GROUP = "aaub-agent", "aaub-users", "aaub-admins"
NAMES = ["--agent-user", AGENT, "--group", GROUP, "--admin-group", ADMIN_GROUP]
#: the benchmark's own pool, homes and PAM service; remove_accounts() takes them away
POOL = [f"{AGENT}-{n:02d}" for n in range(1, 5)]
HOMES = Path("/var/lib/aaub")
PAM_SERVICE = "aaub"
#: what this build understands beyond a baseline build's options (earlier ones lack them)
NEW_INIT = ["--agents", str(len(POOL)), "--pam-service", PAM_SERVICE]


MARK = b"AAAU-BENCH-READY"
#: the measured output starts after this (a joiner's redrawn screen is not counted)
GO = b"AAAU-BENCH-GO"
#: pause between keystrokes when measuring "typing" (back to back, every CPU
#: stays hot; with a pause, each hop may pay a wake-up from idle)
TYPING_GAP = 0.005


def seq_command(lines: int) -> list[str]:
    """The throughput workload: quiet terminal, say ready, wait for a line, then print."""
    return [
        "sh",
        "-c",
        f"stty -echo; echo {MARK.decode()}; read go; echo {GO.decode()}; exec seq 1 {lines}",
    ]


def echo_command() -> list[str]:
    return ["sh", "-c", f"stty raw -echo; echo {MARK.decode()}; echo {GO.decode()}; exec cat"]


@attrs.define
class Reader:
    """What one reader saw after the workload said it was ready."""

    bytes: int = 0
    tail: bytes = b""
    done_at: float | None = None
    armed: bool = False  # the workload said it is ready (MARK)
    counting: bool = False  # the measured output has begun (GO)
    _prefix: bytes = b""

    @property
    def echo_ready(self) -> bool:
        """The echo workload's preamble is all in: the next byte is an echo."""
        return self.counting and self.tail.endswith(b"\n")

    def take(self, data: bytes) -> None:
        if not self.counting:
            self._prefix += data
            self.armed = self.armed or MARK in self._prefix
            at = self._prefix.find(GO)
            if at < 0:
                return
            self.armed = self.counting = True
            data, self._prefix = self._prefix[at + len(GO) :], b""
        self.bytes += len(data)
        self.tail = (self.tail + data[-64:])[-64:]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- raw PTY -------------------------------------------------------------------------------------


async def raw_throughput(lines: int) -> tuple[float, Reader]:
    master, slave = os.openpty()
    proc = subprocess.Popen(
        seq_command(lines), stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    reader = Reader()
    while not reader.armed:
        reader.take(await stream.receive_some(65536))
    await stream.send_all(b"go\n")
    start = time.perf_counter()
    try:
        while data := await stream.receive_some(65536):
            reader.take(data)
    except trio.BrokenResourceError:
        pass
    elapsed = time.perf_counter() - start
    await stream.aclose()
    proc.wait()
    return elapsed, reader


async def raw_echo(samples: int, gap: float) -> list[float]:
    master, slave = os.openpty()
    proc = subprocess.Popen(
        echo_command(), stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    reader = Reader()
    while not reader.echo_ready:
        reader.take(await stream.receive_some(4096))
    out = []
    for i in range(samples):
        await trio.sleep(gap)
        key = bytes([97 + i % 26])
        start = time.perf_counter()
        await stream.send_all(key)
        got = b""
        while key not in got:
            got += await stream.receive_some(4096)
        out.append(time.perf_counter() - start)
    proc.kill()
    proc.wait()
    await stream.aclose()
    return out


# --- tmux -------------------------------------------------------------------------------------------


def tmux_available() -> bool:
    return shutil.which("tmux") is not None


class Tmux:
    def __init__(self) -> None:
        # a socket path in a directory of our own: tmux leaves its socket file behind
        self._dir = tempfile.TemporaryDirectory(prefix="aaau-bench-tmux-")
        self.sock = os.path.join(self._dir.name, "tmux.sock")

    def cmd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", self.sock, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            check=False,
        )

    def kill(self) -> None:
        self.cmd("kill-server")
        self._dir.cleanup()

    def new_session(self, command: str) -> None:
        """Session ``b``, 200x50, running ``command``, with no status line to redraw."""
        self.cmd(
            "new-session",
            "-d",
            "-s",
            "b",
            "-x",
            "200",
            "-y",
            "50",
            command,
            ";",
            "set-option",
            "-g",
            "status",
            "off",
        )


async def _tmux_client(
    tmux: Tmux, reader: Reader, started: trio.Event, stream_out: list[Any]
) -> None:
    master, slave = os.openpty()
    os.set_blocking(master, False)
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(
        ["tmux", "-S", tmux.sock, "-f", "/dev/null", "attach", "-t", "b"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        env={"TERM": "xterm-256color", "PATH": os.environ["PATH"]},
    )
    os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    stream_out.append(stream)
    started.set()
    try:
        while data := await stream.receive_some(65536):
            reader.take(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    reader.done_at = time.perf_counter()
    proc.wait()
    await stream.aclose()


async def tmux_throughput(lines: int, clients: int) -> tuple[float, list[Reader]]:
    tmux = Tmux()
    tmux.new_session(shlex.join(seq_command(lines)))
    readers = [Reader() for _ in range(clients)]
    try:
        async with trio.open_nursery() as nursery:
            streams: list[Any] = []
            for reader in readers:
                started = trio.Event()
                nursery.start_soon(_tmux_client, tmux, reader, started, streams)
                await started.wait()
            await _wait_tmux_clients(tmux, clients)
            await _wait_tmux_mark(tmux)
            start = time.perf_counter()
            tmux.cmd("send-keys", "-t", "b", "go", "Enter")
        elapsed = max(r.done_at or 0 for r in readers) - start
    finally:
        tmux.kill()
    return elapsed, readers


async def _wait_tmux_clients(tmux: Tmux, n: int) -> None:
    with trio.fail_after(20):
        while len(tmux.cmd("list-clients").stdout.splitlines()) < n:
            await trio.sleep(0.02)


# letters tmux never sends in its own escape sequences (the status line is off)
_TMUX_SAFE_KEYS = [bytes([c]) for c in b"abefgijknopsuvwxyz"]


async def _wait_tmux_mark(tmux: Tmux) -> None:
    with trio.fail_after(20):
        while MARK.decode() not in tmux.cmd("capture-pane", "-p", "-t", "b").stdout:
            await trio.sleep(0.02)


async def tmux_echo(samples: int, gap: float) -> list[float]:
    tmux = Tmux()
    tmux.new_session(shlex.join(echo_command()))
    reader = Reader()
    out = []
    try:
        async with trio.open_nursery() as nursery:
            streams: list[Any] = []
            started = trio.Event()
            nursery.start_soon(_tmux_client, tmux, reader, started, streams)
            await started.wait()
            await _wait_tmux_clients(tmux, 1)
            await _wait_tmux_mark(tmux)
            stream = streams[0]
            with trio.fail_after(10):
                while not reader.counting:
                    await trio.sleep(0.01)
            for i in range(samples):
                await trio.sleep(gap)
                key = _TMUX_SAFE_KEYS[i % len(_TMUX_SAFE_KEYS)]
                before = reader.bytes
                start = time.perf_counter()
                await stream.send_all(key)
                while key not in reader.tail[len(reader.tail) - (reader.bytes - before) :]:
                    await trio.lowlevel.checkpoint()
                out.append(time.perf_counter() - start)
            tmux.kill()
    finally:
        tmux.kill()
    return out


# --- aaau ----------------------------------------------------------------------------------------------


class AaauServer:
    def __init__(
        self, base: Path, process: subprocess.Popen[bytes], sock: Path, log_dir: Path
    ) -> None:
        self.base, self.process, self.sock, self.log_dir = base, process, sock, log_dir

    @property
    def pid(self) -> int:
        return self.process.pid


@functools.cache
def _knows(python: str, setting: str) -> bool:
    """Does the aaau that ``python`` runs (this one, or a baseline build) have ``setting``?"""
    probe = f"import attrs, aaau.config as c; print({setting!r} in attrs.fields_dict(c.Config))"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd="/")
    return out.stdout.strip() == "True"


def _init_knows(python: str, option: str) -> bool:
    """Does the ``aaau-server init`` that ``python`` runs take ``option`` (a Layout field)?"""
    probe = (
        "import aaau.provision as p, attrs; "
        f"print({option.lstrip('-').replace('-', '_')!r} in attrs.fields_dict(p.Layout))"
    )
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd="/")
    return out.stdout.strip() == "True"


def _limits_file(base: Path) -> str:
    """Room for the scale scenario: 600 connections, all the benchmark's own (uid 0)."""
    path = base / "limits.toml"
    path.write_text("connections_per_user = 4096\nhellos_per_user = 1024\n")
    return str(path)


def prepare_accounts(base: Path, python: str = PY) -> None:
    subprocess.run(
        [
            python,
            "-m",
            "aaau",
            "server",
            "init",
            *NAMES,
            "--socket",
            str(base / "init" / "s.sock"),
            "--log-dir",
            str(base / "init-log"),
            "--home",
            str(HOMES / AGENT),
            "--sysconf-dir",
            str(base / "etc"),
            *(NEW_INIT if _knows(python, "cgroup_base") else []),
            # completions and man pages: into the run's own directory, never /usr/local/share
            *(["--share-dir", str(base / "share")] if _init_knows(python, "--share-dir") else []),
        ],
        check=True,
        capture_output=True,
        cwd="/",
    )


@asynccontextmanager
async def aaau_server(*extra: str, python: str = PY) -> AsyncIterator[AaauServer]:
    """A real server; ``python`` picks the installation (another one: a baseline build)."""
    base = Path(tempfile.mkdtemp(prefix="aaau-bench-", dir="/tmp"))
    base.chmod(0o755)
    prepare_accounts(base, python)
    sock, log_dir = base / "run" / "aaau.sock", base / "log"
    asys_dir = Path("/run") / f"{base.name}-asys"  # not under /tmp: agents have their own
    r, w = os.pipe()
    process = subprocess.Popen(
        [
            python,
            "-m",
            "aaau",
            "server",
            "run",
            *NAMES,
            "--socket",
            str(sock),
            "--log-dir",
            str(log_dir),
            "--ready-fd",
            str(w),
            "--max-sessions",
            "1000",
            "--sessions-per-user",
            "1000",
            "--clients-per-session",
            "100",
            *(
                [
                    "--pam-service",
                    PAM_SERVICE,
                    "--state-dir",
                    str(base / "state"),
                    "--cgroup-base",
                    base.name,  # each server its own: two never share one
                ]
                if _knows(python, "cgroup_base")
                else []
            ),
            *(["--config", _limits_file(base)] if _knows(python, "connections_per_user") else []),
            *(["--asys-dir", str(asys_dir)] if _knows(python, "asys_dir") else []),
            *extra,
        ],
        pass_fds=(w,),
        cwd="/",
        stderr=open(base / "stderr", "wb"),  # noqa: SIM115
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        if not ready.readline().startswith(b"READY"):
            raise RuntimeError("aaau server did not start: " + (base / "stderr").read_text())
    try:
        yield AaauServer(base, process, sock, log_dir)
    finally:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # never leave a server, its files or cgroups behind
            process.kill()
            process.wait()
        finally:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(asys_dir, ignore_errors=True)
            _remove_cgroup_base(base.name)


def _remove_cgroup_base(pattern: str) -> None:
    """The cgroup bases matching ``pattern`` in every hierarchy, with the sessions'
    cgroups a killed server left in them (rmdir takes only cgroups without processes)."""
    where = Hierarchies.discover()
    for mount in [where.v2, *where.v1.values()]:
        for base in mount.glob(pattern) if mount is not None else ():
            inner = [d for d in base.rglob("*") if d.is_dir()]
            for cgroup in [*sorted(inner, key=lambda d: len(d.parts), reverse=True), base]:
                with contextlib.suppress(OSError):
                    cgroup.rmdir()


def sweep_leftovers() -> None:
    """What a killed run left behind: its servers' directories and cgroups. Only
    root's own directories go: in /tmp anyone can plant a name (or a link) like ours."""
    for where in (Path("/tmp"), Path("/run")):
        for leftover in where.glob("aaau-bench-*"):
            with contextlib.suppress(OSError):
                st = leftover.lstat()
                if stat.S_ISDIR(st.st_mode) and st.st_uid == 0:
                    shutil.rmtree(leftover, ignore_errors=True)
    _remove_cgroup_base("aaau-bench-*")


def _accounts(database: str) -> list[str]:
    """Names in the passwd or group database that the benchmark's prefix marks as its own."""
    out = subprocess.run(["getent", database], capture_output=True, text=True, check=False)
    return [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("aaub-")]


def remove_accounts() -> None:
    """Every user, group, home and PAM file the benchmark brought (a baseline build's too:
    an older ``init`` made 32 pool users, so every ``aaub-`` account goes)."""
    users = sorted({AGENT, *POOL, *_accounts("passwd")})
    for user in users:
        subprocess.run(["pkill", "-KILL", "-u", user], capture_output=True, check=False)
    for user in users:
        subprocess.run(["userdel", "--force", user], capture_output=True, check=False)
    for group in sorted({GROUP, ADMIN_GROUP, *users, *_accounts("group")}):
        subprocess.run(["groupdel", group], capture_output=True, check=False)
    shutil.rmtree(HOMES, ignore_errors=True)
    Path(f"/etc/pam.d/{PAM_SERVICE}").unlink(missing_ok=True)



class Client:
    """A minimal aaau client for measuring: counts DATA bytes, notes Exited."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.framed = FramedStream(stream, 1 << 26, receive_size=1 << 18)
        self.reader = Reader()
        self.welcome: m.Welcome | None = None
        self.exited: m.Exited | None = None
        self.error: m.Error | None = None

    @classmethod
    async def connect(cls, server: AaauServer, hello: m.ClientMessage) -> Client:
        client = cls(await trio.open_unix_socket(str(server.sock)))
        await client.framed.send(hello)
        while client.welcome is None:
            await client.pump()
            if client.error is not None:
                raise RuntimeError(client.error.message)
        return client

    async def pump(self) -> bool:
        frame = await self.framed.next_frame()
        if frame is None:
            self.reader.done_at = self.reader.done_at or time.perf_counter()
            return False
        if frame.kind is Kind.DATA:
            self.reader.take(frame.payload)
            return True
        msg = codec.decode_server(frame.payload)
        if isinstance(msg, m.Welcome):
            self.welcome = msg
        elif isinstance(msg, m.Exited):
            self.exited = msg
            self.reader.done_at = time.perf_counter()
        elif isinstance(msg, m.Error):
            self.error = msg
        return True

    async def drain(self) -> None:
        while self.exited is None and await self.pump():
            pass

    async def type(self, data: bytes) -> None:
        await self.framed.send_frame(data_frame(data))

    async def aclose(self) -> None:
        await self.framed.aclose()


def create(argv: list[str]) -> m.Create:
    return m.Create(m.PROTOCOL_VERSION, rows=50, cols=200, term="xterm", argv=tuple(argv))


def join(session_id: str) -> m.Join:
    return m.Join(m.PROTOCOL_VERSION, session_id)


async def aaau_throughput(
    server: AaauServer, lines: int, observers: int, stalled: int = 0
) -> tuple[float, list[Reader]]:
    """``observers`` reading clients (the creator is the first), plus ``stalled`` that never read."""
    creator = await Client.connect(server, create(seq_command(lines)))
    assert creator.welcome is not None
    sid = creator.welcome.session_id
    clients = [creator] + [await Client.connect(server, join(sid)) for _ in range(observers - 1)]
    idle = [await Client.connect(server, join(sid)) for _ in range(stalled)]
    with trio.fail_after(20):
        for client in clients:
            while not client.reader.armed:
                await client.pump()
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.drain)
        await creator.type(b"go\n")
        start = time.perf_counter()
    elapsed = max(c.reader.done_at or 0 for c in clients) - start
    for client in clients + idle:
        await client.aclose()
    return elapsed, [c.reader for c in clients]


async def aaau_echo(server: AaauServer, samples: int, gap: float) -> list[float]:
    client = await Client.connect(server, create(echo_command()))
    with trio.fail_after(10):
        while not client.reader.echo_ready:
            await client.pump()
    out = []
    for i in range(samples):
        await trio.sleep(gap)
        key = bytes([97 + i % 26])
        before = client.reader.bytes
        start = time.perf_counter()
        await client.type(key)
        while client.reader.bytes == before:
            await client.pump()
        out.append(time.perf_counter() - start)
    await client.aclose()
    return out

"""No member and no fault takes the server down; root follows no path it did not make.

Root, real users, the real server: paths planted by a member, a disk a member
fills, fd exhaustion, half-sent hellos, kill -9 and restart, a reload before
the hello, and hostile JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from aaau import chain
from aaau import messages as m
from aaau.protocol import Kind, encode_frame

from .helpers import (
    ADA,
    ALICE,
    BOB,
    GROUP,
    ServerFactory,
    ServerProc,
    account,
    read_audit,
    root,
    server_argv,
    wait_for,
)

pytestmark = root
V = m.PROTOCOL_VERSION


def as_user(user: str, argv: list[str]) -> None:
    """Run ``argv`` as ``user`` (what a member can do on their own)."""
    uid, gid, groups = account(user)
    subprocess.run(
        argv, user=uid, group=gid, extra_groups=groups, check=True, cwd="/", capture_output=True
    )


async def refused_start(base: Path, sock: Path, log_dir: Path) -> str:
    """Start a server that must refuse; its one line on stderr."""
    result = await trio.run_process(
        server_argv(sock, log_dir), capture_stderr=True, check=False, cwd="/"
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def shared_dir(base_dir: Path) -> Path:
    """A world-writable sticky directory, like /tmp (base_dir goes at the end)."""
    path = base_dir / f"shared-{os.urandom(3).hex()}"
    path.mkdir()
    path.chmod(0o1777)
    return path


# --- paths --------------------------------------------------------------------------------


async def test_a_socket_directory_a_member_made_first_is_refused(
    accounts: object, shared_dir: Path, base_dir: Path
) -> None:
    as_user(BOB, ["mkdir", "-m", "0777", str(shared_dir / "run")])
    line = await refused_start(base_dir, shared_dir / "run" / "aaau.sock", base_dir / "log-p1")
    assert f"{shared_dir}/run is owned by uid {account(BOB)[0]}, not root" in line
    assert not (shared_dir / "run" / "aaau.sock.lock").exists()


async def test_a_socket_directory_anyone_can_write_is_refused(
    accounts: object, shared_dir: Path, base_dir: Path
) -> None:
    line = await refused_start(base_dir, shared_dir / "aaau.sock", base_dir / "log-p2")
    assert f"{shared_dir} is writable by group or others (mode 1777)" in line
    assert list(shared_dir.iterdir()) == []  # not even a lock file


async def test_planted_links_for_the_lock_and_the_audit_log_are_refused(
    accounts: object, base_dir: Path
) -> None:
    run, logs = base_dir / "run-p3", base_dir / "log-p3"
    run.mkdir(mode=0o750)
    logs.mkdir(mode=0o750)
    target = base_dir / "victim"
    (run / "aaau.sock.lock").symlink_to(target)
    line = await refused_start(base_dir, run / "aaau.sock", logs)
    assert "aaau.sock.lock is a symbolic link" in line and not target.exists()
    (run / "aaau.sock.lock").unlink()
    (logs / "audit.jsonl").unlink(missing_ok=True)  # the refused start above made it
    (logs / "audit.jsonl").symlink_to(target)
    line = await refused_start(base_dir, run / "aaau.sock", logs)
    assert "audit.jsonl is a symbolic link" in line and not target.exists()


async def test_a_log_directory_owned_by_a_member_is_refused(
    accounts: object, base_dir: Path
) -> None:
    logs = base_dir / "log-p4"
    logs.mkdir(mode=0o750)
    os.chown(logs, account(BOB)[0], -1)
    line = await refused_start(base_dir, base_dir / "run-p4" / "aaau.sock", logs)
    assert f"{logs} is owned by uid {account(BOB)[0]}" in line
    assert not (logs / "audit.jsonl").exists()


# --- the audit log's disk, full ------------------------------------------------------------


@pytest.fixture
def small_disk(base_dir: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: ``log/`` for the server, ``public/`` where members may write."""
    mount = base_dir / f"disk-{os.urandom(3).hex()}"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        (mount / "log").mkdir(mode=0o750)
        (mount / "public").mkdir()
        (mount / "public").chmod(0o1777)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


async def test_a_member_who_fills_the_logs_disk_stops_nothing_but_what_cannot_be_recorded(
    start_server: ServerFactory, small_disk: Path
) -> None:
    server = await start_server(log_dir=small_disk / "log")
    alice, welcome = await server.create(ALICE, ("cat",))
    await alice.type(b"before\n")
    await alice.expect_output(b"before\r\nbefore")
    filler = small_disk / "public" / "filler"
    with contextlib.suppress(subprocess.CalledProcessError):  # stops at ENOSPC
        as_user(BOB, ["sh", "-c", f"cat /dev/zero > {filler}"])
    # the log's last page may still hold a few records: type until it holds no more
    refused = None
    for n in range(200):
        await alice.type(f"w{n}\n".encode())
        with trio.move_on_after(0.5):
            refused = await alice.expect(m.Error)
            break
    assert refused is not None and refused.code == "audit-unavailable"
    assert "No space left on device" in refused.message
    newcomer = await server.peer(BOB)  # a connection cannot be recorded: refused at once
    assert (await newcomer.expect(m.Error)).code == "audit-unavailable"
    await alice.send(m.Ping(5))  # a recorded control message: refused too
    assert (await alice.expect(m.Error)).code == "audit-unavailable"
    assert server.process.returncode is None  # alive
    as_user(BOB, ["rm", str(filler)])  # the space comes back
    await wait_for(lambda: server.records("audit_resumed"))
    await alice.type(b"after\n")
    await alice.expect_output(b"after\r\nafter")
    typed = [r["content"] for r in server.records("input", user=ALICE)]
    assert f"w{n}\n" not in typed and f"w{n}".encode() not in alice.output  # refused: never ran
    assert all(t.strip().encode() in alice.output for t in typed)  # what ran was recorded
    lines = (small_disk / "log" / "audit.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # no cut line
    seqs = [json.loads(line)["seq"] for line in lines if '"audit_chain"' not in line]
    assert seqs == list(range(1, len(seqs) + 1))
    raw = (small_disk / "log" / "audit.jsonl").read_bytes().splitlines(keepends=True)
    assert chain.check_lines("audit.jsonl", raw).ok  # and the chain holds


# --- fds and memory --------------------------------------------------------------------------


async def test_one_member_cannot_take_the_servers_connections(
    start_server: ServerFactory,
) -> None:
    server = await start_server("--handshake-timeout", "120")  # none may expire meanwhile
    peers, refused = [], 0
    for _ in range(40):
        peer = await server.peer(BOB)  # never says hello
        peers.append(peer)
    for peer in peers:
        with trio.move_on_after(0.5):
            await peer.until(lambda p=peer: p.controls)
        refused += any(isinstance(c, m.Error) and c.code == "limit" for c in peer.controls)
    assert refused == 40 - 8  # hellos_per_user
    alice, _ = await server.create(ALICE, ("cat",))  # everyone else is served
    await alice.type(b"fine\n")
    await alice.expect_output(b"fine\r\nfine")
    (record, *_) = server.records("connection_refused", user=BOB)
    assert "hellos_per_user 8" in record["content"]


async def test_running_out_of_fds_costs_connections_not_the_server(
    start_server: ServerFactory, base_dir: Path
) -> None:
    config = base_dir / "many.toml"
    config.write_text(
        "connections_per_user = 5000\nhellos_per_user = 5000\nmax_connections = 5000\n"
        "handshake_timeout = 120.0\n"
    )
    server = await start_server(
        "--config", str(config), wrapper=("prlimit", "--nofile=1024:1024", "--")
    )
    stderr = server.log_dir / "server.stderr"
    conns: list[socket.socket] = []

    async def connect_more() -> bool:
        """One more connection (as root: no per-person cap); False once the server is full."""
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        conns.append(sock)
        while True:
            try:
                sock.connect(str(server.socket))
                return True
            except BlockingIOError:  # the listen backlog is full: the server is behind
                if "Too many open files" in stderr.read_text():
                    return False
                await trio.sleep(0.001)

    try:
        with trio.fail_after(60):
            while len(conns) < 1200 and await connect_more():
                pass
            # it really ran out: accept and the status sampler both met EMFILE, and went on
            await wait_for(lambda: stderr.read_text().count("Too many open files") >= 2, 20)
        assert server.process.returncode is None and len(conns) > 1000
    finally:
        for sock in conns:
            sock.close()
    alice, _ = await server.create(ALICE, ("cat",))
    await alice.send(m.AsysRequest(1, "SYS_STATUS"))
    assert (await alice.expect(m.AsysResult, timeout=20)).sw == "9000"
    text = stderr.read_text()  # every traceback is trio's report of an accept back-off
    assert text.count("Traceback") == text.count("accept returned EMFILE"), text[-3000:]
    assert "connection-failed" not in text and not server.records("internal_error")


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


async def test_nine_hundred_half_sent_hellos_cost_little_memory(
    start_server: ServerFactory, base_dir: Path
) -> None:
    config = base_dir / "halves.toml"
    config.write_text("connections_per_user = 2000\nhellos_per_user = 2000\n")
    server = await start_server("--config", str(config))
    before = _rss_kb(server.process.pid)
    half = struct.pack(">BI", Kind.CONTROL, 16 * 1024 - 1) + b"x" * 16000  # never finished
    conns = []
    try:
        for _ in range(900):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(server.socket))
            sock.sendall(half)
            conns.append(sock)
        await wait_for(lambda: len(server.records("connection_accepted")) >= 900, 30)
        grown = _rss_kb(server.process.pid) - before
    finally:
        for sock in conns:
            sock.close()
    assert grown < 100_000, f"{grown} KB for 900 half hellos"  # was 1.07 GB with 1 MiB frames


# --- kill -9 --------------------------------------------------------------------------------


def _pids_in(cgroup_dir: Path) -> set[int]:
    try:
        return {int(p) for p in (cgroup_dir / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


async def test_a_killed_servers_sessions_are_ended_by_the_next_one(
    start_server: ServerFactory, base_dir: Path
) -> None:
    log_dir = base_dir / "log-killed"
    first = await start_server(log_dir=log_dir)
    alice, welcome = await first.create(
        ALICE, ("sh", "-c", "trap '' HUP TERM; (trap '' HUP TERM; sleep 1001) & echo up; sleep 1002")
    )
    await alice.expect_output(b"up")
    (start,) = first.records("session_start", session_id=welcome.session_id)
    cgroup = Path(start["metadata"]["cgroup"])
    await wait_for(lambda: len(_pids_in(cgroup)) >= 2)
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    assert _pids_in(cgroup), "the agent should outlive a kill -9 (it ignores SIGHUP)"
    second = await start_server(log_dir=log_dir, socket_path=first.socket)
    assert not cgroup.exists() and not _pids_in(cgroup)
    (end,) = second.records("session_end", session_id=welcome.session_id)
    assert end["metadata"]["lost"] is True and end["metadata"]["processes_killed"] >= 2
    assert end["user"] == ALICE and end["metadata"]["argv"][0] == "sh"
    bob, _ = await second.create(BOB, ("cat",))  # and it serves


# --- who is on the other end, when --------------------------------------------------------------


async def test_a_member_removed_before_their_hello_is_refused_at_the_hello(
    server: ServerProc,
) -> None:
    bob = await server.peer(BOB)
    await wait_for(lambda: server.records("connection_accepted", user=BOB))
    subprocess.run(["gpasswd", "-d", BOB, GROUP], check=True, capture_output=True)
    try:
        server.process.send_signal(signal.SIGHUP)
        await wait_for(lambda: server.records("reload"))
        await bob.send(m.ListSessions(V))
        error = await bob.expect(m.Error)
        assert error.code == "refused" and "not a member" in error.message
    finally:
        subprocess.run(["gpasswd", "-a", BOB, GROUP], check=True, capture_output=True)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 50_000 + b"]" * 50_000,
        b'{"type":"create","version":2,"rows":1,"cols":1,"term":"x","argv":["\\ud800"]}',
    ],
)
async def test_hostile_json_is_a_clear_error_not_a_traceback(
    server: ServerProc, payload: bytes
) -> None:
    peer = await server.peer(ADA)
    await peer.framed.send_frame(encode_frame(Kind.CONTROL, payload[:16000]))
    error = await peer.expect(m.Error)
    assert error.code in ("bad-message", "too-large"), error
    assert "internal" not in error.code
    assert not server.records("internal_error")
    stderr = (server.log_dir / "server.stderr").read_text()
    assert "Traceback" not in stderr


async def test_sighup_when_the_log_cannot_be_reopened_keeps_the_open_file(
    start_server: ServerFactory, base_dir: Path
) -> None:
    log_dir = base_dir / "log-hup"
    server = await start_server(log_dir=log_dir)
    alice, _ = await server.create(ALICE, ("cat",))
    moved = base_dir / "log-hup-moved"
    log_dir.rename(moved)  # the directory is gone from where the log was
    server.process.send_signal(signal.SIGHUP)
    audit = moved / "audit.jsonl"
    failed = await wait_for(
        lambda: [r for r in read_audit(audit) if r["command_type"] == "reload_failed"]
    )
    assert "kept the open file" in failed[0]["content"]
    # the retry loop notices the file is gone from its path, says so once, and goes on
    await wait_for(lambda: "audit_reopen_failed" in audit.read_text(), 5)
    await alice.type(b"still-recorded\n")
    await alice.expect_output(b"still-recorded\r\nstill-recorded")
    assert '"content":"still-recorded\\n"' in audit.read_text()
    assert server.process.returncode is None
    kinds = [json.loads(line)["command_type"] for line in audit.read_text().splitlines()]
    assert kinds.count("audit_reopen_failed") == 1 and "audit_resumed" not in kinds

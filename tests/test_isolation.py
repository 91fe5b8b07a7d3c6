"""Members' agents against each other: every attack from the isolation review, as root.

Alice and Bob are members; each has a session. From Bob's agent (a shell the
test types into, as an attacker with the source in hand would), each attack
on Alice's session is tried and must fail, and Alice's session must not
notice. Then: a member's own two sessions, an ephemeral session, and caps.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time

import pytest
import trio

from aaau import messages as m

from .helpers import (
    ALICE,
    BOB,
    HOMES,
    Peer,
    ServerFactory,
    ServerProc,
    account,
    root,
    run_cli,
    wait_for,
)

pytestmark = root
V = m.PROTOCOL_VERSION
SHELL = ("bash", "--norc", "--noprofile", "-i")
_counter = iter(range(10**6))


async def run(peer: Peer, command: str, timeout: float = 15) -> str:
    """Type ``command`` into a shell session; its output (between markers)."""
    n = next(_counter)
    start, end = f"<<S{n}>>", f"<<E{n}>>"
    await peer.type(f"echo '{start}'; {command}; echo '{end}'\n".encode())
    # the typed line echoes the markers in quotes; the output has them alone on a line
    pattern = re.compile(f"{start}\r\n(.*?){end}\r\n".encode(), re.S)
    match = await peer.until(lambda: pattern.search(peer.output), timeout)
    return match.group(1).decode(errors="replace").replace("\r\n", "\n")


async def shell(server: ServerProc, user: str, **kw: object) -> tuple[Peer, m.Welcome, int, str]:
    """A shell session: the peer, its welcome, the agent's pid and its terminal."""
    peer, welcome = await server.create(user, SHELL, **kw)  # type: ignore[arg-type]
    facts = await run(peer, "echo PID=$$; tty")
    pid = int(re.search(r"PID=(\d+)", facts).group(1))  # type: ignore[union-attr]
    pty = re.search(r"(/dev/pts/\d+)", facts).group(1)  # type: ignore[union-attr]
    return peer, welcome, pid, pty


async def test_another_members_agent_cannot_touch_a_session(server: ServerProc) -> None:
    alice, a_welcome, a_pid, a_pty = await shell(
        server, ALICE, env={"ANTHROPIC_API_KEY": "sk-alice-secret"}
    )
    bob, b_welcome, b_pid, _ = await shell(server, BOB)
    a_agent, b_agent = server.agent_user(a_welcome.session_id), server.agent_user(b_welcome.session_id)
    assert a_agent != b_agent and account(a_agent)[0] != account(b_agent)[0]
    a_home = HOMES / a_agent

    # Alice's agent is invisible to Bob's (hidepid), and so are its environment and cmdline
    out = await run(bob, f"test -e /proc/{a_pid} && echo VISIBLE || echo HIDDEN; "
                         f"cat /proc/{a_pid}/environ; ps -e -o pid= | wc -l")
    assert "HIDDEN" in out and "sk-alice-secret" not in out
    assert "No such file" in out
    # ptrace, signals
    out = await run(bob, "python3 -c 'import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
                         f"print(\"PTRACE\", libc.ptrace(16, {a_pid}, 0, 0), ctypes.get_errno())'")
    assert re.search(r"PTRACE -1 (1|3)\b", out), out  # EPERM or ESRCH
    out = await run(bob, f"kill -9 {a_pid}; kill -STOP {a_pid}; echo kill-status=$?")
    assert "kill-status=1" in out
    # Alice's terminal: neither written nor read
    out = await run(bob, f"echo INJECTED > {a_pty}; timeout 1 cat {a_pty}; echo done")
    assert out.count("Permission denied") == 2
    # Alice's home: not listed, nothing planted
    out = await run(bob, f"ls {a_home}; echo 'echo $OPENAI_API_KEY >> /tmp/x' > {a_home}/.bash_profile")
    assert out.count("Permission denied") == 2
    assert not (a_home / ".bash_profile").exists()
    # /tmp is not shared: what Bob plants there, Alice's agent never sees
    await run(bob, "echo planted > /tmp/trap; mkfifo /tmp/fifo; echo ok")
    out = await run(alice, "ls /tmp; cat /tmp/trap; echo listed")
    assert "trap" not in out.replace("/tmp/trap", "") and "planted" not in out

    # Alice is untouched: alive, her typing goes to her shell, nothing of Bob's reached her
    out = await run(alice, "echo still-$((40+2)); echo $ANTHROPIC_API_KEY")
    assert "still-42" in out and "sk-alice-secret" in out
    assert b"INJECTED" not in alice.output
    assert not server.records("input", session_id=a_welcome.session_id, user=BOB)


async def test_an_abstract_socket_does_not_cross_sessions(server: ServerProc) -> None:
    """The way around NET_ISOLATE: a connected socket handed over a Unix socket."""
    alice, a_welcome, _, _ = await shell(server, ALICE)
    bob, _, _, _ = await shell(server, BOB)
    listen = (
        "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); "
        "s.bind(b\"\\0aaut-bridge\"); s.listen(); print(\"LISTENING\"); s.accept()' &"
    )
    await run(bob, listen + " sleep 0.5")
    connect = (
        "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(b\"\\0aaut-bridge\"); print(\"CONNECTED\")\n"
        "except OSError as e: print(\"REFUSED\", e.errno)'"
    )
    out = await run(alice, connect)
    assert "REFUSED 1" in out and "CONNECTED" not in out  # EPERM: Landlock scope
    # within one session it works (the scope is the session, not the process)
    await run(alice, listen.replace("aaut-bridge", "aaut-own") + " sleep 0.5")
    assert "CONNECTED" in await run(alice, connect.replace("aaut-bridge", "aaut-own"))


async def test_a_members_sessions_share_identity_and_home_not_tmp_or_signals(
    server: ServerProc,
) -> None:
    first, w1, pid1, _ = await shell(server, ALICE)
    second, w2, _, _ = await shell(server, ALICE)
    assert server.agent_user(w1.session_id) == server.agent_user(w2.session_id)
    await run(first, "echo persisted > ~/note; echo scratch > /tmp/scratch")
    out = await run(second, "cat ~/note; cat /tmp/scratch")
    assert "persisted" in out and "No such file" in out  # same home, own /tmp
    out = await run(second, f"kill -TERM {pid1}; echo status=$?")
    assert "status=1" in out and "Operation not permitted" in out  # Landlock scopes signals
    assert "alive" in await run(first, "echo alive")


async def test_an_ephemeral_session_leaves_nothing_behind(start_server: ServerFactory) -> None:
    server = await start_server("--identity", "session")
    alice, welcome, _, _ = await shell(server, ALICE)
    agent = server.agent_user(welcome.session_id)
    uid = account(agent)[0]
    await run(alice, "echo secret > ~/left; (setsid nohup sleep 1000 >/dev/null 2>&1 &); echo ok")
    await alice.type(b"exit\n")
    await alice.expect(m.Exited)
    (reset,) = await wait_for(
        lambda: server.records("identity_reset", session_id=welcome.session_id)
    )
    assert reset["content"] == agent and reset["metadata"]["reason"] == "session end"
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _owner(p) == uid]
    home = HOMES / agent
    assert home.is_dir() and list(home.iterdir()) == []
    assert (os.stat(home).st_uid, os.stat(home).st_mode & 0o777) == (uid, 0o700)
    # the next session, whoever's, starts from nothing
    bob, _, _, _ = await shell(server, BOB)
    assert "No such file" in await run(bob, "cat ~/left")


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


async def test_secrets_never_appear_on_a_command_line(server: ServerProc) -> None:
    script = "cat /proc/$PPID/cmdline 2>&1 | tr '\\0' ' '; echo; echo key=$API_KEY"
    result = await run_cli(
        ALICE,
        ["-e", "API_KEY", "-p", f"sh -c {script!r}"],
        server.socket,
        env={"API_KEY": "sk-from-the-environment"},
    )
    assert result.returncode == 0, result.stderr
    assert b"key=sk-from-the-environment" in result.stdout
    assert b"warning" not in result.stderr
    warned = await run_cli(ALICE, ["-e", "API_KEY=sk-x", "-p", "true"], server.socket)
    assert b"puts the value on the command line" in warned.stderr
    missing = await run_cli(ALICE, ["-e", "NOT_SET_HERE", "-p", "true"], server.socket)
    assert missing.returncode == 255 and b"NOT_SET_HERE is not set" in missing.stderr


async def test_caps_hold_a_fork_bomb_and_a_memory_hog_while_others_stay_responsive(
    start_server: ServerFactory,
) -> None:
    server = await start_server(
        "--session-pids-max", "64", "--session-memory-max", str(96 << 20)
    )
    alice, a_welcome = await server.create(ALICE, ("sh", "-c", "stty raw -echo; echo READY; exec cat"))
    await alice.expect_output(b"READY")
    bob, b_welcome, _, _ = await shell(server, BOB)
    start = (await run(bob, "echo started"))
    assert "started" in start
    (b_start,) = server.records("session_start", session_id=b_welcome.session_id)
    caps = b_start["metadata"]["sandbox"]
    assert caps["cap_pids"] in ("cgroup2", "cgroup1") and caps["cap_memory"] in ("cgroup2", "cgroup1")

    await bob.type(b"bomb() { bomb | bomb & }; bomb\n")  # a fork bomb, under 64 processes
    slowest = 0.0
    for i in range(30):
        key = bytes([97 + i % 26])
        t0 = time.monotonic()
        await alice.type(key)
        await alice.expect_output(key)
        slowest = max(slowest, time.monotonic() - t0)
        await trio.sleep(0.05)
    assert slowest < 2.0, f"alice's echo took {slowest:.2f} s during bob's fork bomb"
    await bob.send(m.ForceKill())
    await bob.expect(m.Exited, timeout=30)

    hog, _ = await server.create(BOB, ("python3", "-c", "x = bytearray(400 << 20); print('SURVIVED')"))
    exited = await hog.expect(m.Exited, timeout=30)
    assert exited.signal == 9 and b"SURVIVED" not in hog.output  # the OOM killer, in its cgroup
    await alice.type(b"z")
    await alice.expect_output(b"z")
    assert shutil.which("python3")


async def test_net_isolate_holds_when_another_member_offers_a_socket(
    server: ServerProc,
) -> None:
    if shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        pytest.skip("nftables (nft) is not installed; the README's test command installs it")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        alice, a_welcome, _, _ = await shell(server, ALICE)
        ada, _ = await server.join("aaut-ada", a_welcome.session_id)
        await ada.send(m.AsysRequest(1, "NET_ISOLATE"))
        assert (await ada.expect(m.AsysResult)).sw == "9000"
        bob, _, _, _ = await shell(server, BOB)
        offer = (
            "python3 -c 'import socket, array\n"
            f"c = socket.create_connection((\"127.0.0.1\", {port}))\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(b\"\\0aaut-offer\"); s.listen()\n"
            "print(\"OFFERING\", flush=True)\n"
            "a, _ = s.accept(); socket.send_fds(a, [b\"x\"], [c.fileno()])' &"
        )
        await run(bob, offer + " sleep 0.5")
        take = (
            "python3 -c 'import socket\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(b\"\\0aaut-offer\"); print(\"GOT\", socket.recv_fds(s, 1, 1))\n"
            "except OSError as e: print(\"REFUSED\", e.errno)'"
        )
        out = await run(alice, take)
        assert "REFUSED 1" in out and "GOT" not in out
    finally:
        listener.close()

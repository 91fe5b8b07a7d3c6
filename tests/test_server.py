"""The real server, real users, real PTYs: admission, roles, the agent, audit."""

from __future__ import annotations

import os
import pwd
import re
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import trio

from aaau import messages as m
from aaau.audit import decode_content
from aaau.protocol import Kind, encode_frame

from .helpers import (
    ADA,
    ADMIN_GROUP,
    AGENT,
    ALICE,
    BOB,
    EVE,
    GROUP,
    POOL,
    Peer,
    ServerFactory,
    ServerProc,
    account,
    gid_of,
    read_audit,
    root,
    server_argv,
    wait_for,
)

pytestmark = root
V = m.PROTOCOL_VERSION


def _agent_pids() -> set[int]:
    uids = {pwd.getpwnam(user).pw_uid for user in (AGENT, *POOL)}
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    pids.add(int(entry))
            except FileNotFoundError:
                pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --- admission --------------------------------------------------------------------------------


async def test_socket_and_directories_have_tight_modes(server: ServerProc) -> None:
    st = os.stat(server.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, gid_of(GROUP))
    audit = os.stat(server.audit_path)
    assert stat.S_IMODE(audit.st_mode) == 0o640
    assert (audit.st_uid, audit.st_gid) == (0, gid_of(ADMIN_GROUP))
    logdir = os.stat(server.log_dir)
    assert stat.S_IMODE(logdir.st_mode) & 0o007 == 0


async def test_outsider_is_refused_by_the_server_not_only_the_socket_mode(
    server: ServerProc,
) -> None:
    # eve's process still carries the group (a stale login), the database says no
    peer = await server.peer(EVE, extra_groups=[gid_of(GROUP)])
    error = await peer.expect(m.Error)
    assert error.code == "refused"
    assert f"user {EVE}" in error.message and "not a member" in error.message
    await peer.until_closed()
    (record,) = server.records("connection_refused", user=EVE)
    assert record["uid"] == account(EVE)[0]
    assert "not a member" in record["content"]


async def test_outsider_without_the_group_cannot_reach_the_socket(server: ServerProc) -> None:
    with pytest.raises(ConnectionRefusedError, match="Permission denied"):
        await server.peer(EVE)


async def test_agent_user_is_always_refused(server: ServerProc) -> None:
    peer = await server.peer(AGENT, extra_groups=[gid_of(GROUP), gid_of(ADMIN_GROUP)])
    error = await peer.expect(m.Error)
    assert error.code == "refused"
    assert "agent user" in error.message
    assert server.records("connection_refused", user=AGENT)


async def test_roles_are_decided_by_the_server(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("cat",))
    assert welcome.role is m.Role.INTERACTIVE and welcome.created
    sid = welcome.session_id
    assert len(sid) >= 22  # 128 bits, urlsafe

    bob, reply = await server.join(BOB, sid, m.Role.ADMIN)  # asks for more than allowed
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.READONLY
    ada, reply = await server.join(ADA, sid)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.ADMIN
    ada_ro, reply = await server.join(ADA, sid, m.Role.READONLY)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.READONLY
    root_peer, reply = await server.join("root", sid)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.ADMIN

    # bob (read-only) types, resizes and kills: each refused, audited, nothing happens
    await bob.type(b"bob-was-here\n")
    error = await bob.expect(m.Error)
    assert error.code == "forbidden" and "read-only" in error.message
    await bob.send(m.Resize(10, 10))
    assert (await bob.expect(m.Error)).code == "forbidden"
    await bob.send(m.ForceKill())
    assert (await bob.expect(m.Error)).code == "forbidden"
    await ada_ro.type(b"ada-ro\n")
    assert (await ada_ro.expect(m.Error)).code == "forbidden"

    await alice.type(b"alice-typed\n")
    await bob.expect_output(b"alice-typed")
    assert b"bob-was-here" not in bob.output and b"ada-ro" not in bob.output
    denied = {(r["user"], r["content"]) for r in server.records("denied", session_id=sid)}
    assert denied == {(BOB, "input"), (BOB, "resize"), (BOB, "force_kill"), (ADA, "input")}
    assert all(r["role"] == "readonly" for r in server.records("denied"))
    for p in (alice, bob, ada, ada_ro, root_peer):
        await p.aclose()


async def test_shared_session_lets_other_members_type(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("cat",), share=True)
    bob, reply = await server.join(BOB, welcome.session_id)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.INTERACTIVE
    await bob.type(b"from-bob\n")
    await alice.expect_output(b"from-bob")
    (record,) = server.records("input", user=BOB)
    assert decode_content(record["content"], record["metadata"]["encoding"]) == b"from-bob\n"
    assert record["role"] == "interactive" and record["uid"] == account(BOB)[0]


async def test_unknown_session_gets_a_clear_error(server: ServerProc) -> None:
    peer, reply = await server.join(ALICE, "no-such-session")
    assert isinstance(reply, m.Error) and reply.code == "unknown-session"
    assert "no-such-session" in reply.message
    await peer.until_closed()


# --- the agent ----------------------------------------------------------------------------------


async def test_agent_runs_as_agent_user_with_a_clean_environment(server: ServerProc) -> None:
    alice, welcome = await server.create(
        ALICE,
        ("sh", "-c", "id -u; id -G; pwd; env; echo END-OF-ENV; exec sleep 60"),
        env={"API_KEY": "sk-secret-value"},
    )
    await alice.expect_output(b"END-OF-ENV")
    text = alice.output.decode()
    agent = server.agent_user(welcome.session_id)
    assert agent in POOL
    uid, gid, _ = account(agent)
    lines = text.split("\r\n")
    assert lines[0] == str(uid)
    assert set(lines[1].split()) == {str(g) for g in os.getgrouplist(agent, gid)}
    assert str(gid_of(GROUP)) not in lines[1].split()
    assert lines[2] == pwd.getpwnam(agent).pw_dir
    env = dict(line.split("=", 1) for line in lines[3:] if "=" in line and "END" not in line)
    assert "AAAU_TEST_SECRET" not in env and "server-secret-must-not-leak" not in text
    assert env["USER"] == agent and env["LOGNAME"] == agent and env["HOME"] == lines[2]
    assert env["TERM"] == "xterm" and env["AAAU_SESSION_ID"] == welcome.session_id
    assert env["AAAU_ASYS"].endswith("-asys/" + welcome.session_id)
    assert env["API_KEY"] == "sk-secret-value"
    assert set(env) <= {
        "PATH",
        "LANG",
        "API_KEY",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "TERM",
        "AAAU_SESSION_ID",
        "AAAU_ASYS",  # the session's ASys endpoint (docs/asys.md)
        "PWD",
        "SHLVL",
        "_",
    }
    # audit records the names of -e variables, never their values
    (start,) = server.records("session_start", session_id=welcome.session_id)
    assert "API_KEY" in start["metadata"]["env_names"]
    assert (
        "sk-secret-value"
        not in server.audit_path.read_text()
        .split("END-OF-ENV")[0]
        .split('"command_type":"output"')[0]
    )
    assert start["metadata"]["argv"][0] == "sh"
    await alice.aclose()


async def test_agent_has_no_leaked_fds_and_owns_its_pty(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("sleep", "60"))
    (start,) = server.records("session_start", session_id=welcome.session_id)
    pid = start["metadata"]["agent_pid"]
    await wait_for(lambda: _cmdline(pid).startswith("sleep"))
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert set(fds) == {0, 1, 2}
    assert set(fds.values()) == {start["metadata"]["pty"]}
    st = os.stat(start["metadata"]["pty"])
    agent_uid = account(server.agent_user(welcome.session_id))[0]
    assert st.st_uid == agent_uid
    assert stat.S_IMODE(st.st_mode) == 0o620
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids is not None and set(uids.group(1).split()) == {str(agent_uid)}
    # the agent is the foreground process group of its own tty session
    stat_fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    pgrp, session, tpgid = int(stat_fields[2]), int(stat_fields[3]), int(stat_fields[5])
    # the agent leads its own tty session, its group in the foreground; the server is its parent
    assert pgrp == pid == tpgid == session
    assert int(stat_fields[1]) == server.process.pid
    await alice.aclose()


async def test_pam_session_applies_the_agents_limits(server: ServerProc) -> None:
    limits = Path("/etc/security/limits.d/aaut-test.conf")
    limits.parent.mkdir(parents=True, exist_ok=True)
    limits.write_text("".join(f"{u} hard nofile 777\n{u} soft nofile 777\n" for u in POOL))
    try:
        alice, _ = await server.create(ALICE, ("sh", "-c", "echo limit-$(ulimit -Hn); sleep 60"))
        await alice.expect_output(b"limit-777")
    finally:
        limits.unlink()
    # the server itself never joined that PAM session
    assert "777" not in Path(f"/proc/{server.process.pid}/limits").read_text()


async def test_detach_keeps_the_session_and_rejoin_works(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("cat",))
    await alice.type(b"before\n")
    await alice.expect_output(b"before")
    await alice.send(m.Detach())
    await alice.until_closed()
    again, reply = await server.join(ALICE, welcome.session_id)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.INTERACTIVE
    await again.expect_output(b"before")  # scrollback
    await again.type(b"after\n")
    await again.expect_output(b"after")
    (leave,) = server.records("leave", session_id=welcome.session_id)
    assert leave["content"] == "detached"


async def test_exit_status_is_delivered_and_session_removed(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("sh", "-c", "echo bye; exit 3"))
    bob, _ = await server.join(BOB, welcome.session_id)  # may race with the exit
    exited = await alice.expect(m.Exited)
    assert exited == m.Exited(code=3, signal=None)
    await alice.until_closed()
    assert b"bye" in alice.output
    (end,) = server.records("session_end", session_id=welcome.session_id)
    assert end["metadata"]["exit_code"] == 3
    peer, reply = await server.join(ALICE, welcome.session_id)
    assert isinstance(reply, m.Error) and reply.code == "unknown-session"
    await bob.aclose()


async def test_signal_death_is_reported_as_a_signal(server: ServerProc) -> None:
    alice, _ = await server.create(ALICE, ("sh", "-c", "kill -TERM $$"))
    assert await alice.expect(m.Exited) == m.Exited(code=None, signal=signal.SIGTERM)


async def test_missing_program_is_an_error_and_leaves_no_session(server: ServerProc) -> None:
    peer = await server.peer(
        ALICE, m.Create(V, rows=24, cols=80, term="xterm", argv=("no-such-agent-program", "--x"))
    )
    error = await peer.expect(m.Error)
    assert error.code == "spawn-failed"
    assert "program not found: no-such-agent-program" in error.message
    await peer.until_closed()
    ls = await server.peer(ALICE, m.ListSessions(V))
    assert (await ls.expect(m.Sessions)).sessions == ()
    (record,) = server.records("spawn_failed", user=ALICE)
    assert "not found" in record["content"]


async def test_program_not_executable_is_a_clear_error(server: ServerProc, base_dir: Path) -> None:
    script = base_dir / "not-executable.sh"
    script.write_text("#!/bin/sh\necho should-not-run\n")
    script.chmod(0o644)
    peer = await server.peer(
        ALICE, m.Create(V, rows=24, cols=80, term="xterm", argv=(str(script),))
    )
    error = await peer.expect(m.Error)
    assert error.code == "spawn-failed"
    assert f"program not executable by {server.bound_agent(ALICE)}: {script}" in error.message
    assert server.records("spawn_failed", user=ALICE)


async def test_unenterable_working_directory_is_a_clear_error(
    server: ServerProc, base_dir: Path
) -> None:
    private = base_dir / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    peer = await server.peer(
        ALICE, m.Create(V, rows=24, cols=80, term="xterm", argv=("true",), cwd=str(private))
    )
    error = await peer.expect(m.Error)
    assert error.code == "spawn-failed"
    agent = server.bound_agent(ALICE)
    assert f"cannot enter working directory {private} as {agent}" in error.message


async def test_late_joiner_gets_scrollback_then_the_program_redraws(server: ServerProc) -> None:
    script = "trap 'echo WINCH-$(stty size)' WINCH; echo early-output; while :; do sleep 0.05; done"
    alice, welcome = await server.create(ALICE, ("bash", "-c", script))
    await alice.expect_output(b"early-output")
    bob, reply = await server.join(BOB, welcome.session_id)
    assert isinstance(reply, m.Welcome)
    await bob.expect_output(b"WINCH-24 80")
    assert bob.output.index(b"early-output") < bob.output.index(b"WINCH")
    joined = await alice.expect(m.Joined)
    assert joined.client.user == BOB and joined.client.role is m.Role.READONLY


async def test_resize_sets_the_size_and_is_audited_with_who(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("bash", "--norc", "-i"))
    await alice.send(m.Resize(40, 132))
    await alice.type(b"stty size\n")
    await alice.expect_output(b"40 132")
    (record,) = server.records("resize", session_id=welcome.session_id)
    assert (record["user"], record["content"], record["role"]) == (ALICE, "40x132", "interactive")


async def test_input_from_two_clients_keeps_whole_frames(server: ServerProc) -> None:
    # no echo: only cat writes, and it writes whole lines
    alice, welcome = await server.create(
        ALICE, ("sh", "-c", "stty -echo; echo ready; exec cat"), share=True
    )
    await alice.expect_output(b"ready")
    alice.output.clear()
    bob, _ = await server.join(BOB, welcome.session_id)
    a_line, b_line = b"A" * 200 + b"\n", b"B" * 200 + b"\n"

    async def send_many(peer: Peer, line: bytes) -> None:
        for _ in range(20):
            await peer.type(line)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_many, alice, a_line)
        nursery.start_soon(send_many, bob, b_line)
    await alice.until(lambda: alice.output.count(b"\r\n") >= 40)
    assert alice.output.count(b"\r\n") == 40
    for line in alice.output.split(b"\r\n"):
        assert line in (b"", a_line[:-1], b_line[:-1]), line[:40]


async def test_ping_and_status(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("cat",))
    await alice.send(m.Ping(42))
    assert await alice.expect(m.Pong) == m.Pong(42)
    await alice.send(m.GetStatus())
    status = await alice.expect(m.Status)
    assert status.alive and status.session.session_id == welcome.session_id
    assert status.session.creator == ALICE and status.session.argv == ("cat",)
    assert [c.user for c in status.session.clients] == [ALICE]


# --- FORCE_KILL ---------------------------------------------------------------------------------


async def test_force_kill_ends_background_jobs_and_escapees(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("bash", "--norc", "-i"))
    await alice.type(b"(trap '' HUP TERM; exec sleep 1001) &\n")
    await alice.type(b"setsid sleep 1002 &\n")
    await alice.type(b"echo jobs-started\n")
    await alice.expect_output(b"jobs-started\r\n")
    await wait_for(
        lambda: {"sleep 1001", "sleep 1002"} <= {_cmdline(p).strip() for p in _agent_pids()}
    )
    bob, _ = await server.join(BOB, welcome.session_id)
    await bob.send(m.ForceKill())
    assert (await bob.expect(m.Error)).code == "forbidden"
    await alice.send(m.ForceKill())
    exited = await alice.expect(m.Exited, timeout=15)
    # bash dies of the first signal; everyone is told who ended it
    assert exited == m.Exited(
        code=None, signal=signal.SIGHUP, reason=f"killed by {ALICE} (interactive)"
    )
    await wait_for(lambda: not any(_cmdline(p).startswith("sleep 100") for p in _agent_pids()))
    (kill,) = server.records("force_kill", session_id=welcome.session_id)
    assert kill["user"] == ALICE
    assert server.records("session_end", session_id=welcome.session_id)[0]["metadata"][
        "force_killed"
    ]


async def test_kill_outside_a_session_by_creator_or_admin_only(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("sleep", "60"))
    sid = welcome.session_id
    bob = await server.peer(BOB, m.Kill(V, sid))
    assert (await bob.expect(m.Error)).code == "forbidden"
    ada = await server.peer(ADA, m.Kill(V, sid))
    done = await ada.expect(m.Done, timeout=15)
    assert sid in done.message
    assert (await alice.expect(m.Exited)).signal is not None


# --- slow clients, bad input, limits ---------------------------------------------------------------


async def test_stalled_client_is_dropped_and_others_get_every_byte(
    start_server: ServerFactory,
) -> None:
    server = await start_server("--client-queue-bytes", str(2 * 1024 * 1024))
    alice, welcome = await server.create(
        ALICE, ("sh", "-c", "read go; seq 1 800000; echo ALL-DONE; read x")
    )
    sid = welcome.session_id
    stalled, reply = await server.join(BOB, sid)  # never reads again
    assert isinstance(reply, m.Welcome)
    await alice.type(b"go\n")
    await alice.expect_output(b"ALL-DONE", timeout=60)
    expected = "".join(f"{i}\r\n" for i in range(1, 800001)).encode()
    assert expected in bytes(alice.output)
    evicted = await wait_for(lambda: server.records("client_evicted", user=BOB))
    assert evicted[0]["session_id"] == sid
    left = await alice.expect(m.Left)
    assert left.client.user == BOB
    rss_kb = int(
        re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{server.process.pid}/status").read_text()).group(
            1
        )
    )  # type: ignore[union-attr]
    assert rss_kb < 200_000


async def test_malformed_frames_close_only_that_connection(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("cat",))
    cases = [
        (b"\x07\x00\x00\x00\x00", "bad-frame", "unknown frame kind 7"),
        (b"\x01\xff\xff\xff\xff", "too-large", "exceeds the limit"),
        (b"\x01\x00\x00\x00\x05{nope", "bad-message", "not UTF-8 JSON"),
        (b"\x00\x00\x00\x00\x02hi", "bad-frame", "first frame must be a control message"),
        (b'\x01\x00\x00\x00\x0e{"type":"pong"', "bad-message", "not UTF-8 JSON"),
    ]
    for raw, code, text in cases:
        peer = await server.peer(BOB)
        await peer.stream.send_all(raw)
        error = await peer.expect(m.Error)
        assert (error.code, text in error.message) == (code, True), error
        await peer.until_closed()
    # inside a session too
    bob, _ = await server.join(BOB, welcome.session_id)
    await bob.stream.send_all(encode_frame(Kind.CONTROL, b'{"type":"boom"}'))
    assert (await bob.expect(m.Error)).code == "bad-message"
    await bob.until_closed()
    errors = server.records("protocol_error")
    assert len(errors) == len(cases) + 1
    # the server and the other session are unharmed
    await alice.type(b"still-alive\n")
    await alice.expect_output(b"still-alive")


async def test_version_mismatch_is_refused(server: ServerProc) -> None:
    peer = await server.peer(ALICE, m.ListSessions(99))
    error = await peer.expect(m.Error)
    assert error.code == "version" and "99" in error.message


async def test_silent_client_times_out(start_server: ServerFactory) -> None:
    server = await start_server("--handshake-timeout", "0.5")
    peer = await server.peer(ALICE)
    error = await peer.expect(m.Error)
    assert error.code == "timeout"
    await peer.until_closed()
    assert server.records("handshake_timeout", user=ALICE)


async def test_limits_are_enforced_with_clear_errors(start_server: ServerFactory) -> None:
    server = await start_server("--sessions-per-user", "1", "--max-sessions", "2")
    alice, welcome = await server.create(ALICE, ("cat",))
    peer = await server.peer(ALICE, m.Create(V, rows=24, cols=80, term="xterm", argv=("cat",)))
    error = await peer.expect(m.Error)
    assert error.code == "limit" and "limit 1" in error.message
    await server.create(BOB, ("cat",))
    peer = await server.peer(ADA, m.Create(V, rows=24, cols=80, term="xterm", argv=("cat",)))
    error = await peer.expect(m.Error)
    assert error.code == "limit" and "limit 2" in error.message


# --- lifecycle: second server, shutdown, reload ---------------------------------------------------


async def test_second_server_on_the_same_socket_is_refused(
    server: ServerProc, start_server: ServerFactory
) -> None:
    result = await trio.run_process(
        server_argv(server.socket, server.log_dir),
        capture_stderr=True,
        check=False,
        cwd="/",
    )
    assert result.returncode == 1
    assert b"another aaau server" in result.stderr
    alice, _ = await server.create(ALICE, ("cat",))  # the first one still serves


async def test_stale_socket_is_replaced(start_server: ServerFactory) -> None:
    first = await start_server()
    first.process.send_signal(signal.SIGKILL)  # dies without cleaning up
    await first.process.wait()
    assert first.socket.exists()
    second = await start_server(socket_path=first.socket)
    alice, _ = await second.create(ALICE, ("cat",))
    await alice.type(b"new-server\n")
    await alice.expect_output(b"new-server")


async def test_graceful_sigterm(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("bash", "--norc", "-i"))
    await alice.type(b"echo ready-$((6*7))\n")
    await alice.expect_output(b"ready-42")
    (start,) = server.records("session_start")
    agent_pid = start["metadata"]["agent_pid"]
    server.process.send_signal(signal.SIGTERM)
    error = await alice.expect(m.Error)
    assert error.code == "server-shutdown"
    await alice.expect(m.Exited)
    await alice.until_closed()
    with trio.fail_after(15):
        assert await server.process.wait() == 0
    assert not server.socket.exists()
    assert not Path(f"/proc/{agent_pid}").exists()
    records = server.audit()
    assert records[-1]["command_type"] == "server_stop"
    assert [r["command_type"] for r in records].count("session_end") == 1


async def test_sighup_disconnects_members_who_lost_the_group(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("cat",))
    bob, reply = await server.join(BOB, welcome.session_id)
    assert isinstance(reply, m.Welcome)
    subprocess.run(["gpasswd", "-d", BOB, GROUP], check=True, capture_output=True)
    try:
        server.process.send_signal(signal.SIGHUP)
        error = await bob.expect(m.Error)
        assert error.code == "revoked" and "not a member" in error.message
        await bob.until_closed()
        assert server.records("client_revoked", user=BOB)
        await alice.type(b"alice-unaffected\n")
        await alice.expect_output(b"alice-unaffected")
    finally:
        subprocess.run(["gpasswd", "-a", BOB, GROUP], check=True, capture_output=True)


async def test_sighup_downgrades_an_admin_who_lost_admin_rights(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("cat",))
    ada, reply = await server.join(ADA, welcome.session_id)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.ADMIN
    subprocess.run(["gpasswd", "-d", ADA, ADMIN_GROUP], check=True, capture_output=True)
    try:
        server.process.send_signal(signal.SIGHUP)
        changed = await ada.expect(m.RoleChanged)
        assert changed.role is m.Role.READONLY
        await ada.type(b"no-longer\n")
        assert (await ada.expect(m.Error)).code == "forbidden"
    finally:
        subprocess.run(["gpasswd", "-a", ADA, ADMIN_GROUP], check=True, capture_output=True)


# --- audit -------------------------------------------------------------------------------------------


async def test_audit_replays_the_session_byte_for_byte(server: ServerProc) -> None:
    alice, welcome = await server.create(
        ALICE,
        ("sh", "-c", "printf 'caf\\303\\251 \\377\\033[1mbold\\033[0m\\n'; read x; echo got-$x"),
    )
    await alice.expect_output(b"bold")
    await alice.type(b"answer\n")
    exited = await alice.expect(m.Exited)
    assert exited.code == 0
    sid = welcome.session_id
    records = server.audit()
    kinds = [r["command_type"] for r in records if r["session_id"] == sid]
    assert kinds[0] == "session_start" and kinds[-1] == "session_end"
    assert kinds.index("join") < kinds.index("input")
    replay = b"".join(
        decode_content(r["content"], r["metadata"]["encoding"])
        for r in records
        if r["session_id"] == sid and r["command_type"] == "output"
    )
    assert replay == bytes(alice.output)
    times = [r["timestamp"] for r in records]
    assert times == sorted(times) and any(t != int(t) for t in times)
    (inp,) = [r for r in records if r["command_type"] == "input" and r["session_id"] == sid]
    assert (inp["user"], inp["uid"], inp["role"], inp["source"]) == (
        ALICE,
        account(ALICE)[0],
        "interactive",
        "human",
    )
    # the input record precedes the output it caused
    first_echo = next(
        i
        for i, r in enumerate(records)
        if r["command_type"] == "output" and "got-answer" in r["content"]
    )
    assert records.index(inp) < first_echo
    assert {
        "server_start",
        "connection_accepted",
        "session_start",
        "join",
        "input",
        "output",
        "session_end",
    } <= {r["command_type"] for r in records}


async def test_sighup_reloads_limits_from_the_config_file(
    start_server: ServerFactory, base_dir: Path
) -> None:
    config = base_dir / "reload.toml"
    config.write_text("max_sessions = 5\n")
    server = await start_server("--config", str(config))
    alice, _ = await server.create(ALICE, ("cat",))
    config.write_text("max_sessions = 1\n")
    server.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: server.records("reload"))
    peer = await server.peer(BOB, m.Create(V, rows=24, cols=80, term="xterm", argv=("cat",)))
    error = await peer.expect(m.Error)
    assert error.code == "limit" and "limit 1" in error.message
    await alice.type(b"still-here\n")
    await alice.expect_output(b"still-here")


async def test_daemon_mode_returns_once_the_socket_is_ready(
    accounts: dict[str, object], base_dir: Path
) -> None:
    sock, log_dir = base_dir / "daemon" / "aaau.sock", base_dir / "daemon-log"
    result = await trio.run_process(server_argv(sock, log_dir, "--daemon"), cwd="/", check=False)
    assert result.returncode == 0
    assert sock.exists()  # ready before the parent returned
    records = read_audit(log_dir / "audit.jsonl")
    pid = records[0]["metadata"]["pid"]
    try:
        assert records[0]["command_type"] == "server_start"
        # its own session (setsid), away from the shell that started it
        assert Path(f"/proc/{pid}/stat").read_text().split()[5] == str(pid)
        pid_file = sock.parent / "aaau-server.pid"
        assert pid_file.read_text() == f"{pid}\n" and stat.S_IMODE(pid_file.stat().st_mode) == 0o644
        logs = os.stat(log_dir)  # made as the server makes it, not 0755 root:root
        assert (stat.S_IMODE(logs.st_mode), logs.st_gid) == (0o750, gid_of(ADMIN_GROUP))
        # a second one cannot start, and says why where it was started
        again = await trio.run_process(
            server_argv(sock, log_dir, "--daemon"), cwd="/", check=False, capture_stderr=True
        )
        assert again.returncode == 1
        assert again.stderr.decode().startswith("aaau-server: another aaau server holds")
    finally:
        os.kill(pid, signal.SIGTERM)
    await wait_for(lambda: not sock.exists())
    assert not pid_file.exists()  # removed at the end
    assert (log_dir / "server.log").exists()

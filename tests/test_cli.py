"""The real `aaau` and `aaau-server init` commands, run as real users."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import stat
import struct
import subprocess
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from .helpers import (
    ADA,
    ADMIN_GROUP,
    AGENT,
    ALICE,
    BOB,
    EVE,
    GROUP,
    HOMES,
    PAM_SERVICE,
    POOL,
    PY,
    ServerProc,
    account,
    as_client,
    gid_of,
    init_argv,
    root,
    run_cli,
    server_argv,
    wait_for,
)

pytestmark = root


async def test_piped_stdin_drives_the_agent_and_exit_status_comes_back(
    server: ServerProc,
) -> None:
    result = await run_cli(
        ALICE, ["-p", "bash --norc"], server.socket, stdin=b"echo piped-$((20+1))\nexit 7\n"
    )
    assert result.returncode == 7, result.stderr
    assert b"piped-21" in result.stdout
    assert re.search(rb"aaau: session [A-Za-z0-9_-]{22} \(interactive\)", result.stderr)


async def test_end_of_stdin_is_end_of_input_for_the_agent(server: ServerProc) -> None:
    result = await run_cli(
        ALICE,
        ["-p", "sh -c 'cat; echo cat-finished; exit 4'"],
        server.socket,
        stdin=b"line one\npartial",
    )
    assert result.returncode == 4, result.stderr
    assert b"cat-finished" in result.stdout
    assert b"partial" in result.stdout


@pytest.mark.parametrize("program", ["bash -l", "python3"])
async def test_a_readline_program_at_end_of_stdin_ends_20_of_20(
    server: ServerProc, program: str
) -> None:
    """``aaau -p 'bash -l' </dev/null``: end of input reaches it once it reads."""

    async def one(results: list[int]) -> None:
        result = await run_cli(ALICE, ["-p", program], server.socket, stdin=b"")
        results.append(result.returncode)

    results: list[int] = []
    for _ in range(5):  # 4 at a time: within the member's session limit
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one, results)
    assert results == [0] * 20


async def test_a_pipe_session_ends_with_its_client_unless_kept(server: ServerProc) -> None:
    async with trio.open_nursery() as nursery:
        for started, keep in enumerate(([], ["--keep"]), start=1):
            proc = await nursery.start(
                partial(
                    trio.run_process,
                    [PY, "-m", "aaau", *keep, "-p", "sleep 600"],
                    stdin=subprocess.PIPE,
                    check=False,
                    **as_client(ALICE, server.socket),
                )
            )
            await wait_for(lambda n=started: len(server.records("session_start")) == n)
            proc.kill()  # the client, not the agent
    (ended,) = await wait_for(lambda: server.records("session_end"))
    assert "in pipe mode, left" in ended["metadata"]["end_reason"]
    listing = json.loads((await run_cli(ALICE, ["ls", "--json"], server.socket)).stdout)
    assert [s["argv"] for s in listing] == [["sleep", "600"]]  # the kept one


async def test_a_closed_stdout_is_named_as_such_not_as_the_server(server: ServerProc) -> None:
    proc = await trio.lowlevel.open_process(
        [PY, "-m", "aaau", "-p", "seq 1 10000000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **as_client(ALICE, server.socket),
    )
    assert proc.stdout is not None and proc.stderr is not None
    with trio.fail_after(20):
        assert await proc.stdout.receive_some(100)
        await proc.stdout.aclose()  # like `| head -1`
        stderr = b""
        while chunk := await proc.stderr.receive_some(4096):
            stderr += chunk
        assert await proc.wait() == 255
    assert stderr.splitlines()[-1] == b"aaau: cannot write to standard output: Broken pipe"


async def test_an_empty_program_is_refused_not_a_login_shell(server: ServerProc) -> None:
    result = await run_cli(ALICE, ["-p", ""], server.socket)
    assert (result.returncode, result.stderr) == (255, b"aaau: the program string is empty\n")
    assert not server.records("session_start")


async def test_colorterm_reaches_the_agent(server: ServerProc) -> None:
    result = await run_cli(
        ALICE, ["-p", "printenv COLORTERM"], server.socket, env={"COLORTERM": "truecolor"}
    )
    assert result.returncode == 0 and b"truecolor" in result.stdout


async def test_signal_exit_maps_to_128_plus_n(server: ServerProc) -> None:
    result = await run_cli(ALICE, ["-p", "sh -c 'kill -KILL $$'"], server.socket)
    assert result.returncode == 128 + 9


async def test_argv_is_never_reparsed_by_a_shell(server: ServerProc, base_dir: Path) -> None:
    marker = base_dir / "should-not-exist"
    result = await run_cli(ALICE, ["-p", f"printf '%s|' '$(touch {marker})' 'a b'"], server.socket)
    assert result.returncode == 0
    assert f"$(touch {marker})|a b|".encode() in result.stdout
    assert not marker.exists()


async def test_client_errors_exit_255_with_one_line(server: ServerProc, base_dir: Path) -> None:
    result = await run_cli(ALICE, ["-p", "true"], base_dir / "nowhere.sock")
    assert result.returncode == 255
    assert result.stderr.decode().startswith(
        f"aaau: no aaau server is running at {base_dir / 'nowhere.sock'} (an admin starts it"
    )
    assert result.stderr.count(b"\n") == 1
    result = await run_cli(ALICE, ["-n", "no-such-session"], server.socket)
    assert result.returncode == 255
    assert result.stderr == b"aaau: no session no-such-session\n"
    result = await run_cli(ALICE, ["-p", "does-not-exist-prog"], server.socket)
    assert result.returncode == 255
    assert b"program not found: does-not-exist-prog" in result.stderr
    result = await run_cli(ALICE, ["-p", "'unterminated"], server.socket)
    assert result.returncode == 255 and b"invalid program string" in result.stderr


async def test_ls_status_and_kill(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("sleep", "60"))
    sid = welcome.session_id
    listing = await run_cli(BOB, ["ls", "--json"], server.socket)
    assert listing.returncode == 0
    (entry,) = json.loads(listing.stdout)
    assert entry["session_id"] == sid and entry["creator"] == ALICE
    assert entry["argv"] == ["sleep", "60"]
    plain = await run_cli(BOB, ["ls"], server.socket)
    assert sid.encode() in plain.stdout and b"sleep 60" in plain.stdout
    assert b"80x24" in plain.stdout and f"{ALICE}(rw)".encode() in plain.stdout
    status = await run_cli(BOB, ["status", sid], server.socket)
    assert json.loads(status.stdout)["alive"] is True
    denied = await run_cli(BOB, ["kill", sid], server.socket)
    assert denied.returncode == 255 and b"only an admin or the session's creator" in denied.stderr
    killed = await run_cli(ALICE, ["kill", sid], server.socket)
    assert killed.returncode == 0, killed.stderr
    assert f"session {sid} killed".encode() in killed.stdout
    listing = await run_cli(BOB, ["ls", "--json"], server.socket)
    assert json.loads(listing.stdout) == []


async def test_ls_prints_no_control_character_another_member_chose(server: ServerProc) -> None:
    hostile = "\x1b]0;pwned\x07\x1b[2K\x1b[1A\r\x9b2J"
    _alice, welcome = await server.create(ALICE, ("sh", "-c", "sleep 60", hostile))
    plain = await run_cli(ADA, ["ls"], server.socket)
    assert plain.returncode == 0
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", plain.stdout)
    assert "\x9b".encode() not in plain.stdout
    assert b"\\x1b]0;pwned\\x07" in plain.stdout and welcome.session_id.encode() in plain.stdout


class PtyClient:
    """The real ``aaau`` client as a user, on a terminal the test owns (the master side)."""

    def __init__(self, master: int, slave: int, proc: Any) -> None:
        self.master, self.slave, self.proc = master, slave, proc
        self.seen = bytearray()

    async def read_until(self, pattern: bytes, timeout: float = 15) -> None:
        stream = trio.lowlevel.FdStream(os.dup(self.master))
        try:
            with trio.fail_after(timeout):
                while pattern not in self.seen:
                    self.seen += await stream.receive_some(4096)
        finally:
            await stream.aclose()


@asynccontextmanager
async def client_on_a_terminal(
    user: str, args: list[str], sock: Path
) -> AsyncIterator[tuple[PtyClient, list[Any]]]:
    """Yields the client and [termios before]; appends termios after once it is gone."""
    master, slave = os.openpty()
    os.chown(os.ttyname(slave), account(user)[0], -1)
    modes = [termios.tcgetattr(slave)]
    try:
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(
                partial(
                    trio.run_process,
                    [PY, "-m", "aaau", *args],
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    check=False,
                    start_new_session=True,
                    **as_client(user, sock),
                )
            )
            yield PtyClient(master, slave, proc), modes
    finally:
        modes.append(termios.tcgetattr(slave))
        os.close(slave)
        os.close(master)


async def test_terminal_client_is_raw_shows_exact_bytes_detaches_and_restores(
    server: ServerProc,
) -> None:
    args = ["-p", "sh -c 'printf \"one\\ntwo\\n\"; exec sleep 60'"]
    async with client_on_a_terminal(ALICE, args, server.socket) as (client, modes):
        await client.read_until(b"two\r\n")
        assert b"one\r\ntwo\r\n" in client.seen and b"\r\r\n" not in client.seen
        during = termios.tcgetattr(client.slave)
        assert not during[3] & termios.ICANON and not during[1] & termios.OPOST
        match = re.search(rb"session ([A-Za-z0-9_-]{22})", bytes(client.seen))
        assert match
        sid = match.group(1).decode()
        # the window changes: the client sends a resize, the server applies and audits it
        fcntl.ioctl(client.master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        client.proc.send_signal(signal.SIGWINCH)
        (resize,) = await wait_for(lambda: server.records("resize", session_id=sid))
        assert (resize["content"], resize["user"]) == ("33x101", ALICE)
        os.write(client.master, b"\r~.")
        with trio.fail_after(10):
            assert await client.proc.wait() == 0
    before, after = modes
    assert after == before
    listing = await run_cli(ALICE, ["ls", "--json"], server.socket)  # detach keeps the session
    assert [s["session_id"] for s in json.loads(listing.stdout)] == [sid]
    (leave,) = server.records("leave", session_id=sid)
    assert leave["content"] == "detached"


async def test_terminal_is_restored_when_the_client_is_killed(server: ServerProc) -> None:
    args = ["-p", "sh -c 'echo up-and-running; exec sleep 60'"]
    async with client_on_a_terminal(ALICE, args, server.socket) as (client, modes):
        await client.read_until(b"up-and-running")
        assert termios.tcgetattr(client.slave) != modes[0]
        client.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await client.proc.wait() == 128 + signal.SIGTERM
    before, after = modes
    assert after == before


async def test_read_only_join_sees_output_and_cannot_type(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("sh", "-c", "echo visible; read x; echo got-$x"))
    await alice.expect_output(b"visible")
    async with trio.open_nursery() as nursery:
        result: list[subprocess.CompletedProcess[bytes]] = []

        async def observe() -> None:
            result.append(await run_cli(BOB, ["-n", welcome.session_id, "-r"], server.socket))

        nursery.start_soon(observe)
        await wait_for(lambda: len(server.records("join", user=BOB)) == 1)
        await alice.type(b"typed-by-alice\n")
    (res,) = result
    assert res.returncode == 0
    assert b"visible" in res.stdout and b"got-typed-by-alice" in res.stdout
    assert b"(readonly)" in res.stderr


def test_init_is_idempotent_and_keeps_the_agent_out_of_the_groups(
    accounts: dict[str, Any], base_dir: Path
) -> None:
    assert f"user {AGENT}" in accounts["init_output"]
    again = subprocess.run(
        init_argv(base_dir), capture_output=True, text=True, cwd="/", check=False
    )
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout.replace("created   ", "")
    assert f"exists  user {AGENT}" in again.stdout
    assert f"exists  agent users {POOL[0]} ... {POOL[-1]}" in again.stdout
    assert "sudo" not in again.stdout and "NOPASSWD" not in again.stdout
    uids = set()
    for user in (AGENT, *POOL):
        uid, gid, groups = account(user)
        uids.add(uid)
        assert uid != 0 and gid_of(GROUP) not in groups and gid_of(ADMIN_GROUP) not in groups
        home = os.stat(HOMES / user)
        assert (home.st_uid, stat.S_IMODE(home.st_mode)) == (uid, 0o700), user
    assert len(uids) == 1 + len(POOL)  # every agent user is a uid of its own
    run_dir = os.stat(base_dir / "init-run")
    assert stat.S_IMODE(run_dir.st_mode) == 0o750 and run_dir.st_gid == gid_of(GROUP)
    log_dir = os.stat(base_dir / "init-log")
    assert stat.S_IMODE(log_dir.st_mode) == 0o750 and log_dir.st_gid == gid_of(ADMIN_GROUP)
    assert Path(f"/etc/pam.d/{PAM_SERVICE}").read_text().count("pam_limits.so") == 1
    sysusers = (base_dir / f"etc/sysusers.d/aaau-{GROUP}.conf").read_text()
    assert all(f"u {user} - " in sysusers for user in (AGENT, *POOL))


def test_init_refuses_to_put_the_agent_in_the_human_group(
    accounts: dict[str, Any], base_dir: Path
) -> None:
    subprocess.run(["gpasswd", "-a", AGENT, GROUP], check=True, capture_output=True)
    try:
        result = subprocess.run(
            init_argv(base_dir, "etc2"), capture_output=True, text=True, cwd="/", check=False
        )
        assert result.returncode == 1
        assert "must never be in the human or admin group" in result.stderr
        assert not (base_dir / "etc2").exists()
    finally:
        subprocess.run(["gpasswd", "-d", AGENT, GROUP], check=True, capture_output=True)


@pytest.mark.parametrize("agent", [AGENT, POOL[-1]])
async def test_server_refuses_to_start_when_an_agent_user_is_in_a_human_group(
    accounts: dict[str, Any], base_dir: Path, agent: str
) -> None:
    subprocess.run(["gpasswd", "-a", agent, ADMIN_GROUP], check=True, capture_output=True)
    try:
        result = await trio.run_process(
            server_argv(base_dir / "refuse" / "s.sock", base_dir / "refuse-log"),
            capture_stderr=True,
            check=False,
            cwd="/",
        )
        assert result.returncode == 1
        assert f"agent user {agent} is a member of group".encode() in result.stderr
        assert b"could connect to its own server" in result.stderr
    finally:
        subprocess.run(["gpasswd", "-d", agent, ADMIN_GROUP], check=True, capture_output=True)


def test_init_adds_a_missing_pool_user_and_keeps_the_shared_agent(
    accounts: dict[str, Any], base_dir: Path
) -> None:
    """An install from before the pool (or with a smaller one) gets it from init again."""
    last = POOL[-1]
    subprocess.run(["userdel", last], check=True, capture_output=True)
    shared_uid = account(AGENT)[0]
    result = subprocess.run(
        init_argv(base_dir), capture_output=True, text=True, cwd="/", check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"created agent users {POOL[0]} ... {last}" in result.stdout
    assert account(last)[0] != 0 and account(AGENT)[0] == shared_uid
    assert os.stat(HOMES / last).st_uid == account(last)[0]


def test_init_writes_no_tmpfiles_line_for_a_directory_it_does_not_own(
    accounts: dict[str, Any], base_dir: Path
) -> None:
    existing = base_dir / "existing-run"  # like /run for --socket /run/aaau.sock
    existing.mkdir(mode=0o755)
    argv = init_argv(base_dir, "etc3")
    argv[argv.index("--socket") + 1] = str(existing / "aaau.sock")
    result = subprocess.run(argv, capture_output=True, text=True, cwd="/", check=False)
    assert result.returncode == 0, result.stderr
    conf = (base_dir / f"etc3/tmpfiles.d/aaau-{GROUP}.conf").read_text()
    assert str(existing) not in conf
    assert f"not ours  {existing} (it existed before" in result.stdout
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o755  # left as it was


async def test_permission_denied_says_which_group_and_what_to_do(server: ServerProc) -> None:
    result = await run_cli(EVE, ["ls"], server.socket)  # not in the group
    assert result.returncode == 255
    assert result.stderr.decode() == (
        f"aaau: cannot reach {server.socket}: permission denied: you ({EVE}) are not in group "
        f"{GROUP} (admins: in the admin group); ask an admin to run `usermod -aG {GROUP} {EVE}`, "
        "then log in again\n"
    )
    subprocess.run(["gpasswd", "-a", EVE, GROUP], check=True, capture_output=True)
    try:  # in the group now, but this "login" (its process's groups) predates it
        kwargs = as_client(EVE, server.socket)
        kwargs["extra_groups"] = []
        stale = await trio.run_process(
            [PY, "-m", "aaau", "ls"], capture_stderr=True, check=False, **kwargs
        )
    finally:
        subprocess.run(["gpasswd", "-d", EVE, GROUP], check=True, capture_output=True)
    assert stale.returncode == 255
    assert f"you were added to group {GROUP} after this login: log in again" in (
        stale.stderr.decode()
    )


# --- subcommands, run --, detached sessions ------------------------------------------------------


@pytest.mark.parametrize("command", ["ls", "status", "kill", "join", "asys", "run"])
async def test_each_subcommand_has_its_own_help(server: ServerProc, command: str) -> None:
    result = await run_cli(ALICE, [command, "--help"], server.socket)
    assert result.returncode == 0
    assert result.stdout.decode().startswith(f"usage: aaau {command} ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kill"], "aaau kill: the following arguments are required: ID (try aaau kill --help)"),
        (["--bogus"], "aaau: unrecognized arguments: --bogus (try aaau --help)"),
        (["-r", "-p", "cat"], "aaau: -r joins read-only: give the session with -n ID"),
        (["run", "--"], "aaau run: the following arguments are required: CMD"),
    ],
)
async def test_usage_errors_exit_255_with_one_line(
    server: ServerProc, args: list[str], message: str
) -> None:
    result = await run_cli(ALICE, args, server.socket)
    assert result.returncode == 255
    assert result.stderr.decode().startswith(message) and result.stderr.count(b"\n") == 1
    assert not result.stdout


async def test_run_passes_argv_exactly_as_given(server: ServerProc, base_dir: Path) -> None:
    marker = base_dir / "run-should-not-exist"
    result = await run_cli(
        ALICE, ["run", "--", "printf", "%s|", "a b", f"$(touch {marker})", "-x"], server.socket
    )
    assert result.returncode == 0, result.stderr
    assert f"a b|$(touch {marker})|-x|".encode() in result.stdout
    assert not marker.exists()


async def test_a_detached_session_prints_its_id_and_keeps_running(server: ServerProc) -> None:
    result = await run_cli(
        ALICE, ["run", "-d", "--", "sh", "-c", "echo up; exec sleep 600"], server.socket
    )
    assert result.returncode == 0, result.stderr
    sid = result.stdout.decode().strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", sid), sid  # a session id, and nothing else
    listed = await run_cli(ALICE, ["ls", "--json"], server.socket)
    assert sid in [s["session_id"] for s in json.loads(listed.stdout)]
    status = await run_cli(ALICE, ["status", sid], server.socket)
    assert json.loads(status.stdout)["alive"] is True
    as_json = await run_cli(ALICE, ["-d", "--json", "-p", "sleep 600"], server.socket)
    other = json.loads(as_json.stdout)
    assert other["role"] == "interactive" and other["session_id"] != sid
    for session in (sid, other["session_id"]):
        killed = await run_cli(ALICE, ["kill", "--json", session], server.socket)
        assert killed.returncode == 0, killed.stderr
        reply = json.loads(killed.stdout)
        assert reply["session_id"] == session and reply["done"] is True
    await wait_for(lambda: len(server.records("session_end")) >= 2)


async def test_no_program_says_a_login_shell_starts(server: ServerProc) -> None:
    result = await run_cli(ALICE, [], server.socket, stdin=b"exit 3\n")
    assert result.stderr.decode().startswith("aaau: no program given: starting the agent user's")
    assert result.returncode == 3

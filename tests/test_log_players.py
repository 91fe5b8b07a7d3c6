"""``aaau log`` against a real server's log, with real players in real terminals.

Alice runs bash through the real client in a tmux pane and prints a screenful,
in colour; the screen is captured; an admin kills the session. Then the
session's export plays in ``asciinema`` (2.x, from PyPI) and in ``tlog-play``,
and ``aaau log replay`` plays it, each in a pane of the session's size: each
must end on the text the live pane showed. Only admins may read the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
from pathlib import Path

import trio

from .helpers import (
    ADA,
    ADMIN_GROUP,
    ALICE,
    BOB,
    GROUP,
    PY,
    ServerProc,
    gid_of,
    root,
    run_cli,
    start_daemon,
    wait_for,
)
from .terminals import Tmux, client_command

pytestmark = root

ASCIINEMA = shutil.which("asciinema") or str(Path(PY).parent / "asciinema")


def _text(lines: list[str]) -> list[str]:
    """A screen's text: trailing blanks and blank last lines do not count."""
    out = [line.rstrip() for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


async def _live_session(server: ServerProc, tmux: Tmux) -> tuple[str, list[str]]:
    """Alice's bash session, a screenful printed; its id and the screen as it was.

    The screen is taken before the kill: the client writes its own notice after it."""
    os.chown(server.log_dir, 0, gid_of(ADMIN_GROUP))  # as init makes it: root:admins 0750
    tmux.start("live", client_command(ALICE, server.socket, "-p", "bash --norc --noprofile -i"))
    await tmux.until_text("live", "$")
    tmux.keys(
        "live",
        "for i in $(seq 1 60); do printf 'row %02d \\033[1;3%dmcolour\\033[0m \\u00e9t\\u00e9\\n'"
        " $i $((i % 7)); done; echo all-printed",
    )
    tmux.key("live", "Enter")
    await tmux.until_text("live", "all-printed\n")
    await wait_for(lambda: _text(tmux.screen("live"))[-1].endswith("$"))
    # bash would write as it goes (SIGHUP): let what runs when it ends write nothing
    tmux.keys("live", "exec sleep 600")
    tmux.key("live", "Enter")
    await wait_for(lambda: server.records("input", content="\r"))
    await wait_for(lambda: _text(tmux.screen("live"))[-1].endswith("exec sleep 600"))
    (start,) = server.records("session_start", user=ALICE)
    sid = str(start["session_id"])
    screen = _text(tmux.screen("live"))
    result = await run_cli(ADA, ["kill", sid], server.socket)
    assert result.returncode == 0, result.stderr
    await wait_for(lambda: server.records("session_end", session_id=sid))
    return sid, screen


async def _plays_to(tmux: Tmux, name: str, command: str, screen: list[str]) -> None:
    tmux.start(name, shlex.join(["sh", "-c", f"{command}; exec sleep 600"]))
    with contextlib.suppress(trio.TooSlowError):  # said below, with both screens
        await wait_for(lambda: _text(tmux.screen(name)) == screen, 30)
    got = _text(tmux.screen(name))
    assert got == screen, "\n".join([f"{name}: expected:", *screen, "got:", *got])


async def test_exports_and_replay_end_on_the_live_screen(
    server: ServerProc, tmux: Tmux, tmp_path: Path
) -> None:
    sid, screen = await _live_session(server, tmux)
    log = [PY, "-m", "aaau", "log", "--log-dir", str(server.log_dir)]
    cast, tlog = tmp_path / "s.cast", tmp_path / "s.tlog"
    for fmt, path in (("asciicast-v2", cast), ("tlog", tlog)):
        result = await run_cli(
            ADA, ["log", "--log-dir", str(server.log_dir), "export", sid, "--format", fmt],
            server.socket,
        )
        assert result.returncode == 0, result.stderr
        path.write_bytes(result.stdout)
    header = json.loads(cast.read_text().splitlines()[0])
    assert (header["width"], header["height"]) == (100, 30)
    await _plays_to(tmux, "asciinema", f"{ASCIINEMA} play {cast}", screen)
    # --follow: it waits for more, so its own goodbye newline does not scroll the screen
    await _plays_to(tmux, "tlog", f"tlog-play --follow -r file -i {tlog}", screen)
    await _plays_to(tmux, "replay", shlex.join([*log, "replay", sid, "--speed", "50"]), screen)
    # from a point late in the session: drawn from the model, then played
    await _plays_to(
        tmux, "replay-from", shlex.join([*log, "replay", sid, "--from", "@9999999999"]), screen
    )


async def test_only_admins_read_the_log_and_verify_holds(server: ServerProc, tmux: Tmux) -> None:
    sid, _ = await _live_session(server, tmux)
    args = ["log", "--log-dir", str(server.log_dir)]
    refused = await run_cli(BOB, [*args, "ls"], server.socket)
    assert refused.returncode == 255
    assert f"is for root and the admin group {ADMIN_GROUP!r}; {BOB} is not in it" in (
        refused.stderr.decode()
    )
    listed = await run_cli(ADA, [*args, "ls", "--json"], server.socket)
    assert listed.returncode == 0, listed.stderr
    (session,) = json.loads(listed.stdout)
    assert session["session_id"] == sid and session["end"].startswith("killed by signal")
    assert session["host"] == os.uname().nodename
    verified = await run_cli(ADA, [*args, "verify"], server.socket)
    assert verified.returncode == 0 and verified.stdout.decode().endswith("the chain holds\n")


async def test_logrotate_with_inits_file_rotates_a_running_servers_logs_and_the_chain_holds(
    accounts: dict[str, object], base_dir: Path
) -> None:
    """The file init installed, run by the real logrotate (forced, twice: the second
    compresses the first rotation) against a running daemon: no signal is sent."""
    conf = base_dir / "etc" / "logrotate.d" / f"aaau-{GROUP}"
    log_dir = base_dir / "init-log"  # init's log directory: root:admins 0750
    assert f"{log_dir}/audit.jsonl {{" in conf.read_text()
    sock = base_dir / "rotate-run" / "aaau.sock"
    pid = await start_daemon(sock, log_dir)
    state = base_dir / "logrotate.state"
    try:
        for _ in range(2):
            await trio.run_process(["logrotate", "-f", "-s", str(state), str(conf)])
            await wait_for(lambda: "log-reopened" in _read(log_dir / "server.log"))
            await wait_for(lambda: "audit_reopened" in _read(log_dir / "audit.jsonl"))
            peer = await trio.run_process(  # something happens after the rotation
                [PY, "-m", "aaau", "-s", str(sock), "ls"], check=False, capture_stdout=True
            )
            assert peer.returncode == 0
        assert (log_dir / "audit.jsonl.2.gz").exists() and (log_dir / "audit.jsonl.1").exists()
        assert stat.S_IMODE((log_dir / "audit.jsonl").stat().st_mode) == 0o640
        assert (log_dir / "audit.jsonl").stat().st_gid == gid_of(ADMIN_GROUP)
        verify = await trio.run_process(
            [PY, "-m", "aaau", "log", "--log-dir", str(log_dir), "verify"],
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        out = verify.stdout.decode()
        assert verify.returncode == 0, out + verify.stderr.decode()
        assert out.count("audit.jsonl") >= 3  # the three files, checked as one chain
    finally:
        os.kill(pid, signal.SIGTERM)
    await wait_for(lambda: not sock.exists())


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""

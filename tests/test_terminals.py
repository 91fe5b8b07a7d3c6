"""The terminal as people see it, in real terminals: tmux panes running the real client.

Root: real users, the real server, agents under pool users. Each client runs
through ``runuser`` in a pane tmux (root) owns. Screens are compared as tmux
shows them (``capture-pane -e``: text and attributes) with the pane's mode
flags (alternate screen, cursor, keypad, mouse) and cursor.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from .helpers import ADA, ALICE, BOB, ServerFactory, ServerProc, root, run_cli, wait_for
from .terminals import RESTORED, Tmux, and_stay, client_command, same_screen

pytestmark = root

INKISH = (Path(__file__).parent / "programs" / "inkish.py").read_text()
#: about 340 KiB of lines, the file vim and less show
BIG_FILE = "seq -f 'line %06g of a file long enough to scroll for a while, more than once' 1 4500"


def _sid(server: ServerProc, user: str, n: int = 1) -> str:
    starts = server.records("session_start", user=user)
    assert len(starts) >= n, starts
    return str(starts[n - 1]["session_id"])


async def _start(server: ServerProc, tmux: Tmux, program: list[str]) -> str:
    """Alice runs ``program`` in pane a (100x30); the new session's id."""
    before = len(server.records("session_start", user=ALICE))
    tmux.start("a", client_command(ALICE, server.socket, "-p", shlex.join(program)))
    await wait_for(lambda: len(server.records("session_start", user=ALICE)) > before)
    return _sid(server, ALICE, before + 1)


def _output_bytes(server: ServerProc, session_id: str) -> int:
    return sum(
        len(r["content"]) for r in server.records("output", session_id=session_id)
    )


async def _join_both(server: ServerProc, tmux: Tmux, sid: str) -> None:
    """Ada (an admin: Interactive or more) joins at the same size, Bob (read-only) smaller."""
    tmux.start("b", client_command(ADA, server.socket, "-n", sid), 100, 30)
    tmux.start("c", client_command(BOB, server.socket, "-r", "-n", sid), 60, 15)
    await wait_for(lambda: len(server.records("join", session_id=sid)) >= 3)


def _cropped(tmux: Tmux, big: str, rows: int, cols: int) -> list[str]:
    """What a smaller terminal shows of pane ``big``: the rows down to the cursor, cropped."""
    lines = tmux.screen(big)
    flags = tmux.flags(big)
    cursor, height = int(flags["cursor_y"]), len(lines)
    top = max(0, min(cursor - rows + 1, height - rows))
    return [line[:cols].rstrip() for line in lines[top : top + rows]]


async def _smaller_matches(tmux: Tmux, big: str, small: str) -> None:
    def matches() -> bool:
        theirs = [line.rstrip() for line in tmux.screen(small)]
        flags_big, flags_small = tmux.flags(big), tmux.flags(small)
        same_modes = all(flags_big[k] == flags_small[k] for k in ("alternate_on", "cursor_flag"))
        return same_modes and theirs == _cropped(tmux, big, 15, 60)

    try:
        await wait_for(matches, 20)
    except trio.TooSlowError:
        raise AssertionError(
            "\n".join(["expected:", *_cropped(tmux, big, 15, 60), "got:", *tmux.screen(small)])
        ) from None


async def _drive(tmux: Tmux, program: str) -> None:
    """Make the program in pane a write well over 256 KiB after it set its modes."""
    if program == "inkish":
        await tmux.until_text("a", "600 done")
    elif program in ("vim", "less"):
        await tmux.until_text("a", "line 000001")
        tmux.keys("a", ":!cat /tmp/f.txt" if program == "vim" else "!cat /tmp/f.txt")
        tmux.key("a", "Enter")
        await tmux.until_text("a", "line 004500")
        await wait_for(lambda: re.search(r"ENTER|RETURN", "".join(tmux.screen("a"))), 20)
        tmux.key("a", "Enter")  # back to the program, which redraws
        await tmux.until_text("a", "line 000001")
        tmux.keys("a", "50%" if program == "vim" else "50p")
        await tmux.until_text("a", "line 0022")
    elif program == "top":
        await tmux.until_text("a", "PID")
    else:  # bash: 500 lines on the screen and in its history, after 280 KiB of output
        await tmux.until_text("a", "$")
        tmux.keys("a", "for i in $(seq 1 3500); do printf 'line %04d %070d\\n' $i 0; done")
        tmux.key("a", "Enter")
        await tmux.until_text("a", "line 3500")


PROGRAMS = {
    # Ink-style: relative motion, main screen, redraws only on a real size change
    "inkish": ["/usr/bin/python3", "-c", INKISH],
    "vim": ["sh", "-c", f"{BIG_FILE} > /tmp/f.txt; exec vim -u NONE -N -n -i NONE /tmp/f.txt"],
    "less": ["sh", "-c", f"{BIG_FILE} > /tmp/f.txt; exec less /tmp/f.txt"],
    "top": ["sh", "-c", f"{BIG_FILE}; exec top -d 100"],
    "bash": ["bash", "--norc", "--noprofile", "-i"],
}


@pytest.mark.parametrize("program", PROGRAMS)
async def test_a_late_joiner_sees_the_creators_screen(
    server: ServerProc, tmux: Tmux, program: str
) -> None:
    """Joined after > 256 KiB of output: the same cells, attributes, cursor and modes;
    a smaller joiner sees the part around the cursor; nobody's terminal typed anything."""
    sid = await _start(server, tmux, PROGRAMS[program])
    await _drive(tmux, program)
    await _join_both(server, tmux, sid)
    await same_screen(tmux, "a", "b")
    if program in ("inkish", "bash"):  # the main screen: the history above it, too
        await same_screen(tmux, "a", "b", history=100)
    await _smaller_matches(tmux, "a", "c")
    assert not server.records("input", user=ADA) and not server.records("input", user=BOB)


#: a full-screen program's modes, all on: what a client must undo on its way out
TUI = (
    "printf '\\033[?1049h\\033[?25l\\033[?1h\\033=\\033[?1000h\\033[?1006h\\033[?2004h"
    "\\033[?1004h\\033[1;44mthe-tui-screen\\033[0m'; stty -echo; exec cat >/dev/null"
)


async def _attached(tmux: Tmux, name: str, command: str, *, fresh: bool) -> None:
    """The client in pane ``name`` shows the TUI (its terminal is raw by then)."""
    if fresh:
        tmux.start(name, command)
    else:
        tmux.respawn(name, command)
    await tmux.until_text(name, "the-tui-screen")
    await wait_for(lambda: tmux.flags(name)["alternate_on"] == "1")


def _restored(flags: dict[str, str]) -> dict[str, str]:
    return {k: flags[k] for k in RESTORED}


async def test_detach_50_times_exits_0_and_puts_the_terminal_back(
    server: ServerProc, tmux: Tmux
) -> None:
    """From panes tmux (root) owns, through runuser: the client uses fd 0, never the
    terminal's name, which Alice may not open."""
    _alice, welcome = await server.create(ALICE, ("sh", "-c", TUI))
    sid = welcome.session_id
    command = and_stay(client_command(ALICE, server.socket, "-n", sid))
    for i in range(50):
        await _attached(tmux, "a", command, fresh=i == 0)
        if i == 0:
            tty = tmux.tty("a")
            assert os.stat(tty).st_uid == 0
            denied = subprocess.run(["runuser", "-u", ALICE, "--", "test", "-r", tty], check=False)
            assert denied.returncode != 0  # she could not reopen it by name
        tmux.keys("a", "~.")
        assert await tmux.until_exit("a") == 0, tmux.screen("a")
        assert _restored(tmux.flags("a")) == RESTORED
        assert f"[detached from session {sid}]" in "\n".join(tmux.screen("a"))
    assert len(server.records("leave", session_id=sid, content="detached")) == 50
    assert not server.records("input", session_id=sid)  # nothing reached the agent


async def test_a_kill_says_who_and_puts_the_terminal_back(server: ServerProc, tmux: Tmux) -> None:
    _alice, welcome = await server.create(ALICE, ("sh", "-c", TUI))
    command = and_stay(client_command(ALICE, server.socket, "-n", welcome.session_id))
    await _attached(tmux, "a", command, fresh=True)
    killed = await run_cli(ADA, ["kill", welcome.session_id], server.socket)
    assert killed.returncode == 0, killed.stderr
    # the agent's end, as a shell gives it: 128 + SIGHUP
    assert await tmux.until_exit("a") == 128 + signal.SIGHUP
    assert _restored(tmux.flags("a")) == RESTORED
    assert f"[session killed by {ADA} (admin)]" in "\n".join(tmux.screen("a"))


async def test_a_server_shutdown_is_said_and_the_terminal_put_back(
    start_server: ServerFactory, tmux: Tmux
) -> None:
    server = await start_server()
    _alice, welcome = await server.create(ALICE, ("sh", "-c", TUI))
    command = and_stay(client_command(ALICE, server.socket, "-n", welcome.session_id))
    await _attached(tmux, "a", command, fresh=True)
    server.process.send_signal(signal.SIGTERM)
    assert await tmux.until_exit("a") == 128 + signal.SIGHUP
    assert _restored(tmux.flags("a")) == RESTORED
    assert "[session ended: the server is shutting down]" in "\n".join(tmux.screen("a"))


async def test_an_interactive_rejoin_after_queries_types_nothing(
    server: ServerProc, tmux: Tmux
) -> None:
    """The agent asked a terminal for DA, CPR, XTVERSION and the clipboard before anyone
    with a terminal joined; two Interactive joiners' terminals (tmux answers such queries)
    send the agent nothing, and the audit shows no input."""
    queries = "\\033[c\\033[>c\\033[6n\\033[>q\\033]52;c;?\\007"
    script = f"stty -echo; printf '{queries}queries-asked\\n'; exec cat -v"
    _alice, welcome = await server.create(ALICE, ("sh", "-c", script))
    sid = welcome.session_id
    await wait_for(lambda: server.records("output", session_id=sid))
    tmux.start("a", client_command(ALICE, server.socket, "-n", sid))
    tmux.start("b", client_command(ADA, server.socket, "-n", sid))
    for pane in ("a", "b"):
        await tmux.until_text(pane, "queries-asked")
    await same_screen(tmux, "a", "b")
    tmux.keys("a", "typed\r")  # what alice types does arrive, shown by cat -v
    await tmux.until_text("b", "typed")
    inputs = server.records("input", session_id=sid)
    assert [(r["user"], r["content"]) for r in inputs] == [(ALICE, "typed\r")]
    assert "^[" not in "\n".join(tmux.screen("a"))  # cat -v saw no answer from a terminal


async def test_detach_right_after_a_tui_started_and_asked_the_terminal(
    server: ServerProc, tmux: Tmux
) -> None:
    """The terminal's automatic answers are not typing: ~. works without Enter first."""
    asks = "printf '\\033[c\\033[>c\\033[6n'; " + TUI
    command = and_stay(client_command(ALICE, server.socket, "-p", shlex.join(["sh", "-c", asks])))
    before = len(server.records("session_start", user=ALICE))
    await _attached(tmux, "a", command, fresh=True)
    sid = _sid(server, ALICE, before + 1)
    # tmux answered: alice's terminal's answers reached the agent, as her input
    answers = await wait_for(lambda: server.records("input", session_id=sid))
    assert {r["user"] for r in answers} == {ALICE} and "\x1b[" in answers[0]["content"]
    tmux.keys("a", "~.")
    assert await tmux.until_exit("a") == 0
    assert _restored(tmux.flags("a")) == RESTORED
    assert "~" not in "".join(r["content"] for r in server.records("input", session_id=sid))

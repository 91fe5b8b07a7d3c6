"""The terminal as people see it, in-process: the output filter, a joiner's screen, pipe mode.

No root (see tests/inprocess.py): the agent is a real program on a real PTY.
"""

from __future__ import annotations

from pathlib import Path

import avt
import pytest
import trio

from aaau import messages as m
from aaau.vtscan import Effect, Scanner

from .helpers import wait_for
from .inprocess import InProcess, V, open_in_process

#: what a hostile agent prints: every kind of sequence the filter knows
CLIP_WRITE = b"\x1b]52;c;c2VjcmV0\x07"
CLIP_QUERY = b"\x1b]52;c;?\x07"
QUERIES = b"\x1b[c\x1b[>c\x1b[6n\x1b[>q"
TITLE = b"\x1b]0;pwned\x07"
LINK = b"\x1b]8;;https://example.com\x07link\x1b]8;;\x07"
EVERYTHING = CLIP_WRITE + CLIP_QUERY + QUERIES + TITLE + LINK


@pytest.fixture
def ip(tmp_path: Path, nursery: trio.Nursery) -> InProcess:
    return open_in_process(tmp_path, nursery)


def _printf(data: bytes) -> str:
    return "".join(f"\\{b:03o}" for b in data)


def _effects(output: bytes) -> set[Effect | None]:
    return {effect for _, effect in Scanner().feed(output)}


async def test_each_role_gets_the_output_less_what_it_must_not_receive(ip: InProcess) -> None:
    script = f"read go; printf '{_printf(EVERYTHING)}'; echo; echo printed-all; exec cat"
    alice, welcome = await ip.create("alice", ("sh", "-c", script))
    bob, reply = await ip.join("bob", welcome.session_id)  # a member: ReadOnly here
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.READONLY
    await alice.type(b"go\n")
    for peer in (alice, bob):
        await peer.expect_output(b"printed-all")
    creator, observer = bytes(alice.output), bytes(bob.output)
    # the creator (Interactive): everything but the clipboard query
    assert CLIP_WRITE in creator and QUERIES in creator and TITLE in creator and LINK in creator
    assert CLIP_QUERY not in creator
    # the observer: no clipboard at all, no query; titles and links by default
    assert _effects(observer) & {Effect.CLIPBOARD_WRITE, Effect.CLIPBOARD_QUERY, Effect.QUERY} == set()
    assert TITLE in observer and LINK in observer
    notes = {r["metadata"]["effect"] for r in ip.records("output_filtered")}
    assert notes == {"clipboard_write", "clipboard_query", "query"}
    await alice.send(m.ForceKill())
    await alice.expect(m.Exited)
    (end,) = ip.records("session_end", session_id=welcome.session_id)
    assert end["metadata"]["filtered"] == {"clipboard_query": 2, "clipboard_write": 1, "query": 4}


async def test_the_filter_is_configurable(tmp_path: Path, nursery: trio.Nursery) -> None:
    ip = open_in_process(tmp_path, nursery, titles_to="none", clipboard_writes_to="all")
    script = f"read go; printf '{_printf(TITLE + CLIP_WRITE)}'; echo printed-all; exec cat"
    alice, welcome = await ip.create("alice", ("sh", "-c", script))
    bob, _ = await ip.join("bob", welcome.session_id)
    await alice.type(b"go\n")
    for peer in (alice, bob):
        await peer.expect_output(b"printed-all")
        assert TITLE not in peer.output and CLIP_WRITE in peer.output


async def test_a_joiner_gets_the_screen_not_the_queries_in_the_history(ip: InProcess) -> None:
    """An Interactive rejoin after queries: nothing in what it gets makes a terminal answer."""
    script = (
        f"printf '{_printf(QUERIES + CLIP_QUERY)}'; printf '\\033[?1049h\\033[?2004h\\033[H';"
        " echo on-the-screen; exec cat"
    )
    alice, welcome = await ip.create("alice", ("sh", "-c", script))
    await alice.expect_output(b"on-the-screen")
    ada, reply = await ip.join("ada", welcome.session_id)  # an admin: Interactive or more
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.ADMIN
    await ada.expect_output(b"on-the-screen")
    await ada.expect_output(b"\x1b[?2004h")  # the mode, set again for her terminal
    assert _effects(bytes(ada.output)) <= {None, Effect.MODE}
    assert b"\x1b[?1049h" in ada.output
    assert not ip.records("input")  # nobody typed anything


async def test_a_smaller_joiner_gets_a_screen_of_its_size(ip: InProcess) -> None:
    rows = "".join(f"\\033[{r + 1};1Hrow-{r:02d}" for r in range(24))
    script = f"printf '\\033[?1049h{rows}\\033[24;1H'; echo; exec cat"
    alice, welcome = await ip.create("alice", ("sh", "-c", script))
    await alice.expect_output(b"row-23")
    bob = await ip.connect("bob", m.Join(V, welcome.session_id, rows=10, cols=40))
    welcome_bob = await bob.expect(m.Welcome)
    assert (welcome_bob.rows, welcome_bob.cols) == (24, 80)  # the session's size, to say so
    await bob.expect_output(b"row-23")
    terminal = avt.Vt(40, 10)
    terminal.feed_str(bob.output.decode())
    # the 10 rows down to the cursor (what is above scrolled away); the cursor on the last
    assert [line.text.rstrip() for line in terminal.view()] == [
        *(f"row-{r}" for r in range(15, 24)),
        "",
    ]
    assert terminal.cursor.row == 9


async def test_a_pipe_session_does_not_echo_and_keeps_its_newlines(ip: InProcess) -> None:
    alice, _ = await ip.create("alice", ("cat",), pipe=True)
    await alice.type(b"one\ntwo\n")
    await alice.expect_output(b"two\n", timeout=3)
    assert bytes(alice.output) == b"one\ntwo\n"  # no echo, no CR


async def test_a_pipe_session_ends_when_its_client_goes_unless_kept(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",), pipe=True)
    kept, kept_welcome = await ip.create("alice", ("cat",), pipe=True, keep=True)
    for peer in (alice, kept):
        await peer.aclose()
    (end,) = await wait_for(lambda: ip.records("session_end", session_id=welcome.session_id))
    assert end["metadata"]["end_reason"].startswith("ended: its last client, in pipe mode, left")
    assert ip.hub.sessions.find(kept_welcome.session_id).alive



@pytest.mark.parametrize("program", [("bash", "-l"), ("python3",)], ids=" ".join)
async def test_a_pipe_at_end_of_input_ends_a_readline_program_20_of_20(
    ip: InProcess, program: tuple[str, ...]
) -> None:
    """End of input waits until the program reads: readline's terminal mode is set by then."""
    for _ in range(20):
        peer, _welcome = await ip.create("alice", program, pipe=True)
        await peer.send(m.InputEof())  # stdin was /dev/null
        assert await peer.expect(m.Exited) == m.Exited(code=0, signal=None)
        await peer.aclose()


async def test_end_of_input_lasts_in_a_pipe_session_until_someone_types(ip: InProcess) -> None:
    script = "cat; echo cat-done; read x; echo read-status-$?; exec cat"
    alice, welcome = await ip.create("alice", ("sh", "-c", script), pipe=True, keep=True)
    await alice.type(b"data\n")
    await alice.send(m.InputEof())
    await alice.expect_output(b"read-status-1")  # the second reader saw end of input too
    ada, _ = await ip.join("ada", welcome.session_id)
    await ada.type(b"typed-later\n")  # input again: end of input no longer holds
    await alice.expect_output(b"typed-later")
    assert ip.hub.sessions.find(welcome.session_id).alive


def _screen_of(output: bytes, cols: int, rows: int) -> list[str]:
    terminal = avt.Vt(cols, rows)
    terminal.feed_str(output.decode("utf-8", "replace"))
    return [line.text.rstrip() for line in terminal.view()]


async def test_a_smaller_joiner_is_sent_views_that_follow_the_output(ip: InProcess) -> None:
    """Output drawn for 80 columns would wrap on 40: the joiner gets it redrawn instead."""
    alice, welcome = await ip.create("alice", ("sh", "-c", "read go; exec cat"))
    bob = await ip.connect("bob", m.Join(V, welcome.session_id, rows=10, cols=40))
    await bob.expect(m.Welcome)
    long_line = "x" * 30 + "-tail-of-a-long-line-" + "y" * 20  # 71 columns
    await alice.type(f"go\n{long_line}\n".encode())
    await alice.expect_output(long_line.encode() + b"\r\n" + long_line.encode())
    await bob.expect_output(b"-tail-")

    def bob_sees_the_crop() -> bool:
        screen = _screen_of(bytes(bob.output), 40, 10)
        return screen[:3] == ["go", long_line[:40], long_line[:40]]

    await bob.until(bob_sees_the_crop)
    assert long_line.encode() not in bob.output  # never the raw line, which would wrap


async def test_a_viewport_as_large_as_the_session_switches_back_to_the_output(
    ip: InProcess,
) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    bob = await ip.connect("bob", m.Join(V, welcome.session_id, rows=10, cols=40))
    await bob.expect(m.Welcome)
    await bob.send(m.Viewport(rows=24, cols=80))  # bob's terminal grew
    await alice.type(b"after-the-viewport\n")
    await bob.expect_output(b"after-the-viewport\r\nafter-the-viewport\r\n")  # raw output
    (control,) = [r for r in ip.records("control", user="bob") if r["content"] == "viewport"]
    assert control["role"] == "readonly"


async def test_a_resize_to_a_larger_size_sends_the_smaller_clients_views(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    bob = await ip.connect("bob", m.Join(V, welcome.session_id, rows=24, cols=80))
    await bob.expect(m.Welcome)
    await alice.send(m.Resize(rows=50, cols=200))  # alice's terminal grew; bob's did not
    session = ip.hub.sessions.find(welcome.session_id)
    await wait_for(lambda: session.cols == 200)
    viewing = {a.identity.user: a.viewing for a in session.members}
    assert viewing == {"alice": False, "bob": True}
    line = "z" * 150
    await alice.type(line.encode() + b"\n")
    await bob.until(lambda: "z" * 80 in _screen_of(bytes(bob.output), 80, 24))
    assert line.encode() not in bob.output


async def test_a_terminal_query_goes_to_one_interactive_client_the_last_typist(
    ip: InProcess,
) -> None:
    """Two people's terminals would both answer: the query goes to whoever typed last."""
    script = "while read line; do printf '\\033[c\\033[6n%s\\n' \"$line\"; done"
    alice, welcome = await ip.create("alice", ("sh", "-c", script), share=True)
    bob, reply = await ip.join("bob", welcome.session_id)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.INTERACTIVE
    await alice.type(b"from-alice\n")
    for peer in (alice, bob):  # the echo, then the program's line
        await peer.until(lambda p=peer: p.output.count(b"from-alice") == 2)
    assert b"\x1b[c\x1b[6nfrom-alice" in alice.output
    assert b"\x1b[c" not in bob.output and b"\x1b[6n" not in bob.output
    await bob.type(b"from-bob\n")
    for peer in (alice, bob):
        await peer.until(lambda p=peer: p.output.count(b"from-bob") == 2)
    assert b"\x1b[c\x1b[6nfrom-bob" in bob.output
    assert b"\x1b[6nfrom-bob" not in alice.output

"""The screen model and the mode tracker: what a joiner's terminal is given.

Pure and synchronous. The main property: a rendering, fed to a fresh terminal
of the same size, shows the same cells, attributes and cursor as the model.
"""

from __future__ import annotations

import avt
import pytest

from aaau.modes import Modes
from aaau.screen import Screen
from aaau.vtscan import Effect, Scanner


def screen(cols: int = 40, rows: int = 10, **kw: float) -> Screen:
    budget = {"history": 20, "rate": 1e12, "burst": 1e12, "backlog": 1 << 20, **kw}
    return Screen(
        cols,
        rows,
        history=int(budget["history"]),
        rate=budget["rate"],
        burst=budget["burst"],
        backlog=int(budget["backlog"]),
    )


def fed(s: Screen, data: bytes, now: float = 0.0) -> Screen:
    s.feed(Scanner().feed(data), now)
    return s


def replay(rendering: bytes, cols: int, rows: int) -> avt.Vt:
    """The joiner's terminal: a fresh one, given the rendering."""
    vt = avt.Vt(cols, rows, scrollback_limit=100)
    vt.feed_str(rendering.decode())
    return vt


def cells(vt: avt.Vt) -> list[list[tuple[str, object]]]:
    return [[(c.char, repr(c.pen)) for c in line.cells] for line in vt.view()]


def model_of(s: Screen) -> avt.Vt:
    s.catch_up()
    return s._vt


WORKLOADS = {
    "lines": b"".join(b"line %d of the log\r\n" % i for i in range(60)) + b"$ ",
    "colours": b"\x1b[1;31mred\x1b[0m \x1b[38;5;200mpink\x1b[0m \x1b[38;2;1;2;3mrgb\x1b[7m inv \x1b[0m\r\n"
    b"\x1b[44m  blue bar  \x1b[0m\r\nplain",
    "wide": "\u4e2d\u6587 wide \u00e9t\u00e9 \U0001f600 end\r\nnext".encode(),
    "full screen": b"\x1b[?1049h\x1b[H\x1b[2J"
    + b"".join(b"\x1b[%d;1H\x1b[7m%3d\x1b[0m text of row %d\x1b[K" % (r + 1, r, r) for r in range(9))
    + b"\x1b[10;1H-- INSERT --\x1b[4;8H",
    "relative motion": b"\x1b[?1049h\x1b[H\x1b[2Jheader\r\n\r\n\r\nbox\x1b[2A\x1b[3Dup\x1b[1B\x1b[5Cside"
    + b"\x1b[1;4H\x1b[1K",
    "charset": b"\x1b(0lqqk\r\nx  x\r\nmqqj",
    "no autowrap": b"\x1b[?7l" + b"y" * 60 + b"\r\nz",
    "region": b"\x1b[2;8rtop\x1b[8;1H" + b"".join(b"scroll %d\r\n" % i for i in range(20)),
}


@pytest.mark.parametrize("name", WORKLOADS)
def test_a_rendering_gives_a_fresh_terminal_the_same_screen(name: str) -> None:
    s = fed(screen(), WORKLOADS[name])
    model = model_of(s)
    joiner = replay(s.render(40, 10), 40, 10)
    assert cells(joiner) == cells(model)
    assert (joiner.cursor.row, joiner.cursor.col) == (model.cursor.row, model.cursor.col)
    assert joiner.cursor.visible == model.cursor.visible
    # and the terminal is in the same state: what the program writes next lands the same
    then = "\r\nmore 1\r\nmore 2\r\nmore 3 and a rather long line that has to wrap\x1bMq\x1b[5;2H~"
    model.feed_str(then)
    joiner.feed_str(then)
    assert cells(joiner) == cells(model)


def test_a_plain_shell_gives_its_recent_history_lines_too() -> None:
    s = fed(screen(history=20), WORKLOADS["lines"])
    joiner = replay(s.render(40, 10), 40, 10)
    text = [line.text.rstrip() for line in joiner.lines()]
    assert text[-1] == "$" and text[-2] == "line 59 of the log"
    assert "line 31 of the log" in text  # 20 history lines above the 10 of the screen
    assert "line 29 of the log" not in text


def test_the_alternate_screen_and_its_modes_are_set_for_a_joiner() -> None:
    s = fed(screen(), b"\x1b[?1049h\x1b[?1h\x1b=\x1b[?1000h\x1b[?1006h\x1b[?2004h\x1b[?25lvim")
    rendering = s.render(40, 10)
    for sequence in (b"\x1b[?1049h", b"\x1b[?1h", b"\x1b=", b"\x1b[?1000h", b"\x1b[?1006h"):
        assert sequence in rendering
    assert b"\x1b[?2004h" in rendering and b"\x1b[?25l" in rendering
    assert s.modes.alternate


def test_a_smaller_joiner_sees_the_rows_around_the_cursor() -> None:
    rows = b"".join(b"\x1b[%d;1Hrow %d" % (r + 1, r) for r in range(10))
    s = fed(screen(), b"\x1b[?1049h" + rows + b"\x1b[9;3H")  # the cursor on row 8 (0-based)
    joiner = replay(s.render(20, 4), 20, 4)
    assert [line.text.rstrip() for line in joiner.view()] == ["row 5", "row 6", "row 7", "row 8"]
    assert (joiner.cursor.row, joiner.cursor.col) == (3, 2)
    assert all(len(line.text.rstrip()) <= 20 for line in joiner.view())


def test_a_larger_joiner_gets_the_screen_at_the_top_left() -> None:
    s = fed(screen(), WORKLOADS["full screen"])
    joiner = replay(s.render(60, 15), 60, 15)
    model = model_of(s)
    assert [line.text.rstrip() for line in joiner.view()][:10] == [
        line.text.rstrip() for line in model.view()
    ]


def test_a_rendering_holds_no_query_and_no_clipboard() -> None:
    hostile = (
        b"\x1b[c\x1b[>c\x1b[6n\x1b[>q\x1b]52;c;?\x07\x1b]52;c;c2VjcmV0\x07\x1b]10;?\x07"
        b"\x1bP$qm\x1b\\\x1b[?2026$p\x1b[14t\x1b]0;title\x07visible"
    )
    s = fed(screen(), hostile)
    rendering = s.render(40, 10)
    kinds = {effect for _, effect in Scanner().feed(rendering)}
    assert kinds <= {None, Effect.MODE}
    assert b"visible" in rendering


def test_a_burst_past_the_budget_waits_in_the_backlog_and_is_exact_at_a_join() -> None:
    s = screen(rate=1000, burst=1000, backlog=1 << 20)
    fed(s, WORKLOADS["relative motion"] * 50, now=0.0)
    assert s.behind and not s.stale
    reference = fed(screen(), WORKLOADS["relative motion"] * 50)
    assert cells(replay(s.render(40, 10), 40, 10)) == cells(model_of(reference))
    assert not s.behind


def test_the_budget_feeds_the_backlog_as_time_passes() -> None:
    s = screen(rate=1000, burst=1000, backlog=1 << 20)
    fed(s, b"x" * 3000, now=0.0)  # a full bucket takes 1000
    assert len(s._backlog) == 2000
    s.catch_up(0.5)  # 500 more
    assert len(s._backlog) == 1500
    s.catch_up(10.0)  # never more than a burst at once
    assert len(s._backlog) == 500
    s.catch_up(20.0)
    assert not s.behind
    assert model_of(s).view()[0].text == "x" * 40


def test_output_past_the_backlog_makes_the_model_stale_and_a_join_rebuilds_it() -> None:
    s = screen(rate=10, burst=10, backlog=4096)
    fed(s, b"".join(b"early %d\r\n" % i for i in range(1000)), now=0.0)
    assert s.stale and not s.behind
    fed(s, b"\x1b[?1049hlater", now=1.0)
    assert s.modes.alternate  # modes are followed even while the cells are not
    s.rebuild(b"\x1b[?1049hrebuilt")
    assert not s.stale
    assert "rebuilt" in replay(s.render(40, 10), 40, 10).view()[0].text


def test_resize_keeps_the_model_at_the_session_size() -> None:
    s = fed(screen(), b"hello")
    s.resize(30, 5)
    joiner = replay(s.render(30, 5), 30, 5)
    assert joiner.view()[0].text.rstrip() == "hello" and len(joiner.view()) == 5


# --- modes --------------------------------------------------------------------------


def modes_of(data: bytes) -> Modes:
    modes = Modes()
    for sequence, effect in Scanner().feed(data):
        if effect is Effect.MODE:
            modes.feed(sequence)
    return modes


def test_modes_follow_set_and_reset_in_one_sequence() -> None:
    modes = modes_of(b"\x1b[?1049;1000;2004h\x1b[?1000l\x1b=\x1b(0\x1b[3;20r")
    assert modes.alternate and modes.private[2004] and not modes.private[1000]
    assert modes.keypad and modes.g0 == "0" and modes.region == (3, 20)
    assert modes_of(b"\x1b[?1049h\x1b[?25l\x1bc").sequences() == b""  # a full reset


def test_undo_puts_a_terminal_back_in_its_default_modes() -> None:
    data = b"\x1b[?1049h\x1b[?25l\x1b[?1h\x1b=\x1b[?1002h\x1b[?1006h\x1b[?2004h\x1b[?1004h\x1b(0\x1b[2;5r"
    modes = modes_of(data)
    undone = modes_of(data + modes.undo())
    assert undone.sequences() == b"" and not undone.alternate and undone.region is None
    assert modes.undo().startswith(b"\x1b[0m")
    assert Modes().undo() == b"\x1b[0m"  # nothing set: only the pen


def test_sequences_set_in_a_fresh_terminal_what_the_program_set() -> None:
    modes = modes_of(b"\x1b[?7l\x1b[?2004h\x1b[?1000h\x1b>\x1b=")
    again = modes_of(modes.sequences())
    assert again.private == modes.private and again.keypad


def test_a_main_screen_rendering_scrolls_what_the_joiner_had_into_history() -> None:
    s = fed(screen(), b"agent output\r\n$ ")
    joiner = avt.Vt(40, 10, scrollback_limit=100)
    joiner.feed_str("aaau: session X (interactive)\r\n")  # the client's notice
    joiner.feed_str(s.render(40, 10).decode())
    assert [line.text.rstrip() for line in joiner.view()][:2] == ["agent output", "$"]
    assert any("aaau: session X" in line.text for line in joiner.lines()[:-10])


def test_history_lines_drawn_once_are_drawn_the_same_at_the_next_join() -> None:
    data = b"".join(b"\x1b[3%dmline %d\x1b[0m of history\r\n" % (i % 8, i) for i in range(200))
    s = fed(screen(history=50), data)
    s.render(40, 10)
    fed(s, b"more\r\n" * 30)  # 30 lines more: the oldest drawn ones drop off the top
    s.resize(40, 10)  # the same size: lines wrapped the same
    fed(s, b"\x1b[1mlast\x1b[0m\r\n")
    fresh = fed(screen(history=50), data + b"more\r\n" * 30 + b"\x1b[1mlast\x1b[0m\r\n")
    assert s.render(40, 10) == fresh.render(40, 10)
    assert s.render(30, 10) == fresh.render(30, 10)  # another width: drawn for it

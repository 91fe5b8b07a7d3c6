"""What a joiner sees: the session's screen as the agent drew it, drawn again for them.

A joiner used to get raw history replayed; that lost the modes a full-screen
program set long ago (alternate screen, keypad, mouse, bracketed paste) and
replayed old terminal queries for the joiner's terminal to answer. Instead:

- :class:`Modes` keeps the modes a program sets (from the scanner's ``MODE``
  segments, always exact and cheap: a few sequences per redraw);
- :class:`Screen` keeps the cells: asciinema's ``avt`` virtual terminal (Rust,
  through ``pyavt``). It is kept off the fan-out path: output goes into a
  backlog (``screen_backlog`` bytes at most) that is fed to the model within a
  budget (``screen_rate`` bytes a second, bursts of ``screen_burst``), as the
  output comes and whenever it pauses, and all of it before someone joins. So
  a burst costs the fan-out nothing, and the model stays exact. Only output
  that keeps coming faster than the budget for longer than the backlog lasts
  (``cat`` of a big file, a build log) overflows it: then the model stops and
  is marked stale, and is rebuilt from the raw tail of the output when someone
  joins. That is exact for line output and full redraws; a program that
  redraws by relative cursor motion may look approximate until its next redraw;
- :meth:`Screen.render` draws it for one terminal: for a plain shell the last
  history lines first, then the screen (cropped to the joiner's size around
  the cursor, if it is smaller), then the modes and the cursor. It is made from
  cells, so it holds no query a terminal would answer.
"""

from __future__ import annotations

import codecs

import avt

from .limits import TokenBucket
from .modes import Modes
from .vtscan import Effect, Segment


class Screen:
    """The cells of the session's terminal, kept within a budget."""

    def __init__(
        self, cols: int, rows: int, *, history: int, rate: float, burst: float, backlog: int
    ) -> None:
        self.cols, self.rows = cols, rows
        self.history = history
        self.modes = Modes()
        self.backlog_limit = backlog
        self._budget = TokenBucket(rate, burst)
        self._backlog = bytearray()
        self.stale = False
        self._reset()

    def _reset(self) -> None:
        self._vt = avt.Vt(self.cols, self.rows, scrollback_limit=self.history)
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._gone = 0  # lines dropped off the top of the history, ever: lines()[0]'s number
        #: (line number, cols) -> a history line drawn: history lines never change
        self._drawn: dict[tuple[int, int], bytes] = {}

    def _feed(self, text: str) -> None:
        _changed, dropped = self._vt.feed_str(text)
        self._gone += len(dropped)

    @property
    def behind(self) -> bool:
        """Output waits in the backlog for the model."""
        return bool(self._backlog)

    def feed(self, segments: list[Segment], now: float) -> None:
        """The output, as the scanner split it: modes at once, cells through the backlog."""
        size = 0
        for data, effect in segments:
            size += len(data)
            if effect is Effect.MODE:
                self.modes.feed(data)
        if self.stale:
            return
        if len(self._backlog) + size > self.backlog_limit:
            self.stale = True  # more than the model can keep up with: rebuilt on a join
            self._backlog = bytearray()
            return
        for data, _ in segments:
            self._backlog += data
        self.catch_up(now)

    def catch_up(self, now: float | None = None) -> None:
        """Feed the backlog to the model: what the budget allows at ``now``, or all of it."""
        if not self._backlog:
            return
        size = len(self._backlog)
        if now is not None:
            size = self._budget.take_up_to(now, size)
        if size:
            self._feed(self._decode(bytes(self._backlog[:size])))
            del self._backlog[:size]

    def resize(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.catch_up()  # what was written for the old size, at the old size
        _changed, dropped = self._vt.resize(cols, rows)
        self._gone += len(dropped)
        self._drawn.clear()  # lines are wrapped again

    def rebuild(self, tail: bytes) -> None:
        """A stale model starts again from ``tail``, the most recent raw output."""
        self._reset()
        self._backlog = bytearray()
        self._feed(self._decode(tail))
        self.stale = False

    def render(self, cols: int, rows: int) -> bytes:
        """The screen for a terminal of ``cols`` x ``rows`` (a fresh one, in default modes)."""
        self.catch_up()
        view = self._vt.view()
        cursor = self._vt.cursor
        out = bytearray(b"\x1b[0m")
        alternate = self.modes.alternate
        if alternate:
            out += b"\x1b[?1049h\x1b[H\x1b[2J"
        else:  # scroll what the terminal showed into its history (notices stay readable)
            out += b"\x1b[%d;1H" % rows + b"\n" * rows + b"\x1b[H"
        every = [] if alternate else self._vt.lines()
        lines = view if alternate else every[-(self.history + self.rows) :]
        first_view = len(lines) - len(view)
        first_number = self._gone + len(every) - len(lines)
        # a smaller terminal shows the rows of the view around the cursor (the lowest such):
        # print down to the window's last row; what is above scrolls into their history
        top = _window(cursor.row, self.rows, rows)
        shown = lines[: first_view + min(len(view), top + rows)]
        out += b"\r\n".join(
            self._history(lines[:first_view], first_number, cols)
            + [_line(line, cols) for line in shown[first_view:]]
        )
        row = first_view + cursor.row - max(0, len(shown) - rows)  # 0-based, on their screen
        if self.modes.region is not None:
            out += b"\x1b[%d;%dr" % self.modes.region
        out += self.modes.sequences()
        out += b"\x1b[%d;%dH" % (max(0, min(row, rows - 1)) + 1, min(cursor.col, cols - 1) + 1)
        return bytes(out)

    def _history(self, lines: list[avt.Line], first: int, cols: int) -> list[bytes]:
        """History lines (``first`` is the number of the first) drawn, each once per width:
        a join draws only what is new since the last one."""
        drawn = []
        for number, line in enumerate(lines, start=first):
            text = self._drawn.get((number, cols))
            if text is None:
                text = self._drawn[(number, cols)] = _line(line, cols)
            drawn.append(text)
        for key in [k for k in self._drawn if k[0] < first]:
            del self._drawn[key]
        return drawn

    def render_view(self, cols: int, rows: int, alternate: bool) -> tuple[bytes, bool]:
        """The screen redrawn in place for a terminal of ``cols`` x ``rows`` that already
        shows a view (``alternate``: it is on the alternate screen); and whether it now is.

        Every row is drawn at an absolute position, and every mode set explicitly, so
        nothing depends on what the terminal showed before; no history, no region.
        """
        self.catch_up()
        view = self._vt.view()
        cursor = self._vt.cursor
        out = bytearray(b"\x1b[0m\x1b[r")
        if self.modes.alternate != alternate:
            out += b"\x1b[?1049h\x1b[H\x1b[2J" if self.modes.alternate else b"\x1b[?1049l"
        top = _window(cursor.row, len(view), rows)
        for i, line in enumerate(view[top : top + rows]):
            # erased first: an erase after a full row would take its last cell too
            out += b"\x1b[%d;1H\x1b[2K" % (i + 1) + _line(line, cols)
        if len(view) - top < rows:
            out += b"\x1b[%d;1H\x1b[J" % (len(view) - top + 1)
        out += self.modes.state()
        if self.modes.region is not None and (cols, rows) == (self.cols, self.rows):
            out += b"\x1b[%d;%dr" % self.modes.region  # the output follows: it needs it
        row = max(0, min(cursor.row - top, rows - 1))
        out += b"\x1b[%d;%dH" % (row + 1, min(cursor.col, cols - 1) + 1)
        return bytes(out), self.modes.alternate


def _window(cursor_row: int, height: int, rows: int) -> int:
    """The first row a terminal of ``rows`` shows: the lowest window with the cursor in it."""
    return max(0, min(cursor_row - rows + 1, height - rows)) if rows < height else 0


def _line(line: avt.Line, cols: int) -> bytes:
    """One line, cropped to ``cols``, with its attributes.

    Trailing blanks are left out only where they have no attributes (a
    coloured bar of spaces is kept); a line with attributes ends in the default pen.
    """
    cells = line.cells
    end = len(cells)
    while end and cells[end - 1].char == " " and cells[end - 1].pen.is_default():
        end -= 1
    out: list[str] = []
    pen: avt.Pen | None = None
    coloured, width = False, 0
    for cell in cells[:end]:
        wide = cell.width
        if not wide:
            continue  # the right half of a wide character
        if width + wide > cols:
            break
        this = cell.pen
        if pen is None or this != pen:
            pen = this
            default = this.is_default()
            if not (default and not coloured):  # no SGR before the first attribute
                out.append(_sgr(this))
            coloured = coloured or not default
        out.append(cell.char)
        width += wide
    if coloured:
        out.append("\x1b[0m")
    return "".join(out).encode("utf-8", "replace")


def _colour(colour: avt.Color | None, base: int) -> list[str]:
    if colour is None:
        return []
    if isinstance(colour, avt.Color.RGB):
        return [str(base + 8), "2", str(colour[0]), str(colour[1]), str(colour[2])]
    assert isinstance(colour, avt.Color.Indexed)
    index = colour[0]
    if index < 8:
        return [str(base + index)]
    if index < 16:
        return [str(base + 60 + index - 8)]
    return [str(base + 8), "5", str(index)]


def _sgr(pen: avt.Pen) -> str:
    if pen.is_default():
        return "\x1b[0m"
    params = ["0"]
    for flag, code in (
        (pen.bold, "1"),
        (pen.faint, "2"),
        (pen.italic, "3"),
        (pen.underline, "4"),
        (pen.blink, "5"),
        (pen.inverse, "7"),
        (pen.strikethrough, "9"),
    ):
        if flag:
            params.append(code)
    params += _colour(pen.foreground, 30) + _colour(pen.background, 40)
    return "\x1b[" + ";".join(params) + "m"

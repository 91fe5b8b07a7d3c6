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
            self._vt.feed_str(self._decode(bytes(self._backlog[:size])))
            del self._backlog[:size]

    def resize(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self._vt.resize(cols, rows)

    def rebuild(self, tail: bytes) -> None:
        """A stale model starts again from ``tail``, the most recent raw output."""
        self._reset()
        self._backlog = bytearray()
        self._vt.feed_str(self._decode(tail))
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
        lines = view if alternate else self._vt.lines()[-(self.history + self.rows) :]
        first_view = len(lines) - len(view)
        # a smaller terminal shows the rows of the view around the cursor (the lowest such):
        # print down to the window's last row; what is above scrolls into their history
        top = _window(cursor.row, self.rows, rows)
        shown = lines[: first_view + min(len(view), top + rows)]
        out += b"\r\n".join(_line(line, cols) for line in shown)
        row = first_view + cursor.row - max(0, len(shown) - rows)  # 0-based, on their screen
        if self.modes.region is not None:
            out += b"\x1b[%d;%dr" % self.modes.region
        out += self.modes.sequences()
        out += b"\x1b[%d;%dH" % (max(0, min(row, rows - 1)) + 1, min(cursor.col, cols - 1) + 1)
        return bytes(out)


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
    coloured bar of spaces is kept); the line ends in the default pen.
    """
    parts: list[tuple[bool, bytes]] = []  # (default pen?, text with its SGR)
    width = 0
    for chunk in line.chunks(lambda a, b: a.pen != b.pen):
        text = []
        for cell in chunk:
            if cell.width == 0:
                continue  # the right half of a wide character
            if width + cell.width > cols:
                break
            text.append(cell.char)
            width += cell.width
        if text:
            pen = chunk[0].pen
            parts.append((pen.is_default(), _sgr(pen) + "".join(text).encode("utf-8", "replace")))
        if width >= cols:
            break
    while parts and parts[-1][0]:  # default blanks at the end say nothing
        last = parts[-1][1].rstrip(b" ")
        if last != b"\x1b[0m":
            parts[-1] = (True, last)
            break
        parts.pop()
    coloured = any(not default for default, _ in parts)
    return b"".join(text for _, text in parts) + (b"\x1b[0m" if coloured else b"")


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


def _sgr(pen: avt.Pen) -> bytes:
    if pen.is_default():
        return b"\x1b[0m"
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
    return b"\x1b[" + ";".join(params).encode() + b"m"

"""``aaau log replay``: a session's output played back in the terminal, at recorded pace.

The output is the agent's, so it is hostile: it goes through the output
scanner first, and only text and mode changes reach the person's terminal (no
clipboard access, no queries that would make the terminal answer, no titles
or links). The modes it set are undone at the end, as when leaving a session.

``--from T`` starts at T: what came before is drawn from a screen model
(:class:`aaau.screen.Screen`) in one go rather than played. Keys while
playing: space pauses and resumes, ``+``/``-`` double and halve the speed,
``q`` (or Ctrl-C) stops.

Plain blocking I/O with ``select`` (no Trio): one output, one input, and a
replay should start at once (Trio takes a tenth of a second to import).
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import time
import tty
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import attrs

from .modes import Modes
from .vtscan import Effect, Scanner

if TYPE_CHECKING:
    from .screen import Screen

#: what a replay lets through: text and mode changes
_KEPT: Final = (None, Effect.MODE)


@attrs.frozen
class Frame:
    """A step of the recording: output bytes, or a new terminal size."""

    timestamp: float
    data: bytes = b""
    size: tuple[int, int] | None = None  # (cols, rows)


@attrs.define
class Pace:
    """The player's clock: speed, pause, and how long to wait for the next frame."""

    speed: float = 1.0
    paused: bool = False
    idle_limit: float | None = None

    def wait(self, gap: float) -> float:
        if self.idle_limit is not None:
            gap = min(gap, self.idle_limit)
        return max(0.0, gap) / self.speed

    def key(self, key: bytes) -> bool:
        """Apply a key; False when it means stop."""
        if key in (b"q", b"Q", b"\x03"):
            return False
        if key == b" ":
            self.paused = not self.paused
        elif key == b"+":
            self.speed = min(self.speed * 2, 1024.0)
        elif key == b"-":
            self.speed = max(self.speed / 2, 1 / 64)
        return True


class Filter:
    """Output through the scanner: only text and modes; the modes kept for undoing."""

    def __init__(self) -> None:
        self._scanner = Scanner()
        self.modes = Modes()

    def __call__(self, data: bytes) -> bytes:
        kept = []
        for segment, effect in self._scanner.feed(data):
            if effect is Effect.MODE:
                self.modes.feed(segment)
            if effect in _KEPT:
                kept.append(segment)
        return b"".join(kept)


def skip_to(
    frames: Iterator[Frame], start: float, size: tuple[int, int], history: int = 200
) -> tuple[Screen, Frame | None]:
    """Feed the frames before ``start`` to a screen model; the first frame after it."""
    from .screen import Screen  # avt: loaded only when it is needed

    cols, rows = size
    screen = Screen(cols, rows, history=history, rate=1e18, burst=1e18, backlog=1 << 62)
    scanner = Scanner()
    for frame in frames:
        if frame.timestamp >= start:
            return screen, frame
        if frame.size is not None:
            screen.resize(*frame.size)
        if frame.data:
            screen.feed(scanner.feed(frame.data), 0.0)
    return screen, None


def play(
    frames: Iterator[Frame],
    *,
    size: tuple[int, int],
    speed: float = 1.0,
    start: float | None = None,
    idle_limit: float | None = None,
) -> int:
    """Play to standard output; keys from standard input when it is a terminal."""
    pace = Pace(speed=speed, idle_limit=idle_limit)
    flt = Filter()
    keys = os.isatty(0)
    with _raw(0) if keys else contextlib.nullcontext():
        try:
            first: Frame | None = None
            if start is not None:
                screen, first = skip_to(frames, start, size)
                cols, rows = os.get_terminal_size(1) if os.isatty(1) else size
                _write(flt(screen.render(cols, rows)))
            last: float | None = None
            for frame in _chain(first, frames):
                if last is not None and not _wait(pace.wait(frame.timestamp - last), pace, keys):
                    break
                last = frame.timestamp
                if frame.data:
                    _write(flt(frame.data))
        finally:
            with contextlib.suppress(OSError):
                _write(flt.modes.undo())
    return 0


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)  # keys one by one, no echo; output processed
    try:
        yield
    finally:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _chain(first: Frame | None, rest: Iterator[Frame]) -> Iterator[Frame]:
    if first is not None:
        yield first
    yield from rest


def _wait(seconds: float, pace: Pace, keys: bool) -> bool:
    """Wait ``seconds`` of playing time (paused time does not count), taking keys;
    False when a key said stop."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if not pace.paused and left <= 0:
            return True
        if not keys:
            time.sleep(max(0.0, left))
            return True
        paused_at = time.monotonic()
        ready, _, _ = select.select([0], [], [], None if pace.paused else left)
        if pace.paused:
            deadline += time.monotonic() - paused_at
        if ready:
            data = os.read(0, 64)
            if not data or (not data.startswith(b"\x1b") and not all(map(pace.key, _bytes(data)))):
                return False


def _bytes(data: bytes) -> Iterator[bytes]:
    return (data[i : i + 1] for i in range(len(data)))

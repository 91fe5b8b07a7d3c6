"""``aaau log replay``: a session's output played back in the terminal, at recorded pace.

The output is the agent's, so it is hostile: it goes through the output
scanner first, and only text and mode changes reach the person's terminal (no
clipboard access, no queries that would make the terminal answer, no titles
or links). The modes it set are undone at the end, as when leaving a session.

``--from T`` starts at T: what came before is drawn from a screen model
(:class:`aaau.screen.Screen`) in one go rather than played. Keys while
playing: space pauses and resumes, ``+``/``-`` double and halve the speed,
``q`` (or Ctrl-C) stops.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Final

import attrs
import trio

from .modes import Modes
from .screen import Screen
from .terminal import Terminal, TerminalError
from .vtscan import Effect, Scanner

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


async def play(
    frames: Iterator[Frame],
    *,
    size: tuple[int, int],
    speed: float = 1.0,
    start: float | None = None,
    idle_limit: float | None = None,
) -> int:
    """Play to standard output; keys from standard input when it is a terminal."""
    pace = Pace(speed=speed, idle_limit=idle_limit)
    out = trio.lowlevel.FdStream(os.dup(1))
    flt = Filter()
    terminal: Terminal | None = None
    if os.isatty(0):
        with contextlib.suppress(TerminalError):
            terminal = Terminal(0)
    stop = trio.Event()
    try:
        with terminal.raw() if terminal is not None else contextlib.nullcontext():
            async with trio.open_nursery() as nursery:
                if terminal is not None:
                    nursery.start_soon(_keys, terminal, pace, stop, nursery.cancel_scope)
                first: Frame | None = None
                if start is not None:
                    screen, first = skip_to(frames, start, size)
                    cols, rows = terminal.size() if terminal is not None else size
                    await out.send_all(flt(screen.render(cols, rows)))
                await _frames(frames, first, out, flt, pace, stop)
                nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await out.send_all(flt.modes.undo())
        await out.aclose()
        if terminal is not None:
            await terminal.aclose()
    return 0


async def _frames(
    frames: Iterator[Frame],
    first: Frame | None,
    out: trio.lowlevel.FdStream,
    flt: Filter,
    pace: Pace,
    stop: trio.Event,
) -> None:
    last: float | None = None
    for frame in _chain(first, frames):
        if last is not None:
            await _sleep(pace.wait(frame.timestamp - last), pace, stop)
        if stop.is_set():
            return
        last = frame.timestamp
        if frame.data:
            await out.send_all(flt(frame.data))


def _chain(first: Frame | None, rest: Iterator[Frame]) -> Iterator[Frame]:
    if first is not None:
        yield first
    yield from rest


async def _sleep(seconds: float, pace: Pace, stop: trio.Event) -> None:
    """Wait ``seconds`` of playing time: time paused does not count."""
    left = seconds
    while left > 0 and not stop.is_set():
        if pace.paused:
            await trio.sleep(0.05)
            continue
        step = min(left, 0.05)
        await trio.sleep(step)
        left -= step


async def _keys(
    terminal: Terminal, pace: Pace, stop: trio.Event, scope: trio.CancelScope
) -> None:
    while True:
        data = await terminal.stream.receive_some(64)
        if not data:
            return
        if data.startswith(b"\x1b"):  # a key with a sequence, or a terminal's report
            continue
        for i in range(len(data)):
            if not pace.key(data[i : i + 1]):
                stop.set()
                scope.cancel()
                return

"""A full-screen agent drawn the way Node's Ink draws (claude, codex): no alternate screen,
relative cursor motion only, a redraw only when the size really changes.

Prints LINES finished lines above a live frame, erasing and redrawing the frame
around each (about 300 KiB in all), then sets the modes such agents set (cursor
hidden, bracketed paste, focus reports) and waits, echoing nothing.
"""

import os
import signal
import sys

LINES = 600
out = sys.stdout.buffer
size = os.get_terminal_size(1)
drawn = 0  # lines of the live frame on the screen


def frame(n: int) -> bytes:
    width = size.columns - 2
    spinner = "|/-\\"[n % 4]
    body = [
        "\x1b[36m+" + "-" * width + "+\x1b[39m",
        f"\x1b[36m|\x1b[39m \x1b[1m{spinner} working\x1b[22m on step {n}".ljust(width + 19) + "\x1b[36m|\x1b[39m",
        "\x1b[36m+" + "-" * width + "+\x1b[39m",
        f"\x1b[2m> type here\x1b[22m  \x1b[7m {n} done \x1b[27m",
    ]
    return "\r\n".join(body).encode()


def erase() -> bytes:
    global drawn
    if not drawn:
        return b""
    seq = b"\x1b[2K\x1b[1A" * (drawn - 1) + b"\x1b[2K\x1b[G"
    drawn = 0
    return seq


def draw(n: int) -> bytes:
    global drawn
    drawn = 4
    return frame(n)


def on_winch(_signum: int, _frame: object) -> None:
    global size
    new = os.get_terminal_size(1)
    if new != size:  # only a real change of size redraws
        size = new
        out.write(erase() + draw(LINES))
        out.flush()


signal.signal(signal.SIGWINCH, on_winch)
for n in range(LINES):
    colour = 31 + n % 6
    line = f"\x1b[{colour}m*\x1b[39m finished step {n}: " + "lorem ipsum dolor sit amet " * 3
    out.write(erase() + line[: size.columns + 10].encode() + b"\r\n" + draw(n))
out.write(b"\x1b[?25l\x1b[?2004h\x1b[?1004h")
out.write(erase() + draw(LINES))
out.flush()
os.system("stty -echo")
while os.read(0, 1024):
    pass

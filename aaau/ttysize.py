"""A terminal's size, and nothing else: the light client paths need it without Trio."""

from __future__ import annotations

import fcntl
import struct
import termios
from typing import Final

#: the size assumed when there is no terminal to ask
DEFAULT_SIZE: Final = (24, 80)


def window_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``, or 24x80 when it is not one."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return DEFAULT_SIZE
    if rows <= 0 or cols <= 0:
        return DEFAULT_SIZE
    return rows, cols

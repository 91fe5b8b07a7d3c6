"""The client's terminal: raw mode that is always restored, and window sizes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
import tty
from collections.abc import Iterator

DEFAULT_SIZE = (24, 80)


def window_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``, or 24x80 when it is not one."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return DEFAULT_SIZE
    if rows <= 0 or cols <= 0:
        return DEFAULT_SIZE
    return rows, cols


def open_tty(fd: int) -> int:
    """A new open file description of the terminal on ``fd``.

    Making it non-blocking does not touch fd 0/1/2, which the parent shell
    shares (O_NONBLOCK belongs to the open file description).
    """
    return os.open(os.ttyname(fd), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Raw input and no output processing: the user sees exactly the agent's bytes."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSADRAIN)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)

"""The person's terminal, as the client uses it: fd 0, raw while attached, always put back.

The client uses the terminal it was given: a duplicate of fd 0, never the
terminal reopened by name (which a user who got the terminal from ``su`` or
``runuser`` may not open). A duplicate shares its open file description with
fds 0-2 of the shell, so the non-blocking mode Trio needs is the shell's too
while the client runs; :class:`trio.lowlevel.FdStream` puts the original mode
back when it is closed, and the terminal's modes are put back by
:meth:`Terminal.raw` on every way out.
"""

from __future__ import annotations

import contextlib
import os
import termios
import tty
from collections.abc import Iterator

import trio

from .ttysize import window_size


class TerminalError(Exception):
    """The terminal cannot be used; the message names what failed."""


class Terminal:
    """fd 0's terminal: checked when made, so a client fails before it creates a session."""

    def __init__(self, fd: int = 0) -> None:
        try:
            self._saved = termios.tcgetattr(fd)
            self.fd = os.dup(fd)  # close-on-exec
        except (OSError, termios.error) as exc:
            raise TerminalError(f"cannot use the terminal on standard input: {_why(exc)}") from None
        self.stream = trio.lowlevel.FdStream(self.fd)

    def size(self) -> tuple[int, int]:
        return window_size(self.fd)

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        """Raw input and no output processing: the person sees exactly the agent's bytes."""
        try:
            tty.setraw(self.fd, termios.TCSADRAIN)
        except (OSError, termios.error) as exc:
            raise TerminalError(f"cannot put the terminal in raw mode: {_why(exc)}") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError, termios.error):  # a terminal that hung up
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    async def aclose(self) -> None:
        await self.stream.aclose()  # the original blocking mode is put back


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc.args[-1]) if exc.args else str(exc)

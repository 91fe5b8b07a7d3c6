"""The agent's PTY from the server's side: the master fd, output, input, history.

- :class:`PtyMaster` owns the master fd. Once closed its ``fd`` is -1, so a
  resize or a signal after the session ended can never act on an fd number
  the kernel has handed to something else since.
- :class:`PtyReader` is the single reader: it drains what the PTY has (up to
  ``limit`` bytes) into one chunk and hands it to a callback, which must not
  block (the session fans it out to the clients' outboxes).
- :class:`PtyInput` is the single input path: whole pieces in arrival order,
  each recorded in the audit log just before it is written; with nothing
  queued, a piece is written at once by the caller (a keystroke's latency),
  the rest by the writer task. A full PTY holds back only those who type.
- :class:`Scrollback` keeps recent output for late joiners.

No sockets, no clients, no framing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import trio

from .audit import BoundAudit

#: input pieces waiting for the writer; a typist past this waits (backpressure)
INPUT_QUEUE: Final = 32
#: in a pipe session, end of input is given again each time the program reads, at
#: most this often at first, then half as often each time, down to EOF_AGAIN_MAX
EOF_AGAIN: Final = 0.05
EOF_AGAIN_MAX: Final = 2.0
#: when output pauses this long with work held for a pause, the work is done
HOLD_RELEASE: Final = 0.05


class Held(Protocol):
    """Whoever holds work for a pause in the output (the end of an incomplete escape
    sequence, a screen model behind): ``flush`` is called when output pauses."""

    @property
    def holding(self) -> bool: ...

    def flush(self) -> None: ...


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtyMaster:
    """The master side of the agent's terminal."""

    def __init__(self, fd: int) -> None:
        self._stream = trio.lowlevel.FdStream(fd)  # takes the fd, makes it non-blocking

    @property
    def fd(self) -> int:
        """The fd, or -1 once closed."""
        return self._stream.fileno()

    def resize(self, rows: int, cols: int) -> None:
        if self.fd >= 0:
            set_winsize(self.fd, rows, cols)

    def signal_foreground(self, signum: int) -> None:
        """Signal the terminal's foreground process group (a repaint: SIGWINCH)."""
        with contextlib.suppress(OSError):
            os.killpg(os.tcgetpgrp(self.fd), signum)

    def eof_char(self) -> bytes:
        """The terminal's VEOF character (^D unless the agent changed it)."""
        try:
            veof = termios.tcgetattr(self.fd)[6][termios.VEOF]
        except (termios.error, OSError):
            return b"\x04"
        return bytes([veof]) if isinstance(veof, int) else bytes(veof)

    def write_nowait(self, data: bytes) -> int:
        """Write what the PTY takes now; 0 if full. OSError if the terminal is gone."""
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def aclose(self) -> None:
        await self._stream.aclose()


class PtyReader:
    """Drains the PTY into chunks and hands each to ``publish``.

    Reading until EAGAIN (up to ``limit``) before publishing turns a burst of
    small tty reads into one audit record, one frame and one write per
    client, which is what keeps the fan-out cheap under heavy output.
    """

    def __init__(
        self,
        master: PtyMaster,
        limit: int,
        publish: Callable[[bytes], None],
        held: Held | None = None,
    ) -> None:
        self._master = master
        self._limit = limit
        self._publish = publish
        self._held = held
        self.done = trio.Event()

    async def _wait(self, fd: int) -> None:
        """Until the PTY has output; if a sequence is held back, not longer than a pause."""
        if self._held is None or not self._held.holding:
            await trio.lowlevel.wait_readable(fd)
            return
        with trio.move_on_after(HOLD_RELEASE) as paused:
            await trio.lowlevel.wait_readable(fd)
        if paused.cancelled_caught:
            self._held.flush()

    async def run(self) -> None:
        """Until the PTY reports end of output (every slave fd closed) or is closed."""
        try:
            while True:
                fd = self._master.fd
                if fd < 0:
                    return
                await self._wait(fd)
                chunk, eof = self._drain(fd)
                if chunk:
                    self._publish(chunk)
                if eof:
                    return
        except trio.ClosedResourceError:
            pass
        finally:
            if self._held is not None and self._held.holding:
                self._held.flush()  # the output has ended: nothing more will complete it
            self.done.set()

    def _drain(self, fd: int) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        while size < self._limit:
            try:
                data = os.read(fd, self._limit - size)
            except BlockingIOError:
                break
            except OSError:  # EIO: every slave fd is closed
                return b"".join(chunks), True
            if not data:
                return b"".join(chunks), True
            chunks.append(data)
            size += len(data)
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), False


class PtyInput:
    """The one way input reaches the agent: recorded, then written, in order.

    Each piece is recorded as it is accepted (``input``/``input_eof``; if the
    log cannot take it, :class:`aaau.audit.AuditUnavailable` is raised and
    nothing is written), then written at once if nothing is queued before it,
    or queued for the writer task. What is still queued when the session ends
    is recorded as ``input_dropped``.
    """

    def __init__(
        self,
        master: PtyMaster,
        until_read: Callable[[], Awaitable[None]] | None = None,
        *,
        sticky_eof: bool = False,
    ) -> None:
        self._master = master
        self._send, self._receive = trio.open_memory_channel[tuple[BoundAudit, bytes | None]](
            INPUT_QUEUE
        )
        self._pending = 0  # pieces handed to the writer and not yet written
        self._last_byte = b"\n"
        #: returns once the program reads its terminal: end of input waits for it
        self._until_read = until_read
        #: end of input lasts (as a pipe's does) until more input comes
        self._sticky_eof = sticky_eof
        self._written = 0  # pieces of data written: what a lasting end of input watches

    async def send(self, audit: BoundAudit, data: bytes) -> None:
        """Record and write ``data``; waits while the agent does not read."""
        if not data:
            await trio.lowlevel.checkpoint()
            return
        audit.write_bytes("input", data)
        if not self._pending:
            try:
                written = self._master.write_nowait(data)
            except OSError:
                await trio.lowlevel.checkpoint()
                return  # the terminal is gone: the session is ending
            self._note(data[:written])
            data = data[written:]
            if not data:
                await trio.lowlevel.checkpoint()
                return
        await self._enqueue(audit, data)

    async def send_eof(self, audit: BoundAudit) -> None:
        """End of input: the terminal's EOF character, in order with the input."""
        audit.write("input_eof")
        await self._enqueue(audit, None)

    async def _enqueue(self, audit: BoundAudit, data: bytes | None) -> None:
        self._pending += 1
        try:
            await self._send.send((audit, data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._pending -= 1
            self._dropped(audit, data)

    def _note(self, written: bytes) -> None:
        if written:
            self._last_byte = written[-1:]
            self._written += 1

    def _eof_bytes(self) -> bytes:
        """VEOF ends input at the start of a line; mid-line it takes two."""
        veof = self._master.eof_char()
        return veof if self._last_byte in (b"\n", b"\r") else veof * 2

    async def run(self) -> None:
        """The writer task: what could not be written at once, in arrival order."""
        async with trio.open_nursery() as nursery:
            async for audit, data in self._receive:
                try:
                    if data is None and self._until_read is not None:
                        await self._until_read()
                    piece = self._eof_bytes() if data is None else data
                    await self._master.send_all(piece)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._dropped(audit, data)
                    break
                finally:
                    self._pending -= 1
                if data is not None:
                    self._note(piece)
                elif self._sticky_eof and self._until_read is not None:
                    nursery.start_soon(self._keep_eof, self._until_read, self._written)
            nursery.cancel_scope.cancel()

    async def _keep_eof(self, until_read: Callable[[], Awaitable[None]], written: int) -> None:
        """End of input again each time the program reads, until someone types."""
        gap = EOF_AGAIN
        while True:
            await trio.sleep(gap)  # what was written has had time to be read
            await until_read()
            if self._written != written or self._pending:
                return
            try:
                self._master.write_nowait(self._master.eof_char())
            except OSError:
                return
            gap = min(gap * 2, EOF_AGAIN_MAX)

    def close(self) -> None:
        """No more input; the writer writes what is queued, then ends."""
        self._send.close()

    def abandon(self) -> None:
        """The agent has ended: what was accepted and never written is recorded so."""
        self._send.close()
        while True:
            try:
                audit, data = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            self._dropped(audit, data)

    @staticmethod
    def _dropped(audit: BoundAudit, data: bytes | None) -> None:
        what = "end of input" if data is None else f"{len(data)} bytes"
        audit.note("input_dropped", content=f"{what} never reached the agent: it ended")


class Scrollback:
    """The last ``limit`` bytes of output, for late joiners."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._dropped = False  # has output been dropped from the front?

    def append(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > 2 * self.limit:  # trim in bulk, not on every chunk
            del self._buffer[: len(self._buffer) - self.limit]
            self._dropped = True

    def snapshot(self) -> bytes:
        """The recent output, starting after a newline wherever older output was cut off.

        Starting at a line keeps a joiner from beginning inside an escape sequence.
        """
        data = bytes(self._buffer[-self.limit :]) if self.limit else b""
        if self._dropped or len(self._buffer) > self.limit:
            cut = data.find(b"\n")
            if cut >= 0:
                data = data[cut + 1 :]
        return data

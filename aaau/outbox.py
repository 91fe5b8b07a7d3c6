"""A client's outgoing frames: bounded, never blocking the producer.

The PTY reader (one per session) hands every chunk to every client's
:class:`Outbox` with :meth:`Outbox.put`, which never waits. A client that
keeps up gets the frame at once by one non-blocking write on its socket (the
*direct* write: no task switch); whatever the socket does not take is queued
for the connection's write loop, which drains it with :meth:`Outbox.get`.

The bound covers what is queued plus what the write loop holds but has not
finished sending, so a stalled client costs at most ``limit`` bytes; past it
the outbox closes itself as *overflowed* and drops what it held (the
connection then tells the client ``too-slow`` and hangs up).

Closed before the fd: :func:`socket_writer` reads the socket's fd number at
each write, and a closed socket reports -1, so a direct write can never reach
an fd number that was closed and reused by something else.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Final

import attrs
import trio

#: a non-blocking write: how many bytes were taken (BlockingIOError: none)
DirectWrite = Callable[[bytes], int]

#: how long a closed outbox's last frames may take to reach a slow client
FLUSH_GRACE: Final = 1.0


def socket_writer(sock: trio.socket.SocketType) -> DirectWrite:
    """A non-blocking write on ``sock`` (trio sockets are non-blocking)."""

    def write(data: bytes) -> int:
        return os.write(sock.fileno(), data)  # -1 once closed: EBADF, never a reused fd

    return write


@attrs.frozen
class OutboxStatistics:
    queued_bytes: int
    inflight_bytes: int
    closed: bool
    overflowed: bool


class Outbox:
    """One client's bounded output; ``put`` from anywhere, ``get`` from one write loop."""

    def __init__(self, limit: int, direct: DirectWrite | None = None) -> None:
        self.limit = limit
        self._direct = direct
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._inflight = 0  # bytes the write loop holds: they count against the limit too
        self._closed = False
        self.overflowed = False
        self.flush_grace = FLUSH_GRACE
        self._lot = trio.lowlevel.ParkingLot()
        #: called once, with the flush grace, when the outbox closes (the connection
        #: sets a deadline for its write loop); no task waits for it
        self.on_close: Callable[[float], None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, frame: bytes) -> bool:
        """Send or queue ``frame``; False (and the outbox closes) if it does not fit.

        After :meth:`close`, frames are dropped; the answer stays True unless
        the outbox closed because it overflowed.
        """
        if self._closed:
            return not self.overflowed
        if self._direct is not None and not self._inflight and not self._chunks:
            frame = frame[self._write_now(frame) :]
            if not frame:
                return True
        if self._size + self._inflight + len(frame) > self.limit:
            self.overflowed = True
            self._chunks.clear()
            self._size = 0
            self.close()  # the write loop says too-slow and hangs up
            return False
        self._chunks.append(frame)
        self._size += len(frame)
        self._lot.unpark_all()
        return True

    def _write_now(self, frame: bytes) -> int:
        assert self._direct is not None
        try:
            return self._direct(frame)
        except OSError:  # full (EAGAIN) or broken: the write loop meets it and decides
            return 0

    def close(self, *, flush_grace: float = FLUSH_GRACE) -> None:
        """No more frames; the write loop has ``flush_grace`` seconds for what is queued."""
        if not self._closed:
            self._closed = True
            self.flush_grace = flush_grace
            self._lot.unpark_all()
            if self.on_close is not None:
                self.on_close(flush_grace)

    async def get(self) -> bytes | None:
        """Everything queued, as one piece; None once closed and drained.

        Calling it again means the previous piece was sent in full.
        """
        self._inflight = 0
        while not self._chunks:
            if self._closed:
                return None
            await self._lot.park()
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._inflight = len(data)
        return data

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(self._size, self._inflight, self._closed, self.overflowed)

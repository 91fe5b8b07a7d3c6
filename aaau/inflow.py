"""One attached client's input, under a window of credit (as SSH channels do).

A client may have at most ``window`` bytes of input in flight: sent, but not
yet handed to the agent. The connection's read loop only ever *pushes* into
:class:`Inflow` (never waits), so a ping, a resize or FORCE_KILL is read and
acted on at once even while the agent is not reading; the input task hands
the queued input to the session, in order, and grants the client credit
back once a quarter of the window has been delivered (or refused). Input
beyond the window is a protocol error: a client that keeps to its window is
never refused for it.

No sockets, no framing: the connection supplies ``deliver`` (the session's
input), ``grant`` (sends ``input_credit``) and ``refuse`` (tells the client).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .audit import AuditUnavailable
from .errors import ErrorCode, ProtocolError

#: the input window a client gets (bytes in flight), unless the config says otherwise
DEFAULT_WINDOW: Final = 256 * 1024

Deliver = Callable[[bytes | None], Awaitable[None]]  # None: end of input


class Inflow:
    def __init__(
        self,
        window: int,
        deliver: Deliver,
        grant: Callable[[int], object],
        refuse: Callable[[str], object],
    ) -> None:
        self.window = window
        self._deliver = deliver
        self._grant = grant
        self._refuse = refuse
        self._queue: collections.deque[bytes | None] = collections.deque()
        self._in_flight = 0  # bytes pushed and not yet granted back
        self._ungranted = 0  # bytes delivered (or refused) and not yet granted back
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False

    def push(self, data: bytes) -> None:
        """Typed input; never waits. ProtocolError if it goes beyond the window."""
        if self._in_flight + len(data) > self.window:
            raise ProtocolError(
                f"{self._in_flight + len(data)} bytes of input in flight, beyond the "
                f"window of {self.window} (wait for input_credit)",
                code=ErrorCode.BAD_MESSAGE,
            )
        self._in_flight += len(data)
        self._queue.append(data)
        self._lot.unpark_all()

    def push_eof(self) -> None:
        self._queue.append(None)
        self._lot.unpark_all()

    def close(self) -> None:
        self._closed = True
        self._lot.unpark_all()

    async def run(self) -> None:
        """The input task: deliver in order until closed."""
        while True:
            while not self._queue:
                if self._closed:
                    return
                await self._lot.park()
            item = self._queue.popleft()
            try:
                await self._deliver(item)
            except AuditUnavailable as exc:
                what = "end of input" if item is None else f"{len(item)} bytes of input"
                self._refuse(f"the audit log cannot record input now ({exc}): {what} refused")
            if item is not None:
                self._done(len(item))

    def _done(self, size: int) -> None:
        self._ungranted += size
        if self._ungranted >= self.window // 4:
            granted, self._ungranted = self._ungranted, 0
            self._in_flight -= granted
            self._grant(granted)

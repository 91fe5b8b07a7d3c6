"""Frames over a Trio stream: the one framed reader and writer.

The server's connections, the client, the tests and the benchmark all read
and write frames through :class:`FramedStream`. It moves bytes only: the
framing rules are :class:`aaau.protocol.FrameDecoder`'s, the message rules
:mod:`aaau.codec`'s.
"""

from __future__ import annotations

from typing import Final

import trio

from . import codec
from . import messages as m
from .protocol import Frame, FrameDecoder

#: bytes asked of the stream per read, by default: a socket buffer's worth
RECEIVE_SIZE: Final = 65536


class FramedStream:
    """Reads whole frames from ``stream`` and writes messages and frames to it.

    A peer that closes or resets its side mid-frame is a
    :class:`aaau.errors.ProtocolError` ("connection closed inside a frame");
    a clean close between frames is ``None`` from :meth:`next_frame`.
    """

    def __init__(
        self, stream: trio.abc.Stream, max_payload: int, *, receive_size: int = RECEIVE_SIZE
    ) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_payload)
        self._receive_size = receive_size
        self._eof = False

    @property
    def max_payload(self) -> int:
        return self._decoder.max_payload

    @max_payload.setter
    def max_payload(self, limit: int) -> None:
        """Change the largest frame accepted from here on (after a handshake, say)."""
        self._decoder.max_payload = limit

    async def next_frame(self) -> Frame | None:
        """The next whole frame; None once the peer has closed between frames."""
        while (frame := self._decoder.next_frame()) is None:
            if self._eof:
                return None
            try:
                data = bytes(await self.stream.receive_some(self._receive_size))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""  # a reset is a close; the decoder says if it cut a frame
            self._decoder.receive_data(data)
            self._eof = not data
        return frame

    async def send(self, message: m.ClientMessage | m.ServerMessage) -> None:
        await self.stream.send_all(codec.encode(message))

    async def send_frame(self, frame: bytes) -> None:
        """Bytes that are already one or more whole frames."""
        await self.stream.send_all(frame)

    async def aclose(self) -> None:
        await self.stream.aclose()

"""Sans-I/O framing of the aaau protocol.

Every byte in either direction travels in a frame::

    +-----------+------------------+------------------------+
    | kind (u8) | length (u32, BE) | payload (length bytes) |
    +-----------+------------------+------------------------+

``kind`` 0 is DATA (raw terminal bytes, never interpreted), 1 is CONTROL (one
UTF-8 JSON object, see :mod:`aaau.codec`). No sockets, no Trio: bytes in,
frames out, and frames in, bytes out (in the manner of h11).
"""

from __future__ import annotations

import enum
import struct

import attrs

from .errors import ErrorCode, ProtocolError

__all__ = [
    "HEADER_SIZE",
    "Frame",
    "FrameDecoder",
    "Kind",
    "ProtocolError",
    "data_frame",
    "encode_frame",
]

_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size


class Kind(enum.IntEnum):
    DATA = 0
    CONTROL = 1


_KINDS = {int(k): k for k in Kind}


@attrs.frozen
class Frame:
    kind: Kind
    payload: bytes


def encode_frame(kind: Kind, payload: bytes) -> bytes:
    """One frame, header and payload, as bytes."""
    return _HEADER.pack(kind, len(payload)) + payload


def data_frame(payload: bytes) -> bytes:
    return _HEADER.pack(Kind.DATA, len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frames.

    Memory is bounded: a frame whose announced length exceeds ``max_payload``
    is refused as soon as its header arrives, before its payload is buffered.
    After an error the decoder stays broken; the connection must be closed.
    """

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._start = 0  # bytes of _buffer already consumed
        self._eof = False
        self._error: ProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._start:
            # drop what was consumed once per feed, not once per frame
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._start

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None when more data is needed.

        Raises :class:`ProtocolError` for an unknown kind, an oversized frame,
        or a stream that ends inside a frame.
        """
        if self._error is not None:
            raise self._error
        buf, start = self._buffer, self._start
        available = len(buf) - start
        if available < HEADER_SIZE:
            if self._eof and available:
                self._fail(ProtocolError("connection closed inside a frame header"))
            return None
        kind, length = _HEADER.unpack_from(buf, start)
        if kind not in (Kind.DATA, Kind.CONTROL):
            self._fail(ProtocolError(f"unknown frame kind {kind}"))
        if length > self.max_payload:
            self._fail(
                ProtocolError(
                    f"frame of {length} bytes exceeds the limit of {self.max_payload}",
                    code=ErrorCode.TOO_LARGE,
                )
            )
        end = start + HEADER_SIZE + length
        if len(buf) < end:
            if self._eof:
                self._fail(ProtocolError("connection closed inside a frame"))
            return None
        with memoryview(buf) as view:
            payload = bytes(view[start + HEADER_SIZE : end])
        self._start = end
        return Frame(_KINDS[kind], payload)

    def frames(self) -> list[Frame]:
        """Every whole frame buffered so far."""
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out

    def _fail(self, error: ProtocolError) -> None:
        self._error = error
        self._buffer.clear()
        self._start = 0
        raise error

"""The client's ssh-style escape: ``~.`` after a newline detaches, ``~~`` sends ``~``.

A pure state machine: bytes in, (bytes to send, detach?) out.
"""

from __future__ import annotations

_TILDE = ord("~")
_DOT = ord(".")
_NEWLINES = (ord("\r"), ord("\n"))


class EscapeFilter:
    def __init__(self) -> None:
        self._line_start = True
        self._tilde = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Filter keyboard input; the bool is True when the user asked to detach."""
        out = bytearray()
        for byte in data:
            if self._tilde:
                self._tilde = False
                if byte == _DOT:
                    return bytes(out), True
                if byte == _TILDE:
                    out.append(_TILDE)
                    self._line_start = False
                    continue
                out.append(_TILDE)  # not an escape: the held tilde goes through
                self._line_start = False
            if self._line_start and byte == _TILDE:
                self._tilde = True
                continue
            out.append(byte)
            self._line_start = byte in _NEWLINES
        return bytes(out), False

"""The client's ssh-style escape: ``~.`` at the start of a line detaches, ``~~`` sends ``~``.

A pure state machine: bytes in, (bytes to send, detach?) out.

The rule: a line starts when the client starts and after Enter (CR or LF).
Escape sequences do not count as typing: whatever a terminal sends on its
own (answers to queries, focus and mouse reports) and the keys that send
sequences (arrows, function keys) leave "start of line" as it was. So ``~.``
works right after a full-screen agent starts, when the terminal has already
answered its queries, without pressing Enter (which would act on the agent).
"""

from __future__ import annotations

import enum

_TILDE = ord("~")
_DOT = ord(".")
_NEWLINES = (ord("\r"), ord("\n"))
_ESC = 0x1B


class _In(enum.Enum):
    TEXT = enum.auto()
    ESC = enum.auto()  # after ESC
    CSI = enum.auto()  # ESC [ ... until a final byte
    SS3 = enum.auto()  # ESC O and one byte
    STRING = enum.auto()  # ESC ] / ESC P / ESC _ ... until BEL or ESC \
    STRING_ESC = enum.auto()  # an ESC inside a string


class EscapeFilter:
    def __init__(self) -> None:
        self._line_start = True
        self._tilde = False
        self._in = _In.TEXT

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Filter keyboard input; the bool is True when the user asked to detach."""
        out = bytearray()
        for byte in data:
            if self._in is not _In.TEXT or byte == _ESC:
                if self._tilde:  # "~" then a sequence: the tilde was typed
                    self._tilde, self._line_start = False, False
                    out.append(_TILDE)
                out.append(byte)
                self._sequence(byte)
                continue
            if self._tilde:
                self._tilde = False
                if byte == _DOT:
                    return bytes(out), True
                out.append(_TILDE)  # "~~" sends one; anything else sends both
                self._line_start = False
                if byte == _TILDE:
                    continue
            if self._line_start and byte == _TILDE:
                self._tilde = True
                continue
            out.append(byte)
            self._line_start = byte in _NEWLINES
        return bytes(out), False

    def _sequence(self, byte: int) -> None:
        """Follow an escape sequence to its end; it never changes "start of line"."""
        state = self._in
        if state is _In.STRING:
            if byte == 0x07:
                self._in = _In.TEXT
            elif byte == _ESC:
                self._in = _In.STRING_ESC
        elif state is _In.STRING_ESC:
            self._in = _In.TEXT  # ESC \ ends the string
        elif byte == _ESC:
            self._in = _In.ESC
        elif state is _In.ESC:
            self._in = _INTRODUCERS.get(byte, _In.TEXT)
        elif state is _In.CSI:
            if 0x40 <= byte <= 0x7E or byte < 0x20:
                self._in = _In.TEXT
        elif state is _In.SS3:
            self._in = _In.TEXT


_INTRODUCERS = {
    ord("["): _In.CSI,
    ord("O"): _In.SS3,
    ord("]"): _In.STRING,
    ord("P"): _In.STRING,
    ord("_"): _In.STRING,
    ord("^"): _In.STRING,
}

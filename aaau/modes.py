"""The terminal modes a program sets, and how to set them again or undo them.

Pure: fed the ``MODE`` sequences :mod:`aaau.vtscan` finds (DEC private modes,
keypad, scroll region, G0 character set, full reset). The server uses it to
draw a joiner's screen in the right modes (:mod:`aaau.screen`); the client
uses it to put a person's terminal back as it found it, whatever the agent
left on (:meth:`Modes.undo`).
"""

from __future__ import annotations

import re
from typing import Final

#: DEC private modes worth giving a joiner, with their defaults
_DEFAULTS: Final = {1: False, 6: False, 7: True, 25: True, 1004: False, 2004: False}
_MOUSE: Final = (9, 1000, 1001, 1002, 1003, 1005, 1006, 1015, 1016)
_ALTERNATE: Final = (47, 1047, 1049)
_PRIVATE = re.compile(rb"(?:\x1b\[|\xc2\x9b)\?([0-9;]*)([hl])")
_REGION = re.compile(rb"(?:\x1b\[|\xc2\x9b)([0-9]*)(?:;([0-9]*))?r")


class Modes:
    """The terminal modes the agent set, as a joiner's terminal must have them."""

    def __init__(self) -> None:
        self.private: dict[int, bool] = dict(_DEFAULTS)
        self.keypad = False
        self.region: tuple[int, int] | None = None  # DECSTBM, 1-based, None: whole screen
        self.g0 = "B"  # the G0 character set: B ASCII, 0 DEC line drawing

    @property
    def alternate(self) -> bool:
        return any(self.private.get(mode, False) for mode in _ALTERNATE)

    def feed(self, sequence: bytes) -> None:
        if match := _PRIVATE.fullmatch(sequence):
            on = match.group(2) == b"h"
            for number in match.group(1).split(b";"):
                if number.isdigit():
                    self.private[int(number)] = on
        elif sequence in (b"\x1b=", b"\x1b>"):
            self.keypad = sequence == b"\x1b="
        elif sequence == b"\x1bc":
            self.__init__()  # type: ignore[misc]  # a full reset: everything back
        elif sequence.startswith(b"\x1b(") and len(sequence) == 3:
            self.g0 = chr(sequence[2])
        elif match := _REGION.fullmatch(sequence):
            top, bottom = match.group(1), match.group(2)
            self.region = (int(top), int(bottom)) if top and bottom else None

    def undo(self) -> bytes:
        """What puts a terminal in these modes back to the defaults (and the pen, too)."""
        out = bytearray(b"\x1b[0m")
        if self.region is not None:
            out += b"\x1b[r"
        if self.alternate:
            out += b"\x1b[?1049l\x1b[?1047l\x1b[?47l"
        for mode in _MOUSE:
            if self.private.get(mode):
                out += b"\x1b[?%dl" % mode
        for mode, default in _DEFAULTS.items():
            if self.private.get(mode, default) != default:
                out += b"\x1b[?%d%s" % (mode, b"h" if default else b"l")
        if self.keypad:
            out += b"\x1b>"
        if self.g0 != "B":
            out += b"\x1b(B"
        return bytes(out)

    def sequences(self) -> bytes:
        """What puts a terminal that is in the default state into these modes."""
        out = bytearray()
        for mode, default in _DEFAULTS.items():
            if self.private.get(mode, default) != default:
                out += b"\x1b[?%d%s" % (mode, b"h" if not default else b"l")
        for mode in _MOUSE:
            if self.private.get(mode):
                out += b"\x1b[?%dh" % mode
        if self.keypad:
            out += b"\x1b="
        if self.g0 != "B":
            out += b"\x1b(" + self.g0.encode("latin-1")
        return bytes(out)

    def state(self) -> bytes:
        """Every tracked mode set explicitly, on or off: whatever state a terminal is in."""
        out = bytearray()
        for mode, default in _DEFAULTS.items():
            out += b"\x1b[?%d%s" % (mode, b"h" if self.private.get(mode, default) else b"l")
        for mode in _MOUSE:
            out += b"\x1b[?%d%s" % (mode, b"h" if self.private.get(mode) else b"l")
        out += b"\x1b=" if self.keypad else b"\x1b>"
        out += b"\x1b(" + self.g0.encode("latin-1")
        return bytes(out)

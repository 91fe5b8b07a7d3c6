"""The agent's output, split into text and the escape sequences that matter.

Sans-I/O: bytes in, segments out. One :class:`Scanner` per session reads the
PTY output once; each segment is plain bytes with an :class:`Effect` (or none),
so the output filter can drop per role what a role must not receive, and the
screen's mode tracker can read the mode changes, from one parse.

What is classified (7-bit sequences, and the C1 introducers as UTF-8):

- ``CLIPBOARD_WRITE`` / ``CLIPBOARD_QUERY``: OSC 52 with data / with ``?``
  (a query makes the terminal send the person's clipboard to the agent);
- ``QUERY``: anything that makes a terminal answer on its input: device
  attributes (CSI c, CSI > c, CSI = c), status and cursor reports (CSI n),
  XTVERSION (CSI > q), mode reports (CSI ... $ p), window reports
  (CSI 11..21 t), the kitty keyboard query (CSI ? u), DECREQTPARM (CSI x),
  DECRQSS and XTGETTCAP (DCS $ q, DCS + q), colour queries (OSC 4, 10..19 with ``?``);
- ``TITLE``: OSC 0, 1, 2; ``HYPERLINK``: OSC 8;
- ``MODE``: DEC private modes (CSI ? ... h / l), keypad (ESC = / ESC >), the
  scroll region (CSI t ; b r), the G0 character set (ESC ( c), a full reset
  (ESC c): never removed, read by the screen model.

An incomplete sequence at the end of a chunk is held back until the next one
(a CSI at most ``_MAX_CSI`` bytes); :meth:`Scanner.flush` releases a held CSI
or escape (the PTY reader calls it when output pauses), but never a held OSC
or DCS that could be removed: those wait for their end or are dropped past
``_MAX_STRING``.
"""

from __future__ import annotations

import enum
import re
from typing import Final


class Effect(enum.StrEnum):
    CLIPBOARD_WRITE = "clipboard_write"
    CLIPBOARD_QUERY = "clipboard_query"
    QUERY = "query"
    TITLE = "title"
    HYPERLINK = "hyperlink"
    MODE = "mode"


Segment = tuple[bytes, Effect | None]

#: the longest CSI held back while incomplete; longer is passed on as it is
_MAX_CSI: Final = 64
#: the longest OSC or DCS string held back; a removable one longer is dropped
_MAX_STRING: Final = 1 << 20

_C1: Final = frozenset({0x90, 0x9B, 0x9D})  # DCS, CSI, OSC after \xc2 (as UTF-8)
_CSI = re.compile(rb"([\x30-\x3f]*)([\x20-\x2f]*)([\x40-\x7e])")
_STRING_END = re.compile(rb"\x07|\x1b\\|\xc2\x9c")
_REPORT_T = frozenset({b"11", b"13", b"14", b"15", b"16", b"18", b"19", b"20", b"21"})
_COLOUR_QUERY = re.compile(rb"^(?:4|1[0-9]|5)\;(?:.*;)?\?")


def _csi_effect(params: bytes, inter: bytes, final: int) -> Effect | None:
    if final == 0x63:  # c: device attributes, any kind
        return Effect.QUERY
    if final == 0x6E:  # n: device status / cursor position
        return Effect.QUERY
    if final == 0x71 and params.startswith(b">"):  # XTVERSION
        return Effect.QUERY
    if final == 0x70 and inter == b"$":  # DECRQM
        return Effect.QUERY
    if final == 0x74 and params.split(b";")[0] in _REPORT_T:
        return Effect.QUERY
    if final == 0x75 and params == b"?":  # kitty keyboard flags
        return Effect.QUERY
    if final == 0x78 and not inter:  # DECREQTPARM
        return Effect.QUERY
    if final in (0x68, 0x6C) and params.startswith(b"?"):  # DECSET / DECRST
        return Effect.MODE
    if final == 0x72 and not inter and not params.startswith((b"?", b">")):  # DECSTBM
        return Effect.MODE
    return None


def _osc_effect(body: bytes) -> Effect | None:
    number, _, rest = body.partition(b";")
    if number == b"52":
        return Effect.CLIPBOARD_QUERY if rest.split(b";")[-1] == b"?" else Effect.CLIPBOARD_WRITE
    if number in (b"0", b"1", b"2"):
        return Effect.TITLE
    if number == b"8":
        return Effect.HYPERLINK
    if _COLOUR_QUERY.match(body):
        return Effect.QUERY
    return None


def _next_intro(data: bytes, start: int) -> int:
    """Where the next sequence begins (ESC, or a C1 introducer in UTF-8), or -1.

    Found with ``bytes.find`` (memchr), not a regex: text with no sequence, the
    bulk of any output, costs almost nothing to scan.
    """
    esc = data.find(b"\x1b", start)
    stop = esc if esc >= 0 else len(data)
    c2 = data.find(b"\xc2", start, stop)
    while c2 >= 0:
        if c2 + 1 < len(data) and data[c2 + 1] in _C1:
            return c2
        c2 = data.find(b"\xc2", c2 + 1, stop)
    return esc


class Scanner:
    """Splits output into segments; holds back what may still be a removable sequence."""

    def __init__(self) -> None:
        self._held = b""

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(self, data: bytes) -> list[Segment]:
        """The segments of ``data`` (after what was held), in order."""
        if self._held:
            data, self._held = self._held + data, b""
        if data.endswith(b"\xc2"):  # perhaps the first half of a C1 introducer
            data, self._held = data[:-1], b"\xc2"
        if not data:
            return []
        pos = _next_intro(data, 0)
        if pos < 0:
            return [(data, None)]
        out: list[Segment] = []
        text_from = 0
        while True:
            end, effect = self._sequence(data, pos)
            if end < 0:  # incomplete: hold it back
                if pos > text_from:
                    out.append((data[text_from:pos], None))
                self._held = data[pos:] + self._held
                return out
            if effect is not None:
                if pos > text_from:
                    out.append((data[text_from:pos], None))
                out.append((data[pos:end], effect))
                text_from = end
            pos = _next_intro(data, end)
            if pos < 0:
                if text_from < len(data):
                    out.append((data[text_from:], None))
                return out

    def flush(self) -> list[Segment]:
        """Output paused: release a held CSI or escape; an OSC or DCS keeps waiting."""
        held = self._held
        if not held or _is_string(held):
            return []
        self._held = b""
        return [(held, None)]

    def _sequence(self, data: bytes, pos: int) -> tuple[int, Effect | None]:
        """The end of the sequence at ``pos`` (-1: incomplete) and its effect."""
        c1 = data[pos] == 0xC2
        start = pos + (2 if c1 else 1)
        if start >= len(data):
            return -1, None
        kind = data[start - 1] if c1 else data[start]
        if c1:
            kind = {0x9B: 0x5B, 0x9D: 0x5D, 0x90: 0x50}[kind]
            body_at = start
        else:
            body_at = start + 1
        if kind == 0x5B:  # CSI
            match = _CSI.match(data, body_at)
            if match is None:
                if len(data) - pos > _MAX_CSI or not _csi_prefix(data, body_at):
                    return body_at, None  # not a CSI we know: pass it on
                return -1, None
            return match.end(), _csi_effect(match.group(1), match.group(2), match.group(3)[0])
        if kind in (0x5D, 0x50):  # OSC, DCS: strings
            return self._string(data, pos, body_at, osc=kind == 0x5D)
        if kind in (0x3D, 0x3E, 0x63):  # ESC =, ESC >, ESC c
            return body_at, Effect.MODE
        if kind == 0x28:  # ESC ( c: the G0 character set
            return (body_at + 1, Effect.MODE) if body_at < len(data) else (-1, None)
        return body_at, None

    def _string(
        self, data: bytes, pos: int, body_at: int, *, osc: bool
    ) -> tuple[int, Effect | None]:
        end = _STRING_END.search(data, body_at)
        if end is None:
            if len(data) - pos > _MAX_STRING:  # too long to hold: drop a removable one
                head = data[body_at : body_at + 64]
                effect = _osc_effect(head) if osc else _dcs_effect(head)
                return len(data), effect if effect is not None else None
            return -1, None
        body = data[body_at : end.start()]
        return end.end(), (_osc_effect(body) if osc else _dcs_effect(body))


def _dcs_effect(body: bytes) -> Effect | None:
    return Effect.QUERY if body.startswith((b"$q", b"+q")) else None


def _csi_prefix(data: bytes, at: int) -> bool:
    """Could the bytes from ``at`` still become a CSI (all parameter/intermediate bytes)?"""
    return all(0x20 <= b <= 0x3F for b in data[at:])


def _is_string(held: bytes) -> bool:
    return held[:2] in (b"\x1b]", b"\x1bP", b"\xc2\x9d", b"\xc2\x90")


def without(segments: list[Segment], removed: frozenset[Effect]) -> bytes:
    """The bytes of ``segments`` less those whose effect is in ``removed``."""
    return b"".join(seg for seg, effect in segments if effect is None or effect not in removed)

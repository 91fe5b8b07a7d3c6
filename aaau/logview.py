"""What the audit log says, put the way people ask: sessions, timelines, typed lines.

Sans-I/O: these classes are fed :class:`aaau.logfiles.Entry` records in file
order and answer ``aaau log ls``, ``show`` and ``grep``:

- :class:`Sessions`: one summary per session (creator, argv, start and end,
  exit, who joined, bytes);
- :class:`Typing`: keystrokes (one ``input`` record each, when typed
  interactively) put back together into the lines each person typed, with the
  line editing a shell would apply (erase, kill line, word erase), keys named
  (``<up>``), control characters as ``^C``;
- :class:`OutputText`: each session's output as text lines, escape sequences
  removed, so a pattern is found even where a chunk boundary or a colour cut it.

Everything shown comes from members and their agents: whoever prints it makes
it printable first (:func:`aaau.client.printable`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, Final

import attrs

from .logfiles import Entry

# --- sessions -----------------------------------------------------------------------------


@attrs.define
class Summary:
    """One session as the log tells it."""

    session_id: str
    creator: str = "-"
    uid: int | None = None
    argv: list[str] = attrs.Factory(list)
    agent_user: str | None = None
    host: str | None = None
    term: str | None = None
    rows: int | None = None
    cols: int | None = None
    started: float | None = None
    ended: float | None = None
    end: str | None = None  # "exit code 0", "killed by signal 9", "lost: ..."
    exit_code: int | None = None
    signal: int | None = None
    lost: bool = False
    joined: list[str] = attrs.Factory(list)  # people other than the creator, first join order
    output_bytes: int = 0
    input_bytes: int = 0
    last_seen: float | None = None

    @property
    def state(self) -> str:
        if self.lost:
            return "lost"
        if self.end is not None:
            return "ended"
        return "open"

    def involves(self, user: str) -> bool:
        return self.creator == user or user in self.joined

    def overlaps(self, since: float | None, until: float | None) -> bool:
        start = self.started if self.started is not None else self.last_seen or 0.0
        end = self.ended if self.ended is not None else float("inf")
        return (since is None or end >= since) and (until is None or start <= until)

    def as_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "state": self.state}


#: what Sessions needs; everything else it skips without parsing
SUMMARY_TYPES: Final = frozenset(
    {"session_start", "session_end", "join", "input", "output", "spawn_failed"}
)


class Sessions:
    """Session summaries, from records fed in order."""

    def __init__(self) -> None:
        self._by_id: dict[str, Summary] = {}

    def _summary(self, session_id: str) -> Summary:
        found = self._by_id.get(session_id)
        if found is None:
            found = self._by_id[session_id] = Summary(session_id)
        return found

    def feed(self, e: Entry) -> None:
        if e.session_id is None:
            return
        s = self._summary(e.session_id)
        s.last_seen = e.timestamp
        md = e.metadata
        kind = e.command_type
        if kind == "session_start":
            s.creator, s.uid, s.started = e.user, e.uid, e.timestamp
            s.argv = [str(a) for a in md.get("argv") or []]
            s.agent_user, s.host = md.get("agent_user"), e.host
            s.term, s.rows, s.cols = md.get("term"), md.get("rows"), md.get("cols")
        elif kind == "session_end":
            s.ended, s.end = e.timestamp, e.content
            s.exit_code, s.signal = md.get("exit_code"), md.get("signal")
            s.lost = bool(md.get("lost"))
            if s.lost and not s.argv:
                s.argv = [str(a) for a in md.get("argv") or []]
                s.agent_user = md.get("agent_user")
                s.started = s.started or md.get("started")
        elif kind == "join":
            if e.user not in (s.creator, *s.joined) and not md.get("created"):
                s.joined.append(e.user)
        elif kind == "output":
            s.output_bytes += int(md.get("bytes") or 0)
        elif kind == "input":
            s.input_bytes += int(md.get("bytes") or 0)

    def add_bytes(self, session_id: str, kind: str, size: int) -> None:
        """Output or input counted without its record parsed (see :func:`terminal_bytes`)."""
        s = self._summary(session_id)
        if kind == "output":
            s.output_bytes += size
        else:
            s.input_bytes += size

    def summaries(self) -> list[Summary]:
        """Sessions in order of their start (a session seen only in part: of its first record)."""
        return sorted(
            self._by_id.values(), key=lambda s: s.started or s.last_seen or 0.0
        )

    def get(self, session_id: str) -> Summary | None:
        return self._by_id.get(session_id)


_BYTES: Final = re.compile(rb'"bytes":([0-9]+)')


def terminal_bytes(line: bytes) -> int:
    """``metadata.bytes`` of an output or input record's line, without parsing the line.

    ``"bytes":`` cannot occur inside a JSON string (its closing quote would be
    escaped), and the metadata comes after the content: the last one is it.
    """
    at = line.rfind(b'"bytes":')
    found = _BYTES.match(line, at) if at >= 0 else None
    return int(found.group(1)) if found else 0


# --- typed lines --------------------------------------------------------------------------

_KEYS: Final = {
    b"\x1b[A": "<up>",
    b"\x1b[B": "<down>",
    b"\x1b[C": "<right>",
    b"\x1b[D": "<left>",
    b"\x1bOA": "<up>",
    b"\x1bOB": "<down>",
    b"\x1bOC": "<right>",
    b"\x1bOD": "<left>",
    b"\x1b[H": "<home>",
    b"\x1b[F": "<end>",
    b"\x1b[3~": "<delete>",
    b"\x1b[5~": "<pgup>",
    b"\x1b[6~": "<pgdn>",
    b"\x1b[Z": "<backtab>",
}
_PASTE: Final = (b"\x1b[200~", b"\x1b[201~")
_ESCAPE: Final = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|O.|[ -/]*[0-~])?")


@attrs.frozen
class TypedLine:
    """A line a person typed: when they began it, who, in which session, what."""

    timestamp: float
    session_id: str
    user: str
    client_id: int | None
    text: str
    ended_by: str  # "enter", "^C", "^D", "end" (the log ends before Enter)


@attrs.define
class _Line:
    started: float
    user: str
    chars: list[str] = attrs.Factory(list)


class Typing:
    """Input records put back into the lines each client typed."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, int | None, str], _Line] = {}

    def feed(self, e: Entry) -> list[TypedLine]:
        """The lines this record completes (an ``input`` record; others complete none)."""
        if e.command_type != "input" or e.session_id is None:
            return []
        key = (e.session_id, e.client_id, e.user)
        done: list[TypedLine] = []
        data, i = e.data, 0
        while i < len(data):
            line = self._open.get(key)
            if line is None:
                line = self._open[key] = _Line(e.timestamp, e.user)
            byte = data[i]
            if byte == 0x1B:
                match = _ESCAPE.match(data, i)
                seq = match.group(0) if match else b"\x1b"
                if seq not in _PASTE:
                    line.chars.append(_KEYS.get(seq, "<esc>" if len(seq) == 1 else "<key>"))
                i += len(seq)
                continue
            i += 1
            ending = {0x0D: "enter", 0x0A: "enter", 0x03: "^C", 0x04: "^D"}.get(byte)
            if ending is not None:
                if ending != "enter":
                    line.chars.append(ending)
                done.append(self._close(key, e.session_id, ending))
            elif byte in (0x7F, 0x08):
                if line.chars:
                    line.chars.pop()
            elif byte == 0x15:  # ^U: kill the line
                line.chars.clear()
            elif byte == 0x17:  # ^W: erase a word
                while line.chars and line.chars[-1] == " ":
                    line.chars.pop()
                while line.chars and line.chars[-1] != " ":
                    line.chars.pop()
            elif byte < 0x20 and byte != 0x09:
                line.chars.append("^" + chr(byte + 0x40))
            else:
                i = _take_text(data, i - 1, line.chars)
        return [d for d in done if d.text or d.ended_by != "enter"]

    def _close(self, key: tuple[str, int | None, str], session_id: str, why: str) -> TypedLine:
        line = self._open.pop(key)
        return TypedLine(line.started, session_id, line.user, key[1], "".join(line.chars), why)

    def rest(self) -> list[TypedLine]:
        """Lines begun but not ended when the log ends."""
        out = [self._close(key, key[0], "end") for key in list(self._open)]
        return [line for line in out if line.text]


def _take_text(data: bytes, i: int, chars: list[str]) -> int:
    """Printable text from ``i`` up to the next control byte, as characters; the new i."""
    end = i
    while end < len(data) and (data[end] >= 0x20 or data[end] == 0x09) and data[end] != 0x7F:
        end += 1
    chars.extend(data[i:end].decode("utf-8", "replace"))
    return end


# --- output as text -----------------------------------------------------------------------

#: escape sequences (every one begins with ESC, so the regex engine skips to them)
_SEQUENCE: Final = re.compile(
    rb"\x1b(?:"
    rb"\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC ... BEL / ST
    rb"|[P^_X][^\x1b]*\x1b\\"  # DCS, PM, APC, SOS ... ST
    rb"|\[[0-?]*[ -/]*[@-~]"  # CSI
    rb"|[ -/]*[0-~])?"  # the rest; a lone ESC
)
#: control characters that are not line ends, removed after the sequences
_CONTROLS: Final = bytes(b for b in range(32) if b not in (10, 13)) + b"\x7f"


def strip(data: bytes) -> bytes:
    """Terminal output as text: escape sequences and control characters (but line ends)
    removed."""
    return _SEQUENCE.sub(b"", data).translate(None, _CONTROLS)


def _could_hold(literal: bytes) -> Callable[[bytes], bool]:
    """A quick test that raw output may hold ``literal`` once stripped: the literal
    itself, or a beginning of it right before a sequence or control character (which
    stripping could join to its rest). False means certainly not: no strip needed."""
    heads = [re.escape(literal[:k]) for k in range(len(literal) - 1, 0, -1)]
    if not heads:
        return lambda raw: literal in raw
    cut = re.compile(b"(?:" + b"|".join(heads) + b")[" + re.escape(_CONTROLS) + b"]")

    def test(raw: bytes) -> bool:
        return literal in raw or cut.search(raw) is not None

    return test
_LINE_END: Final = re.compile(rb"\r\n|\n|\r")
#: an unfinished line is kept for the next chunk up to this many bytes
_CARRY: Final = 4096


@attrs.frozen
class OutputMatch:
    timestamp: float
    session_id: str
    text: str


class OutputText:
    """Per session, output as lines of text: finds a pattern across chunk boundaries."""

    def __init__(self, pattern: re.Pattern[bytes], literal: bytes | None = None) -> None:
        """``literal``: the pattern is this plain text (a fast test skips most chunks)."""
        self._pattern = pattern
        self._carry: dict[str, tuple[bytes, float]] = {}  # an unfinished line, and its time
        self._maybe = _could_hold(literal) if literal else None

    def feed(self, session_id: str, data: bytes, timestamp: float) -> list[OutputMatch]:
        """Matches in the lines this chunk finishes (a line is dated by its last chunk)."""
        carried, _ = self._carry.pop(session_id, (b"", timestamp))
        raw = carried + data
        cut = max(raw.rfind(b"\n"), raw.rfind(b"\r")) + 1
        if len(raw) - cut > _CARRY:
            cut = len(raw)
        if cut < len(raw):
            self._carry[session_id] = (raw[cut:], timestamp)
        return list(self._matches(session_id, raw[:cut], timestamp)) if cut else []

    def rest(self) -> list[OutputMatch]:
        """Matches in the lines the log ends inside."""
        out: list[OutputMatch] = []
        for session_id, (raw, timestamp) in self._carry.items():
            out.extend(self._matches(session_id, raw, timestamp))
        self._carry.clear()
        return out

    def _matches(self, session_id: str, raw: bytes, timestamp: float) -> Iterator[OutputMatch]:
        if self._maybe is not None and not self._maybe(raw):
            return
        text = strip(raw)
        if self._pattern.search(text) is None:
            return
        for line in _LINE_END.split(text):
            if self._pattern.search(line):
                yield OutputMatch(timestamp, session_id, line.decode("utf-8", "replace"))

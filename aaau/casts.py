"""A session's recording in formats that existing players take.

Sans-I/O: a :class:`aaau.logview.Summary` and the session's records in,
lines out.

- ``asciicast-v2`` (asciinema 2.x: ``asciinema play``): a header, then
  ``[seconds since start, "o"|"i"|"r", data]``; no exit status in this format.
- ``asciicast-v3`` (asciinema 3): ``term`` in the header, events timed by the
  interval since the previous one, and an ``"x"`` event with the exit status
  (``128 + N`` for a signal, as a shell reports it).
- ``tlog`` (``tlog-play``, tlog's JSON schema 2.3): messages with ``timing``
  strings, text and the bytes that are not UTF-8 apart; input, output and
  window sizes.

Terminal bytes are decoded as a stream, so a character split between two
records stays whole; bytes that are not UTF-8 become U+FFFD in asciicast
(whose strings must be text), and go into ``out_bin``/``in_bin`` in tlog.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import shlex
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import attrs

from .logfiles import Entry
from .logview import Summary

FORMATS: Final = ("asciicast-v2", "asciicast-v3", "tlog")

#: what a session's export reads; everything else is skipped
EXPORT_TYPES: Final = frozenset({"output", "input", "resize", "session_end"})


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def size_of(e: Entry) -> tuple[int, int] | None:
    """(cols, rows) of a resize record."""
    rows, cols = e.metadata.get("rows"), e.metadata.get("cols")
    if isinstance(rows, int) and isinstance(cols, int):
        return cols, rows
    return None


def exit_status(summary: Summary) -> int | None:
    if summary.signal is not None:
        return 128 + summary.signal
    return summary.exit_code


def _header_common(summary: Summary) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if summary.started is not None:
        out["timestamp"] = int(summary.started)
    if summary.argv:
        out["command"] = shlex.join(summary.argv)
    out["title"] = f"aaau session {summary.session_id} of {summary.creator}"
    return out


def asciicast_v2(summary: Summary, entries: Iterable[Entry]) -> Iterator[str]:
    start = summary.started
    yield _dumps(
        {
            "version": 2,
            "width": summary.cols or 80,
            "height": summary.rows or 24,
            **_header_common(summary),
            "env": {"TERM": summary.term or "xterm-256color"},
        }
    )
    for t, code, data in _events(entries):
        start = t if start is None else start
        yield _dumps([round(max(0.0, t - start), 6), code, data])


def asciicast_v3(summary: Summary, entries: Iterable[Entry]) -> Iterator[str]:
    term = {"cols": summary.cols or 80, "rows": summary.rows or 24}
    if summary.term:
        term["type"] = summary.term  # type: ignore[assignment]
    yield _dumps({"version": 3, "term": term, **_header_common(summary)})
    last = summary.started
    for t, code, data in _events(entries):
        last = t if last is None else last
        yield _dumps([round(max(0.0, t - last), 6), code, data])
        last = max(last, t)
    status = exit_status(summary)
    if status is not None and summary.ended is not None:
        gap = summary.ended - (last or summary.ended)
        yield _dumps([round(max(0.0, gap), 6), "x", str(status)])


def _events(entries: Iterable[Entry]) -> Iterator[tuple[float, str, str]]:
    """(time, "o"|"i"|"r", text) for asciicast: streams decoded, sizes as COLSxROWS."""
    decoders: dict[str, Callable[[bytes], str]] = {
        "output": codecs.getincrementaldecoder("utf-8")("replace").decode,
        "input": codecs.getincrementaldecoder("utf-8")("replace").decode,
    }
    for e in entries:
        if e.command_type in decoders:
            text = decoders[e.command_type](e.data)
            if text:
                yield e.timestamp, "o" if e.command_type == "output" else "i", text
        elif e.command_type == "resize" and (size := size_of(e)):
            yield e.timestamp, "r", f"{size[0]}x{size[1]}"


# --- tlog -------------------------------------------------------------------------------

#: a tlog message holds at most about this many characters of text (tlog's default is 2048)
_TLOG_CHUNK: Final = 2048


@attrs.define
class _Stream:
    """One direction's text and bytes for a tlog message, decoded across records."""

    txt: list[str] = attrs.Factory(list)
    bin: list[int] = attrs.Factory(list)
    pending: bytes = b""  # the start of a character the next record finishes

    def take(self, data: bytes, mark: str) -> str:
        """Add ``data``; the timing records for it (``>N`` / ``]1/N`` or ``<N`` / ``[1/N``)."""
        data, self.pending = self.pending + data, b""
        timing: list[str] = []
        text_mark, bin_mark = mark, {">": "]", "<": "["}[mark]
        while data:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                good, bad = data[: exc.start], data[exc.start : exc.end]
                if exc.reason == "unexpected end of data":  # a character cut in two
                    self.pending = data[exc.start :]
                    data = good
                    continue
                if good:
                    self._text(good.decode("utf-8"), text_mark, timing)
                self.txt.append("\ufffd")
                self.bin.extend(bad)
                timing.append(f"{bin_mark}1/{len(bad)}")
                data = data[exc.end :]
                continue
            self._text(text, text_mark, timing)
            break
        return "".join(timing)

    def _text(self, text: str, mark: str, timing: list[str]) -> None:
        if text:
            self.txt.append(text)
            timing.append(f"{mark}{len(text)}")

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.txt)


class _Tlog:
    """tlog messages being built: one at a time, cut every ``_TLOG_CHUNK`` characters."""

    def __init__(self, summary: Summary, host: str | None) -> None:
        self.start = summary.started
        self.common = {
            "ver": "2.3",
            "host": summary.host or host or socket.gethostname(),
            "rec": summary.session_id,
            "user": summary.creator,
            "term": summary.term or "xterm",
            # tlog wants the kernel's audit session: there is none, so a number from the id
            "session": int(hashlib.sha256(summary.session_id.encode()).hexdigest()[:7], 16) + 1,
        }
        self.id = 0
        self.out, self.inp = _Stream(), _Stream()
        self.timing: list[str] = [f"={summary.cols or 80}x{summary.rows or 24}"]
        self.pos: float | None = None  # the message's start, seconds
        self.last: float | None = None  # the last event's time

    def add(self, e: Entry) -> str | None:
        """Add an event; a finished message when this one fills it."""
        t = e.timestamp
        self.start = t if self.start is None else self.start
        if self.last is None:
            self.last = max(t, self.start)
        if self.pos is None:
            self.pos = self.last  # the first delay counts from here
        delay = int((t - self.last) * 1000)
        if delay > 0:
            self.timing.append(f"+{delay}")
            self.last += delay / 1000
        if e.command_type == "resize":
            if size := size_of(e):
                self.timing.append(f"={size[0]}x{size[1]}")
        elif e.command_type == "output":
            self.timing.append(self.out.take(e.data, ">"))
        else:
            self.timing.append(self.inp.take(e.data, "<"))
        return self.message() if self.out.chars + self.inp.chars >= _TLOG_CHUNK else None

    def message(self) -> str:
        self.id += 1
        pos = self.pos if self.pos is not None else self.start or 0.0
        text = {
            **self.common,
            "id": self.id,
            "pos": int((pos - (self.start or pos)) * 1000),
            "time": round(pos, 3),
            "timing": "".join(self.timing),
            "in_txt": "".join(self.inp.txt),
            "in_bin": self.inp.bin,
            "out_txt": "".join(self.out.txt),
            "out_bin": self.out.bin,
        }
        self.out, self.inp, self.timing, self.pos = _Stream(), _Stream(), [], None
        return json.dumps(text, ensure_ascii=False, separators=(",", ":"))

    @property
    def pending(self) -> bool:
        return bool(self.timing)


def tlog(summary: Summary, entries: Iterable[Entry], host: str | None = None) -> Iterator[str]:
    """tlog JSON messages (format 2.3), one a line, as ``tlog-rec`` would have written."""
    writer = _Tlog(summary, host)
    for e in entries:
        if e.command_type in ("output", "input", "resize") and (done := writer.add(e)):
            yield done
    if writer.pending:
        yield writer.message()


WRITERS: Final[dict[str, Callable[[Summary, Iterable[Entry]], Iterator[str]]]] = {
    "asciicast-v2": asciicast_v2,
    "asciicast-v3": asciicast_v3,
    "tlog": tlog,
}

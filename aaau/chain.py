"""The audit log's hash chain: how a record is sealed, and how a file is checked.

A record's line is its JSON object with one last member, ``"hash"``: the
SHA-256 (hex) of the previous record's hash followed by the record's JSON
*without* that member, byte for byte as written. The first record of a file
is chained to ``""`` (or, when it continues a file it does not begin, to that
file's last hash, which it names), so every file can be checked on its own,
and a file names the hash the file before it ended with (``audit_chain``
records), so a set of rotated files can be checked as one.

Editing a byte of a record, removing a record or swapping two breaks the link
of the record after the change (or of that record); cutting records off the
end of the newest file leaves a valid chain that ends early, which only a
copy of the head kept elsewhere shows (the server logs it: ``audit-anchor``).

Sans-I/O except :func:`last_hash`, which reads the end of an open file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable
from typing import Final

import attrs

_KEY: Final = b',"hash":"'
_SUFFIX_LEN: Final = len(_KEY) + 64 + 2  # ,"hash":"<64 hex>"}
_HEX: Final = re.compile(rb"[0-9a-f]{64}")
_BEGIN: Final = b'"command_type":"audit_chain"'


class ChainError(Exception):
    """A line is not a sealed record."""


def link(previous: str, body: bytes) -> str:
    """The hash of a record (its JSON without ``hash``) that follows ``previous``."""
    digest = hashlib.sha256(previous.encode("ascii"))
    digest.update(body)
    return digest.hexdigest()


def sealed(body: bytes, digest: str) -> bytes:
    """The line written: ``body`` with ``"hash"`` as its last member, and a newline."""
    return b"".join((memoryview(body)[:-1], _KEY, digest.encode("ascii"), b'"}\n'))  # one copy


def unseal(line: bytes) -> tuple[bytes, str] | None:
    """(body, hash) of a sealed line (with or without its newline); None if unsealed."""
    line = line.rstrip(b"\n")
    if len(line) <= _SUFFIX_LEN or not line.endswith(b'"}'):
        return None
    start = len(line) - _SUFFIX_LEN
    if line[start : start + len(_KEY)] != _KEY:
        return None
    digest = line[start + len(_KEY) : -2]
    if not _HEX.fullmatch(digest):
        return None
    return line[:start] + b"}", digest.decode("ascii")


def last_hash(fd: int) -> str | None:
    """The hash of the last line of an open file: "" if it is empty, None if that line
    carries none. Raises :class:`ChainError` if the file does not end in a newline."""
    size = os.fstat(fd).st_size
    if size == 0:
        return ""
    block, end = 65536, size
    tail = b""
    while True:
        start = max(0, end - block)
        tail = os.pread(fd, end - start, start) + tail
        if not tail.endswith(b"\n"):
            raise ChainError("the file does not end with a whole line")
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut >= 0 or start == 0:
            found = unseal(tail[cut + 1 :])
            return found[1] if found else None
        end = start
        block = min(block * 2, 1 << 24)


@attrs.frozen
class Break:
    """Where a chain does not hold: the line number (1-based) and what is wrong."""

    line: int
    why: str


@attrs.define
class FileReport:
    """What checking one file found."""

    path: str
    lines: int = 0
    unsealed: int = 0  # lines before the chain began (written before there was one)
    first: str | None = None  # audit_chain's "previous": the hash the file before ended with
    head: str = ""  # the last hash
    holds_head: bool = False  # the hash looked for is one of this file's
    breaks: list[Break] = attrs.Factory(list)
    unfinished: int = 0  # bytes of a last line without its newline (a write going on)

    @property
    def ok(self) -> bool:
        return not self.breaks


def check_lines(path: str, lines: Iterable[bytes], look_for: str | None = None) -> FileReport:
    """Check the chain of one file's lines.

    Lines before the first sealed one are counted as ``unsealed`` (a log written
    before the chain existed); after it, every line must be sealed and linked.
    After a break, checking goes on from the broken record, so each later
    change is reported too. ``look_for``: a hash kept elsewhere (``holds_head``
    says whether it is here).

    A last line without its newline is not checked and not a break: the server
    may be writing it right now (a reader can see part of a large record), or
    it crashed in the middle of it, and then it adds the newline when it starts
    again and that line is a break. Cutting records off the end is what
    ``look_for`` is for, whether the cut is at a newline or not.
    """
    report = FileReport(path)
    previous: str | None = None
    for number, line in enumerate(lines, 1):
        if report.unfinished:  # the line without its newline was not the last one
            report.breaks.append(Break(number - 1, "the line is cut off (no newline)"))
            report.unfinished = 0
        report.lines = number
        if not line.endswith(b"\n"):
            report.unfinished = len(line)
            report.lines = number - 1
            continue
        found = unseal(line)
        if found is None:
            if previous is None:
                report.unsealed += 1
            else:
                report.breaks.append(Break(number, "the record carries no hash"))
            continue
        body, digest = found
        before = len(report.breaks)
        if previous is None:
            previous = _start_of(body, report, number)
        elif _BEGIN in body:
            previous = _restart(body, previous, report, number)
        if link(previous, body) != digest and len(report.breaks) == before:
            report.breaks.append(Break(number, _CHANGED))
        previous = digest
        report.head = digest
        if digest == look_for:
            report.holds_head = True
    return report


def _restart(body: bytes, previous: str, report: FileReport, number: int) -> str:
    """An ``audit_chain`` inside a file: it must continue the chain before it."""
    try:
        record = json.loads(body)
        continues = (record.get("metadata") or {}).get("continues")
    except (ValueError, AttributeError):
        return previous
    if record.get("command_type") != "audit_chain":
        return previous
    if continues != previous:
        report.breaks.append(
            Break(number, "a new chain begins here, not linked to the record before it")
        )
    return continues if isinstance(continues, str) else ""


def _start_of(body: bytes, report: FileReport, number: int) -> str:
    """What the first sealed record is chained to, from its own ``audit_chain`` metadata."""
    try:
        record = json.loads(body)
        metadata = record.get("metadata") or {}
    except (ValueError, AttributeError):
        return ""
    if record.get("command_type") != "audit_chain":
        if number == 1 or report.unsealed:
            report.breaks.append(
                Break(number, "the file does not begin with audit_chain: records are gone")
            )
        return ""
    report.first = metadata.get("previous")
    continues = metadata.get("continues")
    return continues if isinstance(continues, str) else ""


_CHANGED: Final = (
    "the hash does not match: this record was changed, or the one before it was "
    "changed, removed or moved"
)


def check_sequence(reports: list[FileReport]) -> list[tuple[str, str]]:
    """Gaps between files given oldest first: (path, why) where a file does not follow
    the one before it (a file or the end of one is missing)."""
    gaps = []
    for before, after in itertools.pairwise(reports):
        if after.first is not None and before.head and after.first != before.head:
            gaps.append(
                (
                    after.path,
                    f"begins after hash {after.first[:16]}..., but {before.path} ends "
                    f"with {before.head[:16]}...: records between them are missing",
                )
            )
    return gaps

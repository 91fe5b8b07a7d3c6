"""The audit log on disk: which files, in which order, and their records.

A log directory holds ``audit.jsonl`` and what rotation left of it:
``audit.jsonl.1``, ``audit.jsonl.2.gz``, ``audit.jsonl-20261122`` (logrotate's
``dateext``), compressed or not. They are read oldest first, ordered by their
first record's time, so any rotation naming works. The directory and files
are opened as :mod:`aaau.paths` says (no links followed, nothing another user
could have planted), since ``aaau log`` often runs as root.

Records are read lazily. A cheap look at each line's ``session_id`` and
``command_type`` (fixed places in the JSON the server writes) skips the lines
a reader does not want before any JSON is parsed.
"""

from __future__ import annotations

import base64
import functools
import gzip
import io
import json
import mmap
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Final

import attrs

from . import paths

NAME: Final = "audit.jsonl"
_ROTATED: Final = re.compile(r"audit\.jsonl(?:[.-][0-9]+)?(?:\.gz)?")
#: where a line says whose it is and what it is; both before any content
_HEAD: Final = re.compile(rb'"session_id":(?:null|"([^"\\]*)"),"command_type":"([a-z_0-9]+)"')


class LogError(Exception):
    """The log cannot be read as asked (missing, unsafe, not a log): one clear line."""


@attrs.frozen
class Entry:
    """One audit record, as read back."""

    path: str
    line: int
    timestamp: float
    user: str
    uid: int | None
    role: str | None
    session_id: str | None
    command_type: str
    content: str
    metadata: dict[str, Any]
    host: str | None = None

    @property
    def data(self) -> bytes:
        """The terminal bytes of an ``input`` or ``output`` record."""
        if self.metadata.get("encoding") == "base64":
            return base64.b64decode(self.content)
        return self.content.encode("utf-8")

    @property
    def client_id(self) -> int | None:
        value = self.metadata.get("client_id")
        return value if isinstance(value, int) else None


def entry(path: str, number: int, record: dict[str, Any]) -> Entry:
    """An Entry from a parsed record (fields a record lacks take their defaults)."""
    metadata = record.get("metadata")
    return Entry(
        path=path,
        line=number,
        timestamp=float(record.get("timestamp") or 0.0),
        user=str(record.get("user", "-")),
        uid=record.get("uid"),
        role=record.get("role"),
        session_id=record.get("session_id"),
        command_type=str(record.get("command_type", "")),
        content=str(record.get("content", "")),
        metadata=metadata if isinstance(metadata, dict) else {},
        host=record.get("host"),
    )


def head_of(line: bytes) -> tuple[str | None, str] | None:
    """(session_id, command_type) of a line, without parsing it; None if not a record."""
    found = _HEAD.search(line)
    if found is None:
        return None
    sid = found.group(1)
    return (sid.decode() if sid is not None else None), found.group(2).decode()


@attrs.frozen
class LogDir:
    """The checked log directory and its audit files, oldest first."""

    path: str
    files: tuple[str, ...]

    @classmethod
    def open(cls, path: str) -> LogDir:
        path = os.path.abspath(path)
        try:
            fd = paths.open_dir(path)
        except FileNotFoundError:
            raise LogError(
                f"{path}: no such directory (give the log directory with --log-dir)"
            ) from None
        except PermissionError:
            raise LogError(f"{path}: permission denied") from None
        except OSError as exc:
            raise LogError(str(exc)) from None
        try:
            names = [n for n in os.listdir(fd) if _ROTATED.fullmatch(n)]
        finally:
            os.close(fd)
        files = [os.path.join(path, n) for n in names]
        return cls(path, tuple(sorted(files, key=_first_time)))

    def require(self) -> tuple[str, ...]:
        if not self.files:
            raise LogError(f"{self.path}: no audit log here ({NAME} or rotated copies)")
        return self.files


def open_log(path: str) -> IO[bytes]:
    """A file of the log, read through gzip if its name says so; checked like the server's."""
    directory, name = paths.directory_of(path)
    try:
        dir_fd = paths.open_dir(directory)
        try:
            fd = paths.open_file(dir_fd, name, os.O_RDONLY, 0, directory)
        finally:
            os.close(dir_fd)
    except PermissionError:
        raise LogError(f"{path}: permission denied") from None
    except OSError as exc:
        raise LogError(f"{path}: {exc.strerror or exc}") from None
    raw = os.fdopen(fd, "rb", buffering=1 << 20)
    if name.endswith(".gz"):
        return _Gzip(raw)  # type: ignore[return-value]
    return raw


class _Gzip(gzip.GzipFile):
    """A GzipFile that closes the file it reads (GzipFile leaves a given one open)."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def _first_time(path: str) -> tuple[float, str]:
    """Sort key: the first record's timestamp (an empty or unreadable file sorts last)."""
    try:
        with open_log(path) as f:
            for line in f:
                try:
                    return float(json.loads(line).get("timestamp") or 0.0), path
                except (ValueError, AttributeError):
                    continue
    except (LogError, OSError, EOFError):
        pass
    return float("inf"), path


def lines(path: str, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a file, from byte ``start`` (then numbered 0: unknown)."""
    with open_log(path) as f:
        if start:
            f.seek(start)
            for line in f:
                yield 0, line
        else:
            yield from enumerate(f, 1)


def records(
    files: Iterable[str],
    want: Callable[[str | None, str], bool] | None = None,
    *,
    marker: bytes | None = None,
    begin: int | None = None,
) -> Iterator[Entry]:
    """The records of ``files`` in order, those ``want(session_id, command_type)`` takes.

    ``marker``: a byte string every wanted line contains (a session's id): lines
    without it are skipped without a look, and files without it entirely.
    ``begin``: where in the first file to begin (a line's start), found already.
    Lines that are not records (cut off, foreign) are skipped.
    """
    for index, path in enumerate(files):
        if index == 0 and begin is not None:
            start: int | None = begin
        else:
            start = 0 if marker is None else _first_line_with(path, marker)
        if start is None:
            continue
        for number, line in lines(path, start):
            if marker is not None and marker not in line:
                continue
            head = head_of(line)
            if head is None or (want is not None and not want(*head)):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield entry(path, number, record)


def session_marker(session_id: str) -> bytes:
    return b'"session_id":' + json.dumps(session_id).encode() + b","


def session_records(
    files: tuple[str, ...],
    session_id: str,
    want: Callable[[str | None, str], bool] | None = None,
) -> Iterator[Entry]:
    """A session's records (those ``want`` takes), found fast in a large log.

    A session's first record is its ``session_start``, whose bytes
    ``"session_id":"ID","command_type":"session_start"`` occur nowhere else:
    the files are searched for them newest first and from their ends (recent
    sessions are the ones people replay), at memory speed (0.12 s for the whole
    of a 1 GiB file), and reading begins there, with the
    later files searched for the session's id. A compressed file on the way,
    or no ``session_start`` at all (a log from elsewhere), means reading from
    the oldest file, as :func:`records` does.
    """
    marker = session_marker(session_id)
    found = _session_start(files, session_id)
    if found is None:
        return records(files, want, marker=marker)
    index, at = found
    return records(files[index:], want, marker=marker, begin=at)


@functools.lru_cache(maxsize=4)
def _session_start(files: tuple[str, ...], session_id: str) -> tuple[int, int] | None:
    """(file, offset) of a session's ``session_start`` line (kept: a command that reads
    a session twice, a summary then the records, searches once)."""
    start = session_marker(session_id) + b'"command_type":"session_start"'
    for index in reversed(range(len(files))):
        if files[index].endswith(".gz"):
            return None
        at = _first_line_with(files[index], start, once=True)
        if at is not None:
            return index, at
    return None


def _first_line_with(path: str, marker: bytes, *, once: bool = False) -> int | None:
    """Where the first line holding ``marker`` begins (None: nowhere in the file).

    ``once``: the marker occurs at most once, so it is searched from the end,
    where the records people look for most (today's) are.

    A memory-speed search (mmap), so a session late in a large file is found at
    once; compressed files are read from their start.
    """
    if path.endswith(".gz"):
        return 0
    with open_log(path) as f:
        if not isinstance(f, io.BufferedReader) or os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            at = _find_from_the_end(mm, marker) if once else mm.find(marker)
            return None if at < 0 else mm.rfind(b"\n", 0, at) + 1


def _find_from_the_end(mm: mmap.mmap, needle: bytes, chunk: int = 64 << 20) -> int:
    """Where ``needle`` (which occurs at most once) is, searching the last ``chunk``
    bytes first, then the ones before (a forward find per chunk: ``rfind`` is
    half as fast)."""
    end = len(mm)
    while end > 0:
        start = max(0, end - chunk)
        at = mm.find(needle, start, min(len(mm), end + len(needle) - 1))
        if at >= 0:
            return at
        end = start
    return -1

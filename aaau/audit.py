"""The JSONL audit log: one whole line per record, written before the effect.

This stream is separate from the operational (structlog) logs. Each record is
one ``write(2)`` on a file opened ``O_APPEND``, so lines never interleave and
a record is in the kernel before the input or command it records is applied.
Terminal bytes are stored losslessly: as text when they are valid UTF-8,
otherwise as base64 (``metadata.encoding`` says which). See docs/audit.md.

Every record ends with ``hash``: SHA-256 over the previous record's hash and
this record's bytes without it (:mod:`aaau.chain`), so an edited, removed or
reordered record breaks the chain. A file begins with an ``audit_chain``
record naming the last hash of the file before it (rotation, a replaced file),
and a server that starts on a non-empty file continues its chain.

:meth:`AuditLog.bind` returns a :class:`BoundAudit` that fills in who and
where (user, uid, role, session, client) on every record it writes, in the
manner of structlog's ``bind``: binding returns a new object, never changes one.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import orjson
import structlog
import trio

from . import chain, paths
from .journal import JournalSink

log = structlog.get_logger("aaau.audit")

#: how often a failed log is tried again (and a deleted file noticed)
RETRY_INTERVAL: Final = 1.0

#: how often the chain's head is logged (``audit-anchor``) when it moved
ANCHOR_INTERVAL: Final = 300.0

#: how long output may be held to be written as one record with what follows it
HOLD_SECONDS: Final = 0.02


@attrs.frozen
class AuditRecord:
    timestamp: float
    seq: int
    host: str
    source: str  # "system", "human" or "agent"
    user: str
    uid: int | None
    role: str | None
    session_id: str | None
    command_type: str
    content: str
    metadata: dict[str, Any]


def encode_bytes(data: bytes) -> tuple[str, str]:
    """(content, encoding) storing ``data`` losslessly in a JSON string."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def decode_content(content: str, encoding: str) -> bytes:
    """The bytes a record's content stands for (the inverse of encode_bytes)."""
    return base64.b64decode(content) if encoding == "base64" else content.encode("utf-8")


#: the standard library's encoder: the fallback for what orjson refuses
_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
_NAMES = tuple(f.name for f in attrs.fields(AuditRecord))


def _json(record: AuditRecord) -> bytes:
    """A record's JSON without its hash: fields in order, no copy of the content
    (``attrs.asdict`` would copy it and recurse into the metadata on every record).

    orjson writes it (compact, UTF-8): recording output is mostly this escaping, at
    about half the standard library's cost (docs/design.md). What orjson refuses
    (a lone surrogate from a file name or argv, a non-string key, a huge integer)
    the standard library writes, ASCII-escaped; both are JSON, and the hash covers
    the bytes as written, so a reader never needs to know which wrote a line.
    """
    fields = {name: getattr(record, name) for name in _NAMES}
    try:
        return orjson.dumps(fields)
    except TypeError:  # orjson.JSONEncodeError
        return _DUMPS(fields).encode()


class AuditUnavailable(Exception):
    """The log cannot take a record now; whatever needed one must not happen."""


#: records that must not be lost (a session's end, a kill, a refusal) and are kept in
#: memory while the log cannot take them, written in order when it can again
PENDING_RECORDS: Final = 10_000


class AuditLog:
    """Appends records to ``path`` (created 0640, owner root, group ``gid``).

    Two ways to write. :meth:`write` is for a record that gates an action:
    if the log cannot take it (disk full, file gone), it raises
    :class:`AuditUnavailable` and the caller refuses the action, so nothing
    happens unrecorded. :meth:`note` is for a record of something that has
    happened or must happen anyway (a session's end, FORCE_KILL, a refusal):
    it never raises; if the log cannot take it now it is kept (at most
    ``PENDING_RECORDS``, then counted as lost) and written, in order, before
    anything else once the log can. :meth:`retry` (every second, from the
    server) tries that, and reopens the file if it was deleted or replaced.
    A failed write leaves no partial line: the file is truncated back.
    """

    def __init__(self, path: str, *, gid: int | None = None) -> None:
        self.path = path
        self._gid = gid
        self._seq = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._lost = 0
        self.failure: str | None = None  # why the log cannot take records now
        self._failed_at = 0.0
        self._reopen_failed = False
        self._host = socket.gethostname()
        self._file = _ChainedFile(self._host)
        self.journal: JournalSink | None = None  # a copy of each record (aaau/journal.py)
        self._told_dropped = 0
        self._anchored = ""
        self._held: dict[object, Callable[[], None]] = {}
        self._holding = trio.Event()
        self.reopen(gid=gid)

    @classmethod
    def open_in(cls, log_dir: str, *, gid: int | None) -> AuditLog:
        """``audit.jsonl`` in ``log_dir``, made ``root:gid 0750`` if it is missing."""
        fd = paths.open_dir(log_dir, create=(0, gid if gid is not None else 0, 0o750))
        os.close(fd)
        return cls(os.path.join(log_dir, "audit.jsonl"), gid=gid)

    @property
    def available(self) -> bool:
        return self.failure is None and not self._pending

    @property
    def head(self) -> str:
        """The hash of the last record written ("" before the first)."""
        return self._file.head

    def reopen(self, *, gid: int | None = None) -> None:
        """(Re)open the file, as after a log rotation; the old one stays if this fails.

        The directory is checked and the file opened without following a link
        (:mod:`aaau.paths`): root never appends to a file someone else chose.
        """
        self._file.open(self.path, gid if gid is not None else self._gid)
        self._gid = gid if gid is not None else self._gid

    def close(self) -> None:
        self.anchor()
        self._file.close()
        if self.journal is not None:
            self.journal.close()

    def _record(self, command_type: str, **fields: Any) -> tuple[AuditRecord, bytes]:
        """The record and its JSON without the hash (added when it is written)."""
        self._seq += 1
        role = fields.pop("role", None)
        record = AuditRecord(
            timestamp=fields.pop("timestamp", None) or time.time(),
            seq=self._seq,
            host=self._host,
            source=fields.pop("source", "system"),
            user=fields.pop("user", "-"),
            uid=fields.pop("uid", None),
            role=role if role is None or isinstance(role, str) else role.value,
            session_id=fields.pop("session_id", None),
            command_type=command_type,
            content=fields.pop("content", ""),
            metadata=fields.pop("metadata", None) or {},
        )
        if fields:
            raise TypeError(f"unknown audit fields: {sorted(fields)}")
        body = _json(record)
        return record, body

    def hold(self, owner: object, release: Callable[[], None]) -> None:
        """``owner`` holds records back (output, to write many chunks as one record):
        ``release()`` writes them, before any other record, or after ``HOLD_SECONDS``.

        So the file keeps the order things happened in, and a flood of small
        chunks costs one record's encoding, hash and write per batch, not per chunk.
        """
        if not self._held:
            self._holding.set()
        self._held.setdefault(owner, release)

    def release_held(self) -> None:
        """Write every held record now, oldest holder first."""
        while self._held:
            held, self._held = self._held, {}
            for release in held.values():
                release()

    def write(self, command_type: str, **fields: Any) -> AuditRecord:
        """Record, or raise :class:`AuditUnavailable` (and the caller does nothing)."""
        self.release_held()
        self._flush()  # what was kept goes first, so sequence numbers stay in order
        record, line = self._record(command_type, **fields)
        try:
            self._emit(line)
        except AuditUnavailable:
            self._seq -= 1  # never written, never happened: no gap in the sequence
            raise
        return record

    def note(self, command_type: str, **fields: Any) -> AuditRecord:
        """Record now, or as soon as the log can take it; never raises."""
        self.release_held()
        record, line = self._record(command_type, **fields)
        if len(self._pending) >= PENDING_RECORDS:
            self._lost += 1
        else:
            self._pending.append(line)
        with contextlib.suppress(AuditUnavailable):
            self._flush()
        return record

    def write_bytes(self, command_type: str, data: bytes, **fields: Any) -> AuditRecord:
        """A record whose content is terminal bytes."""
        content, encoding = encode_bytes(data)
        metadata = dict(fields.pop("metadata", None) or {})
        metadata["encoding"] = encoding
        metadata["bytes"] = len(data)
        return self.write(command_type, content=content, metadata=metadata, **fields)

    def _emit(self, body: bytes) -> None:
        """Write one record (its JSON without the hash), chained to the last one."""
        try:
            digest = self._file.append(body)
        except OSError as exc:
            self._fail(f"{exc.strerror or exc} ({self.path})")
            raise AuditUnavailable(self.failure) from None
        if self.journal is not None:
            self.journal.send(body, digest)

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self._failed_at = time.time()
            log.error("audit-unavailable", error=why, path=self.path)
        self.failure = why

    def _flush(self) -> None:
        """Write what was kept, oldest first; after a failure, say that the log is back."""
        while self._pending:
            self._emit(self._pending[0])
            self._pending.popleft()
        if self.failure is None:
            return
        _, line = self._record(
            "audit_resumed",
            content=self.failure,
            metadata={"since": self._failed_at, "records_lost": self._lost},
        )
        try:
            self._emit(line)
        except AuditUnavailable:
            self._seq -= 1
            raise
        log.info("audit-resumed", after=self.failure, records_lost=self._lost)
        self.failure, self._lost = None, 0

    def retry(self) -> None:
        """The retry loop's step: reopen a deleted or replaced file, write what was kept."""
        try:
            replaced = not self._file.is_at(self.path)
        except OSError:
            replaced = True
        if replaced:
            try:
                self.reopen(gid=self._gid)
            except OSError as exc:  # keep writing where we can; say so once
                if not self._reopen_failed:
                    self._reopen_failed = True
                    why = f"cannot reopen {self.path} ({exc}): writing to the file still open"
                    log.warning("audit-reopen-failed", error=why)
                    self.note("audit_reopen_failed", content=why)
            else:
                self._reopen_failed = False
                self.note("audit_reopened", content="the log file was deleted or replaced")
        with contextlib.suppress(AuditUnavailable):
            self._flush()

    async def keep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run :meth:`retry` every ``RETRY_INTERVAL`` seconds, and write held records
        ``HOLD_SECONDS`` after they were first held, for the server's life."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.release_when_held)
            task_status.started()
            anchor_at = trio.current_time() + ANCHOR_INTERVAL
            while True:
                await trio.sleep(RETRY_INTERVAL)
                self.retry()
                self._tell_journal_drops()
                if trio.current_time() >= anchor_at:
                    anchor_at = trio.current_time() + ANCHOR_INTERVAL
                    self.anchor()

    def anchor(self) -> None:
        """Log the chain's head (``audit-anchor``) if it moved: under systemd the
        operational log is the journal, a copy of the head outside the file, which
        ``aaau log verify --head`` checks (cutting the file's end shows)."""
        if self.head and self.head != self._anchored:
            self._anchored = self.head
            log.info("audit-anchor", head=self.head, seq=self._seq, path=self.path)

    def _tell_journal_drops(self) -> None:
        journal = self.journal
        if journal is not None and journal.dropped != self._told_dropped:
            log.warning(
                "journal-dropped",
                entries=journal.dropped - self._told_dropped,
                error=journal.last_error,
                socket=journal.path,
            )
            self._told_dropped = journal.dropped

    async def release_when_held(self) -> None:
        """Write held records ``HOLD_SECONDS`` after the first was held, forever."""
        while True:
            await self._holding.wait()
            await trio.sleep(HOLD_SECONDS)
            self._holding = trio.Event()
            self.release_held()

    def bind(self, **context: Any) -> BoundAudit:
        """A view of this log that adds ``context`` to every record (see BoundAudit)."""
        return BoundAudit(self, {}, {}).bind(**context)


class _ChainedFile:
    """The open log file and its hash chain: where it ends, how a record is appended.

    A file begins with ``audit_chain``, naming the hash the previous file ended
    with (``metadata.previous``: the last hash this server wrote, before a
    rotation, or null at a start; ``metadata.continues``: the last hash of a
    non-empty file whose chain this one does not continue, replaced or written
    by someone else, which the new chain then covers too).
    """

    def __init__(self, host: str) -> None:
        self._host = host
        self._fd = -1
        self.head = ""  # the hash of the last record written ("" before the first)
        self._chained = False  # the open file's chain is known (False: begin one)
        self._why_new = "start"
        self._continues: str | None = None

    def open(self, path: str, gid: int | None) -> None:
        directory, name = paths.directory_of(path)
        dir_fd = paths.open_dir(directory)
        try:
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT  # read: where its chain ends
            fd = paths.open_file(dir_fd, name, flags, 0o640, directory)
        finally:
            os.close(dir_fd)
        try:
            os.fchmod(fd, 0o640)
            if gid is not None:
                os.fchown(fd, 0, gid)
        except BaseException:
            os.close(fd)
            raise
        try:
            tail = chain.last_hash(fd)
        except chain.ChainError:  # ends in a cut line: ours begin on a line of their own
            tail = None
            with contextlib.suppress(OSError):
                os.write(fd, b"\n")
        except OSError:
            tail = None
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)
            self._why_new = "reopened"
        if tail and (tail == self.head or not self.head):
            self.head, self._chained = tail, True  # go on where the file ends
        else:
            self._chained = False  # empty, unchained or someone else's: say so first
            self._continues = tail or None

    def is_at(self, path: str) -> bool:
        """The open file is the one ``path`` names (not deleted, not replaced)."""
        on_disk, ours = os.stat(path), os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def append(self, body: bytes) -> str:
        """Write one record's line, chained to the last: its hash. Raises OSError,
        leaving no part of the line."""
        if not self._chained:
            self._begin()
        digest = chain.link(self.head, body)
        line = chain.sealed(body, digest)
        view, written = memoryview(line), 0
        try:
            while written < len(line):
                written += os.write(self._fd, view[written:])
        except OSError:
            if written:  # no partial line: take back what went out
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise
        self.head = digest
        return digest

    def _begin(self) -> None:
        metadata = {"previous": self.head or None, "reason": self._why_new}
        if self._continues:
            metadata["continues"] = self._continues
        record = AuditRecord(
            timestamp=time.time(),
            seq=0,  # outside the run's numbering, which stays without gaps
            host=self._host,
            source="system",
            user="-",
            uid=None,
            role=None,
            session_id=None,
            command_type="audit_chain",
            content="a hash chain begins",
            metadata=metadata,
        )
        self._chained = True  # for this one write; taken back if it fails
        head = self.head
        self.head = self._continues or ""
        try:
            self.append(_json(record))
        except OSError:
            self._chained, self.head = False, head
            raise


#: the record fields a BoundAudit may carry; any other bound key goes into metadata
_FIELDS = frozenset({"source", "user", "uid", "role", "session_id"})


class BoundAudit:
    """The audit log with who and where filled in.

    ``bind(user=..., uid=..., role=..., session_id=..., client_id=...)``:
    the record fields (source, user, uid, role, session_id) fill those fields,
    anything else (``client_id``, ``peer_pid``) goes into each record's
    metadata. Immutable: ``bind`` returns a new object.
    """

    __slots__ = ("_fields", "_log", "_metadata")

    def __init__(self, log: AuditLog, fields: dict[str, Any], metadata: dict[str, Any]) -> None:
        self._log = log
        self._fields = fields
        self._metadata = metadata

    def bind(self, **context: Any) -> BoundAudit:
        fields, metadata = dict(self._fields), dict(self._metadata)
        for key, value in context.items():
            (fields if key in _FIELDS else metadata)[key] = value
        return BoundAudit(self._log, fields, metadata)

    def _merged(self, fields: dict[str, Any]) -> dict[str, Any]:
        metadata = fields.pop("metadata", None)
        if self._metadata or metadata:
            fields["metadata"] = {**self._metadata, **(metadata or {})}
        return {**self._fields, **fields}

    def write(self, command_type: str, **fields: Any) -> AuditRecord:
        return self._log.write(command_type, **self._merged(fields))

    def note(self, command_type: str, **fields: Any) -> AuditRecord:
        return self._log.note(command_type, **self._merged(fields))

    def write_bytes(self, command_type: str, data: bytes, **fields: Any) -> AuditRecord:
        return self._log.write_bytes(command_type, data, **self._merged(fields))

    def hold(self, owner: object, release: Callable[[], None]) -> None:
        self._log.hold(owner, release)

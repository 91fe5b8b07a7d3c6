"""The JSONL audit log: one whole line per record, written before the effect.

This stream is separate from the operational (structlog) logs. Each record is
one ``write(2)`` on a file opened ``O_APPEND``, so lines never interleave and
a record is in the kernel before the input or command it records is applied.
Terminal bytes are stored losslessly: as text when they are valid UTF-8,
otherwise as base64 (``metadata.encoding`` says which). See docs/audit.md.

:meth:`AuditLog.bind` returns a :class:`BoundAudit` that fills in who and
where (user, uid, role, session, client) on every record it writes, in the
manner of structlog's ``bind``: binding returns a new object, never changes one.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import attrs

from .messages import Role


@attrs.frozen
class AuditRecord:
    timestamp: float
    seq: int
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


class AuditLog:
    """Appends records to ``path`` (created 0640, owner root, group ``gid``)."""

    def __init__(self, path: str, *, gid: int | None = None) -> None:
        self.path = path
        self._seq = 0
        self._fd = -1
        self.reopen(gid=gid)

    @classmethod
    def open_in(cls, log_dir: str, *, gid: int | None) -> AuditLog:
        """``audit.jsonl`` in ``log_dir``, made ``root:gid 0750`` if it is missing."""
        directory = Path(log_dir)
        if not directory.is_dir():
            directory.mkdir(mode=0o750, parents=True)
            os.chown(directory, 0, gid if gid is not None else 0)
        return cls(str(directory / "audit.jsonl"), gid=gid)

    def reopen(self, *, gid: int | None = None) -> None:
        """(Re)open the file, as after a log rotation."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.fchmod(fd, 0o640)
        if gid is not None:
            os.fchown(fd, 0, gid)
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write(
        self,
        command_type: str,
        *,
        source: str = "system",
        user: str = "-",
        uid: int | None = None,
        role: Role | None = None,
        session_id: str | None = None,
        content: str = "",
        metadata: dict[str, Any] | None = None,
    ) -> AuditRecord:
        self._seq += 1
        record = AuditRecord(
            timestamp=time.time(),
            seq=self._seq,
            source=source,
            user=user,
            uid=uid,
            role=role.value if role is not None else None,
            session_id=session_id,
            command_type=command_type,
            content=content,
            metadata=metadata or {},
        )
        line = json.dumps(attrs.asdict(record), separators=(",", ":")).encode() + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        return record

    def write_bytes(self, command_type: str, data: bytes, **fields: Any) -> AuditRecord:
        """A record whose content is terminal bytes."""
        content, encoding = encode_bytes(data)
        metadata = dict(fields.pop("metadata", None) or {})
        metadata["encoding"] = encoding
        metadata["bytes"] = len(data)
        return self.write(command_type, content=content, metadata=metadata, **fields)

    def bind(self, **context: Any) -> BoundAudit:
        """A view of this log that adds ``context`` to every record (see BoundAudit)."""
        return BoundAudit(self, {}, {}).bind(**context)


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

    def write_bytes(self, command_type: str, data: bytes, **fields: Any) -> AuditRecord:
        return self._log.write_bytes(command_type, data, **self._merged(fields))

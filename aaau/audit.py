"""The JSONL audit log: one whole line per record, written before the effect.

This stream is separate from the operational (structlog) logs. Each record is
one ``write(2)`` on a file opened ``O_APPEND``, so lines never interleave and
a record is in the kernel before the input or command it records is applied.
Terminal bytes are stored losslessly: as text when they are valid UTF-8,
otherwise as base64 (``metadata.encoding`` says which). See docs/audit.md.
"""

from __future__ import annotations

import base64
import json
import os
import time
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

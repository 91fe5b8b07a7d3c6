"""The optional journald sink: each audit record as a native journal entry, besides the file.

The JSONL file stays the record of truth (it gates actions; the journal does
not). The journal is a copy for gathering many hosts with the tools people
already run (``systemd-journal-remote``/``-upload``, Vector's ``journald``
source, Fluent Bit's ``systemd`` input): each record becomes an entry with
structured fields (``AAAU_SESSION_ID``, ``AAAU_USER``, ``AAAU_COMMAND_TYPE``,
... ``AAAU_HASH``; docs/audit.md lists them), so those tools filter on fields
instead of parsing text, and the chain's hashes are kept apart from the file.

``journald = "events"`` sends every record but terminal output (a flood would
meet journald's rate limit, and the file has it); ``"all"`` sends output too.

The native protocol (systemd's ``sd_journal_sendv``): one datagram per entry
on ``/run/systemd/journal/socket``, fields as ``KEY=value\\n``, or
``KEY\\n<64-bit little-endian length><value>\\n`` for a value with a newline;
an entry too big for a datagram goes as a sealed memfd passed with
``SCM_RIGHTS``. Sending never blocks and never raises: an entry journald cannot
take now is counted (``dropped``) and the server says so in its own log.
:func:`encode` and :func:`decode` are sans-I/O.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import os
import socket
import struct
from typing import Any, Final

#: where journald listens for native entries (systemd-journald.socket)
SOCKET: Final = "/run/systemd/journal/socket"

#: syslog priorities by record kind: refusals and losses stand out; the rest is info
_NOTICE: Final = frozenset(
    {
        "connection_refused",
        "denied",
        "force_kill",
        "rate_limited",
        "output_not_recorded",
        "audit_resumed",
        "reload_failed",
    }
)
_WARNING: Final = frozenset({"session_lost", "audit_reopen_failed"})

_OUTPUT: Final = b'"command_type":"output"'
_LENGTH: Final = struct.Struct("<Q")


class Mode(enum.StrEnum):
    OFF = "off"
    EVENTS = "events"  # every record but terminal output
    ALL = "all"


def encode(fields: list[tuple[str, str]]) -> bytes:
    """One entry in the native protocol."""
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "surrogateescape")
        if b"\n" in data:
            out += key.encode("ascii") + b"\n" + _LENGTH.pack(len(data)) + data + b"\n"
        else:
            out += key.encode("ascii") + b"=" + data + b"\n"
    return bytes(out)


def decode(entry: bytes) -> dict[str, str]:
    """The fields of an entry in the native protocol (the last value of a repeated key)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(entry):
        end = entry.index(b"\n", pos)
        line = entry[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:
            key = line
            (size,) = _LENGTH.unpack_from(entry, end + 1)
            start = end + 1 + _LENGTH.size
            value = entry[start : start + size]
            if entry[start + size : start + size + 1] != b"\n":
                raise ValueError(f"field {key!r}: no newline after its {size} bytes")
            pos = start + size + 1
        fields[key.decode("ascii")] = value.decode("utf-8", "surrogateescape")
    return fields


def fields_of(record: dict[str, Any], digest: str) -> list[tuple[str, str]]:
    """A record's journal fields (``MESSAGE`` a one-line summary, the rest structured)."""
    kind = str(record["command_type"])
    priority = 4 if kind in _WARNING else 5 if kind in _NOTICE else 6
    who = record.get("user") or "-"
    session = record.get("session_id")
    summary = f"{kind} by {who}" + (f" in session {session}" if session else "")
    content = str(record.get("content") or "")
    if content and kind != "output":
        first = content.splitlines()[0] if content.strip() else repr(content)
        summary += f": {first[:200]}"
    fields = [
        ("MESSAGE", summary),
        ("PRIORITY", str(priority)),
        ("SYSLOG_IDENTIFIER", "aaau-audit"),
        ("AAAU_COMMAND_TYPE", kind),
        ("AAAU_SEQ", str(record.get("seq"))),
        ("AAAU_TIMESTAMP", repr(record.get("timestamp"))),
        ("AAAU_HOST", str(record.get("host", ""))),
        ("AAAU_SOURCE", str(record.get("source", ""))),
        ("AAAU_USER", who),
        ("AAAU_HASH", digest),
    ]
    for name, key in (
        ("AAAU_UID", "uid"),
        ("AAAU_ROLE", "role"),
        ("AAAU_SESSION_ID", "session_id"),
    ):
        if record.get(key) is not None:
            fields.append((name, str(record[key])))
    if content:
        fields.append(("AAAU_CONTENT", content))
    metadata = record.get("metadata") or {}
    if metadata:
        fields.append(("AAAU_METADATA", json.dumps(metadata, separators=(",", ":"))))
        for key in ("client_id", "encoding", "exit_code", "signal", "instruction"):
            if key in metadata and metadata[key] is not None:
                fields.append((f"AAAU_{key.upper()}", str(metadata[key])))
    return fields


class JournalSink:
    """Sends sealed records to journald; never blocks, never raises."""

    def __init__(self, mode: Mode, path: str = SOCKET) -> None:
        self.mode = mode
        self.path = path
        self.sent = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def close(self) -> None:
        self._sock.close()

    def send(self, body: bytes, digest: str) -> None:
        """A record as written (its JSON without the hash) and its hash."""
        if self.mode is Mode.EVENTS and _OUTPUT in body[:400]:
            return
        try:
            record = json.loads(body)
        except ValueError:  # ours: cannot happen; not a reason to fail a write
            self._drop("a record that is not JSON")
            return
        entry = encode(fields_of(record, digest))
        try:
            self._sock.sendto(entry, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                self._drop(exc.strerror or str(exc))
                return
            try:
                self._send_memfd(entry)
            except OSError as again:
                self._drop(again.strerror or str(again))
                return
        self.sent += 1

    def _send_memfd(self, entry: bytes) -> None:
        """An entry too big for a datagram: in a sealed memfd, as journald expects."""
        fd = os.memfd_create("aaau-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            self._sock.sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path
            )
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self.last_error = why

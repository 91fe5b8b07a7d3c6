"""The journald sink: the native protocol, a socket of our own, and the real systemd-journald.

The real one runs as a journal namespace of the test's own (``systemd-journald
NAMESPACE``: its own socket under /run/systemd/journal.NAMESPACE, its own
files), since systemd is not PID 1 here; it is stopped and its files removed
at the end. Entries are read back with ``journalctl``.
"""

from __future__ import annotations

import array
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aaau import journal
from aaau import messages as m
from aaau.audit import AuditLog
from aaau.journal import JournalSink, Mode

from .helpers import ALICE, ServerFactory, read_audit, root, wait_for

# --- the native protocol -----------------------------------------------------------------------


def test_fields_with_and_without_newlines_round_trip() -> None:
    fields = [("MESSAGE", "one line"), ("AAAU_CONTENT", "two\nlines\x00and a NUL"), ("E", "")]
    entry = journal.encode(fields)
    assert entry.startswith(b"MESSAGE=one line\nAAAU_CONTENT\n\x13\x00\x00\x00\x00\x00\x00\x00")
    assert journal.decode(entry) == dict(fields)


def test_a_record_becomes_structured_fields() -> None:
    record = {
        "timestamp": 1.5,
        "seq": 7,
        "host": "h",
        "source": "human",
        "user": "alice",
        "uid": 1001,
        "role": "interactive",
        "session_id": "s1",
        "command_type": "input",
        "content": "ls -l\n",
        "metadata": {"client_id": 3, "encoding": "utf-8"},
    }
    fields = dict(journal.fields_of(record, "ab" * 32))
    assert fields["MESSAGE"] == "input by alice in session s1: ls -l"
    assert fields["PRIORITY"] == "6" and fields["SYSLOG_IDENTIFIER"] == "aaau-audit"
    assert fields["AAAU_USER"] == "alice" and fields["AAAU_UID"] == "1001"
    assert fields["AAAU_SESSION_ID"] == "s1" and fields["AAAU_COMMAND_TYPE"] == "input"
    assert fields["AAAU_CONTENT"] == "ls -l\n" and fields["AAAU_HASH"] == "ab" * 32
    assert json.loads(fields["AAAU_METADATA"]) == record["metadata"]
    assert fields["AAAU_CLIENT_ID"] == "3"
    refused = dict(journal.fields_of({**record, "command_type": "connection_refused"}, ""))
    assert refused["PRIORITY"] == "5"


# --- a socket of our own -----------------------------------------------------------------------


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def _receive(sock: socket.socket) -> dict[str, str]:
    """One entry: from the datagram, or from the memfd it carries."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: fds.itemsize])
    if fds:
        fd = fds[0]
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
    return journal.decode(data)


@contextlib.contextmanager
def _log(tmp_path: Path, mode: Mode, path: str) -> Iterator[AuditLog]:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    log.journal = JournalSink(mode, path)
    try:
        yield log
    finally:
        log.close()


def test_each_record_is_sent_with_its_hash(
    tmp_path: Path, journal_socket: tuple[socket.socket, str]
) -> None:
    sock, path = journal_socket
    with _log(tmp_path, Mode.ALL, path) as log:
        log.write("join", user="bob", session_id="s1", content="bob joined")
        log.write_bytes("output", b"\x1b[1mbold\x1b[0m\r\n", session_id="s1")
        first, second = _receive(sock), _receive(sock)
        assert first["AAAU_COMMAND_TYPE"] == "join" and first["AAAU_HASH"] != log.head
        assert second["AAAU_CONTENT"] == "\x1b[1mbold\x1b[0m\r\n" and second["AAAU_HASH"] == log.head
        on_file = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert [r["hash"] for r in on_file[1:]] == [first["AAAU_HASH"], second["AAAU_HASH"]]


def test_events_mode_leaves_output_to_the_file(
    tmp_path: Path, journal_socket: tuple[socket.socket, str]
) -> None:
    sock, path = journal_socket
    with _log(tmp_path, Mode.EVENTS, path) as log:
        log.write_bytes("output", b"not for the journal", session_id="s1")
        log.write("session_end", session_id="s1", content="exit code 0")
        # the output was written first: sent, it would be the first to arrive
        assert _receive(sock)["AAAU_COMMAND_TYPE"] == "session_end"
        assert log.journal is not None and log.journal.sent == 1


def test_an_entry_too_big_for_a_datagram_goes_in_a_sealed_memfd(
    tmp_path: Path, journal_socket: tuple[socket.socket, str]
) -> None:
    sock, path = journal_socket
    with _log(tmp_path, Mode.ALL, path) as log:
        big = b"x" * (1 << 19) + b"\nend"  # past the socket's datagram limit
        log.write_bytes("output", big, session_id="s1")
        entry = _receive(sock)
        assert entry["AAAU_CONTENT"] == big.decode()
        assert log.journal is not None and (log.journal.sent, log.journal.dropped) == (1, 0)


def test_a_journal_that_is_not_there_loses_nothing_in_the_file(tmp_path: Path) -> None:
    with _log(tmp_path, Mode.ALL, str(tmp_path / "no-journal")) as log:
        log.write("join", content="still recorded")
        assert log.journal is not None and log.journal.dropped == 1
        assert "No such file" in (log.journal.last_error or "")
        assert "still recorded" in (tmp_path / "audit.jsonl").read_text()


# --- the real journald ------------------------------------------------------------------------

JOURNALD = "/lib/systemd/systemd-journald"


@pytest.fixture
def journald() -> Iterator[str]:
    """A journald namespace of this test's own: its socket path; all of it removed after."""
    if not os.path.exists(JOURNALD) or not shutil.which("journalctl"):
        pytest.skip("systemd-journald is not installed")
    namespace = f"aaut{uuid.uuid4().hex[:8]}"
    process = subprocess.Popen([JOURNALD, namespace], stdout=subprocess.DEVNULL)
    sock = f"/run/systemd/journal.{namespace}/socket"
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):  # a condition, polled with a deadline
            assert time.monotonic() < deadline and process.poll() is None, "journald did not start"
            time.sleep(0.02)
        yield namespace
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        shutil.rmtree(f"/run/systemd/journal.{namespace}", ignore_errors=True)
        for path in glob.glob(f"/var/log/journal/*.{namespace}") + glob.glob(
            f"/run/log/journal/*.{namespace}"
        ):
            shutil.rmtree(path, ignore_errors=True)


def _text(value: str | list[int]) -> str:
    """journalctl's JSON gives a value with control characters as a list of bytes."""
    return value if isinstance(value, str) else bytes(value).decode()


def _journal_entries(namespace: str) -> list[dict[str, str]]:
    out = subprocess.run(
        ["journalctl", f"--namespace={namespace}", "-o", "json", "SYSLOG_IDENTIFIER=aaau-audit"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


@root
async def test_a_real_journald_gets_every_record_with_its_fields(
    start_server: ServerFactory, journald: str
) -> None:
    sock = f"/run/systemd/journal.{journald}/socket"
    srv = await start_server("--journald", "all", "--journal-socket", sock)
    alice, welcome = await srv.create(ALICE, ("sh", "-c", "echo journal-me; read x"))
    await alice.expect_output(b"journal-me")
    await alice.type(b"typed\n")
    await alice.expect(m.Exited)
    await wait_for(lambda: srv.records("session_end"))
    entries = await wait_for(
        lambda: [e for e in _journal_entries(journald) if e["AAAU_COMMAND_TYPE"] == "session_end"]
        and _journal_entries(journald)
    )
    on_file = {r["seq"]: r for r in read_audit(srv.log_dir / "audit.jsonl")}
    mine = [e for e in entries if e.get("AAAU_SESSION_ID") == welcome.session_id]
    kinds = {e["AAAU_COMMAND_TYPE"] for e in mine}
    assert {"session_start", "input", "output", "session_end"} <= kinds
    for entry in entries:  # the same record, the same hash, as the file
        record = on_file[int(entry["AAAU_SEQ"])]
        assert entry["AAAU_HASH"] == record["hash"]
        assert entry["AAAU_USER"] == record["user"]
    (typed,) = [e for e in mine if e["AAAU_COMMAND_TYPE"] == "input"]
    assert typed["AAAU_CONTENT"] == "typed\n" and typed["AAAU_USER"] == ALICE
    assert typed["MESSAGE"] == f"input by {ALICE} in session {welcome.session_id}: typed"
    output = "".join(_text(e["AAAU_CONTENT"]) for e in mine if e["AAAU_COMMAND_TYPE"] == "output")
    assert "journal-me" in output

"""Output recording: chunks held and written as one record, in order, never lost silently.

Synchronous tests drive :class:`OutputRecording` and a real :class:`AuditLog`
on a file; the in-process test checks that a quiet session's output reaches
the log by itself, within the hold time, on a real PTY.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import trio

from aaau import chain
from aaau.audit import AuditLog
from aaau.recording import HOLD_BYTES, OutputRecording

from .helpers import wait_for
from .inprocess import config, open_in_process


def _records(path: Path) -> list[dict[str, object]]:
    lines = path.read_bytes().splitlines(keepends=True)
    assert chain.check_lines(str(path), lines).ok  # holding never breaks the chain
    return [r for r in map(json.loads, lines) if r["command_type"] != "audit_chain"]


def _recording(tmp_path: Path, **overrides: object) -> tuple[AuditLog, OutputRecording]:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    return log, OutputRecording(log.bind(session_id="s1"), config(**overrides))


async def test_chunks_are_held_and_written_as_one_record_before_the_next_record(
    tmp_path: Path,
) -> None:
    log, recording = _recording(tmp_path)
    recording.record(b"one ")
    recording.record(b"two ")
    recording.record("thr\u00e9e".encode()[:4])  # a character cut between two chunks
    recording.record("thr\u00e9e".encode()[4:])
    assert _records(tmp_path / "audit.jsonl") == []  # held: nothing written yet
    log.write("input", session_id="s1", content="x")
    output, typed = _records(tmp_path / "audit.jsonl")
    assert output["command_type"] == "output" and typed["command_type"] == "input"
    assert output["content"] == "one two thr\u00e9e"
    assert output["metadata"] == {"encoding": "utf-8", "bytes": 14}  # text: the cut is whole
    assert output["timestamp"] <= typed["timestamp"]
    assert recording.recorded == 14 and recording.not_recorded == 0


async def test_the_record_has_the_time_of_its_first_chunk(tmp_path: Path) -> None:
    log, recording = _recording(tmp_path)
    recording.record(b"early")
    held_at = recording._held_since
    recording.record(b" later")
    log.release_held()
    (output,) = _records(tmp_path / "audit.jsonl")
    assert output["timestamp"] == held_at and output["content"] == "early later"


async def test_a_flood_is_written_in_records_of_the_hold_size(tmp_path: Path) -> None:
    log, recording = _recording(tmp_path)
    chunk = b"x" * 4095
    for _ in range(40):
        recording.record(chunk)
    written = _records(tmp_path / "audit.jsonl")
    assert written and all(r["metadata"]["bytes"] >= HOLD_BYTES for r in written)  # type: ignore[index]
    log.release_held()
    total = sum(r["metadata"]["bytes"] for r in _records(tmp_path / "audit.jsonl"))  # type: ignore[index]
    assert total == 40 * 4095 == recording.recorded


async def test_held_output_that_the_log_cannot_take_is_counted_and_said(tmp_path: Path) -> None:
    log, recording = _recording(tmp_path)
    recording.record(b"lost to a full disk")
    healthy = log._file._fd
    log._file._fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    try:
        log.release_held()
    finally:
        os.close(log._file._fd)
        log._file._fd = healthy
    assert recording.not_recorded == 19 and recording.recorded == 0
    log.retry()
    kinds = [r["command_type"] for r in _records(tmp_path / "audit.jsonl")]
    assert kinds == ["output_not_recorded", "audit_resumed"]
    recording.record(b"back")
    log.release_held()
    records = _records(tmp_path / "audit.jsonl")
    assert [r["command_type"] for r in records[-2:]] == ["output", "output_recorded_again"]
    assert records[-1]["metadata"] == {"bytes_not_recorded": 19}


async def test_the_total_cap_counts_held_output(tmp_path: Path) -> None:
    log, recording = _recording(tmp_path, record_output_max=10)
    recording.record(b"12345678")
    recording.record(b"too much")  # 16 > 10, though nothing is written yet
    log.release_held()
    assert recording.recorded == 8 and recording.not_recorded == 8


async def test_a_quiet_sessions_output_reaches_the_log_by_itself(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ip = open_in_process(tmp_path, nursery)
    alice, _ = await ip.create("alice", ("sh", "-c", "echo quiet; exec sleep 1000"))
    await alice.expect_output(b"quiet")
    (output,) = await wait_for(lambda: ip.records("output"), timeout=5)
    assert output["content"] == "quiet\r\n"

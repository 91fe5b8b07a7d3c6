"""The audit log's hash chain: sealing, checking, and how it crosses restarts,
reopens and rotation. Real files, no server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import structlog
import structlog.testing

from aaau import chain
from aaau.audit import AuditLog


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _check(path: Path) -> chain.FileReport:
    with open(path, "rb") as f:
        return chain.check_lines(str(path), f)


def _write_some(path: Path, n: int = 6) -> AuditLog:
    log = AuditLog(str(path))
    for i in range(n):
        log.write("control", user="alice", content=f"ping {i}")
    log.write_bytes("output", b"\xff\xfe not utf-8", source="agent", session_id="s1")
    return log


def test_every_record_is_sealed_and_a_file_begins_with_audit_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = _write_some(path)
    log.close()
    records = _records(path)
    assert records[0]["command_type"] == "audit_chain"
    assert records[0]["metadata"] == {"previous": None, "reason": "start"}
    assert all(len(str(r["hash"])) == 64 for r in records)
    assert all(r["host"] == os.uname().nodename for r in records)
    assert [r["seq"] for r in records[1:]] == list(range(1, 8))  # no gap for audit_chain
    report = _check(path)
    assert report.ok and report.lines == 8 and report.head == records[-1]["hash"]


@pytest.mark.parametrize("victim", [1, 2, 4, 8])
def test_an_edited_byte_breaks_the_chain_at_its_line(tmp_path: Path, victim: int) -> None:
    path = tmp_path / "a.jsonl"
    _write_some(path).close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[victim - 1] = lines[victim - 1].replace(b'"seq":', b'"seq": ', 1)
    path.write_bytes(b"".join(lines))
    report = _check(path)
    assert [b.line for b in report.breaks] == [victim]


def test_a_removed_line_and_a_swapped_pair_break_where_they_are(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _write_some(path).close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3] + lines[4:]))
    assert [b.line for b in _check(path).breaks] == [4]
    swapped = [*lines[:4], lines[5], lines[4], *lines[6:]]
    path.write_bytes(b"".join(swapped))
    assert [b.line for b in _check(path).breaks] == [5, 6, 7]
    path.write_bytes(b"".join(lines[1:]))  # the first record removed
    assert [b.line for b in _check(path).breaks] == [1]


def test_a_rewritten_hash_is_caught_by_the_record_after_it(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _write_some(path).close()
    lines = path.read_bytes().splitlines(keepends=True)
    body, _ = chain.unseal(lines[2]) or (b"", "")
    edited = body.replace(b"ping 1", b"ping X")
    lines[2] = chain.sealed(edited, chain.link("0" * 64, edited))
    path.write_bytes(b"".join(lines))
    assert [b.line for b in _check(path).breaks] == [3, 4]


def test_a_restart_continues_the_chain_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _write_some(path).close()
    _write_some(path).close()
    records = _records(path)
    assert [r["command_type"] for r in records].count("audit_chain") == 1
    assert _check(path).ok


def test_rotation_begins_a_file_that_names_where_the_last_one_ended(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = _write_some(path)
    os.rename(path, tmp_path / "a.jsonl.1")
    log.reopen()
    log.write("control", content="after rotation")
    log.reopen()  # SIGHUP without a rotation: the same file goes on
    log.write("control", content="after a plain reopen")
    log.close()
    old, new = _check(tmp_path / "a.jsonl.1"), _check(path)
    assert old.ok and new.ok
    first = _records(path)[0]
    assert first["command_type"] == "audit_chain"
    assert first["metadata"] == {"previous": old.head, "reason": "reopened"}
    assert [r["command_type"] for r in _records(path)].count("audit_chain") == 1
    assert chain.check_sequence([old, new]) == []
    # a file lost between the two shows as a gap
    lost = chain.FileReport("lost", head="f" * 64)
    assert [gap[0] for gap in chain.check_sequence([lost, new])] == [str(path)]


def test_a_replaced_file_is_taken_into_the_chain_and_said(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = _write_some(path)
    other = tmp_path / "other.jsonl"
    _write_some(other).close()
    foreign_head = _check(other).head
    os.replace(other, path)
    log.retry()  # noticed as replaced: reopened
    log.write("control", content="after")
    log.close()
    records = _records(path)
    begin = next(r for r in records[1:] if r["command_type"] == "audit_chain")
    assert begin["metadata"]["continues"] == foreign_head
    assert _check(path).ok


def test_a_log_from_before_the_chain_is_counted_unsealed_then_chained(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    old = [json.dumps({"seq": i, "command_type": "control"}).encode() + b"\n" for i in range(3)]
    path.write_bytes(b"".join(old))
    _write_some(path, 2).close()
    report = _check(path)
    assert report.ok and report.unsealed == 3 and report.lines == 3 + 1 + 3


def test_a_torn_last_line_is_a_break_and_a_new_chain_begins(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _write_some(path).close()
    with open(path, "ab") as f:
        f.write(b'{"cut":')
    log = AuditLog(str(path))
    assert log.head == ""
    log.write("control", content="after the cut")
    log.close()
    report = _check(path)
    # line 9 carries no hash, line 10 begins a chain that cannot link to it
    assert [b.line for b in report.breaks] == [9, 10]
    after = [json.loads(line) for line in path.read_bytes().splitlines()[9:]]
    assert [r["command_type"] for r in after] == ["audit_chain", "control"]


def test_a_last_line_still_being_written_is_counted_apart_not_a_break(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _write_some(path).close()
    whole = _check(path)
    with open(path, "ab") as f:
        f.write(b'{"timestamp":1.0,"seq":8,"content":"half of it')
    report = _check(path)
    assert report.ok and report.unfinished == 46
    assert (report.lines, report.head) == (whole.lines, whole.head)


def test_a_line_without_its_newline_before_others_is_a_break() -> None:
    whole = [b'{"a":1}\n', b'{"b":2}\n']
    report = chain.check_lines("x", [whole[0].rstrip(b"\n"), whole[1]])
    assert report.breaks == [chain.Break(1, "the line is cut off (no newline)")]
    assert (report.lines, report.unfinished) == (2, 0)


def test_the_head_is_anchored_in_the_operational_log_when_it_moved(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "audit.jsonl"))
    log.write("first")
    first = log.head
    with structlog.testing.capture_logs() as logs:
        log.anchor()
        log.anchor()  # the head did not move: nothing new to anchor
        log.write("second")
        log.close()  # a stop anchors the last head
    anchors = [e for e in logs if e["event"] == "audit-anchor"]
    assert [a["head"] for a in anchors] == [first, log.head] and first != log.head
    assert anchors[-1]["seq"] == 2


def test_what_orjson_refuses_is_written_by_the_standard_library_and_chains(tmp_path: Path) -> None:
    """Output goes through orjson (raw UTF-8); a lone surrogate (a file name's stray
    byte), an integer key or a 70-bit number make orjson refuse: the standard library
    writes that record (ASCII-escaped), and the chain covers both kinds of line."""
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path))
    screen = "\u2502 \u00e9t\u00e9 \x1b[1mbold\x1b[0m\r\n".encode()
    log.write_bytes("output", screen, source="agent", session_id="s1")
    log.write("session_start", metadata={"argv": ["cat", "caf\udce9"]})
    log.write("control", metadata={7: "seven", "big": 1 << 70})
    log.close()
    lines = path.read_bytes().splitlines()
    assert "\u2502".encode() in lines[1]  # orjson: UTF-8 as it is
    assert b"\\udce9" in lines[2] and b'"7":"seven"' in lines[3]  # the fallback
    records = _records(path)
    assert records[1]["content"].encode() == screen
    assert records[2]["metadata"]["argv"][1] == "caf\udce9"
    assert records[3]["metadata"] == {"7": "seven", "big": 1 << 70}
    report = _check(path)
    assert report.ok and report.lines == 4

"""Pure pieces of the robustness work: budgets, occupancy, input credit, the audit policy.

The audit failures are real ones: ENOSPC from /dev/full, a short write under
RLIMIT_FSIZE, a deleted file. No root needed.
"""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from aaau import audit as audit_module
from aaau import codec
from aaau.audit import AuditLog, AuditUnavailable
from aaau.cli import _session_after_dashes
from aaau.config import Config
from aaau.errors import ProtocolError
from aaau.inflow import Inflow
from aaau.limits import Overflow, TokenBucket
from aaau.occupancy import Occupancy
from aaau.sessions import new_session_id
from tests.helpers import read_audit


def _lines(path: Path) -> list[dict[str, object]]:
    return read_audit(path)


# --- budgets ------------------------------------------------------------------------------


def test_token_bucket_spends_refills_and_caps() -> None:
    bucket = TokenBucket(rate=10, burst=5)
    assert all(bucket.take(0.0) for _ in range(5)) and not bucket.take(0.0)
    assert bucket.take(0.1) and not bucket.take(0.1)  # 0.1 s: one token
    assert not bucket.take(100.0, 6)  # never more than the burst saved up
    assert bucket.take(100.0, 5)


def test_overflow_says_once_per_episode_and_counts() -> None:
    over = Overflow()
    assert over.refuse(3) and not over.refuse(4)
    assert over.allow() == 7 and over.allow() == 0
    assert over.refuse()


def test_occupancy_caps_per_person_pending_and_total() -> None:
    occ = Occupancy(Config(connections_per_user=3, hellos_per_user=2, max_connections=4))
    assert occ.arrive(1) is None and occ.arrive(1) is None
    assert "have not said hello (hellos_per_user 2)" in (occ.arrive(1) or "")
    occ.hello(1)
    assert occ.arrive(1) is None
    assert "already holds 3 connections" in (occ.arrive(1) or "")
    assert occ.arrive(2) is None
    assert "holds 4 connections (max_connections)" in (occ.arrive(3) or "")
    occ.leave(2)
    assert occ.arrive(3) is None and occ.total == 4


def test_refusals_are_recorded_at_most_once_a_second_with_a_count() -> None:
    occ = Occupancy(Config())
    recorded = [occ.record_refusal(7, 0.0) for _ in range(8)]
    assert recorded == [0, 0, 0, 0, 0, None, None, None]
    assert occ.record_refusal(7, 1.0) == 3  # one a second; it says how many were not
    assert occ.record_refusal(8, 1.0) == 0  # another person has a budget of their own


# --- input credit ----------------------------------------------------------------------------


async def test_inflow_delivers_in_order_and_credits_back_by_quarters() -> None:
    delivered: list[bytes | None] = []
    granted: list[int] = []

    async def deliver(item: bytes | None) -> None:
        delivered.append(item)

    inflow = Inflow(100, deliver, granted.append, lambda _t: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inflow.run)
        inflow.push(b"a" * 20)
        inflow.push(b"b" * 10)
        inflow.push_eof()
        await trio.testing.wait_all_tasks_blocked()
        assert delivered == [b"a" * 20, b"b" * 10, None]
        assert granted == [30]  # after 20 (< a quarter) nothing; after 30, all 30
        inflow.close()


async def test_inflow_refuses_what_goes_beyond_the_window() -> None:
    async def stuck(_item: bytes | None) -> None:
        await trio.sleep_forever()

    inflow = Inflow(100, stuck, lambda _n: None, lambda _t: None)
    inflow.push(b"x" * 60)
    inflow.push(b"x" * 40)
    with pytest.raises(ProtocolError, match="101 bytes of input in flight, beyond the window"):
        inflow.push(b"x")


async def test_inflow_tells_the_client_when_the_audit_log_refuses_and_gives_credit_back() -> None:
    told: list[str] = []
    granted: list[int] = []

    async def refused(_item: bytes | None) -> None:
        raise AuditUnavailable("No space left on device")

    inflow = Inflow(40, refused, granted.append, told.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inflow.run)
        inflow.push(b"y" * 30)
        await trio.testing.wait_all_tasks_blocked()
        inflow.close()
    assert told == [
        "the audit log cannot record input now (No space left on device): 30 bytes of input "
        "refused"
    ]
    assert granted == [30]


# --- the audit log when it cannot write ------------------------------------------------------


def _break(log: AuditLog) -> int:
    """Point the log's fd at /dev/full (every write: ENOSPC); the healthy fd to restore."""
    healthy = log._file._fd
    log._file._fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    return healthy


def _mend(log: AuditLog, healthy: int) -> None:
    os.close(log._file._fd)
    log._file._fd = healthy


def test_a_gating_record_that_cannot_be_written_raises_and_leaves_no_trace(
    tmp_path: Path,
) -> None:
    log = AuditLog(str(tmp_path / "a.jsonl"))
    log.write("first")
    healthy = _break(log)
    with pytest.raises(AuditUnavailable, match="No space left on device"):
        log.write("input", content="typed")
    assert not log.available and "No space left" in (log.failure or "")
    log.note("session_end", content="kept")
    log.note("force_kill", content="kept too")
    _mend(log, healthy)
    log.write("input", content="after")
    records = _lines(tmp_path / "a.jsonl")
    assert [r["command_type"] for r in records] == [
        "first",
        "session_end",
        "force_kill",
        "audit_resumed",
        "input",
    ]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]  # no gap: the refused one never was
    assert records[3]["metadata"]["records_lost"] == 0 and log.available


def test_records_kept_past_the_limit_are_counted_as_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "PENDING_RECORDS", 3)
    log = AuditLog(str(tmp_path / "a.jsonl"))
    healthy = _break(log)
    for n in range(5):
        log.note("leave", content=str(n))
    _mend(log, healthy)
    log.retry()
    records = _lines(tmp_path / "a.jsonl")
    assert [r["content"] for r in records[:3]] == ["0", "1", "2"]
    assert records[3]["command_type"] == "audit_resumed"
    assert records[3]["metadata"]["records_lost"] == 2


def test_a_short_write_is_taken_back_so_no_line_is_ever_cut(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path))
    log.write("first")
    size = path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with structlog.testing.capture_logs() as logs:  # pytest's own files feel the limit too
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))  # the next line is longer
        try:
            with pytest.raises(AuditUnavailable, match="File too large"):
                log.write("input", content="x" * 200)
            assert path.stat().st_size == size  # the 40 bytes that went out were taken back
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert logs[0]["event"] == "audit-unavailable" and logs[0]["log_level"] == "error"
    log.retry()
    assert [r["command_type"] for r in _lines(path)] == ["first", "audit_resumed"]


def test_a_deleted_log_is_noticed_and_reopened(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(str(path))
    log.write("before")
    path.unlink()
    log.retry()
    log.write("after")
    assert [r["command_type"] for r in _lines(path)] == ["audit_reopened", "after"]


def test_a_reopen_that_fails_keeps_the_open_file(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "a.jsonl"
    path.parent.mkdir()
    log = AuditLog(str(path))
    moved = tmp_path / "moved"
    path.parent.rename(moved)  # the directory is gone from where the log was
    with pytest.raises(OSError, match="does not exist"):
        log.reopen()
    log.write("still")  # to the file that is still open
    assert [r["command_type"] for r in _lines(moved / "a.jsonl")] == ["still"]


# --- decoding, ids, command lines ------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (
            b'{"type":"create","version":2,"rows":1,"cols":1,"term":"x","argv":["\\ud800"]}',
            "not Unicode text (a lone surrogate)",
        ),
        (b'{"type":"join","version":2,"session_id":"\\udfff"}', "lone surrogate"),
        (b"[" * 50000 + b"]" * 50000, "nested deeper than 16"),
        (b'{"type":"ping","nonce":' + b"[" * 17 + b"]" * 17 + b"}", "nested deeper than 16"),
    ],
)
def test_text_that_is_not_unicode_and_deep_nesting_are_refused(payload: bytes, text: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(text)) as info:
        codec.decode_client(payload)
    assert info.value.code == "bad-message"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    payload = b'{"type":"create","version":2,"rows":1,"cols":1,"term":"x","argv":["' + b"[" * 40 + b'"]}'
    assert codec.decode_client(payload).argv == ("[" * 40,)  # type: ignore[union-attr]


def test_session_ids_never_begin_with_a_dash() -> None:
    ids = [new_session_id() for _ in range(3000)]
    assert not any(i.startswith("-") for i in ids) and len(set(ids)) == 3000
    assert all(len(i) == 22 for i in ids)


def test_an_id_that_begins_with_a_dash_can_be_given_after_two_dashes() -> None:
    assert _session_after_dashes(["-n", "--", "-abc", "-r"]) == ["--session=-abc", "-r"]
    assert _session_after_dashes(["--session", "--", "-x"]) == ["--session=-x"]
    assert _session_after_dashes(["-p", "--", "x"]) == ["-p", "--", "x"]

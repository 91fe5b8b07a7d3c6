"""One connection in-process: admission, the hello, one-shot answers, bad input.

No root: memory streams and fake identities (see tests/inprocess.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from aaau import asys
from aaau import messages as m
from aaau.asys.base import Instruction, NoArgs
from aaau.protocol import Kind, encode_frame

from .inprocess import InProcess, V, open_in_process, reaped_agents  # noqa: F401 (a fixture)


@pytest.fixture
def ip(tmp_path: Path, nursery: trio.Nursery) -> InProcess:
    return open_in_process(tmp_path, nursery)


@pytest.mark.parametrize(
    ("user", "reason"),
    [
        ("eve", "is not a member of the aaau groups"),
        ("nobody", "is an agent user and may not connect"),
        ("ghost", "uid 9999 has no user"),
    ],
)
async def test_who_is_not_admitted_is_told_why_and_recorded(
    ip: InProcess, user: str, reason: str
) -> None:
    peer = await ip.connect(user)
    error = await peer.expect(m.Error)
    assert error.code == "refused" and reason in error.message
    await peer.until_closed()
    (record,) = ip.records("connection_refused")
    assert reason in record["content"]
    assert not ip.records("connection_accepted")


async def test_a_silent_client_is_timed_out(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    ip = open_in_process(tmp_path, nursery, handshake_timeout=3.0)
    peer = await ip.connect("alice")
    start = trio.current_time()
    error = await peer.expect(m.Error)
    assert error == m.Error("timeout", "no handshake within 3.0 seconds")
    assert trio.current_time() - start == pytest.approx(3.0)
    await peer.until_closed()
    (record,) = ip.records("handshake_timeout", user="alice")
    assert record["content"] == "no hello within 3.0 s"


@pytest.mark.parametrize(
    ("raw", "code", "text"),
    [
        (b"\x07\x00\x00\x00\x00", "bad-frame", "unknown frame kind 7"),
        (b"\x01\xff\xff\xff\xff", "too-large", "exceeds the limit"),
        (b"\x01\x00\x00\x00\x05{nope", "bad-message", "not UTF-8 JSON"),
        (b"\x00\x00\x00\x00\x02hi", "bad-frame", "first frame must be a control message"),
        (encode_frame(Kind.CONTROL, b'{"type":"ping","nonce":1}'), "bad-message", "expected one"),
        (encode_frame(Kind.CONTROL, b'{"type":"list_sessions","version":9}'), "version", "9"),
        (encode_frame(Kind.CONTROL, b'{"type":"list_sessions"}'), "bad-message", "version"),
    ],
)
async def test_a_bad_hello_is_answered_precisely_and_recorded(
    ip: InProcess, raw: bytes, code: str, text: str
) -> None:
    peer = await ip.connect("bob")
    await peer.framed.send_frame(raw)
    error = await peer.expect(m.Error)
    assert error.code == code and text in error.message, error
    await peer.until_closed()
    (record,) = ip.records("protocol_error", user="bob")
    assert record["metadata"]["code"] == code


async def test_a_hello_cut_short_by_a_close_is_a_protocol_error(ip: InProcess) -> None:
    peer = await ip.connect("bob")
    await peer.framed.send_frame(b"\x01\x00\x00\x00\x10{")
    await peer.stream.send_eof()  # type: ignore[attr-defined]
    error = await peer.expect(m.Error)
    assert error.code == "bad-frame" and "inside a frame" in error.message


async def test_a_client_that_leaves_before_its_hello_costs_nothing(ip: InProcess) -> None:
    peer = await ip.connect("bob")
    await peer.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert [r["command_type"] for r in ip.audit()] == ["connection_accepted"]


async def test_list_sessions_on_an_idle_server(ip: InProcess) -> None:
    peer = await ip.connect("alice", m.ListSessions(V))
    assert await peer.expect(m.Sessions) == m.Sessions(())
    await peer.until_closed()
    (control,) = ip.records("control", user="alice")
    assert control["content"] == "list_sessions" and control["source"] == "human"


@pytest.mark.parametrize("hello", [m.QueryStatus(V, "nope"), m.Kill(V, "nope"), m.Join(V, "nope")])
async def test_an_unknown_session_is_a_clear_error(ip: InProcess, hello: m.ClientMessage) -> None:
    peer = await ip.connect("alice", hello)
    error = await peer.expect(m.Error)
    assert (error.code, error.message) == ("unknown-session", "no session nope")
    (failed,) = ip.records("request_failed", user="alice")
    assert failed["session_id"] == "nope" and failed["metadata"]["code"] == "unknown-session"


async def test_a_bug_in_one_connection_is_internal_and_the_server_goes_on(
    ip: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> tuple[m.SessionInfo, ...]:
        raise RuntimeError("boom")

    monkeypatch.setattr(ip.hub.sessions, "listing", broken)
    peer = await ip.connect("alice", m.ListSessions(V))
    error = await peer.expect(m.Error)
    assert error == m.Error("internal", "internal server error (logged)")
    (record,) = ip.records("internal_error")
    assert "boom" in record["content"]
    monkeypatch.undo()
    again = await ip.connect("bob", m.ListSessions(V))
    assert await again.expect(m.Sessions) == m.Sessions(())


async def test_asys_outside_a_session_is_readonly_for_members_and_audited(ip: InProcess) -> None:
    peer = await ip.connect("bob", m.AsysCall(V, 7, "SYS_CAPS"))
    result = await peer.expect(m.AsysResult)
    assert (result.request_id, result.sw, result.status) == (7, "9000", "ok")
    assert result.result is not None and result.result["role"] == "readonly"
    assert "PROC_THROTTLE" not in result.result["instructions"]
    admin = await ip.connect("ada", m.AsysCall(V, 8, "SYS_CAPS"))
    assert (await admin.expect(m.AsysResult)).result["role"] == "admin"  # type: ignore[index]
    request, answer = ip.records("asys_request", user="bob")[0], ip.records("asys_result")[0]
    assert request["content"] == "SYS_CAPS" and request["role"] == "readonly"
    assert answer["metadata"]["sw"] == "9000" and answer["metadata"]["request_id"] == 7


async def test_an_asys_instruction_that_fails_unexpectedly_is_a_status_word(
    ip: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(_ctx: asys.Context, _args: NoArgs) -> dict[str, object]:
        raise OSError(5, "Input/output error")

    table = dict(asys.TABLE, BROKEN=Instruction("BROKEN", broken, NoArgs, read_only=True))
    monkeypatch.setattr(asys, "TABLE", table)
    peer = await ip.connect("alice", m.AsysCall(V, 1, "BROKEN"))
    result = await peer.expect(m.AsysResult)
    assert result.sw == "6F00" and "Input/output error" in result.message

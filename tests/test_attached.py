"""Attached clients in-process: requests, roles, fan-out, slow clients, the session's life.

No root: memory streams, fake identities, and the agent on a real PTY as the
current user (see tests/inprocess.py). Real processes, so real time (no
autojump clock) and ``fail_after`` bounds from the helpers.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from aaau import asys
from aaau import messages as m
from aaau.asys.base import Instruction, NoArgs
from aaau.audit import decode_content
from aaau.policy import Groups
from aaau.protocol import Kind, encode_frame
from aaau.requests import ASYS_IN_FLIGHT

from .helpers import wait_for
from .inprocess import (
    ADMINS_GID,
    AGENT_UID,
    MEMBERS_GID,
    PEOPLE,
    InProcess,
    V,
    identify_fake,
    open_in_process,
    reaped_agents,  # noqa: F401 (an autouse fixture)
)


@pytest.fixture
def ip(tmp_path: Path, nursery: trio.Nursery) -> InProcess:
    return open_in_process(tmp_path, nursery)


def _input_bytes(ip: InProcess, user: str) -> bytes:
    return b"".join(
        decode_content(r["content"], r["metadata"]["encoding"])
        for r in ip.records("input", user=user)
    )


async def test_the_creator_types_and_sees_the_agent(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    assert welcome.role is m.Role.INTERACTIVE and welcome.created
    assert (welcome.rows, welcome.cols) == (24, 80)
    await alice.type(b"hello-agent\n")
    await alice.expect_output(b"hello-agent\r\nhello-agent\r\n")  # echo, then cat
    assert _input_bytes(ip, "alice") == b"hello-agent\n"
    (start,) = ip.records("session_start", session_id=welcome.session_id)
    assert start["metadata"]["argv"] == ["cat"] and start["user"] == "alice"


async def test_roles_are_decided_by_the_server_and_refusals_change_nothing(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    sid = welcome.session_id
    bob, reply = await ip.join("bob", sid, m.Role.ADMIN)  # asks for more than it may hold
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.READONLY
    ada, reply = await ip.join("ada", sid)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.ADMIN
    ada_ro, reply = await ip.join("ada", sid, m.Role.READONLY)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.READONLY

    await bob.type(b"bob-was-here\n")
    assert (await bob.expect(m.Error)) == m.Error(
        "forbidden", "read-only clients cannot send input"
    )
    await bob.send(m.Resize(10, 10))
    assert (await bob.expect(m.Error)).message == "read-only clients cannot resize"
    await bob.send(m.ForceKill())
    assert "only an admin or the session's creator" in (await bob.expect(m.Error)).message
    await bob.send(m.InputEof())
    assert (await bob.expect(m.Error)).code == "forbidden"
    await ada_ro.type(b"ada-ro\n")
    assert (await ada_ro.expect(m.Error)).code == "forbidden"

    await alice.type(b"alice-typed\n")
    await bob.expect_output(b"alice-typed\r\nalice-typed")
    assert b"bob-was-here" not in bob.output and b"ada-ro" not in bob.output
    denied = {(r["user"], r["content"], r["role"]) for r in ip.records("denied", session_id=sid)}
    assert denied == {
        ("bob", "input", "readonly"),
        ("bob", "resize", "readonly"),
        ("bob", "force_kill", "readonly"),
        ("bob", "input_eof", "readonly"),
        ("ada", "input", "readonly"),
    }
    assert not ip.records("resize") and _input_bytes(ip, "bob") == b""


async def test_a_shared_session_lets_members_type_under_their_own_name(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",), share=True)
    bob, reply = await ip.join("bob", welcome.session_id)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.INTERACTIVE
    await bob.type(b"from-bob\n")
    await alice.expect_output(b"from-bob\r\nfrom-bob")
    (record,) = ip.records("input", user="bob")
    assert decode_content(record["content"], record["metadata"]["encoding"]) == b"from-bob\n"
    assert (record["uid"], record["role"], record["source"]) == (4002, "interactive", "human")
    assert record["metadata"]["client_id"] == reply.client_id


async def test_everyone_hears_who_joins_and_leaves(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    bob, reply = await ip.join("bob", welcome.session_id)
    joined = await alice.expect(m.Joined)
    assert (joined.client.user, joined.client.role) == ("bob", m.Role.READONLY)
    await bob.send(m.Detach())
    await bob.until_closed()
    left = await alice.expect(m.Left)
    assert left.client == joined.client
    (leave,) = ip.records("leave", user="bob")
    assert leave["content"] == "detached"


async def test_a_late_joiner_gets_the_scrollback_then_a_redraw(ip: InProcess) -> None:
    script = "trap 'echo WINCH-$(stty size)' WINCH; echo early-output; while :; do sleep 0.05; done"
    alice, welcome = await ip.create("alice", ("bash", "-c", script))
    await alice.expect_output(b"early-output")
    bob, reply = await ip.join("bob", welcome.session_id)
    assert isinstance(reply, m.Welcome)
    await bob.expect_output(b"WINCH-24 80")
    assert bob.output.index(b"early-output") < bob.output.index(b"WINCH")


async def test_detach_keeps_the_session_and_the_creator_can_come_back(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    await alice.type(b"before\n")
    await alice.expect_output(b"before\r\nbefore")
    await alice.send(m.Detach())
    await alice.until_closed()
    again, reply = await ip.join("alice", welcome.session_id)
    assert isinstance(reply, m.Welcome) and reply.role is m.Role.INTERACTIVE
    await again.expect_output(b"before")  # the scrollback
    await again.type(b"after\n")
    await again.expect_output(b"after\r\nafter")


async def test_the_exit_status_reaches_everyone_and_the_session_is_gone(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("sh", "-c", "read x; echo bye; exit 3"))
    bob, _ = await ip.join("bob", welcome.session_id)
    await alice.type(b"go\n")
    for peer in (alice, bob):
        assert await peer.expect(m.Exited) == m.Exited(code=3, signal=None)
        await peer.until_closed()
    assert b"bye" in alice.output
    (end,) = ip.records("session_end", session_id=welcome.session_id)
    outputs = ip.records("output", session_id=welcome.session_id)
    assert end["metadata"].pop("output_recorded") == sum(r["metadata"]["bytes"] for r in outputs)
    assert end["metadata"] == {
        "exit_code": 3,
        "signal": None,
        "force_killed": False,
        "end_reason": None,
        "output_not_recorded": 0,
        "filtered": {},
    }
    _, reply = await ip.join("alice", welcome.session_id)
    assert isinstance(reply, m.Error) and reply.code == "unknown-session"
    assert ip.spawner.released == ip.spawner.started  # everything given back


async def test_end_of_input_reaches_the_agent(ip: InProcess) -> None:
    alice, _ = await ip.create("alice", ("sh", "-c", "cat; echo cat-done; exit 4"))
    await alice.type(b"line\npartial")
    await alice.send(m.InputEof())
    assert await alice.expect(m.Exited) == m.Exited(code=4, signal=None)
    assert b"partial" in alice.output and b"cat-done" in alice.output
    (eof,) = ip.records("input_eof", user="alice")
    assert eof["role"] == "interactive"
    assert not [r for r in ip.records("control") if r["content"] == "input_eof"]  # recorded once


async def test_ping_and_status_answer_in_the_session(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    await alice.send(m.Ping(42))
    assert await alice.expect(m.Pong) == m.Pong(42)
    await alice.send(m.GetStatus())
    status = await alice.expect(m.Status)
    assert status.alive and status.session.session_id == welcome.session_id
    assert status.session.argv == ("cat",) and [c.user for c in status.session.clients] == [
        "alice"
    ]
    assert [r["content"] for r in ip.records("control", user="alice")] == [
        "create",
        "ping",
        "get_status",
    ]


async def test_the_creator_force_kills_and_everyone_is_told(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("sh", "-c", "trap '' HUP TERM; echo up; exec cat"))
    await alice.expect_output(b"up")
    bob, _ = await ip.join("bob", welcome.session_id)
    await alice.send(m.ForceKill())
    exited = m.Exited(code=None, signal=signal.SIGKILL, reason="killed by alice (interactive)")
    assert await alice.expect(m.Exited) == exited
    assert await bob.expect(m.Exited) == exited
    (kill,) = ip.records("force_kill", session_id=welcome.session_id)
    assert (kill["user"], kill["role"]) == ("alice", "interactive")
    (end,) = ip.records("session_end", session_id=welcome.session_id)
    assert end["metadata"]["force_killed"] is True


async def test_kill_from_outside_needs_the_creator_or_an_admin(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",), share=True)
    bob = await ip.connect("bob", m.Kill(V, welcome.session_id))  # interactive, not creator
    assert (await bob.expect(m.Error)).code == "forbidden"
    (denied,) = ip.records("denied", user="bob")
    assert (denied["content"], denied["role"]) == ("force_kill", "interactive")
    ada = await ip.connect("ada", m.Kill(V, welcome.session_id))
    done = await ada.expect(m.Done)
    assert done.message == f"session {welcome.session_id} killed"
    assert (await alice.expect(m.Exited)).signal == signal.SIGHUP
    (kill,) = ip.records("force_kill")
    assert (kill["user"], kill["role"]) == ("ada", "admin")


async def test_a_hello_inside_a_session_ends_only_that_client(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    bob, _ = await ip.join("bob", welcome.session_id)
    await bob.send(m.ListSessions(V))
    error = await bob.expect(m.Error)
    assert error.code == "bad-message" and "not allowed inside a session" in error.message
    await bob.until_closed()
    await bob.aclose()
    await alice.type(b"still-alive\n")
    await alice.expect_output(b"still-alive\r\nstill-alive")
    (leave,) = ip.records("leave", user="bob")
    assert leave["content"].startswith("protocol error: list_sessions is not allowed")


async def test_a_garbled_frame_in_a_session_ends_only_that_client(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    bob, _ = await ip.join("bob", welcome.session_id)
    await bob.framed.send_frame(encode_frame(Kind.CONTROL, b'{"type":"resize","rows":"80"}'))
    error = await bob.expect(m.Error)
    assert error.code == "bad-message" and "rows" in error.message
    await bob.until_closed()
    (record,) = ip.records("protocol_error", user="bob")
    assert record["session_id"] == welcome.session_id
    await alice.send(m.Ping(1))
    assert await alice.expect(m.Pong) == m.Pong(1)


async def test_resize_is_applied_and_recorded_with_who(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("bash", "--norc", "--noprofile", "-i"))
    await alice.send(m.Resize(40, 132))
    await alice.type(b"stty size\n")
    await alice.expect_output(b"40 132")
    (record,) = ip.records("resize", session_id=welcome.session_id)
    assert (record["user"], record["content"], record["role"]) == ("alice", "40x132", "interactive")
    assert record["metadata"]["previous"] == "24x80"


async def test_input_from_two_clients_arrives_in_whole_frames(ip: InProcess) -> None:
    alice, welcome = await ip.create(
        "alice", ("sh", "-c", "stty -echo; echo ready; exec cat"), share=True
    )
    await alice.expect_output(b"ready")
    alice.output.clear()
    bob, _ = await ip.join("bob", welcome.session_id)
    a_line, b_line = b"A" * 300 + b"\n", b"B" * 300 + b"\n"

    async def send_many(peer: object, line: bytes) -> None:
        for _ in range(20):
            await peer.type(line)  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_many, alice, a_line)
        nursery.start_soon(send_many, bob, b_line)
    await alice.until(lambda: alice.output.count(b"\r\n") >= 40)
    lines = bytes(alice.output).split(b"\r\n")
    assert lines.count(a_line[:-1]) == 20 and lines.count(b_line[:-1]) == 20
    assert set(lines) == {a_line[:-1], b_line[:-1], b""}


async def test_a_stalled_client_is_dropped_and_the_others_get_every_byte(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # the queue holds 8 read chunks (1 MiB / 128 KiB), as in production; ~1.9 MB of output
    ip = open_in_process(tmp_path, nursery, client_queue_bytes=1 << 20)
    alice, welcome = await ip.create("alice", ("sh", "-c", "read go; seq 1 250000; read x"))
    # lockstep: bytes move only when the peer reads, and this one never does
    await ip.connect(
        "bob", m.Join(V, welcome.session_id), pair=trio.testing.lockstep_stream_pair
    )
    await alice.expect(m.Joined)
    await alice.type(b"go\n")
    await alice.expect_output(b"\r\n250000\r\n", timeout=20)
    expected = "".join(f"{i}\r\n" for i in range(1, 250001)).encode()
    assert expected in bytes(alice.output)
    left = await alice.expect(m.Left)
    assert left.client.user == "bob"
    (evicted,) = ip.records("client_evicted", user="bob")
    assert evicted["content"] == f"client fell more than {1 << 20} bytes behind"


async def test_reload_revokes_a_member_who_lost_the_group_and_lowers_an_admin(
    ip: InProcess,
) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    bob, _ = await ip.join("bob", welcome.session_id)
    ada, _ = await ip.join("ada", welcome.session_id)
    people = dict(PEOPLE, bob=(4002, set()), ada=(4003, {MEMBERS_GID}))
    ip.hub.identify = functools.partial(identify_fake, people=people)
    groups = Groups(agent_uids=frozenset({AGENT_UID}), human_gid=MEMBERS_GID, admin_gid=ADMINS_GID)
    ip.hub.sessions.reload(ip.hub.config, groups, ip.hub.identify)
    error = await bob.expect(m.Error)
    assert error.code == "revoked" and "not a member" in error.message
    await bob.until_closed()
    changed = await ada.expect(m.RoleChanged)
    assert changed == m.RoleChanged(m.Role.READONLY, "group membership changed")
    await ada.type(b"no-longer\n")
    assert (await ada.expect(m.Error)).code == "forbidden"
    (revoked,) = ip.records("client_revoked")
    assert revoked["user"] == "bob"
    (role,) = ip.records("role_changed")
    assert (role["user"], role["content"], role["role"]) == ("ada", "admin -> readonly", "readonly")
    await alice.type(b"alice-unaffected\n")
    await alice.expect_output(b"alice-unaffected\r\nalice-unaffected")


async def test_limits_are_enforced_with_clear_errors(tmp_path: Path, nursery: trio.Nursery) -> None:
    ip = open_in_process(
        tmp_path, nursery, sessions_per_user=1, clients_per_session=4, reserved_clients=1
    )
    alice, welcome = await ip.create("alice", ("cat",))
    sid = welcome.session_id
    again = await ip.connect("alice", m.Create(V, rows=24, cols=80, term="xterm", argv=("cat",)))
    error = await again.expect(m.Error)
    assert error == m.Error(
        "limit",
        "alice already runs 1 sessions (limit 1): see yours with `aaau ls`, end one with "
        "`aaau kill ID` or join it with `aaau -n ID`",
    )
    for _ in range(2):
        _, reply = await ip.join("bob", sid)
        assert isinstance(reply, m.Welcome)
    # the last place is kept: another member is refused, an admin gets it
    _, reply = await ip.join("bob", sid)
    assert reply == m.Error(
        "limit",
        f"session {sid} already has 3 clients (limit 4, 1 kept for its creator and admins)",
    )
    _, reply = await ip.join("ada", sid)
    assert isinstance(reply, m.Welcome)
    _, reply = await ip.join("ada", sid)
    assert reply == m.Error("limit", f"session {sid} already has 4 clients (limit 4)")


async def test_one_member_cannot_fill_a_session_with_observers(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ip = open_in_process(tmp_path, nursery, observers_per_user=2)
    alice, welcome = await ip.create("alice", ("cat",))
    sid = welcome.session_id
    for _ in range(2):
        _, reply = await ip.join("bob", sid, m.Role.READONLY)
        assert isinstance(reply, m.Welcome)
    _, reply = await ip.join("bob", sid, m.Role.READONLY)
    assert reply == m.Error("limit", f"bob already has 2 clients in session {sid} (limit 2)")
    for user in ("alice", "ada", "ada", "ada"):  # the creator and admins are not held to it
        _, reply = await ip.join(user, sid)
        assert isinstance(reply, m.Welcome), reply


async def test_a_program_that_cannot_start_leaves_no_session(ip: InProcess) -> None:
    peer = await ip.connect(
        "alice", m.Create(V, rows=24, cols=80, term="xterm", argv=("no-such-program-x",))
    )
    error = await peer.expect(m.Error)
    assert error == m.Error("spawn-failed", "program not found: no-such-program-x")
    await peer.until_closed()
    assert len(ip.hub.sessions) == 0
    (record,) = ip.records("spawn_failed", user="alice")
    assert record["metadata"]["argv"] == ["no-such-program-x"]


async def test_protected_environment_variables_are_refused(ip: InProcess) -> None:
    peer = await ip.connect(
        "alice",
        m.Create(V, rows=24, cols=80, term="xterm", argv=("cat",), env={"HOME": "/tmp"}),
    )
    error = await peer.expect(m.Error)
    assert error.code == "spawn-failed" and "HOME" in error.message
    assert len(ip.hub.sessions) == 0


async def _slow_instruction(
    monkeypatch: pytest.MonkeyPatch, release: trio.Event
) -> None:
    async def slow(_ctx: asys.Context, _args: NoArgs) -> dict[str, object]:
        await release.wait()
        return {"slow": True}

    table = dict(asys.TABLE, SLOW=Instruction("SLOW", slow, NoArgs, read_only=True))
    monkeypatch.setattr(asys, "TABLE", table)


async def test_a_slow_asys_call_never_holds_up_typing(
    ip: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = trio.Event()
    await _slow_instruction(monkeypatch, release)
    alice, _ = await ip.create("alice", ("cat",))
    await alice.send(m.AsysRequest(1, "SLOW"))
    await alice.type(b"typed-meanwhile\n")
    await alice.expect_output(b"typed-meanwhile\r\ntyped-meanwhile")
    assert not [c for c in alice.controls if isinstance(c, m.AsysResult)]
    release.set()
    result = await alice.expect(m.AsysResult)
    assert (result.request_id, result.sw, result.result) == (1, "9000", {"slow": True})


async def test_too_many_asys_calls_at_once_are_told_to_back_off(
    ip: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = trio.Event()
    await _slow_instruction(monkeypatch, release)
    alice, _ = await ip.create("alice", ("cat",))
    for n in range(ASYS_IN_FLIGHT + 1):
        await alice.send(m.AsysRequest(n, "SLOW"))
    busy = await alice.expect(m.AsysResult)
    assert (busy.request_id, busy.sw, busy.status) == (ASYS_IN_FLIGHT, "6400", "blocked")
    release.set()
    done = [await alice.expect(m.AsysResult) for _ in range(ASYS_IN_FLIGHT)]
    assert sorted(r.request_id for r in done) == list(range(ASYS_IN_FLIGHT))
    assert {r.sw for r in done} == {"9000"}


async def test_a_connection_that_vanishes_leaves_the_session_cleanly(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    bob, _ = await ip.join("bob", welcome.session_id)
    await bob.aclose()
    left = await alice.expect(m.Left)
    assert left.client.user == "bob"
    (leave,) = ip.records("leave", user="bob")
    assert leave["content"] == "connection closed"
    await wait_for(lambda: len(ip.hub.sessions.listing()[0].clients) == 1)

"""Limits that hold, in-process: floods, rates, hellos, budgets, a log that cannot write.

No root: memory streams, fake identities, real PTYs (tests/inprocess.py). A
full disk is /dev/full under the hub's audit log: the kernel's own ENOSPC.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

import pytest
import trio

from aaau import messages as m
from aaau.protocol import Kind, encode_frame

from .helpers import wait_for
from .inprocess import PEOPLE, InProcess, V, identify_fake, open_in_process


@pytest.fixture
def ip(tmp_path: Path, nursery: trio.Nursery) -> InProcess:
    return open_in_process(tmp_path, nursery)


async def _silent_agent(ip: InProcess) -> tuple[object, m.Welcome]:
    """A shared session whose agent never reads its input.

    Raw mode: a canonical-mode terminal throws away what overflows its line
    buffer instead of pushing back, which would make this a different test.
    """
    alice, welcome = await ip.create(
        "alice", ("sh", "-c", "stty raw -echo; echo up; exec sleep 1000"), share=True
    )
    await alice.expect_output(b"up")  # type: ignore[attr-defined]
    return alice, welcome


async def test_a_flood_of_input_never_holds_up_the_creators_ping_or_kill(ip: InProcess) -> None:
    alice, welcome = await _silent_agent(ip)
    bob, reply = await ip.join("bob", welcome.session_id)
    assert isinstance(reply, m.Welcome) and reply.input_window == 256 * 1024
    # bob fills his whole window; the agent reads none of it
    for _ in range(reply.input_window // 4096):
        await bob.type(b"f" * 4096)
    t0 = time.monotonic()
    await alice.send(m.Ping(7))  # type: ignore[attr-defined]
    assert await alice.expect(m.Pong) == m.Pong(7)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 1.0
    await alice.send(m.ForceKill())  # type: ignore[attr-defined]
    assert (await alice.expect(m.Exited)).signal is not None  # type: ignore[attr-defined]


async def test_input_beyond_the_window_ends_that_client_only(ip: InProcess) -> None:
    alice, welcome = await _silent_agent(ip)
    bob, reply = await ip.join("bob", welcome.session_id)
    assert isinstance(reply, m.Welcome)
    # a client that ignores its credit: the session's queue and the PTY take some of it,
    # then the server's count of bytes in flight passes the window
    with contextlib.suppress(trio.BrokenResourceError):  # it hangs up on us part-way
        for _ in range(4 * reply.input_window // 4096):
            await bob.type(b"f" * 4096)
    error = await bob.expect(m.Error)
    assert error.code == "bad-message" and "beyond the window" in error.message
    await bob.until_closed()
    await alice.send(m.Ping(1))  # type: ignore[attr-defined]
    assert await alice.expect(m.Pong) == m.Pong(1)  # type: ignore[attr-defined]


async def test_credit_comes_back_as_the_agent_reads(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("sh", "-c", "stty -echo; echo up; exec cat >/dev/null"))
    await alice.expect_output(b"up")
    for _ in range(welcome.input_window // 4096):  # a whole window...
        await alice.type(b"c" * 4096)
    credit = 0
    while credit < welcome.input_window:  # ...all of it credited back once cat read it
        credit += (await alice.expect(m.InputCredit)).bytes
    assert credit == welcome.input_window
    await alice.type(b"c" * 4096)  # and more may be sent
    observer, reply = await ip.join("bob", welcome.session_id)
    assert isinstance(reply, m.Welcome) and reply.input_window == 0  # read-only: no window


async def test_a_flood_of_control_messages_is_cut_off_told_once_and_recorded_once(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ip = open_in_process(tmp_path, nursery, control_rate=10.0, control_burst=20)
    alice, welcome = await ip.create("alice", ("cat",))
    bob, _ = await ip.join("bob", welcome.session_id)
    for n in range(200):
        await bob.send(m.Ping(n))
    await trio.testing.wait_all_tasks_blocked()
    with trio.move_on_after(0.2):  # take in every answer the server gave
        await bob.until(lambda: False)
    pongs = [c for c in bob.controls if isinstance(c, m.Pong)]
    errors = [c for c in bob.controls if isinstance(c, m.Error)]
    assert 20 <= len(pongs) < 60 and len(errors) == 1 and errors[0].code == "rate-limited"
    assert len(ip.records("control", user="bob")) == len(pongs) + 1  # + the join
    bob.controls.clear()
    await trio.sleep(0.3)  # the budget refills with time, nothing else
    await bob.send(m.Ping(999))
    assert await bob.expect(m.Pong) == m.Pong(999)
    (limited,) = ip.records("rate_limited", user="bob")
    assert limited["metadata"]["messages_dropped"] == 200 - len(pongs)


async def test_while_the_audit_log_cannot_write_nothing_unrecorded_happens(ip: InProcess) -> None:
    alice, welcome = await ip.create("alice", ("cat",))
    log = ip.hub.audit
    healthy = log._file._fd
    log._file._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC, from the kernel
    try:
        await alice.type(b"unrecorded\n")
        error = await alice.expect(m.Error)
        assert error.code == "audit-unavailable" and "No space left on device" in error.message
        await alice.send(m.Resize(30, 90))
        assert (await alice.expect(m.Error)).code == "audit-unavailable"
        joiner = await ip.connect("bob", m.Join(V, welcome.session_id))
        assert (await joiner.expect(m.Error)).code == "audit-unavailable"
        creator = await ip.connect("bob", m.Create(V, rows=24, cols=80, term="x", argv=("cat",)))
        assert (await creator.expect(m.Error)).code == "audit-unavailable"
    finally:
        os.close(log._file._fd)
        log._file._fd = healthy  # the disk has room again
    log.retry()
    await alice.type(b"recorded\n")
    await alice.expect_output(b"recorded\r\nrecorded")
    assert b"unrecorded" not in alice.output  # what could not be recorded never reached cat
    kinds = [r["command_type"] for r in ip.audit()]
    assert "audit_resumed" in kinds and kinds.index("audit_resumed") < len(kinds) - 1
    (typed,) = ip.records("input", user="alice")
    assert typed["content"] == "recorded\n"


async def test_output_past_the_recording_budget_is_left_out_and_said_so(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ip = open_in_process(
        tmp_path, nursery, record_output_rate=1000, record_output_burst=4000, record_output_max=0
    )
    alice, welcome = await ip.create("alice", ("sh", "-c", "read go; head -c 60000 /dev/zero | tr '\\0' x; echo; read x"))
    await alice.type(b"go\n")
    await alice.until(lambda: alice.output.count(b"x") >= 60000)
    # one episode or more: the budget refills as time goes by
    stopped = (await wait_for(lambda: ip.records("output_not_recorded")))[0]
    assert "recording rate (1000 bytes/s" in stopped["content"]
    await alice.send(m.ForceKill())
    await alice.expect(m.Exited)
    (end,) = ip.records("session_end", session_id=welcome.session_id)
    recorded = sum(r["metadata"]["bytes"] for r in ip.records("output"))
    assert end["metadata"]["output_not_recorded"] > 50_000
    assert recorded + end["metadata"]["output_not_recorded"] >= 60_000


async def test_identity_is_checked_again_when_the_hello_arrives(ip: InProcess) -> None:
    bob = await ip.connect("bob")  # admitted now...
    await trio.testing.wait_all_tasks_blocked()
    assert ip.records("connection_accepted")
    # ...and removed from the group before saying hello
    ip.hub.identify = functools.partial(identify_fake, people=dict(PEOPLE, bob=(4002, set())))
    await bob.send(m.ListSessions(V))
    error = await bob.expect(m.Error)
    assert error.code == "refused" and "not a member" in error.message
    assert not [c for c in bob.controls if isinstance(c, m.Sessions)]


async def test_a_hello_may_not_be_large(ip: InProcess) -> None:
    peer = await ip.connect("bob")
    await peer.framed.send_frame(encode_frame(Kind.CONTROL, b"{" + b" " * (16 * 1024)))
    error = await peer.expect(m.Error)
    assert error.code == "too-large" and "limit of 16384" in error.message


async def test_connections_that_never_say_hello_are_capped_per_person(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    ip = open_in_process(tmp_path, nursery, hellos_per_user=3, connections_per_user=5)
    silent = [await ip.connect("bob") for _ in range(3)]
    await trio.testing.wait_all_tasks_blocked()
    refused = await ip.connect("bob")
    error = await refused.expect(m.Error)
    assert error.code == "limit" and "have not said hello (hellos_per_user 3)" in error.message
    other = await ip.connect("alice", m.ListSessions(V))  # someone else is not held up
    assert isinstance(await other.expect(m.Sessions), m.Sessions)
    for peer in silent:
        await peer.send(m.ListSessions(V))
        await peer.expect(m.Sessions)
    assert not ip.hub.occupancy._pending

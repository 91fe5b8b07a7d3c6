"""The client outbox: direct write, queueing, the byte bound, closing; and FramedStream."""

from __future__ import annotations

import errno
import socket

import pytest
import trio
import trio.testing

from aaau import messages as m
from aaau.errors import ProtocolError
from aaau.framing import FramedStream
from aaau.outbox import Outbox, socket_writer
from aaau.protocol import Kind, data_frame, encode_frame


class Taker:
    """A direct write that takes up to ``room`` bytes per call (0: the socket is full)."""

    def __init__(self, room: int | None = None) -> None:
        self.room = room
        self.written = bytearray()
        self.calls = 0

    def __call__(self, data: bytes) -> int:
        self.calls += 1
        n = len(data) if self.room is None else min(self.room, len(data))
        if n == 0:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.written += data[:n]
        return n


def test_a_client_that_keeps_up_gets_frames_directly_and_nothing_is_queued() -> None:
    taker = Taker()
    box = Outbox(100, taker)
    assert box.put(b"a" * 60) and box.put(b"b" * 60)  # over the limit in sum: never queued
    assert bytes(taker.written) == b"a" * 60 + b"b" * 60
    assert box.statistics().queued_bytes == 0


async def test_what_the_socket_does_not_take_is_queued_in_order() -> None:
    taker = Taker(room=10)
    box = Outbox(100, taker)
    assert box.put(b"0123456789ABCDEF")
    assert bytes(taker.written) == b"0123456789"
    taker.room = None
    assert box.put(b"next")  # not written directly: something is queued before it
    assert taker.calls == 1
    assert await box.get() == b"ABCDEFnext"


async def test_a_full_socket_queues_everything() -> None:
    box = Outbox(100, Taker(room=0))
    assert box.put(b"x" * 30)
    assert box.statistics().queued_bytes == 30
    assert await box.get() == b"x" * 30


async def test_frames_wait_while_the_write_loop_holds_some() -> None:
    taker = Taker()
    box = Outbox(100, None)
    box.put(b"first")
    assert await box.get() == b"first"  # the write loop now sends it
    box._direct = taker  # a direct write would now jump the queue: it must not be used
    assert box.put(b"second")
    assert taker.calls == 0
    assert box.statistics().inflight_bytes == 5
    assert await box.get() == b"second"  # calling again: "first" was sent
    assert box.statistics().inflight_bytes == 6


async def test_bytes_in_flight_count_against_the_limit() -> None:
    box = Outbox(100, None)
    box.put(b"x" * 80)
    assert await box.get() == b"x" * 80  # held by a write loop that is stuck sending
    assert box.put(b"y" * 20)
    assert not box.put(b"z")  # 80 in flight + 20 queued + 1 > 100
    assert box.overflowed and box.closed
    assert box.statistics().queued_bytes == 0  # dropped: a too-slow client gets no more


async def test_an_overflowed_outbox_stays_refused_and_drains_to_none() -> None:
    box = Outbox(10, None)
    assert not box.put(b"x" * 11)
    assert not box.put(b"y")
    assert await box.get() is None


async def test_closing_hands_over_what_is_queued_then_none() -> None:
    box = Outbox(100, None)
    box.put(b"last words")
    box.close(flush_grace=2.5)
    assert box.put(b"dropped")  # after close: ignored, not an overflow
    assert (box.closed, box.overflowed, box.flush_grace) == (True, False, 2.5)
    assert await box.get() == b"last words"
    assert await box.get() is None


def test_closing_calls_the_hook_once_with_the_grace() -> None:
    box = Outbox(100, None)
    calls: list[float] = []
    box.on_close = calls.append
    box.close(flush_grace=3.0)
    box.close(flush_grace=9.0)
    assert calls == [3.0]
    overflowing = Outbox(1, None)
    overflowing.on_close = calls.append
    overflowing.put(b"xx")
    assert calls == [3.0, 1.0]


async def test_a_waiting_write_loop_wakes_for_a_frame_and_for_close() -> None:
    box = Outbox(100, None)
    got: list[bytes | None] = []

    async def loop() -> None:
        while True:
            data = await box.get()
            got.append(data)
            if data is None:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop)
        await trio.testing.wait_all_tasks_blocked()
        box.put(b"one")
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert got == [b"one", None]


async def test_socket_writer_never_writes_to_a_closed_sockets_old_fd_number() -> None:
    a, b = socket.socketpair()
    sock = trio.socket.from_stdlib_socket(a)
    write = socket_writer(sock)
    assert write(b"hi") == 2 and b.recv(2) == b"hi"
    sock.close()
    reused_r, reused_w = socket.socketpair()  # likely takes the freed fd number
    try:
        with pytest.raises(OSError, match="Bad file descriptor"):
            write(b"must not arrive")
        reused_r.setblocking(False)
        with pytest.raises(BlockingIOError):
            reused_r.recv(100)
    finally:
        for s in (b, reused_r, reused_w):
            s.close()


# --- FramedStream ----------------------------------------------------------------------


async def test_framed_stream_reads_frames_split_anywhere_and_none_at_a_clean_close() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    framed = FramedStream(theirs, 1024)
    wire = encode_frame(Kind.DATA, b"abc") + encode_frame(Kind.CONTROL, b'{"type":"detach"}')
    for i in range(len(wire)):
        await ours.send_all(wire[i : i + 1])
    await ours.aclose()
    first, second = await framed.next_frame(), await framed.next_frame()
    assert first is not None and (first.kind, first.payload) == (Kind.DATA, b"abc")
    assert second is not None and second.kind is Kind.CONTROL
    assert await framed.next_frame() is None
    assert await framed.next_frame() is None


async def test_framed_stream_refuses_a_stream_that_ends_inside_a_frame() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    framed = FramedStream(theirs, 1024)
    await ours.send_all(data_frame(b"whole") + data_frame(b"cut short")[:-2])
    await ours.aclose()
    assert (await framed.next_frame()) is not None
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        await framed.next_frame()


async def test_framed_stream_limit_can_change_after_the_handshake() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    framed = FramedStream(theirs, 1 << 20)
    framed.max_payload = 8
    await ours.send_all(data_frame(b"123456789"))
    with pytest.raises(ProtocolError, match="exceeds the limit of 8"):
        await framed.next_frame()


async def test_framed_stream_sends_messages_and_raw_frames() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    a, b = FramedStream(ours, 1024), FramedStream(theirs, 1024)
    await a.send(m.Ping(3))
    await a.send_frame(data_frame(b"raw"))
    ping, raw = await b.next_frame(), await b.next_frame()
    assert ping is not None and ping.payload == b'{"nonce":3,"type":"ping"}'
    assert raw is not None and raw.payload == b"raw"

"""The PTY pieces on a real PTY (no root): reader, input path, master, scrollback."""

from __future__ import annotations

import os
import termios
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from aaau.audit import AuditLog
from aaau.pty import PtyInput, PtyMaster, PtyReader, Scrollback
from tests.helpers import read_audit


@pytest.fixture
async def pty_pair() -> AsyncIterator[tuple[PtyMaster, int]]:
    """A PTY: our master object, and the raw slave fd (no program on it)."""
    master, slave = os.openpty()
    tty.setraw(slave)  # bytes as they are: no echo, no line discipline
    pty = PtyMaster(master)
    try:
        yield pty, slave
    finally:
        os.close(slave)
        await pty.aclose()


def _records(path: Path) -> list[dict[str, object]]:
    return read_audit(path)


def test_scrollback_keeps_everything_under_its_limit() -> None:
    sb = Scrollback(100)
    sb.append(b"one\n")
    sb.append(b"two")
    assert sb.snapshot() == b"one\ntwo"


def test_scrollback_keeps_the_last_bytes_and_starts_after_a_newline() -> None:
    sb = Scrollback(10)
    for line in (b"aaaa\n", b"bbbb\n", b"\x1b[1mcc\n", b"dd"):
        sb.append(line)
    # 19 bytes kept; the last 10 are "\n\x1b[1mcc\ndd": it starts after that newline,
    # so never inside the escape sequence
    assert sb.snapshot() == b"\x1b[1mcc\ndd"
    sb.append(b"\n" + b"e" * 9)  # now over twice the limit: trimmed, still bounded
    assert sb.snapshot() == b"eeeeeeeee" and len(sb._buffer) <= 20
    sb.limit = 0
    assert sb.snapshot() == b""


def test_scrollback_memory_is_bounded() -> None:
    sb = Scrollback(1000)
    for _ in range(10_000):
        sb.append(b"x" * 100)
    assert len(sb._buffer) <= 2000


async def test_reader_coalesces_a_burst_and_sees_the_end(
    pty_pair: tuple[PtyMaster, int],
) -> None:
    pty, slave = pty_pair
    chunks: list[bytes] = []
    reader = PtyReader(pty, 1 << 16, chunks.append)
    for _ in range(50):
        os.write(slave, b"0123456789")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.run)
        await trio.testing.wait_all_tasks_blocked()
        assert chunks == [b"0123456789" * 50]  # one chunk for the burst
        os.write(slave, b"more")
        with trio.fail_after(5):
            while len(chunks) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert chunks[1] == b"more" and reader.done.is_set()


async def test_reader_ends_when_every_slave_fd_is_closed() -> None:
    master, slave = os.openpty()
    pty = PtyMaster(master)
    reader = PtyReader(pty, 4096, lambda _data: None)
    os.close(slave)
    with trio.fail_after(5):
        await reader.run()
    assert reader.done.is_set()
    await pty.aclose()


async def test_input_is_recorded_before_it_is_written_and_arrives_in_order(
    pty_pair: tuple[PtyMaster, int], tmp_path: Path
) -> None:
    pty, slave = pty_pair
    log = AuditLog(str(tmp_path / "a.jsonl"))
    audit = log.bind(source="human", user="alice", uid=1, client_id=7)
    pin = PtyInput(pty)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pin.run)
        await pin.send(audit, b"first ")
        assert _records(tmp_path / "a.jsonl")[0]["content"] == "first "  # fast path
        await pin.send(audit, b"second")
        pin.close()
    got = b""
    with trio.fail_after(5):  # the kernel hands the bytes to the slave asynchronously
        while len(got) < 12:
            await trio.lowlevel.wait_readable(slave)
            got += os.read(slave, 100)
    assert got == b"first second"
    records = _records(tmp_path / "a.jsonl")
    assert [r["content"] for r in records] == ["first ", "second"]
    assert records[0]["metadata"] == {"client_id": 7, "encoding": "utf-8", "bytes": 6}
    assert (records[0]["user"], records[0]["command_type"]) == ("alice", "input")


async def test_input_waits_when_the_agent_does_not_read_and_keeps_order(
    pty_pair: tuple[PtyMaster, int], tmp_path: Path
) -> None:
    pty, slave = pty_pair
    audit = AuditLog(str(tmp_path / "a.jsonl")).bind(user="alice")
    pin = PtyInput(pty)
    block = b"x" * 4096
    sent = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pin.run)
        with trio.move_on_after(0.5):  # until the PTY and the input queue are full
            while True:
                await pin.send(audit, block)
                sent += 1
        assert sent > 1
        received = bytearray()

        async def drain() -> None:
            while len(received) < sent * len(block):
                await trio.lowlevel.wait_readable(slave)
                received.extend(os.read(slave, 65536))

        with trio.fail_after(10):
            await drain()
        pin.close()
    assert received == block * sent
    assert sum(int(r["metadata"]["bytes"]) for r in _records(tmp_path / "a.jsonl")) >= sent * 4096


async def test_end_of_input_is_veof_once_at_a_line_start_twice_mid_line(
    tmp_path: Path,
) -> None:
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)  # canonical: VEOF is ^D
    pty = PtyMaster(master)
    audit = AuditLog(str(tmp_path / "a.jsonl")).bind(user="alice")
    pin = PtyInput(pty)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pin.run)
            await pin.send(audit, b"line\n")
            await pin.send_eof(audit)  # at a line start: one ^D, read() returns 0
            await pin.send(audit, b"part")
            await pin.send_eof(audit)  # mid-line: the first ^D ends the line, the second EOF
            pin.close()
        reads = [os.read(slave, 100) for _ in range(4)]
        assert reads == [b"line\n", b"", b"part", b""]
        kinds = [r["command_type"] for r in _records(tmp_path / "a.jsonl")]
        assert kinds == ["input", "input_eof", "input", "input_eof"]
    finally:
        os.close(slave)
        await pty.aclose()


async def test_a_closed_master_reports_minus_one_and_ignores_resize_and_signals() -> None:
    master, slave = os.openpty()
    pty = PtyMaster(master)
    await pty.aclose()
    assert pty.fd == -1
    pty.resize(10, 10)  # no ioctl on a number that may belong to something else now
    pty.signal_foreground(1)
    with pytest.raises(OSError, match="Bad file descriptor"):
        pty.write_nowait(b"x")
    os.close(slave)

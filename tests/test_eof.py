"""When a program counts as reading its terminal: the pure part of aaau.eof."""

from __future__ import annotations

import pytest

from aaau.eof import Reading, classify, parse_syscall

X86 = "x86_64"


def test_parse_syscall_reads_a_blocked_call_and_not_a_running_one() -> None:
    assert parse_syscall("0 0x0 0x7ffd 0x1000 0x0 0x0 0x0 0x7ffc 0x7f12\n") == (
        0,
        (0, 0x7FFD, 0x1000, 0, 0, 0),
    )
    assert parse_syscall("running\n") is None
    assert parse_syscall("-1 0x7ffc 0x7f12\n") is None  # blocked, not in a call
    assert parse_syscall("garbage") is None


@pytest.mark.parametrize(
    ("call", "terminal", "expected"),
    [
        ((0, (0, 1, 2, 0, 0, 0)), {0: True}, Reading.READING),  # read(0) on the terminal
        ((0, (5, 1, 2, 0, 0, 0)), {5: False, 0: True}, Reading.BUSY),  # read of a file
        ((270, (1, 1, 0, 0, 0, 0)), {1: False, 0: True}, Reading.READING),  # readline
        ((270, (1, 1, 0, 0, 0, 0)), {1: False, 0: False}, Reading.BUSY),  # fd 0 elsewhere
        ((270, (8, 1, 0, 0, 0, 0)), {8: False, 0: True}, Reading.WAITING),  # wider select
        ((232, (13, 1, 0, 0, 0, 0)), {13: False, 0: True}, Reading.WAITING),  # epoll (node)
        ((61, (-1, 0, 0, 0, 0, 0)), {0: True}, Reading.BUSY),  # waiting for a child
        (None, {}, Reading.BUSY),  # running
    ],
)
def test_classify(
    call: tuple[int, tuple[int, ...]] | None, terminal: dict[int, bool], expected: Reading
) -> None:
    assert classify(call, terminal, X86) is expected


def test_an_unknown_machine_counts_every_sleeper_as_waiting() -> None:
    assert classify((0, (0, 0, 0, 0, 0, 0)), {0: True}, "mips") is Reading.WAITING

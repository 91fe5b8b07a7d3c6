"""Is a program reading its terminal? So end of input is given as it reads, not before.

Writing the terminal's EOF character before a program reads is unreliable:
readline (bash, python) puts the terminal in non-canonical mode first, and an
EOF written while it was still canonical then reads as a NUL byte, so the
program waits for ever. :func:`probe` says whether a process of the terminal's
foreground group, among the agent and its descendants, is blocked reading the
terminal, from ``/proc/PID/syscall``:

- ``READING``: in ``read`` on the terminal, or in ``select``/``pselect6`` on
  fd 0 alone (readline's wait) with fd 0 the terminal. The program has set
  its mode and nothing is waiting for it: an EOF written now is read as one.
- ``WAITING``: asleep in ``poll``/``epoll``/a wider ``select`` (node, for
  one), whose descriptors cannot be told from outside; the caller counts it
  as reading once it has lasted a moment.
- ``BUSY``: anything else (running, sleeping, waiting for a child).

The syscall numbers are the machine's; on a machine not listed every sleeper
is ``WAITING``. Reading another process's ``syscall`` file needs the right to
trace it: the server (root) has it; the in-process tests run as the agent.
"""

from __future__ import annotations

import enum
import os
import platform
from collections.abc import Callable
from typing import Final

import trio

from . import procfs

#: read-like, select-like and poll-like system calls by machine
_SYSCALLS: Final = {
    "x86_64": ({0, 17, 19}, {23, 270}, {7, 271, 232, 281, 441}),
    "aarch64": ({63, 65, 67}, {72}, {73, 22, 441}),
}
#: how many of the agent's processes are looked at, at most
_MAX_PROCESSES: Final = 256


class Reading(enum.Enum):
    READING = "reading"
    WAITING = "waiting"
    BUSY = "busy"


def parse_syscall(text: str) -> tuple[int, tuple[int, ...]] | None:
    """``/proc/PID/syscall``: (number, arguments) of a blocked call; None if running."""
    fields = text.split()
    if len(fields) < 7 or fields[0] in ("running", "-1"):
        return None
    try:
        return int(fields[0]), tuple(int(a, 16) for a in fields[1:7])
    except ValueError:
        return None


def classify(
    call: tuple[int, tuple[int, ...]] | None, is_terminal: dict[int, bool], machine: str
) -> Reading:
    """One process's state from its blocked call; ``is_terminal``: fd -> is it the terminal."""
    if call is None:
        return Reading.BUSY
    table = _SYSCALLS.get(machine)
    if table is None:
        return Reading.WAITING
    reads, selects, polls = table
    number, args = call
    if number in reads:
        return Reading.READING if is_terminal.get(args[0], False) else Reading.BUSY
    if number in selects and args[0] == 1:  # fd 0 alone
        return Reading.READING if is_terminal.get(0, False) else Reading.BUSY
    if number in selects:
        return Reading.WAITING
    if number in polls:
        return Reading.WAITING
    return Reading.BUSY


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < _MAX_PROCESSES:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = procfs.read_text(f"/proc/{current}/task/{tid}/children")
                todo += [int(c) for c in children.split()]
            except (OSError, ValueError):
                continue
    return out


def _is_terminal(pid: int, fd: int, rdev: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/fd/{fd}").st_rdev == rdev
    except OSError:
        return False


def _state(pid: int, rdev: int, machine: str) -> Reading:
    try:
        call = parse_syscall(procfs.read_text(f"/proc/{pid}/syscall"))
    except OSError:
        return Reading.BUSY
    fds = {}
    if call is not None:
        fds = {call[1][0]: _is_terminal(pid, call[1][0], rdev), 0: _is_terminal(pid, 0, rdev)}
    return classify(call, fds, machine)


def probe(agent_pid: int, master_fd: int, pty: str) -> Reading:
    """What the terminal's foreground processes (the agent's own) are doing with it."""
    try:
        foreground = os.tcgetpgrp(master_fd)
        rdev = os.stat(pty).st_rdev
    except OSError:
        return Reading.BUSY
    machine = platform.machine()
    seen = Reading.BUSY
    for pid in _descendants(agent_pid):
        stat = procfs.read_proc_stat(pid)
        if stat is None or stat.pgrp != foreground:
            continue
        state = _state(pid, rdev, machine)
        if state is Reading.READING:
            return state
        if state is Reading.WAITING:
            seen = state
    return seen


#: how long a WAITING program must wait before it counts as reading
SETTLE: Final = 0.3
#: the first look, and the longest gap between looks
_FIRST_LOOK: Final = 0.01
_LONGEST_GAP: Final = 0.5


async def until_read(look: Callable[[], Reading], settle: float = SETTLE) -> None:
    """Return once ``look()`` says the program reads its terminal (or has waited ``settle``).

    Looks often at first, then less (a program busy for minutes costs a look
    every half second).
    """
    gap, waiting_since = _FIRST_LOOK, None
    while True:
        state = look()
        now = trio.current_time()
        if state is Reading.READING:
            return
        if state is Reading.WAITING:
            waiting_since = now if waiting_since is None else waiting_since
            if now - waiting_since >= settle:
                return
        else:
            waiting_since = None
        await trio.sleep(gap)
        gap = min(gap * 2, _LONGEST_GAP)

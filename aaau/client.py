"""The ``aaau`` client's link to the server, its one-shot requests and its error policy.

The attached client (a terminal or pipes and one session) is :mod:`aaau.attach`.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import shlex
import sys
import time
from typing import Any

import trio

from . import codec
from . import messages as m
from .errors import ProtocolError
from .framing import FramedStream
from .protocol import Kind, data_frame
from .terminal import TerminalError
from .text import printable

EXIT_ERROR = 255


class ClientError(Exception):
    """Something went wrong on our side of the session: exit 255 with this message."""


#: the largest frame taken from the server (its output chunks are at most 128 KiB)
_MAX_FRAME = 1 << 24


class _Credit:
    """The input window: bytes we may send before the server credits them back."""

    def __init__(self) -> None:
        self.available = 0
        self._lot = trio.lowlevel.ParkingLot()

    def give(self, amount: int) -> None:
        self.available += amount
        self._lot.unpark_all()

    async def take(self, wanted: int) -> int:
        """Up to ``wanted`` bytes of credit, waiting for some if there is none."""
        while self.available <= 0:
            await self._lot.park()
        granted = min(wanted, self.available)
        self.available -= granted
        return granted


class Link:
    """A connection to the server: framed messages in and out."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.framed = FramedStream(stream, _MAX_FRAME)
        self.credit = _Credit()

    async def send(self, message: m.ClientMessage) -> None:
        await self.framed.send(message)

    async def send_input(self, data: bytes) -> None:
        """Input, in pieces that keep within the window the server granted."""
        view = memoryview(data)
        while view:
            n = await self.credit.take(len(view))
            await self.framed.send_frame(data_frame(bytes(view[:n])))
            view = view[n:]

    async def next_control(self) -> m.ServerMessage:
        frame = await self.framed.next_frame()
        if frame is None:
            raise ClientError("the server closed the connection")
        if frame.kind is not Kind.CONTROL:
            raise ClientError("protocol error: expected a control message")
        return codec.decode_server(frame.payload)

    async def aclose(self) -> None:
        await self.framed.aclose()


async def connect(path: str) -> Link:
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise ClientError(explain_connect(path, exc)) from None
    return Link(stream)


def explain_connect(path: str, exc: OSError) -> str:
    """Why a connection failed, said so that a newcomer knows what to do next."""
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return (
            f"no aaau server is running at {path} (an admin starts it: systemctl start "
            "aaau.socket, or aaau-server run --daemon; another server: -s PATH or $AAAU_SOCKET)"
        )
    if exc.errno == errno.EACCES:
        return f"cannot reach {path}: {_why_denied(path)}"
    return f"cannot connect to {path}: {exc.strerror or exc}"


def _why_denied(path: str) -> str:
    """Permission denied: not in the group, or in it since a login that predates it."""
    gid = None
    for where in (path, os.path.dirname(path)):
        with contextlib.suppress(OSError):
            gid = os.stat(where).st_gid
            if gid != 0:
                break
    try:
        group = grp.getgrgid(gid).gr_name if gid is not None else None
    except KeyError:
        group = None
    if group is None:
        return "permission denied"
    user = pwd.getpwuid(os.getuid()).pw_name
    listed = user in grp.getgrnam(group).gr_mem
    if listed and gid not in os.getgroups():
        return (
            f"you were added to group {group} after this login: log in again (or run "
            f"`newgrp {group}`) so that your processes carry it"
        )
    return (
        f"permission denied: you ({user}) are not in group {group} (admins: in the admin group); "
        f"ask an admin to run `usermod -aG {group} {user}`, then log in again"
    )


def fail_on_error(reply: m.ServerMessage) -> None:
    if isinstance(reply, m.Error):
        raise ClientError(reply.message)


async def one_shot(path: str, request: m.ClientMessage) -> m.ServerMessage:
    """Send a request that needs no session and return the server's answer."""
    link = await connect(path)
    async with link.framed.stream:
        await link.send(request)
        reply = await link.next_control()
    fail_on_error(reply)
    return reply


async def asys_call(
    path: str, session_id: str | None, instruction: str, args: dict[str, int | str]
) -> int:
    """Run one ASys instruction (inside a session when ``session_id`` is given)."""
    v = m.PROTOCOL_VERSION
    if session_id is None:
        reply = await one_shot(path, m.AsysCall(v, 1, instruction, args))
    else:
        link = await connect(path)
        async with link.framed.stream:
            await link.send(m.Join(v, session_id))
            welcome = await link.next_control()
            fail_on_error(welcome)
            await link.send(m.AsysRequest(1, instruction, args))
            while True:
                frame = await link.framed.next_frame()
                if frame is None:
                    raise ClientError("the server closed the connection")
                if frame.kind is Kind.CONTROL:
                    reply = codec.decode_server(frame.payload)
                    if isinstance(reply, m.AsysResult | m.Exited):
                        break
                    fail_on_error(reply)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await link.send(m.Detach())
    if not isinstance(reply, m.AsysResult):
        raise ClientError(f"no answer: the session ended ({reply})")
    out = codec.converter.unstructure(reply)
    del out["request_id"]
    print_json(out)
    return 0 if reply.sw == "9000" else 1




def _since(created_at: float, now: float) -> str:
    local, today = time.localtime(created_at), time.localtime(now)
    if now - created_at < 20 * 3600 and local.tm_yday == today.tm_yday:
        return time.strftime("%H:%M", local)
    return time.strftime("%b%d", local)


def _watching(clients: tuple[m.ClientInfo, ...]) -> str:
    if not clients:
        return "-"
    roles = {m.Role.READONLY: "ro", m.Role.INTERACTIVE: "rw", m.Role.ADMIN: "admin"}
    return ",".join(f"{c.user}({roles[c.role]})" for c in clients)


def format_sessions(sessions: tuple[m.SessionInfo, ...], now: float | None = None) -> str:
    """``aaau ls``: one line per session, every field made printable."""
    now = time.time() if now is None else now
    rows = [("SESSION", "CREATOR", "SINCE", "SIZE", "WATCHING", "COMMAND")]
    for s in sessions:
        rows.append(
            (
                s.session_id,
                s.creator,
                _since(s.created_at, now),
                f"{s.cols}x{s.rows}",
                _watching(s.clients),
                shlex.join(s.argv) if s.argv else "(login shell)",
            )
        )
    cells = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True))
        + "  "
        + row[5]
        for row in cells
    )


def session_json(info: m.SessionInfo) -> Any:
    return codec.converter.unstructure(info)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def innermost(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_client(coro_fn: Any, *args: Any) -> int:
    """trio.run with the client's error policy: one line on stderr that names the culprit
    (the terminal, standard output, the server), exit 255."""
    try:
        return int(trio.run(coro_fn, *args))
    except BaseException as exc:
        leaf = innermost(exc)
        if isinstance(leaf, ClientError | TerminalError):
            message = str(leaf)
        elif isinstance(leaf, ProtocolError):
            message = f"protocol error from the server: {leaf}"
        elif isinstance(leaf, trio.BrokenResourceError | trio.ClosedResourceError):
            message = f"connection to the server lost: {leaf.__cause__ or leaf}"
        elif isinstance(leaf, OSError):
            message = f"{leaf.strerror or leaf}" + (f": {leaf.filename}" if leaf.filename else "")
        elif isinstance(leaf, KeyboardInterrupt):
            message = "interrupted"
        else:
            raise
        print(f"aaau: {message}", file=sys.stderr)
        return EXIT_ERROR

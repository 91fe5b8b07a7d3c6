"""The ``aaau`` client: connect, hand-shake, then move bytes both ways.

On a terminal: raw mode (restored on every exit path), SIGWINCH sends a
resize, ``~.`` after a newline detaches. Without a terminal: stdin is
forwarded as input and its end becomes the agent's end of input.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from . import codec
from . import messages as m
from .errors import ErrorCode, ProtocolError
from .escape import EscapeFilter
from .framing import FramedStream
from .protocol import Kind, data_frame
from .terminal import open_tty, raw_mode, window_size

EXIT_ERROR = 255
_NONFATAL = {ErrorCode.FORBIDDEN, ErrorCode.SHUTDOWN}


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


class _Link:
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


async def connect(path: str) -> _Link:
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise ClientError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return _Link(stream)


def _fail_on_error(reply: m.ServerMessage) -> None:
    if isinstance(reply, m.Error):
        raise ClientError(reply.message)


async def one_shot(path: str, request: m.ClientMessage) -> m.ServerMessage:
    """Send a request that needs no session and return the server's answer."""
    link = await connect(path)
    async with link.framed.stream:
        await link.send(request)
        reply = await link.next_control()
    _fail_on_error(reply)
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
            _fail_on_error(welcome)
            await link.send(m.AsysRequest(1, instruction, args))
            while True:
                frame = await link.framed.next_frame()
                if frame is None:
                    raise ClientError("the server closed the connection")
                if frame.kind is Kind.CONTROL:
                    reply = codec.decode_server(frame.payload)
                    if isinstance(reply, m.AsysResult | m.Exited):
                        break
                    _fail_on_error(reply)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await link.send(m.Detach())
    if not isinstance(reply, m.AsysResult):
        raise ClientError(f"no answer: the session ended ({reply})")
    out = codec.converter.unstructure(reply)
    del out["request_id"]
    print_json(out)
    return 0 if reply.sw == "9000" else 1


def format_sessions(sessions: tuple[m.SessionInfo, ...]) -> str:
    lines = [f"{'SESSION':24} {'CREATOR':12} {'CLIENTS':>7} {'AGE':>8}  COMMAND"]
    now = time.time()
    for s in sessions:
        age = int(now - s.created_at)
        lines.append(
            f"{s.session_id:24} {s.creator:12} {len(s.clients):>7} {age:>7}s  {' '.join(s.argv)}"
        )
    return "\n".join(lines)


def session_json(info: m.SessionInfo) -> Any:
    return codec.converter.unstructure(info)


async def attach(path: str, hello: m.Create | m.Join) -> int:
    """Run an interactive (or piped) session; returns the process exit status."""
    link = await connect(path)
    async with link.framed.stream:
        await link.send(hello)
        welcome = await link.next_control()
        _fail_on_error(welcome)
        if not isinstance(welcome, m.Welcome):
            raise ClientError(f"unexpected reply {type(welcome).__name__}")
        print(
            f"aaau: session {welcome.session_id} ({welcome.role.value}); "
            "~. after a newline detaches",
            file=sys.stderr,
            flush=True,
        )
        # the signals are ours before the terminal goes raw, so none can leave it raw
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
            if os.isatty(0):
                tty_fd = open_tty(0)
                with raw_mode(0):
                    return await _run(link, welcome, tty_fd, signals)
            return await _run(link, welcome, None, signals)


async def _run(
    link: _Link, welcome: m.Welcome, tty_fd: int | None, signals: AsyncIterator[int]
) -> int:
    result: list[int] = []
    link.credit.give(welcome.input_window)
    tty = trio.lowlevel.FdStream(tty_fd) if tty_fd is not None else None
    async with trio.open_nursery() as nursery:

        def finish(code: int) -> None:
            if not result:
                result.append(code)
            nursery.cancel_scope.cancel()

        nursery.start_soon(_receive, link, tty, finish)
        if tty is not None:
            nursery.start_soon(_keyboard, link, tty, welcome.role, finish)
            nursery.start_soon(_winch, link, welcome.role)
        elif welcome.role is not m.Role.READONLY:
            nursery.start_soon(_pipe_input, link)
        nursery.start_soon(_signals, signals, finish)
    if tty is not None:
        with trio.CancelScope(shield=True):
            await tty.aclose()
    return result[0] if result else EXIT_ERROR


def _notice(text: str, tty: trio.lowlevel.FdStream | None) -> None:
    end = "\r\n" if tty is not None else "\n"
    sys.stderr.write(f"aaau: {text}{end}")
    sys.stderr.flush()


async def _receive(link: _Link, tty: trio.lowlevel.FdStream | None, finish: Any) -> None:
    while True:
        try:
            frame = await link.framed.next_frame()
        except ProtocolError as exc:
            _notice(f"protocol error from the server: {exc}", tty)
            finish(EXIT_ERROR)
            return
        if frame is None:
            _notice("the server closed the connection", tty)
            finish(EXIT_ERROR)
            return
        if frame.kind is Kind.DATA:
            if tty is not None:
                await tty.send_all(frame.payload)
            else:
                _write_stdout(frame.payload)
            continue
        msg = codec.decode_server(frame.payload)
        if isinstance(msg, m.InputCredit):
            link.credit.give(msg.bytes)
        elif isinstance(msg, m.Exited):
            finish(msg.code if msg.signal is None else 128 + msg.signal)
            return
        if isinstance(msg, m.Error):
            _notice(msg.message, tty)
            if msg.code not in _NONFATAL:
                finish(EXIT_ERROR)
                return
        elif isinstance(msg, m.RoleChanged):
            _notice(f"your role is now {msg.role.value} ({msg.reason})", tty)


def _write_stdout(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


async def _keyboard(link: _Link, tty: trio.lowlevel.FdStream, role: m.Role, finish: Any) -> None:
    escape = EscapeFilter()
    while data := await tty.receive_some(4096):
        data, detach = escape.feed(data)
        if data and role is not m.Role.READONLY:
            await link.send_input(data)
        if detach:
            await link.send(m.Detach())
            _notice("detached", tty)
            finish(0)
            return


async def _pipe_input(link: _Link) -> None:
    while True:
        data = await trio.to_thread.run_sync(os.read, 0, 65536, abandon_on_cancel=True)
        if not data:
            await link.send(m.InputEof())
            return
        await link.send_input(data)


async def _winch(link: _Link, role: m.Role) -> None:
    if role is m.Role.READONLY:
        return
    # no resize on join: a joiner must not force its size on everyone until it changes
    with trio.open_signal_receiver(signal.SIGWINCH) as signals:
        rows, cols = window_size(0)
        async for _ in signals:
            new = window_size(0)
            if new != (rows, cols):
                rows, cols = new
                await link.send(m.Resize(rows=rows, cols=cols))


async def _signals(signals: AsyncIterator[int], finish: Any) -> None:
    async for signum in signals:
        finish(128 + signum)
        return


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_client(coro_fn: Any, *args: Any) -> int:
    """trio.run with the client's error policy: one line on stderr, exit 255."""
    try:
        return int(trio.run(coro_fn, *args))
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, ClientError):
            message = str(leaf)
        elif isinstance(leaf, ProtocolError):
            message = f"protocol error: {leaf}"
        elif isinstance(leaf, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
            message = f"connection to the server lost: {leaf}"
        elif isinstance(leaf, KeyboardInterrupt):
            message = "interrupted"
        else:
            raise
        print(f"aaau: {message}", file=sys.stderr)
        return EXIT_ERROR

"""The ``aaau`` client's link to the server, its one-shot requests and its error policy.

The attached client (a terminal or pipes and one session) is :mod:`aaau.attach`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import trio

from . import codec
from . import messages as m
from .errors import ProtocolError, innermost
from .framing import FramedStream
from .oneshot import explain_connect
from .protocol import Kind, data_frame
from .terminal import TerminalError

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




def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


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

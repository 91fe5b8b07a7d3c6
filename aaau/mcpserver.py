"""ASys as MCP tools: the `mcp` SDK's server, run on Trio (through anyio) inside aaau's server.

``aaau mcp`` (:mod:`aaau.mcprelay`) is what the agent starts: a small relay
that connects to its session's endpoint, says ``mcp_open``, and copies its
stdin and stdout to and from DATA frames. The MCP protocol itself is served
here, by the SDK's low-level :class:`mcp.server.lowlevel.Server`, over that
connection: each line is one JSON-RPC message, as on MCP's stdio transport.

Why here and not in the relay: the SDK takes 0.5-0.9 s to import on this
machine (pydantic models of the whole protocol), and an MCP server should be
up in well under a second (claude checks it at start-up; our target is
0.3 s). Imported once per server (in a worker thread, so the event loop keeps
serving), it costs each agent nothing: the relay starts in ~40 ms.

The tools are the instructions the session grants its agent *now*: a revoked
grant is refused by the next call, and the client is told
``notifications/tools/list_changed`` (it then lists them again without it).
A tool's input schema is its arguments' (:mod:`aaau.asys.schema`); its
result is the ``asys_result`` as structured content and as JSON text, an
error result when the status word is not ``9000``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import trio

from . import __version__, asys, codec
from . import messages as m
from .asys.schema import input_schema
from .errors import ErrorCode, ProtocolError
from .framing import FramedStream
from .protocol import Kind, data_frame

Call = Callable[[m.AsysRequest], Awaitable[m.AsysResult]]
Grants = Callable[[], frozenset[str]]

#: messages queued between the connection and the SDK, each way
_QUEUE: Final = 16
_SDK_MODULES: Final = ("mcp_types", "mcp.server.lowlevel", "mcp.shared.message")
_loaded = False
_loading = trio.Lock()


async def load_sdk() -> None:
    """Import the SDK once, in a worker thread; concurrent callers wait for the same import."""
    global _loaded
    async with _loading:
        if not _loaded:
            for name in _SDK_MODULES:
                await trio.to_thread.run_sync(importlib.import_module, name)
            _loaded = True


def _tools(grants: frozenset[str]) -> list[Any]:
    import mcp_types as types

    return [
        types.Tool(
            name=name,
            description=f"ASys {name}: {instr.summary}. Answers the asys_result "
            "(sw 9000 = ok; docs/asys.md).",
            input_schema=input_schema(instr),
        )
        for name, instr in asys.TABLE.items()
        if name in grants
    ]


def _server(call: Call, grants: Grants, sessions: list[Any]) -> Any:
    import mcp_types as types
    from mcp.server.lowlevel import Server

    ids = iter(range(1, 2**53))

    async def list_tools(ctx: Any, _params: Any) -> Any:
        if not sessions:
            sessions.append(ctx.session)
        return types.ListToolsResult(tools=_tools(grants()))

    async def call_tool(_ctx: Any, params: Any) -> Any:
        args = dict(params.arguments or {})
        try:
            request = m.AsysRequest(next(ids), params.name, args)
        except (TypeError, ValueError) as exc:
            sw = asys.SW.WRONG_LENGTH
            answer = m.AsysResult(0, params.name[:64], sw, sw.label, None, f"bad call: {exc}")
        else:
            answer = await call(request)
        out = codec.converter.unstructure(answer)
        del out["request_id"]
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=json.dumps(out, sort_keys=True))],
            structured_content=out,
            is_error=answer.sw != asys.SW.OK,
        )

    return Server(
        "aaau",
        version=__version__,
        instructions="ASys machine facts and controls for this aaau session's agent; "
        "each tool is one instruction its creator granted.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def serve(
    framed: FramedStream,
    call: Call,
    grants: Grants,
    watchers: set[Callable[[], None]] | None = None,
) -> None:
    """Serve MCP over ``framed`` (after ``mcp_open``) until the relay closes it.

    ``watchers``: where to register for grant changes; each is told to the
    client as ``notifications/tools/list_changed``."""
    await load_sdk()
    from mcp.server.lowlevel import NotificationOptions
    from mcp.shared.message import SessionMessage

    sessions: list[Any] = []  # the SDK's session, once a tools/list showed it
    server = _server(call, grants, sessions)
    changed_in, changed_out = trio.open_memory_channel[None](1)
    to_sdk, from_peer = anyio.create_memory_object_stream[Any](_QUEUE)
    to_peer, from_sdk = anyio.create_memory_object_stream[Any](_QUEUE)

    async def relay_in() -> None:
        import mcp_types as types

        async with to_sdk:
            async for line in _lines(framed):
                try:
                    message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                except Exception as exc:  # the SDK answers a parse error for it
                    await to_sdk.send(exc)
                    continue
                await to_sdk.send(SessionMessage(message))

    async def relay_out() -> None:
        async with from_sdk:
            async for item in from_sdk:
                text = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                await framed.send_frame(data_frame(text.encode() + b"\n"))

    async def tell_changes() -> None:
        async for _ in changed_out:
            if sessions:
                await sessions[0].send_tool_list_changed()

    def changed() -> None:
        with contextlib.suppress(trio.WouldBlock):  # one pending notice says it all
            changed_in.send_nowait(None)

    options = server.create_initialization_options(NotificationOptions(tools_changed=True))
    if watchers is not None:
        watchers.add(changed)
    try:
        async with from_peer, to_peer, trio.open_nursery() as nursery:
            nursery.start_soon(relay_out)
            nursery.start_soon(tell_changes)
            nursery.start_soon(server.run, from_peer, to_peer, options)
            await relay_in()
            nursery.cancel_scope.cancel()
    finally:
        if watchers is not None:
            watchers.discard(changed)


async def _lines(framed: FramedStream) -> Any:
    """The JSON-RPC lines the relay sends, each at most a frame's size."""
    pending = bytearray()
    while (frame := await framed.next_frame()) is not None:
        if frame.kind is not Kind.DATA:
            continue  # the relay sends nothing else; a control frame has no place here
        pending += frame.payload
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end]).strip()
            del pending[: end + 1]
            if line:
                yield line
        if len(pending) > framed.max_payload:
            raise ProtocolError(
                f"an MCP message longer than {framed.max_payload} bytes", code=ErrorCode.TOO_LARGE
            )

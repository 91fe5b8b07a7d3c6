"""The agent's ASys without a server: grants, schemas, registration, frames, the MCP bridge."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import trio
import trio.testing

from aaau import agentconfig, agentside, asys, cli, codec, mcpserver, oneshot
from aaau import messages as m
from aaau.asys.schema import input_schema
from aaau.config import Config
from aaau.framing import FramedStream
from aaau.protocol import Kind, data_frame

V = m.PROTOCOL_VERSION
CMD = ["/opt/aaau/bin/aaau", "mcp"]


# --- grants -------------------------------------------------------------------------------------


def test_the_default_grants_are_the_read_only_facts() -> None:
    granted = asys.agent_grants(None, Config(), frozenset(), admin=False)
    assert granted == {"SYS_CAPS", "SYS_HELLO", "SYS_STATUS", "SYS_PROCS", "TASK_QUERY"}
    assert all(asys.TABLE[name].read_only for name in granted)


def test_grants_above_the_ceiling_or_unknown_are_refused() -> None:
    cfg = Config(agent_grants={"PROC_THROTTLE": ("root",)})  # gid 0
    assert asys.agent_grants(("PROC_THROTTLE",), cfg, frozenset({0}), admin=False) == {
        "PROC_THROTTLE"
    }
    with pytest.raises(ValueError, match="may not grant NET_ISOLATE, PROC_THROTTLE"):
        asys.agent_grants(("PROC_THROTTLE", "NET_ISOLATE"), cfg, frozenset({5}), admin=False)
    assert asys.agent_grants(("NET_ISOLATE",), cfg, frozenset(), admin=True) == {"NET_ISOLATE"}
    with pytest.raises(ValueError, match="no such ASys instruction: SYS_X"):
        asys.agent_grants(("SYS_X",), cfg, frozenset(), admin=True)
    assert asys.agent_grants((), cfg, frozenset(), admin=False) == frozenset()


async def test_the_agent_gets_exactly_its_grants_whatever_its_role() -> None:
    scope = asys.SessionScope("s", 1000, 1, None)
    ctx = asys.Context(
        m.Role.ADMIN, "agent", 1000, frozenset(), object(), scope, "agent", frozenset({"SYS_CAPS"})
    )
    assert asys.allowed_instructions(ctx) == ["SYS_CAPS"]
    sw, result, message = await asys.dispatch("SYS_HELLO", {}, ctx)
    assert (sw, result) == (asys.SW.DENIED, None)
    assert message == "SYS_HELLO is not granted to this session's agent"
    ctx.grants = frozenset({"NET_ISOLATE"})
    sw, _, message = await asys.dispatch("NET_ISOLATE", {"action": "restore"}, ctx)
    assert sw == asys.SW.DENIED and "never lift it" in message


# --- the tools' schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(asys.TABLE))
def test_each_tool_schema_matches_its_argument_class(name: str) -> None:
    instr = asys.TABLE[name]
    schema = input_schema(instr)
    fields = {f.name: f for f in attrs.fields(instr.args)}
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(fields)
    required = {n for n, f in fields.items() if f.default is attrs.NOTHING}
    assert set(schema.get("required", ())) == required
    sample = {
        n: (3 if p["type"] == "integer" else p.get("enum", ["nginx"])[0])
        for n, p in schema["properties"].items()
    }
    codec.converter.structure(sample, instr.args)  # what the schema allows, cattrs takes


# --- registering the MCP server -------------------------------------------------------------------


def test_claude_config_gains_and_loses_our_entry_only() -> None:
    added = agentconfig.updated_claude_config('{"theme": "dark"}', CMD, True)
    assert added is not None
    config = json.loads(added)
    assert config["theme"] == "dark"
    assert config["mcpServers"]["aaau"] == {
        "type": "stdio",
        "command": CMD[0],
        "args": ["mcp"],
        "env": {},
    }
    assert agentconfig.updated_claude_config(added, CMD, True) is None  # already there
    removed = agentconfig.updated_claude_config(added, CMD, False)
    assert removed is not None and json.loads(removed)["mcpServers"] == {}
    theirs = json.dumps({"mcpServers": {"aaau": {"command": "/usr/bin/other"}}})
    assert agentconfig.updated_claude_config(theirs, CMD, False) is None
    for broken in ("[1, 2]", "{not json", '{"mcpServers": 3}'):
        assert agentconfig.updated_claude_config(broken, CMD, True) is None
    assert json.loads(agentconfig.updated_claude_config(None, CMD, True) or "")["mcpServers"]


def test_register_claude_writes_the_file_privately(tmp_path: Path) -> None:
    assert agentconfig.register_claude(str(tmp_path), CMD, True) == "registered"
    path = tmp_path / ".claude.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert agentconfig.register_claude(str(tmp_path), CMD, True) == "registered"
    assert agentconfig.register_claude(str(tmp_path), CMD, False) == "removed"
    assert agentconfig.register_claude(str(tmp_path), CMD, False) == "unchanged"
    path.write_text("[]")
    assert agentconfig.register_claude(str(tmp_path), CMD, True).startswith("skipped")
    assert path.read_text() == "[]"  # a file we do not understand is left as it is
    assert [p.name for p in tmp_path.iterdir()] == [".claude.json"]  # no temporary left


def test_codex_gets_its_server_as_options_of_the_run() -> None:
    argv = agentconfig.codex_argv(("codex", "--full-auto", "fix it"), CMD, "/run/aaau-asys/k")
    assert argv[0] == "codex" and argv[-2:] == ("--full-auto", "fix it")
    assert argv[1:7:2] == ("-c", "-c", "-c")
    assert argv[2] == 'mcp_servers.aaau.command="/opt/aaau/bin/aaau"'
    assert argv[4] == 'mcp_servers.aaau.args=["mcp"]'
    assert argv[6] == 'mcp_servers.aaau.env={AAAU_ASYS="/run/aaau-asys/k"}'
    assert agentconfig.agent_kind("/usr/bin/claude") == "claude"
    assert agentconfig.agent_kind("claude-x") is None


# --- the client side ----------------------------------------------------------------------------


def test_light_frames_are_the_codecs() -> None:
    light = oneshot.create(
        rows=24, cols=80, term="xterm", argv=("claude",), grants=("SYS_STATUS",), mcp=True
    )
    typed = m.Create(V, 24, 80, "xterm", ("claude",), grants=("SYS_STATUS",), mcp=True)
    assert oneshot.frame(light) == codec.encode(typed)
    plain = oneshot.create(rows=24, cols=80, term="xterm", argv=None)
    assert oneshot.frame(plain) == codec.encode(m.Create(V, 24, 80, "xterm"))
    revoke = oneshot.revoke("k3x9", ("SYS_STATUS", "PROC_THROTTLE"))
    assert oneshot.frame(revoke) == codec.encode(
        m.Revoke(V, "k3x9", ("SYS_STATUS", "PROC_THROTTLE"))
    )
    with pytest.raises(ValueError, match="not an ASys instruction name"):
        m.Revoke(V, "k3x9", ("sys status",))
    with pytest.raises(oneshot.OneShotError, match="not an ASys instruction name"):
        oneshot.revoke("k3x9", ("a;b",))


def test_grant_lists_and_arguments_parse_like_a_person_means_them() -> None:
    assert cli._instructions(["sys_status,SYS_PROCS", "sys_status", " proc_throttle "]) == (
        "SYS_STATUS",
        "SYS_PROCS",
        "PROC_THROTTLE",
    )
    assert cli._instructions(["none"]) == ()
    assert agentside.parse_args(["count=5", "pid=-1", "name=a=b", "x=\uff15"]) == {
        "count": 5,
        "pid": -1,
        "name": "a=b",
        "x": "\uff15",
    }
    with pytest.raises(ValueError, match="key=value"):
        agentside.parse_args(["oops"])


def test_outside_a_session_aaau_mcp_says_what_it_is_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AAAU_ASYS", raising=False)
    with pytest.raises(oneshot.OneShotError, match=r"\$AAAU_ASYS is not set: this runs inside"):
        agentside.endpoint()
    assert cli.client_main(["mcp"]) == cli.EXIT_ERROR


# --- the MCP bridge, in process -------------------------------------------------------------------


async def _bridge_client(stream: trio.abc.Stream, out: dict[str, Any], revoke: Any = None) -> None:
    """An SDK ClientSession whose JSON-RPC lines travel as DATA frames over ``stream``."""
    import mcp_types as types
    from mcp.client.session import ClientSession
    from mcp.shared.message import SessionMessage

    framed = FramedStream(stream, 1 << 20)
    to_client, from_server = anyio.create_memory_object_stream[Any](16)
    to_server, from_client = anyio.create_memory_object_stream[Any](16)

    async def pump_in() -> None:
        while (frame := await framed.next_frame()) is not None:
            assert frame.kind is Kind.DATA
            for line in frame.payload.splitlines():
                msg = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                await to_client.send(SessionMessage(msg))

    async def pump_out() -> None:
        async for item in from_client:
            text = item.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
            # split mid-message: the server must join DATA frames into lines
            half = len(text) // 2
            await framed.send_frame(data_frame(text[:half].encode()))
            await framed.send_frame(data_frame(text[half:].encode()))

    streams = (to_client, from_server, to_server, from_client)
    async with contextlib.AsyncExitStack() as held, trio.open_nursery() as nursery:
        for held_stream in streams:
            await held.enter_async_context(held_stream)
        nursery.start_soon(pump_in)
        nursery.start_soon(pump_out)
        told = trio.Event()

        async def notices(message: Any) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                told.set()

        async with ClientSession(from_server, to_server, message_handler=notices) as session:
            init = await session.initialize()
            out["list_changed"] = init.capabilities.tools.list_changed
            out["tools"] = [t.name for t in (await session.list_tools()).tools]
            out["hello"] = await session.call_tool("SYS_HELLO", {})
            out["bad"] = await session.call_tool("SYS_HELLO", {"x": "y" * 5000})
            revoke()
            await told.wait()  # the server says so, unasked
            out["after"] = [t.name for t in (await session.list_tools()).tools]
        nursery.cancel_scope.cancel()


async def test_the_mcp_bridge_serves_the_grants_as_tools() -> None:
    calls: list[m.AsysRequest] = []

    async def call(req: m.AsysRequest) -> m.AsysResult:
        calls.append(req)
        sw = asys.SW.OK if not req.args else asys.SW.WRONG_LENGTH
        return m.AsysResult(req.request_id, req.instruction, sw, sw.label, {"ok": 1}, "")

    server_end, client_end = trio.testing.memory_stream_pair()
    grants = {"SYS_HELLO", "SYS_STATUS"}
    watchers: set[Any] = set()

    def revoke() -> None:  # as endpoint.revoke does
        grants.discard("SYS_STATUS")
        for changed in list(watchers):
            changed()

    out: dict[str, Any] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            framed = FramedStream(server_end, 1 << 20)
            nursery.start_soon(mcpserver.serve, framed, call, lambda: frozenset(grants), watchers)
            await _bridge_client(client_end, out, revoke)
            nursery.cancel_scope.cancel()
    assert not watchers  # the connection's watcher went with it
    assert out["list_changed"] is True
    assert out["tools"] == ["SYS_HELLO", "SYS_STATUS"]  # the table's order
    assert out["after"] == ["SYS_HELLO"]
    hello = out["hello"]
    assert hello.is_error is False and hello.structured_content["sw"] == "9000"
    assert json.loads(hello.content[0].text) == hello.structured_content
    assert out["bad"].is_error is True  # an argument value over 4096 characters
    assert out["bad"].structured_content["sw"] == "6700"
    assert [c.instruction for c in calls] == ["SYS_HELLO"]


def test_the_agent_side_imports_no_trio() -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "aaau", "mcp"],
        capture_output=True,
        text=True,
        env={**os.environ, "AAAU_ASYS": "/nonexistent/endpoint"},
        check=False,
    )
    assert result.returncode == cli.EXIT_ERROR
    assert "cannot reach the ASys endpoint /nonexistent/endpoint: there is none" in result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {"trio", "cattrs", "structlog", "mcp", "pydantic"} & imported


async def test_an_mcp_line_longer_than_a_frame_is_refused() -> None:
    """No newline, ever: the bridge keeps at most a frame's worth, then says so."""
    from aaau.errors import ErrorCode, ProtocolError

    async def never(_req: m.AsysRequest) -> m.AsysResult:
        raise AssertionError("no call can come of this")

    server_end, client_end = trio.testing.memory_stream_pair()
    framed = FramedStream(server_end, 1024)

    async def feed() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mcpserver.serve, framed, never, frozenset)
            for _ in range(3):
                await client_end.send_all(data_frame(b"x" * 1000))

    with trio.fail_after(30), pytest.raises(BaseExceptionGroup) as caught:
        await feed()
    (error,) = caught.value.exceptions
    while isinstance(error, BaseExceptionGroup):
        (error,) = error.exceptions
    assert isinstance(error, ProtocolError) and error.code is ErrorCode.TOO_LARGE


async def test_the_agents_rate_follows_a_reload(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """SIGHUP replaces the server's config: the endpoint's budget is read at each call
    (virtual time: the clock moves only when the test says)."""
    from aaau import endpoint

    async def answered(_ctx: Any, msg: m.AsysRequest) -> m.AsysResult:
        return m.AsysResult(msg.request_id, msg.instruction, asys.SW.OK, "ok", {}, "")

    monkeypatch.setattr(asys, "call", answered)

    class Audit:
        def note(self, *_a: Any, **_k: Any) -> None: ...

        def bind(self, **_k: Any) -> Audit:
            return self

    server = type("Server", (), {"config": Config(agent_asys_rate=0.001, agent_asys_burst=1)})()
    a, b = __import__("socket").socketpair()
    try:
        ep = endpoint.Endpoint("/nonexistent", a, Audit(), server)  # type: ignore[arg-type]
        ep._scope, ep._user = asys.SessionScope("s", 1000, 1, None), "agent"
        words = [(await ep.call(m.AsysRequest(i, "SYS_HELLO"))).sw for i in range(3)]
        assert words == ["9000", "6400", "6400"]
        await trio.sleep(1)  # at 0.001 calls/s: still nothing to spend
        assert (await ep.call(m.AsysRequest(8, "SYS_HELLO"))).sw == "6400"
        server.config = Config(agent_asys_rate=1000.0, agent_asys_burst=1000)  # a reload
        await trio.sleep(0.01)
        assert [(await ep.call(m.AsysRequest(9, "SYS_HELLO"))).sw for _ in range(5)] == ["9000"] * 5
    finally:
        a.close()
        b.close()


def test_revoking_tells_every_watcher_and_records_what_was_held() -> None:
    from aaau import endpoint

    noted: list[tuple[str, dict[str, Any]]] = []

    class Audit:
        def note(self, kind: str, **fields: Any) -> None:
            noted.append((kind, fields))

    scope = asys.SessionScope("s", 1000, 1, None)
    scope.agent_grants.update({"SYS_STATUS", "PROC_THROTTLE"})
    told: list[str] = []
    scope.on_grants_changed.add(lambda: told.append("a"))
    left = endpoint.revoke(scope, ("PROC_THROTTLE", "NET_ISOLATE"), Audit())  # type: ignore[arg-type]
    assert left == {"SYS_STATUS"} and scope.agent_grants == {"SYS_STATUS"} and told == ["a"]
    ((kind, fields),) = noted
    assert kind == "asys_grant_revoked"
    assert fields["metadata"]["before"] == ["PROC_THROTTLE", "SYS_STATUS"]


async def test_a_claude_config_the_agent_planted_never_stops_its_start(tmp_path: Path) -> None:
    """The agent owns its home: a FIFO there must not hang the launcher, an odd entry
    must not crash it (it runs between fork and exec)."""
    path = tmp_path / ".claude.json"
    os.mkfifo(path)
    with trio.fail_after(5):  # would block in open() or read() on a FIFO
        outcome = await trio.to_thread.run_sync(
            agentconfig.register_claude, str(tmp_path), CMD, True, abandon_on_cancel=True
        )
    assert outcome.startswith("skipped: cannot read") and "not a regular file" in outcome
    path.unlink()
    path.write_text(json.dumps({"mcpServers": {"aaau": "not an object"}}))
    assert agentconfig.register_claude(str(tmp_path), CMD, False) == "unchanged"
    assert agentconfig.register_claude(str(tmp_path), CMD, True) == "registered"
    assert json.loads(path.read_text())["mcpServers"]["aaau"]["command"] == CMD[0]

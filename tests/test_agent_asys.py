"""The agent calls ASys itself: its session's endpoint, grants, rate, audit; real sessions.

Every agent here is a real process under a real agent user, and runs the real
``aaau`` client (``aaau asys``, ``aaau mcp``) as that user from inside its
session; other sessions' agents and people try the same endpoint and fail.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from aaau import endpoint
from aaau import messages as m

from .helpers import ADA, ALICE, BOB, GROUP, PY, Peer, ServerFactory, ServerProc, root, wait_for

pytestmark = root
AAAU = f"{shlex.quote(PY)} -m aaau"
_RESULT = re.compile(rb"@@(\w+)@@(\d+)@@(.*?)@@")


def call(tag: str, words: str, env: str = "") -> str:
    """Shell that runs ``aaau asys WORDS`` and prints ``@@TAG@@RC@@JSON@@`` on one line."""
    return (
        f"R=$({env} {AAAU} asys {words} 2>&1); C=$?; "
        f'printf "@@{tag}@@%s@@%s@@\\n" "$C" "$(printf %s "$R" | tr -d "\\n")"; '
    )


def python_script(base_dir: Path, name: str, text: str) -> str:
    """``text`` as a file the agent user can read; the shell words that run it."""
    script = base_dir / name
    script.write_text(text)
    script.chmod(0o644)
    return f"{shlex.quote(PY)} {shlex.quote(str(script))}"


async def run_agent(
    server: ServerProc, user: str, script: str, **create: Any
) -> tuple[Peer, m.Welcome]:
    return await server.create(user, ("sh", "-c", script), pipe=True, keep=True, **create)


async def results(peer: Peer, *tags: str) -> dict[str, tuple[int, Any]]:
    """``tag -> (exit status, parsed JSON or the text)`` once every tag has printed."""

    def found() -> dict[str, tuple[int, Any]] | None:
        got = {}
        for match in _RESULT.finditer(bytes(peer.output)):
            text = match.group(3).decode()
            try:
                value: Any = json.loads(text)
            except ValueError:
                value = text
            got[match.group(1).decode()] = (int(match.group(2)), value)
        return got if all(t in got for t in tags) else None

    got: dict[str, tuple[int, Any]] = await peer.until(found, timeout=30)
    return got


async def test_the_agent_calls_asys_with_its_default_grants(server: ServerProc) -> None:
    peer, welcome = await run_agent(
        server,
        ALICE,
        call("status", "SYS_STATUS")
        + call("caps", "SYS_CAPS")
        + call("throttle", "PROC_THROTTLE pid=$$ action=stop")
        + call("nope", "SYS_NOPE")
        + call("bad", "SYS_PROCS count=99")
        + "sleep 300",
    )
    got = await results(peer, "status", "caps", "throttle", "nope", "bad")
    rc, status = got["status"]
    assert rc == 0 and status["sw"] == "9000" and 0 <= status["result"]["cpu_pct"] <= 100
    rc, caps = got["caps"]
    assert caps["result"]["role"] == "agent"
    assert caps["result"]["instructions"] == [
        "SYS_CAPS",
        "SYS_HELLO",
        "SYS_STATUS",
        "SYS_PROCS",
        "TASK_QUERY",
    ]
    rc, throttle = got["throttle"]
    assert (rc, throttle["sw"]) == (1, "6982")
    assert "not granted to this session's agent" in throttle["message"]
    assert (got["nope"][0], got["nope"][1]["sw"]) == (1, "6A81")
    assert (got["bad"][0], got["bad"][1]["sw"]) == (1, "6A80")
    sid = welcome.session_id
    calls = server.records("asys_request", session_id=sid)
    assert {r["source"] for r in calls} == {"agent"}
    assert [r["content"] for r in calls][:2] == ["SYS_STATUS", "SYS_CAPS"]
    agent_user = server.agent_user(sid)
    assert {(r["user"], r["role"]) for r in calls} == {(agent_user, "agent")}
    answers = server.records("asys_result", session_id=sid, source="agent")
    assert any(r["metadata"]["sw"] == "6982" for r in answers)
    start = server.records("session_start", session_id=sid)[0]["metadata"]
    assert "AAAU_ASYS" in start["env_names"]
    assert start["agent_grants"] == sorted(caps["result"]["instructions"])


async def test_the_endpoint_is_the_sessions_alone(server: ServerProc) -> None:
    """A person cannot connect; another session of the same member (same agent user) is
    refused by the process check; the endpoint goes with its session."""
    peer_a, a = await run_agent(server, ALICE, "echo READY; sleep 300")
    await peer_a.expect_output(b"READY")
    path = os.path.join(_endpoint_dir(server), a.session_id)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o711
    with pytest.raises(ConnectionRefusedError, match="Permission denied"):
        await _connect_as(BOB, path)
    peer_b, b = await run_agent(
        server, ALICE, call("stolen", "SYS_STATUS", env=f"AAAU_ASYS={path}") + "sleep 300"
    )
    assert server.agent_user(a.session_id) == server.agent_user(b.session_id)
    rc, text = (await results(peer_b, "stolen"))["stolen"]
    assert rc == 255 and f"is not part of session {a.session_id}" in text
    refused = server.records("asys_endpoint_refused", session_id=a.session_id)
    assert refused and "not part of session" in refused[0]["content"]
    await peer_a.send(m.ForceKill())
    await peer_a.expect(m.Exited, timeout=20)
    await wait_for(lambda: not os.path.exists(path), what="endpoint removed at session end")


async def test_grants_are_chosen_at_create_and_bounded_by_the_server(
    start_server: ServerFactory,
) -> None:
    server = await start_server("--agent-grant", f"PROC_THROTTLE={GROUP}")
    bob = await server.peer(
        BOB,
        m.Create(m.PROTOCOL_VERSION, 24, 80, "xterm", ("true",), grants=("NET_ISOLATE",)),
    )
    error = await bob.expect(m.Error)
    assert error.code == "forbidden" and "may not grant NET_ISOLATE" in error.message
    unknown = await server.peer(
        BOB, m.Create(m.PROTOCOL_VERSION, 24, 80, "xterm", ("true",), grants=("SYS_NOPE",))
    )
    assert "no such ASys instruction: SYS_NOPE" in (await unknown.expect(m.Error)).message
    # a member of the group may grant PROC_THROTTLE; it works on the agent's own child
    # and is refused on another session's process
    other, _ = await run_agent(server, BOB, "sleep 300 & echo OTHER=$!; wait")
    other_pid = int((await other.until(lambda: re.search(rb"OTHER=(\d+)", other.output)))[1])
    peer, welcome = await run_agent(
        server,
        BOB,
        "sleep 300 & "
        + call("mine", "PROC_THROTTLE pid=$! action=stop")
        + call("theirs", f"PROC_THROTTLE pid={other_pid} action=stop")
        + call("status", "SYS_STATUS")
        + "wait",
        grants=("PROC_THROTTLE", "SYS_CAPS"),
    )
    got = await results(peer, "mine", "theirs", "status")
    assert got["mine"][0] == 0 and got["mine"][1]["result"]["state"] in ("T", "t")
    assert got["theirs"][1]["sw"] == "6982"
    assert "not part of this session" in got["theirs"][1]["message"]
    assert got["status"][1]["sw"] == "6982"  # not in this session's grants
    status = await server.peer(BOB, m.QueryStatus(m.PROTOCOL_VERSION, welcome.session_id))
    info = (await status.expect(m.Status)).session
    assert info.agent_grants == ("PROC_THROTTLE", "SYS_CAPS")


async def _connect_as(user: str, path: str) -> None:
    from .helpers import connect_as

    stream = await connect_as(user, path)
    await stream.aclose()


def _endpoint_dir(server: ServerProc) -> str:
    return str(server.socket.parent) + "-asys"


_MCP_CLIENT = """
import json, os, sys
import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

async def main():
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "aaau", "mcp"], env=dict(os.environ)
    )
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            procs = await session.call_tool("SYS_PROCS", {"count": 3})
            denied = await session.call_tool("PROC_THROTTLE", {"pid": 2, "action": "stop"})
            out = {
                "tools": {t.name: t.input_schema for t in tools},
                "procs": procs.structured_content,
                "procs_error": procs.is_error,
                "denied": denied.structured_content,
                "denied_error": denied.is_error,
            }
    print("@@mcp@@0@@" + json.dumps(out) + "@@", flush=True)

anyio.run(main)
"""


async def test_an_mcp_client_lists_the_tools_and_calls_them(
    server: ServerProc, base_dir: Path
) -> None:
    script = python_script(base_dir, "mcp_client.py", _MCP_CLIENT)
    peer, welcome = await run_agent(
        server, ALICE, f"{script}; sleep 300", grants=("SYS_PROCS", "SYS_CAPS")
    )
    rc, out = (await results(peer, "mcp"))["mcp"]
    assert sorted(out["tools"]) == ["SYS_CAPS", "SYS_PROCS"]
    assert out["tools"]["SYS_PROCS"]["properties"]["count"]["type"] == "integer"
    assert out["tools"]["SYS_PROCS"]["additionalProperties"] is False
    assert out["procs_error"] is False and out["procs"]["sw"] == "9000"
    assert len(out["procs"]["result"]["procs"]) == 3
    assert out["denied_error"] is True and out["denied"]["sw"] == "6982"
    sid = welcome.session_id
    assert server.records("mcp_open", session_id=sid, source="agent")
    calls = server.records("asys_request", session_id=sid, source="agent")
    assert [r["content"] for r in calls] == ["SYS_PROCS", "PROC_THROTTLE"]


async def test_an_admin_or_the_creator_revokes_a_grant_live(server: ServerProc) -> None:
    peer, welcome = await run_agent(
        server,
        ALICE,
        call("before", "SYS_STATUS") + "read go; " + call("after", "SYS_STATUS") + "sleep 300",
    )
    assert (await results(peer, "before"))["before"][1]["sw"] == "9000"
    sid = welcome.session_id
    bob = await server.peer(BOB, m.Revoke(m.PROTOCOL_VERSION, sid, ("SYS_STATUS",)))
    assert (await bob.expect(m.Error)).code == "forbidden"
    from .helpers import run_cli

    done = await run_cli(ALICE, ["revoke", sid, "sys_status,SYS_HELLO"], server.socket)
    assert done.returncode == 0, done.stderr
    assert b"revoked SYS_STATUS, SYS_HELLO" in done.stdout
    status = await run_cli(ALICE, ["status", sid], server.socket)
    assert json.loads(status.stdout)["agent_grants"] == ["SYS_CAPS", "SYS_PROCS", "TASK_QUERY"]
    await peer.type(b"go\n")
    rc, after = (await results(peer, "after"))["after"]
    assert (rc, after["sw"]) == (1, "6982")
    revoked = server.records("asys_grant_revoked", session_id=sid)
    assert revoked[0]["user"] == ALICE and revoked[0]["metadata"]["instructions"] == [
        "SYS_STATUS",
        "SYS_HELLO",
    ]


async def test_a_session_s_calls_are_rate_limited(start_server: ServerFactory) -> None:
    server = await start_server("--agent-asys-rate", "0.2", "--agent-asys-burst", "2")
    script = "".join(call(f"c{i}", "SYS_HELLO") for i in range(5)) + "sleep 300"
    peer, welcome = await run_agent(server, ALICE, script)
    got = await results(peer, *(f"c{i}" for i in range(5)))
    words = [got[f"c{i}"][1]["sw"] for i in range(5)]
    assert words[:2] == ["9000", "9000"] and words.count("6400") >= 2, words
    limited = next(got[f"c{i}"][1] for i in range(5) if got[f"c{i}"][1]["sw"] == "6400")
    assert "rate limit" in limited["message"] and "back off" in limited["message"]
    noted = server.records("asys_rate_limited", session_id=welcome.session_id)
    started = [r for r in noted if r["metadata"]["state"] == "start"]
    assert len(started) == 1 and started[0]["source"] == "agent"  # said once, not per call


_RAW_CLIENT = """
import json, os
from aaau import oneshot
link = oneshot.Link(oneshot.connect(os.environ["AAAU_ASYS"], 10))
replies = []
for frame in (
    oneshot.data_frame(b"not for you"),
    oneshot.frame({"type": "join", "version": 2, "session_id": "x", "role": None}),
    bytes([1, 0, 0, 0, 3]) + b"{x}",
    oneshot.frame({"type": "asys_request", "request_id": 5, "instruction": "SYS_HELLO"}),
    bytes([1, 0x7F, 0, 0, 0]),
):
    link.send(frame)
    replies.append(link.control())
print("@@raw@@0@@" + json.dumps(replies) + "@@", flush=True)
"""


async def test_bad_input_on_the_endpoint_gets_clear_errors(
    server: ServerProc, base_dir: Path
) -> None:
    script = python_script(base_dir, "raw_client.py", _RAW_CLIENT)
    peer, welcome = await run_agent(
        server, ALICE, f"{script}; " + call("after", "SYS_HELLO") + "sleep 300"
    )
    got = await results(peer, "raw", "after")
    data, join, junk, hello, huge = got["raw"][1]
    assert data["code"] == "bad-message" and "needs mcp_open" in data["message"]
    assert join["code"] == "forbidden" and "cannot join, create or kill" in join["message"]
    assert junk["code"] == "bad-message" and "not UTF-8 JSON" in junk["message"]
    assert hello["type"] == "asys_result" and hello["sw"] == "9000"
    assert huge["code"] == "too-large"
    assert got["after"][1]["sw"] == "9000"  # the endpoint, the session and the server go on
    errors = server.records("protocol_error", session_id=welcome.session_id)
    assert len(errors) >= 3


async def test_the_agent_may_isolate_but_never_restore(server: ServerProc) -> None:
    peer, welcome = await run_agent(
        server,
        ADA,
        call("isolate", "NET_ISOLATE action=isolate")
        + call("restore", "NET_ISOLATE action=restore")
        + "sleep 300",
        grants=("NET_ISOLATE",),
    )
    got = await results(peer, "isolate", "restore")
    assert got["isolate"][1]["sw"] in ("9000", "6D00")  # 6D00: no nft on this machine
    rc, restore = got["restore"]
    assert (rc, restore["sw"]) == (1, "6982") and "never lift it" in restore["message"]


async def test_claude_lists_the_aaau_mcp_server_as_connected(server: ServerProc) -> None:
    """The real claude CLI (npm @anthropic-ai/claude-code), run by the launcher with the
    session's MCP server registered in the agent's ~/.claude.json; --no-mcp takes it out."""
    assert shutil.which("claude"), "the test command installs claude (npm)"
    peer, welcome = await server.create(
        ALICE, ("claude", "mcp", "list"), pipe=True, keep=True, mcp=True
    )
    await peer.until(lambda: re.search(rb"aaau: .*Connected", peer.output), timeout=60)
    exited = await peer.expect(m.Exited, timeout=60)
    assert exited.code == 0
    start = server.records("session_start", session_id=welcome.session_id)[0]["metadata"]
    assert start["sandbox"]["mcp"] == "registered"
    home = Path(pwd.getpwnam(server.agent_user(welcome.session_id)).pw_dir)
    entry = json.loads((home / ".claude.json").read_text())["mcpServers"]["aaau"]
    assert entry["args"][-1] == "mcp" and "AAAU_ASYS" not in json.dumps(entry)
    off, welcome = await server.create(
        ALICE, ("claude", "mcp", "list"), pipe=True, keep=True, mcp=False
    )
    await off.expect(m.Exited, timeout=60)
    assert b"aaau:" not in off.output
    assert "aaau" not in json.loads((home / ".claude.json").read_text()).get("mcpServers", {})


async def test_codex_gets_the_aaau_mcp_server_for_its_run(server: ServerProc) -> None:
    """codex passes MCP servers only some of its environment: the server and the
    endpoint come as -c options of this run (codex's own view: codex mcp list)."""
    assert shutil.which("codex"), "the test command installs codex (npm)"
    peer, welcome = await server.create(
        ALICE, ("codex", "mcp", "list", "--json"), pipe=True, keep=True, mcp=True
    )
    exited = await peer.expect(m.Exited, timeout=60)
    assert exited.code == 0, bytes(peer.output[-2000:])
    listed = json.loads(peer.output[peer.output.index(b"[") :])
    (aaau,) = [s for s in listed if s["name"] == "aaau"]
    endpoint = os.path.join(_endpoint_dir(server), welcome.session_id)
    assert aaau["transport"]["args"] == ["mcp"]
    assert aaau["transport"]["env"] == {"AAAU_ASYS": endpoint}
    start = server.records("session_start", session_id=welcome.session_id)[0]["metadata"]
    assert start["argv"][1:3] == [
        "-c",
        f'mcp_servers.aaau.command="{aaau["transport"]["command"]}"',
    ]


def test_the_endpoints_directory_is_made_safe(tmp_path: Path) -> None:
    """Root's, 0711, emptied of a killed server's sockets; a symlink or someone else's
    directory in its place, or below someone else's directory, is refused, never followed
    or adopted."""
    where = tmp_path / "run-asys"
    where.mkdir(mode=0o777)
    (where / "stale-session").write_text("left by kill -9")
    endpoint.prepare_dir(str(where))
    assert list(where.iterdir()) == [] and stat.S_IMODE(where.stat().st_mode) == 0o711
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("x")
    link = tmp_path / "link-asys"
    link.symlink_to(target)
    with pytest.raises(OSError, match="not a directory of root's"):
        endpoint.prepare_dir(str(link))
    assert (target / "precious").exists()
    os.chown(target, 65534, 65534)
    with pytest.raises(OSError, match="not a directory of root's"):
        endpoint.prepare_dir(str(target))
    assert (target / "precious").exists()
    # a parent someone else owns could swap the directory under root: refused too
    with pytest.raises(OSError, match="owned by uid 65534, not root"):
        endpoint.prepare_dir(str(target / "asys"))
    assert not (target / "asys").exists()


_HOARDER = """
import json, os
from aaau import oneshot
hello = oneshot.frame({"type": "asys_request", "request_id": 1, "instruction": "SYS_HELLO"})
held = []
for _ in range(8):  # each served (one call answered) and kept open
    link = oneshot.Link(oneshot.connect(os.environ["AAAU_ASYS"], 10))
    link.send(hello)
    held.append((link, link.control()["sw"]))
extra = oneshot.Link(oneshot.connect(os.environ["AAAU_ASYS"], 10))
refused = extra.control()
for link, _ in held:
    link.sock.close()
print("@@hoard@@0@@" + json.dumps([[sw for _, sw in held], refused]) + "@@", flush=True)
"""


async def test_an_agent_cannot_hoard_its_endpoint(server: ServerProc, base_dir: Path) -> None:
    """agent_endpoint_connections (8) at once; the next is refused and said so; once the
    agent lets go, its endpoint serves it again."""
    script = python_script(base_dir, "hoarder.py", _HOARDER)
    peer, welcome = await run_agent(
        server, ALICE, f"{script}; " + call("after", "SYS_HELLO") + "sleep 300"
    )
    got = await results(peer, "hoard", "after")
    answered, refused = got["hoard"][1]
    assert answered == ["9000"] * 8
    assert refused["code"] == "refused" and "already serves 8 connections" in refused["message"]
    assert got["after"][1]["sw"] == "9000"
    assert server.records("asys_endpoint_refused", session_id=welcome.session_id)


_FLOODER = """
import json, os
from aaau import oneshot
link = oneshot.Link(oneshot.connect(os.environ["AAAU_ASYS"], 10))
codes = []
for _ in range(200):
    link.send(bytes([1, 0, 0, 0, 3]) + b"{x}")
    codes.append(link.control()["code"])
link.send(oneshot.frame({"type": "mcp_open", "version": 2}))
late = link.control()
print("@@flood@@0@@" + json.dumps([codes.count("bad-message"), late]) + "@@", flush=True)
"""


async def test_a_flood_of_bad_frames_is_answered_but_not_all_recorded(
    server: ServerProc, base_dir: Path
) -> None:
    script = python_script(base_dir, "flooder.py", _FLOODER)
    peer, welcome = await run_agent(server, ALICE, f"{script}; sleep 300")
    answered, late = (await results(peer, "flood"))["flood"][1]
    assert answered == 200  # every one told why
    assert late["code"] == "forbidden" and "first frame" in late["message"]
    recorded = server.records("protocol_error", session_id=welcome.session_id)
    assert 20 <= len(recorded) < 60  # the burst, then about 5 a second: the log is safe


async def test_endpoints_under_a_private_tmp_are_refused_at_start(
    start_server: ServerFactory,
) -> None:
    """Every agent has a /tmp of its own: an endpoint there would be out of its sight."""
    srv = await start_server("--asys-dir", "/tmp/aaut-endpoints", expect_ready=False)
    assert await srv.process.wait() == 1
    stderr = (srv.log_dir / "server.stderr").read_text()
    assert "each agent has a /tmp of its own (private_tmp): set asys_dir" in stderr
    assert not os.path.exists("/tmp/aaut-endpoints")

"""ASys over real sessions: the conformance cases that still apply, as JSON, plus our holes closed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from aaau import messages as m

from .helpers import (
    ADA,
    ALICE,
    BOB,
    GROUP,
    Peer,
    ServerFactory,
    ServerProc,
    account,
    root,
    run_cli,
    wait_for,
)

pytestmark = root
V = m.PROTOCOL_VERSION
_ids = iter(range(1, 10**9))


async def ask(peer: Peer, instruction: str, **args: Any) -> m.AsysResult:
    rid = next(_ids)
    await peer.send(m.AsysRequest(rid, instruction, args))
    result: m.AsysResult = await peer.until(
        lambda: next(
            (c for c in peer.controls if isinstance(c, m.AsysResult) and c.request_id == rid), None
        ),
        timeout=20,
    )
    peer.controls.remove(result)
    return result


async def cli_asys(user: str, sock: Path, *words: str) -> tuple[int, dict[str, Any]]:
    result = await run_cli(user, ["asys", *words], sock)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


async def _agent_child(peer: Peer, marker: bytes) -> int:
    """The pid an agent script printed as ``<marker>=PID``."""
    await peer.until(lambda: re.search(marker + rb"=(\d+)\r\n", peer.output))
    match = re.search(marker + rb"=(\d+)\r\n", peer.output)
    assert match is not None
    return int(match.group(1))


# --- Core ISA -----------------------------------------------------------------------------------


async def test_read_only_instructions_outside_a_session(server: ServerProc) -> None:
    rc, caps = await cli_asys(ALICE, server.socket, "SYS_CAPS")
    assert (rc, caps["sw"], caps["status"]) == (0, "9000", "ok")
    assert caps["result"]["role"] == "readonly"
    assert caps["result"]["instructions"] == ["SYS_CAPS", "SYS_HELLO", "SYS_STATUS", "SYS_PROCS"]
    rc, hello = await cli_asys(ALICE, server.socket, "sys_hello")
    assert rc == 0 and abs(hello["result"]["server_time_ns"] - time.time_ns()) < 60e9
    rc, status = await cli_asys(ALICE, server.socket, "SYS_STATUS")
    res = status["result"]
    assert rc == 0 and 0 <= res["cpu_pct"] <= 100 and 0 <= res["rpi"] <= 100
    assert 500 <= res["cpu_window_ms"] <= 3000
    assert time.time_ns() - res["sampled_at_ns"] < 3e9  # served from the shared 1 s sampler
    rc, procs = await cli_asys(ALICE, server.socket, "SYS_PROCS", "count=50")
    assert rc == 0 and procs["result"]["total_procs"] > 0
    assert 1 <= len(procs["result"]["procs"]) <= 50
    rc, bad = await cli_asys(ALICE, server.socket, "SYS_PROCS", "count=51")
    assert (rc, bad["sw"]) == (1, "6A80")
    rc, nope = await cli_asys(ALICE, server.socket, "SYS_NOPE")
    assert (rc, nope["sw"], nope["result"]) == (1, "6A81", None)
    rc, outside = await cli_asys(ADA, server.socket, "PROC_THROTTLE", "pid=2", "action=stop")
    assert (rc, outside["sw"]) == (1, "6A81") and "-n SESSION_ID" in outside["message"]
    records = server.records("asys_request", user=ALICE)
    assert [r["content"] for r in records][:2] == ["SYS_CAPS", "SYS_HELLO"]
    assert server.records("asys_result", user=ALICE)[0]["metadata"]["sw"] == "9000"


async def test_many_clients_share_the_status_sampler(server: ServerProc) -> None:
    """TC-SIM-001: 4 concurrent clients x 5 SYS_STATUS, all 9000."""
    peers = [
        await server.peer(u, m.Create(V, rows=24, cols=80, term="xterm", argv=("cat",)))
        for u in (ALICE, BOB, ADA, "root")
    ]
    results: list[m.AsysResult] = []

    async def poll(peer: Peer) -> None:
        await peer.expect(m.Welcome)
        for _ in range(5):
            results.append(await ask(peer, "SYS_STATUS"))

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(poll, peer)
    assert len(results) == 20 and {r.sw for r in results} == {"9000"}


async def _procs_row(peer: Peer, pid: int) -> dict[str, Any] | None:
    """The pid's row among the top 50 by CPU (None: it is not among them)."""
    result = await ask(peer, "SYS_PROCS", count=50)
    assert result.sw == "9000" and result.result is not None
    return next((p for p in result.result["procs"] if p["pid"] == pid), None)


async def _procs_until(peer: Peer, pid: int, predicate: Any, timeout: float = 10) -> None:
    """Ask SYS_PROCS until ``predicate(row)`` holds for the pid (fail after ``timeout``)."""
    with trio.fail_after(timeout):
        while not predicate(await _procs_row(peer, pid)):
            await trio.sleep(0.1)


async def test_ooda_loop_find_the_hog_stop_it_resume_it(server: ServerProc) -> None:
    """TC-E2E-006: SYS_PROCS finds the hog, STOP -> its CPU drops, CONT -> it recovers."""
    alice, welcome = await server.create(ALICE, ("sh", "-c", "echo busy=$$; while :; do :; done"))
    pid = await _agent_child(alice, b"busy")
    result = await ask(alice, "SYS_PROCS", count=5)
    assert result.sw == "9000"
    assert result.result is not None
    top = result.result["procs"][0]
    assert top["pid"] == pid and top["this_session"] and top["cpu_pct"] > 30
    assert top["uid"] == account(server.agent_user(welcome.session_id))[0]
    ada, _ = await server.join(ADA, welcome.session_id)
    assert (await ask(ada, "PROC_THROTTLE", pid=pid, action="stop")).sw == "9000"
    assert _state(pid) == "T"
    # samples are shared for a second: ask until one taken after the signal says so
    await _procs_until(ada, pid, lambda row: row is None or (row["stopped"] and row["cpu_pct"] < 5))
    assert (await ask(ada, "PROC_THROTTLE", pid=pid, action="cont")).sw == "9000"
    await _procs_until(
        ada, pid, lambda row: row is not None and not row["stopped"] and row["cpu_pct"] > 30
    )


# --- PROC_THROTTLE ------------------------------------------------------------------------------


async def test_throttle_stops_and_continues_only_this_sessions_agent(
    server: ServerProc,
) -> None:
    alice, welcome = await server.create(
        ALICE, ("sh", "-c", "sleep 300 & echo child=$!; read x; exit 0")
    )
    child = await _agent_child(alice, b"child")
    ada, _ = await server.join(ADA, welcome.session_id)
    bob, _ = await server.join(BOB, welcome.session_id)

    denied = await ask(bob, "PROC_THROTTLE", pid=child, action="stop")  # ReadOnly
    assert denied.sw == "6982" and _state(child) == "S"
    denied = await ask(alice, "PROC_THROTTLE", pid=child, action="stop")  # not granted
    assert denied.sw == "6982"

    stopped = await ask(ada, "PROC_THROTTLE", pid=child, action="stop")
    assert stopped.sw == "9000" and stopped.result == {"pid": child, "action": "stop", "state": "T"}
    assert _state(child) == "T"  # (how SYS_PROCS shows a stopped process: test_asys_units)
    resumed = await ask(ada, "PROC_THROTTLE", pid=child, action="cont")
    assert resumed.sw == "9000" and _state(child) in ("S", "R")

    # refused targets: pid 1, the server, another user's process, pid -1 and 0, out of range
    other = subprocess.Popen(["sleep", "60"])  # root's, outside the session
    try:
        for pid, sw in (
            (1, "6A80"),
            (server.process.pid, "6982"),
            (other.pid, "6982"),
            (-1, "6A80"),
            (0, "6A80"),
            (2**32 - 1, "6A80"),
        ):
            result = await ask(ada, "PROC_THROTTLE", pid=pid, action="stop")
            assert result.sw == sw, (pid, result)
        assert _state(other.pid) == "S" and _state(server.process.pid) in ("S", "R")
    finally:
        other.kill()
        other.wait()

    # stop it again, end the session: it is resumed, then ended with the session
    await ask(ada, "PROC_THROTTLE", pid=child, action="stop")
    assert _state(child) == "T"
    await alice.type(b"bye\n")
    await alice.expect(m.Exited)
    await wait_for(lambda: _state(child) == "gone")
    kinds = [
        r["metadata"]["sw"]
        for r in server.records("asys_result")
        if r["content"].startswith("PROC_THROTTLE")
    ]
    assert kinds.count("9000") == 3


async def test_throttle_refuses_another_sessions_agent(server: ServerProc) -> None:
    alice, _ = await server.create(ALICE, ("sh", "-c", "echo mine=$$; exec sleep 300"))
    theirs = await _agent_child(alice, b"mine")
    # another member's session: another agent user
    bob, bobs = await server.create(BOB, ("cat",))
    ada_in_bobs, _ = await server.join(ADA, bobs.session_id)
    result = await ask(ada_in_bobs, "PROC_THROTTLE", pid=theirs, action="stop")
    assert result.sw == "6982" and "not to this session's agent user" in result.message
    # the same member's other session: the same agent user, still not this session's
    again, alices_second = await server.create(ALICE, ("cat",))
    ada_in_second, _ = await server.join(ADA, alices_second.session_id)
    result = await ask(ada_in_second, "PROC_THROTTLE", pid=theirs, action="stop")
    assert result.sw == "6982" and "not part of this session" in result.message
    assert _state(theirs) == "S"




async def test_granted_group_may_throttle(start_server: ServerFactory, base_dir: Path) -> None:
    config = base_dir / "grant.toml"
    config.write_text(f'[asys_grants]\nPROC_THROTTLE = ["{GROUP}"]\n')
    server = await start_server("--config", str(config))
    alice, welcome = await server.create(ALICE, ("sh", "-c", "echo me=$$; exec sleep 300"))
    pid = await _agent_child(alice, b"me")
    result = await ask(alice, "PROC_THROTTLE", pid=pid, action="stop")
    assert result.sw == "9000" and _state(pid) == "T"
    caps = await ask(alice, "SYS_CAPS")
    assert caps.result is not None and "PROC_THROTTLE" in caps.result["instructions"]
    assert "SVC_RESTART" not in caps.result["instructions"]
    bob, _ = await server.join(BOB, welcome.session_id)  # ReadOnly: the grant needs Interactive
    assert (await ask(bob, "PROC_THROTTLE", pid=pid, action="cont")).sw == "6982"


# --- SVC_RESTART and TASK_QUERY ------------------------------------------------------------------


STUB = """#!/bin/sh
echo "$@" >> {log}
case "$3" in
  okay.service) exit 0 ;;
  broken.service) echo "unit broken.service failed" >&2; exit 3 ;;
  slow.service) exec sleep 30 ;;
esac
exit 1
"""


@pytest.fixture
async def svc_server(start_server: ServerFactory, base_dir: Path) -> tuple[ServerProc, Path]:
    stub_dir = base_dir / f"stub-{next(_ids)}"
    stub_dir.mkdir()
    log = stub_dir / "calls.log"
    (stub_dir / "systemctl").write_text(STUB.format(log=log))
    (stub_dir / "systemctl").chmod(0o755)
    config = stub_dir / "aaau.toml"
    config.write_text(
        'svc_allowlist = ["okay", "broken", "slow"]\nsvc_timeout = 1.0\ntask_quota = 3\n'
    )
    env = {"PATH": f"{stub_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}
    return await start_server("--config", str(config), env=env), log


async def _until_done(peer: Peer, handle: str) -> dict[str, Any]:
    with trio.fail_after(15):
        while True:
            result = await ask(peer, "TASK_QUERY", handle=handle)
            assert result.sw == "9000" and result.result is not None
            if result.result["state"] != "pending":
                return result.result
            await trio.sleep(0.05)


async def test_svc_restart_success_failure_timeout(svc_server: tuple[ServerProc, Path]) -> None:
    server, log = svc_server
    alice, welcome = await server.create(ALICE, ("cat",))
    ada, _ = await server.join(ADA, welcome.session_id)
    ok = await ask(ada, "SVC_RESTART", service="okay")
    assert ok.sw == "9000" and ok.result is not None and ok.result["state"] == "pending"
    done = await _until_done(ada, ok.result["handle"])
    assert (done["state"], done["exit_code"]) == ("success", 0)
    assert log.read_text().splitlines()[0] == "restart -- okay.service"

    broken = await ask(ada, "SVC_RESTART", service="broken")
    assert broken.result is not None
    done = await _until_done(ada, broken.result["handle"])
    assert (done["state"], done["exit_code"]) == ("failed", 3)
    assert "broken.service failed" in done["stderr"]

    slow = await ask(ada, "SVC_RESTART", service="slow")
    again = await ask(ada, "SVC_RESTART", service="slow")  # TC-SVC-009
    assert slow.result is not None and again.result is not None
    assert again.result["handle"] == slow.result["handle"] and again.result["deduplicated"]
    over = await ask(ada, "SVC_RESTART", service="okay")  # 3 tasks held: quota
    assert over.sw == "6400"
    done = await _until_done(ada, slow.result["handle"])
    assert done["state"] == "timeout"
    await wait_for(  # the whole line: other tests' "sleep 300" must not count
        lambda: "sleep 30"
        not in [
            line.strip()
            for line in subprocess.run(
                ["ps", "-eo", "args"], capture_output=True, text=True
            ).stdout.splitlines()
        ]
    )
    assert len(server.records("asys_task_done")) == 3


async def test_concurrent_restarts_get_distinct_handles(
    svc_server: tuple[ServerProc, Path],
) -> None:
    """TC-SIM-003, TC-POOL-004/005: different services and different sessions never share."""
    server, _ = svc_server
    alice, one = await server.create(ALICE, ("cat",))
    bob, two = await server.create(BOB, ("cat",))
    ada1, _ = await server.join(ADA, one.session_id)
    ada2, _ = await server.join(ADA, two.session_id)
    answers = [await ask(ada1, "SVC_RESTART", service=name) for name in ("okay", "broken", "slow")]
    other = await ask(ada2, "SVC_RESTART", service="slow")
    handles = [a.result["handle"] for a in [*answers, other] if a.result is not None]
    assert len(set(handles)) == 4
    assert other.result is not None and not other.result["deduplicated"]
    states = {(await _until_done(ada1, h))["state"] for h in handles[:3]}
    assert states == {"success", "failed", "timeout"}


async def test_svc_restart_refusals(svc_server: tuple[ServerProc, Path]) -> None:
    server, log = svc_server
    alice, welcome = await server.create(ALICE, ("cat",))
    ada, _ = await server.join(ADA, welcome.session_id)
    bob, _ = await server.join(BOB, welcome.session_id)
    cases = [
        (ada, {"service": "other"}, "6982", "not in the server's svc_allowlist"),
        (ada, {"service": "-h"}, "6A80", "invalid service name"),
        (ada, {"service": "okay.service"}, "6A80", "invalid service name"),
        (ada, {"service": "Okay"}, "6A80", "invalid service name"),
        (ada, {}, "6700", "service"),
        (bob, {"service": "okay"}, "6982", "readonly"),
        (alice, {"service": "okay"}, "6982", "interactive"),
    ]
    for peer, args, sw, text in cases:
        result = await ask(peer, "SVC_RESTART", **args)
        assert (result.sw, text in result.message) == (sw, True), (args, result)
    assert not log.exists()  # the stub never ran


async def test_svc_restart_is_refused_with_the_default_empty_allowlist(
    server: ServerProc,
) -> None:
    alice, welcome = await server.create(ALICE, ("cat",))
    ada, _ = await server.join(ADA, welcome.session_id)
    result = await ask(ada, "SVC_RESTART", service="nginx")
    assert result.sw == "6982" and "svc_allowlist is empty" in result.message


async def test_task_handles_belong_to_their_session(svc_server: tuple[ServerProc, Path]) -> None:
    """TC-QUERY-002/003, TC-SIM-002, TC-E2E-005."""
    server, _ = svc_server
    alice, one = await server.create(ALICE, ("cat",))
    bob, two = await server.create(BOB, ("cat",))
    ada1, _ = await server.join(ADA, one.session_id)
    ada2, _ = await server.join(ADA, two.session_id)
    task = await ask(ada1, "SVC_RESTART", service="okay")
    assert task.result is not None
    handle = task.result["handle"]
    assert len(handle) >= 16
    elsewhere = await ask(ada2, "TASK_QUERY", handle=handle)
    never = await ask(ada1, "TASK_QUERY", handle="never-existed")
    assert (
        elsewhere.result
        == never.result | {"handle": handle}
        == {"handle": handle, "state": "unknown"}
    )
    owner = await _until_done(ada1, handle)
    assert owner["state"] == "success"
    assert (await ask(alice, "TASK_QUERY", handle=handle)).result["state"] == "success"  # type: ignore[index]


# --- NET_ISOLATE -----------------------------------------------------------------------------------


def _isolate_chain() -> str:
    return subprocess.run(
        ["nft", "list", "chain", "inet", "aaau", "isolate"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _global_ipv4() -> str | None:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else None


async def test_net_isolate_cuts_all_but_loopback_for_this_session_only(
    server: ServerProc,
) -> None:
    if shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
        pytest.skip("nftables (nft) is not installed; the README's test command installs it")
    alice, welcome = await server.create(ALICE, ("bash", "--norc", "-i"))
    ada, _ = await server.join(ADA, welcome.session_id)
    own_ip = _global_ipv4()
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))  # local only: both targets are this machine's addresses
    listener.listen(16)
    port = listener.getsockname()[1]
    other, _ = await server.create(BOB, ("bash", "--norc", "-i"))
    n = iter(range(100))

    async def probe(peer: Peer, host: str) -> bool:
        tag = f"P{next(n)}"
        await peer.type(
            f"(exec 3<>/dev/tcp/{host}/{port}) 2>/dev/null && echo {tag}-OK "
            f"|| echo {tag}-NO\n".encode()
        )
        answer = re.compile(rf"[\r\n]{tag}-(OK|NO)\r\n".encode())
        match = await peer.until(lambda: answer.search(peer.output))
        return bool(match.group(1) == b"OK")

    try:
        if own_ip:
            assert await probe(alice, own_ip)
        result = await ask(ada, "NET_ISOLATE", action="isolate")
        assert result.sw == "9000", result.message
        assert result.result is not None and result.result["isolated"]
        assert await probe(alice, "127.0.0.1")  # loopback stays
        if own_ip:
            assert not await probe(alice, own_ip)  # anything else is cut
            assert await probe(other, own_ip)  # another session of the same agent user is not
        ruleset = _isolate_chain()
        assert f"aaau:{welcome.session_id}" in ruleset
        result = await ask(ada, "NET_ISOLATE", action="restore")
        assert result.sw == "9000" and result.result is not None
        assert not result.result["isolated"]
        if own_ip:
            assert await probe(alice, own_ip)
        # isolation ends with the session too
        await ask(ada, "NET_ISOLATE", action="isolate")
        await alice.type(b"exit\n")
        await alice.expect(m.Exited)
        ruleset = _isolate_chain()
        assert welcome.session_id not in ruleset
    finally:
        listener.close()
    denied = await ask(other, "NET_ISOLATE")  # bob is Interactive there, not granted
    assert denied.sw == "6982"


async def test_asys_cli_inside_a_session(server: ServerProc) -> None:
    alice, welcome = await server.create(ALICE, ("cat",))
    rc, caps = await cli_asys(BOB, server.socket, "-n", welcome.session_id, "SYS_CAPS")
    assert rc == 0 and caps["result"]["role"] == "readonly"
    assert "TASK_QUERY" in caps["result"]["instructions"]
    rc, denied = await cli_asys(
        BOB, server.socket, "-n", welcome.session_id, "PROC_THROTTLE", "pid=2", "action=stop"
    )
    assert (rc, denied["sw"]) == (1, "6982")
    bad = await run_cli(BOB, ["asys", "-n", "no-such-session", "SYS_CAPS"], server.socket)
    assert bad.returncode == 255 and b"no session" in bad.stderr


async def test_procs_sees_past_512_processes(server: ServerProc) -> None:
    """asyd recorded only the first 512 pids: a hog above them was invisible."""
    sleepers = subprocess.Popen(
        ["sh", "-c", "for i in $(seq 600); do sleep 60 & done; wait"], start_new_session=True
    )
    hog = None
    try:
        await wait_for(lambda: len(os.listdir("/proc")) > 650, timeout=30)
        hog = subprocess.Popen(["sh", "-c", "while :; do :; done"])
        peer = await server.peer(ALICE, m.AsysCall(V, 1, "SYS_PROCS", {"count": 3}))
        result = await peer.expect(m.AsysResult, timeout=20)
        assert result.sw == "9000" and result.result is not None
        assert result.result["total_procs"] > 600
        assert hog.pid in [p["pid"] for p in result.result["procs"]]
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        os.killpg(sleepers.pid, 9)
        sleepers.wait()

"""``aaau log`` on recordings made by real sessions (in-process server, real PTYs).

The sessions: alice runs a shell and types, keystroke by keystroke as a
terminal sends them, a line with a typo she erases; bob's agent prints a
secret cut across two writes and in colour; ada joins bob's session. Then
every subcommand reads what the server wrote.
"""

from __future__ import annotations

import gzip
import json
import mmap
import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from aaau import casts, chain, logcli, logfiles, logview, replay
from aaau import messages as m
from aaau.audit import AuditLog, encode_bytes
from aaau.logfiles import Entry

from .helpers import wait_for
from .inprocess import InProcess, open_in_process


async def _record_sessions(ip: InProcess) -> dict[str, str]:
    alice, welcome = await ip.create("alice", ("sh",))
    for key in b"echo hello-wrold\x7f\x7f\x7f\x7forld\r":  # one record a key, a typo erased
        await alice.type(bytes([key]))
    await alice.expect_output(b"hello-world\r\n")
    await alice.send(m.Resize(30, 100))
    for key in b"exit 3\r":
        await alice.type(bytes([key]))
    await alice.expect(m.Exited)

    script = "read go; printf 'top-s3'; sleep 0.2; printf '\\033[31mcret-word\\033[0m\\n'; exec cat"
    bob, welcome_b = await ip.create("bob", ("sh", "-c", script))
    ada, _ = await ip.join("ada", welcome_b.session_id)
    await bob.type(b"go\n")
    await ada.expect_output(b"cret-word")
    await bob.send(m.ForceKill())
    await bob.expect(m.Exited)
    await wait_for(lambda: len(ip.records("session_end")) == 2)
    return {"alice": welcome.session_id, "bob": welcome_b.session_id}


@pytest.fixture
async def recorded(tmp_path: Path, nursery: trio.Nursery) -> tuple[Path, dict[str, str]]:
    ip = open_in_process(tmp_path, nursery)
    with trio.fail_after(30):
        ids = await _record_sessions(ip)
    return tmp_path, ids


def _run(capsys: pytest.CaptureFixture[str], log_dir: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # the server's own log lines, not ours
    code = logcli.main(["--log-dir", str(log_dir), *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def test_ls_lists_sessions_with_creator_end_and_who_joined(
    recorded: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    log_dir, ids = recorded
    code, out, _ = _run(capsys, log_dir, "ls", "--json")
    assert code == 0
    sessions = {s["session_id"]: s for s in json.loads(out)}
    a, b = sessions[ids["alice"]], sessions[ids["bob"]]
    assert (a["creator"], a["argv"], a["exit_code"], a["state"]) == ("alice", ["sh"], 3, "ended")
    assert a["term"] == "xterm" and a["rows"] == 24 and a["cols"] == 80
    assert a["input_bytes"] == len(b"echo hello-wrold\x7f\x7f\x7f\x7forld\r" b"exit 3\r")
    assert b["joined"] == ["ada"] and b["signal"] is not None and b["output_bytes"] > 10
    code, out, _ = _run(capsys, log_dir, "ls", "--user", "ada")
    assert code == 0 and ids["bob"] in out and ids["alice"] not in out
    code, out, _ = _run(capsys, log_dir, "ls", "--until", "@1000")
    assert out.strip().splitlines() == [out.strip().splitlines()[0]]  # the header alone


async def test_show_puts_keystrokes_back_into_lines_and_tells_the_story(
    recorded: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    log_dir, ids = recorded
    code, out, _ = _run(capsys, log_dir, "show", ids["alice"])
    assert code == 0
    assert "alice   typed: echo hello-world\n" in out  # the typo erased, as the shell did
    assert "resized to 30x100" in out and "ended: exit code 3" in out
    assert "wrote" in out and "of output" in out
    code, out, _ = _run(capsys, log_dir, "show", ids["bob"])
    assert "ada     joined as admin" in out and "(force-killed)" in out
    code, _, err = _run(capsys, log_dir, "show", "no-such-session")
    assert code == 255 and "no session 'no-such-session'" in err


async def test_grep_finds_typed_lines_and_output_cut_across_records(
    recorded: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    log_dir, ids = recorded
    code, out, _ = _run(capsys, log_dir, "grep", "hello-world", "--input")
    assert code == 0
    (hit,) = out.splitlines()
    assert hit.startswith(ids["alice"]) and "alice  typed: echo hello-world" in hit
    # "top-s3" and "cret-word" came in two writes, the second in colour
    code, out, _ = _run(capsys, log_dir, "grep", "s3cret-w", "--output")
    assert code == 0 and out.count("top-s3cret-word") == 1 and ids["bob"] in out
    code, out, _ = _run(capsys, log_dir, "grep", "s3cret", "--output", "--user", "alice")
    assert code == 1 and out == ""
    code, _, err = _run(capsys, log_dir, "grep", "(")
    assert code == 255 and "invalid pattern" in err


async def test_exports_hold_the_output_input_sizes_and_exit(
    recorded: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    log_dir, ids = recorded
    code, out, _ = _run(capsys, log_dir, "export", ids["alice"], "--format", "asciicast-v2")
    header, *events = [json.loads(line) for line in out.splitlines()]
    assert header["version"] == 2 and (header["width"], header["height"]) == (80, 24)
    assert header["env"] == {"TERM": "xterm"} and header["command"] == "sh"
    assert {e[1] for e in events} == {"o", "i", "r"} and ["r", "100x30"] in [e[1:] for e in events]
    assert "hello-world" in "".join(e[2] for e in events if e[1] == "o")
    times = [e[0] for e in events]
    assert times == sorted(times) and times[0] >= 0

    code, out, _ = _run(capsys, log_dir, "export", ids["alice"], "--format", "asciicast-v3")
    header, *events = [json.loads(line) for line in out.splitlines()]
    assert header["version"] == 3 and header["term"] == {"cols": 80, "rows": 24, "type": "xterm"}
    assert events[-1][1:] == ["x", "3"] and all(e[0] >= 0 for e in events)

    target = log_dir / "bob.tlog"
    code, _, _ = _run(capsys, log_dir, "export", ids["bob"], "--format", "tlog", "-o", str(target))
    messages = [json.loads(line) for line in target.read_text().splitlines()]
    assert target.stat().st_mode & 0o777 == 0o600
    assert messages[0]["timing"].startswith("=80x24") and messages[0]["id"] == 1
    assert "cret-word" in "".join(msg["out_txt"] for msg in messages)
    code, _, err = _run(capsys, log_dir, "export", ids["bob"], "--format", "tlog", "-o", str(target))
    assert code == 255 and "exists" in err


async def test_verify_passes_then_fails_at_the_edited_line(
    recorded: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    log_dir, _ = recorded
    code, out, _ = _run(capsys, log_dir, "verify")
    assert code == 0 and out.rstrip().endswith("the chain holds")
    kept = json.loads((log_dir / "audit.jsonl").read_bytes().splitlines()[5])["hash"]
    code, out, _ = _run(capsys, log_dir, "verify", "--head", kept)  # a head kept elsewhere
    assert code == 0
    code, out, _ = _run(capsys, log_dir, "verify", "--head", "0" * 64)
    assert code == 1 and f"the hash {'0' * 64} is not in the log" in out
    path = log_dir / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if b'"command_type":"input"' in line)
    lines[victim] = lines[victim].replace(b'"user":"alice"', b'"user":"bob"')
    path.write_bytes(b"".join(lines))
    code, out, _ = _run(capsys, log_dir, "verify")
    assert code == 1 and f"audit.jsonl:{victim + 1}: the hash does not match" in out
    assert out.rstrip().endswith("the chain is broken")


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


async def test_verify_while_a_record_is_being_written_checks_the_whole_lines(
    recorded: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A reader can see part of a large record that the server is writing: that part
    is said and left for later, not reported as a break."""
    log_dir, _ = recorded
    path = log_dir / "audit.jsonl"
    *_, last = path.read_bytes().splitlines()
    head = json.loads(last)["hash"]
    body = json.dumps({"seq": 10**6, "command_type": "output", "content": "x" * 9000}).encode()
    line = chain.sealed(body, chain.link(head, body))
    _append(path, line[:4096])  # the first page of it, as a reader may find it
    code, out, _ = _run(capsys, log_dir, "verify", "--head", head)
    assert code == 0 and out.rstrip().endswith("the chain holds")
    assert "the last 4096 bytes are not a whole line yet" in out
    _append(path, line[4096:])
    code, out, _ = _run(capsys, log_dir, "verify", "--head", chain.link(head, body))
    assert code == 0 and "not a whole line" not in out


# --- the pure parts ----------------------------------------------------------------------


def _terminal(kind: str, data: bytes, t: float, **metadata: Any) -> Entry:
    """An ``input`` or ``output`` record as the server stores its bytes."""
    content, encoding = encode_bytes(data)
    user = metadata.pop("user", "-")
    meta = {"encoding": encoding, "bytes": len(data), **metadata}
    return Entry("f", 1, t, user, None, None, "s", kind, content, meta)


def _input(data: bytes, t: float = 1.0, client: int = 1, user: str = "alice") -> Entry:
    return _terminal("input", data, t, client_id=client, user=user)


@pytest.mark.parametrize(
    ("keys", "lines"),
    [
        (b"ls -la\r", [("ls -la", "enter")]),
        (b"rm -rf /tmp/x\x15ls\r", [("ls", "enter")]),  # ^U kills the line
        (b"git push origin\x17main\r", [("git push main", "enter")]),  # ^W a word
        (b"sleep 100\x03", [("sleep 100^C", "^C")]),
        (b"\x1b[A\r", [("<up>", "enter")]),
        (b"\x1b[200~pasted\x1b[201~\r", [("pasted", "enter")]),
        (b"\r\r", []),
    ],
)
def test_typing_applies_line_editing(keys: bytes, lines: list[tuple[str, str]]) -> None:
    typing = logview.Typing()
    got = []
    for key in re.findall(rb"\x1b\[[0-9]*[~A-Z]|.", keys, re.DOTALL):  # as a terminal sends keys
        got += typing.feed(_input(key))
    assert [(line.text, line.ended_by) for line in got] == lines


def test_typing_keeps_people_apart_and_reports_unfinished_lines() -> None:
    typing = logview.Typing()
    assert typing.feed(_input(b"who", client=1)) == []
    assert typing.feed(_input(b"ami", client=2, user="bob")) == []
    (line,) = typing.feed(_input(b"\r", client=1))
    assert (line.user, line.text) == ("alice", "who")
    assert [(r.user, r.text, r.ended_by) for r in typing.rest()] == [("bob", "ami", "end")]


def test_tlog_keeps_bytes_that_are_not_utf8_and_characters_cut_in_two() -> None:
    summary = logview.Summary("s", started=10.0, rows=24, cols=80, creator="alice")

    msgs: list[dict[str, Any]] = [
        json.loads(line)
        for line in casts.tlog(
            summary,
            [_terminal("output", b"a\xe2\x82", 10.5), _terminal("output", b"\xac\xff!", 11.0)],
        )
    ]
    (msg,) = msgs
    assert msg["out_txt"] == "a\u20ac\ufffd!" and msg["out_bin"] == [0xFF]
    assert msg["timing"] == "=80x24>1+500>1]1/1>1" and msg["pos"] == 500


def test_replay_pace_keys_and_idle_limit() -> None:
    pace = replay.Pace(speed=2.0, idle_limit=1.5)
    assert pace.wait(10.0) == 0.75 and pace.wait(-1.0) == 0.0  # capped, then sped up
    assert pace.key(b"+") and pace.speed == 4.0
    assert pace.key(b" ") and pace.paused and pace.key(b" ") and not pace.paused
    assert not pace.key(b"q") and not pace.key(b"\x03")


def test_replay_lets_only_text_and_modes_through() -> None:
    flt = replay.Filter()
    shown = flt(b"a\x1b]52;c;c2VjcmV0\x07b\x1b[6nc\x1b]0;t\x07d\x1b[?1049he")
    assert shown == b"abcd\x1b[?1049he"
    assert b"\x1b[?1049l" in flt.modes.undo()  # the alternate screen is left at the end


# --- finding a session fast in rotated files ---------------------------------------------------


def _rotated_log(log_dir: Path) -> None:
    """Three files, oldest first: s1 starts in the oldest (compressed) and goes on in the
    next; s2 starts in the middle one; s3 is only in the newest; s10 (whose id ends in
    another's) comes last."""
    log_dir.mkdir(mode=0o700)
    path = str(log_dir / "audit.jsonl")
    log = AuditLog(path)
    log.note("session_start", session_id="s1", content="one")
    log.write_bytes("output", b"s1 early\r\n", session_id="s1")
    log.close()
    os.rename(path, path + ".2")
    log = AuditLog(path)
    log.write_bytes("output", b"s1 late\r\n", session_id="s1")
    log.note("session_start", session_id="s2", content="two")
    log.write_bytes("output", b"s2 output\r\n", session_id="s2")
    log.close()
    os.rename(path, path + ".1")
    log = AuditLog(path)
    log.note("session_start", session_id="s3", content="three")
    log.write_bytes("output", b"s3 output\r\n", session_id="s3")
    log.note("session_start", session_id="xs1", content="not s1")
    log.close()
    with open(path + ".2", "rb") as f, gzip.open(path + ".2.gz", "wb") as z:
        z.write(f.read())
    os.remove(path + ".2")


@pytest.mark.parametrize(
    ("session", "outputs"),
    [("s1", ["s1 early\r\n", "s1 late\r\n"]), ("s2", ["s2 output\r\n"]), ("s3", ["s3 output\r\n"])],
)
def test_a_session_is_found_whole_across_rotated_and_compressed_files(
    tmp_path: Path, session: str, outputs: list[str]
) -> None:
    _rotated_log(tmp_path / "log")
    files = logfiles.LogDir.open(str(tmp_path / "log")).files
    found = list(logfiles.session_records(files, session))
    assert found[0].command_type == "session_start"
    assert [e.content for e in found if e.command_type == "output"] == outputs
    assert {e.session_id for e in found} == {session}


def test_the_search_from_the_end_finds_a_needle_across_a_chunk_boundary(tmp_path: Path) -> None:
    data = b"x" * 1000 + b"NEEDLE" + b"y" * 1000
    path = tmp_path / "f"
    path.write_bytes(data)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for chunk in (7, 100, 1003, 1004, 5000):  # 1003: the needle straddles the cut
            assert logfiles._find_from_the_end(mm, b"NEEDLE", chunk) == 1000, chunk
        assert logfiles._find_from_the_end(mm, b"ABSENT", 100) == -1

"""The operational log's shapes: journald lines with priorities, levels, JSON elsewhere."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from aaau import messages as m
from aaau import oplog

from .helpers import (
    EVE,
    GROUP,
    ServerFactory,
    gid_of,
    root,
    server_env,
    start_daemon,
    wait_for,
)


@pytest.fixture(autouse=True)
def _structlog_as_it_was() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_a_journal_line_has_the_priority_first_and_no_timestamp() -> None:
    line = oplog.journal_line(None, "warning", {"event": "refused", "level": "warning", "uid": 7})
    assert line == "<4>refused uid=7"
    spaced = oplog.journal_line(None, "info", {"event": "x", "why": 'a "b"\nc'})
    assert spaced == '<6>x why="a \\"b\\"\\nc"'  # one line whatever the value holds


@pytest.mark.parametrize(
    ("level", "priority"), [("debug", 7), ("info", 6), ("warning", 4), ("error", 3)]
)
def test_levels_map_to_syslog_priorities(level: str, priority: int) -> None:
    assert oplog.journal_line(None, level, {"event": "e"}) == f"<{priority}>e"


def test_journald_is_recognised_only_by_the_stream_it_names(tmp_path: Path) -> None:
    path = tmp_path / "stream"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        assert oplog.under_journald(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not oplog.under_journald(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not oplog.under_journald(stream, {"JOURNAL_STREAM": "garbage"})
        assert not oplog.under_journald(stream, {})


def test_under_journald_the_log_writes_priorities_and_honours_the_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stream"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        oplog.configure("warning", stream)
        log = structlog.get_logger("t")
        log.info("quiet")
        log.warning("loud", n=1)
        log.error("worse")
    assert path.read_text().splitlines() == ["<4>loud n=1", "<3>worse"]


def test_elsewhere_the_log_is_json_with_a_timestamp() -> None:
    out = io.StringIO()
    oplog.configure("debug", out)
    structlog.get_logger("t").debug("seen", k="v")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "seen" and record["level"] == "debug" and "timestamp" in record


def test_a_log_that_cannot_be_written_does_not_raise() -> None:
    out = io.StringIO()
    out.close()  # writes raise ValueError
    oplog.configure("info", out)
    structlog.get_logger("t").error("into the void")


# --- the real server --------------------------------------------------------------------------


@root
async def test_the_server_under_journald_logs_priorities_refusals_and_reloads(
    start_server: ServerFactory, base_dir: Path
) -> None:
    log_dir = base_dir / "journal-log"
    log_dir.mkdir(mode=0o750)
    stream = log_dir / "server.stderr"  # what the server's stderr is: the "journal" stream
    stream.touch(mode=0o600)
    st = stream.stat()
    env = {**server_env(), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    srv = await start_server(env=env, log_dir=log_dir)
    peer = await srv.peer(EVE, extra_groups=[gid_of(GROUP)])  # in the group, not a member
    assert (await peer.expect(m.Error)).code == "refused"
    srv.process.send_signal(signal.SIGHUP)
    lines = await wait_for(
        lambda: [x for x in stream.read_text().splitlines() if x.startswith("<6>reloaded")]
        and stream.read_text().splitlines()
    )
    assert any(x.startswith("<6>listening socket=") for x in lines)
    (refused,) = [x for x in lines if "connection-refused" in x]
    assert refused.startswith("<4>connection-refused ") and "not a member" in refused
    assert all(re.match(r"<[0-7]>[a-z-]+( |$)", x) for x in lines), lines  # no timestamps


@root
async def test_the_log_level_leaves_out_what_is_below_it(
    start_server: ServerFactory, base_dir: Path
) -> None:
    srv = await start_server("--log-level", "warning")
    peer = await srv.peer(EVE, extra_groups=[gid_of(GROUP)])
    assert (await peer.expect(m.Error)).code == "refused"
    stderr = srv.log_dir / "server.stderr"
    events = await wait_for(
        lambda: [json.loads(x)["event"] for x in stderr.read_text().splitlines()]
    )
    assert events == ["connection-refused"]  # no "listening" (info)


@root
async def test_sighup_reopens_the_daemons_server_log(
    accounts: dict[str, object], base_dir: Path
) -> None:
    sock, log_dir = base_dir / "daemon-hup" / "aaau.sock", base_dir / "daemon-hup-log"
    pid = await start_daemon(sock, log_dir)
    try:
        server_log = log_dir / "server.log"
        assert "listening" in server_log.read_text()
        server_log.rename(log_dir / "server.log.1")  # what logrotate does
        os.kill(pid, signal.SIGHUP)
        await wait_for(lambda: server_log.exists() and "log-reopened" in server_log.read_text())
        assert stat.S_IMODE(server_log.stat().st_mode) == 0o640
        assert "log-reopened" not in (log_dir / "server.log.1").read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    await wait_for(lambda: not sock.exists())


@root
async def test_a_log_that_cannot_be_reopened_is_said_once_and_kept(
    accounts: dict[str, object], base_dir: Path
) -> None:
    sock, log_dir = base_dir / "daemon-stuck" / "aaau.sock", base_dir / "daemon-stuck-log"
    pid = await start_daemon(sock, log_dir)
    moved = log_dir / "server.log.1"
    try:
        (log_dir / "server.log").rename(moved)
        (log_dir / "server.log").mkdir()  # where the file was: nothing can be opened there
        for turn in (1, 2, 3):  # each reload tries again, as the check every second does
            os.kill(pid, signal.SIGHUP)
            await wait_for(lambda turn=turn: moved.read_text().count('"reloaded"') >= turn)
        assert moved.read_text().count("log-reopen-failed") == 1  # said once, not each time
    finally:
        os.kill(pid, signal.SIGTERM)
    await wait_for(lambda: not sock.exists())

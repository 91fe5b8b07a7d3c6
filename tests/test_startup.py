"""The commands people type in loops start without Trio, cattrs or structlog, and the
hand-written one-shot frames are the codec's, byte for byte."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aaau import codec, oneshot, protocol
from aaau import messages as m

V = m.PROTOCOL_VERSION


def test_one_shot_frames_are_the_codecs() -> None:
    assert oneshot.PROTOCOL_VERSION == V
    assert oneshot.frame(oneshot.list_sessions()) == codec.encode(m.ListSessions(V))
    assert oneshot.frame(oneshot.query_status("k3x9")) == codec.encode(m.QueryStatus(V, "k3x9"))
    assert oneshot.frame(oneshot.kill("k3x9")) == codec.encode(m.Kill(V, "k3x9"))
    assert oneshot.data_frame(b"\x1b[1m") == protocol.data_frame(b"\x1b[1m")
    with pytest.raises(oneshot.OneShotError, match="invalid session id"):
        oneshot.kill("-rf /")


def test_ls_prints_what_the_codec_would_and_escapes_it() -> None:
    info = m.SessionInfo(
        "s1",
        "al\x1b]0;x\x07ice",
        1000,
        ("sh", "-c", "a b"),
        12,
        "/dev/pts/1",
        0.0,
        24,
        80,
        False,
        (m.ClientInfo(1, "bob", 1001, m.Role.READONLY),),
    )
    (wire,) = codec.converter.unstructure(m.Sessions((info,)))["sessions"]
    text = oneshot.format_sessions([wire], now=0.0)
    assert "\x1b" not in text and "\x07" not in text
    header, row = text.splitlines()
    assert header.split() == ["SESSION", "CREATOR", "SINCE", "SIZE", "WATCHING", "COMMAND"]
    assert row.startswith("s1  ") and "80x24" in row and "bob(ro)" in row
    assert row.endswith("sh -c 'a b'")


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["ls"], ["status", "k3x9"], ["kill", "--json", "k3x9"]]
)
def test_typed_commands_import_no_trio_cattrs_or_structlog(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "aaau", *args, "-s", "/nonexistent/aaau.sock"],
        capture_output=True,
        text=True,
        check=False,
    )
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "aaau.oneshot" in imported or args[0].startswith("--")
    for heavy in ("trio", "cattrs", "structlog", "aaau.client", "aaau.codec", "aaau.messages"):
        assert heavy not in imported, f"{args} imports {heavy}"


@pytest.mark.parametrize(
    ("light", "message"),
    [
        (
            oneshot.create(rows=24, cols=80, term="xterm", argv=("true",)),
            m.Create(V, rows=24, cols=80, term="xterm", argv=("true",)),
        ),
        (
            oneshot.create(
                rows=50, cols=200, term="xterm-256color", argv=None, share=True, cwd="/srv",
                env={"A": "1"}, pipe=True, keep=True,
            ),
            m.Create(
                V, rows=50, cols=200, term="xterm-256color", argv=None, share=True, cwd="/srv",
                env={"A": "1"}, pipe=True, keep=True,
            ),
        ),
        (oneshot.join("k3x9", None), m.Join(V, "k3x9", None, None, None)),
        (oneshot.join("k3x9", "readonly", 30, 100), m.Join(V, "k3x9", m.Role.READONLY, 30, 100)),
    ],
)
def test_the_light_requests_are_the_codecs(light: dict[str, object], message: object) -> None:
    assert oneshot.frame(light) == codec.encode(message)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda: oneshot.create(rows=0, cols=80, term="x", argv=None), "rows must be between"),
        (lambda: oneshot.create(rows=24, cols=80, term="x y", argv=None), "terminal type name"),
        (lambda: oneshot.create(rows=24, cols=80, term="x", argv=("",)), "program name"),
        (lambda: oneshot.create(rows=24, cols=80, term="x", argv=None, cwd="rel"), "absolute"),
        (lambda: oneshot.create(rows=24, cols=80, term="x", argv=None, env={"1A": ""}), "name"),
        (lambda: oneshot.join("-rf /", None), "invalid session id"),
    ],
)
def test_the_light_requests_refuse_what_the_classes_refuse(build: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        build()  # type: ignore[operator]


def test_a_pipe_session_imports_no_trio_or_cattrs() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "aaau", "-p", "true", "-s", "/nonexistent/s"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 255 and "no aaau server is running" in result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "aaau.pipeclient" in imported
    for heavy in ("trio", "cattrs", "structlog", "attrs", "aaau.client", "aaau.messages"):
        assert heavy not in imported, heavy


# --- a server that lies ----------------------------------------------------------------------


def _lying_server(path: str, answer: bytes) -> threading.Thread:
    """Answers one connection's first frame with ``answer`` (raw bytes), then closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def _control(obj: object) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack(">BI", 1, len(payload)) + payload


@pytest.mark.parametrize(
    ("args", "answer"),
    [
        (["ls"], _control({"type": "sessions", "sessions": "not a list"})),
        (["ls"], _control({"type": "sessions", "sessions": [{"created_at": "yesterday"}]})),
        (["ls"], _control({"type": "welcome"})),
        (["ls"], struct.pack(">BI", 1, 1 << 30)),
        (["ls"], b"\x01\x00\x00\x00\x05nope!"),
        (["-p", "true"], _control({"type": "welcome", "session_id": "s", "input_window": "x"})),
        (["-p", "true"], _control({"type": "welcome", "session_id": "s"}) + b"\x07junk"),
    ],
)
def test_a_lying_server_gets_a_one_line_error_not_a_traceback(
    tmp_path: Path, args: list[str], answer: bytes
) -> None:
    path = str(tmp_path / "liar.sock")
    thread = _lying_server(path, answer)
    result = subprocess.run(
        [sys.executable, "-m", "aaau", *args, "-s", path],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    thread.join(timeout=10)
    assert result.returncode == 255, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("aaau: ") and "Traceback" not in result.stderr, result.stderr

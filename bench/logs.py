"""``aaau log`` on a large log: grep speed, replay start, verify, ls.

Run as root (or anyone) from the repository, with the project's venv:

    /opt/aaau-test/bin/python bench/logs.py [--size-mb 1024] [--keep DIR]

Writes a log of about ``--size-mb`` with the server's own writer
(:class:`aaau.audit.AuditLog`, so every record is sealed as the server seals
it): 400 sessions, each with output in 4 KiB chunks (text, colour, a little
binary) and typed input one key a record; the session to replay starts in the
last 5% of the file. Then times the real command line, each in a fresh process
(the page cache is warm: the file was just written). Targets (issue 11): grep
>= 100 MB/s, replay's first byte < 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aaau.audit import AuditLog

AAAU = [sys.executable, "-m", "aaau", "log"]
_WORDS = ["build", "test", "deploy", "error", "warning", "passed", "failed", "compile", "link", "module"]


def _chunk(rng: random.Random) -> bytes:
    lines = []
    while sum(len(x) for x in lines) < 4000:
        words = " ".join(rng.choice(_WORDS) for _ in range(8))
        colour = rng.randrange(31, 37)
        lines.append(f"\x1b[{colour}m{words}\x1b[0m {rng.randrange(10**6)}\r\n".encode())
    data = b"".join(lines)
    if rng.random() < 0.05:
        data += bytes(rng.randrange(256) for _ in range(16))  # not UTF-8: base64 records
    return data


def _last_session(path: str) -> str:
    """The session of a kept log that starts in its last 5 %."""
    with open(path, "rb") as f:
        f.seek(int(os.path.getsize(path) * 0.95))
        for line in f:
            if b'"command_type":"session_start"' in line:
                return str(json.loads(line)["session_id"])
    raise SystemExit(f"{path}: no session starts in its last 5 %")


def write_log(path: str, size: int) -> str:
    """The log; the id of the session that starts last."""
    rng = random.Random(7)
    log = AuditLog(path)
    sessions = [f"bench-session-{i:04d}-xxxxxxxx" for i in range(400)]
    live: list[str] = []
    target = ""
    while os.path.getsize(path) < size:
        if sessions and (not live or rng.random() < 0.002):
            sid = sessions.pop(0)
            live.append(sid)
            log.note("session_start", user="alice", uid=1000, session_id=sid,
                     metadata={"argv": ["bash"], "rows": 24, "cols": 80, "term": "xterm"})
            if os.path.getsize(path) > size * 0.95 and not target:
                target = sid
        sid = rng.choice(live)
        if rng.random() < 0.3:
            for key in b"echo hello world\r":
                log.write_bytes("input", bytes([key]), user="alice", uid=1000,
                                session_id=sid, metadata={"client_id": 1})
        log.write_bytes("output", _chunk(rng), source="agent", session_id=sid)
    for sid in live:
        log.note("session_end", user="alice", session_id=sid, content="exit code 0",
                 metadata={"exit_code": 0, "signal": None})
    log.close()
    return target or live[-1]


def _timed(argv: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    return time.perf_counter() - start, result.returncode


def _first_byte(argv: list[str]) -> float:
    start = time.perf_counter()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        proc.stdout.read(1)
        elapsed = time.perf_counter() - start
        proc.kill()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument(
        "--keep", help="write the log here and keep it (a log kept there before is reused)"
    )
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="aaau-bench-log-", dir="/var/tmp")
    log_dir = args.keep or tmp.name
    os.chmod(log_dir, 0o700)
    path = os.path.join(log_dir, "audit.jsonl")
    t0 = time.perf_counter()
    if args.keep and os.path.exists(path):
        target = _last_session(path)
    else:
        target = write_log(path, args.size_mb << 20)
    size = os.path.getsize(path)
    results: dict[str, object] = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "log_mb": round(size / (1 << 20), 1),
        "write_mb_s": round(size / (1 << 20) / (time.perf_counter() - t0), 1),
    }
    base = [*AAAU, "--log-dir", log_dir]
    for name, argv in (
        ("grep_output", [*base, "grep", "--output", "no-such-text"]),
        ("grep_input", [*base, "grep", "--input", "no-such-text"]),
        ("grep_both", [*base, "grep", "no-such-text"]),
        ("verify", [*base, "verify"]),
        ("ls", [*base, "ls"]),
    ):
        seconds, code = _timed(argv)
        results[name] = {
            "s": round(seconds, 2),
            "mb_s": round(size / (1 << 20) / seconds, 1),
            "exit": code,
        }
    results["replay_first_byte_s"] = round(
        min(_first_byte([*base, "replay", target, "--speed", "1000"]) for _ in range(3)), 3
    )
    results["show_s"] = round(_timed([*base, "show", target])[0], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""``aaau log``: the audit log for admins, read from the files (no server needed).

``ls``, ``show``, ``replay``, ``grep``, ``export`` and ``verify``; see
docs/audit.md. Root and members of the admin group only: the log holds every
keystroke. Where: ``--log-dir``, else the ``log_dir`` of the server's config
(``--config``, else /etc/aaau/aaau.toml if it exists), else /var/log/aaau.
Everything printed from the log passed through :func:`aaau.client.printable`:
members and agents chose those bytes.
"""

from __future__ import annotations

import argparse
import datetime
import grp
import itertools
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any, Final

from . import casts, chain, logfiles, logview
from .text import printable

DEFAULT_CONFIG: Final = "/etc/aaau/aaau.toml"
EXIT_ERROR: Final = 255


class _Refused(Exception):
    """One line on stderr, exit 255."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aaau log",
        description="Read the audit log: sessions, timelines, replays, searches, exports, "
        "and whether the log is as it was written. For root and the admin group.",
    )
    p.add_argument("--log-dir", help="the log directory (default: the server's, /var/log/aaau)")
    p.add_argument("--config", help=f"the server's config file (default: {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", help="sessions: creator, command, start, end, exit, who joined")
    ls.add_argument("--user", help="sessions this person created or joined")
    ls.add_argument("--since", type=_when, help="sessions still running at or after T")
    ls.add_argument("--until", type=_when, help="sessions begun at or before T")
    ls.add_argument("--json", action="store_true", help="machine-readable")

    show = sub.add_parser("show", help="a session's timeline")
    show.add_argument("session")
    show.add_argument("--json", action="store_true", help="the records, one JSON object a line")

    rep = sub.add_parser("replay", help="play a session's output at recorded pace")
    rep.add_argument("session")
    rep.add_argument("--speed", type=_positive_float, default=1.0, help="2 plays twice as fast")
    rep.add_argument(
        "--from",
        dest="start",
        help="start at T: seconds into the session (90, 1:30) or a time (see ls --since)",
    )
    rep.add_argument(
        "--idle-limit", type=_positive_float, help="wait at most this many seconds between frames"
    )

    grep_ = sub.add_parser("grep", help="search typed lines and output")
    grep_.add_argument("pattern", help="a regular expression (Python syntax)")
    which = grep_.add_mutually_exclusive_group()
    which.add_argument("--input", action="store_true", help="only what people typed")
    which.add_argument("--output", action="store_true", help="only what agents wrote")
    grep_.add_argument("--user", help="input this person typed; output of sessions they created")
    grep_.add_argument("-i", "--ignore-case", action="store_true")
    grep_.add_argument("-F", "--fixed-strings", action="store_true", help="PATTERN is plain text")
    grep_.add_argument("-n", "--session", help="only this session")

    exp = sub.add_parser("export", help="a session as asciicast v2, asciicast v3 or tlog")
    exp.add_argument("session")
    exp.add_argument("--format", choices=casts.FORMATS, default="asciicast-v2")
    exp.add_argument("-o", "--output", help="write to this file (default: standard output)")

    ver = sub.add_parser("verify", help="check the hash chain; says where it breaks")
    ver.add_argument("files", nargs="*", help="files to check (default: the whole log)")
    ver.add_argument(
        "--head", help="a hash logged elsewhere (audit-anchor): the chain must contain it"
    )
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        log_dir = args.log_dir or _log_dir_of(args.config)
        _may_read(log_dir)
        return int(_COMMANDS[args.command](args, log_dir))
    except (_Refused, logfiles.LogError) as exc:
        print(f"aaau log: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # | head
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


def _log_dir_of(path: str | None) -> str:
    """The server's log directory, from its config file (imported only when needed:
    the converter is slow to load, and a replay should start at once)."""
    from .config import Config, ConfigError, load

    if path is None and not os.path.exists(DEFAULT_CONFIG):
        return Config().log_dir
    try:
        return load(path or DEFAULT_CONFIG).log_dir
    except ConfigError as exc:
        raise _Refused(str(exc)) from None


def _may_read(log_dir: str) -> None:
    """Root, or who may enter the log directory (the server makes it ``root:ADMINS 0750``);
    anyone else is told which group it takes, and whether a new login would do."""
    if os.geteuid() == 0 or not os.path.isdir(log_dir) or os.access(log_dir, os.R_OK | os.X_OK):
        return
    import pwd

    gid = os.stat(log_dir).st_gid
    try:
        group = grp.getgrgid(gid)
        name, members = group.gr_name, group.gr_mem
    except KeyError:
        name, members = str(gid), []
    me = pwd.getpwuid(os.geteuid()).pw_name
    if me in members:
        raise _Refused(
            f"you were added to the group {name!r}, but this login began before: log in "
            f"again (or run `newgrp {name}`) to read {log_dir}"
        )
    raise _Refused(
        f"the audit log ({log_dir}) is for root and the admin group {name!r}; {me} is not in it"
    )


# --- times -----------------------------------------------------------------------------

_AGO: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)")
_UNIT: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _when(text: str, now: float | None = None) -> float:
    """A point in time: ``3h`` / ``2d`` ago, an ISO date or time (local), ``@UNIX``."""
    now = time.time() if now is None else now
    text = text.strip()
    if m := _AGO.fullmatch(text):
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    if text.startswith("@"):
        try:
            return float(text[1:])
        except ValueError:
            pass
    try:
        if re.fullmatch(r"[0-9]{1,2}:[0-9]{2}(:[0-9]{2})?", text):
            day = datetime.date.fromtimestamp(now).isoformat()
            text = f"{day}T{text}"
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (try 2h, 3d, 2026-11-22, 2026-11-22T09:30, 14:05, @1700000000)"
        ) from None


def _offset(text: str, started: float) -> float:
    """``--from``: seconds into the session (``90``, ``1:30``, ``1:02:03``) or a time."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return started + float(text)
    if re.fullmatch(r"[0-9]+:[0-9]{2}(:[0-9]{2})?(\.[0-9]+)?", text):
        parts = [float(p) for p in text.split(":")]
        seconds = 0.0
        for part in parts:
            seconds = seconds * 60 + part
        return started + seconds
    try:
        return _when(text)
    except argparse.ArgumentTypeError as exc:
        raise _Refused(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _stamp(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _clock(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


# --- reading -----------------------------------------------------------------------------


def _files(log_dir: str) -> tuple[str, ...]:
    return logfiles.LogDir.open(log_dir).require()


def _sessions(files: tuple[str, ...]) -> logview.Sessions:
    """Summaries of every session: output and input lines counted without being parsed."""
    sessions = logview.Sessions()
    for path in files:
        for number, line in logfiles.lines(path):
            head = logfiles.head_of(line)
            if head is None or head[0] is None or head[1] not in logview.SUMMARY_TYPES:
                continue
            if head[1] in ("output", "input"):
                sessions.add_bytes(head[0], head[1], logview.terminal_bytes(line))
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            sessions.feed(logfiles.entry(path, number, record))
    return sessions


def _session(files: tuple[str, ...], session_id: str) -> logview.Summary:
    """One session's summary, from its own records only (found by a memory-speed search)."""
    sessions = logview.Sessions()
    for e in logfiles.session_records(files, session_id):
        if e.session_id == session_id and e.command_type in logview.SUMMARY_TYPES:
            sessions.feed(e)
    found = sessions.get(session_id)
    if found is None:
        raise _Refused(f"no session {session_id!r} in the log ({os.path.dirname(files[-1])})")
    return found


def _of_session(
    files: tuple[str, ...], session_id: str, kinds: frozenset[str] | None = None
) -> Iterator[logfiles.Entry]:
    def want(sid: str | None, kind: str) -> bool:
        return sid == session_id and (kinds is None or kind in kinds)

    return logfiles.session_records(files, session_id, want)


# --- ls ----------------------------------------------------------------------------------


def _ls(args: argparse.Namespace, log_dir: str) -> int:
    found = [
        s
        for s in _sessions(_files(log_dir)).summaries()
        if (args.user is None or s.involves(args.user)) and s.overlaps(args.since, args.until)
    ]
    if args.json:
        print(json.dumps([s.as_json() for s in found], indent=2, sort_keys=True))
        return 0
    rows = [("SESSION", "CREATOR", "STARTED", "ENDED", "EXIT", "JOINED", "OUTPUT", "COMMAND")]
    for s in found:
        rows.append(
            (
                s.session_id,
                s.creator,
                _stamp(s.started),
                _stamp(s.ended) if s.end is not None else s.state,
                _exit(s),
                ",".join(s.joined) or "-",
                _bytes(s.output_bytes),
                shlex.join(s.argv) if s.argv else "(login shell)",
            )
        )
    _table(rows)
    return 0


def _exit(s: logview.Summary) -> str:
    if s.lost:
        return "lost"
    if s.signal is not None:
        return f"signal {s.signal}"
    if s.exit_code is not None:
        return str(s.exit_code)
    return "-"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    size = float(n)
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024 or unit == "GB":
            break
    return f"{size:.1f}{unit}"


def _table(rows: Sequence[Sequence[str]], out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    cells = [[printable(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]) - 1)]
    for row in cells:
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
        print(f"{line}  {row[-1]}".rstrip(), file=out)


# --- show --------------------------------------------------------------------------------


def _show(args: argparse.Namespace, log_dir: str) -> int:
    files = _files(log_dir)
    summary = _session(files, args.session)
    if args.json:
        for e in _of_session(files, args.session):
            print(json.dumps(_entry_json(e), sort_keys=True))
        return 0
    print(printable(f"session {summary.session_id}: {_describe(summary)}"))
    typing = logview.Typing()
    output = [0, 0.0]  # bytes since the last event shown, and when they began

    def flush_output() -> None:
        if output[0]:
            print(f"{_clock(output[1])}  agent   wrote {_bytes(int(output[0]))} of output")
            output[0] = 0

    for e in _of_session(files, args.session):
        if e.command_type == "output":
            if not output[0]:
                output[1] = e.timestamp
            output[0] += int(e.metadata.get("bytes") or 0)
            continue
        if e.command_type == "input":
            lines = typing.feed(e)
            if lines:
                flush_output()
            for line in lines:
                _say(line.timestamp, line.user, f"typed: {line.text}" + _ending(line.ended_by))
            continue
        text = _event(e)
        if text is None:
            continue
        flush_output()
        _say(e.timestamp, e.user, text)
    flush_output()
    for line in typing.rest():
        _say(line.timestamp, line.user, f"typed (no Enter): {line.text}")
    return 0


def _ending(why: str) -> str:
    return "" if why == "enter" else "  (ended by " + why + ")"


def _say(t: float, who: str, what: str) -> None:
    print(printable(f"{_clock(t)}  {who:<7} {what}"))


def _describe(s: logview.Summary) -> str:
    parts = [
        f"{shlex.join(s.argv) if s.argv else '(login shell)'} by {s.creator}",
        f"as {s.agent_user}" if s.agent_user else "",
        f"on {s.host}" if s.host else "",
        f"{s.cols}x{s.rows}" if s.cols else "",
        f"TERM={s.term}" if s.term else "",
        f"started {_stamp(s.started)}",
        f"{s.end} at {_stamp(s.ended)}" if s.end else s.state,
    ]
    return ", ".join(p for p in parts if p)


def _event(e: logfiles.Entry) -> str | None:
    """One line for a timeline event; None for records a timeline leaves out."""
    md, kind = e.metadata, e.command_type
    role = f" as {e.role}" if e.role else ""
    if kind == "session_start":
        argv = md.get("argv") or []
        return f"started {shlex.join(map(str, argv)) if argv else '(login shell)'}"
    if kind == "session_end":
        return f"ended: {e.content}" + (" (force-killed)" if md.get("force_killed") else "")
    if kind == "join":
        how = "created it" if md.get("created") else "joined"
        return f"{how}{role} (client {md.get('client_id')})"
    if kind == "leave":
        return f"left: {e.content} (client {md.get('client_id')})"
    if kind == "resize":
        return f"resized to {e.content}"
    if kind in ("force_kill", "denied", "input_eof", "client_evicted", "role_changed"):
        return f"{kind.replace('_', ' ')}{role}" + (f": {e.content}" if e.content else "")
    if kind == "asys_request":
        return f"asked ASys {e.content} {json.dumps(md.get('args') or {}, sort_keys=True)}"
    if kind == "asys_result":
        return f"ASys {e.content} answered {md.get('sw')}"
    if kind in ("output_not_recorded", "output_recorded_again", "output_filtered"):
        return f"{kind.replace('_', ' ')}: {e.content}"
    if kind in ("request_failed", "protocol_error", "spawn_failed"):
        return f"{kind.replace('_', ' ')}: {e.content}"
    return None


def _entry_json(e: logfiles.Entry) -> dict[str, Any]:
    return {
        "timestamp": e.timestamp,
        "user": e.user,
        "uid": e.uid,
        "role": e.role,
        "session_id": e.session_id,
        "command_type": e.command_type,
        "content": e.content,
        "metadata": e.metadata,
    }


# --- replay ------------------------------------------------------------------------------


def _replay(args: argparse.Namespace, log_dir: str) -> int:
    from . import replay

    files = _files(log_dir)
    records = _of_session(files, args.session, frozenset({"session_start", "output", "resize"}))
    first = next(records, None)  # its start: no need to read on to its end before playing
    if first is None:
        raise _Refused(f"no session {args.session!r} in the log ({log_dir})")
    summary = logview.Sessions()
    summary.feed(first)
    found = summary.get(args.session)
    assert found is not None
    started = found.started or first.timestamp
    start = _offset(args.start, started) if args.start else None

    def frames() -> Iterator[Any]:
        for e in itertools.chain([first], records):
            if e.command_type == "output":
                yield replay.Frame(e.timestamp, data=e.data)
            elif (size := casts.size_of(e)) is not None:
                yield replay.Frame(e.timestamp, size=size)

    return replay.play(
        frames(),
        size=(found.cols or 80, found.rows or 24),
        speed=args.speed,
        start=start,
        idle_limit=args.idle_limit,
    )


# --- grep --------------------------------------------------------------------------------


def _grep(args: argparse.Namespace, log_dir: str) -> int:
    files = _files(log_dir)
    text = re.escape(args.pattern) if args.fixed_strings else args.pattern
    flags = re.IGNORECASE if args.ignore_case else 0
    try:
        pattern = re.compile(text, flags)
        bpattern = re.compile(text.encode(), flags)
    except re.error as exc:
        raise _Refused(f"invalid pattern {args.pattern!r}: {exc}") from None
    inputs, outputs = not args.output, not args.input
    creators: dict[str, str] = {}
    typing = logview.Typing()
    plain = args.fixed_strings or not re.search(r"[.^$*+?{}\[\]\\|()]", args.pattern)
    literal = args.pattern.encode() if plain and not args.ignore_case else None
    text_out = logview.OutputText(bpattern, literal)
    found = 0

    def want(sid: str | None, kind: str) -> bool:
        if sid is None or (args.session and sid != args.session):
            return False
        return kind == "session_start" or (kind == "input" and inputs) or (
            kind == "output" and outputs
        )

    def typed(lines: list[logview.TypedLine]) -> None:
        nonlocal found
        for line in lines:
            if (args.user is None or line.user == args.user) and pattern.search(line.text):
                found += 1
                _hit(line.timestamp, line.session_id, line.user, "typed", line.text)

    def wrote(matches: list[logview.OutputMatch]) -> None:
        nonlocal found
        for match in matches:
            if args.user is None or creators.get(match.session_id) == args.user:
                found += 1
                _hit(match.timestamp, match.session_id, "agent", "wrote", match.text)

    marker = logfiles.session_marker(args.session) if args.session else None
    for e in logfiles.records(files, want, marker=marker):
        if e.command_type == "session_start":
            creators[e.session_id or ""] = e.user
        elif e.command_type == "input":
            typed(typing.feed(e))
        else:
            wrote(text_out.feed(e.session_id or "", e.data, e.timestamp))
    typed(typing.rest())
    wrote(text_out.rest())
    return 0 if found else 1


def _hit(t: float, session_id: str, who: str, what: str, text: str) -> None:
    if len(text) > 300:
        text = text[:300] + "..."
    print(printable(f"{session_id}  {_stamp(t)}  {who}  {what}: {text}"))


# --- export ------------------------------------------------------------------------------


def _export(args: argparse.Namespace, log_dir: str) -> int:
    files = _files(log_dir)
    summary = _session(files, args.session)
    records = _of_session(files, args.session, casts.EXPORT_TYPES)
    lines = casts.WRITERS[args.format](summary, records)
    if args.output is None:
        for line in lines:
            sys.stdout.write(line + "\n")
        return 0
    try:  # a new file only, 0600: it holds what the terminal showed
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise _Refused(f"{args.output} exists: choose a new name") from None
    except OSError as exc:
        raise _Refused(f"cannot create {args.output}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    return 0


# --- verify ------------------------------------------------------------------------------


def _verify(args: argparse.Namespace, log_dir: str) -> int:
    files = tuple(os.path.abspath(f) for f in args.files) or _files(log_dir)
    reports = []
    for path in files:
        with logfiles.open_log(path) as f:
            reports.append(chain.check_lines(path, f, look_for=args.head))
    bad = False
    for report in reports:
        for b in report.breaks:
            bad = True
            print(printable(f"{report.path}:{b.line}: {b.why}"))
        note = f", {report.unsealed} lines from before the chain" if report.unsealed else ""
        status = "ok" if report.ok else f"{len(report.breaks)} broken"
        print(f"{report.path}: {report.lines} records{note}, {status}; head {report.head or '-'}")
        if report.unfinished:
            print(
                f"{report.path}: the last {report.unfinished} bytes are not a whole line yet "
                "(being written now, or cut off by a crash): not checked"
            )
    if not args.files:
        for path, why in chain.check_sequence(reports):
            bad = True
            print(printable(f"{path}: {why}"))
    if args.head and not any(r.holds_head for r in reports):
        bad = True
        print(f"the hash {args.head} is not in the log: records up to it were removed or changed")
    print("the chain holds" if not bad else "the chain is broken")
    return 1 if bad else 0


_COMMANDS: Final = {
    "ls": _ls,
    "show": _show,
    "replay": _replay,
    "grep": _grep,
    "export": _export,
    "verify": _verify,
}

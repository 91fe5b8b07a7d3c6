"""``aaau``: create, join, list, inspect and kill sessions; ASys calls.

``aaau log`` is :mod:`aaau.logcli`; ``aaau-server`` is :mod:`aaau.servercli`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from . import __version__, oneshot

#: the client's exit status for its own errors, usage errors included (client.EXIT_ERROR)
EXIT_ERROR = 255

ALIASES = {
    "claude": ("claude", "--dangerously-skip-permissions"),
    "codex": ("codex", "--dangerously-bypass-approvals-and-sandbox"),
}


# --- aaau -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors as the client's other errors: one line on stderr, exit 255 (as ssh)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: {message} (try {self.prog} --help)\n")


def _default_socket() -> str:
    return os.environ.get("AAAU_SOCKET", "/run/aaau/aaau.sock")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-s",
        "--socket",
        default=_default_socket(),
        help="the server's socket (default: $AAAU_SOCKET, else /run/aaau/aaau.sock)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--share", action="store_true", help="let other members type too")
    p.add_argument(
        "--keep",
        action="store_true",
        help="without a terminal (stdin a pipe or a file), keep the session when this "
        "client goes (by default it ends with it)",
    )
    p.add_argument("-C", "--cwd", help="the agent's working directory")
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="pass NAME from your environment to the agent (repeatable); NAME=VALUE works "
        "too, but puts the value on this command line, where anyone on the machine can read it",
    )
    p.add_argument(
        "--grant",
        action="append",
        metavar="LIST",
        help="the ASys instructions the agent may call from inside the session, comma-"
        "separated (SYS_STATUS,SYS_PROCS,PROC_THROTTLE; repeatable; 'none': no ASys at "
        "all); default: the read-only facts (docs/asys.md)",
    )
    p.add_argument(
        "--no-mcp",
        action="store_true",
        help="do not register the session's ASys MCP server with claude or codex",
    )
    p.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="create the session in the background: print its id (--json: as JSON) and "
        "return; join it later with aaau -n ID",
    )


_EPILOG = """commands (each has --help):
  aaau [claude|codex]            run that agent (with its "skip permissions" flag)
  aaau -p 'PROGRAM ARGS'         run a program, split like a shell
  aaau run [OPTIONS] -- CMD ARGS run CMD with ARGS exactly as given (no shell splitting)
  aaau -n ID | aaau join ID      join a session (-r: read-only)
  aaau ls                        list sessions
  aaau status ID                 one session, as JSON
  aaau kill ID                   end a session (its creator or an admin)
  aaau asys [-n ID] INSTRUCTION [key=value ...]   an ASys call (inside a session:
                                 the agent's, through $AAAU_ASYS)
  aaau revoke ID INSTRUCTION...  withdraw ASys grants from a session's agent
  aaau mcp                       the agent's ASys MCP server on stdio
  aaau log ...                   read the audit log (admins; aaau log --help)

With no program and no alias, aaau starts the agent user's login shell.
The socket: -s PATH, else $AAAU_SOCKET, else /run/aaau/aaau.sock."""


def _client_parser(*, words: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aaau",
        description="Run an agent under the aaau server, or join, list, inspect and kill sessions.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common(parser)
    parser.add_argument("-p", "--program", help="the program and its arguments, split like a shell")
    parser.add_argument("-n", "--session", help="join this session")
    parser.add_argument("-r", "--read-only", action="store_true", help="join as an observer")
    _create_options(parser)
    if words:
        parser.add_argument("words", nargs="*", help=argparse.SUPPRESS)
    return parser


def documented_parser() -> argparse.ArgumentParser:
    """The whole of ``aaau`` as one parser with subcommands, for what is generated from
    it (shell completion, the man page; tools/docgen.py): the real dispatch finds the
    subcommand first, so that ``aaau claude`` and ``aaau -p ...`` keep working."""
    from . import logcli

    parser = _client_parser(words=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in ("claude", "codex"):
        sub.add_parser(name, help=f"run {shlex.join(ALIASES[name])}")
    for name, text in _SUBCOMMANDS.items():
        if name != "list":
            sub.add_parser(
                name, parents=[_subparser(name)], add_help=False, help=text, description=text
            )
    log = logcli.parser()
    sub.add_parser(
        "log",
        parents=[log],
        add_help=False,
        help="read the audit log (admins)",
        description=log.description,
    )
    return parser


def _subparser(name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand, with its own help."""
    p = _Parser(prog=f"aaau {name}", description=_SUBCOMMANDS[name])
    _common(p)
    if name in ("status", "kill", "join", "revoke"):
        p.add_argument("session_id", metavar="ID", help="the session")
    if name == "revoke":
        p.add_argument(
            "instructions", nargs="+", metavar="INSTRUCTION", help="e.g. PROC_THROTTLE"
        )
    if name == "join":
        p.add_argument("-r", "--read-only", action="store_true", help="join as an observer")
    if name == "asys":
        p.add_argument("-n", "--session", help="call within this session")
        p.add_argument("instruction", help="SYS_CAPS, SYS_STATUS, SYS_PROCS, ... (docs/asys.md)")
        p.add_argument("args", nargs="*", metavar="key=value", help="the instruction's arguments")
    if name == "run":
        _create_options(p)
        p.add_argument("argv", nargs="+", metavar="CMD", help="the command and its arguments")
    return p


_SUBCOMMANDS = {
    "ls": "List the sessions you may see.",
    "list": "List the sessions you may see.",
    "status": "One session: state, creator, clients, size (JSON).",
    "kill": "End a session: its agent and every process it started (creator or admin).",
    "join": "Join a session (as Interactive if you may type, else read-only).",
    "asys": "Call an ASys instruction; prints its JSON result, exit 0 if it succeeded.",
    "run": "Run CMD with ARGS exactly as given: aaau run [OPTIONS] -- CMD ARGS.",
    "revoke": "Withdraw ASys grants from a session's agent, live (an Admin of the session).",
    "mcp": "Inside a session, as its agent: the session's granted ASys instructions as MCP "
    "tools on stdio (aaau claude and aaau codex register it).",
}

#: the top-level options that take a value (to find the subcommand among the words)
_TAKES_VALUE = frozenset(
    {"-s", "--socket", "-p", "--program", "-n", "--session", "-C", "--cwd", "-e", "--env"}
    | {"--grant"}
)


def _find_subcommand(argv: list[str]) -> int | None:
    """Where the subcommand word is in ``argv`` (after any top-level options), or None."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return None
        if word.startswith("-"):
            i += 2 if word in _TAKES_VALUE else 1
            continue
        return i if word in _SUBCOMMANDS else None
    return None


class _Usage(Exception):
    """A command line that does not make sense: one line on stderr, exit 255."""


def _session_after_dashes(argv: list[str]) -> list[str]:
    """``-n -- ID`` (an id that begins with "-") as ``--session=ID``."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("-n", "--session") and argv[i + 1 : i + 2] == ["--"] and i + 2 < len(argv):
            out.append(f"--session={argv[i + 2]}")
            i += 3
            continue
        out.append(argv[i])
        i += 1
    return out


def client_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        at = _find_subcommand(argv)
        if at is not None:
            name = argv[at]
            args = _subparser(name).parse_args(argv[:at] + argv[at + 1 :])
            return _SUBCOMMAND_RUN[name](args)
        argv = _session_after_dashes(argv)
        args = _client_parser().parse_intermixed_args(argv)
        return _dispatch(args, args.words)
    except (_Usage, oneshot.OneShotError) as exc:
        print(f"aaau: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _ls(args: argparse.Namespace) -> int:
    """No Trio, no cattrs: :mod:`aaau.oneshot`."""
    reply = oneshot.request(args.socket, oneshot.list_sessions(), "sessions")
    sessions = reply.get("sessions")
    if not isinstance(sessions, list) or not all(isinstance(x, dict) for x in sessions):
        raise oneshot.OneShotError("protocol error from the server: sessions is not a list")
    if args.json:
        oneshot.print_json(sessions)
    else:
        try:
            print(oneshot.format_sessions(sessions))
        except (TypeError, ValueError) as exc:
            raise oneshot.OneShotError(f"protocol error from the server: {exc}") from None
    return 0


def _status(args: argparse.Namespace) -> int:
    reply = oneshot.request(args.socket, oneshot.query_status(args.session_id), "status")
    oneshot.print_json({"alive": reply.get("alive"), **dict(reply.get("session") or {})})
    return 0


def _kill(args: argparse.Namespace) -> int:
    reply = oneshot.request(args.socket, oneshot.kill(args.session_id), "done")
    message = str(reply.get("message", ""))
    if args.json:
        oneshot.print_json({"session_id": args.session_id, "done": True, "message": message})
    else:
        from .text import printable

        print(printable(message))
    return 0


def _join(args: argparse.Namespace) -> int:
    from .ttysize import window_size

    rows, cols = window_size(0) if os.isatty(0) else (None, None)
    try:
        join = oneshot.join(args.session_id, "readonly" if args.read_only else None, rows, cols)
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    return _attach(args.socket, join)


def _run(args: argparse.Namespace) -> int:
    """``aaau run -- CMD ARGS``: argv as given, never split or re-parsed."""
    return _start(args, _create(args, tuple(args.argv)))


def _asys_command(args: argparse.Namespace) -> int:
    return _asys(args, [args.instruction, *args.args])


def _revoke(args: argparse.Namespace) -> int:
    names = _instructions(args.instructions)
    reply = oneshot.request(args.socket, oneshot.revoke(args.session_id, names), "done")
    message = str(reply.get("message", ""))
    if args.json:
        oneshot.print_json({"session_id": args.session_id, "revoked": list(names)})
    else:
        from .text import printable

        print(printable(message))
    return 0


def _mcp(_args: argparse.Namespace) -> int:
    from . import agentside

    return agentside.mcp()


def _instructions(items: list[str]) -> tuple[str, ...]:
    """``A,B`` ``C`` as (A, B, C), upper-cased, in order, once each; ``none``: ()."""
    names: list[str] = []
    for item in items:
        for word in item.split(","):
            word = word.strip().upper()
            if word and word != "NONE" and word not in names:
                names.append(word)
    return tuple(names)


_SUBCOMMAND_RUN: dict[str, Callable[[argparse.Namespace], int]] = {
    "ls": _ls,
    "list": _ls,
    "status": _status,
    "kill": _kill,
    "join": _join,
    "asys": _asys_command,
    "run": _run,
    "revoke": _revoke,
    "mcp": _mcp,
}


def _dispatch(args: argparse.Namespace, words: list[str]) -> int:
    """The short forms: an alias, -p PROGRAM, -n ID, or nothing (a login shell)."""
    if args.session:
        if args.program or words:
            raise _Usage("-n joins a session: do not name a program too")
        if args.detach:
            raise _Usage("-d creates a session in the background: it does not join one")
        args.session_id = args.session
        return _join(args)
    if args.read_only:
        raise _Usage("-r joins read-only: give the session with -n ID (aaau ls lists them)")
    argv = _program(args, words)
    if argv is None and not args.detach:
        print(
            "aaau: no program given: starting the agent user's login shell "
            "(aaau claude, aaau -p PROGRAM, aaau --help)",
            file=sys.stderr,
        )
    return _start(args, _create(args, argv))


def _start(args: argparse.Namespace, request: dict[str, Any]) -> int:
    if args.detach:
        return _create_detached(args.socket, request, args.json)
    return _attach(args.socket, request)


def _attach(sock: str, hello: dict[str, Any]) -> int:
    """Attached: through Trio with a terminal; without one, the light pipe client."""
    if not os.isatty(0):
        from . import pipeclient

        return pipeclient.attach(sock, hello)
    from . import attach, client, codec

    message = codec.decode_client(json.dumps(hello).encode())  # the same bytes, as a class
    assert isinstance(message, attach.Hello)
    return client.run_client(attach.attach, sock, message)


def _program(args: argparse.Namespace, words: list[str]) -> tuple[str, ...] | None:
    """The argv to run: -p split like a shell (never re-parsed later), an alias, or None."""
    if args.program is not None and words:
        raise _Usage("give either -p PROGRAM or an alias, not both")
    if args.program is not None:
        try:
            argv = tuple(shlex.split(args.program))
        except ValueError as exc:
            raise _Usage(f"invalid program string: {exc}") from None
        if not argv:
            raise _Usage("the program string is empty")
        return argv
    if words:
        if len(words) != 1 or words[0] not in ALIASES:
            raise _Usage(f"unknown command {' '.join(words)!r} (try aaau --help)")
        return ALIASES[words[0]]
    return None


def _environment(items: list[str]) -> dict[str, str]:
    """-e NAME (the value from our environment, never on a command line) or -e NAME=VALUE."""
    env = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq:
            if name not in os.environ:
                raise _Usage(f"-e {name}: {name} is not set in your environment")
            value = os.environ[name]
        else:
            print(
                f"aaau: warning: -e {name}=... puts the value on the command line, where every "
                f"user of this machine can read it; export {name} and use -e {name}",
                file=sys.stderr,
            )
        env[name] = value
    return env


#: the client's environment that describes its terminal, passed on to the agent
_TERMINAL_ENV = ("COLORTERM",)


def _create(args: argparse.Namespace, argv: tuple[str, ...] | None) -> dict[str, Any]:
    from .ttysize import window_size

    env = _environment(args.env)
    terminal = os.isatty(0) and not args.detach
    for name in _TERMINAL_ENV:  # what the person's terminal can do (truecolor)
        if name in os.environ and name not in env:
            env[name] = os.environ[name]
    rows, cols = window_size(0) if terminal else window_size(1)
    try:
        return oneshot.create(
            rows=rows,
            cols=cols,
            term=os.environ.get("TERM", "xterm-256color"),
            argv=argv,
            share=args.share,
            cwd=os.path.abspath(args.cwd) if args.cwd else None,
            env=env,
            pipe=not terminal and not args.detach,
            keep=args.keep or args.detach,
            grants=_instructions(args.grant) if args.grant is not None else None,
            mcp=not args.no_mcp,
        )
    except ValueError as exc:
        raise _Usage(str(exc)) from None


def _asys(args: argparse.Namespace, words: list[str]) -> int:
    if not words:
        raise _Usage("usage: aaau asys [-n SESSION_ID] INSTRUCTION [key=value ...]")
    from . import agentconfig, agentside

    instruction = words[0].upper()
    try:
        call_args = agentside.parse_args(words[1:])
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    inside = os.environ.get(agentconfig.ENV) and args.socket == _default_socket()
    if args.session is None and inside:
        return agentside.asys(instruction, call_args)  # inside a session, as its agent
    from . import client

    return client.run_client(client.asys_call, args.socket, args.session, instruction, call_args)


def _create_detached(sock: str, request: dict[str, Any], as_json: bool) -> int:
    """Create a session and leave it running (tmux new -d -P): its id on stdout."""
    from .text import printable

    reply = oneshot.request(sock, request, "welcome")
    session_id = printable(str(reply.get("session_id")))
    if as_json:
        oneshot.print_json({"session_id": session_id, "role": reply.get("role")})
    else:
        print(session_id)
    return 0

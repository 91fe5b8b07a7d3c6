"""``aaau-server``: ``init``, ``run`` and ``check-config``."""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__, codec, notify, oplog, paths, provision
from .config import Config, ConfigError, IdentityMode, default_path, load
from .errors import innermost


def _grant(text: str) -> tuple[str, tuple[str, ...]]:
    instruction, eq, groups = text.partition("=")
    names = tuple(g for g in groups.split(",") if g)
    if not eq or not instruction or not names:
        raise argparse.ArgumentTypeError(f"INSTRUCTION=GROUP[,GROUP], got {text!r}")
    return instruction.upper(), names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--agent-user",
        help="the shared agent user, and the prefix of the pool users NAME-01 ... (default: agent)",
    )
    p.add_argument(
        "--agents",
        type=_positive,
        dest="agent_pool",
        metavar="N",
        help="how many pool users there are: one per member, or per session (default: 32)",
    )
    p.add_argument("--pam-service", help="the PAM service of agent sessions (default: aaau)")
    p.add_argument("--group", help="the group of people who may use agents (default: aaau)")
    p.add_argument("--admin-group", help="the admins' group (default: aaau-admin)")
    p.add_argument("--socket", help="the Unix socket (default: /run/aaau/aaau.sock)")
    p.add_argument("--log-dir", help="the audit log directory (default: /var/log/aaau)")


def _server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aaau-server", description="The aaau PTY bridge server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the agent user, groups, directories, PAM service")
    _layout_options(init)
    init.add_argument("--home", help="the agent user's home (default: /var/lib/aaau/USER)")
    init.add_argument("--sysconf-dir", default="/etc", help=argparse.SUPPRESS)
    init.add_argument("--share-dir", default="/usr/local/share", help=argparse.SUPPRESS)
    run = sub.add_parser("run", help="run the server (as root)")
    _layout_options(run)
    _run_options(run)
    check = sub.add_parser(
        "check-config",
        help="read the configuration as run would, say what is wrong or print it",
        description="Read the config file (--config, else /etc/aaau/aaau.toml if it exists) "
        "with the options given, as `run` would; exit 0 and print the settings (--json: as "
        "JSON), or exit 1 and say what is wrong.",
    )
    _layout_options(check)
    _run_options(check)
    check.add_argument("--json", action="store_true", help="print the settings as JSON")
    return parser


def _run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--config",
        help="a TOML file of settings (docs/operating.md; default: /etc/aaau/aaau.toml if it "
        "exists)",
    )
    _asys_options(run)
    run.add_argument(
        "--daemon", action="store_true", help="go to the background once the socket is ready"
    )
    run.add_argument("--ready-fd", type=int, help="write READY to this fd once listening")
    run.add_argument(
        "--pid-file",
        help="write the server's pid here once listening (with --daemon, default: "
        "aaau-server.pid beside the socket)",
    )
    run.add_argument(
        "--log-level",
        choices=oplog.LEVELS,
        default="info",
        help="the least important events the operational log shows (default: info)",
    )
    run.add_argument(
        "--identity",
        type=IdentityMode,
        choices=list(IdentityMode),
        help="who agents run as: an agent user per member (default), per session, or one "
        "shared by all (no isolation between members)",
    )
    run.add_argument("--state-dir", help="root's state: member bindings (default: /var/lib/aaau)")
    run.add_argument(
        "--cgroup-base", help="the sessions' cgroups go below this name (default: aaau)"
    )
    _limit_options(run)


def _asys_options(run: argparse.ArgumentParser) -> None:
    """ASys: services, grants to people and to agents, the agents' endpoints."""
    run.add_argument(
        "--svc-allow",
        action="append",
        dest="svc_allowlist",
        metavar="SERVICE",
        help="a service ASys SVC_RESTART may restart (repeatable; replaces svc_allowlist)",
    )
    run.add_argument(
        "--asys-grant",
        action="append",
        type=_grant,
        dest="asys_grants",
        metavar="INSTRUCTION=GROUP[,GROUP]",
        help="let these groups' Interactive members call an ASys instruction (repeatable; "
        "replaces asys_grants)",
    )
    run.add_argument(
        "--agent-grant",
        action="append",
        type=_grant,
        dest="agent_grants",
        metavar="INSTRUCTION=GROUP[,GROUP]",
        help="let these groups' members grant an ASys instruction to their sessions' agents "
        "(repeatable; replaces agent_grants; admins may grant any)",
    )
    run.add_argument(
        "--agent-asys-rate",
        type=float,
        metavar="N",
        help="ASys calls per second one session's agent may make (default 20; bursts: "
        "--agent-asys-burst, default 40)",
    )
    run.add_argument("--agent-asys-burst", type=int, metavar="N", help=argparse.SUPPRESS)
    run.add_argument(
        "--asys-dir",
        metavar="DIR",
        help="where the sessions' ASys endpoints are (default: beside the socket's "
        "directory, /run/aaau -> /run/aaau-asys)",
    )


def _limit_options(run: argparse.ArgumentParser) -> None:
    limits = run.add_argument_group("limits (defaults in docs/operating.md)")
    for name, kind, text in (
        ("handshake-timeout", float, "seconds a new connection has to say hello"),
        ("max-frame", int, "largest frame accepted from a client, in bytes"),
        ("clients-per-session", int, "clients attached to one session"),
        ("max-sessions", int, "sessions in all"),
        ("sessions-per-user", int, "sessions one person may create"),
        ("scrollback-bytes", int, "output kept for late joiners"),
        ("client-queue-bytes", int, "unsent output before a client is dropped as too slow"),
        ("kill-grace", float, "seconds between SIGTERM and SIGKILL"),
        ("session-pids-max", int, "processes in one session"),
        ("session-memory-max", int, "bytes of memory for one session (0: no cap)"),
        ("session-nofile", int, "open files per agent process"),
    ):
        limits.add_argument(f"--{name}", type=kind, help=text)
    run.add_argument(
        "--journald",
        choices=["off", "events", "all"],
        help="copy audit records to the journal: every record but output, or all (default: off)",
    )
    run.add_argument("--journal-socket", help=argparse.SUPPRESS)  # tests: a journald of theirs
    run.add_argument(
        "--no-record-output",
        dest="record_output",
        action="store_const",
        const=False,
        help="do not write output records to the audit log",
    )


def server_main(argv: list[str] | None = None) -> int:
    args = _server_parser().parse_args(argv)
    if args.command == "init":
        layout = provision.Layout(
            **{
                k: v
                for k, v in {
                    "agent_user": args.agent_user,
                    "group": args.group,
                    "admin_group": args.admin_group,
                    "socket": args.socket,
                    "log_dir": args.log_dir,
                    "home": args.home,
                    "sysconf_dir": args.sysconf_dir,
                    "share_dir": args.share_dir,
                    "agents": args.agent_pool,
                    "pam_service": args.pam_service,
                }.items()
                if v is not None
            }
        )
        try:
            provision.init(layout)
        except provision.InitError as exc:
            print(f"aaau-server init: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "check-config":
        return _check_config(args)
    return _run_server(args)


def _settings(args: argparse.Namespace) -> tuple[Config, dict[str, Any], str | None]:
    """The config file's settings with the command line's over them; raises ConfigError."""
    overrides = {k: getattr(args, k) for k in _OVERRIDES}
    if overrides.get("svc_allowlist") is not None:
        overrides["svc_allowlist"] = tuple(overrides["svc_allowlist"])
    for table in ("asys_grants", "agent_grants"):
        if overrides.get(table) is not None:
            overrides[table] = dict(overrides[table])
    path = default_path(args.config)
    try:
        return load(path).with_overrides(**overrides), overrides, path
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_config(args: argparse.Namespace) -> int:
    try:
        config, _, path = _settings(args)
    except ConfigError as exc:
        print(f"aaau-server: {exc}", file=sys.stderr)
        return 1
    problems = []
    for name in (config.group, config.admin_group):
        try:
            grp.getgrnam(name)
        except KeyError:
            problems.append(f"group {name} does not exist (aaau-server init makes it)")
    settings = codec.converter.unstructure(config)
    if args.json:
        print(json.dumps({"config_file": path, "problems": problems, "settings": settings}))
    else:
        print(f"# {path or 'no config file: the defaults'}")
        for key, value in settings.items():
            print(f"{key} = {json.dumps(value)}")
        for problem in problems:
            print(f"aaau-server: {problem}", file=sys.stderr)
    return 1 if problems else 0


#: the options of `run` that override the config file
_OVERRIDES = (
    "agent_user",
    "agent_pool",
    "pam_service",
    "identity",
    "state_dir",
    "cgroup_base",
    "session_pids_max",
    "session_memory_max",
    "session_nofile",
    "group",
    "admin_group",
    "socket",
    "log_dir",
    "handshake_timeout",
    "max_frame",
    "clients_per_session",
    "max_sessions",
    "sessions_per_user",
    "scrollback_bytes",
    "client_queue_bytes",
    "kill_grace",
    "record_output",
    "journald",
    "journal_socket",
    "svc_allowlist",
    "asys_grants",
    "agent_grants",
    "agent_asys_rate",
    "agent_asys_burst",
    "asys_dir",
)


def _run_server(args: argparse.Namespace) -> int:
    import trio

    from .server import Server, StartupError

    try:
        config, overrides, config_file = _settings(args)
    except ConfigError as exc:
        print(f"aaau-server: {exc}", file=sys.stderr)
        return 1
    ready_fd = args.ready_fd
    pid_file = args.pid_file
    if args.daemon:
        pid_file = pid_file or os.path.join(os.path.dirname(config.socket), "aaau-server.pid")
        try:
            ready_fd = _daemonize(config)
        except (OSError, KeyError, paths.UnsafePath) as exc:
            print(f"aaau-server: cannot start in the background: {exc}", file=sys.stderr)
            return 1
    notify.take_from_environment()
    oplog.configure(args.log_level)
    server = Server(config, config_file=config_file, overrides=overrides)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            if pid_file:
                _write_pid_file(pid_file)
            notify.notify(
                "READY=1", f"STATUS=listening on {config.socket}", f"MAINPID={os.getpid()}"
            )
            if ready_fd is not None:
                os.write(ready_fd, b"READY\n")
                os.close(ready_fd)

    try:
        trio.run(main)
    except BaseException as exc:
        leaf = innermost(exc)
        if isinstance(leaf, StartupError | OSError):
            print(f"aaau-server: {leaf}", file=sys.stderr)
            if args.daemon and ready_fd is not None:  # the parent says it where it was started
                with contextlib.suppress(OSError):
                    os.write(ready_fd, f"ERROR {leaf}\n".encode())
            return 1
        raise
    finally:
        if pid_file:
            with contextlib.suppress(OSError):
                if Path(pid_file).read_text().strip() == str(os.getpid()):
                    os.unlink(pid_file)
    return 0


def _write_pid_file(path: str) -> None:
    """The server's pid, for scripts and init systems that want one (0644, replaced whole)."""
    directory, name = paths.directory_of(path)
    dir_fd = paths.open_dir(directory)
    try:
        tmp = f".{name}.{os.getpid()}"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd
        )
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _daemonize(config: Config) -> int:
    """Fork into the background. The parent waits for the child's word: READY (exit 0),
    or ERROR and why (printed on the parent's stderr, exit 1), so a failed start says
    why where it was started. The log directory is made as the server makes it
    (``root:ADMIN_GROUP 0750``, checked), and ``server.log`` goes there."""
    admin_gid = grp.getgrnam(config.admin_group).gr_gid
    os.close(paths.open_dir(config.log_dir, create=(0, admin_gid, 0o750)))
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            word = pipe.readline().decode(errors="replace").strip()
        if word == "READY":
            os._exit(0)
        why = (
            word.removeprefix("ERROR ")
            if word.startswith("ERROR ")
            else (f"the server stopped while starting; see {config.log_dir}/server.log")
        )
        print(f"aaau-server: {why}", file=sys.stderr)
        os._exit(1)
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    oplog.send_to_file(os.path.join(config.log_dir, "server.log"))
    return write_fd

"""Starting the agent on a fresh PTY under its own user.

:func:`plan` is pure: it turns a request and the agent's account into a
:class:`SpawnPlan` (argv, clean environment, ids, cwd, caps, sandbox).
:class:`Launcher` (the server's :class:`Spawner`) makes the session's cgroups
with their caps (:mod:`aaau.cgroups`), opens the PTY,
hands the slave to the agent user, and starts :mod:`aaau._launch` through
:func:`trio.lowlevel.open_process` with an empty environment and every other
fd closed; the privilege drop, PAM session and exec happen there. When the
agent has ended, :meth:`Launcher.release` closes its PAM session and removes
its cgroups.
"""

from __future__ import annotations

import grp
import json
import os
import subprocess
import sys
import termios
from typing import Protocol

import attrs
import trio

from . import agentconfig, cgroups
from .cgroups import SessionCgroups
from .config import Config, IdentityMode
from .identities import Account
from .pty import set_winsize

#: Variables a client's ``-e`` may not override: they say who the agent is.
PROTECTED_ENV = frozenset({"HOME", "USER", "LOGNAME", "SHELL", "AAAU_SESSION_ID", "AAAU_ASYS"})


#: How long the launcher may take to exec the agent (PAM included).
_START_TIMEOUT = 15.0
#: after the launcher reported an error, how long it may take to exit
_FAILED_EXIT_WAIT = 5.0


class SpawnError(Exception):
    """The agent could not be started; the message is meant for the client."""


@attrs.frozen
class SpawnPlan:
    user: str
    uid: int
    gid: int
    executable: str
    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str]
    pam_service: str
    #: caps of the session's cgroups (None: no cap)
    pids_max: int | None = None
    memory_max: int | None = None
    #: rlimits the launcher sets (lowered only: limits.conf may ask for less)
    rlimits: dict[str, int] = attrs.field(factory=dict)
    #: the sandbox: private_tmp, hide_processes, confine
    sandbox: dict[str, bool] = attrs.field(factory=dict)
    #: the cgroup directories the launcher joins (the Launcher fills them in)
    cgroups: tuple[str, ...] = ()
    #: the client has no terminal: no echo, no CRLF on the agent's terminal
    pipe: bool = False
    #: claude: the launcher adds (True) or removes (False) the aaau MCP server in
    #: ~/.claude.json, as the agent user (None: not claude)
    register_claude: bool | None = None
    mcp_command: tuple[str, ...] = ()
    #: claude or codex will start ``aaau mcp`` (the server preloads the MCP SDK)
    mcp_registered: bool = False


@attrs.frozen
class Agent:
    """A started agent: its process (the launcher became it), PTY master and pid."""

    process: trio.Process
    master_fd: int
    pty: str
    pid: int
    plan: SpawnPlan
    cgroups: SessionCgroups | None = None
    #: what the launcher reports it applied (the sandbox, the limits)
    notes: dict[str, str] = attrs.field(factory=dict)


class Spawner(Protocol):
    """How a session starts its agent and gives back what the agent held."""

    async def start(self, plan: SpawnPlan, *, rows: int, cols: int) -> Agent: ...

    async def release(self, agent: Agent) -> None: ...


class Launcher:
    """The server's spawner: cgroups with caps per session, the launcher, PAM."""

    def __init__(self, cgroup_base: str = "aaau") -> None:
        self.cgroup_base = cgroup_base
        self.hierarchies = cgroups.Hierarchies.discover()

    async def start(self, plan: SpawnPlan, *, rows: int, cols: int) -> Agent:
        caps = cgroups.Caps(pids_max=plan.pids_max, memory_max=plan.memory_max)
        made = cgroups.create(self.cgroup_base, plan.env["AAAU_SESSION_ID"], caps, self.hierarchies)
        plan = attrs.evolve(plan, cgroups=tuple(str(d) for d in made.dirs))
        try:
            agent = await spawn(plan, rows=rows, cols=cols)
        except BaseException:
            with trio.CancelScope(shield=True):
                await made.remove()
            raise
        notes = {**agent.notes, **{f"cap_{k}": v for k, v in made.enforced.items()}}
        return attrs.evolve(agent, cgroups=made, notes=notes)

    async def release(self, agent: Agent) -> None:
        if agent.cgroups is not None:
            await agent.cgroups.remove()
        await close_pam_session(agent.plan)


def _nproc(config: Config) -> int:
    """RLIMIT_NPROC counts every process of the agent user, in all its sessions."""
    sessions = {
        IdentityMode.SESSION: 1,
        IdentityMode.MEMBER: config.sessions_per_user,
        IdentityMode.SHARED: config.max_sessions,
    }[config.identity]
    return config.session_pids_max * sessions


def plan(
    config: Config,
    account: Account,
    *,
    session_id: str,
    argv: tuple[str, ...] | None,
    term: str,
    cwd: str | None,
    extra_env: dict[str, str],
    pipe: bool = False,
    endpoint: str | None = None,
    mcp: bool = False,
) -> SpawnPlan:
    """What to run and how, built from scratch: nothing of the server's environment.

    ``endpoint``: the session's ASys endpoint (``$AAAU_ASYS``; None: the agent has
    no ASys); ``mcp``: register ``aaau mcp`` with claude or codex (see
    :mod:`aaau.agentconfig`)."""
    if account.uid == 0 or account.gid == 0:
        raise SpawnError(f"agent user {account.user} is root: refusing to run agents")
    shell = account.shell or "/bin/sh"
    executable, full_argv = _program(config, argv, shell)
    env = _environment(config, account, shell, term, session_id, extra_env)
    if endpoint is not None:
        env[agentconfig.ENV] = endpoint
    kind = agentconfig.agent_kind(executable) if argv or config.default_program else None
    command = mcp_command()
    register = mcp and endpoint is not None and config.mcp
    if kind == "codex" and register and endpoint is not None:
        full_argv = agentconfig.codex_argv(full_argv, list(command), endpoint)
    return SpawnPlan(
        user=account.user,
        uid=account.uid,
        gid=account.gid,
        executable=executable,
        argv=full_argv,
        cwd=cwd or account.home,
        env=env,
        pam_service=config.pam_service,
        pids_max=config.session_pids_max,
        memory_max=config.session_memory_max or None,
        rlimits={"RLIMIT_NPROC": _nproc(config), "RLIMIT_NOFILE": config.session_nofile},
        sandbox={
            "private_tmp": config.private_tmp,
            "hide_processes": config.hide_processes,
            "confine": config.confine,
        },
        pipe=pipe,
        register_claude=register if kind == "claude" else None,
        mcp_command=command,
        mcp_registered=register and kind is not None,
    )


def _program(
    config: Config, argv: tuple[str, ...] | None, shell: str
) -> tuple[str, tuple[str, ...]]:
    """The executable and its argv: the client's, the server's default, or a login shell."""
    if argv is None:
        argv = config.default_program or None
    if argv is None:
        # the agent user's shell as a login shell, by the argv[0] convention
        return shell, ("-" + os.path.basename(shell),)
    return argv[0], tuple(argv)


def _environment(
    config: Config,
    account: Account,
    shell: str,
    term: str,
    session_id: str,
    extra_env: dict[str, str],
) -> dict[str, str]:
    bad = sorted(PROTECTED_ENV & extra_env.keys())
    if bad:
        raise SpawnError(f"environment variables may not be set by a client: {', '.join(bad)}")
    env = {"PATH": config.path, "LANG": config.lang, **extra_env}
    env.update(
        HOME=account.home,
        USER=account.user,
        LOGNAME=account.user,
        SHELL=shell,
        TERM=term,
        AAAU_SESSION_ID=session_id,
    )
    return env


def mcp_command() -> tuple[str, ...]:
    """How the agent starts ``aaau mcp``: the client installed beside this interpreter."""
    beside = os.path.join(os.path.dirname(sys.executable), "aaau")
    if os.access(beside, os.X_OK):
        return (beside, "mcp")
    return (sys.executable, "-I", "-m", "aaau", "mcp")


def quiet_terminal(fd: int) -> None:
    """For a client with no terminal: input is not echoed, output keeps its newlines."""
    mode = termios.tcgetattr(fd)
    mode[1] &= ~termios.ONLCR  # oflag
    mode[3] &= ~(termios.ECHO | termios.ECHONL)  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, mode)


def _tty_gid() -> int:
    try:
        return grp.getgrnam("tty").gr_gid
    except KeyError:
        return 0


def _plan_fd(p: SpawnPlan) -> int:
    """The plan in a memfd: never in argv or the environment, where others could read it."""
    fd = os.memfd_create("aaau-plan", os.MFD_CLOEXEC)
    os.write(fd, json.dumps(attrs.asdict(p)).encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


async def _read_status(fd: int) -> bytes:
    stream = trio.lowlevel.FdStream(fd)
    chunks = []
    async with stream:
        while chunk := await stream.receive_some(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def _parse_status(status: bytes) -> tuple[str | None, dict[str, str]]:
    """The launcher's report: ``error:`` (it failed) and ``note:name=text`` lines."""
    error, notes = None, {}
    for line in status.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        if key == "error":
            error = value
        elif key == "note":
            name, _, text = value.partition("=")
            notes[name] = text
    return error, notes


async def spawn(p: SpawnPlan, *, rows: int, cols: int) -> Agent:
    """Start the agent. Raises SpawnError with a client-facing message on failure."""
    master, slave = os.openpty()
    plan_fd = status_r = status_w = -1
    try:
        set_winsize(master, rows, cols)
        if p.pipe:
            quiet_terminal(slave)
        pty = os.ttyname(slave)
        os.fchown(slave, p.uid, _tty_gid())  # through the fd, never the name
        os.fchmod(slave, 0o620)
        plan_fd = _plan_fd(p)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        process = await trio.lowlevel.open_process(
            [sys.executable, "-I", "-m", "aaau._launch", str(plan_fd), str(status_w)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            close_fds=True,
            pass_fds=(plan_fd, status_w),
            env={},
            cwd="/",
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        for fd in (slave, plan_fd, status_w):
            if fd >= 0:
                os.close(fd)
    try:
        with trio.fail_after(_START_TIMEOUT):
            status = await _read_status(status_r)
    except trio.TooSlowError:
        process.kill()
        await process.wait()
        os.close(master)
        raise SpawnError("the agent did not start in time") from None
    except BaseException:
        process.kill()
        os.close(master)
        raise
    error, notes = _parse_status(status)
    if error is not None:
        with trio.move_on_after(_FAILED_EXIT_WAIT):
            await process.wait()
        if process.returncode is None:
            process.kill()
        os.close(master)
        raise SpawnError(error)
    return Agent(process=process, master_fd=master, pty=pty, pid=process.pid, plan=p, notes=notes)


async def close_pam_session(p: SpawnPlan) -> None:
    """Close the agent's PAM session once it has ended (see :mod:`aaau._launch`)."""
    plan_fd = _plan_fd(p)
    try:
        with trio.move_on_after(_START_TIMEOUT):
            await trio.run_process(
                [sys.executable, "-I", "-m", "aaau._launch", "close", str(plan_fd)],
                pass_fds=(plan_fd,),
                env={},
                cwd="/",
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    finally:
        os.close(plan_fd)

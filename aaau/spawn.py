"""Starting the agent on a fresh PTY under its own user.

:func:`plan` is pure: it turns a request and the agent's passwd entry into a
:class:`SpawnPlan` (argv, clean environment, ids, cwd). :class:`Launcher`
(the server's :class:`Spawner`) makes the session's cgroup, opens the PTY,
hands the slave to the agent user, and starts :mod:`aaau._launch` through
:func:`trio.lowlevel.open_process` with an empty environment and every other
fd closed; the privilege drop, PAM session and exec happen there. When the
agent has ended, :meth:`Launcher.release` closes its PAM session and removes
its cgroup.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Protocol

import attrs
import trio

from . import reaper
from .config import Config
from .pty import set_winsize

#: Variables a client's ``-e`` may not override: they say who the agent is.
PROTECTED_ENV = frozenset({"HOME", "USER", "LOGNAME", "SHELL", "AAAU_SESSION_ID"})


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
    cgroup: str | None = None


@attrs.frozen
class Agent:
    """A started agent: its process (the launcher became it), PTY master and pid."""

    process: trio.Process
    master_fd: int
    pty: str
    pid: int
    plan: SpawnPlan
    cgroup: Path | None = None


class Spawner(Protocol):
    """How a session starts its agent and gives back what the agent held."""

    async def start(self, plan: SpawnPlan, *, rows: int, cols: int) -> Agent: ...

    async def release(self, agent: Agent) -> None: ...


class Launcher:
    """The server's spawner: a cgroup per session, the launcher, PAM."""

    async def start(self, plan: SpawnPlan, *, rows: int, cols: int) -> Agent:
        cgroup = reaper.make_session_cgroup(plan.env["AAAU_SESSION_ID"])
        plan = attrs.evolve(plan, cgroup=str(cgroup) if cgroup is not None else None)
        try:
            return attrs.evolve(await spawn(plan, rows=rows, cols=cols), cgroup=cgroup)
        except BaseException:
            if cgroup is not None:
                with trio.CancelScope(shield=True):
                    await reaper.remove_cgroup(cgroup)
            raise

    async def release(self, agent: Agent) -> None:
        if agent.cgroup is not None:
            await reaper.remove_cgroup(agent.cgroup)
        await close_pam_session(agent.plan)


def plan(
    config: Config,
    agent: pwd.struct_passwd,
    *,
    session_id: str,
    argv: tuple[str, ...] | None,
    term: str,
    cwd: str | None,
    extra_env: dict[str, str],
) -> SpawnPlan:
    """What to run and how, built from scratch: nothing of the server's environment."""
    if agent.pw_uid == 0 or agent.pw_gid == 0:
        raise SpawnError(f"agent user {agent.pw_name} is root: refusing to run agents")
    shell = agent.pw_shell or "/bin/sh"
    if argv is None:
        argv = config.default_program or None
    full_argv: tuple[str, ...]
    if argv is None:
        # the agent user's shell as a login shell, by the argv[0] convention
        executable, full_argv = shell, ("-" + os.path.basename(shell),)
    else:
        executable, full_argv = argv[0], tuple(argv)
    bad = sorted(PROTECTED_ENV & extra_env.keys())
    if bad:
        raise SpawnError(f"environment variables may not be set by a client: {', '.join(bad)}")
    env = {"PATH": config.path, "LANG": config.lang, **extra_env}
    env.update(
        HOME=agent.pw_dir,
        USER=agent.pw_name,
        LOGNAME=agent.pw_name,
        SHELL=shell,
        TERM=term,
        AAAU_SESSION_ID=session_id,
    )
    return SpawnPlan(
        user=agent.pw_name,
        uid=agent.pw_uid,
        gid=agent.pw_gid,
        executable=executable,
        argv=full_argv,
        cwd=cwd or agent.pw_dir,
        env=env,
        pam_service=config.pam_service,
    )


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


async def spawn(p: SpawnPlan, *, rows: int, cols: int) -> Agent:
    """Start the agent. Raises SpawnError with a client-facing message on failure."""
    master, slave = os.openpty()
    plan_fd = status_r = status_w = -1
    try:
        set_winsize(master, rows, cols)
        pty = os.ttyname(slave)
        os.chown(pty, p.uid, _tty_gid())
        os.chmod(pty, 0o620)
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
    error = None
    for line in status.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        if key == "error":
            error = value
    if error is not None:
        with trio.move_on_after(_FAILED_EXIT_WAIT):
            await process.wait()
        if process.returncode is None:
            process.kill()
        os.close(master)
        raise SpawnError(error)
    return Agent(process=process, master_fd=master, pty=pty, pid=process.pid, plan=p)


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

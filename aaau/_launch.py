"""The agent's launcher: a fresh, single-threaded process between server and agent.

The server starts ``python -I -m aaau._launch PLAN_FD STATUS_FD`` as root, in
a new session, with the PTY slave as fds 0-2, an empty environment and every
other fd closed. This keeps all Python code between fork and exec out of the
(possibly multi-threaded) server. The launcher:

1. takes the PTY as its controlling terminal;
2. moves itself into the session's cgroup, if the server made one;
3. opens a PAM session for the agent user (service ``aaau``: pam_limits);
4. forks the agent, which makes its own process group the terminal's
   foreground group, drops to the agent user (initgroups, setgid, setuid),
   enters its working directory and execs argv with the clean environment;
5. waits for the agent, closes the PAM session and exits with the agent's
   status (killing itself with the same signal if a signal ended it).

Progress goes to STATUS_FD as lines: ``pid:N`` once the agent is forked,
``error:TEXT`` if anything fails before the agent's exec. The fd is
close-on-exec, so EOF with no error means the exec happened.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import signal
import sys
import termios
from typing import Any, NoReturn

_KEYBOARD_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def _report(status_fd: int, line: str) -> None:
    data = (line.replace("\n", " ") + "\n").encode("utf-8", "replace")
    with contextlib.suppress(OSError):
        os.write(status_fd, data)


def _fail(status_fd: int, message: str) -> NoReturn:
    _report(status_fd, "error:" + message)
    os._exit(127)


def _child(plan: dict[str, Any], status_fd: int) -> NoReturn:
    """In the forked agent: drop to the agent user and exec. Never returns."""
    try:
        os.setpgid(0, 0)
        os.tcsetpgrp(0, os.getpid())
        os.initgroups(plan["user"], plan["gid"])
        os.setgid(plan["gid"])
        os.setuid(plan["uid"])
    except OSError as exc:
        _fail(status_fd, f"cannot become user {plan['user']}: {exc.strerror}")
    if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0:
        _fail(status_fd, "refusing to run the agent as root")
    try:
        os.chdir(plan["cwd"])
    except OSError as exc:
        _fail(
            status_fd,
            f"cannot enter working directory {plan['cwd']} as {plan['user']}: {exc.strerror}",
        )
    for sig in (*_KEYBOARD_SIGNALS, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    executable = plan["executable"]
    try:
        os.execvpe(executable, plan["argv"], plan["env"])
    except FileNotFoundError:
        _fail(status_fd, f"program not found: {executable}")
    except PermissionError:
        _fail(status_fd, f"program not executable by {plan['user']}: {executable}")
    except OSError as exc:
        _fail(status_fd, f"cannot execute {executable}: {exc.strerror}")


def _open_pam(plan: dict[str, Any], status_fd: int) -> Any:
    import pam

    handle = pam.PamAuthenticator()
    service = plan["pam_service"]
    if not handle.authenticate(plan["user"], "", service=service, call_end=False, resetcreds=False):
        _fail(status_fd, f"PAM service {service} refused {plan['user']}: {handle.reason}")
    if handle.open_session() != 0:
        _fail(status_fd, f"PAM service {service} could not open a session: {handle.reason}")
    return handle


def main(argv: list[str]) -> NoReturn:
    plan_fd, status_fd = int(argv[1]), int(argv[2])
    os.set_inheritable(status_fd, False)
    with os.fdopen(plan_fd, "rb") as f:
        plan = json.loads(f.read())
    for sig in _KEYBOARD_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    except OSError as exc:
        _fail(status_fd, f"cannot take the terminal: {exc.strerror}")
    if plan["uid"] == 0 or plan["gid"] == 0:
        _fail(status_fd, "refusing to run the agent as root")
    if plan.get("cgroup"):
        try:
            with open(os.path.join(plan["cgroup"], "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
        except OSError as exc:
            _fail(status_fd, f"cannot join cgroup {plan['cgroup']}: {exc.strerror}")
    pam_handle = _open_pam(plan, status_fd)

    pid = os.fork()
    if pid == 0:
        _child(plan, status_fd)
    _report(status_fd, f"pid:{pid}")
    os.close(status_fd)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            os.killpg(pid, signum)

    signal.signal(signal.SIGHUP, forward)
    signal.signal(signal.SIGTERM, forward)
    _, wstatus = os.waitpid(pid, 0)
    pam_handle.close_session()
    pam_handle.end()
    if os.WIFSIGNALED(wstatus):
        dead_by: int = os.WTERMSIG(wstatus)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if dead_by not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(dead_by, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [dead_by])
        os.kill(os.getpid(), dead_by)
        os._exit(128 + dead_by)
    os._exit(os.waitstatus_to_exitcode(wstatus))


if __name__ == "__main__":
    main(sys.argv)

"""The agent's launcher: a fresh, single-threaded process that becomes the agent.

The server starts ``python -I -m aaau._launch PLAN_FD STATUS_FD`` as root, in
a new session, with the PTY slave as fds 0-2, an empty environment and every
other fd closed. This keeps all Python code between fork and exec out of the
(possibly multi-threaded) server. The launcher, in one process:

1. takes the PTY as its controlling terminal (it is the session leader, so its
   process group becomes the terminal's foreground group);
2. moves itself into the session's cgroups (membership, caps);
3. opens a PAM session for the agent user (service ``aaau``: pam_limits sets
   the limits of this process, which the agent keeps across exec), then lowers
   RLIMIT_NPROC and RLIMIT_NOFILE to the session's caps;
4. builds the sandbox's mounts (:mod:`aaau._sandbox`: its own /tmp, /var/tmp,
   /dev/shm and /proc);
5. drops to the agent user (initgroups, setgid, setuid; never root), sets
   no_new_privs and its Landlock scope, enters the working directory, closes
   every fd but 0-2, and execs argv with the clean environment. For claude, it
   first adds (or removes) the session's ASys MCP server in the agent's
   ``~/.claude.json``, as the agent user (:mod:`aaau.agentconfig`). The server is
   the agent's parent and reaps it.

Errors before the exec go to STATUS_FD as one line ``error:TEXT``; what was
applied goes there as ``note:NAME=TEXT`` lines; the fd is close-on-exec, so EOF
with no error means the exec happened.

``python -I -m aaau._launch close PLAN_FD`` closes the agent's PAM session
once the agent has ended (the server runs it then): a new PAM transaction for
the same user and service, as the modules of /etc/pam.d/aaau (pam_limits,
pam_unix) need nothing else from the process that opened it.
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

from aaau import _sandbox, agentconfig

_KEYBOARD_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def _fail(status_fd: int, message: str, pam_handle: Any = None) -> NoReturn:
    data = ("error:" + message.replace("\n", " ") + "\n").encode("utf-8", "replace")
    with contextlib.suppress(OSError):
        os.write(status_fd, data)
    if pam_handle is not None:
        pam_handle.close_session()
        pam_handle.end()
    os._exit(127)


def _note(status_fd: int, name: str, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(status_fd, f"note:{name}={text}\n".encode("utf-8", "replace"))


def _lower_limits(plan: dict[str, Any], status_fd: int, pam_handle: Any) -> None:
    """The session's caps, where they are lower than what PAM (limits.conf) set."""
    for name, cap in plan.get("rlimits", {}).items():
        which = getattr(resource, name)
        soft, hard = resource.getrlimit(which)
        infinite = resource.RLIM_INFINITY
        hard = cap if hard == infinite else min(hard, cap)
        soft = hard if soft == infinite else min(soft, hard)
        try:
            resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError) as exc:
            _fail(status_fd, f"cannot set {name}: {exc}", pam_handle)
        _note(status_fd, name.lower(), str(hard))


def _private_mounts(plan: dict[str, Any], status_fd: int, pam_handle: Any) -> None:
    box = plan.get("sandbox", {})
    try:
        _sandbox.private_mounts(
            private_tmp=box.get("private_tmp", False),
            hide_processes=box.get("hide_processes", False),
        )
    except OSError as exc:
        _fail(
            status_fd,
            f"cannot build the agent's sandbox ({exc.strerror}); an admin can turn off "
            "private_tmp or hide_processes in the server's config",
            pam_handle,
        )
    _note(status_fd, "private_tmp", str(bool(box.get("private_tmp"))).lower())
    _note(status_fd, "hide_processes", str(bool(box.get("hide_processes"))).lower())


def _pam(plan: dict[str, Any]) -> tuple[Any, str | None]:
    """A PAM handle after authentication for the agent user, or the reason it failed."""
    import pam

    handle = pam.PamAuthenticator()
    service = plan["pam_service"]
    if not handle.authenticate(plan["user"], "", service=service, call_end=False, resetcreds=False):
        return None, f"PAM service {service} refused {plan['user']}: {handle.reason}"
    return handle, None


def _become_agent(plan: dict[str, Any], status_fd: int, pam_handle: Any) -> NoReturn:
    """Drop to the agent user and exec argv. Never returns."""
    try:
        os.initgroups(plan["user"], plan["gid"])
        os.setgid(plan["gid"])
        os.setuid(plan["uid"])
    except OSError as exc:
        _fail(status_fd, f"cannot become user {plan['user']}: {exc.strerror}", pam_handle)
    if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0:
        _fail(status_fd, "refusing to run the agent as root", pam_handle)
    if plan.get("sandbox", {}).get("confine"):
        try:
            _note(status_fd, "confine", _sandbox.confine())
        except OSError as exc:
            _fail(status_fd, f"cannot confine the agent: {exc.strerror}", pam_handle)
    try:
        os.chdir(plan["cwd"])
    except OSError as exc:
        _fail(
            status_fd,
            f"cannot enter working directory {plan['cwd']} as {plan['user']}: {exc.strerror}",
            pam_handle,
        )
    if plan.get("register_claude") is not None:  # as the agent user: its own file
        note = agentconfig.register_claude(
            plan["env"]["HOME"], list(plan["mcp_command"]), plan["register_claude"]
        )
        _note(status_fd, "mcp", note)
    # Python ignores SIGPIPE and SIGXFSZ at start-up: give the agent the defaults
    for sig in (*_KEYBOARD_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # whatever PAM modules opened stays out of the agent
    os.closerange(3, status_fd)
    os.closerange(status_fd + 1, os.sysconf("SC_OPEN_MAX"))
    executable = plan["executable"]
    try:
        os.execvpe(executable, plan["argv"], plan["env"])
    except FileNotFoundError:
        _fail(status_fd, f"program not found: {executable}", pam_handle)
    except PermissionError:
        _fail(status_fd, f"program not executable by {plan['user']}: {executable}", pam_handle)
    except OSError as exc:
        _fail(status_fd, f"cannot execute {executable}: {exc.strerror}", pam_handle)


def _read_plan(plan_fd: int) -> dict[str, Any]:
    with os.fdopen(plan_fd, "rb") as f:
        plan: dict[str, Any] = json.loads(f.read())
    return plan


def launch(plan_fd: int, status_fd: int) -> NoReturn:
    os.set_inheritable(status_fd, False)
    plan = _read_plan(plan_fd)
    for sig in _KEYBOARD_SIGNALS:  # until the exec: a stray ^C must not kill us half-way
        signal.signal(sig, signal.SIG_IGN)
    try:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    except OSError as exc:
        _fail(status_fd, f"cannot take the terminal: {exc.strerror}")
    if plan["uid"] == 0 or plan["gid"] == 0:
        _fail(status_fd, "refusing to run the agent as root")
    for directory in plan.get("cgroups", ()):
        try:
            with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
        except OSError as exc:
            _fail(status_fd, f"cannot join cgroup {directory}: {exc.strerror}")
    handle, error = _pam(plan)
    if error is not None:
        _fail(status_fd, error)
    if handle.open_session() != 0:
        _fail(
            status_fd,
            f"PAM service {plan['pam_service']} could not open a session: {handle.reason}",
        )
    _lower_limits(plan, status_fd, handle)
    _private_mounts(plan, status_fd, handle)
    _become_agent(plan, status_fd, handle)


def close(plan_fd: int) -> int:
    handle, error = _pam(_read_plan(plan_fd))
    if error is not None:
        print(error, file=sys.stderr)
        return 1
    code = handle.close_session()
    handle.end()
    return 0 if code == 0 else 1


def main(argv: list[str]) -> NoReturn:
    if argv[1] == "close":
        os._exit(close(int(argv[2])))
    launch(int(argv[1]), int(argv[2]))


if __name__ == "__main__":
    main(sys.argv)

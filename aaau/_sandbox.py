"""The agent's sandbox, set up by the launcher (as root, single-threaded, before exec).

- :func:`private_mounts`: a mount namespace of the agent's own, with fresh
  tmpfs on /tmp, /var/tmp and /dev/shm (nothing shared with other sessions,
  gone with the session), and, if asked, a /proc mounted ``hidepid=invisible``
  (the agent sees its own identity's processes only).
- :func:`confine`: ``no_new_privs`` (no setuid gain) and a Landlock domain of
  the session's own that scopes signals and abstract Unix sockets (Linux 6.12,
  Landlock ABI 6): no process of the session can signal, ptrace or connect to
  an abstract socket of a process outside it. Where Landlock is older or off,
  only ``no_new_privs`` applies, and the caller is told.

Linux only; ctypes, because Python 3.11 has no ``os.unshare`` or ``mount``.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_SLAVE = 0x4000, 0x80000
PR_SET_NO_NEW_PRIVS = 38
#: the Landlock system calls have the same numbers on every architecture
_LANDLOCK_CREATE_RULESET, _LANDLOCK_RESTRICT_SELF = 444, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1, 2
#: the first Landlock ABI with scopes
_SCOPES_ABI = 6

PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def private_mounts(*, private_tmp: bool, hide_processes: bool) -> None:
    """Enter a mount namespace of our own and mount what the options ask for."""
    if not (private_tmp or hide_processes):
        return
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # mounts made on the host later still show here; ours never show there
    _mount(None, "/", None, MS_REC | MS_SLAVE, "")
    if private_tmp:
        for path in PRIVATE_DIRS:
            if os.path.isdir(path):
                _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    if hide_processes:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 if there is none (or it is off)."""
    result = _libc.syscall(
        _LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), _LANDLOCK_CREATE_RULESET_VERSION
    )
    return max(0, int(result))


def confine() -> str:
    """no_new_privs, then a Landlock scope if the kernel has one; what was applied."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    abi = landlock_abi()
    if abi < _SCOPES_ABI:
        return f"no_new_privs; Landlock scopes unavailable (ABI {abi})"
    attr = _RulesetAttr(0, 0, _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL)
    fd = _check(
        _libc.syscall(
            _LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), 0
        ),
        "landlock_create_ruleset",
    )
    try:
        _check(_libc.syscall(_LANDLOCK_RESTRICT_SELF, fd, 0), "landlock_restrict_self")
    finally:
        os.close(fd)
    return f"no_new_privs; Landlock ABI {abi}: signals, ptrace and abstract sockets scoped"

"""Root never follows a path it did not make.

Every directory the server writes in (the socket's, the audit log's, its state,
the agent homes' parent) is opened component by component from ``/`` with
``O_NOFOLLOW``, and each component must be a real directory owned by root (or,
when not running as root, by us) that nobody else may write to. An ancestor
writable by everyone is accepted only with the sticky bit (like ``/tmp``:
nobody can rename or remove what root made in it); the directory itself never.
A missing directory is made by us, with its owner and mode, and checked again.
Files are opened relative to the checked directory's fd, with ``O_NOFOLLOW``,
and must be regular files we own with one link.

Anything else is :class:`UnsafePath`, which says what is wrong and why it
matters, and the server does not start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Final

from .errors import StartupError

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(StartupError, OSError):
    """A path another user controls (or could), or that is missing: root refuses it.

    An OSError too, so whoever handles a failed open handles this one.
    """


def _trusted_owners() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _check_dir(path: str, st: os.stat_result, *, ours: bool) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} is not a directory")
    if st.st_uid not in _trusted_owners():
        raise UnsafePath(
            f"{path} is owned by uid {st.st_uid}, not root: another user could replace "
            "what root puts there; remove it, or choose another place"
        )
    writable_by_others = st.st_mode & 0o022
    if writable_by_others and (ours or not st.st_mode & stat.S_ISVTX):
        raise UnsafePath(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
            "another user could put a link or a file of their choosing there; "
            "choose a directory only root can write"
        )


def open_dir(path: str, *, create: tuple[int, int, int] | None = None) -> int:
    """An fd of the checked directory ``path``; with ``create`` = (uid, gid, mode),
    made if missing (and its owner and mode set if it is ours)."""
    if not os.path.isabs(path):
        raise UnsafePath(f"{path} is not an absolute path")
    parts = [p for p in os.path.normpath(path).split("/") if p]
    fd = os.open("/", _DIR_FLAGS)
    walked = "/"
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            walked = os.path.join(walked, part)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None or not last:
                    raise UnsafePath(f"{walked} does not exist") from None
                os.mkdir(part, create[2], dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.fchown(child, create[0], create[1])
                os.fchmod(child, create[2])
            except OSError as exc:  # ELOOP/ENOTDIR: a symlink or a file where a directory is
                raise UnsafePath(f"{walked} is not a real directory ({exc.strerror})") from None
            os.close(fd)
            fd = child
            _check_dir(walked, os.fstat(fd), ours=last)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(dir_fd: int, name: str, flags: int, mode: int, where: str) -> int:
    """``name`` in a checked directory: never through a link, a regular file we own."""
    if "/" in name:
        raise ValueError(f"a name, not a path: {name!r}")
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{where}/{name} is a symbolic link: remove it") from None
        raise
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_uid not in _trusted_owners():
        problem = f"is owned by uid {st.st_uid}, not root"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} names (a hard link could point it elsewhere)"
    if problem is not None:
        os.close(fd)
        raise UnsafePath(f"{where}/{name} {problem}: remove it")
    return fd


def hold(fd: int, busy: str) -> int:
    """``fd``, exclusively flocked for as long as it stays open; if another process
    holds it, ``fd`` is closed and :class:`StartupError` says ``busy``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(busy) from None
    return fd


def directory_of(path: str) -> tuple[str, str]:
    """(directory, name) of an absolute file path."""
    directory, name = os.path.split(os.path.normpath(path))
    return directory or "/", name

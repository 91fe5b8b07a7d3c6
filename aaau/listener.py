"""The server's Unix socket: its directory, the lock, a stale socket, bind and rename.

The socket is bound under a temporary name, given its owner and mode, and
renamed into place, so no client ever sees it with the wrong permissions. A
``<socket>.lock`` file is flocked for the server's life (two servers starting
at once cannot both pass the live-socket check). The directory, the lock and
the socket are checked first (:mod:`aaau.paths`): root never uses a name
another user made or could change.

The admins' group is let through by POSIX ACLs on the socket and on its
directory when the directory is ours (:mod:`aaau.acl`), so being in the admin
group alone is enough. Under systemd the socket may come from ``aaau.socket``
(socket activation: ``$LISTEN_FDS``); it is used if it is a listening Unix
stream socket bound to the configured path, and left in place at the end.
"""

from __future__ import annotations

import contextlib
import os
import socket as _socket
import stat
from typing import Final

import structlog
import trio

from . import acl, paths
from .errors import StartupError
from .paths import UnsafePath

log = structlog.get_logger("aaau.listener")

#: pending connections the kernel queues before accept
BACKLOG: Final = 128

#: the first fd systemd passes (sd_listen_fds(3))
_LISTEN_FDS_START: Final = 3


class SocketLock:
    """``<socket>.lock``, held (flock) while the server runs."""

    def __init__(self, dir_fd: int, name: str, where: str) -> None:
        self.path = os.path.join(where, name)
        fd = paths.open_file(dir_fd, name, os.O_RDWR | os.O_CREAT, 0o600, where)
        self._fd = paths.hold(fd, f"another aaau server holds {self.path}")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _clear_stale(dir_fd: int, name: str, path: str) -> None:
    """Remove a socket nobody listens on; refuse if somebody does, or if it is no socket."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePath(f"{path} exists and is not a socket: remove it")
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(name, dir_fd=dir_fd)  # stale: nobody listens
    else:
        raise StartupError(f"a server is already listening on {path}")
    finally:
        probe.close()


def _let_admins_in(target: int | str, gid: int | None, what: str) -> None:
    if gid is None:
        return
    try:
        acl.let_group_in(target, gid)
    except OSError as exc:  # a file system without ACLs: admins need both groups
        log.warning("admin-acl-failed", target=what, error=exc.strerror or str(exc))


def activated(environ: dict[str, str] | None = None) -> int | None:
    """The socket systemd passed (``$LISTEN_PID`` is us, ``$LISTEN_FDS`` >= 1), or None."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or int(env.get("LISTEN_FDS") or 0) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the agents
    return _LISTEN_FDS_START


def _inherited(fd: int, path: str) -> trio.socket.SocketType:
    """The socket systemd made: it must be a listening Unix stream socket at ``path``."""
    sock = _socket.socket(fileno=fd)
    try:
        bound = sock.getsockname()
        listening = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN)
        if sock.family != _socket.AF_UNIX or sock.type != _socket.SOCK_STREAM or not listening:
            raise StartupError(
                f"the socket passed by systemd (fd {fd}) is not a listening Unix stream socket"
            )
        if bound != path:
            raise StartupError(
                f"the socket passed by systemd is {bound!r}, the configured one "
                f"{path}: make ListenStream= and --socket (socket =) agree"
            )
    except BaseException:
        sock.detach()
        raise
    sock.setblocking(False)
    return trio.socket.from_stdlib_socket(sock)


async def listen(
    path: str, gid: int, admin_gid: int | None = None, *, inherited: int | None = None
) -> tuple[trio.SocketListener, SocketLock]:
    """The listening socket at ``path`` (``root:gid 0660``), and the lock held for it.

    The socket's directory is checked (or made ``root:gid 0750``) by
    :mod:`aaau.paths`: nobody else can write there, so nobody can race the
    temporary name between bind and rename. ``inherited``: the fd of a socket
    systemd made there (it is checked, and given the admins' ACL).
    """
    directory, name = paths.directory_of(path)
    dir_fd = paths.open_dir(directory, create=(0, gid, 0o750))
    try:
        st = os.fstat(dir_fd)
        if (st.st_uid, st.st_gid) == (0, gid):  # ours (not /run or /tmp): let admins through
            _let_admins_in(dir_fd, admin_gid, directory)
        lock = SocketLock(dir_fd, name + ".lock", directory)
        if inherited is not None:
            try:
                sock = _inherited(inherited, path)
                _let_admins_in(path, admin_gid, path)
            except BaseException:
                lock.release()
                raise
            return trio.SocketListener(sock), lock
        try:
            _clear_stale(dir_fd, name, path)
            tmp = f".{name}.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            sock = await _bind(os.path.join(directory, tmp))
            try:
                os.chown(tmp, 0, gid, dir_fd=dir_fd, follow_symlinks=False)
                os.chmod(os.path.join(directory, tmp), 0o660)
                _let_admins_in(os.path.join(directory, tmp), admin_gid, path)
                sock.listen(BACKLOG)
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            lock.release()
            raise
    finally:
        os.close(dir_fd)
    return trio.SocketListener(sock), lock


async def _bind(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600 until it has its group: no client sees it half-made
    try:
        await sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock

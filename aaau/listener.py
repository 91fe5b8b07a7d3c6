"""The server's Unix socket: its directory, the lock, a stale socket, bind and rename.

The socket is bound under a temporary name, given its owner and mode, and
renamed into place, so no client ever sees it with the wrong permissions. A
``<socket>.lock`` file is flocked for the server's life (two servers starting
at once cannot both pass the live-socket check). The directory, the lock and
the socket are checked first (:mod:`aaau.paths`): root never uses a name
another user made or could change.
"""

from __future__ import annotations

import contextlib
import os
import socket as _socket
import stat
from typing import Final

import trio

from . import paths
from .errors import StartupError
from .paths import UnsafePath

#: pending connections the kernel queues before accept
BACKLOG: Final = 128


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


async def listen(path: str, gid: int) -> tuple[trio.SocketListener, SocketLock]:
    """The listening socket at ``path`` (``root:gid 0660``), and the lock held for it.

    The socket's directory is checked (or made ``root:gid 0750``) by
    :mod:`aaau.paths`: nobody else can write there, so nobody can race the
    temporary name between bind and rename.
    """
    directory, name = paths.directory_of(path)
    dir_fd = paths.open_dir(directory, create=(0, gid, 0o750))
    try:
        lock = SocketLock(dir_fd, name + ".lock", directory)
        try:
            _clear_stale(dir_fd, name, path)
            tmp = f".{name}.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            sock = await _bind(os.path.join(directory, tmp))
            try:
                os.chown(tmp, 0, gid, dir_fd=dir_fd, follow_symlinks=False)
                os.chmod(os.path.join(directory, tmp), 0o660)
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

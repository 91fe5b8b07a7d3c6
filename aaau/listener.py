"""The server's Unix socket: its directory, the lock, a stale socket, bind and rename.

The socket is bound under a temporary name, given its owner and mode, and
renamed into place, so no client ever sees it with the wrong permissions. A
``<socket>.lock`` file is flocked for the server's life (two servers starting
at once cannot both pass the live-socket check).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket as _socket
from typing import Final

import trio

from .errors import StartupError

#: pending connections the kernel queues before accept
BACKLOG: Final = 128


class SocketLock:
    """``<socket>.lock``, held (flock) while the server runs."""

    def __init__(self, path: str) -> None:
        self.path = path + ".lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another aaau server holds {self.path}") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _clear_stale(path: str) -> None:
    """Remove a socket nobody listens on; refuse if somebody does."""
    if not os.path.exists(path):
        return
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody listens
    else:
        raise StartupError(f"a server is already listening on {path}")
    finally:
        probe.close()


def _prepare(path: str, gid: int) -> tuple[SocketLock, str]:
    """The directory, the lock, no stale socket: the lock and a temporary name to bind."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o750)
        os.chown(directory, 0, gid)
    lock = SocketLock(path)
    try:
        _clear_stale(path)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    except BaseException:
        lock.release()
        raise
    return lock, tmp


async def listen(path: str, gid: int) -> tuple[trio.SocketListener, SocketLock]:
    """The listening socket at ``path`` (``root:gid 0660``), and the lock held for it."""
    lock, tmp = _prepare(path, gid)
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            await sock.bind(tmp)
        finally:
            os.umask(old)
        os.chown(tmp, 0, gid)
        os.chmod(tmp, 0o660)
        sock.listen(BACKLOG)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        lock.release()
        raise
    return trio.SocketListener(sock), lock

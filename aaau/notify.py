"""sd_notify(3): telling systemd the server is ready, reloading, stopping.

The protocol is one datagram of ``KEY=VALUE`` lines on ``$NOTIFY_SOCKET`` (a
path, or an abstract name written with a leading ``@``). Ten lines of code:
the maintained bindings (``systemd-python``, ``cysystemd``) need libsystemd's
headers and a compiler on the host, and ``sdnotify`` has been unmaintained
since 2017 (docs/design.md). The variable is taken out of the environment at
start, so no child (an agent) can speak for the server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

_address: str | None = None


def take_from_environment() -> bool:
    """Read and remove ``$NOTIFY_SOCKET``; whether systemd is listening."""
    global _address
    value = os.environ.pop("NOTIFY_SOCKET", None)
    if value and (value.startswith("/") or value.startswith("@")):
        _address = "\0" + value[1:] if value.startswith("@") else value
    return _address is not None


def notify(*lines: str) -> bool:
    """Send ``lines`` (``READY=1``, ``STATUS=...``); False if nobody listens or it fails
    (systemd's readiness is a courtesy: the server never fails for it)."""
    if _address is None:
        return False
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.sendto("\n".join(lines).encode(), _address)
        return True
    return False


def reloading() -> bool:
    """``RELOADING=1`` with the monotonic time systemd 253+ wants (older ones ignore it)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

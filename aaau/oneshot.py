"""One request, one answer, with the standard library only: ``aaau ls``, ``status``, ``kill``.

These commands are typed, and scripted in loops: they should start as fast as
``tmux ls``, not pay for Trio, cattrs and the terminal code (~200 ms on a
small machine) to send one frame and read one. The frame is the protocol's
(:mod:`aaau.protocol`: kind, big-endian length, payload) and the payload the
codec's JSON (:mod:`aaau.codec`), written here by hand for these three
requests; the tests check both against the real codec. The answer is read
with a size limit and checked for its type; everything printed from it goes
through :func:`aaau.text.printable` (a server at ``-s PATH`` may be anyone's).

Also here, light for the same reason: why a connection failed, said so that
a newcomer knows what to do (:func:`explain_connect`; the Trio client uses it).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import grp
import json
import os
import pwd
import shlex
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Final

from . import fields
from .fields import PROTOCOL_VERSION
from .text import printable

_HEADER: Final = struct.Struct(">BI")  # the protocol's frame header (aaau.protocol)
DATA: Final = 0
_CONTROL: Final = 1
_MAX_FRAME: Final = 16 << 20
TIMEOUT: Final = 30.0


class OneShotError(Exception):
    """What went wrong, in one line for the person who typed the command."""


def create(
    *,
    rows: int,
    cols: int,
    term: str,
    argv: tuple[str, ...] | None,
    share: bool = False,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    pipe: bool = False,
    keep: bool = False,
    grants: tuple[str, ...] | None = None,
    mcp: bool = False,
) -> dict[str, Any]:
    """``create``, checked as :class:`aaau.messages.Create` checks it (ValueError: why not);
    ``pipe``, ``keep``, ``grants`` and ``mcp`` left out at their defaults, as the codec does."""
    fields.check_dimension("rows", rows)
    fields.check_dimension("cols", cols)
    fields.check_term(term)
    fields.check_argv(argv)
    fields.check_cwd(cwd)
    fields.check_env(env or {})
    fields.check_grants(grants)
    message: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "rows": rows,
        "cols": cols,
        "term": term,
        "argv": list(argv) if argv is not None else None,
        "share": share,
        "cwd": cwd,
        "env": dict(env or {}),
    }
    message.update({k: True for k, on in (("pipe", pipe), ("keep", keep)) if on})
    if grants is not None:
        message["grants"] = list(grants)
    if mcp:
        message["mcp"] = True
    message["type"] = "create"
    return message


def join(
    session_id: str, role: str | None, rows: int | None = None, cols: int | None = None
) -> dict[str, Any]:
    """``join``, checked as :class:`aaau.messages.Join` checks it; no size, no fields."""
    fields.check_session_id(session_id)
    fields.check_dimension("rows", rows)
    fields.check_dimension("cols", cols)
    message: dict[str, Any] = {"version": PROTOCOL_VERSION, "session_id": session_id, "role": role}
    message.update({k: v for k, v in (("rows", rows), ("cols", cols)) if v is not None})
    message["type"] = "join"
    return message


def list_sessions() -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "type": "list_sessions"}


def query_status(session_id: str) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "session_id": _checked(session_id), "type": "query_status"}


def kill(session_id: str) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "session_id": _checked(session_id), "type": "kill"}


def revoke(session_id: str, instructions: tuple[str, ...]) -> dict[str, Any]:
    try:
        fields.check_grants(instructions)
    except ValueError as exc:
        raise OneShotError(str(exc)) from None
    return {
        "version": PROTOCOL_VERSION,
        "session_id": _checked(session_id),
        "instructions": list(instructions),
        "type": "revoke",
    }


def _checked(session_id: str) -> str:
    try:
        fields.check_session_id(session_id)
    except ValueError as exc:
        raise OneShotError(str(exc)) from None
    return session_id


def frame(message: dict[str, Any]) -> bytes:
    """The CONTROL frame of a message."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(_CONTROL, len(payload)) + payload


def data_frame(payload: bytes) -> bytes:
    """A DATA frame: terminal bytes, never interpreted."""
    return _HEADER.pack(DATA, len(payload)) + payload


Explain = Callable[[str, OSError], str]


def connect(
    path: str, timeout: float | None = None, explain: Explain | None = None
) -> socket.socket:
    """A connected socket to the server, or :class:`OneShotError` saying what to do
    (``explain``: how to say it; by default :func:`explain_connect`)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise OneShotError((explain or explain_connect)(path, exc)) from None
    return sock


class Link:
    """Frames over a blocking socket: out whole, in buffered and bounded (one read at a
    time, so a caller with a selector never blocks on a half-arrived frame)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self.pending: collections.deque[tuple[int, bytes]] = collections.deque()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> bool:
        """Read once, queue the whole frames that arrived; False when the server closed."""
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            return False
        self._buffer += chunk
        while len(self._buffer) >= _HEADER.size:
            kind, size = _HEADER.unpack_from(self._buffer)
            if size > _MAX_FRAME or kind not in (DATA, _CONTROL):
                raise OneShotError(f"protocol error from the server: frame kind {kind}, {size} B")
            if len(self._buffer) < _HEADER.size + size:
                break
            self.pending.append((kind, bytes(self._buffer[_HEADER.size : _HEADER.size + size])))
            del self._buffer[: _HEADER.size + size]
        return True

    def control(self) -> dict[str, Any]:
        """The next control message; terminal bytes before it are not for this caller."""
        while True:
            while self.pending:
                kind, payload = self.pending.popleft()
                if kind == _CONTROL:
                    return message_of(payload)
            if not self.read():
                raise OneShotError("the server closed the connection")


def message_of(payload: bytes) -> dict[str, Any]:
    """A control frame's message: a JSON object with a ``type``, or OneShotError."""
    try:
        message = json.loads(payload)
    except ValueError:
        raise OneShotError("protocol error from the server: a frame that is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise OneShotError("protocol error from the server: a message with no type")
    return message


def request(
    path: str, message: dict[str, Any], answer: str, explain: Explain | None = None
) -> dict[str, Any]:
    """Send ``message``, return the first control answer, which must be of type ``answer``
    (an ``error`` becomes :class:`OneShotError` with the server's words)."""
    with connect(path, TIMEOUT, explain) as sock:
        link = Link(sock)
        try:
            link.send(frame(message))
            reply = link.control()
        except TimeoutError:
            raise OneShotError(f"the server at {path} did not answer in {TIMEOUT:g} s") from None
        except OSError as exc:
            raise OneShotError(f"connection to the server lost: {exc.strerror or exc}") from None
    kind = reply["type"]
    if kind == "error":
        raise OneShotError(printable(str(reply.get("message", "the server refused"))))
    if kind != answer:
        raise OneShotError(f"protocol error from the server: {answer} expected, got {kind!r}")
    return reply


# --- aaau ls -----------------------------------------------------------------------------------

_ROLES: Final = {"readonly": "ro", "interactive": "rw", "admin": "admin"}


def _since(created_at: float, now: float) -> str:
    local, today = time.localtime(created_at), time.localtime(now)
    if now - created_at < 20 * 3600 and local.tm_yday == today.tm_yday:
        return time.strftime("%H:%M", local)
    return time.strftime("%b%d", local)


def _watching(clients: list[dict[str, Any]]) -> str:
    if not clients:
        return "-"
    return ",".join(f"{c.get('user')}({_ROLES.get(str(c.get('role')), '?')})" for c in clients)


def format_sessions(sessions: list[dict[str, Any]], now: float | None = None) -> str:
    """``aaau ls``: one line per session, every field made printable."""
    now = time.time() if now is None else now
    rows = [("SESSION", "CREATOR", "SINCE", "SIZE", "WATCHING", "COMMAND")]
    for s in sessions:
        argv = [str(a) for a in s.get("argv") or ()]
        rows.append(
            (
                str(s.get("session_id")),
                str(s.get("creator")),
                _since(float(s.get("created_at") or 0), now),
                f"{s.get('cols')}x{s.get('rows')}",
                _watching(list(s.get("clients") or ())),
                shlex.join(argv) if argv else "(login shell)",
            )
        )
    cells = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True))
        + "  "
        + row[5]
        for row in cells
    )


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# --- why a connection failed ---------------------------------------------------------------------


def explain_connect(path: str, exc: OSError) -> str:
    """Why a connection failed, said so that a newcomer knows what to do next."""
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return (
            f"no aaau server is running at {path} (an admin starts it: systemctl start "
            "aaau.socket, or aaau-server run --daemon; another server: -s PATH or $AAAU_SOCKET)"
        )
    if exc.errno == errno.EACCES:
        return f"cannot reach {path}: {_why_denied(path)}"
    return f"cannot connect to {path}: {exc.strerror or exc}"


def _why_denied(path: str) -> str:
    """Permission denied: not in the group, or in it since a login that predates it."""
    gid = None
    for where in (path, os.path.dirname(path)):
        with contextlib.suppress(OSError):
            gid = os.stat(where).st_gid
            if gid != 0:
                break
    try:
        group = grp.getgrgid(gid).gr_name if gid is not None else None
    except KeyError:
        group = None
    if group is None:
        return "permission denied"
    user = pwd.getpwuid(os.getuid()).pw_name
    listed = user in grp.getgrnam(group).gr_mem
    if listed and gid not in os.getgroups():
        return (
            f"you were added to group {group} after this login: log in again (or run "
            f"`newgrp {group}`) so that your processes carry it"
        )
    return (
        f"permission denied: you ({user}) are not in group {group} (admins: in the admin group); "
        f"ask an admin to run `usermod -aG {group} {user}`, then log in again"
    )

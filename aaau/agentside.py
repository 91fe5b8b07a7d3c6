"""Inside a session, as its agent: ``aaau asys`` through the endpoint, and ``aaau mcp``.

The agent user cannot reach the server's socket (agents are refused there on
purpose); its session's endpoint, named by ``$AAAU_ASYS``, is its one door
(:mod:`aaau.endpoint`). Standard library only, like :mod:`aaau.oneshot`: an
MCP client starts ``aaau mcp`` and waits for it, and an agent calls ``aaau
asys`` in loops.

``aaau mcp`` is a relay: it says ``mcp_open`` and then copies its stdin to
DATA frames and DATA frames to its stdout, byte for byte, until either side
closes. The MCP server behind it is the SDK's, run by the aaau server
(:mod:`aaau.mcpserver`).
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import sys
from typing import Any, Final

from . import oneshot
from .agentconfig import ENV
from .fields import PROTOCOL_VERSION
from .text import printable

#: what the relay reads from stdin at once (each read becomes one DATA frame)
_CHUNK: Final = 65536


def endpoint() -> str:
    """The session's endpoint, or :class:`oneshot.OneShotError` saying why there is none."""
    path = os.environ.get(ENV, "")
    if not path:
        raise oneshot.OneShotError(
            f"${ENV} is not set: this runs inside an aaau session, as its agent "
            "(people use aaau asys [-n ID] against the server's socket)"
        )
    return path


def _explain(path: str, exc: OSError) -> str:
    """Why the endpoint cannot be reached, for the agent (not the server's socket)."""
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        why = "there is none: the session has ended (or $AAAU_ASYS is not its endpoint)"
    elif exc.errno == errno.EACCES:
        why = "permission denied: only the session's agent may use it"
    else:
        why = exc.strerror or str(exc)
    return f"cannot reach the ASys endpoint {path}: {why}"


def _fail_on_error(message: dict[str, Any]) -> None:
    if message.get("type") == "error":
        text = printable(str(message.get("message", "refused")))
        raise oneshot.OneShotError(f"the session's ASys endpoint said: {text}")


def asys(instruction: str, args: dict[str, int | str]) -> int:
    """One call through the endpoint; printed as ``aaau asys`` prints it for people."""
    request = {"type": "asys_request", "request_id": 1, "instruction": instruction}
    reply = oneshot.request(endpoint(), {**request, "args": args}, "asys_result", _explain)
    if not isinstance(reply.get("sw"), str):
        raise oneshot.OneShotError("protocol error from the endpoint: no status word")
    out = {k: reply.get(k) for k in ("instruction", "sw", "status", "result", "message")}
    oneshot.print_json(out)
    return 0 if reply["sw"] == "9000" else 1


def mcp() -> int:
    """Relay MCP's stdio transport to the endpoint until stdin or the server closes."""
    link = oneshot.Link(oneshot.connect(endpoint(), None, _explain))
    with link.sock:
        try:
            link.send(oneshot.frame({"type": "mcp_open", "version": PROTOCOL_VERSION}))
            return _relay(link)
        except BrokenPipeError:  # the MCP client closed our stdout: it is gone
            return 0
        except OSError as exc:
            raise oneshot.OneShotError(f"endpoint connection lost: {exc.strerror}") from None


def _relay(link: oneshot.Link) -> int:
    out = sys.stdout.buffer
    with selectors.DefaultSelector() as sel:
        sel.register(0, selectors.EVENT_READ, "in")
        sel.register(link.sock, selectors.EVENT_READ, "server")
        while True:
            for key, _ in sel.select():
                if key.data == "in":
                    data = os.read(0, _CHUNK)
                    if not data:  # the MCP client is done: so are we
                        return 0
                    link.send(oneshot.data_frame(data))
                    continue
                if not link.read():
                    return 0
                while link.pending:
                    kind, payload = link.pending.popleft()
                    if kind == oneshot.DATA:
                        out.write(payload)
                        out.flush()
                    else:
                        _fail_on_error(oneshot.message_of(payload))


def parse_args(words: list[str]) -> dict[str, int | str]:
    """``key=value`` words as arguments: values that look like integers are integers."""
    args: dict[str, int | str] = {}
    for item in words:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"arguments are key=value, got {item!r}")
        args[key] = int(value) if re.fullmatch(r"-?[0-9]+", value) else value
    return args

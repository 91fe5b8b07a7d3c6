"""Registering the session's ASys MCP server (``aaau mcp``) with the agent it runs.

- **claude** reads MCP servers from ``~/.claude.json`` (user scope) and gives
  stdio servers its whole environment, ``$AAAU_ASYS`` included. The launcher,
  already the agent user (never root: the file is the agent's), adds or
  removes the ``aaau`` entry there before the exec (:func:`register_claude`).
  The entry names no session, so it is right for every session of the
  identity; ``claude mcp list`` shows it connected.
- **codex** gives MCP servers only a few variables of its environment; its
  ``-c key=value`` options set the server and its ``AAAU_ASYS`` for this run
  without touching ``~/.codex/config.toml`` (:func:`codex_argv`).

Standard library only: :mod:`aaau._launch` imports it between fork and exec.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import Any, Final

#: the name the server has in the agent's configuration
NAME: Final = "aaau"
#: the environment variable that names the session's endpoint (aaau.endpoint)
ENV: Final = "AAAU_ASYS"
#: ~/.claude.json larger than this is left alone (it is claude's, and it is not that big)
_MAX_CONFIG: Final = 16 << 20


def agent_kind(executable: str) -> str | None:
    """``claude``, ``codex`` or None, by the program's name."""
    name = os.path.basename(executable)
    return name if name in ("claude", "codex") else None


def codex_argv(argv: tuple[str, ...], command: list[str], endpoint: str) -> tuple[str, ...]:
    """codex's argv with the aaau MCP server set for this run (``-c`` is a global option)."""
    settings = [
        f"mcp_servers.{NAME}.command={json.dumps(command[0])}",
        f"mcp_servers.{NAME}.args={json.dumps(command[1:])}",
        f"mcp_servers.{NAME}.env={{AAAU_ASYS={json.dumps(endpoint)}}}",
    ]
    return (argv[0], *[w for s in settings for w in ("-c", s)], *argv[1:])


def claude_entry(command: list[str]) -> dict[str, Any]:
    return {"type": "stdio", "command": command[0], "args": command[1:], "env": {}}


def updated_claude_config(text: str | None, command: list[str], register: bool) -> str | None:
    """``~/.claude.json`` with the aaau entry added (or, ``register`` false, removed);
    None: nothing to write (already so, or a file that is not a JSON object)."""
    return _update(text, command, register)[0]


def _update(text: str | None, command: list[str], register: bool) -> tuple[str | None, str]:
    """(what to write or None, what happened)."""
    try:
        config = json.loads(text) if text else {}
    except ValueError:
        config = None
    servers = config.get("mcpServers", {}) if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(servers, dict):
        return None, "skipped: not a JSON object with an mcpServers object"
    entry, ours = claude_entry(command), servers.get(NAME)
    if register:
        if ours == entry:
            return None, "registered"
        servers[NAME] = entry
    else:
        if not isinstance(ours, dict) or ours.get("command") != command[0]:
            return None, "unchanged"  # none, or not ours: left as it is
        del servers[NAME]
    config["mcpServers"] = servers
    return json.dumps(config, indent=2) + "\n", "registered" if register else "removed"


def register_claude(home: str, command: list[str], register: bool) -> str:
    """Write the entry into ``home/.claude.json`` as the calling user; what happened."""
    path = os.path.join(home, ".claude.json")
    try:
        text = _read_regular(path)
    except OSError as exc:
        return f"skipped: cannot read {path}: {exc.strerror or exc}"
    new, outcome = _update(text, command, register)
    if new is None:
        return outcome
    tmp = f"{path}.aaau-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return f"skipped: cannot write {path}: {exc.strerror}"
    return outcome


def _read_regular(path: str) -> str | None:
    """The file's text, None if there is none; never blocks (a FIFO planted there) and
    never reads more than ``_MAX_CONFIG`` (OSError otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        data = f.read(_MAX_CONFIG + 1)
    if len(data) > _MAX_CONFIG:
        raise OSError(f"{path} is over {_MAX_CONFIG} bytes")
    return data.decode("utf-8", "replace")

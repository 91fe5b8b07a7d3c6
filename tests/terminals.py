"""Real terminals for tests: tmux on a socket of its own, driven and read from outside.

Each pane runs the real ``aaau`` client as a test user through ``runuser``
from panes tmux (root) owns, as a person who got their terminal from ``su``
would: the client cannot open the pane's terminal by name, only use fd 0.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import trio

from .helpers import PY, wait_for

#: what tmux says of a pane: the modes a program sets, where the cursor is, how it ended
FLAGS = (
    "alternate_on",
    "cursor_flag",
    "keypad_flag",
    "keypad_cursor_flag",
    "mouse_any_flag",
    "mouse_sgr_flag",
    "origin_flag",
    "wrap_flag",
    "cursor_x",
    "cursor_y",
    "pane_dead",
    "pane_dead_status",
)
MODE_FLAGS = FLAGS[:8]
#: a terminal left as a shell expects it
RESTORED = {
    "alternate_on": "0",
    "cursor_flag": "1",
    "keypad_flag": "0",
    "keypad_cursor_flag": "0",
    "mouse_any_flag": "0",
    "mouse_sgr_flag": "0",
}


def client_command(user: str, sock: Path | str, *args: str, term: str = "screen-256color") -> str:
    """The ``aaau`` client as ``user``, in a clean environment, as a tmux pane runs it."""
    env = {"AAAU_SOCKET": str(sock), "PATH": "/usr/bin:/bin", "TERM": term, "HOME": "/"}
    return shlex.join(
        [
            "runuser",
            "-u",
            user,
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in env.items()),
            PY,
            "-m",
            "aaau",
            *args,
        ]
    )


def and_stay(command: str) -> str:
    """``command``, then its exit status on the screen, and the pane stays alive (a dead
    pane's flags are tmux's, not what the command left)."""
    return shlex.join(["sh", "-c", f'{command}; echo "[exit status $?]"; exec sleep 600'])


class Tmux:
    """A tmux server of our own; panes are named sessions of one window each."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="aaut-tmux-")
        self._config = Path(self._dir.name) / "tmux.conf"
        self._config.write_text(
            "set -g status off\n"
            "set -g remain-on-exit on\n"
            "set -g history-limit 5000\n"
            "set -g default-terminal screen-256color\n"
        )
        self.socket = str(Path(self._dir.name) / "tmux.sock")  # gone with the directory

    def cmd(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", self.socket, "-f", str(self._config), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def _script(self, name: str, command: str) -> str:
        """``command`` in a script of root's (tmux takes only short commands)."""
        path = Path(self._dir.name) / f"{name}.sh"
        path.write_text(f"exec {command}\n")
        return f"sh {shlex.quote(str(path))}"

    def start(self, name: str, command: str, cols: int = 100, rows: int = 30) -> None:
        """A pane ``name`` of ``cols`` x ``rows`` running ``command``."""
        script = self._script(name, command)
        self.cmd("new-session", "-d", "-s", name, "-x", str(cols), "-y", str(rows), script)

    def respawn(self, name: str, command: str) -> None:
        self.cmd("respawn-pane", "-k", "-t", name, self._script(name, command))

    def keys(self, name: str, text: str) -> None:
        """Type ``text`` literally into pane ``name``."""
        self.cmd("send-keys", "-t", name, "-l", text)

    def key(self, name: str, *keys: str) -> None:
        """Press named keys (Enter, Escape, C-c)."""
        self.cmd("send-keys", "-t", name, *keys)

    def screen(self, name: str, *, escapes: bool = False, history: int = 0) -> list[str]:
        """The visible lines (and ``history`` lines above), with SGR attributes if asked."""
        args = ["capture-pane", "-p", "-t", name]
        if escapes:
            args.append("-e")
        if history:
            args += ["-S", str(-history)]
        return self.cmd(*args).split("\n")[:-1]

    def flags(self, name: str) -> dict[str, str]:
        out = self.cmd("display", "-p", "-t", name, "|".join(f"#{{{f}}}" for f in FLAGS))
        return dict(zip(FLAGS, out.rstrip("\n").split("|"), strict=True))

    def tty(self, name: str) -> str:
        return self.cmd("display", "-p", "-t", name, "#{pane_tty}").strip()

    async def until_text(self, name: str, text: str, timeout: float = 20.0) -> None:
        """Until pane ``name`` shows ``text`` (on its screen, not in its history)."""
        await wait_for(
            lambda: text in "\n".join(self.screen(name)),
            timeout,
            f"{text!r} in pane {name}",
        )

    async def until_exit(self, name: str, timeout: float = 20.0) -> int:
        """The exit status a pane started with :func:`and_stay` printed."""
        found = await wait_for(
            lambda: re.search(r"\[exit status (\d+)\]", "\n".join(self.screen(name))),
            timeout,
        )
        return int(found.group(1))

    async def until_dead(self, name: str, timeout: float = 20.0) -> dict[str, str]:
        await wait_for(lambda: self.flags(name)["pane_dead"] == "1", timeout, f"pane {name} ends")
        return self.flags(name)

    def kill(self) -> None:
        subprocess.run(
            ["tmux", "-S", self.socket, "kill-server"], capture_output=True, check=False
        )
        self._dir.cleanup()


async def same_screen(tmux: Tmux, a: str, b: str, timeout: float = 20.0, **kw: Any) -> None:
    """Wait until panes ``a`` and ``b`` show the same cells, attributes, cursor and modes."""

    def view(name: str) -> tuple[list[str], dict[str, str]]:
        flags = tmux.flags(name)
        return tmux.screen(name, escapes=True, **kw), {
            k: flags[k] for k in (*MODE_FLAGS, "cursor_x", "cursor_y")
        }

    try:
        await wait_for(lambda: view(a) == view(b), timeout)
    except trio.TooSlowError:
        raise AssertionError(_diff(view(a), view(b))) from None


def _diff(a: tuple[list[str], dict[str, str]], b: tuple[list[str], dict[str, str]]) -> str:
    lines = [f"flags {a[1]} != {b[1]}" if a[1] != b[1] else "flags equal"]
    for i, (x, y) in enumerate(zip(a[0], b[0], strict=False)):
        if x != y:
            lines.append(f"line {i}:\n  {x!r}\n  {y!r}")
    if len(a[0]) != len(b[0]):
        lines.append(f"{len(a[0])} lines != {len(b[0])} lines")
    return "\n".join(lines[:40])

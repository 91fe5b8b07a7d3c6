"""The server's operational log (structlog): levels, where it goes, and its reopening.

Not the audit log (:mod:`aaau.audit`): this one says what the server does and
what goes wrong, for the operator. Three shapes:

- under journald (``$JOURNAL_STREAM`` names the stream stderr is): one line an
  event, ``<N>`` first (the syslog priority: journald reads it as the entry's
  level), no timestamp of ours (journald has one), ``event key=value ...``;
- on a terminal: structlog's console renderer;
- otherwise (a file, a pipe): JSON lines with a UTC timestamp and a level.

``--daemon`` writes it to ``server.log`` in the log directory; :func:`reopen`
opens that path again after logrotate moved the file away: on SIGHUP, and
within a second of :func:`moved` seeing it gone (the server checks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any, Final, TextIO

import structlog

#: the levels ``--log-level`` takes
LEVELS: Final = ("debug", "info", "warning", "error")

#: syslog priorities (sd-daemon(3)) of structlog's levels
_PRIORITY: Final = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}

_file: str | None = None  # where --daemon sent the log, for reopen()


class _NeverFails:
    """The log's stream: a full disk or a closed pipe must not take a caller down
    (the audit log's failure path logs, and must not fail for logging)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def isatty(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return self._stream.isatty()
        return False

    def fileno(self) -> int:
        return self._stream.fileno()


def under_journald(stream: Any, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream ``$JOURNAL_STREAM`` names (device:inode),
    as systemd.exec(5) says to check: an inherited variable alone proves nothing."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def _value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\n\\'):
        return value
    return json.dumps(value if isinstance(value, str | int | float | bool) else str(value))


def journal_line(_: Any, method: str, event_dict: dict[str, Any]) -> str:
    """``<N>event key=value ...``: one line, the priority first, values quoted as JSON
    when they hold spaces, quotes or newlines (an exception's traceback included)."""
    level = event_dict.pop("level", method)
    event = str(event_dict.pop("event", ""))
    fields = " ".join(f"{key}={_value(value)}" for key, value in event_dict.items())
    return f"<{_PRIORITY.get(level, 6)}>{event}{' ' if fields else ''}{fields}"


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Set the operational log up for this process (see the module's docstring)."""
    out = _NeverFails(stream or sys.stderr)
    processors: list[Any] = [structlog.processors.add_log_level]
    if under_journald(out):
        processors += [structlog.processors.format_exc_info, journal_line]
    elif out.isatty():
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def send_to_file(path: str) -> None:
    """Point stdout and stderr at ``path`` (appended, 0640, never through a link)."""
    global _file
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        os.fchmod(fd, 0o640)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    _file = path


def moved() -> bool:
    """The log file was moved or deleted (logrotate without a signal): reopen it."""
    if _file is None:
        return False
    try:
        on_disk, ours = os.stat(_file), os.fstat(2)
    except OSError:
        return True
    return (on_disk.st_dev, on_disk.st_ino) != (ours.st_dev, ours.st_ino)


def reopen() -> str | None:
    """SIGHUP: open the log file again (logrotate moved it); the path, or None if the log
    is not a file of ours. Raises OSError if it cannot (the old file stays)."""
    if _file is not None:
        send_to_file(_file)
    return _file

"""The client without a terminal (pipe mode), on the standard library: it starts in a blink.

``echo input | aaau -p CMD``, ``aaau run -- CMD < file``, scripts and CI: stdin
is the agent's input (its end is the agent's end of input), the agent's output
goes to stdout, the agent's exit status becomes ours. This is what
:mod:`aaau.attach` does with no terminal, without Trio and cattrs (~140 ms of
imports for a command that may run in a loop): one socket, ``selectors``, the
protocol's frames and requests (:mod:`aaau.oneshot`, checked by the same
functions as the message classes, :mod:`aaau.fields`; a test holds the bytes
to the codec's), the answers read as JSON and checked field by field.

The same rules as the Trio client: input is sent within the credit the server
grants (``input_window``, then ``input_credit``); a ReadOnly client sends
none; SIGTERM, SIGHUP and SIGINT leave the session (exit 128+N); a closed
stdout is our failure, said as such; exit 255 with one line for our own errors.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
from typing import Any, Final

from .oneshot import DATA, Link, OneShotError, connect, data_frame, frame, message_of
from .text import printable

EXIT_ERROR: Final = 255
#: error codes that are told and do not end the attachment (attach._NONFATAL)
_NONFATAL: Final = frozenset({"forbidden", "rate-limited", "audit-unavailable"})
_SHUTDOWN: Final = "server-shutdown"


_INPUT_EOF: Final = frame({"type": "input_eof"})
_READONLY: Final = "readonly"


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _raise(signum: int, _frame: object) -> None:
    raise _Signalled(signum)


def attach(path: str, hello: dict[str, Any]) -> int:
    """Create or join a session (``hello``: :func:`aaau.oneshot.create` or ``join``) and
    stay attached, without a terminal; the exit status."""
    handlers = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    session = "?"
    try:
        with connect(path) as sock:
            link = Link(sock)
            link.send(frame(hello))
            welcome = link.control()
            if welcome["type"] == "error":
                raise OneShotError(printable(str(welcome.get("message"))))
            if welcome["type"] != "welcome" or not isinstance(welcome.get("session_id"), str):
                raise OneShotError(f"unexpected reply {welcome['type']!r}")
            session = printable(welcome["session_id"])
            role = str(welcome.get("role"))
            _say(f"session {session} ({role}); ~. at the start of a line detaches")
            window = welcome.get("input_window", 0)
            if not isinstance(window, int) or window < 0:
                raise OneShotError("protocol error from the server: a bad input_window")
            return _Attached(link, window, role).run()
    except _Signalled as exc:
        name = signal.Signals(exc.signum).name
        _say(f"{name}: left session {session}")
        return 128 + exc.signum
    except OneShotError as exc:
        _say(str(exc))
        return EXIT_ERROR
    except OSError as exc:
        _say(f"connection to the server lost: {exc.strerror or exc}")
        return EXIT_ERROR
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _say(text: str) -> None:
    print(f"aaau: {text}", file=sys.stderr, flush=True)


class _Attached:
    def __init__(self, link: Link, window: int, role: str) -> None:
        self.link = link
        self.credit = window
        self.sending = role != _READONLY
        self.eof = False  # stdin ended (and the server was told)
        # select(2), not epoll: stdin may be a regular file or /dev/null, which epoll
        # refuses (EPERM) and select reports as always readable, as they are
        self.selector = selectors.SelectSelector()

    def run(self) -> int:
        self.selector.register(self.link.sock, selectors.EVENT_READ, "server")
        self._read_stdin()
        try:
            if (status := self._handle_pending()) is not None:
                return status
            while True:
                for key, _ in self.selector.select():
                    if key.data == "stdin":
                        self._input()
                    elif (status := self._from_server()) is not None:
                        return status
        finally:
            self.selector.close()

    def _input(self) -> None:
        try:
            data = os.read(0, min(65536, self.credit))
        except OSError as exc:
            raise OneShotError(f"cannot read standard input: {exc.strerror or exc}") from None
        if not data:
            self.link.send(_INPUT_EOF)
            self.eof = True
            self._stop_reading()
            return
        self.credit -= len(data)
        self.link.send(data_frame(data))
        if self.credit <= 0:
            self._stop_reading()  # until the server gives credit back

    def _read_stdin(self) -> None:
        """Watch stdin while we may send and have credit."""
        if self.sending and not self.eof and self.credit > 0 and 0 not in self.selector.get_map():
            self.selector.register(0, selectors.EVENT_READ, "stdin")

    def _stop_reading(self) -> None:
        if 0 in self.selector.get_map():
            self.selector.unregister(0)

    def _from_server(self) -> int | None:
        if not self.link.read():
            raise OneShotError("connection to the server lost")
        return self._handle_pending()

    def _handle_pending(self) -> int | None:
        while self.link.pending:
            kind, payload = self.link.pending.popleft()
            if kind == DATA:
                _write_out(payload)
            elif (status := self._control(message_of(payload))) is not None:
                return status
        return None

    def _control(self, msg: dict[str, Any]) -> int | None:
        kind = msg["type"]
        if kind == "input_credit":
            given = msg.get("bytes")
            if isinstance(given, int) and given > 0:
                self.credit += given
                self._read_stdin()
        elif kind == "exited":
            return _exited(msg)
        elif kind == "error":
            code, text = msg.get("code"), printable(str(msg.get("message")))
            if code == _SHUTDOWN:
                return None
            if code in _NONFATAL:
                _say(text)
                return None
            raise OneShotError(f"disconnected: {text}")
        elif kind == "role_changed":
            role = str(msg.get("role"))
            self.sending = self.sending and role != _READONLY
            if not self.sending:
                self._stop_reading()
            _say(f"your role is now {printable(role)} ({printable(str(msg.get('reason')))})")
        return None


def _exited(msg: dict[str, Any]) -> int:
    """The agent's status as a shell gives a child's (128+N for signal N); a session
    ended by someone (a kill, a shutdown) says so."""
    code, sig, reason = msg.get("code"), msg.get("signal"), msg.get("reason")
    if reason is not None:
        _say(f"session {printable(str(reason))}")
    if isinstance(sig, int):
        return 128 + sig
    return code if isinstance(code, int) else EXIT_ERROR


def _write_out(data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(1, view) :]
    except OSError as exc:
        raise OneShotError(f"cannot write to standard output: {exc.strerror or exc}") from None

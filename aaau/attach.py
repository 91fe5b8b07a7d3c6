"""An attached client: a person's terminal (or a script's pipes) and one session.

On a terminal (fd 0, see :mod:`aaau.terminal`): raw mode, output to the
terminal, SIGWINCH sends a resize, ``~.`` at the start of a line detaches
(:mod:`aaau.escape`). Without one: stdin is input, its end is the agent's end
of input, output goes to stdout.

However it ends, the person's terminal is put back: the client follows the
modes the agent set (:class:`aaau.modes.Modes`, fed by the scanner), undoes
them (alternate screen, cursor, mouse, bracketed paste, focus reports,
keypad, attributes) and prints one line saying what happened and who did it:
``[detached from session ID]``, ``[session killed by ada (admin)]``,
``[agent exited with status 3]``, ``[connection to the server lost]``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

import attrs
import trio

from . import codec
from . import messages as m
from .client import ClientError, Link, connect, fail_on_error
from .errors import ErrorCode, ProtocolError
from .escape import EscapeFilter
from .modes import Modes
from .protocol import Kind
from .terminal import Terminal, TerminalError
from .vtscan import Effect, Scanner

EXIT_ERROR = 255
#: after a detach, how long the server may take to close the connection
_DETACH_WAIT = 2.0
#: errors that leave the client attached (said on the terminal, then go on)
_NONFATAL = {ErrorCode.FORBIDDEN, ErrorCode.RATE, ErrorCode.AUDIT}


#: what attaches: a new session, or a running one
Hello = m.Create | m.Join


class OutputError(ClientError):
    """Standard output failed (a closed pipe): not the server's doing."""


@attrs.define
class _Outcome:
    code: int
    line: str | None  # what is said on the way out (None: nothing)
    #: the agent ended by itself: its exit status says it all (pipe mode says nothing)
    agent_exit: bool = False


class _Seen:
    """What the client has shown of the agent's output: its modes, where the line is."""

    def __init__(self) -> None:
        self._scanner = Scanner()
        self.modes = Modes()
        self._line_start = True

    def feed(self, data: bytes) -> None:
        for segment, effect in self._scanner.feed(data):
            if effect is Effect.MODE:
                self.modes.feed(segment)
        self._line_start = data.endswith(b"\n")

    def goodbye(self, line: str | None) -> bytes:
        """What puts the terminal back, and the last line on a line of its own."""
        out = self.modes.undo()
        if line is not None:
            fresh = self._line_start or self.modes.alternate  # leaving it restores the cursor
            out += (b"" if fresh else b"\r\n") + line.encode() + b"\r\n"
        return out


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "?"


def _exit_code(msg: m.Exited) -> int:
    """The agent's status, as a shell gives a child's: 128 + N for signal N."""
    if msg.signal is not None:
        return 128 + msg.signal
    return msg.code if msg.code is not None else EXIT_ERROR


def _exited_line(msg: m.Exited) -> str:
    if msg.reason is not None:
        return f"[session {msg.reason}]"
    if msg.signal is not None:
        return f"[agent killed by signal {msg.signal} ({_signal_name(msg.signal)})]"
    return f"[agent exited with status {msg.code}]"


class Attached:
    """One attachment from its welcome to its end; :meth:`run` gives the exit status."""

    def __init__(self, link: Link, welcome: m.Welcome, terminal: Terminal | None) -> None:
        self.link = link
        self.welcome = welcome
        self.terminal = terminal
        self.seen = _Seen()
        self.outcome: _Outcome | None = None
        self._detaching = False
        self._nursery: trio.Nursery | None = None
        self._out: trio.lowlevel.FdStream | None = None

    def finish(self, code: int, line: str | None, *, agent_exit: bool = False) -> None:
        """The first outcome wins; everything else stops."""
        if self.outcome is None:
            self.outcome = _Outcome(code, line, agent_exit)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self, signals: AsyncIterator[int]) -> int:
        self.link.credit.give(self.welcome.input_window)
        if self.terminal is None:
            self._out = trio.lowlevel.FdStream(os.dup(1))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive)
                nursery.start_soon(self._signals, signals)
                if self.terminal is not None:
                    nursery.start_soon(self._keyboard, self.terminal)
                    nursery.start_soon(self._winch, self.terminal)
                elif self.welcome.role is not m.Role.READONLY:
                    nursery.start_soon(self._pipe_input)
        finally:
            with trio.CancelScope(shield=True):
                await self._goodbye()
        assert self.outcome is not None
        return self.outcome.code

    async def _goodbye(self) -> None:
        outcome = self.outcome or _Outcome(EXIT_ERROR, None)
        if self.terminal is not None:
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                await self.terminal.stream.send_all(self.seen.goodbye(outcome.line))
        else:
            if self._out is not None:
                with contextlib.suppress(OSError, trio.BrokenResourceError):
                    await self._out.aclose()
            if outcome.line is not None and not outcome.agent_exit:
                print(f"aaau: {outcome.line.strip('[]')}", file=sys.stderr, flush=True)

    def notice(self, text: str) -> None:
        """A line for the person, now, while attached (on the terminal, in its raw mode)."""
        if self.terminal is None:
            print(f"aaau: {text}", file=sys.stderr, flush=True)
            return
        with contextlib.suppress(OSError):  # a notice is never worth failing for
            os.write(self.terminal.fd, f"\r\naaau: {text}\r\n".encode())

    # --- from the server --------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            try:
                frame = await self.link.framed.next_frame()
            except ProtocolError as exc:
                self.finish(EXIT_ERROR, f"[protocol error from the server: {exc}]")
                return
            except (trio.BrokenResourceError, OSError):
                frame = None
            if frame is None:
                if self._detaching:
                    self.finish(0, self._detached_line())
                else:
                    self.finish(EXIT_ERROR, "[connection to the server lost]")
                return
            if frame.kind is Kind.DATA:
                await self._show(frame.payload)
            elif self._control(codec.decode_server(frame.payload)):
                return

    async def _show(self, data: bytes) -> None:
        self.seen.feed(data)
        try:
            if self.terminal is not None:
                await self.terminal.stream.send_all(data)
            elif self._out is not None:
                await self._out.send_all(data)
        except (OSError, trio.BrokenResourceError) as exc:
            where = "the terminal" if self.terminal is not None else "standard output"
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            raise OutputError(f"cannot write to {where}: {_strerror(cause)}") from None

    def _control(self, msg: m.ServerMessage) -> bool:
        """Act on a control message; True when it ends the attachment."""
        if isinstance(msg, m.InputCredit):
            self.link.credit.give(msg.bytes)
        elif isinstance(msg, m.Exited):
            self.finish(_exit_code(msg), _exited_line(msg), agent_exit=msg.reason is None)
            return True
        elif isinstance(msg, m.Error):
            if msg.code is ErrorCode.SHUTDOWN:
                return False  # the Exited that follows says so
            if msg.code in _NONFATAL:
                self.notice(msg.message)
                return False
            self.finish(EXIT_ERROR, f"[disconnected: {msg.message}]")
            return True
        elif isinstance(msg, m.RoleChanged):
            self.notice(f"your role is now {msg.role.value} ({msg.reason})")
        return False

    def _detached_line(self) -> str:
        return f"[detached from session {self.welcome.session_id}]"

    # --- to the server ----------------------------------------------------------------

    async def _keyboard(self, terminal: Terminal) -> None:
        escape = EscapeFilter()
        while True:
            try:
                data = await terminal.stream.receive_some(4096)
            except OSError as exc:
                raise TerminalError(f"cannot read the terminal: {_strerror(exc)}") from None
            if not data:
                self.finish(EXIT_ERROR, "[the terminal was closed]")
                return
            data, detach = escape.feed(data)
            if data and self.welcome.role is not m.Role.READONLY:
                await self.link.send_input(data)
            if detach:
                await self._detach()
                return

    async def _detach(self) -> None:
        """Say so, then wait (briefly) for the server to close: it has then heard it."""
        self._detaching = True  # from here, the connection closing is the detach's doing
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.link.send(m.Detach())
        with trio.move_on_after(_DETACH_WAIT):
            await trio.sleep_forever()  # _receive ends it when the server closes
        self.finish(0, self._detached_line())

    async def _pipe_input(self) -> None:
        while True:
            try:
                data = await trio.to_thread.run_sync(os.read, 0, 65536, abandon_on_cancel=True)
            except OSError as exc:
                raise ClientError(f"cannot read standard input: {_strerror(exc)}") from None
            if not data:
                await self.link.send(m.InputEof())
                return
            await self.link.send_input(data)

    async def _winch(self, terminal: Terminal) -> None:
        """A new terminal size: the session's (Interactive), or only what we are shown.

        No resize on join: a joiner must not force its size on everyone until it changes.
        """
        message = m.Viewport if self.welcome.role is m.Role.READONLY else m.Resize
        with trio.open_signal_receiver(signal.SIGWINCH) as signals:
            rows, cols = terminal.size()
            async for _ in signals:
                new = terminal.size()
                if new != (rows, cols):
                    rows, cols = new
                    await self.link.send(message(rows=rows, cols=cols))

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            self.finish(128 + signum, f"[{name}: left session {self.welcome.session_id}]")
            return


def _strerror(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


async def attach(path: str, hello: m.Create | m.Join) -> int:
    """Create or join a session and stay attached; returns the process exit status."""
    terminal = Terminal(0) if os.isatty(0) else None  # before anything is created
    try:
        if terminal is None:
            return await _attach(path, hello, None)
        with terminal.raw():
            return await _attach(path, hello, terminal)
    finally:
        if terminal is not None:
            with trio.CancelScope(shield=True):
                await terminal.aclose()


async def _attach(path: str, hello: m.Create | m.Join, terminal: Terminal | None) -> int:
    link = await connect(path)
    async with link.framed.stream:
        # the signals are ours before anything can be left half done
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
            await link.send(hello)
            welcome = await link.next_control()
            fail_on_error(welcome)
            if not isinstance(welcome, m.Welcome):
                raise ClientError(f"unexpected reply {type(welcome).__name__}")
            attached = Attached(link, welcome, terminal)
            attached.notice(
                f"session {welcome.session_id} ({welcome.role.value}); "
                "~. at the start of a line detaches"
            )
            if terminal is not None and not welcome.created:
                _size_notice(attached, terminal.size(), (welcome.rows, welcome.cols))
            return await attached.run(signals)


def _size_notice(attached: Attached, mine: tuple[int, int], theirs: tuple[int, int]) -> None:
    if mine[0] < theirs[0] or mine[1] < theirs[1]:
        attached.notice(
            f"the session is {theirs[1]}x{theirs[0]}, your terminal {mine[1]}x{mine[0]}: "
            "you see the part around the cursor, redrawn as it changes; a terminal as "
            "large as the session shows it all"
        )

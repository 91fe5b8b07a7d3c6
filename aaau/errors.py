"""The error vocabulary: the codes a peer is told, and who is to blame.

Pure: no Trio, no I/O. :class:`ProtocolError` means the peer sent bytes or a
message that break the protocol (the connection ends); :class:`RequestError`
means a well-formed request was refused or failed (the peer is told, the
connection may go on); :class:`StartupError` means the server cannot start.
Each carries the :class:`ErrorCode` the peer gets in its ``error`` message.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` message: what a client can act on."""

    BAD_FRAME = "bad-frame"  # not a frame: unknown kind, cut short
    TOO_LARGE = "too-large"  # a frame longer than the server accepts
    BAD_MESSAGE = "bad-message"  # a frame, but not a valid message (here)
    VERSION = "version"  # another protocol version
    REFUSED = "refused"  # not admitted at all (not a member, the agent user)
    FORBIDDEN = "forbidden"  # admitted, but this role may not do that
    UNKNOWN_SESSION = "unknown-session"
    LIMIT = "limit"  # a configured limit is reached
    SPAWN_FAILED = "spawn-failed"
    TIMEOUT = "timeout"  # no hello in time
    TOO_SLOW = "too-slow"  # the client fell too far behind the output
    SHUTDOWN = "server-shutdown"
    REVOKED = "revoked"  # the right to be attached was withdrawn (reload)
    INTERNAL = "internal"  # a bug on the server's side, logged there
    AUDIT = "audit-unavailable"  # the audit log cannot record it now: refused, try later
    RATE = "rate-limited"  # too many requests: some were dropped


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed after saying why."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.BAD_FRAME) -> None:
        super().__init__(message)
        self.code = code


class RequestError(Exception):
    """A valid request that cannot be granted; the message is for the peer."""

    def __init__(self, message: str, *, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


class StartupError(Exception):
    """The server cannot start; the message says what to fix."""


def innermost(exc: BaseException) -> BaseException:
    """The one error inside nested single-member groups (what a nursery raised)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc

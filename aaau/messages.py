"""The typed control messages of the aaau protocol.

Plain attrs classes with their invariants as validators. They know nothing of
JSON, frames, sockets or Trio: the codec turns them into bytes and back.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs
from attrs import validators as v

from .errors import ErrorCode
from .fields import MAX_ARG_LEN as MAX_ARG_LEN  # the limits are part of this module's surface
from .fields import MAX_ARGV as MAX_ARGV
from .fields import MAX_DIMENSION as MAX_DIMENSION
from .fields import MAX_ENV as MAX_ENV
from .fields import PROTOCOL_VERSION as PROTOCOL_VERSION
from .fields import SESSION_ID as _SESSION_ID
from .fields import TERM as _TERM
from .fields import check_argv, check_cwd, check_env, check_grants


class Role(enum.Enum):
    """What a client may do in a session, weakest first."""

    READONLY = "readonly"
    INTERACTIVE = "interactive"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_most(self, other: Role) -> Role:
        """The weaker of the two roles."""
        return self if self.rank <= other.rank else other


_RANK = {Role.READONLY: 0, Role.INTERACTIVE: 1, Role.ADMIN: 2}


def _argv(_inst: object, _attr: attrs.Attribute[Any], value: tuple[str, ...] | None) -> None:
    check_argv(value)


def _env(_inst: object, _attr: attrs.Attribute[Any], value: dict[str, str]) -> None:
    check_env(value)


def _cwd(_inst: object, _attr: attrs.Attribute[Any], value: str | None) -> None:
    check_cwd(value)


def _grants(_inst: object, _attr: attrs.Attribute[Any], value: tuple[str, ...] | None) -> None:
    check_grants(value)


_dimension = [v.ge(1), v.le(MAX_DIMENSION)]
_session_id = v.matches_re(_SESSION_ID)


# --- client -> server, first message of a connection ------------------------


@attrs.frozen
class Create:
    """Start a new session running ``argv`` (None: the server's default program)."""

    version: int
    rows: int = attrs.field(validator=_dimension)
    cols: int = attrs.field(validator=_dimension)
    term: str = attrs.field(validator=v.matches_re(_TERM))
    argv: tuple[str, ...] | None = attrs.field(default=None, validator=_argv)
    share: bool = False
    cwd: str | None = attrs.field(default=None, validator=_cwd)
    env: dict[str, str] = attrs.field(factory=dict, validator=_env)
    #: the client has no terminal (stdin is a pipe or a file): the agent's terminal
    #: neither echoes input nor turns newlines into CRLF, and the session ends when
    #: its last client leaves, unless ``keep``
    pipe: bool = False
    keep: bool = False
    #: the ASys instructions the agent may call through its session's endpoint
    #: (None: the read-only ones); bounded by the server's ``agent_grants``
    grants: tuple[str, ...] | None = attrs.field(default=None, validator=_grants)
    #: register the session's ASys MCP server with the agent (claude, codex)
    mcp: bool = False


@attrs.frozen
class Join:
    """Attach to a running session; ``role`` asks for at most that role.

    ``rows`` and ``cols``: the joiner's terminal, for which the screen is drawn
    (None: the session's size).
    """

    version: int
    session_id: str = attrs.field(validator=_session_id)
    role: Role | None = None
    rows: int | None = attrs.field(default=None, validator=v.optional(_dimension))
    cols: int | None = attrs.field(default=None, validator=v.optional(_dimension))


@attrs.frozen
class ListSessions:
    """Ask for the sessions the caller may see, then close."""

    version: int


@attrs.frozen
class QueryStatus:
    """Ask for one session's status without attaching, then close."""

    version: int
    session_id: str = attrs.field(validator=_session_id)


@attrs.frozen
class Kill:
    """FORCE_KILL a session without attaching, then close."""

    version: int
    session_id: str = attrs.field(validator=_session_id)


@attrs.frozen
class Revoke:
    """Withdraw ASys grants from a session's agent, live (an Admin of the session), then close."""

    version: int
    session_id: str = attrs.field(validator=_session_id)
    instructions: tuple[str, ...] = attrs.field(validator=_grants)


@attrs.frozen
class McpOpen:
    """On a session's ASys endpoint only: the connection carries MCP from here on.

    The rest of the connection is DATA frames of MCP's stdio transport (JSON-RPC
    messages, one per line) both ways: ``aaau mcp`` relays them.
    """

    version: int


# --- client -> server, inside a session ---------------------------------------


@attrs.frozen
class Resize:
    rows: int = attrs.field(validator=_dimension)
    cols: int = attrs.field(validator=_dimension)


@attrs.frozen
class Viewport:
    """The size of this client's terminal (any role): what it is shown is drawn for it.

    It does not resize the session; a client smaller than the session is sent
    views of the screen around the cursor, redrawn as the output changes.
    """

    rows: int = attrs.field(validator=_dimension)
    cols: int = attrs.field(validator=_dimension)


@attrs.frozen
class Ping:
    nonce: int = attrs.field(default=0, validator=[v.ge(0), v.le(2**53)])


@attrs.frozen
class GetStatus:
    pass


@attrs.frozen
class ForceKill:
    pass


@attrs.frozen
class Detach:
    pass


@attrs.frozen
class InputEof:
    """The client's input ended: the agent should see end of input."""


def _asys_args(_inst: object, _attr: attrs.Attribute[Any], value: dict[str, int | str]) -> None:
    if len(value) > 32:
        raise ValueError("more than 32 arguments")
    for key, val in value.items():
        if len(key) > 64 or (isinstance(val, str) and len(val) > 4096):
            raise ValueError(f"argument {key[:64]!r} is too long")


_instruction = v.matches_re(r"[A-Za-z0-9_]{1,64}")


@attrs.frozen
class AsysCall:
    """An ASys instruction outside any session (read-only instructions), then close."""

    version: int
    request_id: int = attrs.field(validator=[v.ge(0), v.le(2**53)])
    instruction: str = attrs.field(validator=_instruction)
    args: dict[str, int | str] = attrs.field(factory=dict, validator=_asys_args)


@attrs.frozen
class AsysRequest:
    """An ASys instruction inside a session; answered by :class:`AsysResult`."""

    request_id: int = attrs.field(validator=[v.ge(0), v.le(2**53)])
    instruction: str = attrs.field(validator=_instruction)
    args: dict[str, int | str] = attrs.field(factory=dict, validator=_asys_args)


Hello = Create | Join | ListSessions | QueryStatus | Kill | AsysCall | Revoke
SessionRequest = Resize | Viewport | Ping | GetStatus | ForceKill | Detach | InputEof | AsysRequest
ClientMessage = (
    Create | Join | ListSessions | QueryStatus | Kill | AsysCall | Revoke | McpOpen | SessionRequest
)


# --- server -> client -------------------------------------------------------------


@attrs.frozen
class ClientInfo:
    client_id: int
    user: str
    uid: int
    role: Role


@attrs.frozen
class SessionInfo:
    session_id: str
    creator: str
    creator_uid: int
    argv: tuple[str, ...]
    pid: int
    pty: str
    created_at: float
    rows: int
    cols: int
    shared: bool
    clients: tuple[ClientInfo, ...] = ()
    #: the ASys instructions its agent may call now (None: from a server without them)
    agent_grants: tuple[str, ...] | None = None


@attrs.frozen
class Welcome:
    """The handshake succeeded: the client is attached with ``role``.

    ``input_window``: how many bytes of input the client may have in flight
    (sent and not yet credited back by ``input_credit``); 0 for ReadOnly.
    """

    version: int
    session_id: str
    role: Role
    created: bool
    rows: int
    cols: int
    client_id: int
    input_window: int = 0


@attrs.frozen
class InputCredit:
    """``bytes`` more of input may be sent: that much was handed to the agent (or refused)."""

    bytes: int


@attrs.frozen
class Error:
    """Something the peer asked for failed; ``code`` is machine-readable."""

    code: ErrorCode
    message: str


@attrs.frozen
class Joined:
    client: ClientInfo


@attrs.frozen
class Left:
    client: ClientInfo


@attrs.frozen
class RoleChanged:
    """This client's role was changed by the server (for example on reload)."""

    role: Role
    reason: str


@attrs.frozen
class Exited:
    """The agent ended: ``code`` if it exited, ``signal`` if a signal killed it.

    ``reason``, when the session was ended rather than the agent ending on its
    own: "killed by ada (admin)", "the server is shutting down", ...
    """

    code: int | None
    signal: int | None
    reason: str | None = None


@attrs.frozen
class Pong:
    nonce: int


@attrs.frozen
class Status:
    session: SessionInfo
    alive: bool


@attrs.frozen
class Sessions:
    sessions: tuple[SessionInfo, ...]


@attrs.frozen
class Done:
    """A one-shot request (kill outside a session) succeeded."""

    message: str


class StatusWord(enum.StrEnum):
    """ASys status words (ISO 7816 style): ``9000`` is success, the rest say why not."""

    OK = "9000"
    BLOCKED = "6400"  # transient: back off (quota, rate)
    WRONG_LENGTH = "6700"  # missing, extra or mistyped arguments
    DENIED = "6982"  # identity fine, operation refused: do not retry
    WRONG_DATA = "6A80"  # an argument's value is refused: do not retry it
    NOT_FOUND = "6A81"  # no such instruction (for this caller, here)
    NOT_SUPPORTED = "6D00"  # this machine cannot do it; never simulated
    SYSTEM_ERROR = "6F00"
    OUT_OF_MEMORY = "6F01"

    @property
    def label(self) -> str:
        """The name clients see beside the word: ``ok``, ``access_denied``, ..."""
        return _SW_LABELS[self]


_SW_LABELS = {
    StatusWord.OK: "ok",
    StatusWord.BLOCKED: "blocked",
    StatusWord.WRONG_LENGTH: "wrong_length",
    StatusWord.DENIED: "access_denied",
    StatusWord.WRONG_DATA: "wrong_data",
    StatusWord.NOT_FOUND: "not_found",
    StatusWord.NOT_SUPPORTED: "not_supported",
    StatusWord.SYSTEM_ERROR: "system_error",
    StatusWord.OUT_OF_MEMORY: "out_of_memory",
}


@attrs.frozen
class AsysResult:
    """The answer to an ASys instruction: status word, its name, and the fields."""

    request_id: int
    instruction: str
    sw: StatusWord
    status: str
    result: dict[str, Any] | None = None
    message: str = ""


ServerMessage = (
    Welcome
    | Error
    | Joined
    | Left
    | RoleChanged
    | Exited
    | Pong
    | Status
    | Sessions
    | Done
    | AsysResult
    | InputCredit
)

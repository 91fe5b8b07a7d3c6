"""The one cattrs converter for control messages, strict in what it accepts.

A control payload is a JSON object whose ``type`` key names the message
(``"resize"``, ``"welcome"``, ...). Extra keys, wrong types, coercible-looking
strings (``"80"`` for an int), values outside an enum and unknown types are
all refused with a :class:`aaau.errors.ProtocolError` carrying a precise
message. :func:`decode_hello` holds the rules for a connection's first frame.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any, TypeVar, cast, get_args

import cattrs
from cattrs.gen import make_dict_unstructure_fn, override
from cattrs.preconf.json import make_converter
from cattrs.strategies import configure_tagged_union
from cattrs.v import format_exception

from . import messages as m
from .errors import ErrorCode, ProtocolError
from .protocol import Frame, Kind, encode_frame

T = TypeVar("T")


def tag_of(cls: type) -> str:
    """``QueryStatus`` -> ``"query_status"``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()


def _strict(kind: type[Any], name: str) -> Any:
    def hook(value: object, _type: object) -> object:
        # bool is an int subclass: refuse it where an int is expected
        if type(value) is not kind:
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        return value

    return hook


#: fields added within protocol version 2: left out at their default, so that a
#: client and a server of different builds agree on all but what is new
_ADDED_IN_VERSION: dict[type, tuple[str, ...]] = {
    m.Create: ("pipe", "keep", "grants", "mcp"),
    m.SessionInfo: ("agent_grants",),
    m.Join: ("rows", "cols"),
    m.Exited: ("reason",),
}


def _make() -> cattrs.Converter:
    conv = make_converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(bool, _strict(bool, "a boolean"))

    def _float(value: object, _type: object) -> float:
        if type(value) not in (int, float):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)  # type: ignore[arg-type]

    conv.register_structure_hook(float, _float)

    def _enum(value: object, type_: type[enum.Enum]) -> enum.Enum:
        if type(value) is not str:
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return type_(value)

    # StrEnum before str: singledispatch picks the nearest class in the MRO
    conv.register_structure_hook(enum.StrEnum, _enum)
    conv.register_structure_hook(enum.Enum, _enum)
    for cls, fields in _ADDED_IN_VERSION.items():
        overrides: dict[str, Any] = {name: override(omit_if_default=True) for name in fields}
        conv.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, conv, **overrides))
    configure_tagged_union(m.ClientMessage, conv, tag_generator=tag_of, tag_name="type")
    configure_tagged_union(m.ServerMessage, conv, tag_generator=tag_of, tag_name="type")
    return conv


converter = _make()

_SERVER_TYPES = frozenset(get_args(m.ServerMessage))
_HELLO_TYPES = get_args(m.Hello)
_CLIENT_TAGS = {tag_of(c) for c in get_args(m.ClientMessage)}
_SERVER_TAGS = {tag_of(c) for c in _SERVER_TYPES}


def encode(message: m.ClientMessage | m.ServerMessage) -> bytes:
    """A message as a CONTROL frame."""
    union = m.ServerMessage if type(message) in _SERVER_TYPES else m.ClientMessage
    obj = converter.unstructure(message, unstructure_as=union)
    return encode_frame(Kind.CONTROL, json.dumps(obj, separators=(",", ":")).encode())


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ValueError) and not isinstance(exc, cattrs.BaseValidationError):
        return f"invalid value ({exc})"
    return format_exception(exc, type_)


def describe_error(exc: cattrs.BaseValidationError) -> str:
    """Every problem cattrs found, one per clause, validators' messages included."""
    return "; ".join(cattrs.transform_error(exc, format_exception=_describe))


#: no message of the protocol nests deeper than this; deeper input is refused unparsed
MAX_NESTING = 16
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def _too_deep(payload: bytes) -> bool:
    if payload.count(b"[") + payload.count(b"{") <= MAX_NESTING:
        return False  # the common case, counted in C
    depth = 0
    for byte in _STRING.sub(b"", payload):
        if byte in _OPEN:
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif byte in _CLOSE:
            depth -= 1
    return False


def _has_lone_surrogate(obj: object) -> bool:
    """JSON's \\uD800 escapes can make strings that are not Unicode text."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _decode(payload: bytes, union: Any, tags: set[str]) -> Any:
    if _too_deep(payload):
        raise ProtocolError(f"control message nested deeper than {MAX_NESTING}", code=_BAD)
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"control frame is not UTF-8 JSON: {exc}", code=_BAD) from None
    except RecursionError:
        raise ProtocolError("control message nested too deeply", code=_BAD) from None
    if b"\\u" in payload and _has_lone_surrogate(obj):
        raise ProtocolError(
            "control message has a string that is not Unicode text (a lone surrogate)",
            code=_BAD,
        )
    if not isinstance(obj, dict):
        raise ProtocolError("control frame must hold a JSON object", code=_BAD)
    tag = obj.get("type")
    if not isinstance(tag, str):
        raise ProtocolError("control message has no string 'type'", code=_BAD)
    if tag not in tags:
        raise ProtocolError(f"unknown control message type {tag!r}", code=_BAD)
    try:
        return converter.structure(obj, union)
    except cattrs.BaseValidationError as exc:
        raise ProtocolError(f"invalid {tag} message: {describe_error(exc)}", code=_BAD) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"invalid {tag} message: {exc}", code=_BAD) from None


_BAD = ErrorCode.BAD_MESSAGE


def decode_client(payload: bytes) -> m.ClientMessage:
    """A CONTROL payload from a client as a typed message."""
    return _decode(payload, m.ClientMessage, _CLIENT_TAGS)  # type: ignore[no-any-return]


def decode_hello(frame: Frame) -> m.Hello:
    """A connection's first frame as its hello, by the handshake's three rules.

    It must be a CONTROL frame, hold one of the hello messages, and speak
    this server's protocol version; anything else is a :class:`ProtocolError`.
    """
    if frame.kind is not Kind.CONTROL:
        raise ProtocolError("the first frame must be a control message (hello)")
    hello: m.ClientMessage = decode_client(frame.payload)
    if not isinstance(hello, _HELLO_TYPES):
        expected = ", ".join(tag_of(c) for c in _HELLO_TYPES)
        raise ProtocolError(
            f"expected one of {expected}, got {tag_of(type(hello))}", code=_BAD
        )
    if hello.version != m.PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {hello.version} is not supported "
            f"(this server speaks {m.PROTOCOL_VERSION})",
            code=ErrorCode.VERSION,
        )
    return cast(m.Hello, hello)


def decode_server(payload: bytes) -> m.ServerMessage:
    """A CONTROL payload from the server as a typed message."""
    return _decode(payload, m.ServerMessage, _SERVER_TAGS)  # type: ignore[no-any-return]


def structure(data: object, cls: type[T]) -> T:
    """Strictly build ``cls`` from plain data (used for the config file too)."""
    return converter.structure(data, cls)

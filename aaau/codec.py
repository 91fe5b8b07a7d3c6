"""The one cattrs converter for control messages, strict in what it accepts.

A control payload is a JSON object whose ``type`` key names the message
(``"resize"``, ``"welcome"``, ...). Extra keys, wrong types, coercible-looking
strings (``"80"`` for an int) and unknown types are all refused with a
:class:`aaau.protocol.ProtocolError` carrying a precise message.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar, get_args

import cattrs
from cattrs.preconf.json import make_converter
from cattrs.strategies import configure_tagged_union
from cattrs.v import format_exception

from . import messages as m
from .protocol import Kind, ProtocolError, encode_frame

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
    configure_tagged_union(m.ClientMessage, conv, tag_generator=tag_of, tag_name="type")
    configure_tagged_union(m.ServerMessage, conv, tag_generator=tag_of, tag_name="type")
    return conv


converter = _make()

_SERVER_TYPES = frozenset(get_args(m.ServerMessage))
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


def _decode(payload: bytes, union: Any, tags: set[str]) -> Any:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"control frame is not UTF-8 JSON: {exc}", code="bad-message") from None
    if not isinstance(obj, dict):
        raise ProtocolError("control frame must hold a JSON object", code="bad-message")
    tag = obj.get("type")
    if not isinstance(tag, str):
        raise ProtocolError("control message has no string 'type'", code="bad-message")
    if tag not in tags:
        raise ProtocolError(f"unknown control message type {tag!r}", code="bad-message")
    try:
        return converter.structure(obj, union)
    except cattrs.BaseValidationError as exc:
        raise ProtocolError(
            f"invalid {tag} message: {describe_error(exc)}", code="bad-message"
        ) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"invalid {tag} message: {exc}", code="bad-message") from None


def decode_client(payload: bytes) -> m.ClientMessage:
    """A CONTROL payload from a client as a typed message."""
    return _decode(payload, m.ClientMessage, _CLIENT_TAGS)  # type: ignore[no-any-return]


def decode_server(payload: bytes) -> m.ServerMessage:
    """A CONTROL payload from the server as a typed message."""
    return _decode(payload, m.ServerMessage, _SERVER_TAGS)  # type: ignore[no-any-return]


def structure(data: object, cls: type[T]) -> T:
    """Strictly build ``cls`` from plain data (used for the config file too)."""
    return converter.structure(data, cls)

"""What a request's fields may hold: checked by the message classes and by the light clients.

Plain functions and constants, no attrs: :mod:`aaau.messages` wraps them as
validators, and :mod:`aaau.oneshot` runs them on the requests it builds
without importing the classes, so both refuse the same things with the same words.
"""

from __future__ import annotations

import re
from typing import Final

#: The protocol version this code speaks. A peer announcing another is refused.
PROTOCOL_VERSION: Final = 2

MAX_DIMENSION: Final = 9999
MAX_ARGV: Final = 256
MAX_ARG_LEN: Final = 65536
MAX_ENV: Final = 128

SESSION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
TERM: Final = re.compile(r"[A-Za-z0-9._+-]{1,64}")
ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_argv(value: tuple[str, ...] | None) -> None:
    if value is None:
        return
    if not value:
        raise ValueError("argv must not be empty")
    if len(value) > MAX_ARGV:
        raise ValueError(f"argv has more than {MAX_ARGV} items")
    if not value[0]:
        raise ValueError("the program name must not be empty")
    for arg in value:
        if "\0" in arg or len(arg) > MAX_ARG_LEN:
            raise ValueError("an argument contains NUL or is too long")


def check_env(value: dict[str, str]) -> None:
    if len(value) > MAX_ENV:
        raise ValueError(f"more than {MAX_ENV} environment variables")
    for name, val in value.items():
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        if "\0" in val or len(val) > MAX_ARG_LEN:
            raise ValueError(f"environment variable {name} contains NUL or is too long")


def check_cwd(value: str | None) -> None:
    if value is not None and (not value.startswith("/") or "\0" in value or len(value) > 4096):
        raise ValueError("cwd must be an absolute path")


def check_term(value: str) -> None:
    if not TERM.fullmatch(value):
        raise ValueError(f"TERM {value!r} is not a terminal type name (letters, digits, ._+-)")


def check_dimension(name: str, value: int | None) -> None:
    if value is not None and not 1 <= value <= MAX_DIMENSION:
        raise ValueError(f"{name} must be between 1 and {MAX_DIMENSION}, got {value}")


def check_session_id(value: str) -> None:
    if not SESSION_ID.fullmatch(value):
        raise ValueError(f"invalid session id {value!r}")


INSTRUCTION: Final = re.compile(r"[A-Z0-9_]{1,64}")
MAX_GRANTS: Final = 32


def check_grants(value: tuple[str, ...] | None) -> None:
    """ASys instruction names, upper case (``SYS_STATUS``); whether each exists is the server's."""
    if value is None:
        return
    if len(value) > MAX_GRANTS:
        raise ValueError(f"more than {MAX_GRANTS} instructions")
    for name in value:
        if not INSTRUCTION.fullmatch(name):
            raise ValueError(f"{name[:64]!r} is not an ASys instruction name (SYS_STATUS, ...)")

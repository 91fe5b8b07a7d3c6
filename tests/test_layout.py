"""The layout holds: small rooms, and each byte path runs one way.

Read from the source (AST), so a change that breaks the layout fails here
with the place named, instead of rotting quietly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aaau"
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60

#: modules that stay pure: no Trio, no sockets, no processes (sans-I/O, h11 style)
PURE = {
    "errors", "messages", "protocol", "codec", "escape", "policy", "vtscan", "modes", "logview",
}
_IO_MODULES = {"trio", "socket", "subprocess", "os", "fcntl", "termios", "pwd", "grp"}

#: module -> package modules it must never import (who may know whom)
FORBIDDEN = {
    "outbox": {"session", "members", "sessions", "connection", "requests", "server", "codec"},
    "pty": {"session", "members", "connection", "requests", "framing", "outbox", "codec"},
    "members": {"session", "sessions", "connection", "requests", "server", "framing", "pty"},
    "session": {"sessions", "connection", "requests", "server", "framing", "listener"},
    "sessions": {"connection", "requests", "server", "framing", "listener"},
    "requests": {"connection", "sessions", "server", "framing", "listener", "pty"},
    "connection": {"server", "listener", "pty", "spawn"},
    "framing": {"session", "members", "connection", "outbox", "server"},
    "listener": {"session", "sessions", "connection", "audit"},
    "client": {"server", "session", "sessions", "connection", "requests", "pty", "outbox"},
    "asys": {"session", "sessions", "connection", "requests", "server", "members"},
    "vtscan": {"session", "members", "connection", "requests", "server", "pty", "output", "screen"},
    "screen": {"session", "members", "connection", "requests", "server", "pty", "outbox"},
    "output": {"session", "sessions", "connection", "requests", "server", "framing", "outbox"},
    "views": {"session", "sessions", "connection", "requests", "server", "pty", "framing"},
    "eof": {"session", "members", "connection", "requests", "server", "outbox", "pty"},
    "attach": {"server", "session", "sessions", "connection", "requests", "pty", "members"},
    "terminal": {"server", "session", "sessions", "connection", "requests", "pty", "members"},
}


def _modules() -> list[tuple[str, ast.Module]]:
    """(dotted name inside the package, tree); a package's __init__ is named for the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name or "__init__", ast.parse(path.read_text(), str(path))))
    return out


def _imports(name: str, tree: ast.Module, *, is_package: bool = False) -> tuple[set[str], set[str]]:
    """(top-level package modules, outside top-level modules) that ``name`` imports."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            outside.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            outside.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                inside.add([*base, *node.module.split(".")][0])
            else:
                inside.update([*base, alias.name][0] for alias in node.names)
    return inside, outside


def _is_package(name: str) -> bool:
    return (PACKAGE / name.replace(".", "/") / "__init__.py").exists()


@pytest.mark.parametrize(("name", "tree"), _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_no_class_or_function_is_too_big(name: str, tree: ast.Module) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            assert lines <= limit, f"{name}.{node.name}: {lines} lines (limit {limit})"


def test_the_pure_modules_do_no_io() -> None:
    for name, tree in _modules():
        if name in PURE:
            _, outside = _imports(name, tree, is_package=_is_package(name))
            assert not outside & _IO_MODULES, f"{name} imports {outside & _IO_MODULES}"


def test_no_module_reaches_around_another() -> None:
    for name, tree in _modules():
        inside, _ = _imports(name, tree, is_package=_is_package(name))
        bad = inside & FORBIDDEN.get(name.split(".")[0], set())
        assert not bad, f"{name} imports {bad}"
        assert "cli" not in inside or name == "entry", f"{name} imports cli"  # the entry points


def test_the_import_reader_resolves_relative_imports() -> None:
    code = "from . import codec\nfrom .session import S\nfrom ..audit import A\nimport trio\n"
    # inside asys, ".session" is asys.session; ".." climbs to the package's top
    assert _imports("asys.base", ast.parse(code)) == ({"asys", "audit"}, {"trio"})
    assert _imports("connection", ast.parse(code)) == ({"codec", "session", "audit"}, {"trio"})
    assert _imports("asys", ast.parse("from .base import SW\n"), is_package=True) == (
        {"asys"},
        set(),
    )

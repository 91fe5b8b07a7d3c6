"""Completions and man pages: generated from the parsers, current, and working in the
real bash and man."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import root

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "aaau" / "data"


def test_the_generated_files_match_the_parsers() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "docgen.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"run tools/docgen.py: {result.stdout}{result.stderr}"


def _complete(prog: str, line: str) -> list[str]:
    """What bash offers for ``line`` (the cursor at its end), through the real script."""
    words = line.split(" ")
    script = (
        f"source {DATA / 'completion' / (prog + '.bash')}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
        f"_shtab_{prog.replace('-', '_')}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize(
    ("prog", "line", "offered"),
    [
        ("aaau", "aaau ki", "kill"),
        ("aaau", "aaau cl", "claude"),
        ("aaau", "aaau kill --j", "--json"),
        ("aaau", "aaau log ver", "verify"),
        ("aaau-server", "aaau-server check", "check-config"),
        ("aaau-server", "aaau-server run --journ", "--journald"),
    ],
)
def test_bash_completes_subcommands_and_their_options(prog: str, line: str, offered: str) -> None:
    assert offered in _complete(prog, line)


@pytest.mark.parametrize("page", ["aaau.1", "aaau-server.8"])
def test_the_man_pages_render_without_errors(page: str) -> None:
    result = subprocess.run(
        ["man", "--warnings=mac,escape,input", "-l", str(DATA / "man" / page)],
        capture_output=True,
        text=True,
        check=False,
        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "MANPAGER": "cat", "PAGER": "cat"},
    )
    problems = [x for x in result.stderr.splitlines() if "cannot adjust line" not in x]
    assert result.returncode == 0 and not problems, result.stderr  # a long word: cosmetic
    name = page.rsplit(".", 1)[0]
    text = result.stdout.replace("\u2010", "-")
    assert re.search(rf"NAME\n\s+{name}\s+-\s+\S", text), text[:400]  # whatis reads it


@root
def test_init_installs_completions_and_man_pages(
    accounts: dict[str, object], base_dir: Path
) -> None:
    share = base_dir / "share"
    for path in (
        "bash-completion/completions/aaau",
        "zsh/site-functions/_aaau-server",
        "fish/vendor_completions.d/aaau.fish",
        "man/man1/aaau.1",
        "man/man8/aaau-server.8",
    ):
        installed = share / path
        assert installed.read_text() and installed.stat().st_mode & 0o777 == 0o644, path

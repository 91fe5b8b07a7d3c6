"""Text from other people made safe to print on a terminal."""

from __future__ import annotations

import unicodedata


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control and format characters escaped.

    Another member chooses argv (and, through it, what ``aaau ls`` shows): raw, it
    could set an admin's window title, hide a line, or move the cursor.
    """
    return "".join(
        ch if unicodedata.category(ch)[0] != "C" else ch.encode("unicode_escape").decode()
        for ch in text
    )

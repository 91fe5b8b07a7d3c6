"""The command entry points, importing only what the command needs.

``aaau log`` reads files and should start at once: it does not load the
client, Trio or the protocol, which ``aaau`` needs for everything else.
"""

from __future__ import annotations

import sys


def client(argv: list[str] | None = None) -> int:
    """``aaau``: ``aaau log ...`` or the client."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["log"]:
        from .logcli import main

        return main(argv[1:])
    from .cli import client_main

    return client_main(argv)


def server(argv: list[str] | None = None) -> int:
    """``aaau-server``."""
    from .servercli import server_main

    return server_main(sys.argv[1:] if argv is None else argv)

"""``python -m aaau`` is the client; ``python -m aaau server ...`` the server."""

import sys

from .entry import client, server

if len(sys.argv) > 1 and sys.argv[1] == "server":
    sys.exit(server(sys.argv[2:]))
sys.exit(client(sys.argv[1:]))

"""``python -m aaau`` is the client; ``python -m aaau server ...`` the server."""

import sys

from .cli import client_main, server_main

if len(sys.argv) > 1 and sys.argv[1] == "server":
    sys.exit(server_main(sys.argv[2:]))
sys.exit(client_main(sys.argv[1:]))

"""Exit codes of the ``sockserve`` commands: a leaf module every command imports.

0 ok, 1 runtime failure, 2 usage error; the client commands (``call``, ``chat``,
``bench``) add 3, 4 and 5. A connect that times out is 3, "cannot connect" (the
server was never reached, nothing was sent); 4 means connected, but no complete
reply within ``--timeout``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_TIMEOUT = 4
EXIT_CLOSED = 5
#: A command ended by Ctrl-C: 128 + SIGINT, as shells report it.
EXIT_INTERRUPTED = 130

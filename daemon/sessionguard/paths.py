"""Well-known paths shared by the daemon and its control client.

Kept free of asyncio, structlog and the store so that ``sessionguardctl``
can import it cheaply.
"""

from __future__ import annotations

import os

SOCKET_NAME = "sessionguard.sock"
#: The system daemon's socket (``sessionguard.socket`` / ``sessionguardd`` as root).
SYSTEM_SOCKET = "/run/" + SOCKET_NAME
#: Environment variable that overrides the default socket path of the client.
SOCKET_ENV = "SESSIONGUARD_SOCKET"


def default_socket_path() -> str:
    """Where the control socket lives when nothing else is configured.

    ``/run/sessionguard.sock`` for root; for another user
    ``$XDG_RUNTIME_DIR/sessionguard.sock`` when that is set, else
    ``/tmp/sessionguard-<uid>.sock``.
    """
    uid = os.geteuid()
    if uid == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, SOCKET_NAME)
    return f"/tmp/sessionguard-{uid}.sock"

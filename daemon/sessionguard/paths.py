"""Where the control socket is, for the daemon and for its client.

Never a path in ``/tmp``: anyone can create a name there first, and a client
that talked to it would send an admin's ``restore`` to that user (and
believe its answer). Kept free of asyncio, structlog and the store so that
``sessionguardctl`` can import it cheaply.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SOCKET_NAME = "sessionguard.sock"
#: The system daemon's socket (``sessionguard.socket`` / ``sessionguardd`` as root).
SYSTEM_SOCKET = "/run/" + SOCKET_NAME
#: Environment variable naming the socket, for the client.
SOCKET_ENV = "SESSIONGUARD_SOCKET"
#: The user the packaged daemon runs as; the client trusts a server running as it.
DAEMON_USER = "sessionguard"
#: Environment variable naming another daemon user the client may trust.
DAEMON_USER_ENV = "SESSIONGUARD_DAEMON_USER"
#: The default read group (``[daemon] read_group``): whom to tell to join.
READ_GROUP = "sessionguard"

#: Why a daemon has no socket to bind, and how to give it one.
NO_DEFAULT_SOCKET = ("no control socket path: not root and XDG_RUNTIME_DIR is not set (a socket in /tmp "
                     "could be created first by another user); pass --socket PATH, set [daemon] socket, "
                     "or set XDG_RUNTIME_DIR")


def _runtime_socket(environ: Mapping[str, str]) -> str | None:
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    return os.path.join(runtime, SOCKET_NAME) if os.path.isabs(runtime) else None


def default_socket_path() -> str:
    """The daemon's socket when none is configured: ``/run/sessionguard.sock`` for
    root, else ``$XDG_RUNTIME_DIR/sessionguard.sock``; ``""`` when neither applies
    (the daemon then says :data:`NO_DEFAULT_SOCKET`)."""
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    return _runtime_socket(os.environ) or ""


def client_socket(environ: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """The socket the client uses when ``--socket`` is not given, and every place it
    looked (for the "cannot connect" hint).

    ``$SESSIONGUARD_SOCKET``, else ``/run/sessionguard.sock`` when it exists (the
    system service, also for group members who are not root), else
    ``$XDG_RUNTIME_DIR/sessionguard.sock`` (a daemon of the caller's own).
    """
    given = environ.get(SOCKET_ENV)
    if given:
        return given, [f"{given} (${SOCKET_ENV})"]
    tried = [SYSTEM_SOCKET]
    if os.path.lexists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET, tried
    tried[0] += " (not there)"
    runtime = _runtime_socket(environ)
    if runtime is None:
        tried.append(f"$XDG_RUNTIME_DIR/{SOCKET_NAME} (XDG_RUNTIME_DIR is not set)")
        return None, tried
    tried.append(runtime)
    return runtime, tried

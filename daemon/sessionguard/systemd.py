"""systemd integration: sd_notify, the watchdog interval, socket activation, journald.

Everything here is optional: outside systemd (no ``NOTIFY_SOCKET``, no
``LISTEN_FDS``, stderr not the journal) nothing is imported from
systemd-python and the daemon runs as before. Under systemd without
systemd-python, :func:`require` fails with one line naming the fix.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from .log import printable
from .naming import ascii_int

#: Events an operator alerts on get a stable journald MESSAGE_ID (journalctl MESSAGE_ID=…).
MESSAGE_IDS = {
    "session.shrunk": "7b8f0c9e2a0b4d6c9a31f5e2d4c8b1a0",
    "version.kept": "2c4e6a8b0d1f4e3a9c7b5d3f1e0a2c4b",
    "session.restored": "9d1b3f5a7c9e4b2d8f6a4c2e0b9d7f5a",
    "watch.overflow": "4a6c8e0b2d4f4a1c8e6b4d2f0a8c6e4b",
}
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
#: Fields that get a short journal name; anything else becomes SESSIONGUARD_<KEY>.
_RENAMES = {
    "event": "SESSIONGUARD_EVENT",
    "sid": "SESSIONGUARD_SESSION",
    "before": "SESSIONGUARD_COUNT_BEFORE",
    "after": "SESSIONGUARD_COUNT_AFTER",
}


class SystemdUnavailable(RuntimeError):
    """Running under systemd but systemd-python is not installed."""


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET") or os.environ.get("LISTEN_FDS"))


def require() -> None:
    """Fail with one clear line if systemd needs us and systemd-python is missing."""
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        raise SystemdUnavailable(
            "sessionguardd is running under systemd but systemd-python is missing: "
            "install it with  pip install 'sessionguard[systemd]'  (Debian: apt install python3-systemd)"
        ) from None


def notify(*states: str) -> bool:
    """Send sd_notify states (READY=1, STATUS=…, WATCHDOG=1, STOPPING=1). False when not under systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    from systemd import daemon as sd

    try:
        return bool(sd.notify("\n".join(states)))
    except OSError:
        # A NOTIFY_SOCKET naming a missing path raises instead of returning False.
        return False


def watchdog_interval() -> float | None:
    """Seconds between required WATCHDOG=1 pings, or None when systemd's watchdog is off:
    as ``sd_watchdog_enabled``, also when ``WATCHDOG_PID`` names another process or no
    number at all (:func:`~.naming.ascii_int`)."""
    usec = ascii_int(os.environ.get("WATCHDOG_USEC", ""))
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and ascii_int(pid) != os.getpid():
        return None
    return usec / 1e6


def activated_socket(name: str = "control") -> socket.socket | None:
    """The listening socket systemd passed (``LISTEN_FDS``), preferring the one named *name*."""
    if not os.environ.get("LISTEN_FDS"):
        return None
    from systemd import daemon as sd

    fds = sd.listen_fds_with_names(unset_environment=True)
    if not fds:
        return None
    chosen = next((fd for fd, fdname in fds.items() if fdname == name), min(fds))
    return socket.socket(fileno=chosen)


def journal_value(value: Any) -> str | None:
    """A field value as journald should store it: never a Python repr.

    Strings as they are, numbers in decimal, booleans ``true``/``false``,
    lists and dicts as JSON (a shipper can parse them); ``None`` means the
    field is left out.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:  # a lone surrogate somewhere inside: escaped, like every other log line
        return orjson.dumps(printable(value), default=str).decode()


def journal_field(key: str) -> str:
    """``sid`` → ``SESSIONGUARD_SESSION``; anything else → ``SESSIONGUARD_<KEY>`` (A–Z, 0–9, _ only)."""
    safe = "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper())
    return _RENAMES.get(key) or "SESSIONGUARD_" + safe


def journal_renderer(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    """structlog's last processor under journald: native entries with structured fields.

    ``PRIORITY`` follows the log level; alertable events carry ``MESSAGE_ID``;
    every field becomes ``SESSIONGUARD_<KEY>`` (``SESSION_ID`` already means a
    login session to journald, hence ``SESSIONGUARD_SESSION`` for the sid).
    """
    from systemd import journal

    name = str(event.pop("event", ""))
    level = str(event.pop("level", method))
    event.pop("timestamp", None)
    fields: dict[str, Any] = {"SESSIONGUARD_EVENT": name, "PRIORITY": _PRIORITY.get(level, 6)}
    # The call site (CallsiteParameterAdder); journal.send would otherwise record this function.
    code = {"CODE_FILE": event.pop("pathname", None), "CODE_LINE": event.pop("lineno", None),
            "CODE_FUNC": event.pop("func_name", None)}
    if name in MESSAGE_IDS:
        fields["MESSAGE_ID"] = MESSAGE_IDS[name]
    summary = [name]
    for key, value in event.items():
        text = journal_value(value)
        if text is not None:
            fields[journal_field(key)] = text
            summary.append(f"{key}={text}")
    journal.send(" ".join(summary), SYSLOG_IDENTIFIER="sessionguard", **code, **fields)
    raise structlog.DropEvent

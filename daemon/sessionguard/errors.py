"""Every error sessionguard raises on purpose, under one base class.

A server embedding the library can catch :class:`SessionGuardError` for all
of them; the control socket maps each kind to one JSON-RPC error code (see
:mod:`sessionguard.protocol`). Each class also derives from the standard
exception a caller would expect for that kind of failure (``LookupError``
for "not found", ``OSError`` for a file that must not be opened…), so code
written against the standard types keeps working.

Only the standard library is imported here.
"""

from __future__ import annotations


class SessionGuardError(Exception):
    """Base of every error sessionguard raises on purpose."""


class NotFound(SessionGuardError, LookupError):
    """No such session, version or watch (or an ambiguous name): the message says which."""


class StoreError(SessionGuardError):
    """The store could not carry an operation out (locked, full, unsafe); the message says why."""


class SessionLocked(StoreError):
    """Another process holds the session's lock for longer than the caller may wait."""


class Conflict(SessionGuardError):
    """The live file changed since the caller looked (a restore's compare-and-swap failed)."""


class Unprocessable(SessionGuardError, ValueError):
    """A version's content cannot be parsed, or cannot travel as JSON (nested too deeply)."""


class UnsafeSessionFile(SessionGuardError, OSError):
    """The name is a symlink, FIFO, device, socket or directory: refused, never followed or read."""


class FileTooLarge(SessionGuardError, OSError):
    """The file is larger than the configured cap: never read, counted as unparseable."""


class PartialSessionError(SessionGuardError, RuntimeError):
    """Refused: the session was loaded metadata-only, so saving it would drop its messages."""


class CorruptSessionError(SessionGuardError, ValueError):
    """The session file exists but cannot be parsed."""


class ConfigError(SessionGuardError):
    """Invalid configuration: the message names the file and the key."""

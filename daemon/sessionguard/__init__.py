"""sessionguard: keep the prior version of every chat/agent session that a write shrinks.

The embeddable part (``Guard``, the store) needs only orjson and the standard
library; the daemon, its control socket and systemd integration live in
modules a server never imports.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version

from .count import CountSpec
from .errors import (
    Conflict,
    CorruptSessionError,
    NotFound,
    PartialSessionError,
    SessionGuardError,
    SessionLocked,
    StoreError,
    UnsafeSessionFile,
)
from .events import GuardEvent
from .guard import Guard, PartialDocument
from .naming import Version, validate_sid
from .recovery import RecoveryReport
from .restore import RestoreResult
from .retention import Retention

#: The name 0.1.0 used for :class:`NotFound`.
VersionNotFound = NotFound

try:
    __version__ = _pkg_version("sessionguard")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

__all__ = [
    "Conflict",
    "CorruptSessionError",
    "CountSpec",
    "Guard",
    "GuardEvent",
    "NotFound",
    "PartialDocument",
    "PartialSessionError",
    "RecoveryReport",
    "RestoreResult",
    "Retention",
    "SessionGuardError",
    "SessionLocked",
    "StoreError",
    "UnsafeSessionFile",
    "Version",
    "VersionNotFound",
    "__version__",
    "validate_sid",
]

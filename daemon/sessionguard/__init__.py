"""sessionguard: keep the prior version of every chat/agent session that a write shrinks.

The embeddable part (``Guard``, the store) needs only orjson and the standard
library; the daemon, its control socket and systemd integration live in
modules a server never imports.
"""

from importlib.metadata import PackageNotFoundError, version as _pkg_version

from .count import CountSpec
from .guard import (
    CorruptSessionError,
    Guard,
    PartialDocument,
    PartialSessionError,
    RecoveryReport,
    UnsafeSessionFile,
)
from .store import Retention, RestoreResult, Store, StoreError, Version, VersionNotFound, validate_sid

try:
    __version__ = _pkg_version("sessionguard")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

__all__ = [
    "CorruptSessionError",
    "CountSpec",
    "Guard",
    "PartialDocument",
    "PartialSessionError",
    "RecoveryReport",
    "RestoreResult",
    "Retention",
    "Store",
    "StoreError",
    "UnsafeSessionFile",
    "Version",
    "VersionNotFound",
    "validate_sid",
    "__version__",
]

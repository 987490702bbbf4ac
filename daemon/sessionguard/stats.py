"""The daemon's counters and health, owned by the daemon so a reload keeps them.

Every thread (watchdog's, the worker, maintenance, the control pool)
updates them through these methods, under one lock; views (status, metrics,
the systemd STATUS= line) read a consistent :meth:`snapshot`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Overwritten:
    """A restore that a writer undid before the session grew past it."""

    sid: str
    watch: str
    at: float
    restored_at: float
    restored_count: int | None
    count_after: int | None
    version: str


@dataclass
class Snapshot:
    events: int = 0
    evaluations: int = 0
    shrinks: Counter[str] = field(default_factory=Counter)
    versions_kept: int = 0
    restores: int = 0
    overflows: int = 0
    reconciliations: int = 0
    maintenance_passes: int = 0
    errors: int = 0
    last_overflow: float | None = None
    last_shrink: tuple[str, float, str] | None = None
    degraded: dict[str, str] = field(default_factory=dict)
    overwritten: dict[tuple[str, str], Overwritten] = field(default_factory=dict)


class Stats:
    """Thread-safe counters; *log* receives ``degraded`` / ``degraded.cleared`` transitions."""

    def __init__(self, log: Any) -> None:
        self._s = Snapshot()
        self._lock = threading.Lock()
        self._log = log

    def bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._s, name, getattr(self._s, name) + n)

    def overflow(self) -> None:
        with self._lock:
            self._s.overflows += 1
            self._s.last_overflow = time.time()

    def shrink(self, sid: str, cls: str, *, new_version: bool) -> None:
        with self._lock:
            self._s.shrinks[cls] += 1
            self._s.versions_kept += new_version
            self._s.last_shrink = (sid, time.time(), cls)

    def degrade(self, key: str, why: str | None) -> None:
        """Mark *key* (``store:…``, ``watch:…``, ``inotify:…``, ``control``) degraded for
        *why*, or clear it (None). Only changes are logged: a retry loop does not flood."""
        with self._lock:
            if why is None:
                if self._s.degraded.pop(key, None) is None:
                    return
            elif self._s.degraded.get(key) == why:
                return
            else:
                self._s.degraded[key] = why
        if why is None:
            self._log.info("degraded.cleared", component=key)
        else:
            self._log.error("degraded", component=key, why=why)

    def clear_prefix(self, prefix: str) -> None:
        """Clear every degraded entry whose key starts with *prefix* (a watch taken down)."""
        with self._lock:
            keys = [k for k in self._s.degraded if k.startswith(prefix)]
        for k in keys:
            self.degrade(k, None)

    def overwritten(self, mark: Overwritten | None, key: tuple[str, str]) -> None:
        """Record (or, with None, clear) a restore a writer undid."""
        with self._lock:
            if mark is None:
                self._s.overwritten.pop(key, None)
            else:
                self._s.overwritten[key] = mark

    def snapshot(self) -> Snapshot:
        """A consistent copy for views."""
        with self._lock:
            return dataclasses.replace(self._s, shrinks=Counter(self._s.shrinks), degraded=dict(self._s.degraded),
                                       overwritten=dict(self._s.overwritten))

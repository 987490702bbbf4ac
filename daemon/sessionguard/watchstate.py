"""What the daemon holds for one watched directory: its descriptors, store and sessions.

Kept apart from the decisions (:mod:`sessionguard.tracker`) so that the
supervisor, the passes and the control service share one picture of a
watch without reaching into each other.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from . import fsutil
from .config import WatchConfig
from .count import CountSpec, key_hash, stat_key
from .hint import CacheEntry, RestartHint
from .naming import Matcher, Method
from .rules import Identity
from .store import Store

#: What a skipped file was when it was skipped (identity, link count, owner):
#: a change of any is looked at again.
SkipKey = tuple[int, ...]


class _Shared:
    __slots__ = ("_gate",)

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        self._gate._enter_shared()

    def __exit__(self, *exc: object) -> None:
        self._gate._exit_shared()


def skip_key(st: os.stat_result) -> SkipKey:
    return (*stat_key(st), st.st_nlink, st.st_uid)


class Gate:
    """A readers-writer lock: any number of shared holders (evaluations, restores —
    re-entrant, so a restore may evaluate), or one exclusive holder (the supervisor
    closing descriptors). Readers never wait for each other, so a restore waiting for
    a session lock never stalls the worker."""

    def __init__(self) -> None:
        # the state is changed under the plain lock (taken twice per evaluation, and
        # ``with`` on a Condition is a Python call each way); waiting goes through the
        # Condition on that same lock, and a reader leaving wakes only a waiting writer
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._shared = _Shared(self)

    def shared(self) -> AbstractContextManager[None]:
        """Held around every evaluation: a class, not a generator (a first start holds it
        100,000 times), and one object for every holder (it keeps no state of its own)."""
        return self._shared

    def _enter_shared(self) -> None:
        with self._lock:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def _exit_shared(self) -> None:
        with self._lock:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._lock:
                self._writer = False
                self._cond.notify_all()


def pin_key(st: os.stat_result) -> int:
    """The identity of a pin file as the daemon left it (inode, size, mtime): when the pin
    on disk has another, someone else (the library) moved it and it must be read."""
    return key_hash((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


class Tracked:
    """What the daemon remembers of one session: the live file's identity (*key*), the pin
    it wrote (*pin*: see :func:`pin_key`; 0 when unknown) and what that pin holds (*count*,
    the keys of its *first* and next-to-last messages). Kept small: a million fit in RSS."""

    __slots__ = ("count", "first", "key", "pin", "prev")

    def __init__(self, key: int, count: int | None, first: int = 0, prev: int = 0, pin: int = 0) -> None:
        self.key, self.count, self.first, self.prev, self.pin = key, count, first, prev, pin

    def identity(self) -> Identity | None:
        """The pin's identity when known: a pin learned from an old store's names has none,
        nor has one a scan adopted or wrote for a session that had none (its keys are read
        from it when a write needs them)."""
        if self.count is None or (self.first == 0 and self.count > 0):
            return None
        return Identity(self.count, self.first, self.prev)


class Sessions(dict[str, "Tracked | int"]):
    """The sessions a watch tracks: id → :class:`Tracked`, or — for a session a restart
    adopted from its hint and nothing touched since — the session's place in that hint,
    made a :class:`Tracked` only when first asked for (:meth:`tracked`). A restart over a
    million sessions then keeps one small int per session instead of an object and four
    ints: RSS after a restart over a million 386 → 202 MiB here (the hint stays: 48 bytes
    a session), and a second less to start.

    Read values through :meth:`tracked`, :meth:`key` or :meth:`entry`, never as a plain
    dict's: a value may be a place. :meth:`key` and :meth:`entry` make no object (a
    reconciliation or a ``list`` goes through every session)."""

    def __init__(self) -> None:
        super().__init__()
        #: What the places refer to: the restart hint, kept until the sessions are cleared.
        self.hint: RestartHint | None = None
        self._lock = threading.Lock()

    def refer_to(self, hint: RestartHint) -> None:
        """Places from now on are places in *hint* (those in an earlier one become objects)."""
        if self.hint is not None and self.hint is not hint:
            for sid in list(self):
                self.tracked(sid)
        self.hint = hint

    def tracked(self, sid: str) -> Tracked | None:
        value = self.get(sid)
        if value is None or isinstance(value, Tracked):
            return value
        with self._lock:  # one object per session, whichever thread asks first
            hint, value = self.hint, self.get(sid)
            if isinstance(value, int):
                if hint is None:  # cleared meanwhile (the store was replaced)
                    return None
                value = self[sid] = Tracked(*hint.entry(value))
        return value

    def key(self, sid: str) -> int | None:
        """The tracked live file's identity (``stat_hash``), or None."""
        hint, value = self.hint, self.get(sid)  # the hint first: clear() drops it after the values
        if isinstance(value, int):
            return hint.keys[value] if hint is not None else None
        return None if value is None else value.key

    def entry(self, sid: str) -> CacheEntry | None:
        """What is known of *sid* as a restart hint's entry, or None."""
        hint, value = self.hint, self.get(sid)
        if isinstance(value, int):
            return hint.entry(value) if hint is not None else None
        return None if value is None else (value.key, value.count, value.first, value.prev, value.pin)

    def entries(self) -> dict[str, CacheEntry]:
        """Every session's entry (for ``pins.cache`` at a clean stop)."""
        out: dict[str, CacheEntry] = {}
        for sid in list(self):
            entry = self.entry(sid)
            if entry is not None:
                out[sid] = entry
        return out

    def clear(self) -> None:
        super().clear()
        self.hint = None


@dataclass
class RestoreMark:
    """A restore the daemon made, watched until the session grows past it."""

    at: float
    count: int | None
    version: str


class WatchState:
    """One watched directory: its config, checked descriptor, store and tracked sessions."""

    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        self.root = cfg.path
        in_dir = not cfg.store or os.path.dirname(cfg.store_path) == cfg.path
        self.matcher = Matcher(cfg.pattern, cfg.exclude, cfg.recursive,
                               frozenset({os.path.basename(cfg.store_path)}) if in_dir else frozenset())
        self.spec = CountSpec.parse(cfg.count)
        self.root_fd: int | None = None
        self.root_uid = -1
        self.root_dev = -1
        self.root_ident: tuple[int, int] = (-1, -1)
        self.store: Store | None = None
        self.available = False
        self.polled = False
        self.pin_method: Method = "copy"
        #: The store was opened and its crash leftovers are not swept yet (maintenance does).
        self.sweep_due = False
        self.files = Sessions()
        self.skipped: dict[str, SkipKey] = {}
        self.failing: set[str] = set()
        self.deferred: dict[str, float] = {}
        self.restored: dict[str, RestoreMark] = {}
        self.last_reconcile: float | None = None
        self.last_shrink: float | None = None
        #: Shared by every evaluation and control call on this watch, exclusive for
        #: the supervisor while it swaps or closes the descriptors above: a descriptor
        #: number is never used after it was closed (and perhaps reused for another file).
        self.gate = Gate()

    def parts_of(self, path: str) -> tuple[str, ...] | None:
        """The components of an absolute event path below this watch's root, or None."""
        if not path.startswith(self.root + os.sep):
            return None
        return tuple(path[len(self.root) + 1:].split(os.sep))

    def check_dir(self, st: os.stat_result) -> str | None:
        """Why a sub-directory may not be entered: another filesystem or another owner
        (a directory swapped in from elsewhere); None when it may."""
        if st.st_dev != self.root_dev:
            return "on another filesystem than the watched directory: not entered"
        if st.st_uid not in (self.root_uid, os.geteuid()):
            return f"owned by uid {st.st_uid}, not the watched directory's owner: not entered"
        return None

    def open_parent(self, parts: tuple[str, ...]) -> int:
        """A new descriptor of the directory holding *parts*' file (the caller closes it)."""
        assert self.root_fd is not None
        return fsutil.walk(self.root_fd, parts[:-1], self.check_dir)

    def cache_settings(self) -> dict[str, Any]:
        """What ``pins.cache``'s ids and counts depend on: a hint written under other
        settings is not believed (see :meth:`Pins.load_cache`)."""
        cfg = self.cfg
        return {"pattern": cfg.pattern, "exclude": list(cfg.exclude), "recursive": cfg.recursive,
                "skip": sorted(self.matcher.skip), "count": cfg.count}

    def foreign_link(self, st: os.stat_result, pin: os.stat_result | None = None) -> str | None:
        """Why a hard link to someone else's file is not read, or None.

        A second name for a file owned by another user than the directory's
        owner is most likely someone else's file linked in here: a root daemon
        reading it would copy, say, ``/etc/shadow`` into the store. Links made
        by the directory's owner (an ``os.link`` publish, the library's pins)
        are normal, and so is our own hard-link *pin* of this very file.
        """
        links = st.st_nlink
        if pin is not None and (pin.st_dev, pin.st_ino) == (st.st_dev, st.st_ino):
            links -= 1
        if links <= 1 or st.st_uid == self.root_uid:
            return None
        return (f"hard link to a file owned by uid {st.st_uid}; the directory belongs to uid {self.root_uid}: "
                "not read")

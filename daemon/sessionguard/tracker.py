"""Per-file state and the decision: grew / same / shrank / unparseable / deleted.

``Tracker.evaluate`` is called with "this file may have changed" — from an
inotify event, the start-up scan or a reconciliation pass — and compares the
live file with its pin: a loss turns the pin into a durable version *before*
the pin moves to the new content. Every failure is logged and leaves the old
pin in place, so the last good version is never given up.

Knows nothing of inotify, sockets or systemd.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import fsutil
from .config import WatchConfig
from .count import CountSpec, Parsed, StatKey, classify, parse, stat_key
from .store import (
    Pin,
    PinPolicy,
    Store,
    StoreError,
    is_loss,
    loss_reason,
    validate_sid,
)

#: A file modified less than this long ago is left to its close/rename event
#: by the periodic reconciliation, so an in-place writer is never read half-way.
SETTLE_SECONDS = 1.0
#: How long a capture waits for a session lock held by another process.
LOCK_TIMEOUT = 10.0

#: What a skipped file was when it was skipped: its identity plus link count
#: and owner, so a change of either (a hard link removed, a chown) is looked at again.
SkipKey = tuple[int, ...]


def skip_key(st: os.stat_result) -> SkipKey:
    return (*stat_key(st), st.st_nlink, st.st_uid)


@dataclass(slots=True)
class Tracked:
    """What the daemon knows of one session file (the pin, in memory)."""

    count: int | None
    key: StatKey
    high_water: int | None
    versions: int = 0
    last_shrink: float | None = None
    #: The pin already kept as a version while its successor could not be
    #: written (full store): a retry must not log or count that shrink again.
    kept_seq: int | None = None


@dataclass
class Stats:
    """Counters for status, metrics and the systemd STATUS= line."""

    events: int = 0
    evaluations: int = 0
    shrinks: Counter[str] = field(default_factory=Counter)
    versions_kept: int = 0
    restores: int = 0
    overflows: int = 0
    reconciliations: int = 0
    errors: int = 0
    skipped: int = 0
    last_reconcile: float | None = None
    last_overflow: float | None = None
    last_shrink: tuple[str, float, str] | None = None
    degraded: dict[str, str] = field(default_factory=dict)


class WatchState:
    """One watched directory: its config, store, and tracked sessions."""

    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        self.root = cfg.path
        self.spec = CountSpec.parse(cfg.count)
        self.store: Store | None = None
        self.files: dict[str, Tracked] = {}
        self.skipped: dict[str, SkipKey] = {}
        #: Sessions whose last store write failed: the store is degraded while any is left.
        self.failing: set[str] = set()
        self.available = False
        pattern = cfg.pattern
        literal_suffix = pattern[1:] if pattern.startswith("*") and not any(c in pattern[1:] for c in "*?[") else ""
        self.suffix = literal_suffix
        store_path = cfg.store_path
        self._store_prefix = store_path + os.sep

    @property
    def pin_policy(self) -> PinPolicy:
        return self.cfg.pin  # type: ignore[return-value]

    def open_store(self) -> Store:
        if self.store is None:
            self.store = Store(self.cfg.store_path, retention=self.cfg.retention, max_bytes=self.cfg.max_file_bytes)
        return self.store

    def identify(self, path: str) -> tuple[str | None, str | None]:
        """``(sid, None)`` for a session file of this watch; ``(None, why)`` for a
        name that matches the pattern but cannot be a session id (not valid
        UTF-8, too long); ``(None, None)`` for anything else."""
        if path.startswith(self._store_prefix) or not path.startswith(self.root + os.sep):
            return None, None
        rel = path[len(self.root) + 1:]
        parts = rel.split(os.sep)
        if len(parts) > 1 and not self.cfg.recursive:
            return None, None
        if any(fnmatch.fnmatchcase(p, ex) for p in parts for ex in self.cfg.exclude):
            return None, None
        if not fnmatch.fnmatchcase(parts[-1], self.cfg.pattern):
            return None, None
        if self.suffix:
            rel = rel[: -len(self.suffix)]
        try:
            rel.encode("utf-8")  # os.fsdecode turned undecodable bytes into lone surrogates
        except UnicodeEncodeError:
            return None, "name is not valid UTF-8: not a session id"
        # Only a recursive watch needs to encode sub-directories in the id; a
        # flat one uses the file name as is, exactly as the library does, so
        # both keep "50%off.json" in one store folder.
        sid = rel.replace("%", "%25").replace(os.sep, "%2F") if self.cfg.recursive else rel
        try:
            return validate_sid(sid), None
        except ValueError as exc:
            return None, f"{exc}: not a session id"

    def path_for(self, sid: str) -> str:
        rel = sid.replace("%2F", os.sep).replace("%25", "%") if self.cfg.recursive else sid
        return os.path.join(self.root, rel + self.suffix)

    def iter_files(self) -> Iterator[tuple[str, str | None]]:
        """``(path, sid)`` of every session file under the root (no symlinked dirs followed).

        A session-shaped name that cannot be an id comes with ``sid=None``, so
        that a pass reports it (once) instead of ignoring it silently.
        """
        stack = [self.root]
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            if self.cfg.recursive and not any(
                                fnmatch.fnmatchcase(entry.name, ex) for ex in self.cfg.exclude
                            ) and not (entry.path + os.sep).startswith(self._store_prefix):
                                stack.append(entry.path)
                        else:
                            sid, why = self.identify(entry.path)
                            if sid is not None or why is not None:
                                yield entry.path, sid
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue


class Tracker:
    """The daemon's decisions, for every watch. Thread-safe per session (store locks)."""

    def __init__(self, watches: list[WatchConfig], log: Any) -> None:
        self.watches = [WatchState(w) for w in watches]
        self.log = log
        self.stats = Stats()
        self._stats_lock = threading.Lock()

    # -- helpers -------------------------------------------------------------

    def watch_for(self, path: str) -> tuple[WatchState, str | None, str | None] | None:
        """``(watch, sid, None)``, or ``(watch, None, why)`` for a name that cannot be an id."""
        for ws in self.watches:
            sid, why = ws.identify(path)
            if sid is not None or why is not None:
                return ws, sid, why
        return None

    def bump(self, name: str, n: int = 1) -> None:
        """Add *n* to the counter *name* (thread-safe)."""
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def degrade(self, key: str, why: str | None) -> None:
        """Mark *key* (``store:…``, ``watch:…``, ``inotify:…``) degraded for *why*, or
        clear it (None); logs only changes, so a retry loop does not flood the log."""
        with self._stats_lock:
            if why is None:
                if self.stats.degraded.pop(key, None) is not None:
                    self.log.info("degraded.cleared", component=key)
            elif self.stats.degraded.get(key) != why:
                self.stats.degraded[key] = why
                self.log.error("degraded", component=key, why=why)

    def _skip(self, ws: WatchState, path: str, why: str, key: SkipKey) -> str:
        """Log a skipped file once per state of that file, not on every pass."""
        if ws.skipped.get(path) != key:
            ws.skipped[path] = key
            self.bump("skipped")
            self.log.warning("file.skipped", watch=ws.root, path=path, why=why)
        return "skipped"

    # -- the decision --------------------------------------------------------

    def evaluate(self, path: str, *, unseen: bool = False) -> str:
        """Look at *path* now and act; returns what happened (for logs and tests).

        Never raises: every error is logged and counted, and leaves the old
        pin in place. *unseen* (scans and reconciliation) says writes may
        have happened that no event showed one by one: then a file that
        has more messages but no longer starts with the pinned ones (a
        shrink undone while the daemon was down) also keeps the pin.
        """
        found = self.watch_for(path)
        if found is None:
            return "ignored"
        ws, sid, why = found
        store = ws.store  # bound once: the maintenance thread drops it when the directory goes
        if store is None:
            return "unavailable"
        self.bump("evaluations")
        if sid is None or not os.path.isdir(store.session_dir(sid)):
            # Not a session id, or nothing pinned yet: a vanished, non-regular
            # or foreign file needs no lock, and taking one would leave an
            # empty store folder behind.
            try:
                lst = os.lstat(path)
            except FileNotFoundError:
                ws.skipped.pop(path, None)
                if sid is not None:
                    ws.files.pop(sid, None)
                return "gone"
            why = why or _unreadable(lst) or _foreign_link(ws, lst, None)
            if why is not None:
                return self._skip(ws, path, why, skip_key(lst))
        assert sid is not None
        try:
            with store.lock(sid, LOCK_TIMEOUT):
                outcome = self._evaluate_locked(ws, store, sid, path, unseen)
        except OSError as exc:
            self.bump("errors")
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                ws.failing.add(sid)
                self.degrade(f"store:{store.root}", f"{os.strerror(exc.errno or 0)} writing the store")
            self.log.error("pin.failed", watch=ws.root, sid=sid, path=path, error=str(exc), errno=exc.errno)
            return "error"
        except StoreError as exc:
            self.bump("errors")
            self.log.error("pin.failed", watch=ws.root, sid=sid, path=path, error=str(exc))
            return "error"
        if sid in ws.failing:  # pinned, deleted or skipped: nothing is pending for it any more
            ws.failing.discard(sid)
            if not ws.failing:
                self.degrade(f"store:{store.root}", None)
        return outcome

    def _evaluate_locked(self, ws: WatchState, store: Store, sid: str, path: str, unseen: bool) -> str:
        pin = store.pin(sid, tidy=True)
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            return self._deleted(ws, sid, path, pin)
        why = _unreadable(lst)
        if why is not None:
            return self._give_up(ws, sid, path, pin, why, lst)
        if pin is not None and pin.key == stat_key(lst):
            self._remember(ws, sid, pin.count, pin.key)
            return "unchanged"
        try:
            fd, st = fsutil.open_regular(path)
        except FileNotFoundError:
            return self._deleted(ws, sid, path, pin)
        except PermissionError:
            return self._skip(ws, path, "unreadable (permission denied)", skip_key(lst))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return self._skip(ws, path, "symlink: never followed or read", skip_key(lst))
            raise
        try:
            why = _foreign_link(ws, st, pin)
            if why is not None:  # checked on the opened file: a name swapped after lstat cannot slip through
                return self._give_up(ws, sid, path, pin, why, st)
            if st.st_size > ws.cfg.max_file_bytes:
                # Never read or copy it; the pin (last good version) stays.
                if pin is not None and pin.count is not None and stat_key(st) != pin.key:
                    self._keep(ws, sid, pin, Parsed(None, "over the size cap"), None)
                return self._skip(ws, path, f"over the size cap ({st.st_size} > {ws.cfg.max_file_bytes} bytes)",
                                  skip_key(st))
            ws.skipped.pop(path, None)
            new = parse(fsutil.read_fd(fd, st, ws.cfg.max_file_bytes, path), ws.spec)
            if pin is not None and (is_loss(pin.count, new.count)
                                    or (unseen and store.overtaken(pin, new, ws.spec))):
                self._keep(ws, sid, pin, new, new.doc)
            outcome = "new" if pin is None else _growth(pin.count, new.count)
            store.set_pin(sid, pin, fd, path, st, new.count, policy=ws.pin_policy)
            self._remember(ws, sid, new.count, stat_key(st))
            return outcome
        finally:
            os.close(fd)

    def _give_up(self, ws: WatchState, sid: str, path: str, pin: Pin | None, why: str, st: os.stat_result) -> str:
        """The name is no longer a file we may read (symlink, FIFO, someone else's
        hard link…): its last version is kept and the pin dropped, the file skipped."""
        if pin is not None and pin.count is not None:
            assert ws.store is not None
            self._keep(ws, sid, pin, Parsed(None, why), None)
            ws.store.drop_pin(sid)
        return self._skip(ws, path, why, skip_key(st))

    def _keep(self, ws: WatchState, sid: str, pin: Pin, new: Parsed, new_doc: Any, *, exists: bool = True) -> None:
        """The write lost messages: make the pin a durable version, then log it."""
        store = ws.store
        assert store is not None
        tracked = ws.files.get(sid)
        if tracked is not None and tracked.kept_seq == pin.seq:
            return  # kept by an earlier attempt whose new pin could not be written
        try:
            old = store.read_pin(pin, ws.spec)
        except OSError:
            old = Parsed(pin.count)
        reason = loss_reason(new.count, exists=exists)
        try:
            cls = classify(old, new if exists else None)
            if exists and new.ok and _intent_changed(old.doc, new_doc, ws.cfg.intent_keys):
                reason = "intended"
        except RecursionError:
            # Messages nested ~1000 deep (orjson parses up to 1024) are too deep
            # for Python to compare: the version is kept all the same.
            cls = "rewrite"
        version = store.keep_pin(sid, reason, "daemon")
        if tracked is not None:
            tracked.kept_seq = pin.seq
        now = time.time()
        with self._stats_lock:
            self.stats.shrinks[cls] += 1
            self.stats.versions_kept += 1
            self.stats.last_shrink = (sid, now, cls)
        if tracked is not None:
            tracked.last_shrink = now
            tracked.versions += 1
        log = self.log.info if reason == "intended" else self.log.warning
        log("session.shrunk", watch=ws.root, sid=sid, **{"class": cls}, reason=reason,
            before=pin.count, after=new.count if exists else None)
        if version is not None:
            self.log.info("version.kept", watch=ws.root, sid=sid, version=version.id, reason=version.reason,
                          count=version.count, size=version.size, method=version.method, file=version.path)
        store.apply_retention(sid)

    def _deleted(self, ws: WatchState, sid: str, path: str, pin: Pin | None) -> str:
        ws.skipped.pop(path, None)
        if pin is None:
            ws.files.pop(sid, None)
            return "gone"
        self._keep(ws, sid, pin, Parsed(None, "deleted"), None, exists=False)
        assert ws.store is not None
        ws.store.drop_pin(sid)
        ws.files.pop(sid, None)
        return "deleted"

    def _remember(self, ws: WatchState, sid: str, count: int | None, key: StatKey) -> None:
        t = ws.files.get(sid)
        if t is None:
            ws.files[sid] = Tracked(count, key, count)
            return
        t.count, t.key = count, key
        if count is not None and (t.high_water is None or count > t.high_water):
            t.high_water = count

    # -- passes --------------------------------------------------------------

    def scan(self, ws: WatchState) -> dict[str, int]:
        """Start-up / rescan of one watch: every file against its pin.

        Files whose identity matches their pin are not read, so a restart over
        many unchanged sessions costs a stat and a directory listing each.
        Sessions pinned in the store whose file is gone were deleted while we
        were not looking: their pins are kept as ``deleted`` versions.
        """
        started = time.monotonic()
        outcomes: Counter[str] = Counter()
        store = ws.open_store()
        store.sweep_tmp()
        store.sweep_tmp(ws.root)
        seen: set[str] = set()
        for path, sid in ws.iter_files():
            if sid is not None:
                seen.add(sid)
            outcomes[self.evaluate(path, unseen=True)] += 1
        for sid in store.sessions():
            if sid not in seen and store.pin(sid) is not None:
                outcomes[self.evaluate(ws.path_for(sid), unseen=True)] += 1
        self._summarise(ws)
        result = dict(outcomes, files=len(seen), duration_ms=int((time.monotonic() - started) * 1000))
        self.log.info("scan.completed", watch=ws.root, sessions=len(ws.files), **result)
        return result

    def _summarise(self, ws: WatchState) -> None:
        """Fill in versions and high-water marks from the store (for list/status)."""
        assert ws.store is not None
        for sid, t in list(ws.files.items()):  # the worker thread adds entries meanwhile
            versions = ws.store.versions(sid)
            t.versions = len(versions)
            counts = [v.count for v in versions if v.count is not None]
            if t.count is not None:
                counts.append(t.count)
            t.high_water = max(counts) if counts else None
            if versions:
                losses = [v.created for v in versions if v.reason in ("shrink", "unparseable", "deleted", "intended")]
                t.last_shrink = max(losses) if losses else None

    def reconcile(self, ws: WatchState) -> dict[str, int]:
        """Cheap stat-only pass: evaluate only files whose identity changed.

        Catches whatever the event stream lost. Files modified within
        :data:`SETTLE_SECONDS` are left to their own close/rename event.
        """
        started = time.monotonic()
        checked = changed = 0
        now = time.time()
        present: set[str] = set()
        for path, sid in ws.iter_files():
            if sid is not None:
                present.add(sid)
            checked += 1
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            t = ws.files.get(sid) if sid is not None else None
            if t is not None and t.key == stat_key(st):
                continue
            if ws.skipped.get(path) == skip_key(st):
                continue
            if now - st.st_mtime < SETTLE_SECONDS:
                continue
            changed += 1
            self.evaluate(path, unseen=True)
        for sid in [s for s in set(ws.files) | ws.failing if s not in present]:
            changed += 1
            self.evaluate(ws.path_for(sid), unseen=True)
        self.bump("reconciliations")
        with self._stats_lock:
            self.stats.last_reconcile = time.time()
        result = {"checked": checked, "changed": changed, "duration_ms": int((time.monotonic() - started) * 1000)}
        self.log.info("reconcile.completed", watch=ws.root, **result)
        return result


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "not a regular file"


def _unreadable(lst: os.stat_result) -> str | None:
    """Why a name that is not a regular file is never opened, or None."""
    if stat.S_ISREG(lst.st_mode):
        return None
    return f"{_kind(lst.st_mode)}: never followed or read"


def _foreign_link(ws: WatchState, st: os.stat_result, pin: Pin | None) -> str | None:
    """Why a hard link to someone else's file is not read, or None.

    A second name for a file owned by another user than the watched
    directory's owner is most likely someone else's file linked in here: a
    root daemon reading it would copy, say, ``/etc/shadow`` into a store its
    read group can read. Links by the directory's owner (an ``os.link``
    publish, the library's and ``pin = "link"`` pins) are normal; so is our
    own link pin of this very file, whoever owns it.
    """
    if not stat.S_ISREG(st.st_mode):
        return None
    links = st.st_nlink
    if pin is not None and pin.method == "link" and pin.key[:2] == (st.st_dev, st.st_ino):
        links -= 1
    if links <= 1:
        return None
    try:
        owner: int | str = os.stat(ws.root).st_uid
    except OSError:
        owner = "?"  # the directory is going away: read nothing we cannot vouch for
    if st.st_uid == owner:
        return None
    return f"hard link to a file owned by uid {st.st_uid}; the directory belongs to uid {owner}: not read"


def _growth(before: int | None, after: int | None) -> str:
    if after is None:
        return "unparseable"
    if before is None or after > before:
        return "grew"
    return "same" if after == before else "shrunk"


def _intent_changed(old_doc: Any, new_doc: Any, keys: tuple[str, ...]) -> bool:
    """Did the writer mark this shrink as meant (a changed intent-key value)?"""
    if not keys or not isinstance(old_doc, dict) or not isinstance(new_doc, dict):
        return False
    return any(k in new_doc and new_doc.get(k) != old_doc.get(k) for k in keys)

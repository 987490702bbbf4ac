"""Per-file state and the decision: grew / same / loss / replaced / skip — one store call per capture.

``Tracker.evaluate`` is told "this file may have changed" (an inotify event,
a scan, a reconciliation) and compares the live file with what it remembers
of the pin: a loss makes the store keep the pin (:meth:`Store.capture`, which
reads the pin once and names the version from those bytes) *before* the pin
moves to the new content. Every failure is logged and leaves the old pin,
so the last good version is never given up.

Files are reached from the watch's checked directory descriptor, one
component at a time, never through a symlink (:func:`fsutil.walk`). Knows
nothing of inotify, sockets or systemd.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from . import fsutil
from .count import Parsed, stat_hash
from .errors import FileTooLarge, SessionLocked, StoreError, UnsafeSessionFile
from .glance import parse_for_rules
from .pins import Pins, compress
from .rules import Identity, is_loss, replaced
from .stats import Overwritten, Stats
from .store import Captured, Kept, Store
from .watchstate import Tracked, WatchState, pin_key, skip_key

#: How long the worker waits for a session lock another process holds before it
#: defers that session (and goes on with others).
LOCK_WAIT = 0.05

@dataclass(slots=True)
class _Case:
    """One evaluation: the watch, its store, the session and its file's path (for logs)."""

    ws: WatchState
    store: Store
    sid: str
    rel: str
    #: A scan listed the pins before and this session had none: not looked for again.
    pinless: bool = False
    #: The scan's listing said the file is a regular one (``d_type``): opened without an ``lstat``.
    regular: bool = False


@dataclass(slots=True)
class _Live:
    """The live file as opened and read for this evaluation."""

    dir_fd: int
    name: str
    fd: int
    st: os.stat_result
    data: bytes


class Tracker:
    """The daemon's decisions, for every watch. Thread-safe per session (store locks)."""

    def __init__(self, watches: list[WatchState], stats: Stats, log: Any) -> None:
        self.watches = watches
        self.stats = stats
        self.log = log

    def watch_for(self, path: str) -> tuple[WatchState, tuple[str, ...]] | None:
        for ws in self.watches:
            parts = ws.parts_of(path)
            if parts is not None:
                return ws, parts
        return None

    def evaluate(self, path: str, *, unseen: bool = False) -> str:
        """Look at the file at absolute *path* now and act; returns what happened."""
        found = self.watch_for(path)
        if found is None:
            return "ignored"
        ws, parts = found
        sid, why = ws.matcher.identify(parts)
        if sid is None and why is None:
            return "ignored"
        return self.evaluate_at(ws, parts, sid, why, unseen=unseen)

    def evaluate_at(self, ws: WatchState, parts: tuple[str, ...], sid: str | None, why: str | None, *,
                    unseen: bool = False, pinless: bool = False, regular: bool = False) -> str:
        """Never raises: every error is logged and counted, and leaves the old pin.

        *unseen* (scans, reconciliation) says writes may have happened that no
        event showed one by one: a longer file that no longer starts with the
        pinned messages then also keeps the pin. *pinless*: the caller listed the
        pins and this session had none, so none is looked for (a first start
        would otherwise look up 100,000 names that are not there); a pin made
        since is found when the new one refuses to replace it, and then judged.
        *regular*: the caller's directory listing said the name is a regular file, so
        it is opened without an ``lstat`` first (the open refuses anything else).
        """
        with ws.gate.shared():
            return self._evaluate(ws, parts, sid, why, unseen, pinless=pinless, regular=regular)

    def _evaluate(self, ws: WatchState, parts: tuple[str, ...], sid: str | None, why: str | None,
                  unseen: bool, *, pinless: bool, regular: bool) -> str:
        store = ws.store
        if store is None or ws.root_fd is None:
            return "unavailable"
        self.stats.bump("evaluations")
        rel = "/".join(parts)
        if sid is None:
            return self._skip(ws, rel, why or "not a session id", None)
        case = _Case(ws, store, sid, rel, pinless, regular)
        try:
            with store.lock(sid, LOCK_WAIT):
                ws.deferred.pop(sid, None)
                outcome = self._locked(case, parts, unseen)
        except SessionLocked:
            ws.deferred.setdefault(sid, time.monotonic())
            return "deferred"
        except OSError as exc:
            return self._failed(case, exc)
        except StoreError as exc:
            self.stats.bump("errors")
            self.log.error("pin.failed", watch=ws.root, sid=sid, path=os.path.join(ws.root, rel), error=str(exc))
            return "error"
        if sid in ws.failing:  # done with it: nothing is pending for it any more
            ws.failing.discard(sid)
            if not ws.failing:
                self.stats.degrade(f"store:{store.where}", None)
        return outcome

    def _failed(self, case: _Case, exc: OSError) -> str:
        self.stats.bump("errors")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            case.ws.failing.add(case.sid)
            self.stats.degrade(f"store:{case.store.where}", f"{os.strerror(exc.errno or 0)} writing the store")
        self.log.error("pin.failed", watch=case.ws.root, sid=case.sid, path=os.path.join(case.ws.root, case.rel),
                       error=str(exc), errno=exc.errno)
        return "error"

    def _locked(self, case: _Case, parts: tuple[str, ...], unseen: bool) -> str:
        ws = case.ws
        nested = len(parts) > 1
        try:
            # the root's descriptor is only closed under the watch's exclusive gate, and
            # evaluations hold it shared: used as it is, not duplicated for each file
            dir_fd = ws.open_parent(parts) if nested else ws.root_fd
        except FileNotFoundError:
            return self._deleted(case)
        except (UnsafeSessionFile, NotADirectoryError) as exc:
            return self._give_up(case, f"{exc.strerror or exc}", None)
        assert dir_fd is not None  # _evaluate checked the root
        try:
            try:
                return self._look(case, dir_fd, parts[-1], unseen)
            except FileExistsError:
                if not case.pinless:
                    raise
            case.pinless = False  # a pin appeared since the caller listed them (the library's): judge against it
            return self._look(case, dir_fd, parts[-1], unseen)
        finally:
            if nested:
                os.close(dir_fd)

    def _look(self, case: _Case, dir_fd: int, name: str, unseen: bool) -> str:
        ws = case.ws
        lst = None
        if not case.regular:
            lst = fsutil.lstat_at(dir_fd, name)
            if lst is None:
                return self._deleted(case)
            if not stat.S_ISREG(lst.st_mode):  # a FIFO, device or socket is never even opened
                return self._give_up(case, _kind(lst), lst)
        try:
            fd, st = fsutil.open_regular(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return self._deleted(case)
        except UnsafeSessionFile as exc:  # swapped between the lstat and the open
            lst = fsutil.lstat_at(dir_fd, name)
            return self._give_up(case, _kind(lst) if lst else str(exc.strerror), lst)
        except PermissionError:
            # keyed by the file's state as an event's look keys it (a scan's listing has no lstat)
            return self._skip(ws, case.rel, "unreadable (permission denied)", lst or fsutil.lstat_at(dir_fd, name))
        try:
            why = ws.foreign_link(st)
            if why is not None:  # our own link pin of this file is not someone else's link
                why = ws.foreign_link(st, case.store.pins.stat(case.sid))
            if why is not None:  # checked on the opened file: a name swapped after a stat cannot slip through
                return self._give_up(case, why, st)
            tracked = self._still_pinned(case, ws.files.tracked(case.sid), st)
            if tracked is not None and tracked.key == stat_hash(st):
                return "unchanged"
            try:
                data = fsutil.read_fd(fd, st, ws.cfg.max_file_bytes, case.rel)
            except FileTooLarge:
                return self._too_large(case, st, tracked)
            ws.skipped.pop(case.rel, None)
            new = parse_for_rules(data, ws.spec)
            prior = tracked if tracked is not None or case.pinless else self._prior(case, data, new)
            if tracked is None and prior is not None and prior.pin:  # the pin holds these very bytes
                ws.files[case.sid] = Tracked(stat_hash(st), prior.count, prior.first, prior.prev, prior.pin)
                return "unchanged"
            # A scan's new pin (pinless) is remembered without its two message keys: a first
            # start makes 100,000 and most are never written again; a write that needs them
            # reads them from the pin (_capture_if_lost). Every other pin is the event path's,
            # whose next write compares them at once.
            ident = None if case.pinless else Identity.of(new)
            self._capture_if_lost(case, prior, new, ident, unseen or tracked is None)
            return self._pin(case, _Live(dir_fd, name, fd, st, data), new, ident, prior)
        finally:
            os.close(fd)

    def _still_pinned(self, case: _Case, tracked: Tracked | None, live: os.stat_result) -> Tracked | None:
        """What the daemon remembers, if the pin on disk is still the one it wrote; None when
        another process (the library) moved it since — then the pin must be read, or a write
        it made and a later loss coalesced into one event would be judged against the past.
        A hard-link pin that changed with the live file was rewritten in place: said loudly."""
        if tracked is None or tracked.pin == 0:
            return tracked
        pin = case.store.pins.stat(case.sid)
        if pin is not None and pin_key(pin) == tracked.pin:
            return tracked
        if pin is not None and (pin.st_dev, pin.st_ino) == (live.st_dev, live.st_ino):
            self.log.error("pin.overwritten", watch=case.ws.root, sid=case.sid, before=tracked.count,
                           why="the hard-link pin was rewritten in place with the live file: the version it held "
                               "is lost (use copy or reflink pins for in-place writers)")
        return None

    def _prior(self, case: _Case, live: bytes, new: Parsed) -> Tracked | None:
        """A pin the daemon has no memory of (made by the library, or before a crash): read it
        once. One that holds exactly the *live* bytes (*new*, parsed) comes back with its pin
        key: nothing can have been lost and nothing needs writing, so the caller adopts it as
        it is (a start after a crash meets one per session; each was rewritten before)."""
        pinned = case.store.read_pin(case.sid)
        if pinned is None:
            return None
        if pinned[0] == live:  # its message keys are left to the first write that needs them (_capture_if_lost)
            return Tracked(0, new.count, pin=pin_key(pinned[1]))
        old = parse_for_rules(pinned[0], case.ws.spec)
        ident = Identity.of(old)
        return Tracked(0, old.count, ident.first if ident else 0, ident.prev if ident else 0)

    def _capture_if_lost(self, case: _Case, prior: Tracked | None, new: Parsed, ident: Identity | None,
                         unseen: bool) -> None:
        """Keep the pin (*prior*) if going to *new* (whose *ident*, if taken, spares one
        hash) loses messages or replaces the conversation."""
        if prior is None:
            return
        pinned = prior.identity()
        if is_loss(prior.count, new.count):
            cause = "loss"
        elif pinned is not None and replaced(pinned, new, ident.first if ident is not None else None):
            cause = "replaced"
        elif unseen and prior.count:
            cause = "overtaken"
        elif pinned is None and (prior.count or 0) >= 2:
            # a pin whose message keys were never taken (a scan's: see _look): the store reads
            # it and keeps it only if this write replaced its conversation — once, since the
            # pin written next has its keys (a pin of one message is never "replaced")
            cause = "replaced"
        else:
            return
        ws = case.ws
        captured = case.store.capture(case.sid, new, spec=ws.spec, intent_keys=ws.cfg.intent_keys,
                                      source="daemon", cause=cause, method=ws.pin_method)
        if captured is not None and (captured.kept.new or case.sid not in ws.failing):
            self._report(case, captured)  # not again for a retry after the new pin failed

    def _report(self, case: _Case, c: Captured) -> None:
        ws, sid = case.ws, case.sid
        self.stats.shrink(sid, c.cls, new_version=c.kept.new)
        ws.last_shrink = time.time()
        log = self.log.info if c.reason == "intended" else self.log.warning
        log("session.shrunk", watch=ws.root, sid=sid, **{"class": c.cls}, reason=c.reason, before=c.before,
            after=c.after)
        v = c.version
        self.log.info("version.kept", watch=ws.root, sid=sid, version=v.id, reason=v.reason, count=v.count,
                      size=v.size, method=v.method, file=v.name, new=c.kept.new)
        self._evicted(ws, case.store, c.kept)
        mark = ws.restored.get(sid)
        if mark is not None and c.reason != "intended":
            now = time.time()
            self.log.error("restore.overwritten", watch=ws.root, sid=sid,
                           seconds_since_restore=round(now - mark.at, 1), before=c.before, after=c.after,
                           restored_version=mark.version,
                           hint="a running server held the session in memory and wrote it back: stop the server "
                                "(or make it reload the session), then restore again")
            self.stats.overwritten(Overwritten(sid, ws.root, now, mark.at, mark.count, c.after, mark.version),
                                   (ws.root, sid))

    def _evicted(self, ws: WatchState, store: Store, kept: Kept) -> None:
        for v in kept.evicted:
            self.log.warning("version.evicted", watch=ws.root, sid=v.sid, version=v.id, reason=v.reason,
                             count=v.count, size=v.size, why="max_store_bytes reached")
        cap = ws.cfg.retention.max_store_bytes
        self.stats.degrade(f"cap:{store.where}", f"{store.where}: over max_store_bytes ({cap}) with only protected "
                           "versions left" if kept.over_cap else None)

    def _pin(self, case: _Case, live: _Live, new: Parsed, ident: Identity | None, prior: Tracked | None) -> str:
        """Move the pin to the content just read; remember what it holds (*ident*: its
        message keys, None for a scan's new pin)."""
        ws = case.ws
        fresh = case.pinless and prior is None  # the caller saw no pin: refuse to replace one
        pst, new, ident = _write_pin(ws, case.store.pins, case.sid, live, new, ident=ident, fresh=fresh)
        ws.files[case.sid] = Tracked(stat_hash(live.st), new.count, ident.first if ident else 0,
                                     ident.prev if ident else 0, pin_key(pst))
        mark = ws.restored.get(case.sid)
        if mark is not None and new.count is not None and (mark.count is None or new.count > mark.count):
            del ws.restored[case.sid]  # grew past the restore: a later shrink is a new story
            self.stats.overwritten(None, (ws.root, case.sid))
        if prior is None:
            return "new"
        return _growth(prior.count, new.count)

    def adopt(self, ws: WatchState, parts: tuple[str, ...], sid: str, tracked: Tracked) -> None:
        """A new pin a scan process made (:func:`pin_new`): counted as an evaluation, and
        remembered unless an event's evaluation got to the session first (its pin is newer)."""
        self.stats.bump("evaluations")
        ws.skipped.pop("/".join(parts), None)
        ws.files.setdefault(sid, tracked)

    def _too_large(self, case: _Case, st: os.stat_result, tracked: Tracked | None) -> str:
        """Never read or copy it; the pin (the last good version) becomes a version."""
        if tracked is not None and tracked.count is not None:
            captured = case.store.capture(case.sid, Parsed(None, "over the size cap"), spec=case.ws.spec,
                                          intent_keys=(), source="daemon")
            if captured is not None:
                self._report(case, captured)
            tracked.count = None
        return self._skip(case.ws, case.rel, f"over the size cap ({st.st_size} > {case.ws.cfg.max_file_bytes} "
                          "bytes)", st)

    def _give_up(self, case: _Case, why: str, st: os.stat_result | None) -> str:
        """The name is no longer a file we may read (symlink, FIFO, someone else's hard
        link…): its last version is kept, the pin dropped, the file skipped."""
        captured = case.store.capture(case.sid, Parsed(None, why), spec=case.ws.spec, intent_keys=(),
                                      source="daemon")
        if captured is not None:
            self._report(case, captured)
        case.store.pins.drop(case.sid)
        case.ws.files.pop(case.sid, None)
        return self._skip(case.ws, case.rel, why, st)

    def _deleted(self, case: _Case) -> str:
        ws, store = case.ws, case.store
        ws.skipped.pop(case.rel, None)
        if ws.files.pop(case.sid, None) is None and store.pins.stat(case.sid) is None:
            return "gone"
        captured = store.capture(case.sid, None, spec=ws.spec, intent_keys=(), source="daemon")
        if captured is not None:
            self._report(case, captured)
        store.pins.drop(case.sid)
        return "deleted"

    def _skip(self, ws: WatchState, rel: str, why: str, st: os.stat_result | None) -> str:
        """Log a skipped file once per state of that file, not on every pass."""
        key = skip_key(st) if st is not None else ()
        if ws.skipped.get(rel) != key:
            ws.skipped[rel] = key
            self.log.warning("file.skipped", watch=ws.root, path=os.path.join(ws.root, rel), why=why)
        return "skipped"


def pin_new(ws: WatchState, parts: tuple[str, ...], sid: str) -> Tracked | None:
    """Pin a session the caller listed without a pin, and do nothing else: what a scan
    process does (:mod:`~sessionguard.scanpool`) for the daemon, which alone logs, counts,
    captures and remembers. Returns what the daemon is to remember of it; None for
    anything but a plain new pin — the session's lock held, a pin that appeared meanwhile,
    a name that is not plainly a regular file the directory's owner may have, a file over
    the size cap, any error — which the daemon then evaluates itself. Nothing is left
    behind by a None: a pin is linked under its name only once whole."""
    store = ws.store
    if store is None or ws.root_fd is None:
        return None
    try:
        with ws.gate.shared(), store.lock(sid, LOCK_WAIT):
            dir_fd = ws.open_parent(parts) if len(parts) > 1 else ws.root_fd
            try:
                fd, st = fsutil.open_regular(parts[-1], dir_fd=dir_fd)
                try:
                    if ws.foreign_link(st) is not None:
                        return None
                    data = fsutil.read_fd(fd, st, ws.cfg.max_file_bytes, "/".join(parts))
                    live = _Live(dir_fd, parts[-1], fd, st, data)
                    pst, new, _ = _write_pin(ws, store.pins, sid, live, parse_for_rules(data, ws.spec), ident=None,
                                             fresh=True)
                finally:
                    os.close(fd)
            finally:
                if dir_fd != ws.root_fd:
                    os.close(dir_fd)
    except (OSError, UnsafeSessionFile, SessionLocked, StoreError):
        return None  # FileTooLarge and FileExistsError are OSErrors
    return Tracked(stat_hash(st), new.count, 0, 0, pin_key(pst))


def _write_pin(ws: WatchState, pins: Pins, sid: str, live: _Live, new: Parsed, *, ident: Identity | None,
               fresh: bool) -> tuple[os.stat_result, Parsed, Identity | None]:
    """Write *sid*'s pin of *live* by the watch's method: the pin's ``stat``, and *new*
    and *ident* again, re-taken from the clone when an in-place writer moved on under a
    reflink (they then describe what is pinned). *fresh*: see :meth:`Pins.write`."""
    if ws.cfg.pin == "link":
        try:
            return pins.link(sid, live.dir_fd, live.name, live.st, fresh=fresh), new, ident
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOENT):
                raise
            return pins.write(sid, live.data, fresh=fresh, spare=True), new, ident
    if ws.cfg.pin == "zstd":
        return pins.write(sid, compress(live.data), fresh=fresh, spare=True), new, ident
    # ws.pin_method was probed once at bring-up: on a filesystem without reflinks every
    # attempt would cost a tmp file made, a failed FICLONE and an unlink per pin
    cloned = pins.reflink(sid, live.fd, ws.cfg.max_file_bytes, fresh=fresh) if ws.pin_method == "reflink" else None
    if cloned is None:
        return pins.write(sid, live.data, fresh=fresh, spare=True), new, ident
    if cloned[0] != live.data:  # an in-place writer moved on: describe what is pinned
        new = parse_for_rules(cloned[0], ws.spec)
        ident = None if ident is None else Identity.of(new)
    return cloned[1], new, ident


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return f"{name}: never followed or read"
    return "not a regular file: never read"


def _growth(before: int | None, after: int | None) -> str:
    if after is None:
        return "unparseable"
    if before is None or after > before:
        return "grew"
    return "same" if after == before else "shrunk"

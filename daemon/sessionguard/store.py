"""The backup store: one checked directory holding pins, versions and locks.

Every path into the store goes through this class — the library's guarded
save, the daemon's capture and the admin's restore — so its promises can be
checked in one place. The store usually lives inside the directory it
guards (``<dir>/.sessionguard``: hard links and reflinks need the same
mount), a directory whose owner may be hostile. So the store is opened once,
by descriptor, never through a symlink, and refused unless it belongs to the
expected user and nobody else may enter it (``0700``); everything inside is
reached relative to that descriptor. A store that is not ours is moved aside
and a fresh one made; one moved away while we run is put back
(:meth:`reclaim`).

Layout (format 2; :mod:`sessionguard.migrate` upgrades older stores)::

    <store>/FORMAT                 "2": the layout version
    <store>/README.txt             how to restore by hand
    <store>/lock                   one byte per session (sessionguard.locks)
    <store>/pins/<sid>             the last version seen (sessionguard.pins)
    <store>/pins.cache             the daemon's restart hint
    <store>/sessions/<sid>/*.version   kept versions (sessionguard.versions)
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from . import fsutil, migrate, storedir
from . import pins as pins_mod
from .count import CountSpec, Parsed, parse
from .errors import StoreError
from .fsutil import Owner
from .locks import LOCK_FILE, Locks
from .naming import Method, Reason, Source, Version
from .pins import PINS_DIR, Pins
from .retention import Retention, SessionVersions, over_cap, to_remove
from .rules import Identity, classify, intent_changed, is_loss, loss_reason, overtaken, replaced
from .spares import SPARE_SUFFIX
from .versions import SESSIONS_DIR, Versions

FORMAT = 2
STORE_DIRNAME = ".sessionguard"
README = storedir.README
#: When the byte cap needs room, versions go until the store is at this share of it.
CAP_LOW_WATER = 0.9
#: Stale temporary files of a live process are left alone for this long.
_TMP_GRACE_SECONDS = 3600



@dataclass(frozen=True)
class Kept:
    """A version kept, and what the byte cap removed to make room for it.

    *new* is False when the same bytes were already kept; *over_cap* says the
    store is still over ``max_store_bytes`` with only protected versions left.
    """

    version: Version
    new: bool
    evicted: tuple[Version, ...] = ()
    over_cap: bool = False


@dataclass(frozen=True)
class Captured:
    """A version kept because a write lost messages: how, and what the write was."""

    kept: Kept
    reason: str
    cls: str
    before: int | None
    after: int | None

    @property
    def version(self) -> Version:
        return self.kept.version


class Store:
    """One opened, checked backup store. Use :meth:`open`."""

    def __init__(self, parent_fd: int, name: str, fd: int, *, where: str, owner: Owner, max_bytes: int,
                 retention: Retention, keep_lock_open: bool = False) -> None:
        self.parent_fd, self.name, self.fd, self.where = parent_fd, name, fd, where
        self.owner, self.max_bytes, self.retention = owner, max_bytes, retention
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)
        self.pins = Pins(storedir.subdir(fd, PINS_DIR, owner, where), fd, owner)
        self.versions = Versions(storedir.subdir(fd, SESSIONS_DIR, owner, where), owner, fd)
        self.locks = Locks(fd, keep_open=keep_lock_open)
        storedir.own_file(fd, LOCK_FILE, owner)
        #: After a cap walk that found only protected versions: no walk below this total.
        self._walk_again_at = 0

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(cls, parent_fd: int, name: str = STORE_DIRNAME, *, where: str, expect_uid: int, owner: Owner = None,
             retention: Retention | None = None, max_bytes: int, create: bool = True,
             replace_refused: bool = False, keep_lock_open: bool = False) -> tuple[Store, str | None]:
        """Open (or make) the store *name* in the directory *parent_fd*: ``(store, notice)``.

        The store must be a real directory owned by *expect_uid* that nobody
        else may write. Anything else under its name (a symlink, a file,
        someone else's directory) is refused: with *replace_refused* (the
        daemon) it is moved aside, a fresh store made, and *notice* says what
        happened; otherwise :class:`StoreError` says why. Older layouts are
        migrated. *owner* is given every file and folder made (a root daemon
        sharing a store with the directory's owner). *keep_lock_open*: see
        :mod:`sessionguard.locks`. The store keeps a duplicate of *parent_fd*.
        """
        fd, notice = storedir.open_checked(parent_fd, name, where=where, expect_uid=expect_uid, owner=owner,
                                           create=create, replace_refused=replace_refused)
        try:
            migrated = migrate.upgrade(fd, FORMAT, owner)
            if migrated:
                notice = f"{where}: {migrated}"
            store = cls(os.dup(parent_fd), name, fd, where=where, owner=owner, max_bytes=max_bytes,
                        retention=retention or Retention(), keep_lock_open=keep_lock_open)
        except BaseException:
            os.close(fd)
            raise
        storedir.write_readme(fd, README, owner)
        return store, notice

    def close(self) -> None:
        self.locks.close()
        for fd in (self.pins.fd, self.versions.fd, self.fd, self.parent_fd):
            os.close(fd)

    # -- staying in place ------------------------------------------------------------

    def displaced(self) -> str | None:
        """Why the store's name no longer leads to this store (None: it does).

        Its directory's owner can rename it away or put something else under
        its name. We keep working through our descriptor meanwhile.
        """
        return storedir.displaced(self.parent_fd, self.name, self.ident)

    def in_place(self) -> bool:
        """The store's directory is still in the directory it was opened in, under whatever
        name: see :func:`storedir.still_in`."""
        return storedir.still_in(self.parent_fd, self.fd)

    def reclaim(self) -> bool:
        """Put the store back under its name after it was renamed away (see
        :func:`storedir.reclaim`). False when it is nowhere to be found."""
        return storedir.reclaim(self.parent_fd, self.name, self.ident)

    # -- sessions --------------------------------------------------------------------

    def lock(self, sid: str, wait: float | None = None) -> AbstractContextManager[None]:
        """The session's lock (see :mod:`sessionguard.locks`)."""
        return self.locks.session(sid, wait)

    def capture(self, sid: str, new: Parsed | None, *, spec: CountSpec, intent_keys: tuple[str, ...],
                source: Source, cause: str = "loss", method: Method = "copy") -> Captured | None:
        """Keep the pin as a version if going from it to *new* loses messages (caller holds the lock).

        *new* is the live file's parsed content, None when it was deleted.
        *cause* says what the caller saw: ``loss`` (fewer messages, unparseable,
        gone), ``replaced`` (as many or more, but another conversation) or
        ``overtaken`` (writes nobody saw dropped messages). The pin is read
        here, once: whatever the caller remembered of it is only a hint, and
        the version is named from these bytes. None when the pin, read, shows
        no loss after all (or there is none).
        """
        opened = self.pins.open(sid)
        if opened is None:
            return None
        fd, st = opened
        try:
            raw = fsutil.read_fd(fd, st, self.max_bytes, sid)
            data = pins_mod.plain(raw, self.max_bytes)
            old = parse(data, spec)
            lost, reason, cls = self._judge(old, new, cause, intent_keys)
            if not lost:
                return None
            link = None if st.st_nlink > 1 or data is not raw else (self.pins.fd, sid, fd)
            version, fresh = self.versions.keep(sid, data, count=old.count, reason=reason, source=source,
                                                method=method, link_from=link)
        finally:
            os.close(fd)
        return Captured(self._after_keep(sid, version, fresh), reason, cls, old.count,
                        new.count if new is not None else None)

    @staticmethod
    def _judge(old: Parsed, new: Parsed | None, cause: str, intent_keys: tuple[str, ...]) -> tuple[bool, Reason, str]:
        exists = new is not None
        after = new.count if new is not None else None
        if cause == "loss":
            lost, reason = is_loss(old.count, after, exists=exists), loss_reason(after, exists=exists)
        elif cause == "replaced":
            ident = Identity.of(old)
            lost, reason = bool(ident and new is not None and replaced(ident, new)), "replaced"
        else:
            new = new.whole() if new is not None else None  # compares whole message lists
            lost, reason = new is not None and overtaken(old, new), "replaced"
        if not lost:
            return False, reason, ""
        # the class and the intent keys read the whole document (the daemon's is a glance)
        new = new.whole() if new is not None else None
        try:
            cls = classify(old, new) if reason != "replaced" else "replaced"
            if new is not None and new.ok and intent_changed(old.doc, new.doc, intent_keys):
                reason = "intended"
        except RecursionError:
            cls = "rewrite"  # nested too deeply to compare: the version is kept all the same
        return True, reason, cls

    def keep(self, sid: str, data: bytes, count: int | None, reason: Reason, source: Source, *,
             link_from: tuple[int, str, int] | None = None) -> Kept:
        """Keep bytes already read as a version (caller holds the lock). *link_from*
        ``(dir_fd, name, fd)``: the file they were read from, which the caller is about
        to replace by rename, becomes the version by a hard link when it still holds them."""
        version, fresh = self.versions.keep(sid, data, count=count, reason=reason, source=source,
                                            method="link" if link_from else "copy", link_from=link_from)
        return self._after_keep(sid, version, fresh)

    def _after_keep(self, sid: str, version: Version, fresh: bool) -> Kept:
        """Every kept version is followed by retention of its session and the store's
        byte cap, from the running tally (no walk unless the cap is exceeded)."""
        if not fresh:
            return Kept(version, False)
        self.retain(sid)
        evicted, over = self.enforce_cap()
        return Kept(version, True, tuple(evicted), over)

    def read_pin(self, sid: str) -> tuple[bytes, os.stat_result] | None:
        """The pin's bytes and stat, or None."""
        opened = self.pins.open(sid)
        if opened is None:
            return None
        fd, st = opened
        try:
            return pins_mod.plain(fsutil.read_fd(fd, st, self.max_bytes, sid), self.max_bytes), st
        finally:
            os.close(fd)

    def sessions(self) -> set[str]:
        """Every session the store knows: pinned, or with versions."""
        return set(self.pins.sids()) | set(self.versions.sids())

    # -- retention ---------------------------------------------------------------------

    def retain(self, sid: str, now: float | None = None) -> list[Version]:
        """Thin *sid*'s versions by the retention policy (caller holds the lock)."""
        doomed = to_remove(self.versions.of(sid), time.time() if now is None else now, self.retention)
        if doomed:
            self.versions.remove(sid, doomed)
        return doomed

    def over_cap(self) -> bool:
        cap = self.retention.max_store_bytes
        return cap > 0 and self.versions.total_bytes > cap

    def enforce_cap(self) -> tuple[list[Version], bool]:
        """Remove versions until the store's versions fit ``max_store_bytes``:
        ``(removed, still_over)``. Sessions locked by someone else are skipped.

        Choosing what goes needs every version folder (not the pins, not the
        sessions), so when the cap needs room it frees down to :data:`CAP_LOW_WATER`
        of it: a flood of new versions walks the folders once per tenth of the cap,
        not after every version. When only protected versions are left, the next
        walk waits until the store has grown by another tenth."""
        cap = self.retention.max_store_bytes
        total = self.versions.total_bytes
        if cap <= 0 or total <= cap:
            self._walk_again_at = 0
            return [], False
        if total < self._walk_again_at:
            return [], True
        table = []
        for sid in self.versions.sids():
            vs = self.versions.of(sid)
            table.append(SessionVersions(vs, None if self.pins.stat(sid) else self._lifetime(vs)))
        removed: list[Version] = []
        for v in over_cap(table, total, int(cap * CAP_LOW_WATER)):
            try:
                with self.lock(v.sid, wait=0):
                    self.versions.remove(v.sid, [v])
            except StoreError:
                continue
            removed.append(v)
        still_over = self.over_cap()
        self._walk_again_at = self.versions.total_bytes + cap // 10 if still_over else 0
        return removed, still_over

    def _lifetime(self, versions: list[Version]) -> float:
        """How long a deleted session existed: from its birth (the pin's mtime, which its
        ``deleted`` version kept) to its deletion."""
        if not versions:
            return 0.0
        last = versions[-1]
        try:
            fd, st = self.versions.open(last)
            os.close(fd)
        except OSError:
            return 0.0
        return max(last.created - st.st_mtime, 0.0)

    def forget(self, sid: str, before: float | None) -> tuple[list[Version], bool]:
        """Remove *sid*'s versions (those older than *before*, or all) and, with no
        *before*, its pin: ``(removed, pin_removed)``. Caller holds the lock."""
        doomed = [v for v in self.versions.of(sid) if before is None or v.created < before]
        self.versions.remove(sid, doomed)
        return doomed, before is None and self.pins.drop(sid)

    # -- records ---------------------------------------------------------------------------

    def record(self, folder: str, name: str, data: bytes) -> None:
        """Durably write a small file of the store's own (e.g. a recover run) into *folder*."""
        fd = storedir.subdir(self.fd, folder, self.owner, self.where)
        try:
            fsutil.write_file(fd, name, data, owner=self.owner)
        finally:
            os.close(fd)

    def records(self, folder: str) -> list[str]:
        """The names of the files :meth:`record` wrote into *folder*."""
        try:
            fd = fsutil.open_dir(folder, at=self.fd)
        except FileNotFoundError:
            return []
        try:
            with os.scandir(fd) as it:
                return sorted(e.name for e in it if e.is_file(follow_symlinks=False)
                              and fsutil.TMP_MARK not in e.name)
        finally:
            os.close(fd)

    def unrecord(self, folder: str, name: str) -> None:
        """Remove a file :meth:`record` wrote."""
        fd = fsutil.open_dir(folder, at=self.fd)
        try:
            if fsutil.unlink_quietly(fd, name):
                fsutil.fsync_dir(fd)
        finally:
            os.close(fd)

    def recorded(self, folder: str, name: str) -> bytes | None:
        """A file written by :meth:`record`, or None."""
        try:
            fd = fsutil.open_dir(folder, at=self.fd)
        except FileNotFoundError:
            return None
        try:
            return fsutil.read_regular(name, 1 << 26, dir_fd=fd)[0]
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)

    # -- crash leftovers -------------------------------------------------------------------

    def sweep_tmp(self, extra_dir_fd: int | None = None) -> int:
        """Remove temporary files left by crashed writers of ours (in the store, and in
        *extra_dir_fd*: the session directory). A tmp file whose pid still runs is
        left alone unless it is over an hour old."""
        removed = 0
        dirs = [self.fd, self.pins.fd, self.versions.fd]
        if extra_dir_fd is not None:
            dirs.append(extra_dir_fd)
        for fd in dirs:
            removed += _sweep(fd)
        for sid in self.versions.sids():
            folder = self.versions.folder(sid)
            if folder is not None:
                try:
                    removed += _sweep(folder)
                finally:
                    os.close(folder)
        return removed

    def sweep_listed(self, dir_fd: int, names: Iterable[str]) -> int:
        """As :meth:`sweep_tmp`, for the tmp files *names* of *dir_fd*, which the caller
        listed anyway (a scan of the session directory: a million names)."""
        return _sweep_names(dir_fd, names)

    def usage(self) -> tuple[int, int]:
        """(versions, bytes they hold): the running tally, no walk."""
        return self.versions.count, self.versions.total_bytes


def _sweep(dir_fd: int) -> int:
    # the pins: a million names, few of them tmp. Streamed, never listed whole: a list of a
    # million names would stay in the daemon's heap (RSS) for its life.
    with os.scandir(dir_fd) as it:
        return _sweep_names(dir_fd, [entry.name for entry in it if fsutil.TMP_MARK in entry.name])


def _sweep_names(dir_fd: int, names: Iterable[str]) -> int:
    """Remove the tmp files among *names* whose writer is gone; one whose writer still
    runs only when it is over an hour old, except a daemon's spare pin (its mtime is its
    session's birth, not its age)."""
    removed = 0
    now = time.time()
    for name in names:
        pid = fsutil.tmp_owner_pid(name)
        if pid is None:
            continue
        st = fsutil.lstat_at(dir_fd, name)
        if st is None or not stat.S_ISREG(st.st_mode):
            continue
        if _alive(pid) and (name.endswith(SPARE_SUFFIX) or now - st.st_mtime < _TMP_GRACE_SECONDS):
            continue
        try:
            removed += fsutil.unlink_quietly(dir_fd, name)
        except OSError:  # immutable, or swapped for a directory since the lstat: next time
            continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

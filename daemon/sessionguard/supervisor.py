"""Which watched directories are watched right now, and keeping it so.

A watched directory can be missing at start, removed or replaced while we
run (``rm -rf`` + ``mkdir``, a backup moved into place, a symlink swapped
in), refused by inotify (its limits), or have its store renamed away by its
owner. The supervisor brings each watch up (a checked descriptor of the
directory, the store opened and checked, inotify, a scan), checks every
second that the directory and the store are still the ones it opened, and
takes a watch down or repairs it when not. Every change is logged once and
reflected in ``degraded``.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import fsutil, passes
from .errors import StoreError
from .stats import Stats
from .store import Store
from .tracker import Tracker
from .watch import Watcher, inotify_hint
from .watchstate import WatchState

#: How often maintenance checks the directories and retries what failed (seconds).
CHECK_SECONDS = 1.0


def dir_state(path: str) -> tuple[str, os.stat_result | None]:
    """``("", stat)`` for a directory that can be watched, else ``(why not, None)``.

    The last component must be a real directory, never a symlink: one swapped
    in would make the daemon read and keep a store in a directory nobody
    configured.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "no such directory", None
    except PermissionError:
        return "permission denied (check the daemon user's access to every parent directory)", None
    except OSError as exc:
        return exc.strerror or str(exc), None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"a symbolic link (to {target}): never followed; configure the directory itself", None
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory", None
    return "", st


@dataclass
class _Status:
    """What the supervisor last said about one watch, so it says it once."""

    failed: str | None = None
    polled: str | None = None
    displaced: bool = False  # the store is renamed away and ``degraded`` says so


class Supervisor:
    """Brings watches up and down; one per daemon, used by its maintenance thread."""

    def __init__(self, tracker: Tracker, watcher: Watcher, stats: Stats, log: Any, *,
                 reconcile_interval: float, progress: passes.Progress | None = None,
                 stopping: Callable[[], bool] | None = None, scan_processes: int = 0) -> None:
        self.tracker, self.watcher, self.stats, self.log = tracker, watcher, stats, log
        self.reconcile_interval = reconcile_interval
        #: Child processes a start without pins.cache may pin new sessions with (see :mod:`.scanpool`).
        self.scan_processes = scan_processes
        self.progress = progress
        #: True once the daemon stops: scans end where they are (see :func:`passes.scan`).
        self.stopping = stopping
        self._status: dict[str, _Status] = {}

    # -- up ---------------------------------------------------------------------------

    def bring_up(self, ws: WatchState, *, initial: bool = False) -> None:
        """Watch and scan one directory, if it is there. inotify comes first, so nothing
        written during the scan is missed; a directory inotify refuses is scanned all
        the same and then polled until a retry of the watch succeeds.

        Raises :class:`StoreError` at the initial start when another daemon already
        serves the store (one daemon per store).
        """
        problem, st = dir_state(ws.root)
        status = self._status.setdefault(ws.root, _Status())
        if problem or st is None:
            if initial or ws.available:
                self.log.warning("watch.missing", watch=ws.root, why=problem,
                                 hint="it will be watched as soon as it is a directory (checked every second)")
            ws.available = False
            self.stats.degrade(f"watch:{ws.root}", f"{ws.root}: {problem}")
            return
        try:
            self._open(ws, initial=initial)
            refused = self._schedule(ws)
            cache = ws.store.pins.load_cache(ws.cache_settings()) if ws.store is not None else None
            done = passes.scan(self.tracker, ws, cache or None, find_orphans=not cache,
                               progress=self.progress if initial else None, stop=self.stopping,
                               processes=self.scan_processes)
            if done.get("abandoned"):  # stopping: as after a kill mid-scan, pins.cache stays
                self._close(ws)
                return
            if ws.store is not None:
                ws.store.pins.drop_cache()
        except StoreError as exc:
            self._close(ws)
            if initial and "another sessionguardd" in str(exc):
                raise
            self._failed(ws, status, exc)
            return
        except Exception as exc:  # one bad watch must not stop the others
            self._close(ws)
            self._failed(ws, status, exc)
            return
        ws.available = True
        status.failed = None
        if refused is not None:
            self._refused(ws, status, refused)
        if not initial:
            self.log.info("watch.restored", **self.describe(ws))
        self.stats.degrade(f"watch:{ws.root}", None)
        self._caveats(ws)

    def _open(self, ws: WatchState, *, initial: bool) -> None:
        """The directory's descriptor and the store, checked."""
        root_fd = fsutil.open_root(ws.root)
        st = os.fstat(root_fd)
        cfg = ws.cfg
        if cfg.store and os.path.dirname(cfg.store_path) != ws.root:
            parent = fsutil.open_root(os.path.dirname(cfg.store_path))
        else:
            parent = os.dup(root_fd)
        shared = cfg.store_owner == "directory"
        try:
            store, notice = Store.open(parent, os.path.basename(cfg.store_path), where=cfg.store_path,
                                       expect_uid=st.st_uid if shared else os.geteuid(),
                                       owner=(st.st_uid, st.st_gid) if shared else None,
                                       retention=cfg.retention, max_bytes=cfg.max_file_bytes, replace_refused=True)
        except BaseException:
            os.close(root_fd)
            raise
        finally:
            os.close(parent)
        try:
            store.locks.claim_daemon()
        except BaseException:
            store.close()
            os.close(root_fd)
            raise
        with ws.gate.exclusive():
            ws.root_fd, ws.root_uid, ws.root_dev, ws.store = root_fd, st.st_uid, st.st_dev, store
            ws.root_ident = (st.st_dev, st.st_ino)
            ws.pin_method = self._pin_method(ws, store, st)
        if notice is not None:
            self.log.error("store.replaced", watch=ws.root, store=cfg.store_path, why=notice)
        ws.sweep_due = True  # the store's, after READY; the directory's own as the scan lists them

    @staticmethod
    def _pin_method(ws: WatchState, store: Store, root: os.stat_result) -> Any:
        """The method the pins of *ws* use; neither a link nor a reflink crosses filesystems."""
        same_fs = os.fstat(store.fd).st_dev == root.st_dev
        if ws.cfg.pin in ("copy", "zstd") or not same_fs:
            return "copy"
        if ws.cfg.pin == "link":
            return "link"
        return "reflink" if fsutil.reflink_supported(store.pins.fd) else "copy"

    def _schedule(self, ws: WatchState) -> OSError | None:
        try:
            self.watcher.schedule(ws)
        except OSError as exc:
            return exc
        ws.polled = False
        return None

    def _refused(self, ws: WatchState, status: _Status, exc: OSError) -> None:
        """No inotify for *ws*: poll it (every reconciliation) and say so once, not on every retry."""
        ws.polled = True
        why = f"{ws.root}: inotify refused ({exc.strerror or exc}): polled every {self.reconcile_interval:g} s"
        if status.polled != why:
            status.polled = why
            self.stats.bump("errors")
            self.log.error("watch.failed", watch=ws.root, error=str(exc), errno=exc.errno, hint=inotify_hint(exc),
                           action=f"polling: files are compared with their pins every {self.reconcile_interval:g} s;"
                                  f" the watch is retried every {CHECK_SECONDS:g} s")
        self.stats.degrade(f"inotify:{ws.root}", why)

    def _failed(self, ws: WatchState, status: _Status, exc: Exception) -> None:
        """The directory is there but could not be watched or scanned (the store cannot
        be made: full, read-only…, or this release cannot use it). Logged once per
        distinct error, with a hint for the admin that fits its kind; retried every second.

        Only an error that is neither the system's nor the store's is logged with its
        traceback: that one is a defect of sessionguard, and the admin's only move is
        to report it."""
        ws.available = False
        why = (f"{ws.root}: not watched: {exc.strerror or exc} (store {ws.cfg.store_path})"
               if isinstance(exc, OSError) else f"{ws.root}: not watched: {type(exc).__name__}: {exc}")
        if status.failed != why:
            status.failed = why
            self.stats.bump("errors")
            fields = {"watch": ws.root, "store": ws.cfg.store_path, "error": str(exc)}
            if isinstance(exc, OSError):
                self.log.error("watch.failed", errno=exc.errno, **fields,
                               hint="check free space and write access to the store; retried every second")
            elif isinstance(exc, StoreError):
                self.log.error("watch.failed", **fields,
                               hint="the error says what is wrong with the store (a newer release's, damaged, "
                                    "not this user's…); retried every second")
            else:
                self.log.exception("watch.failed", **fields,
                                   hint="a defect in sessionguard, not in this setup: please report it with this "
                                        "traceback; retried every second")
        self.stats.degrade(f"watch:{ws.root}", why)

    def _caveats(self, ws: WatchState) -> None:
        """One line when the pins are not what the config suggests: hard links impossible, or risky."""
        if ws.pin_method == "copy" and ws.cfg.pin != "copy" and ws.store is not None \
                and os.fstat(ws.store.fd).st_dev != ws.root_dev:
            log = self.log.warning if ws.cfg.pin == "link" else self.log.info
            log("watch.no_hardlinks", watch=ws.root, store=ws.cfg.store_path, pin=ws.cfg.pin, pin_method="copy",
                why="the store is on another filesystem than the watched directory: hard links cannot cross it",
                effect="every pin and version is a full copy, by the daemon and by the embedded library")
        elif ws.pin_method == "link":
            self.log.warning("watch.pin_link", watch=ws.root,
                             risk="hard-link pins share the live inode: an in-place truncating write "
                                  "destroys the prior version too; use only for rename-only writers")

    def describe(self, ws: WatchState) -> dict[str, Any]:
        return {"path": ws.root, "available": ws.available, "inotify": ws.available and not ws.polled,
                "pin": ws.cfg.pin, "pin_method": ws.pin_method, "store": ws.cfg.store_path}

    # -- down ---------------------------------------------------------------------------

    def take_down(self, ws: WatchState, why: str) -> None:
        """Stop watching a directory that is gone or is not the one watched any more."""
        self.watcher.unschedule(ws)
        self._close(ws)
        ws.available = False
        self.log.error("watch.removed", watch=ws.root, why=why,
                       hint="watched again as soon as a directory is there (checked every second)")
        self.stats.clear_prefix(f"inotify:{ws.root}")
        self.stats.degrade(f"watch:{ws.root}", f"{ws.root}: {why}")

    def _close(self, ws: WatchState) -> None:
        with ws.gate.exclusive():
            if ws.store is not None:
                ws.store.close()
            if ws.root_fd is not None:
                os.close(ws.root_fd)
            ws.store, ws.root_fd = None, None
            ws.files.clear()  # the pins these described lived in that store
            ws.skipped.clear()
            ws.deferred.clear()
            ws.failing.clear()
        self.stats.clear_prefix(f"store:{ws.cfg.store_path}")
        self.stats.clear_prefix(f"lock:{ws.root}")

    def stop(self, ws: WatchState) -> None:
        """Clean stop: leave the restart hint, remove the spare pins, release the store."""
        if ws.store is not None and ws.available:
            try:
                ws.store.pins.save_cache(passes.cache_entries(ws), ws.cache_settings())
            except OSError as exc:
                self.log.warning("cache.write_failed", watch=ws.root, error=str(exc))
            try:
                ws.store.pins.drop_spares()
            except OSError:
                pass  # a read-only store, say: the next start's sweep removes them
        self.watcher.unschedule(ws)
        self._close(ws)

    # -- every second ---------------------------------------------------------------------

    def sweep_leftovers(self, ws: WatchState) -> None:
        """The tmp files that writers killed mid-write left in the store, once after each
        opening of it — by maintenance, after READY: they only take space (no pin or
        version is ever read from a tmp name, and new tmp names never collide with them),
        and listing a million pins would hold up a start for nothing."""
        store = ws.store
        if not ws.sweep_due or store is None:
            return
        ws.sweep_due = False
        started = time.monotonic()
        with ws.gate.shared():
            removed = store.sweep_tmp()
        self.log.info("store.swept", watch=ws.root, store=store.where, removed=removed,
                      duration_ms=int((time.monotonic() - started) * 1000))

    def check(self, ws: WatchState) -> None:
        """Directory still the one watched? Store still in place? inotify back?"""
        problem, st = dir_state(ws.root)
        if ws.available and (st is None or (st.st_dev, st.st_ino) != ws.root_ident):
            self.take_down(ws, problem or "replaced by another directory")
        if not ws.available:
            if not problem:
                self.bring_up(ws)
            return
        self._check_store(ws)
        if ws.polled:
            refused = self._schedule(ws)
            status = self._status.setdefault(ws.root, _Status())
            if refused is not None:
                self._refused(ws, status, refused)
                return
            status.polled = None
            self.log.info("watch.restored", **self.describe(ws))
            self.stats.degrade(f"inotify:{ws.root}", None)
            passes.scan(self.tracker, ws, stop=self.stopping)

    def _check_store(self, ws: WatchState) -> None:
        """A store renamed away by the directory's owner is put back; one that was deleted
        or moved out of the directory is made again (and every session pinned again by a scan).

        A store that is merely elsewhere in the directory is never given up: every
        pin and version goes through its descriptor, which still works. If putting it
        back fails (the owner keeps renaming it), it stays in use, ``degraded`` says
        so, and the next second tries again."""
        store = ws.store
        if store is None:
            return
        why = store.displaced()
        key = f"store:{store.where}"
        status = self._status.setdefault(ws.root, _Status())
        if why is not None and store.in_place():
            try:
                if store.reclaim():
                    self.log.error("store.reclaimed", watch=ws.root, store=store.where, why=why,
                                   action="moved back under its name; what took its name was moved aside")
                    why = None
            except OSError:
                pass  # renamed again meanwhile: still ours, still in use
            if why is not None:
                status.displaced = True
                self.stats.degrade(key, f"{store.where}: renamed away by the directory's owner and not yet put "
                                        "back; in use all the same (through its descriptor), put back once it "
                                        "holds still")
                return
        if why is None:
            if status.displaced:
                status.displaced = False
                self.stats.degrade(key, None)
            return
        self.log.error("store.vanished", watch=ws.root, store=store.where, why=why,
                       action="a fresh store is made and every session pinned again")
        self.stats.degrade(key, f"{store.where}: {why}")
        self.watcher.unschedule(ws)
        self._close(ws)
        self.bring_up(ws)
        if ws.available:
            self.stats.degrade(key, None)

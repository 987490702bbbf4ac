"""Whole-directory passes: the start-up scan, the overflow rescan, the reconciliation.

Events are not trusted alone. A scan compares every file with its pin (a
file whose identity matches what the daemon remembers — or, at a start after
a clean stop, what ``pins.cache`` says — is not re-read); the periodic
reconciliation is stat-only and looks only at files whose identity changed;
both treat writes as *unseen* (content is compared, not only counts).
Directories are walked through descriptors, never through a symlink.
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator

from . import fsutil
from .count import stat_hash
from .errors import UnsafeSessionFile
from .hint import CacheEntry, RestartHint
from .scanpool import SERIAL_FIRST, Pool
from .tracker import Tracker
from .watchstate import Tracked, WatchState, skip_key

#: A file modified less than this long ago is left to its close/rename event by
#: the reconciliation, so an in-place writer is never read half-way.
SETTLE_SECONDS = 1.0
#: How often a scan reports progress (files).
PROGRESS_EVERY = 1024
#: How often a scan asks whether to stop (files; a restart goes through ~200 in a millisecond).
CHECK_EVERY = 64

#: Told ``(files done, files in all)`` while a scan runs (for systemd's STATUS=).
Progress = Callable[[int, int], None]


def walk(ws: WatchState) -> Iterator[tuple[tuple[str, ...], os.DirEntry[str]]]:
    """``(parts, entry)`` of every non-directory entry below the root (recursive
    watches enter sub-directories the matcher allows, through checked descriptors)."""
    assert ws.root_fd is not None
    stack: list[tuple[tuple[str, ...], int]] = [((), os.dup(ws.root_fd))]
    while stack:
        parts, dir_fd = stack.pop()
        try:
            with os.scandir(dir_fd) as it:
                for entry in it:
                    here = (*parts, entry.name)
                    if not entry.is_dir(follow_symlinks=False):
                        yield here, entry
                    elif ws.matcher.descend(here):
                        sub = _enter(ws, dir_fd, entry.name)
                        if sub is not None:
                            stack.append((here, sub))
        except OSError:
            continue
        finally:
            os.close(dir_fd)


def _enter(ws: WatchState, dir_fd: int, name: str) -> int | None:
    try:
        return fsutil.walk(dir_fd, (name,), ws.check_dir)
    except (OSError, UnsafeSessionFile):
        return None


def count_files(ws: WatchState) -> int:
    """How many entries a scan will look at (names only, no stat): the total for progress."""
    return sum(1 for _ in walk(ws))


def scan(tracker: Tracker, ws: WatchState, cache: RestartHint | None = None, *,
         find_orphans: bool = False, progress: Progress | None = None,
         stop: Callable[[], bool] | None = None, processes: int = 0) -> dict[str, int]:
    """Every file against its pin. Sessions the daemon knew (or the cache knew) whose
    file is gone were deleted while nobody looked: their pins become versions.
    *find_orphans* (a start without a cache) lists every pin first: sessions it did
    not list are pinned without looking for a pin, and pins without a file are
    kept as versions at the end. *progress* is told how far the scan is every
    :data:`PROGRESS_EVERY` files. Tmp files of dead writers in the directory itself
    are swept as the walk finds them.

    When *stop* turns true the scan ends where it is, with ``abandoned=1`` in its
    result: every file it did is as safe as after a kill there, and a scan that ran
    on over 200,000 files would hold ``systemctl stop`` past its timeout.

    *processes*: how many child processes may pin the sessions a first start
    (*find_orphans*) finds without a pin, past the first :data:`~.scanpool.SERIAL_FIRST`
    (see :mod:`~sessionguard.scanpool`); 0: the scan pins them all itself."""
    assert ws.store is not None and ws.root_fd is not None
    started = time.monotonic()
    total = (len(cache) if cache else count_files(ws)) if progress is not None else 0
    suffix = _named_by_cache(ws, cache)
    # Without a hint most sessions of a start have no pin: one listing spares a lookup each.
    pinned = set(ws.store.pins.sids()) if find_orphans else None
    walked = _Walk(tracker, ws, cache=cache, pinned=pinned, progress=progress, total=total, stop=stop,
                   processes=processes if pinned is not None else 0)
    with ws.store.locks.keeping():
        walked.run(suffix)
    outcomes, seen, unchanged = walked.outcomes, walked.seen, walked.unchanged
    if walked.stopped_at is not None:
        tracker.log.info("scan.abandoned", watch=ws.root, files=walked.stopped_at - 1,
                         why="the daemon is stopping")
        return dict(outcomes, unchanged=unchanged, files=walked.stopped_at - 1, abandoned=1)
    ws.store.sweep_listed(ws.root_fd, walked.tmps)
    if unchanged:
        outcomes["unchanged"] += unchanged
    # known but not met: deleted while nobody looked (no million-entry sets built to find them)
    gone = {sid for sid in walked.known if sid not in seen}
    if cache is not None:
        gone.update(sid for sid in _unmet(cache, walked.met) if sid not in seen)
    for sid in sorted(gone):
        outcomes[_evaluate_sid(tracker, ws, sid)] += 1
    if pinned is not None:
        outcomes.update(orphans(tracker, ws, seen, pinned))
    files = len(seen) + walked.adopted
    result = dict(outcomes, files=files, duration_ms=int((time.monotonic() - started) * 1000))
    tracker.log.info("scan.completed", watch=ws.root, sessions=len(ws.files), **result)
    return result


def _unmet(cache: RestartHint, met: bytearray) -> Iterator[str]:
    """The hint's ids the walk did not adopt (*met*: a mark per id, or empty: none was)."""
    if not met:
        yield from cache.ids
        return
    i = met.find(0)
    while i >= 0:  # a restart over an unchanged directory: one pass in C over a million marks
        yield cache.ids[i]
        i = met.find(0, i + 1)


class _Walk:
    """One scan's walk over the directory, and what it did: outcomes, the sessions it
    looked at one by one (*seen*), how many were unchanged, how many of those it adopted
    from the restart hint as it met them (*adopted*; *met* marks them by their place in
    the hint's ids), the sessions the daemon knew before it (*known*), the tmp files in
    the directory itself (for the sweep), and the file it stopped at when told to stop
    (None: it went through). Sessions without a pin go to child processes once it has
    pinned :data:`SERIAL_FIRST` itself, if it may start *processes*."""

    def __init__(self, tracker: Tracker, ws: WatchState, *, cache: RestartHint | None, pinned: set[str] | None,
                 progress: Progress | None, total: int, stop: Callable[[], bool] | None,
                 processes: int = 0) -> None:
        self.tracker, self.ws, self.cache, self.pinned = tracker, ws, cache, pinned
        self.progress, self.total, self.stop = progress, total, stop
        self.processes = processes
        self.pool: Pool | None = None
        self.new_pins = 0
        self.known = list(ws.files)
        self.outcomes: Counter[str] = Counter()
        self.seen: set[str] = set()
        self.unchanged = self.adopted = 0
        self.met = bytearray()
        self.tmps: list[str] = []
        self.stopped_at: int | None = None

    def run(self, suffix: str) -> None:
        if suffix and self.cache is not None:
            self._restart_flat(self.cache, suffix)
            return
        try:
            for done, (parts, entry) in enumerate(walk(self.ws), 1):
                if done % CHECK_EVERY == 0 and self._stopping(done):
                    return
                self._one(parts, entry, self.cache)
        finally:
            if self.pool is not None:
                self.pool.finish()  # every name handed out answered (as after a kill: nothing torn)

    def _stopping(self, done: int) -> bool:
        """Asked every :data:`CHECK_EVERY` files: told to stop? (progress every :data:`PROGRESS_EVERY`)"""
        if self.stop is not None and self.stop():
            self.stopped_at = done
            return True
        if self.progress is not None and done % PROGRESS_EVERY == 0:
            self.progress(done, max(self.total, done))
        return False

    def _one(self, parts: tuple[str, ...], entry: os.DirEntry[str], cache: RestartHint | None) -> None:
        """One entry of the walk, looked at on its own (*cache*: the hint, if not asked yet)."""
        ws = self.ws
        if len(parts) == 1 and entry.name[:1] == "." and fsutil.TMP_MARK in entry.name:
            self.tmps.append(entry.name)  # a writer's tmp file (never a session: ids have no leading dot)
            return
        sid, why = ws.matcher.identify(parts)
        if sid is None and why is None:
            return
        if sid is not None:
            self.seen.add(sid)
            if _unchanged(ws, sid, entry, cache):
                self.unchanged += 1
                return
        pinless = self.pinned is not None and sid is not None and sid not in self.pinned
        regular = entry.is_file(follow_symlinks=False)
        if pinless and regular and sid is not None and sid not in ws.files and self._pooled(parts, sid):
            return
        self.outcomes[self.tracker.evaluate_at(ws, parts, sid, why, unseen=True, pinless=pinless,
                                               regular=regular)] += 1

    def _pooled(self, parts: tuple[str, ...], sid: str) -> bool:
        """Hand a new session to the processes, if there are (or now should be) some."""
        if self.pool is None:
            self.new_pins += 1
            if not self.processes or self.new_pins <= SERIAL_FIRST:
                return False
            self.pool = Pool.start(self.ws, self.processes, self._answered, self.tracker.log)
            if self.pool is None:
                self.processes = 0  # could not start one: not tried again
                return False
        self.pool.submit(parts, sid)
        return True

    def _answered(self, parts: tuple[str, ...], sid: str, tracked: Tracked | None) -> None:
        """A process's answer: its new pin, or None — then the scan evaluates the session
        itself, unless it is stopping (a name not pinned is as after a kill there)."""
        if tracked is None:
            if self.stopped_at is not None:
                return
            self.outcomes[self.tracker.evaluate_at(self.ws, parts, sid, None, unseen=True, pinless=True,
                                                   regular=True)] += 1
            return
        self.tracker.adopt(self.ws, parts, sid, tracked)
        self.outcomes["new"] += 1

    def _restart_flat(self, cache: RestartHint, suffix: str) -> None:
        """A restart of a flat watch with an exact hint: the directory's entries are met in
        the order the hint lists them (its ids are in the order the last scan listed
        them, and a directory lists its names in a stable order: a hash order on ext4
        and XFS, whatever was rewritten since), so each name is first compared with the
        next id. A session whose file is the one the hint describes (same identity, a
        regular file, not someone else's hard link) is adopted with no read and no
        lookup, and kept as its place in the hint (:class:`~.watchstate.Sessions`: no
        object until something asks); everything else (a name out of order, new,
        changed) goes to :meth:`_one` like any scan's. This loop is a restart over a
        million sessions: keep it lean."""
        ws = self.ws
        assert ws.root_fd is not None
        ids, keys, keep = cache.ids, cache.keys, ws.files.setdefault
        ws.files.refer_to(cache)
        n, cut = len(ids), len(suffix)
        met = self.met = bytearray(n)
        j = done = adopted = 0
        fd = os.dup(ws.root_fd)
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    done += 1
                    if done % CHECK_EVERY == 0 and self._stopping(done):
                        return
                    name = entry.name
                    if j < n and name.startswith(ids[j]) and len(name) == len(ids[j]) + cut \
                            and name.endswith(suffix):
                        i = j
                    elif name.endswith(suffix) and ws.matcher.may_be_session(name) \
                            and (found := cache.index(name[:-cut])) is not None:
                        i = found  # out of the hint's order (names came or went): on from here
                    else:
                        i = -1
                    if i >= 0:
                        j = i + 1
                        # kept as its place in the hint (is not i: the worker got to it first)
                        if _believable(ws, entry, keys[i]) and keep(ids[i], i) is i:
                            met[i] = 1
                            adopted += 1
                            continue
                    if not entry.is_dir(follow_symlinks=False):  # the hint was asked already: not again
                        self._one((name,), entry, None)
        finally:
            os.close(fd)
            self.adopted = adopted
            self.unchanged += adopted


def _named_by_cache(ws: WatchState, cache: RestartHint | None) -> str:
    """The suffix that turns a name into its id without the matcher, or "" (use the matcher).

    Only for a flat watch whose restart hint was written under these very settings
    (:attr:`RestartHint.exact`): every id in it is what the matcher made of
    ``<id><suffix>``, so a name of that form whose id is in the hint needs no
    second opinion. Half a million names a second less to match at a restart."""
    if cache is not None and cache.exact and not ws.cfg.recursive:
        return ws.matcher.suffix
    return ""


def _unchanged(ws: WatchState, sid: str, entry: os.DirEntry[str], cache: RestartHint | None) -> bool:
    """The file is the one pinned, by its identity alone (no read): adopt what is known."""
    key = ws.files.key(sid)
    if key is not None:
        try:
            return key == stat_hash(entry.stat(follow_symlinks=False))
        except OSError:
            return False
    hint = cache.get(sid) if cache is not None else None
    return hint is not None and _adopt(ws, sid, entry, hint)


def _adopt(ws: WatchState, sid: str, entry: os.DirEntry[str], hint: CacheEntry) -> bool:
    """The restart hint's entry for a session the daemon does not track yet: believed,
    with no read, when the file's identity is still the one it names."""
    if sid in ws.files or not _believable(ws, entry, hint[0]):
        return False
    ws.files[sid] = Tracked(*hint)
    return True


def _believable(ws: WatchState, entry: os.DirEntry[str], key: int) -> bool:
    """May a restart hint that names identity *key* be believed for *entry*, unread? The
    same file (dev, inode, size, mtime), a regular one, and not someone else's hard link."""
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    return key == stat_hash(st) and stat.S_ISREG(st.st_mode) and ws.foreign_link(st) is None


def _evaluate_sid(tracker: Tracker, ws: WatchState, sid: str) -> str:
    try:
        parts = ws.matcher.parts_for(sid)
    except ValueError:
        ws.files.pop(sid, None)
        return "ignored"
    return tracker.evaluate_at(ws, parts, sid, None, unseen=True)


def orphans(tracker: Tracker, ws: WatchState, seen: set[str] | None = None,
            pinned: set[str] | None = None) -> Counter[str]:
    """Pins whose session file is gone and that the daemon did not know (made by the
    library, or known only to a lost cache): kept as ``deleted`` versions. *pinned*:
    the pins as the caller listed them (else they are listed now)."""
    assert ws.store is not None
    out: Counter[str] = Counter()
    # the listing streamed and only the orphans kept: a list of a million pins' names,
    # made after READY, would stay in the daemon's heap (RSS) for its life
    found = [sid for sid in (pinned if pinned is not None else ws.store.pins.sids())
             if sid not in ws.files and (seen is None or sid not in seen)]
    for sid in found:
        out[_evaluate_sid(tracker, ws, sid)] += 1
    return out


def reconcile(tracker: Tracker, ws: WatchState) -> dict[str, int]:
    """Cheap stat-only pass: evaluate only files whose identity changed (what the
    event stream lost). Files modified within :data:`SETTLE_SECONDS` are left to
    their own close/rename event."""
    started = time.monotonic()
    checked = changed = 0
    now = time.time()
    present: set[str] = set()
    for parts, entry in walk(ws):
        sid, why = ws.matcher.identify(parts)
        if sid is None and why is None:
            continue
        checked += 1
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if sid is not None:
            present.add(sid)
            if ws.files.key(sid) == stat_hash(st):
                continue
        if ws.skipped.get("/".join(parts)) == skip_key(st) or now - st.st_mtime < SETTLE_SECONDS:
            continue
        changed += 1
        tracker.evaluate_at(ws, parts, sid, why, unseen=True)
    for sid in sorted((set(ws.files) | ws.failing | set(ws.deferred)) - present):
        changed += 1
        _evaluate_sid(tracker, ws, sid)
    ws.last_reconcile = time.time()
    tracker.stats.bump("reconciliations")
    result = {"checked": checked, "changed": changed, "duration_ms": int((time.monotonic() - started) * 1000)}
    tracker.log.debug("reconcile.completed", watch=ws.root, **result)
    return result


def retry_deferred(tracker: Tracker, ws: WatchState, degraded_after: float) -> None:
    """Evaluate again the sessions whose lock another process held; degraded while any
    has been held longer than *degraded_after* seconds."""
    for sid in list(ws.deferred):
        _evaluate_sid(tracker, ws, sid)
    now = time.monotonic()
    stuck = sorted(sid for sid, since in ws.deferred.items() if now - since > degraded_after)
    why = None
    if stuck:
        why = (f"{len(stuck)} session(s) locked by another process for over {degraded_after:g} s "
               f"(not captured meanwhile): {', '.join(stuck[:5])}")
    tracker.stats.degrade(f"lock:{ws.root}", why)


def cache_entries(ws: WatchState) -> dict[str, CacheEntry]:
    """What to write to ``pins.cache`` at a clean stop."""
    return ws.files.entries()

"""watchdog's inotify → per-path coalesced queue → one worker calling ``Tracker.evaluate``.

A flat watch is a callback on watchdog's inotify reader (``InotifyFD``, the
``sg-inotify`` thread) that puts each event's path on the queue; a recursive
watch goes through watchdog's emitter and observer, which add the watches of
sub-directories as they appear. The queue is FIFO and coalesces repeats (a
path already waiting is not queued twice, and keeps its place). One worker
thread drains it, so a burst of writes to one session costs one evaluation,
and evaluation never runs on watchdog's threads.

Which events matter (everything else, notably ``IN_MODIFY``, is filtered out
in the kernel mask so a 400 KB write does not flood the queue): created (a
new file, an ``os.link`` publish, a rename from outside), closed after write
(an in-place rewrite is read once complete), moved (both ends), deleted.

An inotify queue overflow loses events. watchdog (7.1+) tells every callback
registered on its inotify instance through ``on_queue_overflow()``; we
register one such callback per watched root on the instance we create, and
it triggers a rescan — no log text is parsed.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import CallbackId, InotifyConstants, InotifyEvent, InotifyFD, Mask, WatchDescriptor

from . import fsutil
from .tracker import Tracker
from .watchstate import WatchState

#: Name prefix of ``sync`` cookie files (hidden: never a session, never the server's).
#: The rest of the name is fsutil's tmp mark and our pid, so the start-up scan's
#: tmp sweep removes the cookies of a daemon killed in the middle of a ``sync``.
COOKIE_PREFIX = ".sessionguard-sync"
_EVENTS: list[type[FileSystemEvent]] = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent,
                                        DirDeletedEvent, DirMovedEvent]
#: What a flat watch asks the kernel for: the same changes as ``_EVENTS``, on names in
#: the directory; never through a symlink, only on a directory.
_FLAT_MASK = Mask(InotifyConstants.IN_CREATE | InotifyConstants.IN_CLOSE_WRITE | InotifyConstants.IN_MOVED_FROM
                  | InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_DELETE | InotifyConstants.IN_DELETE_SELF
                  | InotifyConstants.IN_DONT_FOLLOW | InotifyConstants.IN_ONLYDIR)
#: Adds nothing to an existing watch's mask (IN_DELETE_SELF is always in it): what the
#: overflow sentinel registers with, so the emitter's narrow mask stays as it is.
_SENTINEL_MASK = Mask(InotifyConstants.IN_MASK_ADD | InotifyConstants.IN_DELETE_SELF | InotifyConstants.IN_DONT_FOLLOW)

#: The sysctl behind each way inotify refuses a watch (watchdog raises these errnos).
INOTIFY_LIMITS = {errno.ENOSPC: "fs.inotify.max_user_watches", errno.EMFILE: "fs.inotify.max_user_instances"}


def inotify_hint(exc: OSError) -> str:
    """What an admin can do when inotify refuses to watch a directory."""
    knob = INOTIFY_LIMITS.get(exc.errno or 0)
    if knob is None:
        return "inotify could not watch the directory (is it on a local filesystem the daemon may read?)"
    per_ns = knob.replace("fs.inotify.max_user_", "user.max_inotify_")
    return (f"raise {knob} (sysctl -w {knob}=N, and in /etc/sysctl.d/ to keep it; the package's "
            f"60-sessionguard-inotify.conf does), in a container also {per_ns}; the limit is per user, "
            "shared with every other inotify user of the same uid")


_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def name_os_thread(name: str) -> None:
    """Give the calling thread *name* (15 bytes) in the kernel, so ``top -H``, ``ps -L``
    and ``/proc/<pid>/task/*/comm`` tell the worker from the other threads."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class CoalescingQueue:
    """FIFO of paths where a path already waiting is not added again."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        #: Paths put so far (see :class:`InotifyReader`; read without the lock).
        self.puts = 0

    def put(self, path: str) -> None:
        with self._cond:
            self.puts += 1
            if path not in self._items:
                self._items[path] = None
                self._cond.notify()

    def get(self, timeout: float) -> str | None:
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if not self._items:
                return None
            path, _ = self._items.popitem(last=False)
            return path

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class _Handler(FileSystemEventHandler):
    def __init__(self, put: Callable[[str], None], count: Callable[[], None]) -> None:
        self._put = put
        self._count = count

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._count()
        for path in (event.src_path, event.dest_path):
            if path:
                self._put(os.fsdecode(path))


class _FlatCallback:
    """A flat watch served straight from watchdog's inotify reader: each event's name that
    may be a session (or is a sync cookie) goes onto the queue.

    The emitter and observer (move pairing, event objects, a dispatcher thread) cost
    about a third of the daemon's CPU per write and give a flat watch nothing: the
    worker looks at a path, whatever happened to it. Recursive watches keep them (the
    emitter adds and drops the sub-directories' watches). Names the worker would ignore
    (a writer's tmp file: created, closed, renamed away) are dropped here, so a rename
    write wakes the worker once instead of four times."""

    def __init__(self, root: str, wanted: Callable[[str], bool], put: Callable[[str], None],
                 count: Callable[[], None]) -> None:
        self._root, self._wanted, self._put, self._count = root, wanted, put, count

    def on_event(self, event: InotifyEvent) -> None:
        if event.name:
            self._count()
            name = os.fsdecode(event.name)
            if self._wanted(name) or name.startswith(COOKIE_PREFIX):
                self._put(os.path.join(self._root, name))

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        pass  # the supervisor notices a directory gone within a second

    def on_queue_overflow(self) -> None:
        pass  # the shared sentinel reports it, once


class _OverflowSentinel:
    """A watchdog ``WatchCallback`` that only listens for queue overflows."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        self._on_overflow = on_overflow

    def on_event(self, event: InotifyEvent) -> None:
        pass

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        pass

    def on_queue_overflow(self) -> None:
        self._on_overflow()


#: How long the inotify reader pauses after each batch (see :class:`InotifyReader`).
BATCH_SECONDS = 0.02


class InotifyReader(InotifyFD):
    """watchdog's inotify reader thread, named ``sg-inotify`` for ``top -H`` and ``ps -L``,
    reading events in batches.

    watchdog's own loop reads as soon as anything is there, so a rename write (four
    events, spread over the writer's ``fsync``) woke this thread about three times;
    a wake-up (poll, the GIL, two context switches) cost ~20 µs of CPU, the events
    themselves ~2.5 µs each. Pausing *batch_s* after each batch lets the next read
    take everything that came meanwhile: the first event after a quiet spell is still
    read at once, later ones up to *batch_s* late, and wake-ups are bounded by
    1 / *batch_s* a second whatever the event rate. A batch that gave the worker
    nothing (*queued*, a count of paths handed on, did not move: a writer's tmp
    file made, say) is not followed by a pause, so the event a write is about (the
    rename onto the session) is still read at once after a quiet spell. (A recursive
    watch's events reach the queue through watchdog's own threads, after the batch:
    its batches are seldom followed by a pause.) The pause was 2 ms (the reader's
    CPU per 1,000 small writes 87 → 24 ms); it is 20 ms since a slower machine showed
    that under a steady writer the worker, too, gains from being handed its paths
    several at a time rather than one per wake-up (1,000-message sessions, by hand:
    reader 294 → 86–98 ms and worker 2,069–2,094 → 1,536–1,554 ms of CPU per 1,000
    writes; BENCHMARKS.md). It is what an event can wait in a busy spell, and what
    two writes of one file may be coalesced within (as they are when the worker is
    behind): the later one is judged against the pin like any write (its count, its
    first message, the one before the pinned last).
    The kernel queue holds 16,384 events by default: a pause this short cannot fill it."""

    def __init__(self, batch_s: float = BATCH_SECONDS, queued: Callable[[], int] | None = None) -> None:
        super().__init__()
        self.batch_s = batch_s
        self._queued = queued

    def run(self) -> None:
        name_os_thread("sg-inotify")
        while self.should_keep_running():
            before = self._queued() if self._queued is not None else None
            for event in self.read_events():
                self.handle_event(event)
            if self._queued is None or self._queued() != before:
                time.sleep(self.batch_s)


class _Observer(BaseObserver):
    """watchdog's inotify observer, with its inotify instance in our hands so the
    overflow sentinel can be registered on it."""

    def __init__(self, on_overflow: Callable[[], None], queued: Callable[[], int]) -> None:
        self.inotify = InotifyReader(queued=queued)  # inotify_init: EMFILE at the instance limit
        self.inotify.start()
        super().__init__(InotifyEmitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self.inotify)
        self.sentinel = _OverflowSentinel(on_overflow)
        self.sentinel_id = CallbackId(id(self.sentinel))

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self.inotify.stop()
        self.inotify.join()


class Watcher:
    """Owns the observer, the queue and the worker for all watches."""

    def __init__(self, tracker: Tracker, log: Any, on_overflow: Callable[[], None]) -> None:
        self.tracker = tracker
        self.log = log
        self.queue = CoalescingQueue()
        #: Made by the first schedule(), not here: it takes an inotify instance, which the
        #: instance limit may refuse; the daemon then polls and schedule() tries again.
        self.observer: _Observer | None = None
        self._on_overflow = on_overflow
        #: root → (the emitter's watch, recursive only; the inotify watch; our callbacks on it)
        self._scheduled: dict[str, tuple[ObservedWatch | None, WatchDescriptor, list[CallbackId]]] = {}
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="sessionguard-worker", daemon=True)
        self._cookies: dict[str, threading.Event] = {}
        self._cookie_ids = itertools.count()
        self._cookie_lock = threading.Lock()
        self.last_progress = time.monotonic()
        self.in_hand: str | None = None

    def start(self) -> None:
        self._worker.start()

    def schedule(self, ws: WatchState) -> None:
        """Start watching *ws*'s directory. Raises ``OSError`` when inotify refuses
        (``ENOSPC``: watch limit, ``EMFILE``: instance limit; see :func:`inotify_hint`)."""
        self.unschedule(ws)
        if self.observer is None:
            observer = _Observer(self._on_overflow, lambda: self.queue.puts)
            observer.start()
            self.observer = observer
        inotify, root = self.observer.inotify, os.fsencode(ws.root)
        count = self._count_event
        callbacks: list[CallbackId] = [self.observer.sentinel_id]
        watch = None
        if ws.cfg.recursive:
            watch = self.observer.schedule(_Handler(self.queue.put, count), ws.root, recursive=True,
                                           event_filter=_EVENTS)
        else:
            flat = _FlatCallback(ws.root, ws.matcher.may_be_session, self.queue.put, count)
            callbacks.append(CallbackId(id(flat)))
            flat_wd = inotify.add_callback(root, _FLAT_MASK, flat, callbacks[-1])
        try:
            wd = inotify.add_callback(root, _SENTINEL_MASK, self.observer.sentinel, self.observer.sentinel_id)
        except OSError:
            if watch is not None:
                self.observer.unschedule(watch)
            else:
                inotify.remove_callbacks([(flat_wd, callbacks[-1])])
            raise
        self._scheduled[ws.root] = (watch, wd, callbacks)

    def _count_event(self) -> None:
        self.tracker.stats.bump("events")

    def unschedule(self, ws: WatchState) -> None:
        entry = self._scheduled.pop(ws.root, None)
        if entry is None or self.observer is None:
            return
        watch, wd, callbacks = entry
        try:
            self.observer.inotify.remove_callbacks([(wd, cid) for cid in callbacks])
        except OSError:
            pass  # the watch went with its directory
        if watch is None:
            return
        try:
            self.observer.unschedule(watch)
        except (KeyError, OSError):
            pass  # the emitter already stopped with its directory

    def _run(self) -> None:
        name_os_thread("sg-worker")
        while not self._stop.is_set():
            path = self.queue.get(timeout=0.5)
            self.last_progress = time.monotonic()
            if path is None:
                continue
            self.in_hand = path
            try:
                if os.path.basename(path).startswith(COOKIE_PREFIX):
                    self._cookie_seen(path)
                else:
                    self.tracker.evaluate(path)
            except Exception as exc:  # the worker must outlive any one file
                self._report(path, exc)
            finally:
                self.in_hand = None
                self.last_progress = time.monotonic()

    def _report(self, path: str, exc: Exception) -> None:
        self.tracker.stats.bump("errors")
        try:
            self.log.exception("worker.error", path=path, error=str(exc))
        except Exception as log_exc:  # nor may a failing log line end it
            try:  # last resort: one ASCII line on stderr
                os.write(2, f"sessionguardd: worker.error path={path!a} error={exc!a} "
                            f"(logging it failed: {log_exc!a})\n".encode())
            except OSError:
                pass

    def healthy(self, stall_seconds: float) -> tuple[bool, str]:
        """Observer thread alive and the queue being drained (for the systemd watchdog).

        The worker is wedged when it has held one file, or left the queue
        waiting, for longer than *stall_seconds* (the watchdog interval).
        """
        if self.observer is not None and not self.observer.is_alive():
            return False, "observer thread died"
        if not self._worker.is_alive():
            return False, "worker thread died"
        stalled = time.monotonic() - self.last_progress
        if stalled > stall_seconds and (len(self.queue) or self.in_hand):
            return False, f"worker stuck for {stalled:.0f}s on {self.in_hand or 'queue'}"
        return True, ""

    # -- sync cookies --------------------------------------------------------

    def sync(self, watches: list[WatchState], timeout: float) -> bool:
        """True once every event queued before this call was processed.

        watchman's technique: create a cookie file in each watched directory
        (through its descriptor); inotify delivers its event after every
        earlier event of that directory, and our queue is FIFO, so seeing the
        cookie means all earlier changes were evaluated.
        """
        waits: list[tuple[WatchState, str, threading.Event]] = []
        try:
            for ws in watches:
                name = f"{COOKIE_PREFIX}{fsutil.TMP_MARK}{os.getpid()}-{next(self._cookie_ids)}"
                done = threading.Event()
                with self._cookie_lock:
                    self._cookies[os.path.join(ws.root, name)] = done
                waits.append((ws, name, done))
                if ws.root_fd is None:
                    return False
                try:
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o600, dir_fd=ws.root_fd))
                except OSError as exc:
                    self.log.warning("sync.cookie_failed", watch=ws.root, error=str(exc))
                    return False
            deadline = time.monotonic() + timeout
            return all(done.wait(max(deadline - time.monotonic(), 0)) for _, _, done in waits)
        finally:
            for ws, name, _ in waits:
                with self._cookie_lock:
                    self._cookies.pop(os.path.join(ws.root, name), None)
                if ws.root_fd is not None:
                    fsutil.unlink_quietly(ws.root_fd, name)

    def pending_syncs(self, ws: WatchState) -> list[threading.Event]:
        """The ``sync`` calls waiting on *ws* now. A rescan that starts after this call
        and completes answers them: it looked at every file later than their call, and
        their cookie's own event may have been lost in the overflow that caused it."""
        prefix = os.path.join(ws.root, COOKIE_PREFIX)
        with self._cookie_lock:
            return [done for path, done in self._cookies.items() if path.startswith(prefix)]

    def _cookie_seen(self, path: str) -> None:
        with self._cookie_lock:
            done = self._cookies.get(path)
        if done is not None:
            done.set()

    def stop(self) -> None:
        """Stop watching; the file in hand is finished, the rest is left to the next start-up scan."""
        self._stop.set()
        self.queue.close()
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
        self._worker.join(timeout=30)

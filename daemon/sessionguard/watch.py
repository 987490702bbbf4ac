"""watchdog observer → per-path coalesced queue → "this file changed" calls.

watchdog's observer produces events; our handler only turns each into a
path on a FIFO queue that coalesces repeats (a path already waiting is not
queued twice, and keeps its place). One worker thread drains the queue into
``Tracker.evaluate``, so a burst of writes to one session costs one
evaluation, and evaluation never runs on watchdog's thread.

Which events matter (everything else, notably IN_MODIFY, is filtered out in
the kernel mask so a 400 KB write does not flood the queue):

* created — a new file, an ``os.link``-published file, or a rename from
  outside the watched directory;
* closed after write — an in-place rewrite is read only once it is complete;
* moved — both ends: the destination is the new content, the source is gone;
* deleted — the session is gone.

watchdog reports an inotify queue overflow only in its log; a logging
handler turns that into a rescan request, because events were lost.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

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
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from . import fsutil
from .tracker import Tracker, WatchState

#: Name prefix of ``sync`` cookie files (hidden: never a session, never the server's).
#: The rest of the name is fsutil's tmp mark and our pid, so the start-up scan's
#: tmp sweep removes the cookies of a daemon killed in the middle of a ``sync``.
COOKIE_PREFIX = ".sessionguard-sync"
_EVENTS = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent, DirDeletedEvent, DirMovedEvent]


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


class CoalescingQueue:
    """FIFO of paths where a path already waiting is not added again."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, path: str) -> None:
        with self._cond:
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
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                self._put(os.fsdecode(path))


class _OverflowHook(logging.Handler):
    """watchdog logs an inotify queue overflow and carries on; we rescan."""

    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._callback()


class Watcher:
    """Owns the observer, the queue and the worker for all watches."""

    def __init__(self, tracker: Tracker, log: Any, on_overflow: Callable[[], None]) -> None:
        self.tracker = tracker
        self.log = log
        self.queue = CoalescingQueue()
        #: Made by the first schedule(), not here: it takes an inotify instance, which the
        #: instance limit may refuse; the daemon then polls and schedule() tries again.
        self.observer: BaseObserver | None = None
        self._scheduled: dict[str, ObservedWatch] = {}
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="sessionguard-worker", daemon=True)
        self._cookies: dict[str, threading.Event] = {}
        self._cookie_ids = itertools.count()
        self._cookie_lock = threading.Lock()
        self.last_progress = time.monotonic()
        self.in_hand: str | None = None
        self._overflow_hook = _OverflowHook(on_overflow)
        logging.getLogger("watchdog.observers.inotify_c").addHandler(self._overflow_hook)

    def start(self) -> None:
        self._worker.start()

    def schedule(self, ws: WatchState) -> None:
        """Start watching *ws*'s directory. Raises ``OSError`` when inotify refuses
        (``ENOSPC``: watch limit, ``EMFILE``: instance limit; see :func:`inotify_hint`)."""
        self.unschedule(ws)
        if self.observer is None:
            observer = Observer()  # inotify_init: EMFILE at the instance limit
            observer.start()
            self.observer = observer
        handler = _Handler(self.queue.put, lambda: self.tracker.bump("events"))
        self._scheduled[ws.root] = self.observer.schedule(
            handler, ws.root, recursive=ws.cfg.recursive, event_filter=_EVENTS
        )

    def unschedule(self, ws: WatchState) -> None:
        watch = self._scheduled.pop(ws.root, None)
        if watch is not None and self.observer is not None:
            try:
                self.observer.unschedule(watch)
            except (KeyError, OSError):
                pass  # the emitter already stopped with its directory

    def _run(self) -> None:
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
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one file
                self.tracker.bump("errors")
                try:
                    self.log.exception("worker.error", path=path, error=str(exc))
                except Exception as log_exc:  # noqa: BLE001 - nor may a failing log line end it
                    try:  # last resort: one ASCII line on stderr
                        os.write(2, f"sessionguardd: worker.error path={path!a} error={exc!a} "
                                    f"(logging it failed: {log_exc!a})\n".encode())
                    except OSError:
                        pass
            finally:
                self.in_hand = None
                self.last_progress = time.monotonic()

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

    def sync(self, roots: list[str], timeout: float) -> bool:
        """Return True once every event queued before this call was processed.

        watchman's technique: create a cookie file in each watched directory;
        inotify delivers its event after every earlier event of that
        directory, and our queue is FIFO, so seeing the cookie means all
        earlier changes were evaluated.
        """
        waits: list[tuple[str, threading.Event]] = []
        for root in roots:
            path = os.path.join(root, f"{COOKIE_PREFIX}{fsutil.TMP_MARK}{os.getpid()}-{next(self._cookie_ids)}")
            done = threading.Event()
            with self._cookie_lock:
                self._cookies[path] = done
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            except OSError as exc:
                self.log.warning("sync.cookie_failed", watch=root, error=str(exc))
                with self._cookie_lock:
                    self._cookies.pop(path, None)
                return False
            waits.append((path, done))
        deadline = time.monotonic() + timeout
        ok = all(done.wait(max(deadline - time.monotonic(), 0)) for _, done in waits)
        for path, _ in waits:
            with self._cookie_lock:
                self._cookies.pop(path, None)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return ok

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
        logging.getLogger("watchdog.observers.inotify_c").removeHandler(self._overflow_hook)

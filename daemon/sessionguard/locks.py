"""Per-session locks across threads and processes, on one lock file per store.

Saves, captures and restores of one session exclude each other whether they
come from threads of the daemon, the control socket or a server embedding
the library. Each session owns one byte of ``<store>/lock`` (its id hashed),
locked with an open-file-description lock: no lock file per session, no
lock left behind by a killed process, and — the store being ``0700`` —
nobody outside the store's owner can hold one. The daemon opens the lock
file for each hold and so keeps nothing open for writing between operations
(its store's filesystem can be remounted read-only under it), except while
a scan runs (:meth:`Locks.keeping`: a first start over 100,000 sessions
spent an eighth of its time opening and closing it); an embedded
:class:`~sessionguard.guard.Guard` keeps one descriptor for its lifetime
(*keep_open*), which spares every save an open and a close. A child
process never shares that descriptor: an OFD lock would not exclude two
processes holding one open file, so a forked child opens its own. The
daemon's claim on a store ("one daemon per store") is an ``flock`` on the
store directory's own descriptor.

Two sessions may hash to the same byte; they then merely take turns. For
that reason the in-process half of the lock is keyed by byte, not by id.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
import weakref
from contextlib import AbstractContextManager

from . import fsutil
from .errors import SessionLocked, StoreError

LOCK_FILE = "lock"
_SESSION_BYTES = 1 << 40
#: How often a bounded wait retries a lock held by another process.
_POLL = 0.005
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
#: How many sessions' bytes and idle in-process locks are kept for reuse (each a few
#: hundred bytes); beyond that an idle one is dropped as its hold ends.
_CACHED = 1024
#: How many idle in-process locks dropped from that cache are kept to be handed out again.
_IDLE = 64


def session_byte(sid: str) -> int:
    """The byte of the lock file that stands for session *sid*."""
    digest = hashlib.blake2b(sid.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % _SESSION_BYTES


class _Held:
    """The in-process side of one byte: a re-entrant thread lock and how deep it is held."""

    __slots__ = ("depth", "fd", "rlock", "users")

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd = -1
        self.users = 0


class Locks:
    """The session locks of one store (*store_fd*: the store directory, owned by the caller)."""

    def __init__(self, store_fd: int, *, keep_open: bool = False) -> None:
        self.store_fd = store_fd
        self._held: dict[int, _Held] = {}
        self._idle: list[_Held] = []
        #: Each recent session's byte: a hash per hold costs a save more than the lock itself.
        self._bytes: dict[str, int] = {}
        self._guard = threading.Lock()
        #: The lock file's descriptor that holds share while there is a reason to keep it
        #: (-1: none open); holds under way (it is never closed under one); reasons to keep
        #: it (*keep_open*, scans).
        self._kept = -1
        self._active = 0
        self._keep = 1 if keep_open else 0
        _KEEPING.add(self)

    def session(self, sid: str, wait: float | None = None) -> AbstractContextManager[None]:
        """Hold session *sid*'s lock; re-entrant within a thread.

        *wait* bounds the wait (seconds; 0: do not wait) and raises
        :class:`SessionLocked` when it runs out: the daemon's worker must never
        stall on a lock another process holds.
        """
        return _Hold(self, sid, wait)

    def _join(self, sid: str) -> tuple[int, _Held]:
        """Session *sid*'s byte and its in-process lock, counted as used (and the hold as
        under way) until :meth:`_leave`. One pass under the guard in, one out: a first
        start takes 100,000 holds, and each pass cost it more than the lock itself."""
        byte = self._bytes.get(sid)
        if byte is None:
            if len(self._bytes) >= _CACHED:
                self._bytes.clear()
            byte = self._bytes[sid] = session_byte(sid)
        with self._guard:
            held = self._held.get(byte)
            if held is None:
                # an idle one handed back by _leave, else a new one: a first start meets
                # 100,000 sessions once each, and a new RLock per session showed in it
                held = self._held[byte] = self._idle.pop() if self._idle else _Held()
            held.users += 1
            self._active += 1
        return byte, held

    def _leave(self, byte: int, held: _Held) -> None:
        with self._guard:
            held.users -= 1
            if held.users == 0 and len(self._held) > _CACHED:
                del self._held[byte]
                if len(self._idle) < _IDLE:
                    self._idle.append(held)  # nobody holds or waits for it: as good as new
            self._active -= 1
            self._close_unkept()

    def keeping(self) -> AbstractContextManager[None]:
        """Share one descriptor among the holds taken until the block ends (a scan)."""
        return _Keeping(self)

    def _open(self) -> int:
        """The descriptor to lock through when none is kept open (called by a hold under
        way, which the kept descriptor is never closed under): one for this hold alone
        (opened outside the guard: a slow store must not stall other sessions' holds),
        or the one to keep while something keeps it."""
        if self._keep == 0:
            return os.open(LOCK_FILE, _OPEN_FLAGS, 0o600, dir_fd=self.store_fd)
        with self._guard:
            if self._kept < 0:
                self._kept = os.open(LOCK_FILE, _OPEN_FLAGS, 0o600, dir_fd=self.store_fd)
            return self._kept

    def _release(self, fd: int, byte: int) -> None:
        if fd != self._kept:
            os.close(fd)  # closing the description releases its lock
        else:
            fsutil.range_unlock(fd, byte)

    def _close_unkept(self) -> None:
        """Close the shared descriptor once nothing keeps it and no hold is under way
        (closing it would release those holds). Called with ``_guard`` held."""
        if self._keep == 0 and self._active == 0 and self._kept >= 0:
            os.close(self._kept)
            self._kept = -1

    def close(self) -> None:
        """Close the kept descriptor, if any (releasing every lock held through it)."""
        with self._guard:
            if self._kept >= 0:
                os.close(self._kept)
                self._kept = -1
                self._active = 0

    def _forget_kept(self) -> None:
        """In a forked child: drop the parent's descriptor, open our own at first use."""
        if self._kept >= 0:
            os.close(self._kept)
            self._kept = -1
        self._active = 0
        self._guard = threading.Lock()

    def _take(self, byte: int, sid: str, wait: float | None, deadline: float | None) -> int:
        """Lock *byte* through the kept descriptor or one of this hold's own: at once when
        nobody else holds it (no clock read), else waiting as :meth:`session` says,
        until *deadline* if the wait for the thread lock already set one."""
        fd = self._kept
        if fd < 0:
            fd = self._open()
        try:
            if wait is None:
                fsutil.range_lock(fd, byte, wait=True)
                return fd
            while not fsutil.range_lock(fd, byte, wait=False):
                if deadline is None:
                    deadline = time.monotonic() + wait
                if time.monotonic() >= deadline:
                    raise SessionLocked(f"session {sid!r} is locked by another process")
                time.sleep(_POLL)
            return fd
        except BaseException:
            if fd != self._kept:
                os.close(fd)
            raise

    def claim_daemon(self) -> None:
        """Say "a daemon serves this store" for as long as the store's descriptor is open.

        Raises :class:`StoreError` when another daemon already does: two
        daemons on one store would pin, keep and prune behind each other's back.
        """
        try:
            fcntl.flock(self.store_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError("another sessionguardd already serves this store") from None


class _Hold:
    """One ``with locks.session(sid)``. A class rather than a generator: it runs on
    every save, and an embedded save is benchmarked against a plain one (benchmark 1)."""

    __slots__ = ("_byte", "_held", "_locks", "_sid", "_wait")

    def __init__(self, locks: Locks, sid: str, wait: float | None) -> None:
        self._locks, self._sid, self._wait = locks, sid, wait

    def __enter__(self) -> None:
        locks, sid, wait = self._locks, self._sid, self._wait
        byte, held = locks._join(sid)
        try:
            deadline = None
            if not held.rlock.acquire(False):  # the usual case reads no clock
                if wait is not None:
                    deadline = time.monotonic() + wait
                if wait == 0 or not held.rlock.acquire(timeout=-1 if wait is None else wait):
                    raise SessionLocked(f"session {sid!r} is busy in this process")
            try:
                if held.depth == 0:
                    held.fd = locks._take(byte, sid, wait, deadline)
            except BaseException:
                held.rlock.release()
                raise
            held.depth += 1
        except BaseException:
            locks._leave(byte, held)
            raise
        self._byte, self._held = byte, held

    def __exit__(self, *exc: object) -> None:
        held = self._held
        try:
            held.depth -= 1
            if held.depth == 0:
                fd, held.fd = held.fd, -1
                self._locks._release(fd, self._byte)
        finally:
            held.rlock.release()
            self._locks._leave(self._byte, held)


class _Keeping:
    """One ``with locks.keeping()``."""

    __slots__ = ("_locks",)

    def __init__(self, locks: Locks) -> None:
        self._locks = locks

    def __enter__(self) -> None:
        with self._locks._guard:
            self._locks._keep += 1

    def __exit__(self, *exc: object) -> None:
        locks = self._locks
        with locks._guard:
            locks._keep -= 1
            locks._close_unkept()


#: Every Locks, so a forked child can drop a descriptor its parent kept.
_KEEPING: weakref.WeakSet[Locks] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for locks in list(_KEEPING):
        locks._forget_kept()


os.register_at_fork(after_in_child=_after_fork_in_child)

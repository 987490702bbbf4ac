"""Per-session locks across threads and processes, on one lock file per store.

Saves, captures and restores of one session exclude each other whether they
come from threads of the daemon, the control socket or a server embedding
the library. Each session owns one byte of ``<store>/lock`` (its id hashed),
locked with an open-file-description lock on a descriptor opened for that
hold: no lock file per session, no lock left behind by a killed process,
nothing kept open for writing between operations (a store can be remounted
read-only), and — the store being ``0700`` — nobody outside the store's
owner can hold one. The daemon's claim on a store ("one daemon per store")
is an ``flock`` on the store directory's own descriptor.

Two sessions may hash to the same byte; they then merely take turns. For
that reason the in-process half of the lock is keyed by byte, not by id.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator

from . import fsutil
from .errors import SessionLocked, StoreError

LOCK_FILE = "lock"
_SESSION_BYTES = 1 << 40
#: How often a bounded wait retries a lock held by another process.
_POLL = 0.005


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

    def __init__(self, store_fd: int) -> None:
        self.store_fd = store_fd
        self._held: dict[int, _Held] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def session(self, sid: str, wait: float | None = None) -> Iterator[None]:
        """Hold session *sid*'s lock; re-entrant within a thread.

        *wait* bounds the wait (seconds; 0: do not wait) and raises
        :class:`SessionLocked` when it runs out: the daemon's worker must never
        stall on a lock another process holds.
        """
        byte = session_byte(sid)
        with self._guard:
            held = self._held.setdefault(byte, _Held())
            held.users += 1
        try:
            deadline = None if wait is None else time.monotonic() + wait
            if not held.rlock.acquire(timeout=-1 if wait is None else wait):
                raise SessionLocked(f"session {sid!r} is busy in this process")
            try:
                if held.depth == 0:
                    held.fd = self._take(byte, sid, deadline)
                held.depth += 1
                try:
                    yield
                finally:
                    held.depth -= 1
                    if held.depth == 0:
                        os.close(held.fd)  # closing the description releases its lock
                        held.fd = -1
            finally:
                held.rlock.release()
        finally:
            with self._guard:
                held.users -= 1
                if held.users == 0:
                    del self._held[byte]

    def _take(self, byte: int, sid: str, deadline: float | None) -> int:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.store_fd)
        try:
            if deadline is None:
                fsutil.range_lock(fd, byte, wait=True)
                return fd
            while not fsutil.range_lock(fd, byte, wait=False):
                if time.monotonic() >= deadline:
                    raise SessionLocked(f"session {sid!r} is locked by another process")
                time.sleep(_POLL)
            return fd
        except BaseException:
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

"""Per-session locks across threads and processes, on one lock file per store.

Saves, captures and restores of one session exclude each other whether they
come from threads of the daemon, the control socket or a server embedding
the library. Each session owns one byte of ``<store>/lock`` (its id hashed),
locked with an open-file-description lock: no lock file per session, no
lock left behind by a killed process, and — the store being ``0700`` —
nobody outside the store's owner can hold one. Byte 0 is the daemon's: one
daemon per store.

Two sessions may hash to the same byte; they then merely take turns. For
that reason the in-process half of the lock is keyed by byte, not by id.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterator

from . import fsutil
from .errors import SessionLocked, StoreError

#: The byte that says "a daemon serves this store".
DAEMON_BYTE = 0
_SESSION_BYTES = 1 << 40
#: How often a bounded wait retries a lock held by another process.
_POLL = 0.005


def session_byte(sid: str) -> int:
    """The byte of the lock file that stands for session *sid*."""
    digest = hashlib.blake2b(sid.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % _SESSION_BYTES


class _Held:
    """The in-process side of one byte: a re-entrant thread lock and how deep it is held."""

    __slots__ = ("depth", "rlock", "users")

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0
        self.users = 0


class Locks:
    """The session locks of one store (``fd``: the store's lock file, open read-write)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
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
                    self._take(byte, sid, deadline)
                held.depth += 1
                try:
                    yield
                finally:
                    held.depth -= 1
                    if held.depth == 0:
                        fsutil.range_unlock(self.fd, byte)
            finally:
                held.rlock.release()
        finally:
            with self._guard:
                held.users -= 1
                if held.users == 0:
                    del self._held[byte]

    def _take(self, byte: int, sid: str, deadline: float | None) -> None:
        if deadline is None:
            fsutil.range_lock(self.fd, byte, wait=True)
            return
        while not fsutil.range_lock(self.fd, byte, wait=False):
            if time.monotonic() >= deadline:
                raise SessionLocked(f"session {sid!r} is locked by another process")
            time.sleep(_POLL)

    def claim_daemon(self) -> None:
        """Say "a daemon serves this store" for as long as :attr:`fd` is open.

        Raises :class:`StoreError` when another daemon already does: two
        daemons on one store would pin, keep and prune behind each other's back.
        """
        if not fsutil.range_lock(self.fd, DAEMON_BYTE, wait=False):
            raise StoreError("another sessionguardd already serves this store")

    def close(self) -> None:
        os.close(self.fd)

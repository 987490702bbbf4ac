"""The backup store: pins, versions, retention and restore.

Every path into the store goes through this module — the library's guarded
save, the daemon's shrink capture and the admin's restore — so its promises
can be checked in one place:

* a **pin** is the last version seen of each session, held *before* the next
  write arrives (a watcher only learns of a write after the old bytes are
  gone);
* a **version** is a kept prior version, named so that an admin with ``ls``
  and ``cp`` can find and restore it without sessionguard;
* versions are content-addressed per session: the same bytes kept twice (by
  the library and by the daemon) are one version;
* every write is tmp + fsync + rename (or link) + directory fsync.

Layout (see also the ``README.txt`` written into every store)::

    <store>/README.txt
    <store>/sessions/<sid>/.lock
    <store>/sessions/<sid>/pin.<seq>.<method>.<count>.<dev>.<ino>.<size>.<mtime_ns>
    <store>/sessions/<sid>/<UTC time>_<N>msgs_<reason>_<source>_<method>_<hash>.version

Only ``fsutil`` (durable I/O) and ``count`` are imported: a server embeds this.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator, Literal

from . import fsutil
from .count import DEFAULT_MAX_BYTES, CountSpec, Parsed, StatKey, parse, stat_key

log = logging.getLogger("sessionguard")

Reason = Literal["shrink", "unparseable", "deleted", "intended", "pre-restore"]
Source = Literal["library", "daemon", "admin"]
PinPolicy = Literal["auto", "copy", "link"]

REASONS: tuple[str, ...] = ("shrink", "unparseable", "deleted", "intended", "pre-restore")
SOURCES: tuple[str, ...] = ("library", "daemon", "admin")
PIN_POLICIES: tuple[str, ...] = ("auto", "copy", "link")

STORE_DIRNAME = ".sessionguard"
_SESSIONS = "sessions"
_LOCK = ".lock"
_VERSION_SUFFIX = ".version"
_TIME_FMT = "%Y%m%dT%H%M%S"
_VERSION_RE = re.compile(
    r"^(?P<time>\d{8}T\d{6})\.(?P<usec>\d{6})Z"
    r"_(?P<count>\d+msgs|unparseable)"
    r"_(?P<reason>shrink|unparseable|deleted|intended|pre-restore)"
    r"_(?P<source>library|daemon|admin)"
    r"_(?P<method>link|reflink|copy)"
    r"_(?P<hash>[0-9a-f]{16})\.version$"
)
_PIN_RE = re.compile(
    r"^pin\.(?P<seq>\d+)\.(?P<method>link|reflink|copy)\.(?P<count>\d+|x)"
    r"\.(?P<dev>\d+)\.(?P<ino>\d+)\.(?P<size>\d+)\.(?P<mtime>\d+)$"
)
#: Stale temporary files of a live process are left alone for this long.
_TMP_GRACE_SECONDS = 3600

_STORE_README = """\
sessionguard backup store
=========================

Each session has a folder sessions/<session id>/ holding:

  <UTC time>_<N>msgs_<reason>_<source>_<method>_<hash>.version
      A kept prior version: the session file exactly as it was, byte for byte.
      reason: shrink | unparseable | deleted | intended | pre-restore
      source: library | daemon | admin      method: link | reflink | copy
  pin.<seq>.<method>.<count>.<dev>.<ino>.<size>.<mtime_ns>
      The last version seen (what the next shrinking write will be compared to).
  .lock
      flock(2) lock serialising saves, captures and restores of this session.

Restore by hand (stop the server first, or at least make sure it is idle):

  cd sessions/<sid>
  ls | tail -n 1                          # newest version
  ls | sort -t_ -k2 -n | tail -n 1        # version with the most messages
  cp --no-preserve=all <version> <session dir>/<sid>.json.restoring
  mv <session dir>/<sid>.json.restoring <session dir>/<sid>.json
"""


class StoreError(Exception):
    """A store operation could not be carried out (the message says why)."""


class VersionNotFound(StoreError, LookupError):
    """No such session, or no version of it matching the given id."""


def validate_sid(sid: str) -> str:
    """Return *sid* if it is safe as a single path component, else raise ``ValueError``.

    Rejected: empty, ``.``/``..``, a leading dot, ``/`` or NUL anywhere, more
    than 255 bytes, and a str with lone surrogates (a file name that is not
    valid UTF-8, as ``os.fsdecode`` returns it): ids travel in JSON and logs,
    which cannot carry it. This is what keeps ids from an untrusted caller (a
    socket client, a URL) from escaping the session directory or the store.
    """
    if not isinstance(sid, str) or not sid:
        raise ValueError("session id must be a non-empty string")
    if "/" in sid or "\0" in sid:
        raise ValueError(f"session id {sid!r} contains '/' or NUL")
    if sid.startswith("."):
        raise ValueError(f"session id {sid!r} starts with a dot")
    try:
        size = len(sid.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("session id must be valid UTF-8") from None
    if size > 255:
        raise ValueError("session id is longer than 255 bytes")
    return sid


def _is_sid(name: str) -> bool:
    """A store folder name that is a valid id (an older version kept some that are not)."""
    try:
        validate_sid(name)
    except ValueError:
        return False
    return True


def is_loss(before: int | None, after: int | None, *, exists: bool = True) -> bool:
    """Does going from *before* to *after* messages lose anything?

    The one rule every writer of versions applies. ``None`` means
    unparseable: an unparseable *before* has nothing countable to lose; an
    unparseable or missing *after* loses a parseable *before*.
    """
    if before is None:
        return False
    if not exists or after is None:
        return True
    return after < before


def loss_reason(after: int | None, *, exists: bool = True) -> Reason:
    """The version reason for a loss: ``deleted``, ``unparseable`` or ``shrink``."""
    if not exists:
        return "deleted"
    return "unparseable" if after is None else "shrink"


def content_hash(data: bytes) -> str:
    """The content id of a version: 64 bits of BLAKE2b, in hex."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass(frozen=True)
class Version:
    """A kept prior version of a session (everything is in its file name)."""

    id: str
    sid: str
    created: float
    count: int | None
    size: int
    reason: str
    source: str
    method: str
    path: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "sid": self.sid,
            "created": datetime.fromtimestamp(self.created, timezone.utc).isoformat(),
            "count": self.count,
            "size": self.size,
            "reason": self.reason,
            "source": self.source,
            "method": self.method,
            "name": self.name,
        }


@dataclass(frozen=True)
class Pin:
    """The last version seen of a session, and the identity of the live file it mirrors."""

    path: str
    seq: int
    method: str
    count: int | None
    key: StatKey


@dataclass(frozen=True)
class Retention:
    """How many versions a session keeps.

    The newest ``keep_last`` versions are always kept. Older ones are thinned
    Syncthing-style — one per 30 s for the first hour, one per hour for the
    first day, one per day for 30 days, one per week after — and dropped past
    ``max_age_days``. ``max_store_bytes`` (0 = no cap) bounds the whole store.
    The newest version and the high-water version (most messages) of a
    session are never removed by any rule.
    """

    keep_last: int = 10
    max_age_days: float = 365.0
    max_store_bytes: int = 0
    #: (age limit in seconds, bucket width in seconds), youngest first.
    intervals: tuple[tuple[float, float], ...] = (
        (3600.0, 30.0),
        (86400.0, 3600.0),
        (30 * 86400.0, 86400.0),
        (float("inf"), 7 * 86400.0),
    )


@dataclass
class RestoreResult:
    """What a restore did (or, with ``dry_run``, would do)."""

    sid: str
    restored: Version
    pre_restore: Version | None
    live_count: int | None
    dry_run: bool = False
    unchanged: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "sid": self.sid,
            "restored": self.restored.to_dict(),
            "pre_restore": self.pre_restore.to_dict() if self.pre_restore else None,
            "live_count_before": self.live_count,
            "dry_run": self.dry_run,
            "unchanged": self.unchanged,
        }


@dataclass
class PruneReport:
    removed: list[Version] = field(default_factory=list)
    bytes_freed: int = 0


class _SessionLock:
    """Re-entrant per-session lock: a thread lock plus ``flock`` on ``.lock``.

    ``flock`` locks belong to an open file description, so the same process
    taking it twice through two descriptors would deadlock; the depth count
    makes nested use (a restore that keeps a pre-restore version) safe.
    ``users`` counts the threads holding or waiting for it, so the store can
    forget it when nobody does (a daemon sees every session ever written).
    """

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd = -1
        self.users = 0


class Store:
    """One backup store (by default ``<session dir>/.sessionguard``)."""

    def __init__(self, root: str | os.PathLike[str], *, retention: Retention | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.retention = retention or Retention()
        self.max_bytes = max_bytes
        self._locks: dict[str, _SessionLock] = {}
        self._locks_guard = threading.Lock()
        self._ensure_dir(self.root)
        self._ensure_dir(os.path.join(self.root, _SESSIONS))
        readme = os.path.join(self.root, "README.txt")
        if not os.path.lexists(readme):
            fsutil.atomic_write(readme, _STORE_README.encode(), mode=0o644)

    # -- paths ---------------------------------------------------------------

    @staticmethod
    def _ensure_dir(path: str) -> None:
        try:
            os.mkdir(path, 0o770)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{path} exists and is not a directory (a symlink is refused)")

    def session_dir(self, sid: str, *, create: bool = False) -> str:
        path = os.path.join(self.root, _SESSIONS, validate_sid(sid))
        if create:
            self._ensure_dir(path)
        return path

    def sessions(self) -> list[str]:
        """Every session id that has a folder in the store."""
        try:
            with os.scandir(os.path.join(self.root, _SESSIONS)) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False) and _is_sid(e.name))
        except FileNotFoundError:
            return []

    # -- locking -------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, sid: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the session's lock across threads and processes.

        *timeout* (seconds) bounds the wait for another process's lock; the
        daemon uses it so one stuck peer cannot stall every other session.
        """
        with self._locks_guard:
            lk = self._locks.setdefault(sid, _SessionLock())
            lk.users += 1
        try:
            if not lk.rlock.acquire(timeout=-1 if timeout is None else timeout):
                raise StoreError(f"timed out waiting for the lock of session {sid!r}")
            try:
                if lk.depth == 0:
                    lk.fd = self._flock(sid, timeout)
                lk.depth += 1
                try:
                    yield
                finally:
                    lk.depth -= 1
                    if lk.depth == 0:
                        os.close(lk.fd)  # closing the description releases the flock
                        lk.fd = -1
            finally:
                lk.rlock.release()
        finally:
            with self._locks_guard:
                lk.users -= 1
                if lk.users == 0:
                    del self._locks[sid]

    def _flock(self, sid: str, timeout: float | None) -> int:
        path = os.path.join(self.session_dir(sid, create=True), _LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
        try:
            if timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                return fd
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreError(f"session {sid!r} is locked by another process") from None
                    time.sleep(0.01)
        except BaseException:
            os.close(fd)
            raise

    # -- pins ----------------------------------------------------------------

    def pin(self, sid: str, *, tidy: bool = False) -> Pin | None:
        """The session's pin, or None. With *tidy* (caller holds the lock),
        pins left over by a crash between creating a new pin and removing the
        old one are removed: the newest is the truth."""
        pins: list[Pin] = []
        try:
            with os.scandir(self.session_dir(sid)) as it:
                for entry in it:
                    m = _PIN_RE.match(entry.name)
                    if m:
                        pins.append(_pin_from_match(entry.path, m))
        except FileNotFoundError:
            return None
        if not pins:
            return None
        pins.sort(key=lambda p: p.seq)
        if tidy:
            for stale in pins[:-1]:
                fsutil.unlink_quietly(stale.path)
        return pins[-1]

    def set_pin(self, sid: str, old: Pin | None, fd: int, src_path: str, st: os.stat_result, count: int | None, *,
                policy: PinPolicy = "auto", durable: bool = True, synced: bool = False) -> Pin:
        """Make the open live file *fd* (at *src_path*, with stat *st*) the session's pin.

        *old* is the current pin as the caller read it (``pin(sid, tidy=True)``)
        under the lock it still holds, which also made the session's folder:
        passing it saves a second directory scan on every save.

        ``link`` shares the inode (zero-copy; only safe for rename-only
        writers and for the library, which replaces by rename itself);
        ``auto`` reflinks where the filesystem can and copies otherwise;
        ``copy`` always copies. A link across filesystems falls back to
        ``auto``. Caller holds the lock.

        ``durable=False`` skips the directory fsync: only for a pin whose
        loss in a crash is harmless — the old pin name then survives, still
        holding the previous version, which the next comparison treats as
        the prior state. ``synced=True`` says *fd* was just fsynced.
        """
        sdir = self.session_dir(sid)
        seq = _next_seq(old)
        key = stat_key(st)

        def name(method: str) -> str:
            return _pin_path(sdir, seq, method, count, key)

        method: str
        if policy == "link":
            try:
                fsutil.link_fd(fd, src_path, name("link"), sync_dir=False, synced=synced)
                method = "link"
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOENT):
                    raise
                policy = "auto"
        if policy != "link":
            method, _ = fsutil.atomic_clone(fd, name, allow_reflink=policy == "auto", sync_dir=False)
        return self._replace_pin(old, Pin(name(method), seq, method, count, key), durable=durable)

    def set_pin_to_path(self, sid: str, src: str, live_st: os.stat_result, count: int | None,
                        method: str) -> Pin:
        """Pin the store file *src* (e.g. a version just restored) for the live
        file whose stat is *live_st*: a hard link inside the store, no copy."""
        sdir = self.session_dir(sid, create=True)
        old = self.pin(sid, tidy=True)
        seq = _next_seq(old)
        key = stat_key(live_st)
        new = Pin(_pin_path(sdir, seq, method, count, key), seq, method, count, key)
        os.link(src, new.path)
        return self._replace_pin(old, new, durable=True)

    @staticmethod
    def _replace_pin(old: Pin | None, new: Pin, *, durable: bool) -> Pin:
        """The new pin exists: remove the old name (one directory fsync covers both)."""
        if old is not None:
            fsutil.unlink_quietly(old.path)
        if durable:
            fsutil.fsync_dir(os.path.dirname(new.path))
        return new

    def drop_pin(self, sid: str) -> None:
        """Forget the pin (the session was deleted and its pin kept as a version)."""
        pin = self.pin(sid, tidy=True)
        if pin is not None:
            fsutil.unlink_quietly(pin.path)
            fsutil.fsync_dir(os.path.dirname(pin.path))

    def read_pin(self, pin: Pin, spec: CountSpec) -> Parsed:
        """Parse the pin's content (for classification and intent keys)."""
        data, _ = fsutil.read_regular(pin.path, self.max_bytes)
        return parse(data, spec)

    def overtaken(self, pin: Pin, new: Parsed, spec: CountSpec) -> bool:
        """Did writes nobody saw drop some of the pin's messages, even if more
        were added after (a shrink undone before anyone looked, e.g. while the
        daemon was down)? True when *new* does not start with the pin's
        messages. Costs a read of the pin: only for writes not seen one by one.
        """
        if not pin.count or not new.ok or new.messages is None:
            return False
        try:
            old = self.read_pin(pin, spec)
        except OSError:
            return False
        if old.messages is None:
            return False
        try:
            return list(new.messages[: len(old.messages)]) != list(old.messages)
        except RecursionError:
            return True  # too deep to compare: keeping a version is the safe answer

    # -- versions ------------------------------------------------------------

    def versions(self, sid: str) -> list[Version]:
        """The session's kept versions, oldest first."""
        out: list[Version] = []
        try:
            with os.scandir(self.session_dir(sid)) as it:
                for entry in it:
                    m = _VERSION_RE.match(entry.name)
                    if m:
                        try:
                            size = entry.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            continue  # pruned meanwhile
                        out.append(_version_from_match(sid, entry.path, m, size))
        except FileNotFoundError:
            return []
        out.sort(key=lambda v: (v.created, v.name))
        return out

    def _existing(self, sid: str, digest: str) -> Version | None:
        for v in self.versions(sid):
            if v.id == digest:
                return v
        return None

    def keep_pin(self, sid: str, reason: Reason, source: Source) -> Version | None:
        """Turn the session's pin into a durable version (zero-copy: a hard
        link to the pin's inode). Returns the existing version when the same
        bytes were already kept. Caller holds the lock.

        A hard-link pin shares the live file's inode: a writer that rewrote
        that file in place rewrote the pin too. Then the pinned version is
        gone, and keeping those bytes under the pin's message count would be a
        lie that start-up recovery would "restore": None is returned and the
        loss is logged (``pin.overwritten``) instead.
        """
        pin = self.pin(sid, tidy=True)
        if pin is None:
            return None
        fd, st = fsutil.open_regular(pin.path)
        try:
            if st.st_ino == pin.key[1] and (st.st_size, st.st_mtime_ns) != pin.key[2:]:
                log.error("pin.overwritten sid=%s count=%s: the pinned file was rewritten in place through "
                          "its other name; that version is lost (use copy or reflink pins for in-place writers)",
                          sid, pin.count, extra={"sg_event": "pin.overwritten", "sid": sid})
                return None
            return self._keep(sid, fd, pin.path, st, pin.count, reason, source, pin.method, link=True)
        finally:
            os.close(fd)

    def keep_fd(self, sid: str, fd: int, src_path: str, st: os.stat_result, count: int | None,
                reason: Reason, source: Source, *, link: bool) -> Version:
        """Keep the open file *fd* (at *src_path*) as a version.

        *link* is only safe when the caller is about to replace that file by
        rename (its inode then belongs to the version alone); otherwise the
        bytes are reflinked or copied. Caller holds the lock.
        """
        return self._keep(sid, fd, src_path, st, count, reason, source, "link", link=link)

    def _keep(self, sid: str, fd: int, src_path: str, st: os.stat_result, count: int | None,
              reason: str, source: str, method: str, *, link: bool) -> Version:
        if reason not in REASONS or source not in SOURCES:
            raise ValueError(f"bad reason/source {reason!r}/{source!r}")
        data = fsutil.read_fd(fd, st, self.max_bytes)
        digest = content_hash(data)
        existing = self._existing(sid, digest)
        if existing is not None:
            return existing
        sdir = self.session_dir(sid, create=True)
        now = time.time()
        stamp = datetime.fromtimestamp(now, timezone.utc)

        def name(m: str) -> str:
            count_s = "unparseable" if count is None else f"{count}msgs"
            return os.path.join(
                sdir,
                f"{stamp.strftime(_TIME_FMT)}.{stamp.microsecond:06d}Z_{count_s}_{reason}_{source}_{m}_{digest}{_VERSION_SUFFIX}",
            )

        if link:
            try:
                fsutil.link_fd(fd, src_path, name(method), sync_dir=True)
                return self._version_at(sid, name(method), st.st_size)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOENT):
                    raise
        used, _ = fsutil.atomic_clone(fd, name, sync_dir=True)
        return self._version_at(sid, name(used), st.st_size)

    @staticmethod
    def _version_at(sid: str, path: str, size: int) -> Version:
        m = _VERSION_RE.match(os.path.basename(path))
        assert m is not None
        return _version_from_match(sid, path, m, size)

    def find(self, sid: str, version_id: str | None = None) -> Version:
        """A version by id (a unique prefix of its hash, or its file name);
        ``None`` picks the best: most messages, then newest."""
        versions = self.versions(sid)
        if version_id is None:
            parseable = [v for v in versions if v.count is not None]
            if not parseable:
                raise VersionNotFound(f"session {sid!r} has no restorable version")
            return max(parseable, key=lambda v: (v.count, v.created))
        if not isinstance(version_id, str) or not version_id:
            raise ValueError("version id must be a non-empty string")
        hits = [v for v in versions if v.name == version_id or v.id.startswith(version_id)]
        if not hits:
            raise VersionNotFound(f"session {sid!r} has no version {version_id!r}")
        if len(hits) > 1:
            raise VersionNotFound(f"version id {version_id!r} is ambiguous for session {sid!r}")
        return hits[0]

    def read_version(self, version: Version) -> bytes:
        data, _ = fsutil.read_regular(version.path, self.max_bytes)
        return data

    # -- restore -------------------------------------------------------------

    def restore(self, sid: str, live_path: str, version_id: str | None = None, *,
                spec: CountSpec, source: Source, dry_run: bool = False,
                lock_timeout: float | None = None) -> RestoreResult:
        """Atomically put a version back as the live file, under the session lock.

        The current live file is first kept as a ``pre-restore`` version, so
        every restore can be undone by restoring that version. The restored
        file is an independent copy (never a hard link to the store) with the
        replaced file's mode and owner.
        """
        with self.lock(sid, lock_timeout):
            version = self.find(sid, version_id)
            live_fd: int | None = None
            live_st: os.stat_result | None = None
            live_count: int | None = None
            live_hash: str | None = None
            try:
                try:
                    live_fd, live_st = fsutil.open_regular(live_path)
                except FileNotFoundError:
                    pass
                if live_fd is not None and live_st is not None:
                    data = fsutil.read_fd(live_fd, live_st, self.max_bytes, live_path)
                    live_count = parse(data, spec).count
                    live_hash = content_hash(data)
                if live_hash == version.id:
                    return RestoreResult(sid, version, None, live_count, dry_run, unchanged=True)
                if dry_run:
                    return RestoreResult(sid, version, None, live_count, dry_run=True)
                pre: Version | None = None
                if live_fd is not None and live_st is not None:
                    # We replace the live file by rename below, so its inode can
                    # become the pre-restore version with no copy.
                    pre = self.keep_fd(sid, live_fd, live_path, live_st, live_count, "pre-restore", source,
                                       link=True)
            finally:
                if live_fd is not None:
                    os.close(live_fd)
            vfd, _ = fsutil.open_regular(version.path)
            try:
                _, new_st = fsutil.atomic_clone(vfd, live_path, like=live_st)
            finally:
                os.close(vfd)
            self.set_pin_to_path(sid, version.path, new_st, version.count, version.method)
            return RestoreResult(sid, version, pre, live_count)

    # -- retention -----------------------------------------------------------

    def protected(self, versions: list[Version]) -> set[str]:
        """Paths no retention rule may remove: the newest and the high-water version."""
        if not versions:
            return set()
        newest = max(versions, key=lambda v: (v.created, v.name))
        counted = [v for v in versions if v.count is not None]
        keep = {newest.path}
        if counted:
            keep.add(max(counted, key=lambda v: (v.count, v.created)).path)
        return keep

    def apply_retention(self, sid: str, now: float | None = None) -> list[Version]:
        """Thin one session's versions (keep_last, staggered, max age). Caller holds the lock."""
        r = self.retention
        now = time.time() if now is None else now
        versions = self.versions(sid)
        keep = self.protected(versions)
        newest_first = sorted(versions, key=lambda v: (v.created, v.name), reverse=True)
        keep.update(v.path for v in newest_first[: r.keep_last])
        seen_buckets: set[tuple[int, int]] = set()
        removed: list[Version] = []
        for v in newest_first:
            age = max(now - v.created, 0.0)
            bucket: tuple[int, int] | None = None
            if age <= r.max_age_days * 86400:
                for i, (limit, width) in enumerate(r.intervals):
                    if age < limit:
                        bucket = (i, int(age // width))
                        break
            if v.path in keep:
                if bucket is not None:
                    seen_buckets.add(bucket)
                continue
            if bucket is not None and bucket not in seen_buckets:
                seen_buckets.add(bucket)  # the newest version of each bucket stays
                continue
            fsutil.unlink_quietly(v.path)
            removed.append(v)
        if removed:
            fsutil.fsync_dir(self.session_dir(sid))
        return removed

    def prune(self, now: float | None = None, lock_timeout: float | None = 10.0) -> PruneReport:
        """Apply retention to every session, then the store's byte cap."""
        report = PruneReport()
        for sid in self.sessions():
            with self.lock(sid, lock_timeout):
                for v in self.apply_retention(sid, now):
                    report.removed.append(v)
                    report.bytes_freed += v.size
        cap = self.retention.max_store_bytes
        if cap > 0:
            self._enforce_cap(cap, report, lock_timeout)
        return report

    def _enforce_cap(self, cap: int, report: PruneReport, lock_timeout: float | None) -> None:
        candidates: list[Version] = []
        for sid in self.sessions():
            versions = self.versions(sid)
            keep = self.protected(versions)
            candidates.extend(v for v in versions if v.path not in keep)
        total = self.usage()[1]
        for v in sorted(candidates, key=lambda v: v.created):
            if total <= cap:
                break
            with self.lock(v.sid, lock_timeout):
                fsutil.unlink_quietly(v.path)
                fsutil.fsync_dir(os.path.dirname(v.path))
            total -= v.size
            report.removed.append(v)
            report.bytes_freed += v.size

    def usage(self) -> tuple[int, int]:
        """(number of versions, bytes held by versions and pins, each inode once)."""
        seen: set[tuple[int, int]] = set()
        versions = 0
        total = 0
        for sid in self.sessions():
            try:
                with os.scandir(self.session_dir(sid)) as it:
                    for entry in it:
                        is_version = _VERSION_RE.match(entry.name) is not None
                        if not (is_version or _PIN_RE.match(entry.name)):
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        versions += is_version
                        if (st.st_dev, st.st_ino) not in seen:
                            seen.add((st.st_dev, st.st_ino))
                            total += st.st_size
            except FileNotFoundError:
                continue
        return versions, total

    # -- crash leftovers -----------------------------------------------------

    def sweep_tmp(self, directory: str | None = None) -> int:
        """Remove temporary files left by a crashed writer of ours.

        Scans *directory* (default: every session folder of the store). A
        tmp file whose owning pid still runs is left alone unless it is over
        an hour old. Returns the number removed.
        """
        dirs = [directory] if directory else [self.session_dir(s) for s in self.sessions()] + [self.root]
        removed = 0
        now = time.time()
        for d in dirs:
            try:
                with os.scandir(d) as it:
                    for entry in it:
                        pid = fsutil.tmp_owner_pid(entry.name)
                        if pid is None or not entry.is_file(follow_symlinks=False):
                            continue
                        if _alive(pid) and now - entry.stat(follow_symlinks=False).st_mtime < _TMP_GRACE_SECONDS:
                            continue
                        fsutil.unlink_quietly(entry.path)
                        removed += 1
            except FileNotFoundError:
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


def _next_seq(old: Pin | None) -> int:
    """A pin sequence number above the old one (the newest pin is the truth after a crash)."""
    return max(time.time_ns(), old.seq + 1 if old else 0)


def _pin_path(sdir: str, seq: int, method: str, count: int | None, key: StatKey) -> str:
    """The pin's file name: everything needed to compare without reading (see _PIN_RE)."""
    count_s = "x" if count is None else str(count)
    return os.path.join(sdir, f"pin.{seq}.{method}.{count_s}.{key[0]}.{key[1]}.{key[2]}.{key[3]}")


def _pin_from_match(path: str, m: re.Match[str]) -> Pin:
    count = None if m["count"] == "x" else int(m["count"])
    key = (int(m["dev"]), int(m["ino"]), int(m["size"]), int(m["mtime"]))
    return Pin(path, int(m["seq"]), m["method"], count, key)


def _version_from_match(sid: str, path: str, m: re.Match[str], size: int) -> Version:
    created = datetime.strptime(m["time"], _TIME_FMT).replace(tzinfo=timezone.utc).timestamp()
    created += int(m["usec"]) / 1e6
    count = None if m["count"] == "unparseable" else int(m["count"][:-4])
    return Version(m["hash"], sid, created, count, size, m["reason"], m["source"], m["method"], path)

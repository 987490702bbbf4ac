"""Versions: kept prior versions, one folder per session that has any, ``<store>/sessions/<sid>/``.

A version is the session file byte for byte, named
``<UTC time>_<N>msgs_<reason>_<source>_<method>_<hash>.version`` (see
:mod:`sessionguard.naming`) so an admin with ``ls`` and ``cp`` can restore
it with the daemon dead. Every name is made from the bytes actually read
and hashed: a version never claims a count or hash it does not hold.
Versions are content-addressed per session: the same bytes kept twice (by
the library and by the daemon) are one version. A session's folder exists
only while it has versions.

Every version is durable before its name is returned: file ``fsync``,
``rename`` or ``link``, folder ``fsync``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator

from . import fsutil
from .errors import StoreError, UnsafeSessionFile
from .fsutil import Owner
from .naming import Method, Reason, Source, Version, is_sid, parse_version_name, version_name

SESSIONS_DIR = "sessions"


USAGE_FILE = "usage"
#: The byte of ``<store>/lock`` that serialises updates of the usage tally.
USAGE_BYTE = (1 << 41) + 2


class Usage:
    """The store's running tally of versions and their bytes, in ``<store>/usage``.

    Shared by every process using the store (the daemon and a server that
    embeds the library), updated under a lock after each kept or removed
    version, so the byte cap is enforced from the truth without walking the
    store. The record has a fixed width and is rewritten in place: an update
    never needs a free block, so it cannot fail on a full disk, which is
    exactly when a version must still be kept. A missing or unreadable
    record is made again by one walk.
    """

    _WIDTH = 19

    def __init__(self, store_fd: int, owner: Owner, walk: Callable[[], tuple[int, int]]) -> None:
        self._store_fd, self._owner, self._walk = store_fd, owner, walk
        if self._read() is None:
            with self._locked():
                if self._read() is None:
                    self._create(*walk())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._store_fd)
        try:
            fsutil.range_lock(fd, USAGE_BYTE, wait=True)
            yield
        finally:
            os.close(fd)

    def _record(self, count: int, size: int) -> bytes:
        return f"{max(count, 0):>{self._WIDTH}} {max(size, 0):>{self._WIDTH}}\n".encode()

    def _read(self) -> tuple[int, int] | None:
        try:
            data, _ = fsutil.read_regular(USAGE_FILE, 4096, dir_fd=self._store_fd)
        except OSError:
            return None
        parts = data.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return None
        return int(parts[0]), int(parts[1])

    def _create(self, count: int, size: int) -> None:
        try:
            fsutil.write_file(self._store_fd, USAGE_FILE, self._record(count, size), owner=self._owner,
                              durable=False)
        except OSError:
            pass  # a full or read-only store: the next reader walks again

    def get(self) -> tuple[int, int]:
        return self._read() or self._walk()

    def add(self, count: int, size: int) -> None:
        with self._locked():
            now = self._read()
            if now is None:
                self._create(*self._walk())
                return
            try:
                fd = os.open(USAGE_FILE, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._store_fd)
            except OSError:
                return
            try:
                os.pwrite(fd, self._record(now[0] + count, now[1] + size), 0)
            except OSError:
                fsutil.unlink_quietly(self._store_fd, USAGE_FILE)  # stale now: walked again next time
            finally:
                os.close(fd)


def content_hash(data: bytes) -> str:
    """The content id of a version: 64 bits of BLAKE2b, in hex."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class Versions:
    """The ``sessions/`` folder of one store, and a running tally of what it holds."""

    def __init__(self, dir_fd: int, owner: Owner, store_fd: int) -> None:
        self.fd = dir_fd
        self._owner = owner
        self._uid = owner[0] if owner is not None else os.geteuid()
        self._usage = Usage(store_fd, owner, self._walk_tally)

    @property
    def count(self) -> int:
        """Versions in the store now (every process's: the tally is shared)."""
        return self._usage.get()[0]

    @property
    def total_bytes(self) -> int:
        """Bytes held by versions now."""
        return self._usage.get()[1]

    # -- folders --------------------------------------------------------------------

    def _check(self, st: os.stat_result, sid: str) -> None:
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != self._uid:
            raise UnsafeSessionFile(errno.EPERM, f"store folder of {sid!r} is not ours (uid {st.st_uid}): refused",
                                    sid)

    def folder(self, sid: str, *, create: bool = False) -> int | None:
        """An open descriptor of *sid*'s folder (the caller closes it), or None.

        A folder that is a symlink, or not owned by the store's owner, is refused.
        """
        if create:
            try:
                os.mkdir(sid, 0o700, dir_fd=self.fd)
            except FileExistsError:
                pass
            else:
                fd = fsutil.open_dir(sid, at=self.fd)
                self._chown(fd)
                fsutil.fsync_dir(self.fd)
                return fd
        try:
            fd = fsutil.open_dir(sid, at=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeSessionFile(exc.errno, "store folder is not a directory: refused", sid) from None
            raise
        try:
            self._check(os.fstat(fd), sid)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _chown(self, fd: int) -> None:
        os.fchmod(fd, 0o700)
        if self._owner is not None and self._owner != (os.geteuid(), os.getegid()):
            os.fchown(fd, *self._owner)

    def sids(self) -> list[str]:
        """Every session that has a version folder."""
        with os.scandir(self.fd) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False) and is_sid(e.name))

    def of(self, sid: str) -> list[Version]:
        """The session's versions, oldest first."""
        fd = self.folder(sid)
        if fd is None:
            return []
        try:
            return self._list_fd(sid, fd)
        finally:
            os.close(fd)

    @staticmethod
    def _list_fd(sid: str, fd: int) -> list[Version]:
        out: list[Version] = []
        with os.scandir(fd) as it:
            for entry in it:
                if not entry.name.endswith(".version"):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile
                if stat.S_ISREG(st.st_mode):
                    v = parse_version_name(sid, entry.name, st.st_size)
                    if v is not None:
                        out.append(v)
        out.sort(key=lambda v: (v.created, v.name))
        return out

    def _walk_tally(self) -> tuple[int, int]:
        count = total = 0
        for sid in self.sids():
            try:
                for v in self.of(sid):
                    count += 1
                    total += v.size
            except OSError:
                continue
        return count, total

    def _add(self, n: int, size: int) -> None:
        self._usage.add(n, size)

    # -- keeping and removing -------------------------------------------------------------

    def keep(self, sid: str, data: bytes, *, count: int | None, reason: Reason, source: Source, method: Method,
             link_from: tuple[int, str, int] | None = None) -> tuple[Version, bool]:
        """Keep *data* as a version of *sid*: ``(version, new)``.

        The same bytes are stored once: when the session's *newest* version
        already holds them (the same loss kept twice — by the library and the
        daemon, or a retry), that version is returned with ``new`` False. When
        an *older* one holds them, this is a new event (a restored conversation
        wiped again, an intended clear of restored content): it gets its own
        name — the history must show it — as a hard link to the bytes already
        kept.

        *link_from* ``(dir_fd, name, fd)`` names the file *data* was read from:
        the version is then a hard link to it, no bytes written — checked by
        hashing what the new name holds, so a writer that changed the file in
        between cannot give the version bytes its name does not claim.
        """
        digest = content_hash(data)
        fd = self.folder(sid, create=True)
        assert fd is not None
        try:
            held = self._list_fd(sid, fd)
            same = [v for v in held if v.id == digest]
            if same and same[-1] is held[-1]:
                return same[-1], False
            name = version_name(time.time(), count, reason=reason, source=source,
                                method=method if link_from else "copy", digest=digest)
            linked = bool(same) and self._link_version(fd, same[-1].name, name, digest)
            if linked or (link_from is not None and self._link(link_from, fd, name, digest)):
                fsutil.fsync_dir(fd)
            else:
                name = version_name(time.time(), count, reason=reason, source=source, method="copy", digest=digest)
                fsutil.write_file(fd, name, data, owner=self._owner)
            v = parse_version_name(sid, name, len(data))
            assert v is not None
            self._add(1, len(data))
            return v, True
        finally:
            os.close(fd)

    def _link_version(self, fd: int, existing: str, name: str, digest: str) -> bool:
        """A new name for bytes this folder already holds (checked like any link)."""
        try:
            vfd, _ = fsutil.open_regular(existing, dir_fd=fd)
        except OSError:
            return False
        try:
            return self._link((fd, existing, vfd), fd, name, digest)
        finally:
            os.close(vfd)

    @staticmethod
    def _link(src: tuple[int, str, int], dst_fd: int, name: str, digest: str) -> bool:
        dir_fd, src_name, src_fd = src
        os.fsync(src_fd)  # the version is durable once its name is
        try:
            fsutil.link_file(dir_fd, src_name, os.fstat(src_fd), dst_fd, name)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.ENOENT, errno.EMLINK):
                return False
            raise
        try:
            held, _ = fsutil.read_regular(name, 1 << 62, dir_fd=dst_fd)
        except OSError:
            held = b""
        if content_hash(held) != digest:
            fsutil.unlink_quietly(dst_fd, name)
            return False
        return True

    def remove(self, sid: str, doomed: list[Version]) -> int:
        """Remove versions of *sid*; the folder goes with its last version. Returns bytes freed."""
        fd = self.folder(sid)
        if fd is None:
            return 0
        freed = removed = 0
        try:
            for v in doomed:
                if fsutil.unlink_quietly(fd, v.name):
                    freed += v.size
                    removed += 1
            fsutil.fsync_dir(fd)
            with os.scandir(fd) as it:
                empty = next(it, None) is None
        finally:
            os.close(fd)
        if empty:
            try:
                os.rmdir(sid, dir_fd=self.fd)
                fsutil.fsync_dir(self.fd)
            except OSError:
                pass  # a version arrived meanwhile
        self._add(-removed, -freed)
        return freed

    def open(self, v: Version) -> tuple[int, os.stat_result]:
        fd = self.folder(v.sid)
        if fd is None:
            raise StoreError(f"the versions of {v.sid!r} are gone")
        try:
            return fsutil.open_regular(v.name, dir_fd=fd)
        finally:
            os.close(fd)

    def read(self, v: Version, max_bytes: int) -> bytes:
        fd, st = self.open(v)
        try:
            return fsutil.read_fd(fd, st, max_bytes, v.name)
        finally:
            os.close(fd)

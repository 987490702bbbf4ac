"""Pins: the last version seen of every session, one file per session in ``<store>/pins/``.

A watcher learns of a write only after the old bytes are gone, so
everything rests on the pin, held *before* the next write arrives. The
layout is flat — ``pins/<sid>``, no folder or lock file per session — so a
first start over a million sessions creates one inode each, and the name is
the id itself, so the library finds a session's pin with one ``fstatat``.

A pin's name claims nothing about its content: its count and hash are
always taken from the bytes when they matter (when the pin becomes a
version), never from a name or a cache. That is why pins are written
without ``fsync``: a pin torn by a power cut is only a worse prior state,
compared like any other (a torn JSON pin is unparseable and has nothing to
lose), and the store fsyncs a pin before it becomes a version. Pins are
replaced by ``rename`` so a reader never sees half of one; a session's first
pin at a first start is written with no name (``O_TMPFILE``) and linked
under its id once whole, so a kill leaves no file at all.

The daemon keeps a *spare* inode for each session it wrote lately: the pin
before the last one, under a tmp name of its own (``.<sid>.tmp-sg-<pid>-spare``).
The next pin is written over the spare and swapped in (``RENAME_EXCHANGE``),
so the old pin becomes the spare: no inode or page cache is allocated and
freed per write (on ext4 without a journal, every new inode scans past the
ones freed in the last minute; see BENCHMARKS.md). A spare is only ever
written while nothing names it as a pin, so a kill at any step leaves the
pin whole (a power cut can tear a pin written in place as it can a new one:
a worse prior state, as above); an inode that anything else also holds (a version linked from a
pin, a link pin's live file) is never reused. Spares are bounded (count and
bytes, least recently used dropped), dropped with their pin, at a clean stop,
and swept like any tmp file of a dead process.

With ``pin = "zstd"`` a pin holds the session compressed (a zstd frame,
recognised by its magic number; a JSON or JSONL session never starts with
it): a store on a filesystem without reflinks then costs a fraction of the
sessions' size instead of all of it. :func:`plain` gives back the session's
bytes; versions are always kept plain, so ``cp`` restores any of them.

A pin's mtime is the session's *birth*: the time the daemon first saw it,
carried from pin to pin (a hard-link pin shares the live file's mtime
instead). The store's byte cap uses it to tell a name that lived seconds
from a conversation that lived weeks.

The daemon also keeps ``pins.cache`` (:mod:`.hint`): what it knew of every
pin at its last clean stop, for a fast restart.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
from collections.abc import Iterator
from typing import Any

from . import fsutil
from .fsutil import Owner
from .hint import CACHE_FILE, CacheEntry, RestartHint, decode, encode
from .naming import is_sid
from .spares import Spares

PINS_DIR = "pins"
#: A pin's new file (a tmp name, or a spare): never an existing name, never through a symlink.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: A new session's first pin: a file with no name until it is whole (see :meth:`Pins.write`).
_NAMELESS = os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC
#: A store that cannot take a write, whichever way it is made.
_STORE_FAILED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
#: The first four bytes of every zstd frame (RFC 8878).
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd_available() -> bool:
    """Is the optional ``zstandard`` package here (``pin = "zstd"`` needs it)?"""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def compressed(data: bytes) -> bool:
    return data[:4] == ZSTD_MAGIC


def plain(data: bytes, max_bytes: int) -> bytes:
    """The session's bytes held by a pin: as they are, or decompressed (never more than
    *max_bytes*: a pin is not allowed to unfold into more than a session may be)."""
    if not compressed(data):
        return data
    import zstandard

    with zstandard.ZstdDecompressor().stream_reader(data) as reader:
        out = reader.read(max_bytes + 1)
    if len(out) > max_bytes:
        raise ValueError(f"a compressed pin unfolds to more than {max_bytes} bytes")
    return out


def compress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


class Pins:
    """The ``pins/`` folder of one store (``dir_fd`` is owned by the caller's :class:`Store`)."""

    def __init__(self, dir_fd: int, store_fd: int, owner: Owner) -> None:
        self.fd = dir_fd
        self._store_fd = store_fd
        self._owner = owner
        self.spares = Spares()
        #: Whose inodes may be reused as spares: the store's owner, or ours where chown is refused.
        self._own_uids = {os.geteuid()} | ({owner[0]} if owner is not None else set())
        #: Can a nameless file be given its name (``linkat`` of ``/proc/self/fd/N``)?
        self._nameless = os.path.isdir("/proc/self/fd")

    def stat(self, sid: str) -> os.stat_result | None:
        return fsutil.lstat_at(self.fd, sid)

    def open(self, sid: str) -> tuple[int, os.stat_result] | None:
        """The pin's descriptor and stat, or None when the session has no pin."""
        try:
            return fsutil.open_regular(sid, dir_fd=self.fd)
        except FileNotFoundError:
            return None

    def _birth(self, sid: str) -> int | None:
        old = self.stat(sid)
        return old.st_mtime_ns if old is not None else None

    def write(self, sid: str, data: bytes, *, fresh: bool = False, spare: bool = False) -> os.stat_result:
        """Pin *data* (the bytes just read from the live file, or compressed: see
        :func:`compress`): a copy pin.

        *fresh*: the caller knows the session has no pin (a first scan listed the
        folder): no lookup for one, and ``FileExistsError`` if one appeared since.
        *spare*: write over this session's spare inode, if there is one to reuse
        (the daemon, which alone keeps spares)."""
        old = None if fresh else self.stat(sid)
        if fresh:
            st = self._write_nameless(sid, data)
            if st is not None:
                return st
        elif spare and old is not None:
            st = self._write_spare(sid, data, old)
            if st is not None:
                return st
        tmp = fsutil.tmp_name(sid)
        fd = os.open(tmp, _CREATE, 0o600, dir_fd=self.fd)
        try:
            try:
                fsutil.write_all(fd, data)
                st = self._own(fd, old.st_mtime_ns if old is not None else None)
            finally:
                os.close(fd)
            self._replace(tmp, sid, old is not None, fresh)
        except BaseException:
            fsutil.unlink_quietly(self.fd, tmp)
            raise
        return st

    def _write_nameless(self, sid: str, data: bytes) -> os.stat_result | None:
        """Pin *data* as a file with no name (``O_TMPFILE``) until it is whole, then link
        it as *sid* (``FileExistsError`` if a pin appeared since): one directory entry
        per pin, not a random tmp name made and renamed (a first start over 100,000
        sessions: 6.3 s → 5.4 s), and a kill leaves no file. None where that cannot
        be done (no ``O_TMPFILE`` here, no ``/proc``): the caller writes a tmp file."""
        if not self._nameless:
            return None
        try:
            fd = os.open(".", _NAMELESS, 0o600, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            self._nameless = False
            return None
        try:
            fsutil.write_all(fd, data)
            st = self._own(fd, None)
            # our own descriptor's /proc link (AT_SYMLINK_FOLLOW): no name in a watched directory
            os.link(f"/proc/self/fd/{fd}", sid, dst_dir_fd=self.fd)
        except OSError as exc:
            if isinstance(exc, FileExistsError) or exc.errno in _STORE_FAILED:
                raise
            self._nameless = False  # a /proc or a policy that will not name it: tmp files from now on
            return None
        finally:
            os.close(fd)
        return st

    def _write_spare(self, sid: str, data: bytes, old: os.stat_result) -> os.stat_result | None:
        """Pin *data* over *sid*'s spare and swap it with the pin (*old*, its ``lstat``),
        which becomes the spare. None when that could not be done (no name short enough,
        the spare or the pin vanished or is not ours): the caller writes a new file."""
        if not self.spares.limit:
            return None
        name = self.spares.claim(sid)
        if name is None:
            return None
        try:
            fd, size = self._open_spare(name)
            try:
                fsutil.write_all(fd, data)
                if size > len(data):
                    os.ftruncate(fd, len(data))
                st = self._own(fd, old.st_mtime_ns)
            finally:
                os.close(fd)
            fsutil.exchange(self.fd, name, sid)
        except OSError as exc:
            self.spares.release(sid)
            try:
                fsutil.unlink_quietly(self.fd, name)
            except OSError:
                pass  # a directory planted there (a store shared with the directory's owner)
            if exc.errno in _STORE_FAILED:
                raise
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                self.spares.limit = 0  # no RENAME_EXCHANGE on this filesystem: no spares
            return None  # gone meanwhile, or not ours: a new file instead
        if not self._reusable(old):  # the old pin is also a version, or a link pin's live file
            self.spares.release(sid)
            fsutil.unlink_quietly(self.fd, name)
        else:
            for gone in self.spares.settle(sid, old.st_size):
                fsutil.unlink_quietly(self.fd, gone)
        return st

    def _reusable(self, st: os.stat_result) -> bool:
        return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid in self._own_uids

    def _open_spare(self, name: str) -> tuple[int, int]:
        """The spare *name* open for writing and its size: the inode there if it may be
        reused (checked on the descriptor), else a new one."""
        try:
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        else:
            st = os.fstat(fd)
            if self._reusable(st):
                return fd, st.st_size
            os.close(fd)
            fsutil.unlink_quietly(self.fd, name)
        return os.open(name, _CREATE, 0o600, dir_fd=self.fd), 0

    def drop_spares(self) -> None:
        """Remove every spare (a clean stop: the next daemon starts without them)."""
        for name in self.spares.clear():
            fsutil.unlink_quietly(self.fd, name)

    def _replace(self, tmp: str, sid: str, exists: bool, fresh: bool = False) -> None:
        """Put the written *tmp* in place as *sid*'s pin.

        Over an existing pin, swap the two (``RENAME_EXCHANGE``) and unlink the
        old one rather than rename over it: ext4 (``auto_da_alloc``) starts
        writeback of a file renamed over another, which on the event path
        doubled a pin's wall time and competed with the server's own fsyncs
        (benchmarks/, "pinpath"). A pin needs no such help: it is never
        trusted after a crash (see the module docstring). A daemon killed
        between the swap and the unlink leaves a tmp name, swept after the next start.
        A *fresh* pin never replaces one (``RENAME_NOREPLACE``).
        """
        if fresh:
            fsutil.rename_noreplace(self.fd, tmp, sid)
            return
        if exists:
            try:
                fsutil.exchange(self.fd, tmp, sid)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EINVAL, errno.ENOSYS):
                    raise
            else:
                fsutil.unlink_quietly(self.fd, tmp)
                return
        os.rename(tmp, sid, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def reflink(self, sid: str, src_fd: int, max_bytes: int, *,
                fresh: bool = False) -> tuple[bytes, os.stat_result] | None:
        """Pin the live file *src_fd* by sharing its extents (``FICLONE``), zero-copy.

        Returns the bytes *of the clone* (read back), so whatever the caller
        derives from them — count, message keys — describes exactly what is
        pinned even if an in-place writer changed the live file meanwhile.
        None when the filesystem cannot reflink (the caller copies instead).
        *fresh* as for :meth:`write`.
        """
        birth = None if fresh else self._birth(sid)
        try:
            method, pending = fsutil.create_clone(src_fd, self.fd, sid, allow_reflink=True)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EOPNOTSUPP):
                return None
            raise
        if method != "reflink":
            pending.discard()
            return None
        try:
            st = os.fstat(pending.fd)
            data = fsutil.read_fd(pending.fd, st, max_bytes)
            st = self._own(pending.fd, birth)
        except BaseException:
            pending.discard()
            raise
        pending.publish(sid, durable=False, replace=not fresh)
        return data, st

    def link(self, sid: str, src_dir_fd: int, src_name: str, want: os.stat_result, *,
             fresh: bool = False) -> os.stat_result:
        """Pin the live file *want* (its ``stat``) by a hard link to its inode:
        zero-copy, but shared.

        Safe only for writers that replace files by rename (the library, which
        does so itself): an in-place rewrite changes the pin too. Raises
        ``OSError`` (``EXDEV``, ``EPERM``, ``ENOENT``) when a link is impossible,
        ``FileNotFoundError`` too when *src_name* is no longer *want*. *fresh* as for
        :meth:`write`.
        """
        tmp = fsutil.tmp_name(sid)
        st = fsutil.link_file(src_dir_fd, src_name, want, self.fd, tmp)
        try:
            self._replace(tmp, sid, False, fresh)
        except BaseException:
            fsutil.unlink_quietly(self.fd, tmp)
            raise
        return st

    def adopt(self, sid: str, src_dir_fd: int, src_name: str) -> os.stat_result:
        """Pin a file of the store itself (a version just restored): a hard link, no copy."""
        tmp = fsutil.tmp_name(sid)
        os.link(src_name, tmp, src_dir_fd=src_dir_fd, dst_dir_fd=self.fd, follow_symlinks=False)
        try:
            os.rename(tmp, sid, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            fsutil.unlink_quietly(self.fd, tmp)
            raise
        return os.stat(sid, dir_fd=self.fd, follow_symlinks=False)

    def _own(self, fd: int, birth_ns: int | None) -> os.stat_result:
        """Make the new pin *fd* the store's (``0600``, its owner) and carry the session's
        birth (*birth_ns*; None: born now, which a file just written already says);
        its ``fstat`` after. Only what differs is changed."""
        st = fsutil.set_mode_owner(fd, 0o600, self._owner)
        if birth_ns is None:
            return st
        os.utime(fd, ns=(time.time_ns(), birth_ns))
        return os.fstat(fd)

    def drop(self, sid: str) -> bool:
        """Forget the pin (its session was deleted and the pin kept, or forgotten), and its
        spare: by name, known or not (an erasure must not leave an older copy behind)."""
        self.spares.release(sid)
        spare = self.spares.name(sid)
        if spare is not None:
            fsutil.unlink_quietly(self.fd, spare)
        return fsutil.unlink_quietly(self.fd, sid)

    def sids(self) -> Iterator[str]:
        """Every session that has a pin (one listing of the folder)."""
        with os.scandir(self.fd) as it:
            for entry in it:
                if is_sid(entry.name):
                    yield entry.name

    # -- the daemon's restart hint ---------------------------------------------------

    def load_cache(self, settings: dict[str, Any] | None = None) -> RestartHint:
        """What the daemon knew at its last clean stop; empty when missing, unreadable,
        or written under other watch *settings* than these (its counts would be
        another rule's: believing them could let a loss pass as a growth)."""
        try:
            data, _ = fsutil.read_regular(CACHE_FILE, 1 << 31, dir_fd=self._store_fd)
            return decode(data, settings)
        except (OSError, ValueError, struct.error):  # orjson.JSONDecodeError is a ValueError
            return RestartHint()

    def save_cache(self, entries: dict[str, CacheEntry], settings: dict[str, Any] | None = None) -> None:
        """Write the hint durably, after every pin it describes is durable (``syncfs``),
        with the watch *settings* it was made under."""
        fsutil.syncfs(self.fd)
        fsutil.write_file(self._store_fd, CACHE_FILE, encode(entries, settings), owner=self._owner)

    def drop_cache(self) -> None:
        """Remove the hint: from now on it would describe the past (the daemon is running)."""
        if fsutil.unlink_quietly(self._store_fd, CACHE_FILE):
            fsutil.fsync_dir(self._store_fd)

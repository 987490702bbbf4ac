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
replaced by ``rename`` so a reader never sees half of one.

With ``pin = "zstd"`` a pin holds the session compressed (a zstd frame,
recognised by its magic number; a JSON or JSONL session never starts with
it): a store on a filesystem without reflinks then costs a fraction of the
sessions' size instead of all of it. :func:`plain` gives back the session's
bytes; versions are always kept plain, so ``cp`` restores any of them.

A pin's mtime is the session's *birth*: the time the daemon first saw it,
carried from pin to pin (a hard-link pin shares the live file's mtime
instead). The store's byte cap uses it to tell a name that lived seconds
from a conversation that lived weeks.

The daemon also keeps ``pins.cache``: what it knew of every pin at its last
clean stop (the live file's identity, the count, the message keys). It is a
hint for a fast restart (an unchanged live file is not re-read), never
proof: a wrong entry costs a read, not a version.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from . import fsutil
from .fsutil import Owner
from .naming import is_sid

PINS_DIR = "pins"
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
CACHE_FILE = "pins.cache"
#: The JSON hint of release 0.1.x and of a format-1 migration: still read.
_JSON_VERSION = 2
#: ``pins.cache`` since: magic, version, the watch settings (JSON), then the entries as
#: fixed-size records and the ids after them, NUL-terminated (an id never holds NUL).
_MAGIC = b"SGPC"
_VERSION = 3
_HEAD = struct.Struct("<4sII")  # magic, version, length of the settings
_COUNT = struct.Struct("<Q")
#: key, count (-1: unparseable), first, prev, pin: Python hashes are signed, message keys not.
_RECORD = struct.Struct("<qqQQq")
_FIELDS = 5  # of 8 bytes each: the key first

#: One cached pin: hash of the live file's (dev, ino, size, mtime_ns) key, its
#: count (None: unparseable), the keys of its first and next-to-last messages,
#: and the hash of the pin file's own identity (0: unknown).
CacheEntry = tuple[int, int | None, int, int, int]


class RestartHint:
    """``pins.cache`` as loaded: what the daemon knew of each session at its last clean stop.

    Kept as the file has it — the ids in a list, the entries packed — and an entry
    unpacked only when the scan asks for it: a million entries cost tens of
    megabytes for the length of the scan instead of a parsed document's
    hundreds, and the objects the scan keeps are not strewn among freed ones
    (RSS after a restart). The ids are in the order the daemon came to know the
    sessions, which is the order its scan listed them in: a restart over an
    unchanged directory meets them in the same order (:attr:`ids`, :meth:`entry`)
    and never needs the id → entry index, which is only built when asked
    (:meth:`get`). *exact* when the hint says it was written under the very
    watch settings the daemon now runs with (pattern, excludes, count, …): its
    ids are then what the matcher would make of the same names, and a restart
    need not work them out again. A hint from an older daemon or a migration
    says nothing about its settings and is used, but not that far.
    """

    def __init__(self, ids: list[str] | None = None, records: bytes = b"", *, exact: bool = False) -> None:
        self.ids: list[str] = ids or []
        if len(records) != len(self.ids) * _RECORD.size:
            raise ValueError("pins.cache: as many entries as ids")
        self._records = records
        #: Each entry's key (``stat_hash`` of the live file), by place: read in place, no unpacking.
        self.keys: Sequence[int] = (memoryview(records).cast("q")[::_FIELDS] if sys.byteorder == "little"
                                    else [key for key, *_ in _RECORD.iter_unpack(records)])
        self.exact = exact

    @classmethod
    def of(cls, entries: dict[str, CacheEntry]) -> RestartHint:
        return cls(list(entries), _pack(entries.values()))

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return dict(zip(self.ids, range(len(self.ids)), strict=True))

    def index(self, sid: str) -> int | None:
        """Where *sid* is in :attr:`ids`, or None."""
        return self._index.get(sid)

    def entry(self, i: int) -> CacheEntry:
        """The entry of ``ids[i]``."""
        key, count, first, prev, pin = _RECORD.unpack_from(self._records, i * _RECORD.size)
        return (key, None if count < 0 else count, first, prev, pin)

    def get(self, sid: str) -> CacheEntry | None:
        i = self._index.get(sid)
        return None if i is None else self.entry(i)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def _pack(entries: Iterable[CacheEntry]) -> bytes:
    return b"".join(_RECORD.pack(key, -1 if count is None else count, first, prev, pin)
                    for key, count, first, prev, pin in entries)


def _parse_cache(data: bytes, settings: dict[str, Any] | None) -> RestartHint:
    """The hint in *data* (either format); empty when it is not one, or when it names
    other watch *settings* than these. Raises ``ValueError`` / ``struct.error`` on
    damage, which the caller treats as no hint."""
    if data[:1] == b"{":
        return _parse_json(data, settings)
    magic, version, size = _HEAD.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        return RestartHint()
    at = _HEAD.size
    written = orjson.loads(data[at:at + size])
    if settings is not None and written is not None and written != settings:
        return RestartHint()
    at += size
    (n,) = _COUNT.unpack_from(data, at)
    at += _COUNT.size
    records = data[at:at + n * _RECORD.size]
    ids = data[at + n * _RECORD.size:].decode("utf-8", "surrogateescape").split("\0")
    if len(records) != n * _RECORD.size or len(ids) != n + 1 or ids[-1] != "":
        raise ValueError("pins.cache is cut short")
    ids.pop()
    return RestartHint(ids, records, exact=settings is not None and written is not None)


def _parse_json(data: bytes, settings: dict[str, Any] | None) -> RestartHint:
    raw = orjson.loads(data)
    if not isinstance(raw, dict) or raw.get("version") != _JSON_VERSION or not isinstance(raw.get("pins"), dict):
        return RestartHint()
    entries: dict[str, CacheEntry] = {}
    for sid, entry in raw["pins"].items():
        if isinstance(entry, list) and len(entry) == 5 and all(isinstance(x, int) for x in entry[::2]) \
                and isinstance(entry[3], int) and (entry[1] is None or isinstance(entry[1], int)):
            entries[sid] = (entry[0], entry[1], entry[2], entry[3], entry[4])
    return RestartHint.of(entries)


class Pins:
    """The ``pins/`` folder of one store (``dir_fd`` is owned by the caller's :class:`Store`)."""

    def __init__(self, dir_fd: int, store_fd: int, owner: Owner) -> None:
        self.fd = dir_fd
        self._store_fd = store_fd
        self._owner = owner

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

    def write(self, sid: str, data: bytes, *, fresh: bool = False) -> os.stat_result:
        """Pin *data* (the bytes just read from the live file, or compressed: see
        :func:`compress`): a copy pin.

        *fresh*: the caller knows the session has no pin (a first scan listed the
        folder): no lookup for one, and ``FileExistsError`` if one appeared since."""
        old = None if fresh else self.stat(sid)
        tmp = fsutil.tmp_name(sid)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                st = self._own(fd, old.st_mtime_ns if old is not None else None)
            finally:
                os.close(fd)
            self._replace(tmp, sid, old is not None, fresh)
        except BaseException:
            fsutil.unlink_quietly(self.fd, tmp)
            raise
        return st

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
        """Forget the pin (its session was deleted and the pin kept, or forgotten)."""
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
            return _parse_cache(data, settings)
        except (OSError, ValueError, struct.error):  # orjson.JSONDecodeError is a ValueError
            return RestartHint()

    def save_cache(self, entries: dict[str, CacheEntry], settings: dict[str, Any] | None = None) -> None:
        """Write the hint durably, after every pin it describes is durable (``syncfs``),
        with the watch *settings* it was made under."""
        fsutil.syncfs(self.fd)
        written = orjson.dumps(settings)
        ids = "".join(f"{sid}\0" for sid in entries).encode("utf-8", "surrogateescape")
        data = b"".join((_HEAD.pack(_MAGIC, _VERSION, len(written)), written, _COUNT.pack(len(entries)),
                         _pack(entries.values()), ids))
        fsutil.write_file(self._store_fd, CACHE_FILE, data, owner=self._owner)

    def drop_cache(self) -> None:
        """Remove the hint: from now on it would describe the past (the daemon is running)."""
        if fsutil.unlink_quietly(self._store_fd, CACHE_FILE):
            fsutil.fsync_dir(self._store_fd)

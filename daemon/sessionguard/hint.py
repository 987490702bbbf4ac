"""The daemon's restart hint, ``<store>/pins.cache``: what it knew of every pin at
its last clean stop (the live file's identity, the count, the message keys).

It is a hint for a fast restart (an unchanged live file is not re-read), never
proof: a wrong entry costs a read, not a version. Written by :meth:`Pins.save_cache
<sessionguard.pins.Pins.save_cache>` after a ``syncfs``, removed while the daemon
runs.

A message key that does not match makes the next write read its pin, which the
store judges on keys it computes itself: so a cache written before message keys
became CRC-based (blake2b, same version) is read as it is, and each session's
first write after the upgrade reads its pin once, as one from a scan does.
"""

from __future__ import annotations

import functools
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

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


def decode(data: bytes, settings: dict[str, Any] | None) -> RestartHint:
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


def encode(entries: dict[str, CacheEntry], settings: dict[str, Any] | None) -> bytes:
    """``pins.cache`` holding *entries*, made under the watch *settings*."""
    written = orjson.dumps(settings)
    ids = "".join(f"{sid}\0" for sid in entries).encode("utf-8", "surrogateescape")
    return b"".join((_HEAD.pack(_MAGIC, _VERSION, len(written)), written, _COUNT.pack(len(entries)),
                     _pack(entries.values()), ids))

"""Store layouts across releases: read the ``FORMAT`` marker, upgrade older stores at open.

Stores outlive releases. Every layout change bumps :data:`store.FORMAT`;
:func:`upgrade` brings an older store up to date in place, idempotently (a
crash half-way is finished by the next open), under a lock so that a daemon
and a library opening the same store at once migrate it once.

Format 1 (release 0.1.0, no marker): ``sessions/<sid>/`` held a ``.lock``, the
pin ``pin.<seq>.<method>.<count>.<dev>.<ino>.<size>.<mtime_ns>`` and the
versions; the store was group-readable. Format 2: pins move to the flat
``pins/<sid>``, locks to one ``lock`` file, the store becomes ``0700``, a
session folder exists only while it has versions, and the v1 pin names
become the daemon's restart hint (``pins.cache``) so the first start after
the upgrade does not re-read every session.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import orjson

from . import fsutil
from .count import key_hash
from .errors import StoreError
from .fsutil import Owner
from .naming import is_sid

FORMAT_FILE = "FORMAT"
#: The byte of ``<store>/lock`` held while a store is being upgraded.
MIGRATE_BYTE = (1 << 41) + 1
_V1_PIN = re.compile(
    r"^pin\.(?P<seq>\d+)\.(?P<method>link|reflink|copy)\.(?P<count>\d+|x)"
    r"\.(?P<dev>\d+)\.(?P<ino>\d+)\.(?P<size>\d+)\.(?P<mtime>\d+)$"
)


def read_format(store_fd: int) -> int | None:
    """The store's format, or None when it has no marker (format 1, or a brand-new store)."""
    try:
        data, _ = fsutil.read_regular(FORMAT_FILE, 64, dir_fd=store_fd)
    except FileNotFoundError:
        return None
    text = data.decode("ascii", "replace").strip()
    if not text.isdigit():
        raise StoreError(f"the store's {FORMAT_FILE} file is damaged ({text[:20]!r})")
    return int(text)


def upgrade(store_fd: int, current: int, owner: Owner) -> str | None:
    """Bring the store open as *store_fd* to format *current*; what was done, or None."""
    found = read_format(store_fd)
    if found == current:
        return None
    if found is not None and found > current:
        raise StoreError(f"the store was written by a newer sessionguard (format {found}); "
                         f"this release reads format {current} and older")
    with _migration_lock(store_fd):
        found = read_format(store_fd)  # someone else may have finished meanwhile
        if found == current:
            return None
        os.fchmod(store_fd, 0o700)
        migrated = _v1_to_v2(store_fd, owner) if found is None else 0
        fsutil.write_file(store_fd, FORMAT_FILE, f"{current}\n".encode(), mode=0o600, owner=owner)
    if found is None and migrated:
        return f"upgraded from format 1 (release 0.1.0) to format {current}: {migrated} pins moved"
    return None


@contextlib.contextmanager
def _migration_lock(store_fd: int) -> Iterator[None]:
    fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=store_fd)
    try:
        fsutil.range_lock(fd, MIGRATE_BYTE, wait=True)
        yield
    finally:
        os.close(fd)


def _v1_to_v2(store_fd: int, owner: Owner) -> int:
    """Move every v1 pin to ``pins/<sid>``, drop the per-session locks, write the hint."""
    try:
        sessions_fd = fsutil.open_dir("sessions", at=store_fd)
    except FileNotFoundError:
        return 0  # a brand-new store
    try:
        os.mkdir("pins", 0o700, dir_fd=store_fd)
    except FileExistsError:
        pass
    pins_fd = fsutil.open_dir("pins", at=store_fd)
    moved = 0
    hint: dict[str, tuple[int, int | None, int, int, int]] = {}
    try:
        os.fchmod(sessions_fd, 0o700)
        with os.scandir(sessions_fd) as it:
            names = [e.name for e in it if e.is_dir(follow_symlinks=False) and is_sid(e.name)]
        for sid in names:
            entry = _migrate_folder(sessions_fd, pins_fd, sid)
            if entry is not None:
                moved += 1
                hint[sid] = entry
        fsutil.fsync_dir(pins_fd)
        fsutil.fsync_dir(sessions_fd)
        if hint:
            data = orjson.dumps({"version": 2, "pins": hint})
            fsutil.write_file(store_fd, "pins.cache", data, owner=owner)
    finally:
        os.close(pins_fd)
        os.close(sessions_fd)
    return moved


def _migrate_folder(sessions_fd: int, pins_fd: int, sid: str) -> tuple[int, int | None, int, int, int] | None:
    """One v1 session folder: its newest pin to ``pins/<sid>`` (unless a previous run
    already moved one), older pins and the lock removed, the folder removed if empty."""
    folder = fsutil.open_dir(sid, at=sessions_fd)
    entry = None
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it]
        pins = sorted((m for m in map(_V1_PIN.match, names) if m), key=lambda m: int(m["seq"]))
        if pins and fsutil.lstat_at(pins_fd, sid) is None:
            newest = pins.pop()
            os.rename(newest.string, sid, src_dir_fd=folder, dst_dir_fd=pins_fd)
            key = (int(newest["dev"]), int(newest["ino"]), int(newest["size"]), int(newest["mtime"]))
            pin = os.stat(sid, dir_fd=pins_fd, follow_symlinks=False)
            pin_id = key_hash((pin.st_dev, pin.st_ino, pin.st_size, pin.st_mtime_ns))
            entry = (key_hash(key), None if newest["count"] == "x" else int(newest["count"]), 0, 0, pin_id)
        for m in pins:
            fsutil.unlink_quietly(folder, m.string)
        fsutil.unlink_quietly(folder, ".lock")
        fsutil.fsync_dir(folder)
        with os.scandir(folder) as it:
            empty = next(it, None) is None
    finally:
        os.close(folder)
    if empty:
        os.rmdir(sid, dir_fd=sessions_fd)
    return entry

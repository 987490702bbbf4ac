"""Putting a version back as the live file: atomic, undoable, compare-and-swap.

One function serves the library, the daemon's ``restore`` and ``recover``,
and start-up recovery. Under the session's lock:

1. the live file is read (what the caller is about to replace) and, when the
   caller passes the content id it saw (*expect*), checked against it: a
   file that changed since the admin looked is refused (:class:`Conflict`);
2. the version is cloned beside the live file and swapped in with
   ``renameat2(RENAME_EXCHANGE)``, so the file that comes out is exactly the
   one that was live at that instant — even if a writer replaced it a
   microsecond earlier — and that file's bytes, read after the swap, become
   the ``pre-restore`` version: every restore can be undone, and no save
   racing with it is lost;
3. the pin becomes the restored version (a hard link inside the store).

A *target* of None removes the session (the undo of a ``recover`` that
re-created a deleted one), keeping the removed file the same way.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import fsutil
from .count import CountSpec, parse
from .errors import Conflict
from .fsutil import Owner
from .naming import Source, Version
from .store import Store
from .versions import content_hash


@dataclass(frozen=True)
class LiveFile:
    """Where a session's live file is: a checked directory descriptor and a name in it,
    how to count it, and who owns a file made there when none is replaced."""

    dir_fd: int
    name: str
    spec: CountSpec
    owner: Owner = None


@dataclass
class RestoreResult:
    """What a restore did (or, with ``dry_run``, would do)."""

    sid: str
    restored: Version | None
    pre_restore: Version | None
    live_count: int | None
    live_id: str | None
    live_existed: bool
    dry_run: bool = False
    unchanged: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "sid": self.sid,
            "restored": self.restored.to_dict() if self.restored else None,
            "pre_restore": self.pre_restore.to_dict() if self.pre_restore else None,
            "live_count_before": self.live_count,
            "live_id_before": self.live_id,
            "live_existed": self.live_existed,
            "dry_run": self.dry_run,
            "unchanged": self.unchanged,
        }


def restore(store: Store, sid: str, target: Version | None, live: LiveFile, *, source: Source,
            dry_run: bool = False, expect: str | None = None, lock_wait: float | None = None) -> RestoreResult:
    """Make *target* (None: nothing) the live file of *sid*, keeping what it replaces."""
    with store.lock(sid, lock_wait):
        data = _read_live(store, live)
        live_id = content_hash(data) if data is not None else None
        live_count = parse(data, live.spec).count if data is not None else None
        if expect is not None and expect != live_id:
            raise Conflict(f"the live file of {sid!r} changed since you looked: it is now "
                           f"{live_id or 'missing'} ({live_count} messages), not {expect}; look again")
        result = RestoreResult(sid, target, None, live_count, live_id, data is not None, dry_run)
        if (target.id if target else None) == live_id:
            result.unchanged = True
            return result
        if dry_run:
            return result
        replaced = _swap_in(store, target, live) if target is not None else _take_away(store, live)
        if replaced is not None:
            count = parse(replaced, live.spec).count
            result.pre_restore = store.keep(sid, replaced, count, "pre-restore", source).version
        _repin(store, sid, target)
        return result


def _read_live(store: Store, live: LiveFile) -> bytes | None:
    try:
        data, _ = fsutil.read_regular(live.name, store.max_bytes, dir_fd=live.dir_fd)
    except FileNotFoundError:
        return None
    return data


def _swap_in(store: Store, target: Version, live: LiveFile) -> bytes | None:
    """Put a clone of *target* under the live name; the bytes of the file it replaced."""
    vfd, _ = store.versions.open(target)
    try:
        like = fsutil.lstat_at(live.dir_fd, live.name)
        owner = (like.st_uid, like.st_gid) if like is not None else live.owner
        mode = (like.st_mode & 0o7777) if like is not None else 0o600
        _, pending = fsutil.create_clone(vfd, live.dir_fd, live.name, allow_reflink=True, mode=mode, owner=owner)
    finally:
        os.close(vfd)
    os.fsync(pending.fd)
    os.close(pending.fd)
    tmp = pending.tmp
    try:
        try:
            fsutil.rename_noreplace(live.dir_fd, tmp, live.name)
            return None  # there was no live file: nothing replaced
        except FileExistsError:
            fsutil.exchange(live.dir_fd, tmp, live.name)
        except OSError as exc:
            if exc.errno not in _NO_RENAMEAT2:
                raise
            return _plain_swap(store, live, tmp)
        return fsutil.read_regular(tmp, store.max_bytes, dir_fd=live.dir_fd)[0]
    finally:
        fsutil.unlink_quietly(live.dir_fd, tmp)
        fsutil.fsync_dir(live.dir_fd)


#: What a filesystem without ``renameat2`` flags (some network filesystems) answers.
_NO_RENAMEAT2 = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _plain_swap(store: Store, live: LiveFile, tmp: str) -> bytes | None:
    """Where no atomic exchange exists: keep what is live now, then rename over it.
    A save landing between the read and the rename is not kept (documented)."""
    data = _read_live(store, live)
    os.rename(tmp, live.name, src_dir_fd=live.dir_fd, dst_dir_fd=live.dir_fd)
    return data


def _take_away(store: Store, live: LiveFile) -> bytes | None:
    """Remove the live file by renaming it away first, so what is kept is what was there."""
    tmp = fsutil.tmp_name(live.name)
    try:
        os.rename(live.name, tmp, src_dir_fd=live.dir_fd, dst_dir_fd=live.dir_fd)
    except FileNotFoundError:
        return None
    try:
        data, _ = fsutil.read_regular(tmp, store.max_bytes, dir_fd=live.dir_fd)
    except BaseException:
        fsutil.rename_noreplace(live.dir_fd, tmp, live.name)  # put it back: nothing may be lost
        raise
    fsutil.unlink_quietly(live.dir_fd, tmp)
    fsutil.fsync_dir(live.dir_fd)
    return data


def _repin(store: Store, sid: str, target: Version | None) -> None:
    if target is None:
        store.pins.drop(sid)
        return
    folder = store.versions.folder(sid)
    if folder is None:
        return
    try:
        store.pins.adopt(sid, folder, target.name)
    finally:
        os.close(folder)

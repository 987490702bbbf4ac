"""The store's own directory: opened and checked once, refused when it is not ours, put back when moved.

The store lives in a directory its owner (the server's user) may be hostile
in. This module is the only place that looks at the store's *name* in that
directory: it opens it once with ``O_NOFOLLOW | O_DIRECTORY``, checks the
descriptor (owner, mode), moves aside whatever is there instead of a store
of ours, and later tells whether the name still leads to the same directory.
Everything else reaches the store through the descriptor.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from datetime import UTC, datetime

from . import fsutil
from .errors import StoreError
from .fsutil import Owner

README = """\
sessionguard backup store (format 2)
====================================

sessions/<session id>/   one folder per session that has kept versions:
  <UTC time>_<N>msgs_<reason>_<source>_<method>_<hash>.version
      A kept prior version: the session file exactly as it was, byte for byte.
      reason: shrink | unparseable | deleted | replaced | intended | pre-restore
      source: library | daemon | admin      method: link | reflink | copy
pins/<session id>        the last version seen of each session (not a backup:
                         it may already hold the damaged content)
lock, pins.cache, FORMAT  sessionguard's own; leave them alone.

Restore by hand when the daemon is down (stop the chat server first: it may
hold the session in memory and write it back):

  cd sessions/<sid>
  ls *.version | tail -n 1                        # the newest version
  ls *.version | sort -t_ -k2 -n | tail -n 1      # the version with the most messages
  cp --no-preserve=all <version> <session dir>/<sid>.json.restoring
  mv <session dir>/<sid>.json.restoring <session dir>/<sid>.json

With the daemon running, `sessionguardctl restore <sid>` does the same and
keeps the replaced file as a pre-restore version first.
"""


def open_checked(parent_fd: int, name: str, *, where: str, expect_uid: int, owner: Owner, create: bool,
                 replace_refused: bool) -> tuple[int, str | None]:
    """The store directory's descriptor, and a notice when something else had its name.

    It must be a real directory owned by *expect_uid* that nobody else may
    write. Anything else (a symlink, a file, someone else's directory) is
    refused: with *replace_refused* (the daemon) moved aside and a fresh one
    made; otherwise :class:`StoreError` says why and nothing is touched.
    """
    fd = _open_dir(parent_fd, name, create, owner)
    why = _refusal(fd, expect_uid) if fd >= 0 else _what_is_there(parent_fd, name)
    if why is None:
        return fd, None
    if fd >= 0:
        os.close(fd)
    if not replace_refused:
        raise StoreError(f"the store {where} {why}: refused (a daemon sharing it with this process "
                         "needs store_owner = \"directory\" in its [[watch]])")
    aside = move_aside(parent_fd, name)
    notice = f"{where} {why}: moved aside to {aside}; a fresh store was made"
    return _open_dir(parent_fd, name, True, owner), notice

def _open_dir(parent_fd: int, name: str, create: bool, owner: Owner) -> int:
    """The directory *name*, made when missing; -1 for a symlink, a file or another user's
    directory we may not enter there (a 0700 one planted before a daemon that is not root)."""
    try:
        return fsutil.open_dir(name, at=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
    except PermissionError:
        st = fsutil.lstat_at(parent_fd, name)
        if st is None or st.st_uid == os.geteuid():
            raise
        return -1
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        return -1
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass
    fd = fsutil.open_dir(name, at=parent_fd)
    _give(fd, owner)
    os.fchmod(fd, 0o700)
    fsutil.fsync_dir(parent_fd)
    return fd


def _give(fd: int, owner: Owner) -> None:
    if owner is not None and owner != (os.geteuid(), os.getegid()):
        os.fchown(fd, *owner)


def _what_is_there(parent_fd: int, name: str) -> str:
    """Why what has the store's name could not even be opened (described by its lstat)."""
    st = fsutil.lstat_at(parent_fd, name)
    if st is None:
        return "vanished while it was checked"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if stat.S_ISDIR(st.st_mode):
        return f"belongs to uid {st.st_uid} and is closed to us"
    return "is not a directory"


def _refusal(fd: int, expect_uid: int) -> str | None:
    st = os.fstat(fd)
    if st.st_uid != expect_uid:
        return f"belongs to uid {st.st_uid}, not {expect_uid}"
    if st.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def move_aside(parent_fd: int, name: str) -> str:
    """Rename whatever has the store's name to a unique ``<name>.refused-…`` (never deleted:
    it may hold someone's data, and it is evidence)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    aside = f"{name}.refused-{stamp}-{os.getpid()}-{secrets.token_hex(3)}"
    os.rename(name, aside, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    fsutil.fsync_dir(parent_fd)
    return aside


def subdir(store_fd: int, name: str, owner: Owner, where: str) -> int:
    """A folder of the store (made if missing), checked to be the store owner's: its descriptor."""
    try:
        os.mkdir(name, 0o700, dir_fd=store_fd)
    except FileExistsError:
        pass
    fd = fsutil.open_dir(name, at=store_fd)
    try:
        _give(fd, owner)  # ours to give: just made, or made by us before
        st = os.fstat(fd)
        if st.st_uid != os.fstat(store_fd).st_uid:
            raise StoreError(f"{where}/{name} belongs to uid {st.st_uid}: refused")
        os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def own_file(store_fd: int, name: str, owner: Owner) -> None:
    """Make sure the store's file *name* exists and belongs to the store's owner (the lock
    file: every process sharing the store — the library as the directory's owner — opens it)."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=store_fd)
    try:
        _give(fd, owner)
    finally:
        os.close(fd)


def write_readme(store_fd: int, text: str, owner: Owner) -> None:
    """The store's README.txt, rewritten when it is not this release's."""
    try:
        have, _ = fsutil.read_regular("README.txt", 1 << 20, dir_fd=store_fd)
    except (OSError, ValueError):
        have = b""
    if have != text.encode():
        fsutil.write_file(store_fd, "README.txt", text.encode(), mode=0o600, owner=owner)


def displaced(parent_fd: int, name: str, ident: tuple[int, int]) -> str | None:
    """Why *name* in *parent_fd* no longer leads to the directory *ident* (None: it does)."""
    st = fsutil.lstat_at(parent_fd, name)
    if st is None:
        return "it was removed or renamed away"
    if (st.st_dev, st.st_ino) != ident:
        return "something else took its name"
    return None


def still_in(parent_fd: int, fd: int) -> bool:
    """Whether the directory *fd* is still an entry of *parent_fd* (by its ``..``): not deleted
    (only root can delete a store: it is never empty) and not moved out (its owner's store,
    ``store_owner = "directory"``, can be). A store merely renamed in place is."""
    if os.fstat(fd).st_nlink == 0:
        return False
    try:
        up = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return False
    try:
        a, b = os.fstat(up), os.fstat(parent_fd)
    finally:
        os.close(up)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def reclaim(parent_fd: int, name: str, ident: tuple[int, int]) -> bool:
    """Put the directory *ident* back under *name* after it was renamed away within its parent
    (a directory owned by another user cannot be moved elsewhere by them); whatever took its
    name is moved aside. False when it is nowhere to be found."""
    with os.scandir(parent_fd) as it:
        found = next((e.name for e in it if e.inode() == ident[1] and e.name != name
                      and e.is_dir(follow_symlinks=False)), None)
    if found is None:
        return False
    if fsutil.lstat_at(parent_fd, name) is not None:
        move_aside(parent_fd, name)
    os.rename(found, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    fsutil.fsync_dir(parent_fd)
    return True

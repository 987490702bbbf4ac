"""Durable, no-follow file I/O: the only module that writes bytes to disk.

Every write sessionguard makes (into the backup store or into a session
directory) goes through :func:`atomic_write`, :func:`atomic_clone` or
:func:`atomic_link`, which all follow one recipe: a temporary name in the
destination directory, ``fsync`` of the file, ``rename`` onto the final name,
``fsync`` of the directory. A crash at any instant therefore leaves either
the old name or the new one, never a torn file.

Every read goes through :func:`open_regular`, which refuses symlinks
(``O_NOFOLLOW``), never blocks on FIFOs (``O_NONBLOCK``) and refuses anything
that is not a regular file *after* opening it, so a name swapped between a
``stat`` and an ``open`` cannot trick us.

Only the standard library is imported here: a server embeds this.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from typing import Callable, Literal

#: ``FICLONE`` ioctl number (``_IOW(0x94, 9, int)``); Python 3.11 has no
#: ``fcntl.FICLONE``.
FICLONE = 0x40049409

#: Marker inside every temporary name we create. Contains ``.tmp`` so that
#: the daemon's default excludes (``*.tmp*``) and servers' own tmp sweeps
#: treat it as transient, and starts with a dot so no ``*.json`` glob sees it.
TMP_MARK = ".tmp-sg-"

CopyMethod = Literal["link", "reflink", "copy"]

_CLONE_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegularFile(OSError):
    """The path names a FIFO, device, socket or directory: never read it."""


class FileTooLarge(OSError):
    """The file is larger than the configured cap: counted as unparseable."""


def open_regular(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open *path* read-only without following a final symlink.

    Returns ``(fd, fstat)``. Raises :class:`NotRegularFile` for anything but a
    regular file (the check is on the opened descriptor, so it cannot race),
    and ``OSError(ELOOP)`` for a symlink.
    """
    fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_fd(fd: int, st: os.stat_result, max_bytes: int, name: str = "") -> bytes:
    """Read a whole regular file from *fd*, refusing more than *max_bytes*.

    The size is checked before reading and again while reading, because a
    writer may still be appending.
    """
    if st.st_size > max_bytes:
        raise FileTooLarge(errno.EFBIG, f"file is {st.st_size} bytes, cap is {max_bytes}", name)
    chunks: list[bytes] = []
    total = 0
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, max(st.st_size - total, 0) + 65536)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise FileTooLarge(errno.EFBIG, f"file grew past the cap of {max_bytes} bytes", name)
        chunks.append(chunk)
    return b"".join(chunks)


def read_regular(
    path: str | os.PathLike[str], max_bytes: int, *, dir_fd: int | None = None
) -> tuple[bytes, os.stat_result]:
    """Read a regular file (no symlinks, no FIFOs) of at most *max_bytes*."""
    fd, st = open_regular(path, dir_fd=dir_fd)
    try:
        return read_fd(fd, st, max_bytes, os.fspath(path)), st
    finally:
        os.close(fd)


def tmp_path(final: str) -> str:
    """A unique temporary name beside *final* (same directory, same filesystem).

    A long name is shortened first: the marker and suffix add ~25 bytes, and
    a session name may already be at the 255-byte limit.
    """
    head, tail = os.path.split(final)
    tail = os.fsencode(tail)[:200].decode("utf-8", "ignore")
    return os.path.join(head, f".{tail}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def tmp_owner_pid(name: str) -> int | None:
    """The pid embedded in a temporary name made by :func:`tmp_path`, if any."""
    _, sep, rest = name.partition(TMP_MARK)
    if not sep:
        return None
    pid, _, _ = rest.partition("-")
    return int(pid) if pid.isdigit() else None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename or link inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _match_owner(fd: int, like: os.stat_result | None, mode: int) -> None:
    """Give a new file the mode (and, where permitted, owner) of the file it replaces."""
    if like is None:
        os.fchmod(fd, mode)
        return
    os.fchmod(fd, stat.S_IMODE(like.st_mode))
    if (like.st_uid, like.st_gid) == (os.geteuid(), os.getegid()):
        return  # already ours: the usual case of a server saving its own file
    try:
        os.fchown(fd, like.st_uid, like.st_gid)
    except PermissionError:
        pass  # not root: the file is ours, which is the best we can do


def _publish(tmp: str, final: str, *, sync_dir: bool) -> None:
    os.rename(tmp, final)
    if sync_dir:
        fsync_dir(os.path.dirname(final) or ".")


def atomic_write(
    final: str,
    data: bytes,
    *,
    mode: int = 0o640,
    like: os.stat_result | None = None,
    sync_dir: bool = True,
) -> os.stat_result:
    """Durably replace *final* with *data*: tmp, fsync, rename, fsync dir.

    *like* is the stat of the file being replaced: its mode and owner are
    carried over, so a restore by root does not lock the server out of its
    own session. Returns the ``fstat`` of the new file (its identity key).
    """
    tmp = tmp_path(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            _match_owner(fd, like, mode)
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        _publish(tmp, final, sync_dir=sync_dir)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return st


def clone_fd(src_fd: int, dst_fd: int, *, allow_reflink: bool = True) -> CopyMethod:
    """Copy the whole of *src_fd* into the empty *dst_fd*.

    Tries ``FICLONE`` first (shares extents: no bytes written on XFS/btrfs),
    falls back to an in-kernel ``copy_file_range`` and finally to read/write.
    Returns the method used so callers can record it.
    """
    if allow_reflink:
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            return "reflink"
        except OSError as exc:
            if exc.errno not in _CLONE_UNSUPPORTED:
                raise
    size = os.fstat(src_fd).st_size
    offset = 0
    try:
        while offset < size:
            n = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
            if n == 0:
                break
            offset += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        os.lseek(src_fd, offset, os.SEEK_SET)
        os.lseek(dst_fd, offset, os.SEEK_SET)
        while chunk := os.read(src_fd, 1 << 20):
            os.write(dst_fd, chunk)
    return "copy"


def atomic_clone(
    src_fd: int,
    final: str | Callable[[CopyMethod], str],
    *,
    allow_reflink: bool = True,
    like: os.stat_result | None = None,
    mode: int = 0o640,
    sync_dir: bool = True,
) -> tuple[CopyMethod, os.stat_result]:
    """Durably create *final* as an independent copy of *src_fd* (reflink or copy).

    *final* may be a function of the method used, for names that record it.
    Returns the method and the new file's stat.
    """
    name_for = final if callable(final) else (lambda _method: final)
    tmp = tmp_path(name_for("copy"))
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            method = clone_fd(src_fd, fd, allow_reflink=allow_reflink)
            _match_owner(fd, like, mode)
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        _publish(tmp, name_for(method), sync_dir=sync_dir)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return method, st


def link_fd(src_fd: int, src_path: str, final: str, *, sync_dir: bool = True, synced: bool = False) -> None:
    """Give the open file *src_fd*, found at *src_path*, the extra name *final* (zero-copy).

    The link is made by path (``linkat`` through ``/proc/self/fd`` answers
    EXDEV on some kernels) and then checked: if *src_path* was replaced
    between our open and the link, the new name points at the wrong inode,
    so it is removed again and ``FileNotFoundError`` tells the caller to copy
    from the descriptor instead. The data is fsynced first: a link to
    unsynced bytes would not be a durable version. Raises
    ``FileExistsError`` if *final* exists (callers use unique names).
    *synced* says the caller has just fsynced the file itself.
    """
    if not synced:
        os.fsync(src_fd)
    os.link(src_path, final, follow_symlinks=False)
    want = os.fstat(src_fd)
    got = os.lstat(final)
    if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
        unlink_quietly(final)
        raise FileNotFoundError(errno.ENOENT, "file was replaced before it could be linked", src_path)
    if sync_dir:
        fsync_dir(os.path.dirname(final) or ".")


def same_filesystem(a: str, b: str) -> bool:
    """True when hard links between the two paths are possible."""
    return os.stat(a).st_dev == os.stat(b).st_dev


def unlink_quietly(path: str) -> None:
    """Remove *path*; a name already gone is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def reflink_supported(directory: str) -> bool:
    """Probe whether *directory*'s filesystem can FICLONE (to log the pin method in use)."""
    src = tmp_path(os.path.join(directory, "reflink-probe"))
    dst = tmp_path(os.path.join(directory, "reflink-probe"))
    try:
        a = os.open(src, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(a, b"x" * 4096)
            b = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.ioctl(b, FICLONE, a)
                return True
            except OSError:
                return False
            finally:
                os.close(b)
        finally:
            os.close(a)
    except OSError:
        return False
    finally:
        unlink_quietly(src)
        unlink_quietly(dst)

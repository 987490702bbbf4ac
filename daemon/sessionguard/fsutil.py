"""Durable, no-follow file I/O relative to directory descriptors.

Every open, create, link, rename and unlink sessionguard makes in a session
directory, a sub-directory or the store goes through this module, and every
one of them is relative to an open directory descriptor (``dir_fd``) whose
identity the caller checked, with a single path component: a name is never
walked twice and a symlink is never followed (``O_NOFOLLOW``; ``linkat``
without ``AT_SYMLINK_FOLLOW``). A directory's owner may swap any name for a
symlink at any moment; that changes nothing here.

Durable writes follow one recipe: a temporary name in the destination
directory, ``fsync`` of the file, ``renameat`` onto the final name, ``fsync``
of the directory. A crash leaves the old name or the new one, never a torn
file. Reads go through :func:`open_regular`, which refuses anything that is
not a regular file *after* opening it (no FIFO blocks us, no device is read).

Only the standard library is imported here: a server embeds this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import stat
import struct
from collections.abc import Callable, Sequence

from .errors import FileTooLarge, UnsafeSessionFile
from .naming import Method, ascii_int

#: ``FICLONE`` ioctl number (``_IOW(0x94, 9, int)``); Python 3.11 has no ``fcntl.FICLONE``.
FICLONE = 0x40049409
#: Marker inside every temporary name we create: starts with a dot (no ``*.json``
#: glob sees it) and contains ``.tmp`` (the default excludes and servers' tmp sweeps skip it).
TMP_MARK = ".tmp-sg-"
#: Flags of every directory we open: never through a symlink.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CLONE_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
_RENAME_EXCHANGE = 2
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

#: Who gets a file we create: ``(uid, gid)``, or None to keep the creator's.
Owner = tuple[int, int] | None


def single(name: str) -> str:
    """*name* if it is one path component we may use relative to a dir fd, else ``ValueError``."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"not a single path component: {name!r}")
    return name


def open_dir(name: str, *, at: int) -> int:
    """Open the directory *name* inside the directory *at*, never through a symlink."""
    return os.open(single(name), DIR_FLAGS, dir_fd=at)


def open_root(path: str) -> int:
    """Open a configured directory by absolute path; its last component must not be a symlink.

    The parents of a configured path are the admin's; everything below it is
    reached through descriptors from here on.
    """
    if not os.path.isabs(path):
        raise ValueError(f"not an absolute path: {path!r}")
    return os.open(path, DIR_FLAGS)


def walk(root_fd: int, parts: Sequence[str], check: Callable[[os.stat_result], str | None]) -> int:
    """Open the directory ``root/parts[0]/…/parts[-1]`` one component at a time.

    Each directory is opened with ``O_NOFOLLOW`` relative to the previous one
    and passed to *check*, which returns why it is refused (another owner,
    another filesystem) or None. Returns a new descriptor (the caller closes
    it); raises ``OSError`` or :class:`UnsafeSessionFile`.
    """
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nxt = open_dir(part, at=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeSessionFile(exc.errno, "not a directory (symlinks are never followed)", part) from None
                raise
            os.close(fd)
            fd = nxt
            why = check(os.fstat(fd))
            if why is not None:
                raise UnsafeSessionFile(errno.EPERM, why, part)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(name: str, *, dir_fd: int) -> tuple[int, os.stat_result]:
    """Open *name* read-only if it is a regular file: ``(fd, fstat)``.

    A symlink (``ELOOP``) or anything that is not a regular file raises
    :class:`UnsafeSessionFile`; the type is checked on the opened descriptor,
    so a name swapped between a ``stat`` and this ``open`` cannot slip through.
    """
    try:
        fd = os.open(single(name), _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeSessionFile(errno.ELOOP, "symlink: never followed or read", name) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeSessionFile(errno.EINVAL, "not a regular file", name)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_fd(fd: int, st: os.stat_result, max_bytes: int, name: str = "") -> bytes:
    """Read a whole regular file from *fd*, refusing more than *max_bytes*
    (checked before reading and again while reading: a writer may still append)."""
    if st.st_size > max_bytes:
        raise FileTooLarge(errno.EFBIG, f"file is {st.st_size} bytes, cap is {max_bytes}", name)
    chunks: list[bytes] = []
    total = 0
    while True:
        want = max(st.st_size - total, 0) + 65536
        chunk = os.pread(fd, want, total)
        total += len(chunk)
        if total > max_bytes:
            raise FileTooLarge(errno.EFBIG, f"file grew past the cap of {max_bytes} bytes", name)
        if chunk:
            chunks.append(chunk)
        # A short read at or past the size fstat gave is the end of the file: no second
        # read to be told so (one system call per evaluation). A short read before that
        # size (a file truncated meanwhile, a network filesystem) reads on to an empty one.
        if not chunk or (len(chunk) < want and total >= st.st_size):
            break
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def read_regular(name: str, max_bytes: int, *, dir_fd: int) -> tuple[bytes, os.stat_result]:
    """Read a regular file (no symlinks, no FIFOs) of at most *max_bytes*."""
    fd, st = open_regular(name, dir_fd=dir_fd)
    try:
        return read_fd(fd, st, max_bytes, name), st
    finally:
        os.close(fd)


def tmp_name(final: str) -> str:
    """A unique temporary name for *final* in the same directory.

    A long name is shortened first: the marker and suffix add ~25 bytes, and a
    session name may already be at the 255-byte limit.
    """
    head = os.fsencode(final)[:200].decode("utf-8", "ignore")
    return f".{head}{TMP_MARK}{_Pid.value}-{secrets.token_hex(4)}"


class _Pid:
    """This process's pid, for :func:`tmp_name`: ``getpid`` is a system call, and a first
    start names 100,000 tmp files. A forked child learns its own."""

    value = os.getpid()

    @classmethod
    def refresh(cls) -> None:
        cls.value = os.getpid()


os.register_at_fork(after_in_child=_Pid.refresh)


def tmp_owner_pid(name: str) -> int | None:
    """The pid embedded in a temporary name made by :func:`tmp_name`, if any (the names
    come from the session directory: :func:`~.naming.ascii_int`)."""
    _, sep, rest = name.partition(TMP_MARK)
    if not sep:
        return None
    pid, _, _ = rest.partition("-")
    return ascii_int(pid)


def fsync_dir(dir_fd: int) -> None:
    """Make the renames, links and unlinks inside a directory durable."""
    os.fsync(dir_fd)


def syncfs(fd: int) -> None:
    """``syncfs(2)``: make everything written to *fd*'s filesystem durable, in one call."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _wanted(like: os.stat_result | None, mode: int, owner: Owner) -> tuple[int, Owner]:
    """The mode and owner a new file gets: those of the file it replaces (*like*), or *mode*/*owner*."""
    if like is not None:
        return stat.S_IMODE(like.st_mode), (like.st_uid, like.st_gid)
    return mode, owner


def _create_mode(mode: int, owner: Owner) -> int:
    """The mode to create a new file with: its final *mode* when it stays ours (saving
    a ``fchmod`` on the hot path), owner-only when it will change hands, so nobody
    but the final owner can read it on the way."""
    return mode if owner is None or owner == (os.geteuid(), os.getegid()) else 0o600


def set_mode_owner(fd: int, mode: int, owner: Owner) -> os.stat_result:
    """Give the new file *fd* the wanted *mode* and *owner*; its ``fstat`` after.

    A restore by root must not lock the server out of its own session; a root
    daemon writing into a store shared with the directory's owner must leave
    files that owner can manage. The usual case (created with its final mode,
    no umask in the way, owner unchanged) costs one ``fstat``.
    """
    st = os.fstat(fd)
    changed = False
    if stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)
        changed = True
    if owner is not None and owner != (st.st_uid, st.st_gid):
        try:
            os.fchown(fd, *owner)
            changed = True
        except PermissionError:
            pass  # not root: the file stays ours, the best we can do
    return os.fstat(fd) if changed else st


def write_all(fd: int, data: bytes) -> None:
    """Write all of *data* at *fd*'s offset: ``write`` may take less than it is given."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600, like: os.stat_result | None = None,
               owner: Owner = None, durable: bool = True) -> os.stat_result:
    """Atomically replace *name* in *dir_fd* with *data*: tmp, fsync, rename, fsync dir.

    ``durable=False`` skips both fsyncs, for files whose loss in a crash is
    harmless (pins: a torn pin claims nothing, see :mod:`sessionguard.pins`).
    Returns the new file's ``fstat``.
    """
    mode, owner = _wanted(like, mode, owner)
    tmp = tmp_name(single(name))
    fd = os.open(tmp, os.O_WRONLY | _NEW_FLAGS, _create_mode(mode, owner), dir_fd=dir_fd)
    try:
        try:
            write_all(fd, data)
            st = set_mode_owner(fd, mode, owner)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        unlink_quietly(dir_fd, tmp)
        raise
    if durable:
        fsync_dir(dir_fd)
    return st


def clone_fd(src_fd: int, dst_fd: int, *, allow_reflink: bool = True) -> Method:
    """Copy the whole of *src_fd* into the empty *dst_fd*: ``FICLONE`` (shared
    extents, no bytes written) where the filesystem can, else an in-kernel copy."""
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
        while chunk := os.pread(src_fd, 1 << 20, offset):
            os.pwrite(dst_fd, chunk, offset)
            offset += len(chunk)
    return "copy"


class Pending:
    """A new file under a temporary name in *dir_fd*, not yet published.

    Lets the caller verify what the file holds (e.g. hash a reflink clone)
    before it gets its final name: :meth:`publish` or :meth:`discard` it.
    """

    def __init__(self, fd: int, dir_fd: int, tmp: str) -> None:
        self.fd, self.dir_fd, self.tmp = fd, dir_fd, tmp

    def publish(self, name: str, *, durable: bool = True, replace: bool = True) -> None:
        """Give the file its final *name* (fsync first when *durable*) and close it;
        without *replace*, ``FileExistsError`` if *name* exists (the file is removed)."""
        try:
            if durable:
                os.fsync(self.fd)
            if replace:
                os.rename(self.tmp, single(name), src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            else:
                rename_noreplace(self.dir_fd, self.tmp, single(name))
        except BaseException:
            unlink_quietly(self.dir_fd, self.tmp)
            raise
        finally:
            os.close(self.fd)
        if durable:
            fsync_dir(self.dir_fd)

    def discard(self) -> None:
        os.close(self.fd)
        unlink_quietly(self.dir_fd, self.tmp)


def create_clone(src_fd: int, dir_fd: int, name: str, *, allow_reflink: bool, mode: int = 0o600,
                 owner: Owner = None) -> tuple[Method, Pending]:
    """Clone *src_fd* into a new, not yet named file in *dir_fd* (see :class:`Pending`)."""
    tmp = tmp_name(single(name))
    fd = os.open(tmp, os.O_RDWR | _NEW_FLAGS, _create_mode(mode, owner), dir_fd=dir_fd)
    try:
        method = clone_fd(src_fd, fd, allow_reflink=allow_reflink)
        set_mode_owner(fd, mode, owner)
    except BaseException:
        os.close(fd)
        unlink_quietly(dir_fd, tmp)
        raise
    return method, Pending(fd, dir_fd, tmp)


def link_file(src_dir_fd: int, src_name: str, want: os.stat_result, dst_dir_fd: int, dst_name: str) -> os.stat_result:
    """Give the file *want* (its ``stat``), found as *src_name* in *src_dir_fd*, the
    extra name *dst_name* in *dst_dir_fd* (zero-copy, same filesystem only).

    ``linkat`` without ``AT_SYMLINK_FOLLOW`` never follows a symlink; the new
    name is then checked: if *src_name* was replaced since the caller's
    ``stat``, it names the wrong inode, is removed again, and
    ``FileNotFoundError`` tells the caller to copy instead. Raises
    ``FileExistsError`` if *dst_name* exists. Returns the new name's ``stat``.
    """
    os.link(single(src_name), single(dst_name), src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd,
            follow_symlinks=False)
    got = os.stat(dst_name, dir_fd=dst_dir_fd, follow_symlinks=False)
    if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
        unlink_quietly(dst_dir_fd, dst_name)
        raise FileNotFoundError(errno.ENOENT, "file was replaced before it could be linked", src_name)
    return got


def renameat2(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, flags: int) -> None:
    """``renameat2(2)``; raises ``OSError`` (``EINVAL``/``ENOSYS`` where unsupported)."""
    if _libc.renameat2(src_dir_fd, os.fsencode(single(src)), dst_dir_fd, os.fsencode(single(dst)), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def exchange(dir_fd: int, a: str, b: str) -> None:
    """Atomically swap the names *a* and *b* in *dir_fd* (``RENAME_EXCHANGE``)."""
    renameat2(dir_fd, a, dir_fd, b, _RENAME_EXCHANGE)


def rename_noreplace(dir_fd: int, src: str, dst: str) -> None:
    """Rename *src* to *dst* only if *dst* does not exist (``FileExistsError`` otherwise)."""
    renameat2(dir_fd, src, dir_fd, dst, _RENAME_NOREPLACE)


def unlink_quietly(dir_fd: int, name: str) -> bool:
    """Remove *name*; a name already gone is not an error. True when something was removed."""
    try:
        os.unlink(single(name), dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``fstatat(AT_SYMLINK_NOFOLLOW)``, or None when the name does not exist."""
    try:
        return os.stat(single(name), dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def reflink_supported(dir_fd: int) -> bool:
    """Probe whether the filesystem of *dir_fd* can FICLONE (to report the pin method in use)."""
    names = [tmp_name("reflink-probe"), tmp_name("reflink-probe")]
    fds: list[int] = []
    try:
        for n in names:
            fds.append(os.open(n, os.O_RDWR | _NEW_FLAGS, 0o600, dir_fd=dir_fd))
        os.write(fds[0], b"x" * 4096)
        fcntl.ioctl(fds[1], FICLONE, fds[0])
        return True
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)
        for n in names:
            unlink_quietly(dir_fd, n)


# -- record locks -----------------------------------------------------------------

_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86_64/aarch64: type, whence, start, len, pid


def range_lock(fd: int, offset: int, *, wait: bool) -> bool:
    """Take an exclusive open-file-description lock on byte *offset* of *fd*.

    OFD locks (``F_OFD_SETLK``) belong to the open file, not the process, so
    threads holding different descriptors exclude each other, and they vanish
    with the descriptor: a killed process never leaves a lock behind. One
    lock file serves every session (one byte each), so no inode per session
    is needed. Returns False when *wait* is False and someone else holds it.
    """
    cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, cmd, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def range_unlock(fd: int, offset: int) -> None:
    """Release the lock :func:`range_lock` took on byte *offset* of *fd*."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))

"""The control socket's file: bound with mode 0660 and the read (else admin) group,
never replacing anything but a stale socket, removed only if it is still ours."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

#: Errors of ``chown`` that mean "this group cannot be given here" rather than a broken
#: disk: ``EINVAL`` in a user namespace or container where the gid is not mapped,
#: ``EPERM`` for a daemon that is not root and not in the group.
UNUSABLE_GROUP_ERRNOS = (errno.EINVAL, errno.EPERM)


@dataclass(frozen=True)
class Bound:
    """A socket file we created: (path, dev, ino) so we never remove someone else's."""

    path: str
    dev: int
    ino: int


def _refuse_unless_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return  # nobody listening: stale
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another process is listening on it")


def bind(path: str, groups: list[tuple[str, int]], on_unusable: Callable[[str, int, OSError], None]
         ) -> tuple[socket.socket, Bound]:
    """Bind a listening socket at *path*, mode 0660, group = the first usable of *groups*.

    *groups* are (role, gid) in order of preference. A gid ``chown`` refuses
    with :data:`UNUSABLE_GROUP_ERRNOS` is reported through *on_unusable*
    (the caller disables that role's rule) and the next one is tried: the
    socket always comes up, at worst with the daemon's own group.

    The socket is bound under a temporary name beside *path*, given its mode
    and group, then renamed over *path*: the final name never has a looser
    mode, the process umask is not touched (other threads create files), and
    a stale socket is replaced atomically. Anything at *path* that is not a
    socket, or a socket someone still listens on, is refused.
    """
    _refuse_unless_stale(path)
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}")
    if len(os.fsencode(tmp)) >= 108:  # sun_path: bind in place, then chmod
        tmp = path
        if os.path.lexists(path):
            os.unlink(path)
    elif os.path.lexists(tmp) and stat.S_ISSOCK(os.lstat(tmp).st_mode):
        os.unlink(tmp)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(tmp)
        try:
            os.chmod(tmp, 0o660)
            _give_group(tmp, groups, on_unusable)
            if tmp != path:
                os.rename(tmp, path)
        except BaseException:
            unlink_socket(tmp)
            raise
        st = os.lstat(path)
        s.listen(512)
    except BaseException:
        s.close()
        raise
    return s, Bound(path, st.st_dev, st.st_ino)


def _give_group(path: str, groups: list[tuple[str, int]], on_unusable: Callable[[str, int, OSError], None]) -> None:
    for role, gid in groups:
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            if exc.errno not in UNUSABLE_GROUP_ERRNOS:
                raise
            on_unusable(role, gid, exc)
            continue
        return


def unlink_socket(path: str) -> None:
    """Remove *path* if it is a socket; anything else is left alone."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def remove_if_ours(bound: Bound) -> None:
    """Remove the socket file we bound, unless something else has taken its name since."""
    try:
        st = os.lstat(bound.path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (bound.dev, bound.ino):
        unlink_socket(bound.path)

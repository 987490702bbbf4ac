"""Who is at the other end of a control connection, what they may call, how many
connections they may hold, and how many reply bytes all of them may leave unread.

Everything here is decided from the kernel's word (``SO_PEERCRED`` and
``SO_PEERGROUPS``), never from anything the client sends.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .naming import ascii_int
from .protocol import DENIED, Method, RpcError

#: Linux ``SO_PEERGROUPS`` (4.13+); Python 3.11 has no constant for it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_CRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection (as it was when it connected)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_credentials(sock: socket.socket) -> Peer:
    """``SO_PEERCRED`` plus ``SO_PEERGROUPS`` of a connected Unix socket.

    On a kernel without ``SO_PEERGROUPS`` the groups come from the group
    database (``os.getgrouplist`` of the peer's user name).
    """
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    groups = {gid}
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < 65536 * 4:
                size *= 4
                continue
            if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                groups.update(_groups_from_db(uid, gid))
                break
            raise
        n = len(raw) // 4
        groups.update(struct.unpack(f"{n}I", raw[: n * 4]))
        break
    return Peer(pid, uid, gid, frozenset(groups))


def _groups_from_db(uid: int, gid: int) -> list[int]:
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except (KeyError, OSError):
        return [gid]


@dataclass
class Access:
    """The authorisation rule: root and the daemon's own uid may call everything,
    the admin group everything, the read group the read methods, nobody else anything.

    A group whose gid is None is disabled (missing, or unusable on this system).
    """

    daemon_uid: int
    read_group: str | None
    admin_group: str | None
    read_gid: int | None = None
    admin_gid: int | None = None

    def resolve(self, log: Any) -> None:
        """Look the group names up; a missing one is logged and its rule disabled."""
        self.read_gid = _gid(self.read_group, "read", log)
        self.admin_gid = _gid(self.admin_group, "admin", log)

    def socket_groups(self) -> list[tuple[str, int]]:
        """The groups the socket file may get, in order of preference: read, then admin."""
        return [(role, gid) for role, gid in (("read", self.read_gid), ("admin", self.admin_gid)) if gid is not None]

    def disable(self, role: str, exc: OSError, log: Any) -> None:
        """The socket cannot be given this group here (an unmapped gid in a user namespace,
        a group the daemon is not in): serve all the same, without that group's rule."""
        name, gid = (self.read_group, self.read_gid) if role == "read" else (self.admin_group, self.admin_gid)
        if role == "read":
            self.read_gid = None
        else:
            self.admin_gid = None
        log.error("control.group_unusable", group=name, gid=gid, role=role, error=exc.strerror or str(exc),
                  errno=exc.errno, note=f"the socket cannot belong to this group here: the {role} group rule "
                                        "is disabled (root and the daemon's user keep their access)")

    def privileged(self, peer: Peer) -> bool:
        """Root, the daemon's uid, the admin group: they always find a free connection."""
        return peer.uid in (0, self.daemon_uid) or (self.admin_gid is not None and self.admin_gid in peer.groups)

    def authorize(self, method: Method, peer: Peer) -> None:
        """Return if *peer* may call *method*, else raise -32001 saying what it needs."""
        if self.privileged(peer):
            return
        if not method.admin and self.read_gid is not None and self.read_gid in peer.groups:
            return
        raise RpcError(DENIED, f"permission denied: {method.name} needs {self._needs(method)}",
                       {"uid": peer.uid, "pid": peer.pid})

    def _needs(self, method: Method) -> str:
        if method.admin:
            if self.admin_gid is not None:
                return f"membership of the admin group ({self.admin_group})"
            return "root or the daemon's user (no admin group is configured)"
        names = [g for g, gid in ((self.read_group, self.read_gid), (self.admin_group, self.admin_gid))
                 if gid is not None]
        if names:
            return f"membership of {' or '.join(repr(n) for n in names)}"
        return "root or the daemon's user (no read or admin group is configured)"


def _gid(name: str | None, role: str, log: Any) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if (gid := ascii_int(name)) is not None:  # a gid, not a name ("١٢" is neither)
            return gid
        log.warning("control.group_missing", group=name, role=role,
                    note=f"no such group: the {role} group rule is disabled")
        return None


class ConnectionLimits:
    """How many connections each uid may hold, with room always left for the privileged.

    Without this a read-group member holding every connection made root's
    ``restore`` fail with "busy" for as long as it liked. Now: one unprivileged
    uid holds at most *per_uid*, the unprivileged together at most *total* -
    *reserved*, and root, the daemon's uid and the admin group may use every
    slot up to *total*. Only the event loop's thread calls these methods.
    """

    def __init__(self, *, total: int, per_uid: int, reserved: int) -> None:
        if not 0 <= reserved < total or per_uid < 1:
            raise ValueError("need 0 <= reserved < total and per_uid >= 1")
        self.total, self.per_uid, self.reserved = total, per_uid, reserved
        self._by_uid: Counter[int] = Counter()
        self._active = 0
        self._unprivileged = 0

    @property
    def active(self) -> int:
        return self._active

    def admit(self, peer: Peer, privileged: bool) -> str | None:
        """Take a slot for *peer*; None if granted, else why not (for the "busy" answer)."""
        if self._active >= self.total:
            return f"too many connections ({self.total})"
        if not privileged:
            if self._by_uid[peer.uid] >= self.per_uid:
                return f"too many connections from uid {peer.uid} ({self.per_uid})"
            if self._unprivileged >= self.total - self.reserved:
                return f"too many connections ({self.total - self.reserved} for non-admin users)"
            self._unprivileged += 1
            self._by_uid[peer.uid] += 1
        self._active += 1
        return None

    def release(self, peer: Peer, privileged: bool) -> None:
        """Give back the slot *admit* granted (with the same *privileged*)."""
        self._active -= 1
        if not privileged:
            self._unprivileged -= 1
            self._by_uid[peer.uid] -= 1
            if self._by_uid[peer.uid] <= 0:
                del self._by_uid[peer.uid]


#: Replies up to this size are always sent, whatever else is queued: the bound that
#: matters is on the large ones, and "busy" must never be the answer to ``status``.
SMALL_REPLY = 64 * 1024


class ReplyBudget:
    """Bytes of replies encoded and not yet taken by their clients, across connections.

    Without it, 64 clients asking for a 35 MB version and not reading held
    64 copies in the daemon's memory. A reply is counted from the moment it
    is encoded until the client's socket has taken it; a large one that does
    not fit is dropped (the client gets "busy" and may ask again). Taken on
    the server's worker threads, given back on its event loop: locked.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if n > SMALL_REPLY and self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n

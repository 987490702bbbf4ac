"""The client end of the control socket: find it, make sure the daemon is behind it, call.

Before a single byte is sent, the server's ``SO_PEERCRED`` (the credentials of
the process that listens, or of systemd when it holds the socket) must be
root, the daemon's user or the caller itself: a socket someone else created
first gets nothing, not even the method name, and its answers are never shown.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
from dataclasses import dataclass, field
from typing import Any

from . import paths, protocol
from .peers import peer_credentials


class Unreachable(Exception):
    """The daemon could not be reached, or what answered is not to be trusted."""


@dataclass
class Target:
    """Where to connect, whom to trust there, and what the hint should name."""

    path: str | None
    tried: list[str]
    trusted: dict[int, str] = field(default_factory=dict)
    daemon_user: str = paths.DAEMON_USER


def trusted_uids(daemon_user: str) -> dict[int, str]:
    """uid -> who: root, the caller, and the daemon's user when that user exists."""
    out = {0: "root", os.geteuid(): "you"}
    with contextlib.suppress(KeyError):
        out.setdefault(pwd.getpwnam(daemon_user).pw_uid, f"the daemon user {daemon_user}")
    return out


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def connect(target: Target, timeout: float) -> socket.socket:
    """A connected socket to a server run by a trusted uid; raises :class:`Unreachable`."""
    if target.path is None:
        raise Unreachable("no control socket found")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(target.path)
        server = peer_credentials(s)
    except OSError as exc:
        s.close()
        raise Unreachable(f"cannot connect to {target.path}: {exc.strerror or exc}") from None
    if server.uid not in target.trusted:
        s.close()
        allowed = ", ".join(sorted(set(target.trusted.values())))
        raise Unreachable(
            f"refusing to talk to {target.path}: it is served by {_user(server.uid)} (pid {server.pid}), "
            f"which is not {allowed}: someone else may have created this socket. Nothing was sent. "
            f"If that daemon is yours, name its user: --daemon-user USER or ${paths.DAEMON_USER_ENV}")
    return s


def call(target: Target, method: str, params: dict[str, Any], *, timeout: float) -> Any:
    """One JSON-RPC call; the result, or :class:`~sessionguard.protocol.RpcError` /
    :class:`Unreachable`."""
    s = connect(target, timeout)
    lines = protocol.LineBuffer(max_line=None)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # a busy server answers and closes at once: read what it said
            s.sendall(protocol.request(method, params))
        line = None
        while line is None:
            chunk = s.recv(1 << 20)
            if not chunk:
                line = lines.rest()
                break
            lines.feed(chunk)
            line = lines.next_line()
    except TimeoutError:
        raise Unreachable(f"{target.path}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise Unreachable(f"{target.path}: {exc.strerror or exc}") from None
    finally:
        s.close()
    if not line:
        raise Unreachable(f"{target.path}: the daemon closed the connection without answering")
    try:
        return protocol.parse_response(line)
    except ValueError as exc:
        raise Unreachable(f"{target.path}: not a sessionguard control socket ({exc})") from None


def unreachable_hint(target: Target, why: str) -> str:
    """What to check when the daemon cannot be reached: the paths tried, the group to join."""
    lines = [f"sessionguardctl: cannot reach sessionguardd: {why}", "  sockets tried:"]
    lines += [f"    {p}" for p in target.tried]
    group = _socket_group(target.path) or paths.READ_GROUP
    lines += [
        "  is the daemon running?   systemctl status sessionguard",
        f"  permission denied?       the socket is for root and members of its group ({group}; admins also "
        f"sessionguard-admin): sudo usermod -aG {group} $USER, then log in again",
        f"  another socket?          --socket PATH or ${paths.SOCKET_ENV}",
    ]
    return "\n".join(lines)


def _socket_group(path: str | None) -> str | None:
    """The socket file's group (the read group it was given), unless that says nothing."""
    if path is None:
        return None
    try:
        gid = os.stat(path).st_gid
        return grp.getgrgid(gid).gr_name if gid != 0 else None
    except (OSError, KeyError):
        return None

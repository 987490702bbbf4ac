"""The attacker's hands: a process running as an unprivileged user (``setpriv``) that does
what the test tells it, one JSON request per line on stdin, one JSON answer per line.

Standard library only (it runs as another user, with whatever interpreter that user can
run). Every file operation is the plain system call a hostile server user would make; a
refused one answers ``{"ok": false, "errno": N}`` instead of failing, so a test can prove
what the attacker can *not* do. Long operations (storms, floods) run in this process while
the test drives the daemon; ``serve`` runs a spoofed control socket instead of the loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_RENAME_EXCHANGE = 2
_FLOCK = struct.Struct("hhqqi4x")


def blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def session_bytes(sid: str, n: int, tag: str, extra: dict[str, Any] | None = None) -> bytes:
    """A hermes-shaped session written the way Python servers write it (``json``, indent 2)."""
    doc: dict[str, Any] = {"session_id": sid, "title": f"session {sid} {tag}", "model": "gpt-5",
                           "created_at": 1764000000.0, "updated_at": 1764000000.0 + n, "active_stream_id": None}
    doc.update(extra or {})
    doc["messages"] = [{"role": "user" if i % 2 == 0 else "assistant",
                        "content": f"{tag} message {i}: " + "lorem ipsum dolor sit amet " * 13,
                        "timestamp": 1764000000.0 + i} for i in range(n)]
    return json.dumps(doc, indent=2).encode()


def replace_file(path: str, data: bytes) -> None:
    """Save like hermes-webui: ``<sid>.tmp.<pid>.<tid>`` in the same directory, fsync, rename."""
    base = path[: -len(".json")] if path.endswith(".json") else path
    tmp = f"{base}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_in_place(path: str, data: bytes, pieces: int = 1) -> None:
    """Rewrite the file's own inode: truncate, then write in *pieces* (an editor, a second tool)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o660)
    try:
        os.ftruncate(fd, 0)
        step = max(len(data) // pieces, 1)
        for off in range(0, len(data), step):
            os.pwrite(fd, data[off:off + step], off)
    finally:
        os.close(fd)


class Agent:
    """The attacker's state between requests: held locks, held sockets, a spoofing thread."""

    def __init__(self) -> None:
        self.locks: list[int] = []
        self.socks: list[socket.socket] = []

    # -- files ------------------------------------------------------------------------

    def save(self, path: str, *, sid: str, n: int, tag: str = "", extra: dict[str, Any] | None = None,
             inplace: bool = False) -> dict[str, Any]:
        data = session_bytes(sid, n, tag, extra)
        (write_in_place if inplace else replace_file)(path, data)
        return {"hash": blake(data), "size": len(data)}

    def put(self, path: str, hex: str, inplace: bool = False) -> dict[str, Any]:
        data = bytes.fromhex(hex)
        (write_in_place if inplace else replace_file)(path, data)
        return {"hash": blake(data), "size": len(data)}

    def read(self, path: str) -> str:
        with open(path, "rb") as f:
            return f.read().hex()

    def open(self, path: str, write: bool = False) -> str:
        os.close(os.open(path, os.O_RDWR if write else os.O_RDONLY))
        return "opened"

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def exchange(self, a: str, b: str) -> None:
        """``renameat2(RENAME_EXCHANGE)``: both names swap atomically."""
        if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), a)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, path)

    def mkdir(self, path: str, mode: int = 0o770) -> None:
        """A directory with exactly *mode* (not masked by the umask)."""
        os.mkdir(path, mode)
        os.chmod(path, mode)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(path, mode)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rmtree(self, path: str) -> None:
        """``rm -rf`` that reports the first refusal instead of going on silently."""
        def fail(_func: Any, _path: str, exc: Any) -> None:
            raise exc[1] if isinstance(exc, tuple) else exc

        shutil.rmtree(path, onerror=fail)

    # -- locks --------------------------------------------------------------------------

    def lock(self, path: str, byte: int) -> None:
        """Hold an OFD write lock on one byte of *path* until :meth:`unlock`."""
        fd = os.open(path, os.O_RDWR)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        self.locks.append(fd)

    def unlock(self) -> None:
        while self.locks:
            os.close(self.locks.pop())

    # -- storms -------------------------------------------------------------------------

    def inplace_storm(self, path: str, sid: str, seconds: float, counts: list[int]) -> dict[str, Any]:
        """Rewrite *path* in place, in three pieces, cycling through *counts*, for *seconds*."""
        end = time.monotonic() + seconds
        writes = 0
        while time.monotonic() < end:
            n = counts[writes % len(counts)]
            write_in_place(path, session_bytes(sid, n, f"w{writes}"), pieces=3)
            writes += 1
            time.sleep(0.002)
        return {"writes": writes}

    def save_storm(self, path: str, sid: str, seconds: float, interval: float, stop_file: str) -> dict[str, Any]:
        """Save a new state of *path* every *interval* seconds until *stop_file* exists (at most
        *seconds*). Before each save, look at the live file: when it is not our last save, a
        restore replaced that save (it was live at the restore) and the store must hold it."""
        end = time.monotonic() + seconds
        saves: list[str] = []
        replaced: list[str] = []
        i = 0
        while time.monotonic() < end and not os.path.exists(stop_file):
            if saves:
                with open(path, "rb") as f:
                    if blake(f.read()) != saves[-1]:
                        replaced.append(saves[-1])
            data = session_bytes(sid, 20 + i % 7, f"save{i}")
            replace_file(path, data)
            saves.append(blake(data))
            i += 1
            time.sleep(interval)
        return {"saves": saves, "replaced": replaced}

    def rename_storm(self, names: list[str], seconds: float) -> dict[str, Any]:
        """Move the directory ``names[0]`` round ``names[1:]`` as fast as possible for *seconds*,
        picking it up again under ``names[0]`` whenever someone puts it back there. Stops early
        when a *different* directory appears under ``names[0]``: whoever put it back gave up
        and made a new one. Returns the renames made, whether that happened, and where the
        directory was left."""
        ident = os.lstat(names[0]).st_ino
        end = time.monotonic() + seconds
        cur, done, k = names[0], 0, 0
        next_look = 0.0
        while time.monotonic() < end:
            k = k % (len(names) - 1) + 1
            try:
                os.rename(cur, names[k])
                cur = names[k]
                done += 1
            except FileNotFoundError:
                cur = names[0]  # put back: take it again
            now = time.monotonic()
            if now >= next_look:
                next_look = now + 0.05
                try:
                    if cur != names[0] and os.lstat(names[0]).st_ino != ident:
                        return {"renames": done, "replaced": True, "left_at": cur}
                except FileNotFoundError:
                    pass
        return {"renames": done, "replaced": False, "left_at": cur}

    def create_many(self, folder: str, names: list[str], n: int) -> None:
        for name in names:
            replace_file(os.path.join(folder, name + ".json"), session_bytes(name, n, "flood"))

    def delete_many(self, folder: str, names: list[str]) -> None:
        for name in names:
            os.unlink(os.path.join(folder, name + ".json"))

    # -- sockets ------------------------------------------------------------------------

    def hold_connections(self, path: str, n: int) -> dict[str, int]:
        """Open *n* connections and keep them; a refused one gets one "busy" line at once."""
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            self.socks.append(s)
        time.sleep(2)
        import select

        busy = sum(1 for s in self.socks[-n:] if select.select([s], [], [], 0)[0])
        return {"busy": busy, "held": n - busy}

    def ask_and_do_not_read(self, path: str, n: int, line: str) -> int:
        """*n* clients each send *line* and never read the answer; returns how many connected."""
        made = 0
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(60)
            s.connect(path)
            s.sendall(line.encode())
            self.socks.append(s)
            made += 1
        return made

    def answers(self) -> list[Any]:
        """Read the one answer line of every held socket (closed or busy ones included)."""
        out: list[Any] = []
        for s in self.socks:
            s.settimeout(120)
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
            line = buf.partition(b"\n")[0]
            out.append(json.loads(line) if line else None)
        return out

    def close_sockets(self) -> None:
        while self.socks:
            self.socks.pop().close()


def serve(path: str, log: str) -> None:
    """A spoofed control socket: records every byte a client sends, answers "restored"."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    os.chmod(path, 0o777)
    srv.listen(8)
    print("ready", flush=True)
    while True:
        c, _ = srv.accept()
        c.settimeout(2)
        try:
            data = c.recv(65536)
        except OSError:
            data = b""
        with open(log, "ab") as f:
            f.write(b"<connection>" + data)
        try:
            c.sendall(b'{"jsonrpc": "2.0", "id": 1, "result": {"sid": "victim", "restored": {"id": "ffff", '
                      b'"count": 1000}, "pre_restore": null, "dry_run": false, "unchanged": false}}\n')
        except OSError:
            pass
        c.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
        return
    os.umask(0o007)  # the server's files are group-readable and writable (the packaged layout)
    agent = Agent()
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            reply: dict[str, Any] = {"ok": True, "value": getattr(agent, op)(**req)}
        except OSError as exc:
            reply = {"ok": False, "errno": exc.errno, "error": f"{errno.errorcode.get(exc.errno or 0, '?')}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()

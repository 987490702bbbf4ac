"""The control socket: JSON-RPC 2.0 over a Unix stream socket, one JSON object per line.

``sessionguardctl`` speaks it, and so can a person with
``socat - UNIX-CONNECT:/run/sessionguard.sock``::

    {"jsonrpc": "2.0", "id": 1, "method": "status"}
    {"jsonrpc": "2.0", "id": 2, "method": "history", "params": {"sid": "abc123"}}

Methods (params are by name; unknown params are refused):

=========  ===========================================================  ======
method     params                                                       access
=========  ===========================================================  ======
status     (none)                                                       read
list       shrunk_only: bool = false                                    read
history    sid, watch?                                                  read
show       sid, version?: str|null, watch?, messages: bool = false      read
diff       sid, version?: str|null, watch?                              read
sync       timeout: number = 5                                          read
metrics    (none)                                                       read
restore    sid, version?: str|null, watch?, dry_run: bool = false       admin
prune      (none)                                                       admin
=========  ===========================================================  ======

``version`` is a unique prefix of a version's content hash or its file
name; null (or absent) means the best version: most messages, then newest.

Who may call what is decided from the peer's credentials (``SO_PEERCRED``
plus its supplementary groups from ``SO_PEERGROUPS``): root and the daemon's
own uid may call everything; members of the read group or the admin group
may call read methods; only members of the admin group may call ``restore``
and ``prune``.

Errors are JSON-RPC errors. Besides the standard codes (-32700 parse error,
-32600 invalid request, -32601 method not found, -32602 invalid params,
-32603 internal error) the server uses:

* -32001 permission denied (``data``: the peer's ``uid`` and ``pid``),
  decided before the params are looked at;
* -32002 server busy (too many connections; the connection is then closed);
* -32003 the store could not carry the operation out (e.g. a session locked
  by another process, a full disk, a symlink where the live file was);
* -32004 not found (no such session, version or watch; or ambiguous);
* -32005 the version's content cannot be parsed (``diff``), or is nested too
  deeply to be sent back as JSON (``show``/``diff``).

Every backend call runs on a small thread pool, never on the event loop, so
a slow restore blocks neither other clients nor the daemon's watcher; the
event loop itself runs in a daemon thread of its own.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import grp
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from .count import CountSpec, parse
from .paths import default_socket_path
from .store import PruneReport, RestoreResult, StoreError, Version, validate_sid

__all__ = [
    "Backend",
    "ControlServer",
    "Peer",
    "RpcError",
    "default_socket_path",
    "peer_credentials",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
DENIED = -32001
BUSY = -32002
STORE_ERROR = -32003
NOT_FOUND = -32004
UNPROCESSABLE = -32005

#: A request line longer than this (without its newline) is refused and the client dropped.
MAX_LINE = 1024 * 1024
#: Linux ``SO_PEERGROUPS`` (4.13+); Python 3.11 has no constant for it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Upper bound of the ``sync`` timeout a client may ask for, in seconds.
MAX_SYNC_TIMEOUT = 300.0

_CRED = struct.Struct("3i")


class Backend(Protocol):
    """What the daemon offers the control socket (``daemon.py`` implements it).

    Every method may block (disk I/O, locks); the server only calls them on
    its thread pool. Lookups that fail raise ``LookupError`` (e.g.
    :class:`sessionguard.store.VersionNotFound`) with a message for the
    admin; ``KeyError``/``IndexError`` are treated as bugs, not as "not found".
    """

    def status(self) -> dict[str, Any]:
        """JSON-ready: version, uptime, watches, sessions, versions, store_bytes,
        events, last_reconcile, last_overflow, degraded (list of str)."""
        ...

    def list_sessions(self, shrunk_only: bool) -> list[dict[str, Any]]:
        """Each ``{"sid","watch","count","high_water","versions","last_shrink"}``."""
        ...

    def history(self, sid: str, watch: str | None) -> list[Version]: ...

    def read_version(self, sid: str, version: str | None, watch: str | None) -> tuple[Version, bytes]: ...

    def read_live(self, sid: str, watch: str | None) -> bytes | None: ...

    def spec(self, sid: str, watch: str | None) -> CountSpec: ...

    def restore(self, sid: str, version: str | None, watch: str | None, dry_run: bool) -> RestoreResult: ...

    def prune(self) -> PruneReport: ...

    def sync(self, timeout: float) -> bool: ...

    def metrics(self) -> str: ...


class RpcError(Exception):
    """A JSON-RPC error to send back as is."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection (as the kernel says)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_credentials(sock: Any) -> Peer:
    """``SO_PEERCRED`` plus ``SO_PEERGROUPS`` of a connected Unix socket.

    The supplementary groups are those the peer had when it connected. On a
    kernel without ``SO_PEERGROUPS`` the peer's groups fall back to the group
    database (``os.getgrouplist`` of its user name).
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
    import pwd

    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except (KeyError, OSError):
        return [gid]


class _NullLogger:
    def info(self, event: str, **kw: Any) -> None:
        pass

    warning = error = info


# -- parameter validation -------------------------------------------------------

_MISSING = object()
Validator = Callable[[str, Any], Any]


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RpcError(INVALID_PARAMS, f"invalid params: {name} must be true or false")
    return value


def _sid(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RpcError(INVALID_PARAMS, f"invalid params: {name} must be a string")
    try:
        sid = validate_sid(value)
    except ValueError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {name}: {exc}") from None
    # A recursive watch names a file in a sub-directory "sub%2Fname" (see
    # WatchState.identify/path_for), so "%2F" is a path separator once decoded:
    # "x%2F..%2F..%2Fetc" or "%2Fetc%2Fpasswd" would name a file outside the
    # watch. No real file's id decodes to an empty, "." or ".." component.
    parts = sid.replace("%2F", "/").replace("%25", "%").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RpcError(INVALID_PARAMS, f"invalid params: {name}: session id {sid!r} is no session's id "
                                       "(an encoded sub-directory path with an empty, '.' or '..' part)")
    return sid


def _opt_version(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or "/" in value or "\0" in value or len(value) > 255:
        raise RpcError(INVALID_PARAMS,
                       f"invalid params: {name} must be null or a version id (a hash prefix or a file name)")
    return value


def _opt_watch(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise RpcError(INVALID_PARAMS, f"invalid params: {name} must be a directory path")
    return value


def _timeout(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= MAX_SYNC_TIMEOUT):
        raise RpcError(INVALID_PARAMS, f"invalid params: {name} must be a number of seconds in (0, {MAX_SYNC_TIMEOUT:g}]")
    return float(value)


@dataclass(frozen=True)
class _Method:
    handler: str
    admin: bool
    params: dict[str, tuple[Validator, Any]]  # name -> (validator, default or _MISSING if required)


_SID = {"sid": (_sid, _MISSING), "watch": (_opt_watch, None)}
_METHODS: dict[str, _Method] = {
    "status": _Method("_m_status", False, {}),
    "list": _Method("_m_list", False, {"shrunk_only": (_bool, False)}),
    "history": _Method("_m_history", False, dict(_SID)),
    "show": _Method("_m_show", False, {**_SID, "version": (_opt_version, None), "messages": (_bool, False)}),
    "diff": _Method("_m_diff", False, {**_SID, "version": (_opt_version, None)}),
    "sync": _Method("_m_sync", False, {"timeout": (_timeout, 5.0)}),
    "metrics": _Method("_m_metrics", False, {}),
    "restore": _Method("_m_restore", True, {**_SID, "version": (_opt_version, None), "dry_run": (_bool, False)}),
    "prune": _Method("_m_prune", True, {}),
}


def _validate_params(method: str, spec: _Method, params: Any) -> dict[str, Any]:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "invalid params: params must be an object (by-name parameters)")
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        allowed = ", ".join(spec.params) or "none"
        raise RpcError(INVALID_PARAMS, f"invalid params: unknown param {unknown[0]!r} for {method} (allowed: {allowed})")
    out: dict[str, Any] = {}
    for name, (check, default) in spec.params.items():
        if name in params:
            out[name] = check(name, params[name])
        elif default is _MISSING:
            raise RpcError(INVALID_PARAMS, f"invalid params: {method} needs param {name!r}")
        else:
            out[name] = default
    return out


def _valid_id(rid: Any) -> bool:
    return rid is None or (isinstance(rid, (str, int, float)) and not isinstance(rid, bool))


# -- message helpers ------------------------------------------------------------

def _messages(data: bytes, spec: CountSpec) -> list[Any] | str:
    """The parsed messages of session bytes, or why they cannot be had."""
    if spec.kind == "jsonl":
        out = []
        for i, line in enumerate(line for line in data.split(b"\n") if line.strip()):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                return f"message line {i} is invalid JSON: {exc}"
        return out
    parsed = parse(data, spec)
    if not parsed.ok:
        return parsed.error or "unparseable"
    return list(parsed.messages or [])


def _is_too_deep(exc: Exception) -> bool:
    return isinstance(exc, orjson.JSONEncodeError) and "recursion" in str(exc).lower()


def _too_deep(method: str, exc: Exception) -> str:
    """Why a session's valid JSON cannot travel in a reply: orjson reads 1024
    levels of nesting but writes only 254."""
    return (f"{method}: the session's content cannot be sent as JSON ({exc}); "
            "the version file in the store holds it byte for byte")


def _canonical(message: Any) -> bytes:
    return orjson.dumps(message, option=orjson.OPT_SORT_KEYS)


# -- the server -----------------------------------------------------------------

class ControlServer:
    """The daemon's control socket.

    Either binds *path* itself (removing a stale socket there, never
    anything else; mode 0660, group = the read group, else the admin group)
    or serves *sock*, an already listening socket handed over by systemd
    socket activation, whose file it never removes.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        path: str | None = None,
        sock: socket.socket | None = None,
        read_group: str | None = None,
        admin_group: str | None = None,
        logger: Any = None,
        idle_timeout: float = 30.0,
        max_connections: int = 256,
        workers: int = 4,
        max_line: int = MAX_LINE,
        stop_grace: float = 2.0,
    ) -> None:
        if path is not None and sock is not None:
            raise ValueError("pass either path or sock, not both")
        self.backend = backend
        self.path = path if (path is not None or sock is not None) else default_socket_path()
        self._given_sock = sock
        self.read_group = read_group
        self.admin_group = admin_group
        self.log = logger if logger is not None else _NullLogger()
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_line = max_line
        self.stop_grace = stop_grace
        self._workers = workers
        self._uid = os.geteuid()
        self._read_gid: int | None = None
        self._admin_gid: int | None = None
        self._listen: socket.socket | None = None
        self._bound: tuple[str, int, int] | None = None  # (path, dev, ino) of a socket file we made
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._sync_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._conns: dict[asyncio.Task[Any], bool] = {}  # task -> busy with a request
        self._active = 0
        self._closing = False

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Bind (or adopt) the socket and serve it from a daemon thread. Returns once listening."""
        if self._thread is not None:
            raise RuntimeError("control server already started")
        self._read_gid = self._resolve_group(self.read_group, "read")
        self._admin_gid = self._resolve_group(self.admin_group, "admin")
        if self._given_sock is not None:
            self._listen = self._given_sock
            try:
                self.path = self._given_sock.getsockname() or self.path
            except OSError:
                pass
        else:
            assert self.path is not None
            self._listen = self._bind(self.path)
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="sg-control")
        # sync waits for the watcher; it gets its own workers so it never starves restores.
        self._sync_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="sg-control-sync")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="sg-control", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            self._cleanup_socket()
            raise failure[0]
        self.log.info("control.listening", path=self.path)

    def stop(self) -> None:
        """Stop listening, let in-flight requests finish briefly, remove our socket file."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                fut.result(self.stop_grace + 5)
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._thread = None
        for pool in (self._pool, self._sync_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._cleanup_socket()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _resolve_group(self, name: str | None, role: str) -> int | None:
        if not name:
            return None
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            if name.isdigit():
                return int(name)
            self.log.warning("control.group_missing", group=name, role=role,
                             note=f"no such group: the {role} group rule is disabled")
            return None

    def _bind(self, path: str) -> socket.socket:
        """Bind a fresh socket at *path* with mode 0660 and our group.

        The socket is bound under a temporary name beside *path*, given its
        mode and group, then renamed over *path*: the final name never has a
        looser mode, the process umask is not touched (other threads may be
        creating files), and a stale socket is replaced atomically. Anything
        at *path* that is not a socket is left alone and refused; a socket
        someone still listens on is refused too.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket: refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.settimeout(1.0)
                probe.connect(path)
            except OSError:
                pass  # nobody listening: stale
            else:
                raise OSError(errno.EADDRINUSE, f"{path}: another process is listening on it")
            finally:
                probe.close()
        directory, base = os.path.split(os.path.abspath(path))
        tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}")
        if len(os.fsencode(tmp)) >= 108:  # sun_path: bind in place, then chmod
            tmp = path
            if os.path.lexists(path):
                os.unlink(path)
        elif os.path.lexists(tmp):
            if stat.S_ISSOCK(os.lstat(tmp).st_mode):
                os.unlink(tmp)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(tmp)
            try:
                os.chmod(tmp, 0o660)
                gid = self._read_gid if self._read_gid is not None else self._admin_gid
                if gid is not None:
                    try:
                        os.chown(tmp, -1, gid)
                    except PermissionError:
                        pass
                if tmp != path:
                    os.rename(tmp, path)
            except BaseException:
                _unlink_socket(tmp)
                raise
            st = os.lstat(path)
            self._bound = (path, st.st_dev, st.st_ino)
            s.listen(512)
        except BaseException:
            s.close()
            raise
        return s

    def _cleanup_socket(self) -> None:
        if self._bound is None:
            return
        path, dev, ino = self._bound
        self._bound = None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
            _unlink_socket(path)

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_unix_server(self._on_client, sock=self._listen, limit=65536, backlog=512))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            # Whatever is still running after stop(): cancel it.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        idle = [t for t, busy in self._conns.items() if not busy]
        for t in idle:
            t.cancel()
        busy = [t for t, b in self._conns.items() if b]
        if busy:
            await asyncio.wait(busy, timeout=self.stop_grace)
        for t in list(self._conns):
            t.cancel()
        remaining = list(self._conns)
        if remaining:
            await asyncio.wait(remaining, timeout=1.0)

    # -- connections -----------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or self._active >= self.max_connections:
            try:
                writer.write(_response(None, error=(BUSY, "server busy: too many connections; try again", None)))
                await asyncio.wait_for(writer.drain(), 1.0)
            except (TimeoutError, OSError):
                pass
            finally:
                writer.close()
            return
        self._active += 1
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = False
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
            await self._serve(task, peer, reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, BrokenPipeError):
            pass
        except Exception as exc:
            self.log.error("control.error", method=None, error=repr(exc))
        finally:
            self._active -= 1
            self._conns.pop(task, None)
            writer.close()

    async def _serve(self, task: asyncio.Task[Any], peer: Peer, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        scanned = 0
        deadline: float | None = None  # a whole request line must arrive within idle_timeout
        while not self._closing:
            nl = buf.find(b"\n", scanned)
            if nl < 0:
                if len(buf) > self.max_line:
                    await self._too_long(peer, writer)
                    return
                scanned = len(buf)
                if deadline is None:
                    deadline = loop.time() + self.idle_timeout
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    self.log.info("control.client_dropped", reason="timeout", uid=peer.uid, pid=peer.pid)
                    return
                if not chunk:  # EOF: a last line without newline still counts
                    if buf.strip() and len(buf) <= self.max_line:
                        self._conns[task] = True
                        out = await self._handle_line(bytes(buf), peer)
                        if out is not None:
                            writer.write(out)
                            await asyncio.wait_for(writer.drain(), self.idle_timeout)
                    return
                buf += chunk
                continue
            if nl > self.max_line:
                await self._too_long(peer, writer)
                return
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            scanned = 0
            deadline = None
            if not line.strip():
                continue
            self._conns[task] = True
            try:
                out = await self._handle_line(line, peer)
                if out is not None:
                    writer.write(out)
                    try:
                        await asyncio.wait_for(writer.drain(), self.idle_timeout)
                    except TimeoutError:
                        self.log.info("control.client_dropped", reason="timeout", uid=peer.uid, pid=peer.pid)
                        return
            finally:
                self._conns[task] = False

    async def _too_long(self, peer: Peer, writer: asyncio.StreamWriter) -> None:
        self.log.info("control.client_dropped", reason="too_long", uid=peer.uid, pid=peer.pid)
        writer.write(_response(None, error=(INVALID_REQUEST, f"request line over {_human_limit(self.max_line)}", None)))
        try:
            await asyncio.wait_for(writer.drain(), 1.0)
        except TimeoutError:
            pass

    # -- requests --------------------------------------------------------------

    async def _handle_line(self, line: bytes, peer: Peer) -> bytes | None:
        """One request line in, one response line (or None for a notification) out."""
        try:
            req = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return _response(None, error=(PARSE_ERROR, f"parse error: {exc}", None))
        if isinstance(req, list):
            return _response(None, error=(INVALID_REQUEST,
                                          "batch requests are not supported: send one JSON object per line", None))
        if not isinstance(req, dict):
            return _response(None, error=(INVALID_REQUEST, "invalid request: must be a JSON object", None))
        notification = "id" not in req
        rid = req.get("id")
        if not _valid_id(rid):
            return _response(None, error=(INVALID_REQUEST, "invalid request: id must be a string, number or null",
                                          None))
        if req.get("jsonrpc") != "2.0":
            return _response(rid, error=(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', None))
        extra = sorted(set(req) - {"jsonrpc", "id", "method", "params"})
        if extra:
            return _response(rid, error=(INVALID_REQUEST, f"invalid request: unknown member {extra[0]!r}", None))
        method = req.get("method")
        if not isinstance(method, str):
            return _response(rid, error=(INVALID_REQUEST, "invalid request: method must be a string", None))
        try:
            result = await self._call(method, req.get("params"), peer)
        except RpcError as exc:
            if notification:
                return None
            return _response(rid, error=(exc.code, exc.message, exc.data))
        if notification:
            return None
        try:
            return _response(rid, result=result)
        except TypeError as exc:
            if _is_too_deep(exc):
                return _response(rid, error=(UNPROCESSABLE, _too_deep(method, exc), None))
            self.log.error("control.error", method=method, error=f"result is not JSON-serialisable: {exc}")
            return _response(rid, error=(INTERNAL_ERROR, "internal error (see the daemon's log)", None))

    async def _call(self, method: str, raw_params: Any, peer: Peer) -> Any:
        spec = _METHODS.get(method)
        if spec is None:
            raise RpcError(METHOD_NOT_FOUND, f"method not found: {method[:100]!r} (known: {', '.join(_METHODS)})")
        # Authorise first: a peer without the right group gets -32001 (and a
        # control.denied line) whatever it sends, not a lesson in our params.
        self._authorize(method, spec, peer)
        params = _validate_params(method, spec, raw_params)
        loop = asyncio.get_running_loop()
        pool = self._sync_pool if method == "sync" else self._pool
        handler = getattr(self, spec.handler)
        try:
            return await loop.run_in_executor(pool, handler, params, peer)
        except RpcError:
            raise
        except (KeyError, IndexError) as exc:
            self.log.error("control.error", method=method, error=repr(exc), uid=peer.uid, pid=peer.pid)
            raise RpcError(INTERNAL_ERROR, "internal error (see the daemon's log)") from None
        except LookupError as exc:
            raise RpcError(NOT_FOUND, str(exc) or "not found") from None
        except StoreError as exc:
            raise RpcError(STORE_ERROR, str(exc)) from None
        except OSError as exc:
            # The file system said no (a symlink or FIFO where the live file was, a
            # full or read-only disk, a permission): the caller needs the reason;
            # it is not a bug in the daemon.
            raise RpcError(STORE_ERROR, f"{method} failed: {exc.strerror or exc}"
                           + (f": {exc.filename}" if exc.filename else "")) from None
        except Exception as exc:
            if _is_too_deep(exc):
                raise RpcError(UNPROCESSABLE, _too_deep(method, exc)) from None
            self.log.error("control.error", method=method, error=repr(exc), uid=peer.uid, pid=peer.pid)
            raise RpcError(INTERNAL_ERROR, "internal error (see the daemon's log)") from None

    def _authorize(self, method: str, spec: _Method, peer: Peer) -> None:
        if peer.uid == 0 or peer.uid == self._uid:
            return
        if self._admin_gid is not None and self._admin_gid in peer.groups:
            return
        if not spec.admin and self._read_gid is not None and self._read_gid in peer.groups:
            return
        self.log.warning("control.denied", uid=peer.uid, pid=peer.pid, method=method)
        if spec.admin:
            need = f"membership of the admin group ({self.admin_group})" if self._admin_gid is not None \
                else "root or the daemon's user (no admin group is configured)"
        else:
            names = [g for g, gid in ((self.read_group, self._read_gid), (self.admin_group, self._admin_gid))
                     if gid is not None]
            need = f"membership of {' or '.join(repr(n) for n in names)}" if names \
                else "root or the daemon's user (no read or admin group is configured)"
        raise RpcError(DENIED, f"permission denied: {method} needs {need}", {"uid": peer.uid, "pid": peer.pid})

    # -- methods (run on the thread pool) --------------------------------------

    def _m_status(self, p: dict[str, Any], peer: Peer) -> Any:
        return self.backend.status()

    def _m_list(self, p: dict[str, Any], peer: Peer) -> Any:
        return {"sessions": self.backend.list_sessions(p["shrunk_only"])}

    def _m_history(self, p: dict[str, Any], peer: Peer) -> Any:
        versions = self.backend.history(p["sid"], p["watch"])
        return {"sid": p["sid"], "versions": [v.to_dict() for v in versions]}

    def _m_show(self, p: dict[str, Any], peer: Peer) -> Any:
        version, data = self.backend.read_version(p["sid"], p["version"], p["watch"])
        out: dict[str, Any] = version.to_dict()
        if p["messages"]:
            msgs = _messages(data, self.backend.spec(p["sid"], p["watch"]))
            if isinstance(msgs, str):
                out["messages"] = None
                out["messages_error"] = msgs
            else:
                out["messages"] = msgs
        return out

    def _m_diff(self, p: dict[str, Any], peer: Peer) -> Any:
        sid, watch = p["sid"], p["watch"]
        version, data = self.backend.read_version(sid, p["version"], watch)
        spec = self.backend.spec(sid, watch)
        vmsgs = _messages(data, spec)
        if isinstance(vmsgs, str):
            raise RpcError(UNPROCESSABLE, f"version {version.id} of {sid!r} cannot be parsed: {vmsgs}")
        live = self.backend.read_live(sid, watch)
        live_error: str | None = None
        lmsgs: list[Any] = []
        live_count: int | None = None
        if live is not None:
            parsed = _messages(live, spec)
            if isinstance(parsed, str):
                live_error = parsed
            else:
                lmsgs = parsed
                live_count = len(parsed)
        have = collections.Counter(_canonical(m) for m in lmsgs)
        missing = []
        for i, m in enumerate(vmsgs):
            key = _canonical(m)
            if have[key] > 0:
                have[key] -= 1
            else:
                missing.append({"index": i, "message": m})
        out: dict[str, Any] = {
            "sid": sid,
            "version": version.to_dict(),
            "version_count": len(vmsgs),
            "live_exists": live is not None,
            "live_count": live_count,
            "missing": missing,
            "missing_count": len(missing),
            "added_count": sum(have.values()),
        }
        if live_error is not None:
            out["live_error"] = live_error
        return out

    def _m_restore(self, p: dict[str, Any], peer: Peer) -> Any:
        result = self.backend.restore(p["sid"], p["version"], p["watch"], p["dry_run"])
        if not result.dry_run:
            self.log.warning(
                "session.restored", sid=result.sid, version=result.restored.id, count=result.restored.count,
                pre_restore=result.pre_restore.id if result.pre_restore else None,
                unchanged=result.unchanged, uid=peer.uid, pid=peer.pid,
            )
        return result.to_dict()

    def _m_prune(self, p: dict[str, Any], peer: Peer) -> Any:
        report = self.backend.prune()
        return {"removed": [v.to_dict() for v in report.removed], "bytes_freed": report.bytes_freed}

    def _m_sync(self, p: dict[str, Any], peer: Peer) -> Any:
        return {"synced": bool(self.backend.sync(p["timeout"]))}

    def _m_metrics(self, p: dict[str, Any], peer: Peer) -> Any:
        return {"text": self.backend.metrics()}


def _response(rid: Any, *, result: Any = None, error: tuple[int, str, Any] | None = None) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid}
    if error is not None:
        code, message, data = error
        err: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            err["data"] = data
        msg["error"] = err
    else:
        msg["result"] = result
    return orjson.dumps(msg) + b"\n"


def _human_limit(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} bytes"


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass

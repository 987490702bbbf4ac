"""The control socket's server: JSON-RPC 2.0 over a Unix stream socket, one object per line.

``sessionguardctl`` speaks it, and so can a person with
``socat - UNIX-CONNECT:/run/sessionguard.sock``::

    {"jsonrpc": "2.0", "id": 1, "method": "status"}
    {"jsonrpc": "2.0", "id": 2, "method": "history", "params": {"sid": "abc123"}}

The methods, their parameters and who may call them are in
:data:`sessionguard.protocol.METHODS`; the server checks every request
against that table (authorisation first, then the parameters) and calls
the :class:`Backend` method of the same name with the checked parameters
as keyword arguments plus ``caller``. What the backend returns is sent as
it is: the server adds no meaning, it only carries.

What the server bounds, so that no client can starve another or grow the
daemon: connections per uid, with room always left for root, the daemon's
uid and the admin group (:class:`~sessionguard.peers.ConnectionLimits`);
the size of a request line (1 MiB) and of a reply (``max_reply``, -32006
with a hint to ask for less); the bytes queued to clients that do not
read, across all connections (``max_queued``, -32002 past it); the time a
client may take to send a line or to read a reply (``idle_timeout``).

Every backend call, and the encoding of its reply, runs on a small thread
pool, never on the event loop, so a slow restore blocks neither other
clients nor the daemon's watcher; the event loop runs in a thread of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from . import protocol, sockfile
from .peers import Access, ConnectionLimits, Peer, ReplyBudget, peer_credentials
from .protocol import (
    BUSY,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    METHODS,
    TOO_LARGE,
    UNPROCESSABLE,
    Caller,
    LineBuffer,
    LineTooLong,
    Method,
    RpcError,
)

__all__ = ["Backend", "ControlServer"]

#: Replies are written in pieces of this size (see ControlServer._send).
SEND_CHUNK = 256 * 1024

class Backend(Protocol):
    """What the daemon offers the control socket; one method per protocol method.

    Every method takes keyword-only arguments named exactly like the
    protocol's parameters (checked and defaulted by the server) plus the
    ``caller``, and returns a JSON-ready dict. Errors raised on purpose are
    :mod:`sessionguard.errors` types (``NotFound``, ``StoreError``,
    ``Conflict``, ``Unprocessable``) or ``OSError``; anything else is a bug,
    logged as ``control.error`` and answered -32603. Every method may block:
    the server calls them on its thread pool only.
    """

    def status(self, *, watch: str | None, caller: Caller) -> dict[str, Any]: ...

    def list(self, *, watch: str | None, shrunk_only: bool, intended: bool, caller: Caller) -> dict[str, Any]: ...

    def history(self, *, sid: str, watch: str | None, caller: Caller) -> dict[str, Any]: ...

    def show(self, *, sid: str, version: str | None, most: bool, watch: str | None, messages: bool, first: int,
             limit: int | None, caller: Caller) -> dict[str, Any]: ...

    def diff(self, *, sid: str, version: str | None, most: bool, watch: str | None,
             caller: Caller) -> dict[str, Any]: ...

    def sync(self, *, timeout: float, caller: Caller) -> dict[str, Any]: ...

    def metrics(self, *, caller: Caller) -> dict[str, Any]: ...

    def restore(self, *, sid: str, version: str | None, most: bool, watch: str | None, dry_run: bool,
                expect: str | None, caller: Caller) -> dict[str, Any]: ...

    def recover(self, *, since: float | None, watch: str | None, dry_run: bool, undo: str | None,
                caller: Caller) -> dict[str, Any]: ...

    def forget(self, *, sid: str, watch: str | None, before: float | None, caller: Caller) -> dict[str, Any]: ...

    def prune(self, *, watch: str | None, caller: Caller) -> dict[str, Any]: ...


class _NullLogger:
    def info(self, event: str, **kw: Any) -> None:
        pass

    warning = error = info


def _human(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB".replace(".0 ", " ")
    if n >= 1024:
        return f"{n / 1024:.1f} KiB".replace(".0 ", " ")
    return f"{n} bytes"


def _is_too_deep(exc: Exception) -> bool:
    """orjson reads 1024 levels of nesting but writes only 254."""
    return isinstance(exc, orjson.JSONEncodeError) and "recursion" in str(exc).lower()


class ControlServer:
    """The daemon's control socket.

    Either binds *path* itself (see :func:`sessionguard.sockfile.bind`) or
    serves *sock*, an already listening socket handed over by systemd socket
    activation, whose file it never removes.
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
        max_per_uid: int = 32,
        reserved: int = 32,
        workers: int = 4,
        max_line: int = protocol.MAX_LINE,
        max_reply: int = 16 * 1024 * 1024,
        max_queued: int = 64 * 1024 * 1024,
        stop_grace: float = 2.0,
    ) -> None:
        if (path is None) == (sock is None):
            raise ValueError("pass either path or sock")
        self.backend = backend
        self.path = path
        self._given_sock = sock
        self.access = Access(os.geteuid(), read_group or None, admin_group or None)
        self.limits = ConnectionLimits(total=max_connections, per_uid=max_per_uid, reserved=reserved)
        self.budget = ReplyBudget(max_queued)
        self.log = logger if logger is not None else _NullLogger()
        self.idle_timeout = idle_timeout
        self.max_line = max_line
        self.max_reply = max_reply
        self.stop_grace = stop_grace
        self._workers = workers
        self._bound: sockfile.Bound | None = None
        self._listen: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._conns: dict[asyncio.Task[Any], bool] = {}  # task -> busy with a request
        self._over: set[int] = set()  # uids refused for their connection count, logged once
        self._closing = False

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Bind (or adopt) the socket and serve it from a daemon thread. Returns once listening."""
        if self._thread is not None:
            raise RuntimeError("control server already started")
        self.access.resolve(self.log)
        if self._given_sock is not None:
            self._listen = self._given_sock
            with contextlib.suppress(OSError):
                self.path = self._given_sock.getsockname() or self.path
        else:
            assert self.path is not None
            self._listen, self._bound = sockfile.bind(self.path, self.access.socket_groups(),
                                                      lambda role, gid, exc: self.access.disable(role, exc, self.log))
        # sync waits for the watcher: its own workers, so it never starves restores. A reply as
        # big as a session (show --messages, diff) holds the parsed session while it is built:
        # one at a time, so 64 such requests cost one session's memory, not 64.
        self._pools = {name: concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix=f"sg-control-{name}")
                       for name, n in (("small", self._workers), ("sync", 2), ("large", 1))}
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="sg-control", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            self._remove_socket()
            raise failure[0]
        self.log.info("control.listening", path=self.path)

    def stop(self) -> None:
        """Stop listening, let in-flight requests finish briefly, remove our socket file."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):  # stopping must not raise
                fut.result(self.stop_grace + 5)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._thread = None
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._remove_socket()

    def _remove_socket(self) -> None:
        if self._bound is not None:
            sockfile.remove_if_ours(self._bound)
            self._bound = None

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_unix_server(self._on_client, sock=self._listen, limit=65536, backlog=512))
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
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
        for t in [t for t, busy in self._conns.items() if not busy]:
            t.cancel()
        busy = [t for t, b in self._conns.items() if b]
        if busy:
            await asyncio.wait(busy, timeout=self.stop_grace)
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=1.0)

    # -- connections -----------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return
        privileged = self.access.privileged(peer)
        refused = "the daemon is stopping" if self._closing else self.limits.admit(peer, privileged)
        if refused is not None:
            await self._refuse(peer, writer, refused)
            return
        self._over.discard(peer.uid)
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = False
        try:
            await self._serve(task, peer, reader, writer)
        except (asyncio.CancelledError, ConnectionError):
            pass
        except Exception as exc:  # one client must never take the server down
            self.log.error("control.error", method=None, error=repr(exc), uid=peer.uid, pid=peer.pid)
        finally:
            self.limits.release(peer, privileged)
            self._conns.pop(task, None)
            writer.close()

    async def _refuse(self, peer: Peer, writer: asyncio.StreamWriter, why: str) -> None:
        if peer.uid not in self._over:  # once per uid and episode, not once per connection
            self._over.add(peer.uid)
            self.log.warning("control.busy", uid=peer.uid, pid=peer.pid, reason=why)
        try:
            writer.write(protocol.response(None, error=RpcError(BUSY, f"server busy: {why}; try again")))
            await asyncio.wait_for(writer.drain(), 1.0)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _serve(self, task: asyncio.Task[Any], peer: Peer, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        """Read lines, answer each in order; a whole line must arrive within idle_timeout."""
        loop = asyncio.get_running_loop()
        lines = LineBuffer(self.max_line)
        deadline: float | None = None
        while not self._closing:
            try:
                line = lines.next_line()
            except LineTooLong:
                await self._too_long(peer, writer)
                return
            if line is None:
                if deadline is None:
                    deadline = loop.time() + self.idle_timeout
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    self.log.info("control.client_dropped", reason="timeout", uid=peer.uid, pid=peer.pid)
                    return
                if not chunk:  # EOF: a last line without newline still counts
                    last = lines.rest()
                    if last.strip():
                        await self._answer(task, last, peer, writer)
                    return
                lines.feed(chunk)
                continue
            deadline = None
            if line.strip() and not await self._answer(task, line, peer, writer):
                return

    async def _answer(self, task: asyncio.Task[Any], line: bytes, peer: Peer, writer: asyncio.StreamWriter) -> bool:
        """Handle one request line and send its answer; False if the client was dropped."""
        self._conns[task] = True
        try:
            out = await self._handle_line(line, peer)
            if out is None:
                return True
            try:
                await self._send(writer, out)
            except TimeoutError:
                self.log.info("control.client_dropped", reason="not reading", uid=peer.uid, pid=peer.pid)
                writer.transport.abort()  # frees what it did not read, now
                return False
            finally:
                self.budget.give(len(out))
            return True
        finally:
            self._conns[task] = False

    async def _send(self, writer: asyncio.StreamWriter, out: bytes) -> None:
        """Write *out* piece by piece, each once the client has taken the one before, so the
        transport never copies a whole reply: a queued reply costs its size once. The client
        has ``idle_timeout`` to take all of it (``TimeoutError``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.idle_timeout
        view = memoryview(out)
        for start in range(0, len(view), SEND_CHUNK):
            writer.write(view[start:start + SEND_CHUNK])
            await asyncio.wait_for(writer.drain(), max(deadline - loop.time(), 0.0))

    async def _too_long(self, peer: Peer, writer: asyncio.StreamWriter) -> None:
        self.log.info("control.client_dropped", reason="too_long", uid=peer.uid, pid=peer.pid)
        writer.write(protocol.response(None, error=RpcError(INVALID_REQUEST,
                                                            f"request line over {_human(self.max_line)}")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), 1.0)

    # -- requests --------------------------------------------------------------

    async def _handle_line(self, line: bytes, peer: Peer) -> bytes | None:
        """One request line in, one response line out (None for a notification).
        The bytes returned have been taken from the reply budget."""
        req = protocol.parse_request(line)
        spec = METHODS.get(req.method)
        if req.error is not None:
            out = self._small(protocol.response(req.rid, error=req.error))
        elif spec is None:
            out = self._small(protocol.response(req.rid, error=RpcError(
                METHOD_NOT_FOUND, f"method not found: {req.method[:100]!r} (known: {', '.join(METHODS)})")))
        else:
            out = await self._call(spec, req.params, peer, req.rid)
        if req.notification:
            self.budget.give(len(out))
            return None
        return out

    def _small(self, out: bytes) -> bytes:
        """An error line: always fits the budget (see SMALL_REPLY), counted all the same."""
        self.budget.take(len(out))
        return out

    async def _call(self, spec: Method, raw_params: Any, peer: Peer, rid: Any) -> bytes:
        # Authorise first: a peer without the right group gets -32001 (and a
        # control.denied line) whatever it sends, not a lesson in our params.
        try:
            self.access.authorize(spec, peer)
        except RpcError as exc:
            self.log.warning("control.denied", uid=peer.uid, pid=peer.pid, method=spec.name)
            return self._small(protocol.response(rid, error=exc))
        try:
            params = protocol.check_params(spec, raw_params)
        except RpcError as exc:
            return self._small(protocol.response(rid, error=exc))
        loop = asyncio.get_running_loop()
        pool = self._pools["sync" if spec.name == "sync" else "large" if spec.large else "small"]
        work: Callable[[], bytes] = lambda: self._invoke(spec, params, Caller(peer.uid, peer.pid), rid)  # noqa: E731
        return await loop.run_in_executor(pool, work)

    def _invoke(self, spec: Method, params: dict[str, Any], caller: Caller, rid: Any) -> bytes:
        """On the pool: call the backend, encode its reply (a big one is encoded here, not on
        the loop) and take it from the budget here too: a reply that does not fit is dropped
        at once, so finished replies cannot pile up waiting for the loop."""
        try:
            result = getattr(self.backend, spec.name)(**params, caller=caller)
        except Exception as exc:  # mapped, or reported as a bug; never raised into the loop
            return self._small(protocol.response(rid, error=self._error_for(spec, exc, caller)))
        try:
            out = protocol.response(rid, result=result)
        except TypeError as exc:  # orjson.JSONEncodeError is one
            return self._small(protocol.response(rid, error=self._error_for(spec, exc, caller)))
        del result
        if len(out) > self.max_reply:
            hint = f"sessionguardctl {spec.smaller}" if spec.smaller else None
            return self._small(protocol.response(rid, error=RpcError(
                TOO_LARGE, f"{spec.name}: the reply ({_human(len(out))}) is over the {_human(self.max_reply)} limit"
                           + (f"; {hint}" if hint else ""),
                {"size": len(out), "limit": self.max_reply, "hint": hint})))
        if self.budget.take(len(out)):
            return out
        queued = _human(self.budget.used)
        self.log.warning("control.busy", uid=caller.uid, pid=caller.pid, method=spec.name,
                         reason=f"{queued} of replies queued to clients that are not reading them")
        return self._small(protocol.response(rid, error=RpcError(
            BUSY, f"server busy: {queued} of replies are waiting for clients to read them; try again")))

    def _error_for(self, spec: Method, exc: Exception, caller: Caller) -> RpcError:
        if _is_too_deep(exc):
            return RpcError(UNPROCESSABLE, f"{spec.name}: the session's content cannot be sent as JSON ({exc}); "
                                           "the version file in the store holds it byte for byte")
        err = protocol.to_rpc_error(exc)
        if err is not None:
            return err
        self.log.error("control.error", method=spec.name, error=repr(exc), uid=caller.uid, pid=caller.pid)
        return RpcError(INTERNAL_ERROR, "internal error (see the daemon's log)")

"""The control protocol, shared by the server (:mod:`.control`) and the client (:mod:`.ctl`).

JSON-RPC 2.0 over a Unix stream socket, one JSON object per line. This
module holds everything both ends must agree on, so they cannot drift:

* the error codes and the one error type, :class:`RpcError`;
* the framing: :func:`encode`, :func:`response`, :class:`LineBuffer`;
* :class:`Caller`, who asked (what the backend is told);
* :data:`METHODS`, the one method table: each method's access (read or
  admin), its parameters with the server's checks, and the client's
  command-line spelling of each parameter (``sessionguardctl`` builds its
  argument parser from it).

Only orjson and the standard library are imported: ``sessionguardctl``
loads this module on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from . import errors, params
from .params import MAX_SYNC_TIMEOUT

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
TOO_LARGE = -32006
CONFLICT = -32007

#: A request line longer than this (without its newline) is refused and the client dropped.
MAX_LINE = 1024 * 1024

__all__ = ["MAX_LINE", "MAX_SYNC_TIMEOUT", "METHODS", "Caller", "LineBuffer", "Method", "Param", "RpcError"]


class RpcError(errors.SessionGuardError):
    """A JSON-RPC error: raised by the server's checks, sent as is, raised again by the client."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@dataclass(frozen=True)
class Caller:
    """Who made a request, as the kernel says (``SO_PEERCRED``): for logs and audit lines."""

    uid: int
    pid: int


def to_rpc_error(exc: BaseException) -> RpcError | None:
    """The JSON-RPC error for an exception a backend raised on purpose; None for a bug.

    ``OSError`` is the file system saying no (a full or read-only disk, a
    symlink where the live file was): the caller needs its reason, and it
    is not a bug of the daemon.
    """
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, errors.NotFound):
        return RpcError(NOT_FOUND, str(exc) or "not found")
    if isinstance(exc, errors.Conflict):
        return RpcError(CONFLICT, str(exc) or "the live file changed since you looked")
    if isinstance(exc, errors.Unprocessable):
        return RpcError(UNPROCESSABLE, str(exc) or "cannot be processed")
    if isinstance(exc, errors.StoreError):
        return RpcError(STORE_ERROR, str(exc) or "the store could not do it")
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return RpcError(STORE_ERROR, f"{exc.strerror or exc}{where}")
    return None


# -- framing ---------------------------------------------------------------------


def encode(message: Any) -> bytes:
    """One JSON object and its newline."""
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)


def request(method: str, params: dict[str, Any] | None, rid: Any = 1) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params:
        msg["params"] = params
    return encode(msg)


def response(rid: Any, *, result: Any = None, error: RpcError | None = None) -> bytes:
    """A response line; raises orjson's ``JSONEncodeError`` when *result* cannot be encoded."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid}
    if error is not None:
        err: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.data is not None:
            err["data"] = error.data
        msg["error"] = err
    else:
        msg["result"] = result
    return encode(msg)


def parse_response(line: bytes) -> Any:
    """The result of a response line; raises :class:`RpcError` for an error response and
    ``ValueError`` for a line that is not a JSON-RPC response at all."""
    try:
        msg = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError("the answer is not JSON") from exc
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or not ("result" in msg or "error" in msg):
        raise ValueError("the answer is not a JSON-RPC 2.0 response")
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        code = err.get("code")
        raise RpcError(code if type(code) is int else INTERNAL_ERROR, str(err.get("message") or "error"),
                       err.get("data"))
    return msg["result"]


@dataclass(frozen=True)
class Request:
    """One request line, read. A line that is no well-formed request has *error*
    set: the answer to send (to *rid*, or to null when the id was unreadable)."""

    rid: Any
    notification: bool
    method: str = ""
    params: Any = None
    error: RpcError | None = None


def parse_request(line: bytes) -> Request:
    """JSON-RPC 2.0's rules for one line (batches are refused: one object per line)."""
    try:
        req = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return Request(None, False, error=RpcError(PARSE_ERROR, f"parse error: {exc}"))
    if isinstance(req, list):
        return Request(None, False, error=RpcError(
            INVALID_REQUEST, "batch requests are not supported: send one JSON object per line"))
    if not isinstance(req, dict):
        return Request(None, False, error=RpcError(INVALID_REQUEST, "invalid request: must be a JSON object"))
    rid = req.get("id")
    if not (rid is None or (isinstance(rid, (str, int, float)) and not isinstance(rid, bool))):
        return Request(None, False, error=RpcError(INVALID_REQUEST,
                                                    "invalid request: id must be a string, number or null"))
    why = ""
    extra = sorted(str(k) for k in set(req) - {"jsonrpc", "id", "method", "params"})
    if req.get("jsonrpc") != "2.0":
        why = '"jsonrpc" must be "2.0"'
    elif extra:
        why = f"unknown member {extra[0][:100]!r}"
    elif not isinstance(req.get("method"), str):
        why = "method must be a string"
    if why:
        return Request(rid, False, error=RpcError(INVALID_REQUEST, f"invalid request: {why}"))
    return Request(rid, "id" not in req, req["method"], req.get("params"))


class LineTooLong(Exception):
    """A line grew past the limit before its newline arrived."""


class LineBuffer:
    """Splits a byte stream into lines, refusing any line over *max_line* bytes.

    Each byte is scanned once, however the stream is chunked; the server
    feeds it what a client sends, the client what the server answers.
    """

    def __init__(self, max_line: int | None = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        """The next complete line without its newline, or None until more is fed."""
        nl = self._buf.find(b"\n", self._scanned)
        if nl < 0:
            self._scanned = len(self._buf)
            if self.max_line is not None and len(self._buf) > self.max_line:
                raise LineTooLong
            return None
        if self.max_line is not None and nl > self.max_line:
            raise LineTooLong
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        self._scanned = 0
        return line

    def rest(self) -> bytes:
        """What is left after the last newline (a last line sent without one, at EOF)."""
        return bytes(self._buf)


# -- the method table --------------------------------------------------------------

REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """One parameter: the server's check and default, and its command-line spelling.

    *cli* is ``"SID"`` for a positional argument, ``"--flag"`` for an option, ``""``
    for one the client sets itself (``watch`` comes from the global ``--watch``).
    An option with *convert* takes a value (argparse ``type=``); without, it is a
    boolean switch.
    """

    name: str
    check: params.Check
    default: Any = REQUIRED
    cli: str = ""
    help: str = ""
    convert: Callable[[str], Any] | None = None
    metavar: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Method:
    """One method: who may call it, its parameters, and what the client says about it."""

    name: str
    admin: bool
    params: tuple[Param, ...]
    help: str
    #: How to ask for less when the reply is over the size limit (-32006).
    smaller: str = ""

    @property
    def access(self) -> str:
        return "admin" if self.admin else "read"

    @property
    def large(self) -> bool:
        """Its reply can be as big as a session (it says how to ask for less)."""
        return bool(self.smaller)

    def takes(self, name: str) -> bool:
        return any(p.name == name for p in self.params)


SID = Param("sid", params.sid, cli="SID", help="session id")
VERSION = Param("version", params.version, None, "VERSION",
                "a unique prefix of a version's id, or its file name (default: the version restore picks)")
WATCH = Param("watch", params.watch, None)
MOST = Param("most", params.boolean, False, "--most", "the version with the most messages instead")
WHEN_HELP = "90s, 30m, 2h, 1d ago, or a local date/time like 2026-11-24T10:00"

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("status", False, (WATCH,), "the daemon's state: health, watches, sessions, store size"),
    Method("list", False, (
        WATCH,
        Param("shrunk_only", params.boolean, False, "--shrunk",
              "only sessions whose latest change is an unintended loss"),
        Param("intended", params.boolean, False, "--all", "with --shrunk: also sessions shrunk on purpose"),
    ), "sessions known to the daemon: state, message counts, versions"),
    Method("history", False, (SID, WATCH), "every kept version of a session, oldest first"),
    Method("show", False, (
        SID, VERSION, MOST, WATCH,
        Param("messages", params.boolean, False, "--messages", "also print the version's messages"),
        Param("first", params.first, 0, "--first", "with --messages: start at message N (from 0)",
              params.natural_int, "N"),
        Param("limit", params.limit, None, "--limit", "with --messages: at most N messages", params.positive_int,
              "N"),
    ), "one version's details, optionally its messages",
        smaller="page the messages: show SID --messages --first 0 --limit 1000"),
    Method("diff", False, (SID, VERSION, MOST, WATCH), "messages of a version that are missing from the live file",
           smaller="look at the version page by page: show SID VERSION --messages --first 0 --limit 1000"),
    Method("sync", False, (
        Param("timeout", params.timeout, 5.0, "--timeout", "seconds the daemon may wait (default: 5)",
              params.positive_seconds, "S"),
    ), "wait until the daemon has processed every change made before this call"),
    Method("metrics", False, (), "Prometheus metrics text"),
    Method("restore", True, (
        SID, VERSION, MOST, WATCH,
        Param("dry_run", params.boolean, False, "--dry-run", "only say what would be restored"),
        Param("expect", params.content_id, None, "--expect",
              "refuse unless the live file still has this content id (diff shows it)", str, "ID"),
    ), "put a version back as the live file (the live file is kept first: undoable)"),
    Method("recover", True, (
        Param("since", params.unix_time, None, "--since", f"only losses since WHEN: {WHEN_HELP}",
              params.parse_when, "WHEN"),
        WATCH,
        Param("dry_run", params.boolean, False, "--dry-run", "only say what would be done"),
        Param("undo", params.run_id, None, "--undo", "undo a whole recover run", str, "RUN"),
    ), "restore every session whose latest change is an unintended loss (incident recovery)"),
    Method("forget", True, (
        SID, WATCH,
        Param("before", params.unix_time, None, "--before", f"only versions older than WHEN: {WHEN_HELP}",
              params.parse_when, "WHEN"),
    ), "erase a session's versions and pin from the store (on request)"),
    Method("prune", True, (WATCH,), "apply the retention rules to the store now"),
)}


def check_params(method: Method, given: Any) -> dict[str, Any]:
    """Every parameter of *method*, checked, with defaults filled in; unknown ones are refused."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise RpcError(INVALID_PARAMS, "invalid params: params must be an object (by-name parameters)")
    known = {p.name for p in method.params}
    unknown = sorted(str(k) for k in given if k not in known)
    if unknown:
        allowed = ", ".join(p.name for p in method.params) or "none"
        raise RpcError(INVALID_PARAMS,
                       f"invalid params: unknown param {unknown[0][:100]!r} for {method.name} (allowed: {allowed})")
    out: dict[str, Any] = {}
    for p in method.params:
        if p.name in given:
            try:
                out[p.name] = p.check(given[p.name])
            except ValueError as exc:
                raise RpcError(INVALID_PARAMS, f"invalid params: {p.name}: {exc}") from None
        elif p.required:
            raise RpcError(INVALID_PARAMS, f"invalid params: {method.name} needs param {p.name!r}")
        else:
            out[p.name] = p.default
    return out

"""A canned control backend (no semantics: for transport and formatting tests), a
structlog-style recording logger, and raw socket helpers for the control tests."""

from __future__ import annotations

import copy
import shutil
import socket
import subprocess
import tempfile
import threading
from typing import Any

import orjson


class Recorder:
    """A structlog-style logger that remembers every event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def _add(self, level: str, event: str, **kw: Any) -> None:
        with self.lock:
            self.events.append((level, event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)

    def named(self, event: str) -> list[dict[str, Any]]:
        with self.lock:
            return [kw for _, e, kw in self.events if e == event]


VERSION = {"id": "813c9a4ef3e75045", "sid": "abc123def456", "created": "2026-11-24T11:47:42.517069+00:00",
           "count": 1000, "size": 412345, "reason": "shrink", "source": "daemon", "method": "copy",
           "name": "20261124T114742.517069Z_1000msgs_shrink_daemon_copy_813c9a4ef3e75045.version"}
PRE = dict(VERSION, id="61bac1a892608be6", count=0, size=300, reason="pre-restore", source="admin",
           name="20261124T120000.000000Z_0msgs_pre-restore_admin_copy_61bac1a892608be6.version")
WATCH = {"path": "/srv/chat/sessions", "available": True, "inotify": True, "pin": "auto", "pin_method": "reflink",
         "store": "/srv/chat/sessions/.sessionguard", "sessions": 2, "versions": 3, "store_bytes": 824690,
         "last_reconcile": "2026-11-24T11:50:00+00:00", "last_shrink": "2026-11-24T11:47:42+00:00", "degraded": []}

#: A result of the documented shape for every method (README, "The control socket").
CANNED: dict[str, dict[str, Any]] = {
    "status": {"version": "0.1.0", "pid": 4242, "uptime": 3725.0, "degraded": [], "queued": 0, "events": 120,
               "evaluations": 80, "versions_kept": 3, "restores": 1, "errors": 0, "overflows": 0,
               "last_overflow": None, "shrinks": {"wipe": 2, "truncate": 1}, "sessions": 2, "versions": 3,
               "store_bytes": 824690, "overwritten_restores": [], "watches": [WATCH]},
    "list": {"sessions": [
        {"sid": "abc123def456", "watch": WATCH["path"], "state": "shrunk", "count": 0, "high_water": 1000,
         "versions": 1, "last_loss": {"reason": "shrink", "at": VERSION["created"], "before": 1000, "after": 0},
         "overwritten": None},
        {"sid": "steady", "watch": WATCH["path"], "state": "ok", "count": 5, "high_water": 5, "versions": 0,
         "last_loss": None, "overwritten": None}]},
    "history": {"sid": "abc123def456", "watch": WATCH["path"], "versions": [VERSION], "restore": VERSION["id"],
                "most": VERSION["id"]},
    "show": dict(VERSION, messages=None, first=0, total=1000),
    "diff": {"sid": "abc123def456", "version": VERSION, "version_count": 1000, "live_exists": True,
             "live_count": 0, "live_id": PRE["id"], "missing": [{"index": 0, "message": {"role": "user",
                                                                                         "content": "hello"}}],
             "missing_count": 1, "added_count": 0},
    "sync": {"synced": True},
    "metrics": {"text": "# TYPE sessionguard_versions gauge\nsessionguard_versions 3\n"},
    "restore": {"sid": "abc123def456", "watch": WATCH["path"], "restored": VERSION, "pre_restore": PRE,
                "live_count_before": 0, "dry_run": False, "unchanged": False, "hint": None, "overwritten": None},
    "recover": {"run": "r20261124T120000-1", "dry_run": False, "since": None, "hint": None, "sessions": [
        {"sid": "abc123def456", "watch": WATCH["path"], "live": "present", "before": 0, "after": 1000,
         "version": VERSION["id"], "outcome": "restored", "why": None, "overwritten": False}]},
    "forget": {"sid": "abc123def456", "watch": WATCH["path"], "removed": 2, "bytes_freed": 412645},
    "prune": {"removed": [], "bytes_freed": 0},
}


class CannedBackend:
    """A control Backend with no semantics at all: each method returns a canned result of the
    documented shape (``CANNED``, or one a test sets in ``results``) and records its call.

    For the transport tests (the server's checks, errors, limits) and the client's formatting
    and exit codes. What the results *mean* is tested against the real daemon (daemonproc.py).
    ``raises[name]`` makes a method raise; ``gates[name]`` makes it block until that event is
    set (``entered`` is set when it starts waiting).
    """

    def __init__(self, results: dict[str, Any] | None = None) -> None:
        self.results = {**CANNED, **(results or {})}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.raises: dict[str, BaseException] = {}
        self.gates: dict[str, threading.Event] = {}
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def _answer(self, name: str, kw: dict[str, Any]) -> Any:
        with self.lock:
            self.calls.append((name, kw))
        gate = self.gates.get(name)
        if gate is not None:
            self.entered.set()
            gate.wait(10)
        if name in self.raises:
            raise self.raises[name]
        return copy.deepcopy(self.results[name])

    def called(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [kw for n, kw in self.calls if n == name]

    def status(self, *, watch, caller):
        return self._answer("status", {"watch": watch, "caller": caller})

    def list(self, *, watch, shrunk_only, intended, caller):
        return self._answer("list", {"watch": watch, "shrunk_only": shrunk_only, "intended": intended,
                                     "caller": caller})

    def history(self, *, sid, watch, caller):
        return self._answer("history", {"sid": sid, "watch": watch, "caller": caller})

    def show(self, *, sid, version, most, watch, messages, first, limit, caller):
        return self._answer("show", {"sid": sid, "version": version, "most": most, "watch": watch,
                                     "messages": messages, "first": first, "limit": limit, "caller": caller})

    def diff(self, *, sid, version, most, watch, caller):
        return self._answer("diff", {"sid": sid, "version": version, "most": most, "watch": watch, "caller": caller})

    def sync(self, *, timeout, caller):
        return self._answer("sync", {"timeout": timeout, "caller": caller})

    def metrics(self, *, caller):
        return self._answer("metrics", {"caller": caller})

    def restore(self, *, sid, version, most, watch, dry_run, expect, caller):
        return self._answer("restore", {"sid": sid, "version": version, "most": most, "watch": watch,
                                        "dry_run": dry_run, "expect": expect, "caller": caller})

    def recover(self, *, since, watch, dry_run, undo, caller):
        return self._answer("recover", {"since": since, "watch": watch, "dry_run": dry_run, "undo": undo,
                                        "caller": caller})

    def forget(self, *, sid, watch, before, caller):
        return self._answer("forget", {"sid": sid, "watch": watch, "before": before, "caller": caller})

    def prune(self, *, watch, caller):
        return self._answer("prune", {"watch": watch, "caller": caller})


def short_tmpdir(prefix: str = "sg") -> str:
    """A short directory in /tmp (sun_path is 108 bytes; pytest's tmp_path can be longer)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- raw socket helpers ---------------------------------------------------------

def connect(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def read_line(s: socket.socket, buf: bytearray | None = None) -> bytes:
    """One response line (b"" on EOF before a full line)."""
    buf = bytearray() if buf is None else buf
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return b""
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def rpc_raw(path: str, line: bytes) -> dict[str, Any] | None:
    """Send one raw line on a new connection, return the parsed answer (None on EOF)."""
    with connect(path) as s:
        s.sendall(line)
        out = read_line(s)
    return orjson.loads(out) if out else None


def rpc(path: str, method: str, params: dict[str, Any] | None = None, rid: Any = 1) -> dict[str, Any]:
    req: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        req["params"] = params
    resp = rpc_raw(path, orjson.dumps(req) + b"\n")
    assert resp is not None
    return resp


def result(path: str, method: str, params: dict[str, Any] | None = None) -> Any:
    resp = rpc(path, method, params)
    assert "error" not in resp, resp
    return resp["result"]


def run_as(who: str, accounts, public_client, sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run sessionguardctl as one of the throwaway users."""
    py, env = public_client
    pw = accounts["users"][who]
    cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
           py, "-m", "sessionguard.ctl", "--socket", sock, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)

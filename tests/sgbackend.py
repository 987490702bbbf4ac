"""A small concrete control backend over real Guards (a fake daemon, not a fake filesystem),
a structlog-style recording logger, and raw socket helpers for the control tests."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from datetime import datetime, timezone
import subprocess
from typing import Any

import orjson

from sessionguard import Guard
from sessionguard import fsutil
from sessionguard.count import CountSpec, parse
from sessionguard.store import PruneReport, RestoreResult, Version, validate_sid

from sghelpers import make_session


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


class GuardBackend:
    """The control Backend over one Guard per watched directory."""

    LOSS = ("shrink", "unparseable", "deleted")

    def __init__(self, guards: list[Guard]) -> None:
        self.guards = {g.session_dir: g for g in guards}
        self.started = time.time()
        self.sync_calls: list[float] = []

    def _known(self, g: Guard, sid: str) -> bool:
        return sid in g.store.sessions() or os.path.lexists(g.path(sid))

    def _guard(self, sid: str, watch: str | None) -> Guard:
        validate_sid(sid)
        if watch is not None:
            g = self.guards.get(os.path.abspath(watch))
            if g is None:
                raise LookupError(f"{watch} is not a watched directory")
            if not self._known(g, sid):
                raise LookupError(f"no session {sid!r} in {watch}")
            return g
        hits = [g for g in self.guards.values() if self._known(g, sid)]
        if not hits:
            raise LookupError(f"no session {sid!r}")
        if len(hits) > 1:
            raise LookupError(f"session {sid!r} is in several watches ({', '.join(sorted(self.guards))}): "
                              "pass --watch")
        return hits[0]

    def _live_sids(self, g: Guard) -> set[str]:
        return {n[: -len(g.suffix)] for n in os.listdir(g.session_dir)
                if n.endswith(g.suffix) and not n.startswith(".")}

    def _live_count(self, g: Guard, sid: str) -> int | None:
        data = self.read_live(sid, g.session_dir)
        return None if data is None else parse(data, g.spec).count

    def status(self) -> dict[str, Any]:
        versions, size = 0, 0
        sessions = 0
        for g in self.guards.values():
            n, b = g.store.usage()
            versions += n
            size += b
            sessions += len(set(g.store.sessions()) | self._live_sids(g))
        return {
            "version": "test", "uptime": time.time() - self.started, "watches": sorted(self.guards),
            "sessions": sessions, "versions": versions, "store_bytes": size, "events": 0,
            "last_reconcile": datetime.now(timezone.utc).isoformat(), "last_overflow": None, "degraded": [],
        }

    def list_sessions(self, shrunk_only: bool) -> list[dict[str, Any]]:
        out = []
        for watch, g in sorted(self.guards.items()):
            for sid in sorted(set(g.store.sessions()) | self._live_sids(g)):
                versions = g.store.versions(sid)
                count = self._live_count(g, sid)
                counts = [v.count for v in versions if v.count is not None] + ([count] if count is not None else [])
                losses = [v.created for v in versions if v.reason in self.LOSS]
                if shrunk_only and not losses:
                    continue
                out.append({
                    "sid": sid, "watch": watch, "count": count, "high_water": max(counts, default=None),
                    "versions": len(versions),
                    "last_shrink": datetime.fromtimestamp(max(losses), timezone.utc).isoformat() if losses else None,
                })
        return out

    def history(self, sid: str, watch: str | None) -> list[Version]:
        return self._guard(sid, watch).store.versions(sid)

    def read_version(self, sid: str, version: str | None, watch: str | None) -> tuple[Version, bytes]:
        store = self._guard(sid, watch).store
        v = store.find(sid, version)
        return v, store.read_version(v)

    def read_live(self, sid: str, watch: str | None) -> bytes | None:
        g = self._guard(sid, watch)
        try:
            data, _ = fsutil.read_regular(g.path(sid), g.max_bytes)
        except FileNotFoundError:
            return None
        return data

    def spec(self, sid: str, watch: str | None) -> CountSpec:
        return self._guard(sid, watch).spec

    def restore(self, sid: str, version: str | None, watch: str | None, dry_run: bool) -> RestoreResult:
        g = self._guard(sid, watch)
        return g.store.restore(sid, g.path(sid), version, spec=g.spec, source="admin", dry_run=dry_run)

    def prune(self) -> PruneReport:
        total = PruneReport()
        for g in self.guards.values():
            r = g.store.prune()
            total.removed += r.removed
            total.bytes_freed += r.bytes_freed
        return total

    def sync(self, timeout: float) -> bool:
        self.sync_calls.append(timeout)
        return True

    def metrics(self) -> str:
        n = sum(g.store.usage()[0] for g in self.guards.values())
        return f"# TYPE sessionguard_versions gauge\nsessionguard_versions {n}\n"


SID = "abc123def456"


def populate(root: str) -> tuple[list[Guard], dict[str, Any]]:
    """Two watched dirs of real sessions with real versions.

    * ``SID`` in ``a``: saved with 10 messages, then shrunk to 3 (one ``shrink`` version of 10);
    * ``steady`` in ``a``: 5 messages, never shrunk;
    * ``dup`` in both ``a`` and ``b`` (ambiguous without a watch).
    """
    a = os.path.join(root, "a")
    b = os.path.join(root, "b")
    os.mkdir(a)
    os.mkdir(b)
    ga, gb = Guard(a), Guard(b)
    ga.save(SID, make_session(10, SID))
    shrunk = make_session(10, SID)
    shrunk["messages"] = shrunk["messages"][:3]
    ga.save(SID, shrunk)
    ga.save("steady", make_session(5, "steady"))
    ga.save("dup", make_session(4, "dup"))
    ga.save("dup", make_session(2, "dup"))
    gb.save("dup", make_session(6, "dup"))
    return [ga, gb], {"a": a, "b": b}


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
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)

"""The control backend over today's daemon internals (temporary).

Implements :class:`sessionguard.control.Backend` with the tracker and stores
the daemon has now, so the daemon and its tests keep working while the core
is rewritten; the real service on the new core replaces this file. It keeps
today's rules: ``restore`` with no version picks the version with the most
messages (``restore`` and ``most`` in ``history`` are that one), ``expect`` is
checked just before the restore (not under the session lock), and
``recover``/``forget`` are not implemented (``NotFound``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from . import __version__, errors, fsutil
from .count import CountSpec, parse
from .protocol import Caller
from .store import Store, StoreError, Version, VersionNotFound, content_hash
from .tracker import Tracker, WatchState
from .watch import Watcher

#: Store usage walks every session folder: cached this long, per watch.
USAGE_CACHE_SECONDS = 60.0
_LOSSES = ("shrink", "unparseable", "deleted")


class Host(Protocol):
    """What the service reads from the daemon (replaced on reload, so read each time)."""

    tracker: Tracker
    watcher: Watcher
    started: float
    log: Any


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Today's store raises its own types: say them in :mod:`sessionguard.errors` terms."""
    try:
        yield
    except VersionNotFound as exc:
        raise errors.NotFound(str(exc)) from None
    except StoreError as exc:
        raise errors.StoreError(str(exc)) from None


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


def _missing(version: list[Any], live: list[Any]) -> tuple[list[dict[str, Any]], int]:
    """Messages of *version* not in *live* (compared as a multiset of canonical JSON,
    key order ignored), and how many of *live* are not in *version*."""
    def canonical(message: Any) -> bytes:
        return orjson.dumps(message, option=orjson.OPT_SORT_KEYS)

    have = collections.Counter(canonical(m) for m in live)
    missing = []
    for i, m in enumerate(version):
        key = canonical(m)
        if have[key] > 0:
            have[key] -= 1
        else:
            missing.append({"index": i, "message": m})
    return missing, sum(have.values())


class DaemonService:
    """The control backend of a running :class:`sessionguard.daemon.Daemon`."""

    def __init__(self, host: Host, *, describe: Callable[[WatchState], dict[str, Any]],
                 polled: Callable[[], Collection[str]]) -> None:
        self.host = host
        self._describe = describe
        self._polled = polled
        self._usage: dict[str, tuple[float, int, int]] = {}

    # -- helpers -------------------------------------------------------------

    def _watches(self, watch: str | None) -> list[WatchState]:
        all_ = self.host.tracker.watches
        if watch is None:
            return list(all_)
        hits = [ws for ws in all_ if os.path.abspath(ws.root) == os.path.normpath(watch)]
        if not hits:
            raise errors.NotFound(f"{watch} is not a watched directory (watched: {', '.join(w.root for w in all_)})")
        return hits

    def _locate(self, sid: str, watch: str | None) -> tuple[WatchState, Store]:
        """The watch holding *sid*: tracked now, or with a folder in the store. A file
        merely existing as ``<sid>.json`` (``_index.json``, a symlink) is no session."""
        hits = [ws for ws in self._watches(watch) if ws.store is not None
                and (sid in ws.files or os.path.isdir(ws.store.session_dir(sid)))]
        if not hits:
            raise errors.NotFound(f"no session {sid!r}" + (f" in watch {watch}" if watch else ""))
        if len(hits) > 1:
            raise errors.NotFound(f"session {sid!r} exists in several watches; pass watch= one of "
                                  + ", ".join(ws.root for ws in hits))
        assert hits[0].store is not None
        return hits[0], hits[0].store

    def _find(self, store: Store, sid: str, version: str | None, most: bool) -> Version:
        with _store_errors():
            return store.find(sid, None if most else version)

    def _read_live(self, ws: WatchState, sid: str) -> bytes | None:
        try:
            data, _ = fsutil.read_regular(ws.path_for(sid), ws.cfg.max_file_bytes)
        except FileNotFoundError:
            return None
        return data

    def _store_usage(self, ws: WatchState) -> tuple[int, int]:
        at, versions, total = self._usage.get(ws.root, (0.0, 0, 0))
        if ws.store is not None and (at == 0.0 or time.monotonic() - at > USAGE_CACHE_SECONDS):
            versions, total = ws.store.usage()
            self._usage[ws.root] = (time.monotonic(), versions, total)
        return versions, total

    def _degraded_of(self, ws: WatchState) -> list[str]:
        out = []
        for key, why in self.host.tracker.stats.degraded.items():
            where = key.partition(":")[2]
            if where in (ws.root, ws.cfg.store_path) or where.startswith(ws.root + os.sep):
                out.append(why)
        return sorted(out)

    # -- read methods --------------------------------------------------------

    def status(self, *, watch: str | None, caller: Caller) -> dict[str, Any]:
        s = self.host.tracker.stats
        rows = []
        for ws in self._watches(watch):
            versions, total = self._store_usage(ws)
            last_shrink = max((t.last_shrink for t in ws.files.values() if t.last_shrink), default=None)
            rows.append(dict(self._describe(ws), sessions=len(ws.files), versions=versions, store_bytes=total,
                             last_reconcile=_iso(s.last_reconcile), last_shrink=_iso(last_shrink),
                             degraded=self._degraded_of(ws)))
        mine = {why for r in rows for why in r["degraded"]}
        theirs = {why for ws in self.host.tracker.watches for why in self._degraded_of(ws)}
        return {
            "version": __version__, "pid": os.getpid(), "uptime": round(time.time() - self.host.started, 1),
            "degraded": sorted(why for why in s.degraded.values() if why in mine or why not in theirs),
            "queued": len(self.host.watcher.queue), "events": s.events, "evaluations": s.evaluations,
            "versions_kept": s.versions_kept, "restores": s.restores, "errors": s.errors, "overflows": s.overflows,
            "last_overflow": _iso(s.last_overflow), "shrinks": dict(s.shrinks),
            "sessions": sum(r["sessions"] for r in rows), "versions": sum(r["versions"] for r in rows),
            "store_bytes": sum(r["store_bytes"] for r in rows), "overwritten_restores": [], "watches": rows,
        }

    def list(self, *, watch: str | None, shrunk_only: bool, intended: bool, caller: Caller) -> dict[str, Any]:
        out = []
        for ws in self._watches(watch):
            for sid, t in sorted(list(ws.files.items())):
                state = "unparseable" if t.count is None else (
                    "shrunk" if t.versions and t.high_water is not None and t.count < t.high_water else "ok")
                if shrunk_only and state == "ok":
                    continue
                out.append({"sid": sid, "watch": ws.root, "state": state, "count": t.count,
                            "high_water": t.high_water, "versions": t.versions,
                            "last_loss": self._last_loss(ws, sid, t.count) if t.last_shrink else None,
                            "overwritten": None})
        return {"sessions": out}

    @staticmethod
    def _last_loss(ws: WatchState, sid: str, after: int | None) -> dict[str, Any] | None:
        if ws.store is None:
            return None
        losses = [v for v in ws.store.versions(sid) if v.reason in _LOSSES]
        if not losses:
            return None
        v = max(losses, key=lambda v: (v.created, v.name))
        return {"reason": v.reason, "at": _iso(v.created), "before": v.count, "after": after}

    def history(self, *, sid: str, watch: str | None, caller: Caller) -> dict[str, Any]:
        ws, store = self._locate(sid, watch)
        versions = store.versions(sid)
        try:
            pick: str | None = self._find(store, sid, None, True).id
        except errors.NotFound:
            pick = None
        return {"sid": sid, "watch": ws.root, "versions": [v.to_dict() for v in versions], "restore": pick,
                "most": pick}

    def show(self, *, sid: str, version: str | None, most: bool, watch: str | None, messages: bool, first: int,
             limit: int | None, caller: Caller) -> dict[str, Any]:
        ws, store = self._locate(sid, watch)
        v = self._find(store, sid, version, most)
        out: dict[str, Any] = dict(v.to_dict(), messages=None, first=first, total=v.count)
        if messages:
            msgs = _messages(store.read_version(v), ws.spec)
            if isinstance(msgs, str):
                out["messages_error"] = msgs
            else:
                out.update(messages=msgs[first: None if limit is None else first + limit], total=len(msgs))
        return out

    def diff(self, *, sid: str, version: str | None, most: bool, watch: str | None, caller: Caller) -> dict[str, Any]:
        ws, store = self._locate(sid, watch)
        v = self._find(store, sid, version, most)
        vmsgs = _messages(store.read_version(v), ws.spec)
        if isinstance(vmsgs, str):
            raise errors.Unprocessable(f"version {v.id} of {sid!r} cannot be parsed: {vmsgs}")
        live = self._read_live(ws, sid)
        lmsgs = _messages(live, ws.spec) if live is not None else []
        missing, added = _missing(vmsgs, lmsgs if isinstance(lmsgs, list) else [])
        out: dict[str, Any] = {
            "sid": sid, "version": v.to_dict(), "version_count": len(vmsgs), "live_exists": live is not None,
            "live_count": len(lmsgs) if live is not None and isinstance(lmsgs, list) else None,
            "live_id": content_hash(live) if live is not None else None,
            "missing": missing, "missing_count": len(missing), "added_count": added,
        }
        if isinstance(lmsgs, str):
            out["live_error"] = lmsgs
        return out

    def sync(self, *, timeout: float, caller: Caller) -> dict[str, Any]:
        """Synced once every change made before the call was processed; never while a
        directory is polled (inotify refused it): nothing orders its changes."""
        polled = self._polled()
        roots = [ws.root for ws in self.host.tracker.watches if ws.available and ws.root not in polled]
        return {"synced": self.host.watcher.sync(roots, timeout) and not polled}

    def metrics(self, *, caller: Caller) -> dict[str, Any]:
        return {"text": self.metrics_text()}

    def metrics_text(self) -> str:
        """Prometheus exposition (also written to ``metrics_textfile`` by the daemon)."""
        s = self.host.tracker.stats
        watches = self.host.tracker.watches
        usage = [self._store_usage(ws) for ws in watches]
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP sessionguard_{name} {help_}")
            lines.append(f"# TYPE sessionguard_{name} {kind}")
            lines.extend(f"sessionguard_{name}{labels} {value}" for labels, value in samples)

        metric("sessions_tracked", "gauge", "Session files currently tracked.",
               [("", sum(len(ws.files) for ws in watches))])
        metric("shrinks_total", "counter", "Shrinking writes seen, by class.",
               [(f'{{class="{c}"}}', s.shrinks.get(c, 0))
                for c in ("wipe", "truncate", "rewrite", "unparseable", "deleted")])
        metric("versions_kept_total", "counter", "Versions kept by this daemon.", [("", s.versions_kept)])
        metric("store_versions", "gauge", "Versions held in the stores.", [("", sum(u[0] for u in usage))])
        metric("store_bytes", "gauge", "Bytes held in the stores (each inode once).", [("", sum(u[1] for u in usage))])
        metric("restores_total", "counter", "Restores made through the control socket.", [("", s.restores)])
        metric("events_total", "counter", "Filesystem events received.", [("", s.events)])
        metric("overflows_total", "counter", "inotify queue overflows (events lost, rescanned).", [("", s.overflows)])
        metric("reconciliations_total", "counter", "Stat-only reconciliation passes.", [("", s.reconciliations)])
        metric("errors_total", "counter", "Errors (each also logged).", [("", s.errors)])
        metric("degraded", "gauge", "1 while something is degraded (see status).", [("", 1 if s.degraded else 0)])
        return "\n".join(lines) + "\n"

    # -- admin methods -------------------------------------------------------

    def restore(self, *, sid: str, version: str | None, most: bool, watch: str | None, dry_run: bool,
                expect: str | None, caller: Caller) -> dict[str, Any]:
        ws, store = self._locate(sid, watch)
        path = ws.path_for(sid)
        if expect is not None:
            live = self._read_live(ws, sid)
            now = content_hash(live) if live is not None else None
            if now != expect:
                raise errors.Conflict(f"the live file of {sid!r} changed since you looked (content id now "
                                      f"{now or 'none: the file is gone'}, expected {expect}): look again, then retry")
        with _store_errors():
            r = store.restore(sid, path, None if most else version, spec=ws.spec, source="admin",
                              dry_run=dry_run, lock_timeout=30.0)
        if not dry_run and not r.unchanged:
            self.host.tracker.bump("restores")
            self.host.tracker.evaluate(path)  # learn the restored file now, not at the next event
            t = ws.files.get(sid)
            if t is not None:
                t.versions = len(store.versions(sid))
            self._usage.pop(ws.root, None)
            self.host.log.warning("session.restored", sid=sid, version=r.restored.id, count=r.restored.count,
                                  pre_restore=r.pre_restore.id if r.pre_restore else None, uid=caller.uid,
                                  pid=caller.pid)
        return dict(r.to_dict(), watch=ws.root, hint=None, overwritten=None)

    def recover(self, *, since: float | None, watch: str | None, dry_run: bool, undo: str | None,
                caller: Caller) -> dict[str, Any]:
        raise errors.NotFound("recover is not implemented in this build")

    def forget(self, *, sid: str, watch: str | None, before: float | None, caller: Caller) -> dict[str, Any]:
        raise errors.NotFound("forget is not implemented in this build")

    def prune(self, *, watch: str | None, caller: Caller) -> dict[str, Any]:
        removed: list[Version] = []
        freed = 0
        for ws in self._watches(watch):
            if ws.store is not None:
                with _store_errors():
                    r = ws.store.prune()
                removed += r.removed
                freed += r.bytes_freed
                self._usage.pop(ws.root, None)
        self.host.log.info("store.pruned", removed=len(removed), bytes_freed=freed, uid=caller.uid)
        return {"removed": [v.to_dict() for v in removed], "bytes_freed": freed}

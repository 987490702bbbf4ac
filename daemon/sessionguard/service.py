"""The control socket's backend: what ``sessionguardctl`` asks, answered from the live daemon.

The control server (:mod:`sessionguard.control`) authorises a caller and
checks parameters; every method here does the work and returns a JSON-ready
dict. The tests drive this same class through the real daemon: there is no
second implementation with other rules. Incident recovery lives in
:mod:`sessionguard.incident`; the Prometheus text in :mod:`sessionguard.metrics`.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from . import __version__, incident, metrics
from .count import decoded_messages, diff
from .errors import NotFound, StoreError, UnsafeSessionFile
from .guard import pick_version
from .naming import Version
from .protocol import Caller
from .restore import restore
from .rules import is_loss, latest_change, most_messages, restore_candidate
from .stats import Stats
from .supervisor import Supervisor
from .tracker import Tracker
from .watch import Watcher
from .watchstate import RestoreMark, WatchState

#: How long a control call waits for a session lock held by a save or a capture.
LOCK_WAIT = 30.0
STATE_BY_REASON = {"intended": "intended", "deleted": "deleted", "unparseable": "unparseable",
                   "shrink": "shrunk", "replaced": "shrunk", "pre-restore": "ok"}


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None


class Service:
    """Implements the control ``Backend`` over the daemon's tracker, watcher and stores."""

    def __init__(self, *, tracker: Tracker, watcher: Watcher, supervisor: Supervisor, stats: Stats, log: Any,
                 restore_recent_seconds: float, started: float) -> None:
        self.tracker, self.watcher, self.supervisor = tracker, watcher, supervisor
        self.stats, self.log = stats, log
        self.restore_recent_seconds = restore_recent_seconds
        self.started = started

    # -- where a session is ----------------------------------------------------------------

    def _watches(self, watch: str | None) -> list[WatchState]:
        if watch is None:
            return self.tracker.watches
        hits = [ws for ws in self.tracker.watches if ws.root == os.path.abspath(watch)]
        if not hits:
            raise NotFound(f"{watch} is not a watched directory (see `sessionguardctl status`)")
        return hits

    def _locate(self, sid: str, watch: str | None) -> WatchState:
        """The watch holding *sid*: tracked now, pinned, or with versions in its store.
        A file merely named ``<sid>.json`` is not a session (``_index.json``, a symlink)."""
        found = [ws for ws in self._watches(watch) if _knows(ws, sid)]
        if not found:
            raise NotFound(f"no session {sid!r}" + (f" in watch {watch}" if watch else ""))
        if len(found) > 1:
            raise NotFound(f"session {sid!r} exists in several watches; pass --watch one of "
                           + ", ".join(ws.root for ws in found))
        return found[0]

    def _versions(self, ws: WatchState, sid: str) -> list[Version]:
        assert ws.store is not None
        return ws.store.versions.of(sid)

    # -- read methods ---------------------------------------------------------------------

    def status(self, *, watch: str | None = None, caller: Caller) -> dict[str, Any]:
        s = self.stats.snapshot()
        watches = [self._watch_status(ws, s.degraded) for ws in self._watches(watch)]
        return {
            "version": __version__, "pid": os.getpid(), "uptime": round(time.time() - self.started, 1),
            "degraded": sorted(s.degraded.values()), "queued": len(self.watcher.queue), "events": s.events,
            "evaluations": s.evaluations, "versions_kept": s.versions_kept, "restores": s.restores,
            "errors": s.errors, "overflows": s.overflows, "last_overflow": iso(s.last_overflow),
            "shrinks": dict(s.shrinks), "sessions": sum(w["sessions"] for w in watches),
            "versions": sum(w["versions"] for w in watches), "store_bytes": sum(w["store_bytes"] for w in watches),
            "last_shrink": {"sid": s.last_shrink[0], "at": iso(s.last_shrink[1]), "class": s.last_shrink[2]}
            if s.last_shrink else None,
            "overwritten_restores": [{"sid": o.sid, "watch": o.watch, "at": iso(o.at),
                                      "restored_at": iso(o.restored_at), "restored_count": o.restored_count,
                                      "count_after": o.count_after} for o in s.overwritten.values()],
            "watches": watches,
        }

    def _watch_status(self, ws: WatchState, degraded: dict[str, str]) -> dict[str, Any]:
        versions, size = ws.store.usage() if ws.store is not None else (0, 0)
        mine = [why for key, why in degraded.items() if key.split(":", 1)[1] in (ws.root, ws.cfg.store_path)]
        return dict(self.supervisor.describe(ws), sessions=len(ws.files), versions=versions, store_bytes=size,
                    last_reconcile=iso(ws.last_reconcile), last_shrink=iso(ws.last_shrink), degraded=sorted(mine))

    def list(self, *, watch: str | None = None, shrunk_only: bool = False, intended: bool = False,
             caller: Caller) -> dict[str, Any]:
        """Every session of the live files and the store; VERSIONS counts files on disk."""
        rows: list[dict[str, Any]] = []
        overwritten = self.stats.snapshot().overwritten
        for ws in self._watches(watch):
            with ws.gate.shared():
                if ws.store is None:
                    continue
                with_versions = set(ws.store.versions.sids())
                for sid in sorted(set(ws.files) | with_versions):
                    row = self._row(ws, sid, sid in with_versions, overwritten.get((ws.root, sid)))
                    if not shrunk_only or row["state"] in ("shrunk", "unparseable", "deleted") or (
                            intended and row["state"] == "intended"):
                        rows.append(row)
        return {"sessions": rows}

    def _row(self, ws: WatchState, sid: str, has_versions: bool, over: Any) -> dict[str, Any]:
        known = ws.files.entry(sid)  # no object made: a list goes through every session
        count = known[1] if known is not None else None
        versions = self._versions(ws, sid) if has_versions else []
        newest = latest_change(versions)
        state = "ok" if newest is None else STATE_BY_REASON.get(newest.reason, "ok")
        if known is None:
            state = "deleted"
        elif state in ("shrunk", "unparseable"):
            candidate = restore_candidate(versions)
            if candidate is not None and count is not None and not is_loss(candidate.count, count):
                state = "ok"  # grown past the damage since: recover leaves it alone too
        counts = [v.count for v in versions if v.count is not None]
        if count is not None:
            counts.append(count)
        losses = [v for v in versions if v.is_loss or v.reason == "intended"]
        last = losses[-1] if losses else None
        return {"sid": sid, "watch": ws.root, "state": state, "count": count,
                "high_water": max(counts, default=None), "versions": len(versions),
                "last_loss": {"reason": last.reason, "at": iso(last.created), "before": last.count,
                              "after": None} if last else None,
                "last_shrink": iso(last.created) if last else None,
                "overwritten": {"at": iso(over.at), "restored_count": over.restored_count,
                                "count_after": over.count_after} if over else None}

    def history(self, *, sid: str, watch: str | None = None, caller: Caller) -> dict[str, Any]:
        ws = self._locate(sid, watch)
        with ws.gate.shared():
            versions = self._versions(ws, sid)
        rule, most = restore_candidate(versions), most_messages(versions)
        return {"sid": sid, "watch": ws.root, "versions": [v.to_dict() for v in versions],
                "restore": rule.id if rule else None, "most": most.id if most else None}

    def _read(self, sid: str, version: str | None, most: bool, watch: str | None) -> tuple[WatchState, Version, bytes]:
        ws = self._locate(sid, watch)
        with ws.gate.shared():
            if ws.store is None:
                raise StoreError(f"{ws.root} is not available right now")
            v = pick_version(self._versions(ws, sid), sid, version, most=most)
            return ws, v, ws.store.versions.read(v, ws.store.max_bytes)

    def show(self, *, sid: str, version: str | None = None, most: bool = False, watch: str | None = None,
             messages: bool = False, first: int = 0, limit: int | None = None, caller: Caller) -> dict[str, Any]:
        ws, v, data = self._read(sid, version, most, watch)
        out: dict[str, Any] = v.to_dict()
        if messages:
            msgs = decoded_messages(data, ws.spec)
            if isinstance(msgs, str):
                out.update(messages=None, messages_error=msgs)
            else:
                end = len(msgs) if limit is None else first + limit
                out.update(messages=msgs[first:end], first=first, total=len(msgs))
        return out

    def diff(self, *, sid: str, version: str | None = None, most: bool = False, watch: str | None = None,
             caller: Caller) -> dict[str, Any]:
        return incident.diff_live(self._locate(sid, watch), *self._read(sid, version, most, watch)[1:], diff=diff)

    def sync(self, *, timeout: float = 5.0, caller: Caller) -> dict[str, Any]:
        """Synced once every change made before the call was processed; never for a
        polled directory (inotify refused it): nothing orders its changes."""
        watched = [ws for ws in self.tracker.watches if ws.available and not ws.polled]
        polled = any(ws.polled for ws in self.tracker.watches)
        return {"synced": self.watcher.sync(watched, timeout) and not polled}

    def metrics(self, *, caller: Caller) -> dict[str, Any]:
        return {"text": metrics.render(self.stats.snapshot(), self.tracker.watches)}

    # -- admin methods --------------------------------------------------------------------

    def restore(self, *, sid: str, version: str | None = None, most: bool = False, watch: str | None = None,
                dry_run: bool = False, expect: str | None = None, caller: Caller) -> dict[str, Any]:
        ws = self._locate(sid, watch)
        with ws.gate.shared():
            if ws.store is None:
                raise StoreError(f"{ws.root} is not available right now")
            target = pick_version(self._versions(ws, sid), sid, version, most=most)
            parts = ws.matcher.parts_for(sid)
            live = incident.live_file(ws, parts)
            try:
                hint = incident.recent_hint(live, self.restore_recent_seconds)
                result = restore(ws.store, sid, target, live, source="admin", dry_run=dry_run, expect=expect,
                                 lock_wait=LOCK_WAIT)
            except UnsafeSessionFile as exc:
                raise StoreError(f"{os.path.join(ws.root, *parts)}: {exc.strerror}; nothing was restored") from None
            finally:
                os.close(live.dir_fd)
            over = self.stats.snapshot().overwritten.get((ws.root, sid))
            if not dry_run and not result.unchanged:
                self.stats.overwritten(None, (ws.root, sid))  # said in this reply; this restore is the news now
                ws.restored[sid] = RestoreMark(time.time(), target.count, target.id)
                self.tracker.evaluate_at(ws, parts, sid, None)  # learn the restored file now
                self.stats.bump("restores")
        self._log_restore(sid, target, result.pre_restore, unchanged=result.unchanged, dry_run=dry_run,
                          caller=caller)
        return dict(result.to_dict(), watch=ws.root, hint=hint,
                    overwritten={"at": iso(over.at), "restored_count": over.restored_count,
                                 "count_after": over.count_after} if over else None)

    def _log_restore(self, sid: str, target: Version, pre: Version | None, *, unchanged: bool, dry_run: bool,
                     caller: Caller) -> None:
        if dry_run:
            return
        if unchanged:
            self.log.info("session.restore_unchanged", sid=sid, version=target.id, uid=caller.uid, pid=caller.pid)
            return
        self.log.warning("session.restored", sid=sid, version=target.id, count=target.count,
                         pre_restore=pre.id if pre else None, uid=caller.uid, pid=caller.pid)

    def recover(self, *, since: float | None = None, watch: str | None = None, dry_run: bool = False,
                undo: str | None = None, caller: Caller) -> dict[str, Any]:
        ctx = incident.Context(self.tracker, self.stats, self.log, self.restore_recent_seconds)
        return incident.recover(ctx, self._watches(watch), since=since, dry_run=dry_run, undo=undo, caller=caller)

    def forget(self, *, sid: str, watch: str | None = None, before: float | None = None,
               caller: Caller) -> dict[str, Any]:
        ws = self._locate(sid, watch)
        with ws.gate.shared():
            if ws.store is None:
                raise StoreError(f"{ws.root} is not available right now")
            with ws.store.lock(sid, LOCK_WAIT):
                removed, pin = ws.store.forget(sid, before)
                if before is None:
                    incident.forget_runs(ws, sid)
                if pin:
                    ws.files.pop(sid, None)
                    ws.restored.pop(sid, None)
        freed = sum(v.size for v in removed)
        self.log.warning("session.forgotten", watch=ws.root, sid=sid, versions=len(removed), bytes_freed=freed,
                         pin=pin, before=iso(before), uid=caller.uid, pid=caller.pid)
        return {"sid": sid, "watch": ws.root, "removed": len(removed), "bytes_freed": freed, "pin_removed": pin}

    def prune(self, *, watch: str | None = None, caller: Caller) -> dict[str, Any]:
        removed: list[Version] = []
        for ws in self._watches(watch):
            with ws.gate.shared():
                if ws.store is None:
                    continue
                for sid in ws.store.versions.sids():
                    try:
                        with ws.store.lock(sid, 10.0):
                            removed.extend(ws.store.retain(sid))
                    except StoreError:
                        continue
                removed.extend(ws.store.enforce_cap()[0])
        freed = sum(v.size for v in removed)
        self.log.info("store.pruned", removed=len(removed), bytes_freed=freed, uid=caller.uid)
        return {"removed": [v.to_dict() for v in removed], "bytes_freed": freed}


def _knows(ws: WatchState, sid: str) -> bool:
    if ws.store is None:
        return False
    try:
        ws.matcher.parts_for(sid)
    except ValueError:
        return False
    if sid in ws.files or ws.store.pins.stat(sid) is not None:
        return True
    folder = ws.store.versions.folder(sid)
    if folder is None:
        return False
    os.close(folder)
    return True

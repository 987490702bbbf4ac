"""Getting conversations back after an incident: ``recover``, its undo, and what a restore must warn about.

``recover`` puts back, in one call, every session whose latest change is an
unintended loss since a given time — each through the same locked, undoable
restore as ``restore``, with the version :func:`recovery.plan` picks;
deleted sessions are re-created. Every run that changed something is
recorded in the store (``recoveries/<run>.json``: what each session was
before), so ``recover --undo RUN`` puts all of them back as they were.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from . import fsutil
from .count import Diff, Parsed, decoded_messages, parse
from .errors import NotFound
from .naming import Version
from .protocol import Caller
from .recovery import plan
from .restore import LiveFile, restore
from .rules import latest_change
from .stats import Stats
from .tracker import Tracker
from .versions import content_hash
from .watchstate import RestoreMark, WatchState


@dataclass(frozen=True)
class Context:
    """What recovery needs of the daemon: its decisions, counters, log and the restore hint's bound."""

    tracker: Tracker
    stats: Stats
    log: Any
    restore_recent_seconds: float

RUNS = "recoveries"


def live_file(ws: WatchState, parts: tuple[str, ...]) -> LiveFile:
    """The live file of the session at *parts* (the caller closes ``dir_fd``)."""
    dir_fd = ws.open_parent(parts) if len(parts) > 1 else os.dup(ws.root_fd or -1)
    return LiveFile(dir_fd, parts[-1], ws.spec, (ws.root_uid, os.fstat(dir_fd).st_gid))


def recent_hint(live: LiveFile, seconds: float) -> str | None:
    """A warning when the session was written so recently that a server may hold it in memory."""
    st = fsutil.lstat_at(live.dir_fd, live.name)
    if st is None or seconds <= 0:
        return None
    age = time.time() - st.st_mtime
    if age >= seconds:
        return None
    return (f"the session file was written {age:.0f} s ago: a running server may hold this session in memory "
            "and write it back over the restore; stop the server (or make it reload the session) first")


def diff_live(ws: WatchState, v: Version, data: bytes, *,
              diff: Callable[[list[Any], list[Any]], Diff]) -> dict[str, Any]:
    """Messages of version *v* missing from the live file."""
    vmsgs = decoded_messages(data, ws.spec)
    if isinstance(vmsgs, str):
        from .errors import Unprocessable

        raise Unprocessable(f"version {v.id} of {v.sid!r} cannot be parsed: {vmsgs}")
    live = live_file(ws, ws.matcher.parts_for(v.sid))
    try:
        raw = fsutil.read_regular(live.name, ws.cfg.max_file_bytes, dir_fd=live.dir_fd)[0]
    except FileNotFoundError:
        raw = None
    finally:
        os.close(live.dir_fd)
    lmsgs = decoded_messages(raw, ws.spec) if raw is not None else []
    result = diff(vmsgs, lmsgs if isinstance(lmsgs, list) else [])
    out: dict[str, Any] = {
        "sid": v.sid, "version": v.to_dict(), "version_count": len(vmsgs), "live_exists": raw is not None,
        "live_count": len(lmsgs) if isinstance(lmsgs, list) and raw is not None else None,
        "live_id": content_hash(raw) if raw is not None else None,
        "missing": [{"index": i, "message": m} for i, m in result.missing],
        "missing_count": len(result.missing), "added_count": result.added_count,
    }
    if isinstance(lmsgs, str):
        out["live_error"] = lmsgs
    return out


def recover(svc: Context, watches: list[WatchState], *, since: float | None, dry_run: bool, undo: str | None,
            caller: Caller) -> dict[str, Any]:
    """Put back every session damaged since *since*; or, with *undo*, undo a run."""
    if undo is not None:
        return _undo(svc, watches, undo, caller)
    run = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
    rows: list[dict[str, Any]] = []
    hints: list[str] = []
    over = svc.stats.snapshot().overwritten
    for ws in watches:
        with ws.gate.shared():
            if ws.store is None:
                continue
            done = [_recover_one(svc, ws, sid, since=since, dry_run=dry_run, rows=rows, hints=hints)
                    for sid in ws.store.versions.sids()]
            entries = [e for e in done if e is not None]
            if entries:
                _record(ws, run, entries)
    for row in rows:
        row["overwritten"] = (row["watch"], row["sid"]) in over
    changed = [r for r in rows if r["outcome"] in ("restored", "recreated")]
    svc.log.warning("recover.completed", run=run if changed else None, since=_iso(since), dry_run=dry_run,
                    restored=len(changed), listed=len(rows), uid=caller.uid, pid=caller.pid)
    return {"run": run if changed else None, "dry_run": dry_run, "since": _iso(since), "sessions": rows,
            "hint": hints[0] if hints else None}


def _recover_one(svc: Context, ws: WatchState, sid: str, *, since: float | None, dry_run: bool,
                 rows: list[dict[str, Any]], hints: list[str]) -> dict[str, Any] | None:
    assert ws.store is not None
    versions = ws.store.versions.of(sid)
    newest = latest_change(versions)
    if newest is None or (since is not None and newest.created < since):
        return None
    try:
        parts = ws.matcher.parts_for(sid)
        live = live_file(ws, parts)
    except (ValueError, OSError) as exc:
        rows.append(_row(ws, sid, None, None, "failed", why=f"its directory cannot be reached: {exc}"))
        return None
    try:
        try:
            data: bytes | None = fsutil.read_regular(live.name, ws.cfg.max_file_bytes, dir_fd=live.dir_fd)[0]
        except FileNotFoundError:
            data = None
        parsed = parse(data, ws.spec) if data is not None else None
        decision = plan(versions, parsed, since=since)
        if decision is None:
            return None
        before = parsed.count if parsed is not None else None
        if decision.action == "leave":
            rows.append(_row(ws, sid, before, decision.target, "left alone", why=decision.why,
                             live=_live_state(parsed)))
            return None
        recreate = decision.action == "recreate"
        if dry_run:
            rows.append(_row(ws, sid, before, decision.target, "would recreate" if recreate else "would restore",
                             live=_live_state(parsed)))
            return None
        hint = recent_hint(live, svc.restore_recent_seconds)
        if hint:
            hints.append(hint)
        assert decision.target is not None
        result = restore(ws.store, sid, decision.target, live, source="admin", lock_wait=30.0)
    except Exception as exc:  # one session must not stop the others
        rows.append(_row(ws, sid, None, None, "failed", why=str(exc)))
        return None
    finally:
        os.close(live.dir_fd)
    svc.stats.overwritten(None, (ws.root, sid))  # reported in this run's row; this restore is the news now
    ws.restored[sid] = RestoreMark(time.time(), decision.target.count, decision.target.id)
    svc.tracker.evaluate_at(ws, parts, sid, None)
    svc.stats.bump("restores")
    rows.append(_row(ws, sid, before, decision.target, "recreated" if recreate else "restored",
                     live=_live_state(parsed)))
    return {"sid": sid, "restored": decision.target.id, "recreated": recreate,
            "pre_restore": result.pre_restore.id if result.pre_restore else None}


def _row(ws: WatchState, sid: str, before: int | None, target: Version | None, outcome: str, *,
         why: str | None = None, live: str | None = None) -> dict[str, Any]:
    """One session of a recover run. *live* says what the live file was: ``missing``,
    ``unparseable`` or ``present`` (*before* is then its count); None when not looked at."""
    return {"sid": sid, "watch": ws.root, "before": before, "live": live,
            "after": target.count if target else None, "version": target.id if target else None,
            "outcome": outcome, "why": why}


def _live_state(parsed: Parsed | None) -> str:
    return "missing" if parsed is None else "present" if parsed.ok else "unparseable"


def _record(ws: WatchState, run: str, entries: list[dict[str, Any]]) -> None:
    assert ws.store is not None
    ws.store.record(RUNS, f"{run}.json", orjson.dumps({"run": run, "sessions": entries}))


def _undo(svc: Context, watches: list[WatchState], run: str, caller: Caller) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    found = False
    for ws in watches:
        with ws.gate.shared():
            if ws.store is None:
                continue
            raw = ws.store.recorded(RUNS, f"{run}.json")
            if raw is None:
                continue
            found = True
            for entry in orjson.loads(raw)["sessions"]:
                rows.append(_undo_one(svc, ws, entry))
    if not found:
        raise NotFound(f"no recover run {run!r} in any watched store")
    svc.log.warning("recover.undone", run=run, sessions=len(rows), uid=caller.uid, pid=caller.pid)
    return {"run": run, "dry_run": False, "since": None, "sessions": rows, "hint": None}


def _undo_one(svc: Context, ws: WatchState, entry: dict[str, Any]) -> dict[str, Any]:
    assert ws.store is not None
    sid = entry["sid"]
    versions = ws.store.versions.of(sid)
    target = None if entry["recreated"] else next((v for v in versions if v.id == entry["pre_restore"]), None)
    if target is None and not entry["recreated"]:
        return _row(ws, sid, None, None, "failed",
                    why=f"its pre-restore version {entry['pre_restore']} is gone")
    parts = ws.matcher.parts_for(sid)
    live = live_file(ws, parts)
    try:
        result = restore(ws.store, sid, target, live, source="admin", lock_wait=30.0)
    except Exception as exc:
        return _row(ws, sid, None, target, "failed", why=str(exc))
    finally:
        os.close(live.dir_fd)
    ws.restored.pop(sid, None)
    svc.tracker.evaluate_at(ws, parts, sid, None)
    state = "missing" if not result.live_existed else "present" if result.live_count is not None else "unparseable"
    return _row(ws, sid, result.live_count, target, "removed again" if target is None else "undone", live=state)


def forget_runs(ws: WatchState, sid: str) -> None:
    """Erasure: drop *sid* from every recorded recover run (its id and version hashes), and a
    run left with nothing. Caller holds the session's lock."""
    assert ws.store is not None
    for name in ws.store.records(RUNS):
        raw = ws.store.recorded(RUNS, name)
        if raw is None:
            continue
        run = orjson.loads(raw)
        kept = [e for e in run.get("sessions", []) if e.get("sid") != sid]
        if len(kept) == len(run.get("sessions", [])):
            continue
        if kept:
            ws.store.record(RUNS, name, orjson.dumps(dict(run, sessions=kept)))
        else:
            ws.store.unrecord(RUNS, name)


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None

"""Recovery after damage: which sessions to put back, decided one way for the library and the daemon.

:func:`plan` is the decision for one session — used by the library's
``recover_on_startup`` and by the daemon's ``recover`` (incident recovery):
the version to restore is always :func:`~sessionguard.rules.restore_candidate`
(the state just before the damage); a session whose last change was
intended, or that has grown past the damage since, is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import fsutil
from .count import CountSpec, Parsed, parse
from .errors import UnsafeSessionFile
from .naming import Matcher, Version
from .restore import LiveFile, restore
from .rules import is_loss, latest_change, restore_candidate
from .store import Store


class Host(Protocol):
    """What start-up recovery needs of the embedded guard (:class:`sessionguard.Guard`)."""

    store: Store
    spec: CountSpec
    max_bytes: int
    matcher: Matcher

    def dir_fd(self) -> int: ...

    def live_file(self, sid: str) -> LiveFile: ...

    def foreign_change(self, sid: str, live: Parsed, st: os.stat_result) -> None: ...

    def repin(self, sid: str, dir_fd: int, name: str, st: os.stat_result) -> None: ...

    def emit(self, name: str, sid: str, *, level: str = "info", **fields: Any) -> Any: ...


@dataclass(frozen=True)
class Plan:
    """What to do with one session: restore *target*, re-create it, or leave it (*why*)."""

    action: str  # "restore", "recreate" or "leave"
    target: Version | None
    why: str = ""


def plan(versions: Sequence[Version], live: Parsed | None, *, since: float | None = None) -> Plan | None:
    """The recovery decision for one session whose live file parses to *live* (None: missing).

    None when the session has nothing to recover since *since* (its last
    change is older, or was not a loss and not an intended shrink).
    """
    newest = latest_change(versions)
    if newest is None or (since is not None and newest.created < since):
        return None
    if newest.reason == "intended":
        return Plan("leave", None, "its last change was an intended shrink")
    if newest.reason == "pre-restore":
        return Plan("leave", None, "its last change was a restore")
    target = restore_candidate(versions)
    if target is None:
        return Plan("leave", None, "no version with countable content since the last intended shrink")
    if live is None:
        return Plan("recreate", target)
    if live.ok and not is_loss(target.count, live.count):
        return Plan("leave", target, f"it has grown past the damage since ({live.count} ≥ {target.count} messages)")
    return Plan("restore", target)


@dataclass(frozen=True)
class Recovered:
    sid: str
    version: Version
    count_before: int | None


@dataclass(frozen=True)
class LeftAlone:
    sid: str
    why: str


@dataclass
class RecoveryReport:
    """What ``recover_on_startup`` did: sessions restored, and sessions left alone with why."""

    restored: list[Recovered] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)


def recover_guard(guard: Host) -> RecoveryReport:
    """The library's start-up recovery.

    A session is restored when its live file has zero messages or is
    unparseable and :func:`plan` says so: a foreign write that replaced the
    pinned file is first kept as a version (the guard never saw it), then the
    rule picks the version. An intended shrink (``allow_shrink=True`` or a
    changed intent key: a user's undo or clear) is never reverted, a
    non-empty session and a deleted one are never touched, and one bad file
    never stops the others.
    """
    report = RecoveryReport()
    store = guard.store
    dir_fd = guard.dir_fd()
    store.sweep_tmp(dir_fd)
    sids = set(store.sessions())
    with os.scandir(dir_fd) as it:
        for entry in it:
            sid, _ = guard.matcher.identify((entry.name,))
            if sid is not None:
                sids.add(sid)
    for sid in sorted(sids):
        try:
            with store.lock(sid):
                _recover_one(guard, sid, report)
        except Exception as exc:  # one session must not stop the rest
            report.left_alone.append(LeftAlone(sid, f"error: {exc}"))
            guard.emit("recovery.failed", sid, level="error", error=str(exc))
    return report


def _recover_one(guard: Host, sid: str, report: RecoveryReport) -> None:
    live_file = guard.live_file(sid)
    try:
        data, st = fsutil.read_regular(live_file.name, guard.max_bytes, dir_fd=live_file.dir_fd)
    except FileNotFoundError:
        report.left_alone.append(LeftAlone(sid, "no live file (a deletion is not undone automatically)"))
        return
    except UnsafeSessionFile as exc:
        report.left_alone.append(LeftAlone(sid, f"not a regular file: {exc}"))
        return
    live = parse(data, guard.spec)
    pin = guard.store.pins.stat(sid)
    foreign = pin is None or (pin.st_dev, pin.st_ino) != (st.st_dev, st.st_ino)
    guard.foreign_change(sid, live, st)
    if live.ok and live.count:
        if foreign:
            guard.repin(sid, live_file.dir_fd, live_file.name, st)
        report.left_alone.append(LeftAlone(sid, f"has {live.count} messages"))
        return
    decision = plan(guard.store.versions.of(sid), live)
    if decision is None or decision.action != "restore" or decision.target is None:
        why = decision.why if decision is not None else "its last change was not a loss"
        report.left_alone.append(LeftAlone(sid, why or "nothing to restore"))
        return
    restore(guard.store, sid, decision.target, live_file, source="library")
    report.restored.append(Recovered(sid, decision.target, live.count))
    guard.emit("session.recovered", sid, level="warning", version=decision.target.id,
               after=decision.target.count, reason=decision.target.reason,
                count=decision.target.count, before=live.count)

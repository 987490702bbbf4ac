"""Which versions to remove: a pure policy over version lists and a fixed ``now``.

Like Syncthing's staggered versioner, retention is a function of the
versions and the time, so a table of names at a fixed ``now`` tests it
exactly; the store applies what it returns. Two decisions live here:

* :func:`to_remove` thins one session: the newest ``keep_last`` versions
  stay, older ones keep one per bucket (30 s for the first hour, an hour for
  a day, a day for 30 days, a week after), nothing past ``max_age_days``;
* :func:`over_cap` picks what goes when the store is over ``max_store_bytes``:
  versions of deleted sessions first, shortest-lived first (a name that
  existed for seconds goes before a conversation that existed for weeks),
  then the oldest unprotected versions of live sessions.

No rule ever removes a *protected* version: the newest, the high-water (most
messages) and the one ``restore`` would pick, of a live session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .naming import Version
from .rules import latest_change, most_messages, restore_candidate

DAY = 86400.0


@dataclass(frozen=True)
class Retention:
    """How many versions a session keeps, and how big the store may grow (0: no cap)."""

    keep_last: int = 10
    max_age_days: float = 365.0
    max_store_bytes: int = 0
    #: (age limit in seconds, bucket width in seconds), youngest first.
    intervals: tuple[tuple[float, float], ...] = (
        (3600.0, 30.0),
        (DAY, 3600.0),
        (30 * DAY, DAY),
        (float("inf"), 7 * DAY),
    )


def protected(versions: Sequence[Version]) -> set[str]:
    """Names no rule may remove: the newest, the high-water and the restore candidate."""
    keep = {v.name for v in (latest_change(versions), most_messages(versions), restore_candidate(versions)) if v}
    return keep


def _bucket(age: float, policy: Retention) -> tuple[int, int] | None:
    if age > policy.max_age_days * DAY:
        return None
    for i, (limit, width) in enumerate(policy.intervals):
        if age < limit:
            return (i, int(age // width))
    return None


def to_remove(versions: Sequence[Version], now: float, policy: Retention) -> list[Version]:
    """The versions of one session that retention removes at time *now*."""
    keep = protected(versions)
    newest_first = sorted(versions, key=lambda v: (v.created, v.name), reverse=True)
    keep.update(v.name for v in newest_first[: policy.keep_last])
    seen: set[tuple[int, int]] = set()
    out: list[Version] = []
    for v in newest_first:
        bucket = _bucket(max(now - v.created, 0.0), policy)
        if v.name in keep or (bucket is not None and bucket not in seen):
            if bucket is not None:
                seen.add(bucket)  # the newest version of each bucket stays
            continue
        out.append(v)
    return out


@dataclass(frozen=True)
class SessionVersions:
    """One session's versions as the cap sees them: *lifetime* (seconds the session
    existed) is set for a deleted session, None for a live one."""

    versions: Sequence[Version]
    lifetime: float | None


def over_cap(sessions: Sequence[SessionVersions], total: int, cap: int) -> list[Version]:
    """Versions to remove, in order, until *total* bytes fit under *cap*.

    Deleted sessions' versions go first, the shortest-lived session first
    (oldest version first within it); a deleted session has nothing
    protected. Then the oldest unprotected versions of live sessions.
    """
    if cap <= 0 or total <= cap:
        return []
    deleted = sorted((s for s in sessions if s.lifetime is not None), key=lambda s: s.lifetime or 0.0)
    order: list[Version] = []
    for s in deleted:
        order.extend(sorted(s.versions, key=lambda v: v.created))
    live: list[Version] = []
    for s in sessions:
        if s.lifetime is None:
            keep = protected(s.versions)
            live.extend(v for v in s.versions if v.name not in keep)
    order.extend(sorted(live, key=lambda v: v.created))
    out: list[Version] = []
    for v in order:
        if total <= cap:
            break
        out.append(v)
        total -= v.size
    return out

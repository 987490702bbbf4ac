"""Retention as a pure function: tables of version names at a fixed `now`, exact results (like Syncthing's)."""

from __future__ import annotations

import pytest

from sessionguard.naming import Version, parse_version_name, version_name
from sessionguard.retention import DAY, Retention, SessionVersions, over_cap, protected, to_remove

NOW = 1_800_000_000.0  # fixed: nothing here reads the clock
H = 3600.0


def ver(age: float, count: int | None = 5, reason: str = "pre-restore", *, size: int = 100, sid: str = "s",
        digest: str = "") -> Version:
    """A version as the store lists it: parsed back from its real file name."""
    name = version_name(NOW - age, count, reason=reason, source="daemon", method="copy",  # type: ignore[arg-type]
                        digest=digest or f"{int(age * 1000) % 16**16:016x}")
    v = parse_version_name(sid, name, size)
    assert v is not None
    return v


def ages(versions: list[Version]) -> list[float]:
    return [round(NOW - v.created, 3) for v in versions]


#: Same count, reason pre-restore: only the newest is protected, so the buckets alone decide.
BUCKET_AGES = [0, 10, 29, 31, 45, 59, 61, 3599, 3601, 3700, 7300, DAY - 1, DAY + 1, DAY + 100, 29 * DAY,
               30 * DAY + 1, 31 * DAY, 35 * DAY, 364 * DAY, 366 * DAY]


@pytest.mark.parametrize(
    "versions, policy, removed",
    [
        # one per 30 s for an hour, per hour for a day, per day for 30 days, per week after; nothing past a year
        ([ver(a) for a in BUCKET_AGES], Retention(keep_last=1),
         [10, 29, 45, 59, 3700, DAY + 100, 31 * DAY, 366 * DAY]),
        # keep_last keeps the newest N whatever their buckets
        ([ver(a) for a in BUCKET_AGES], Retention(keep_last=4),
         [45, 59, 3700, DAY + 100, 31 * DAY, 366 * DAY]),
        ([ver(a) for a in BUCKET_AGES], Retention(keep_last=100), []),
        # five in one bucket; protected: newest (1), most messages (5)
        ([ver(a, c, "shrink") for a, c in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]], Retention(keep_last=3), [4]),
        # newest (1), restore candidate (2: the newest loss since the intent at 3), most (4) protected;
        # the intended one itself is not
        ([ver(1, 3), ver(2, 7, "shrink"), ver(3, 9, "intended"), ver(4, 1000, "shrink"), ver(5, 8, "shrink"),
          ver(6, 2, "deleted")], Retention(keep_last=0), [3, 5, 6]),
        # max_age removes what no rule protects
        ([ver(10), ver(2 * DAY, 100, "shrink"), ver(3 * DAY, 50, "shrink"), ver(4 * DAY, 1, "intended")],
         Retention(keep_last=0, max_age_days=1), [3 * DAY, 4 * DAY]),
        # a lone version older than max_age is the newest: kept
        ([ver(400 * DAY)], Retention(keep_last=0), []),
        # custom intervals: 10 s buckets for a minute, nothing kept past it but the protected
        ([ver(a) for a in (0, 5, 9, 11, 19, 25, 70)], Retention(keep_last=0, intervals=((60.0, 10.0),)),
         [5, 9, 19, 70]),
        ([], Retention(), []),
    ],
)
def test_to_remove(versions: list[Version], policy: Retention, removed: list[float]) -> None:
    got = to_remove(versions, NOW, policy)
    assert ages(got) == removed
    assert ages(to_remove(list(reversed(versions)), NOW, policy)) == removed  # listing order is irrelevant
    assert not {v.name for v in got} & protected(versions)


def test_to_remove_is_stable_under_repetition() -> None:
    """Applying the policy to what it left removes nothing more (the store runs it after every version)."""
    vs = [ver(a) for a in BUCKET_AGES]
    left = [v for v in vs if v not in to_remove(vs, NOW, Retention(keep_last=1))]
    assert to_remove(left, NOW, Retention(keep_last=1)) == []


def test_buckets_move_with_now() -> None:
    """Two versions 20 s apart share a bucket now, and fall into different ones 15 s later."""
    vs = [ver(0), ver(20), ver(2000, 5, "pre-restore")]
    assert ages(to_remove(vs, NOW, Retention(keep_last=1))) == [20]
    assert to_remove(vs, NOW + 15, Retention(keep_last=1)) == []


def test_protected_names() -> None:
    vs = [ver(4, 1000, "shrink"), ver(3, 9, "intended"), ver(2, 7, "shrink"), ver(1, 3)]
    assert protected(vs) == {vs[0].name, vs[2].name, vs[3].name}
    assert protected([]) == set()


# -- the byte cap ------------------------------------------------------------------------

def live_session() -> list[Version]:
    """Protected: l3 (newest), l1 (most messages), l2 (restore candidate); l0/l0b are not."""
    return [ver(6000, 20, "shrink", sid="L", size=30), ver(5500, 30, "shrink", sid="L", size=40),
            ver(5000, 50, "shrink", sid="L", size=1000), ver(4000, 10, "shrink", sid="L", size=1000),
            ver(3000, 5, "pre-restore", sid="L", size=1000)]


def other_live() -> list[Version]:
    """Protected: the newest (it holds the most too); the 5800 s one is not."""
    return [ver(5800, 1, "intended", sid="M", size=10), ver(100, 2, "pre-restore", sid="M", size=10)]


def cap_table() -> list[SessionVersions]:
    weeks = SessionVersions([ver(9000, 400, "deleted", sid="D2", size=200)], lifetime=21 * DAY)
    seconds = SessionVersions([ver(100, 3, "deleted", sid="D1", size=100), ver(200, 4, "shrink", sid="D1", size=50)],
                              lifetime=5.0)
    return [SessionVersions(live_session(), None), weeks, SessionVersions(other_live(), None), seconds]


def order(vs: list[Version]) -> list[tuple[str, float]]:
    return [(v.sid, round(NOW - v.created)) for v in vs]


TOTAL = 30 + 40 + 3000 + 20 + 200 + 150
EVERYTHING_REMOVABLE = [("D1", 200), ("D1", 100), ("D2", 9000), ("L", 6000), ("M", 5800), ("L", 5500)]


@pytest.mark.parametrize(
    "cap, expected",
    [
        (0, []),  # no cap
        (TOTAL, []),
        (TOTAL - 1, EVERYTHING_REMOVABLE[:1]),  # the shortest-lived deleted session's oldest version
        (TOTAL - 50, EVERYTHING_REMOVABLE[:1]),
        (TOTAL - 51, EVERYTHING_REMOVABLE[:2]),
        (TOTAL - 151, EVERYTHING_REMOVABLE[:3]),  # then the long-lived deleted one, however old
        (TOTAL - 351, EVERYTHING_REMOVABLE[:4]),  # then live sessions' oldest unprotected versions
        (TOTAL - 381, EVERYTHING_REMOVABLE[:5]),
        (1, EVERYTHING_REMOVABLE),  # protected versions never go, even if the cap is not met
    ],
)
def test_over_cap(cap: int, expected: list[tuple[str, float]]) -> None:
    assert order(over_cap(cap_table(), TOTAL, cap)) == expected
    assert order(over_cap(list(reversed(cap_table())), TOTAL, cap)) == expected


def test_over_cap_removes_everything_of_a_deleted_session_even_its_best() -> None:
    only = [ver(10, 1000, "deleted", sid="D", size=500)]
    assert over_cap([SessionVersions(only, lifetime=3600.0)], 500, 100) == only
    assert over_cap([SessionVersions(only, lifetime=None)], 500, 100) == []

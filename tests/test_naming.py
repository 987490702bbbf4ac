"""Names, as tables: which files are sessions, their ids and back, and version file names."""

from __future__ import annotations

import itertools
import os

import pytest

from sessionguard.naming import (
    METHODS,
    REASONS,
    SOURCES,
    Matcher,
    Version,
    parse_version_name,
    validate_sid,
    version_name,
)

FLAT = Matcher()
REC = Matcher(recursive=True)
LONG = "x" * 250  # + ".json": a 255-byte file name, the longest a filesystem allows
NOT_UTF8 = os.fsdecode(b"caf\xe9.json")  # a Latin-1 name, as os.listdir returns it


@pytest.mark.parametrize(
    "matcher, parts, sid",
    [
        (FLAT, ("abc123def456.json",), "abc123def456"),
        (FLAT, ("20260424_231848_e7706c.json",), "20260424_231848_e7706c"),
        (FLAT, ("50%off.json",), "50%off"),  # a flat id is the file name as is: no encoding
        (FLAT, ("a%2F..%2Fb.json",), "a%2F..%2Fb"),  # issue 10 item 12: a session like any other
        (FLAT, (LONG + ".json",), LONG),
        (FLAT, ("é" * 125 + ".json",), "é" * 125),  # 250 bytes of UTF-8
        (REC, ("abc.json",), "abc"),
        (REC, ("sub", "x.json"), "sub%2Fx"),
        (REC, ("a", "b", "c.json"), "a%2Fb%2Fc"),
        (REC, ("50%off.json",), "50%25off"),
        (REC, ("a%2Fb.json",), "a%252Fb"),  # a literal %2F in a name is not a separator
        (REC, ("x%", "Fy.json"), "x%25%2FFy"),
        (REC, ("d%2F", "x..y.json"), "d%252F%2Fx..y"),
        (Matcher("*.jsonl"), ("t.jsonl",), "t"),
        (Matcher("session-*.json"), ("session-1.json",), "session-1.json"),  # no literal suffix to drop
    ],
)
def test_identify_and_parts_for_round_trip(matcher: Matcher, parts: tuple[str, ...], sid: str) -> None:
    assert matcher.identify(parts) == (sid, None)
    assert matcher.parts_for(sid) == parts


@pytest.mark.parametrize(
    "matcher, parts",
    [
        (FLAT, ()),
        (FLAT, ("sub", "x.json")),  # a flat watch does not look below its root
        (FLAT, ("x.txt",)),
        (FLAT, ("x.json.bak",)),
        (FLAT, (".json",)),
        (FLAT, ("_index.json",)),  # the server's own
        (FLAT, (".hidden.json",)),
        (FLAT, ("abc.tmp.123.456.json",)),  # a server's tmp file
        (FLAT, ("abc.json.bak.json",)),
        (REC, ("_private", "x.json")),  # an excluded directory excludes what it holds
        (REC, ("sub", ".x.json")),
        (REC, (".sessionguard", "pins", "x.json")),  # the store's folder (hidden)
        (Matcher(exclude=(), recursive=True, skip=frozenset({"backups"})), ("backups", "x.json")),
        (Matcher(exclude=(), skip=frozenset({"store.json"})), ("store.json",)),
    ],
)
def test_identify_ignores_what_is_not_a_session(matcher: Matcher, parts: tuple[str, ...]) -> None:
    assert matcher.identify(parts) == (None, None)


@pytest.mark.parametrize("matcher", [FLAT, Matcher(exclude=()), Matcher("*.jsonl"),
                                     Matcher(exclude=(), skip=frozenset({"store.json"}))])
@pytest.mark.parametrize("name", ["abc.json", "x.jsonl", ".json", "_index.json", ".hidden.json", ".x.json",
                                  "abc.tmp.123.456.json", "x.json.bak", "store.json", NOT_UTF8, LONG + ".json"])
def test_the_inotify_filter_passes_every_name_identify_looks_at(matcher: Matcher, name: str) -> None:
    """The reader drops what ``may_be_session`` refuses: it must never refuse a name that
    :meth:`identify` would guard or explain."""
    assert matcher.may_be_session(name) or matcher.identify((name,)) == (None, None)


def test_the_inotify_filter_drops_a_writers_tmp_names() -> None:
    assert not any(FLAT.may_be_session(n) for n in ("x.json.tmp", ".x.json.swp", "_index.json", "x.txt"))


@pytest.mark.parametrize(
    "matcher, parts, why",
    [
        (FLAT, (NOT_UTF8,), "not valid UTF-8"),
        (REC, (os.fsdecode(b"d\xff"), "x.json"), "not valid UTF-8"),
        (REC, ("d" * 255, LONG + ".json"), "longer than 255 bytes"),  # each name fits, the id does not
        (Matcher(exclude=()), (".x.json",), "starts with a dot"),
    ],
)
def test_identify_explains_a_matching_name_that_cannot_be_an_id(matcher: Matcher, parts: tuple[str, ...],
                                                                 why: str) -> None:
    sid, reason = matcher.identify(parts)
    assert sid is None and reason is not None and why in reason


@pytest.mark.parametrize(
    "matcher, sid",
    [
        (REC, "x%2F..%2Fy"),  # would climb out of the directory
        (REC, "..%2Fetc%2Fpasswd"),
        (REC, "%2Fetc"),  # an empty first part: an absolute path
        (REC, "a%2F%2Fb"),
        (REC, "a%2F.%2Fb"),
        (REC, "a%2F"),
        (REC, "_private%2Fx"),  # decodes to an excluded name
        (REC, "sub%2F.x"),
        (FLAT, "_index"),
        (FLAT, "x.tmp.1"),
        (Matcher(exclude=(), recursive=True, skip=frozenset({"backups"})), "backups%2Fx"),
        (FLAT, ".."),  # invalid ids
        (FLAT, "a/b"),
        (FLAT, ""),
        (FLAT, "x" * 256),
    ],
)
def test_parts_for_refuses_ids_that_name_no_session_file(matcher: Matcher, sid: str) -> None:
    with pytest.raises(ValueError):
        matcher.parts_for(sid)


def test_descend_enters_only_allowed_sub_directories() -> None:
    m = Matcher(recursive=True, skip=frozenset({"store"}))
    assert m.descend(("sub",)) and m.descend(("sub", "deeper"))
    assert not m.descend(("store",))  # the store's folder, at the root only
    assert m.descend(("sub", "store"))
    assert not m.descend((".git",)) and not m.descend(("sub", "_cache"))
    assert not m.descend(())
    assert not FLAT.descend(("sub",))


@pytest.mark.parametrize(
    "sid",
    ["abc123def456", "20260424_231848_e7706c", "a..b", "a%2F..%2Fb", "-rf", "with space", "é", "x" * 255,
     "日本語", "x.json"],
)
def test_validate_sid_accepts(sid: str) -> None:
    assert validate_sid(sid) == sid


@pytest.mark.parametrize(
    "sid",
    ["", ".", "..", ".hidden", "a/b", "/abs", "a\0b", "x" * 256, "é" * 128, NOT_UTF8[:-5], "\udcff", None, 12,
     b"abc"],
)
def test_validate_sid_refuses(sid: object) -> None:
    with pytest.raises(ValueError):
        validate_sid(sid)  # type: ignore[arg-type]


CREATED = 1_764_000_123.456789


@pytest.mark.parametrize(
    "reason, source, method, count",
    [(r, s, m, c) for (r, s, m), c in zip(itertools.product(REASONS, SOURCES, METHODS),
                                          itertools.cycle([0, 1, 1000, None]))],
)
def test_version_name_round_trip(reason: str, source: str, method: str, count: int | None) -> None:
    name = version_name(CREATED, count, reason=reason, source=source, method=method,  # type: ignore[arg-type]
                        digest="0123456789abcdef")
    assert name.endswith(".version") and "/" not in name
    v = parse_version_name("sid1", name, 42)
    assert v is not None
    assert abs(v.created - CREATED) < 1e-6
    assert (v.id, v.sid, v.count, v.size, v.reason, v.source, v.method, v.name) == \
        ("0123456789abcdef", "sid1", count, 42, reason, source, method, name)
    assert v.is_loss == (reason in ("shrink", "unparseable", "deleted", "replaced"))
    assert v.to_dict()["created"] == "2025-11-24T16:02:03.456789+00:00"


def test_version_names_sort_by_time_as_strings() -> None:
    """`ls | tail -n 1` picks the newest: names sort like their times, across counts and reasons."""
    times = [1_700_000_000.0, 1_700_000_000.5, 1_700_000_009.999999, 1_800_000_000.0]
    names = [version_name(t, c, reason=r, source="daemon", method="copy", digest="f" * 16)
             for t, c, r in zip(times, [1000, 5, None, 20], ["shrink", "pre-restore", "deleted", "intended"],
                                 strict=True)]
    assert sorted(names) == names


@pytest.mark.parametrize(
    "name",
    [
        "pin",
        "x.version",
        "20261126T140438.226925Z_40msgs_shrink_daemon_copy_e9c55bf50996d00f.version.tmp",
        "20261126T140438.226925Z_40msgs_shrink_daemon_copy_E9C55BF50996D00F.version",  # upper-case hash
        "20261126T140438.226925Z_40msgs_shrink_daemon_copy_e9c55bf50996d00.version",  # 15 hex digits
        "20261126T140438.226925Z_40msgs_oops_daemon_copy_e9c55bf50996d00f.version",
        "20261126T140438.226925Z_40_shrink_daemon_copy_e9c55bf50996d00f.version",
        "20261126T140438Z_40msgs_shrink_daemon_copy_e9c55bf50996d00f.version",  # no microseconds
        "pin.1795701878243696997.copy.40.65024.2171640.18383.1795701878240481506",  # a release 0.1.0 pin
    ],
)
def test_parse_version_name_rejects_other_names(name: str) -> None:
    assert parse_version_name("s", name, 1) is None


def test_version_name_refuses_unknown_reason_source_or_method() -> None:
    for kw in ({"reason": "oops", "source": "daemon", "method": "copy"},
               {"reason": "shrink", "source": "root", "method": "copy"},
               {"reason": "shrink", "source": "daemon", "method": "hardlink"}):
        with pytest.raises(ValueError):
            version_name(CREATED, 1, digest="0" * 16, **kw)  # type: ignore[arg-type]


def test_version_is_a_frozen_record() -> None:
    v = parse_version_name("s", version_name(CREATED, 3, reason="shrink", source="library", method="link",
                                             digest="a" * 16), 9)
    assert isinstance(v, Version)
    with pytest.raises(AttributeError):
        v.count = 4  # type: ignore[misc]

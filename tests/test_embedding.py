"""Embedding the guard in a real server: the seed-shaped chat server, guarded, and the library's events.

The chat server (``tests/chatserver``) runs as its own process with
``--storage chatserver.guarded``, a copy of its storage module that calls
``sessionguard.Guard``; everything is checked on the real files it leaves
and in the real log (stderr) it writes. The plain-dicts variant and the
snippets of ``docs/embedding.md`` are in ``test_embedding_docs.py``,
``sessionguard.testing`` in ``test_embedding_testing.py``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import sessionguard
from chatserver import ChatServer, Session, make_session, serialize
from chatserver.model import METADATA_KEYS, TRAILING_KEYS
from chatserver.seedio import write_atomic
from embedhelpers import SID, Collect, changed_lines, collecting, log_lines, on_disk, rchar, write
from sghelpers import store_versions

TESTS = Path(__file__).resolve().parent


# -- a dozen lines ------------------------------------------------------------------------

def test_the_guarded_storage_is_twelve_changed_lines_from_the_seeds() -> None:
    """``chatserver/guarded.py`` differs from ``chatserver/storage.py`` by 12 lines: 8 added, 4 removed."""
    storage = (TESTS / "chatserver" / "storage.py").read_text()
    guarded = (TESTS / "chatserver" / "guarded.py").read_text()
    added, removed = changed_lines(storage, guarded)
    assert (added, removed) == (8, 4)
    assert added + removed <= 12


# -- the seed's bug, refused ----------------------------------------------------------------

def test_the_stale_stream_save_is_refused_logged_and_the_file_keeps_its_messages(
        sdir: Path, guarded: ChatServer) -> None:
    """The listing's metadata-only load meets a stale ``active_stream_id``; the server saves the
    partial object (the seed's wipe) and swallows the error. The guard refuses that save before
    writing anything and logs ``save.refused`` with the counts on the server's stderr."""
    path = sdir / f"{SID}.json"
    before = write(sdir, make_session(SID, 1000, active_stream_id="stream-7f3a", tool_calls=[{"id": "t1"}]))
    guarded.start()

    assert [row["session_id"] for row in guarded.get("/sessions")["sessions"]] == [SID]
    assert path.read_bytes() == before
    stats = guarded.get("/debug/stats")
    assert stats["saves"] == {"ok": 0, "failed": 1}  # the server swallowed the refusal
    assert stats["cache"][SID] == {"partial": True, "message_count": 0}
    refused = log_lines(guarded, "save.refused")
    assert len(refused) == 1, guarded.log_text()
    assert refused[0].startswith(f"save.refused sid={SID} before=1000 after=0 ")
    assert store_versions(sdir / ".sessionguard", SID) == []  # nothing was written, nothing to keep

    # The first full read repairs the stream on the whole object: saved, all messages kept.
    served = guarded.get(f"/sessions/{SID}")
    assert len(served["messages"]) == 1000 and served["active_stream_id"] is None
    assert guarded.get("/debug/stats")["saves"] == {"ok": 1, "failed": 1}
    doc = on_disk(path)
    assert len(doc["messages"]) == 1000 and doc["active_stream_id"] is None and doc["tool_calls"] == [{"id": "t1"}]


# -- intended shrinks and start-up recovery -------------------------------------------------

def test_a_users_clear_survives_recover_on_startup_after_a_restart(sdir: Path, guarded: ChatServer) -> None:
    path = sdir / f"{SID}.json"
    write(sdir, make_session(SID, 40, clear_generation="cg-0"))
    guarded.start()
    assert guarded.post(f"/sessions/{SID}/clear")["saved"] is True
    cleared = path.read_bytes()
    assert on_disk(path)["messages"] == [] and on_disk(path)["clear_generation"] != "cg-0"
    assert guarded.stop() == 0

    guarded.start()  # recover_on_startup runs before the server listens
    assert path.read_bytes() == cleared
    assert guarded.get(f"/sessions/{SID}")["messages"] == []
    assert log_lines(guarded, "session.recovered") == []
    assert [v.reason for v in store_versions(sdir / ".sessionguard", SID)] == ["intended"]


def test_an_undo_then_a_wipe_by_another_writer_recovers_to_the_post_undo_count(
        sdir: Path, guarded: ChatServer) -> None:
    """A user's undo (10 → 8, intended), then a second buggy writer that bypasses the guard
    empties the file: the next start restores the 8 messages, never the 10 the user undid."""
    path = sdir / f"{SID}.json"
    write(sdir, make_session(SID, 10, intentional_shrink_generation="isg-0"))
    guarded.start()
    assert guarded.post(f"/sessions/{SID}/undo")["message_count"] == 8
    after_undo = path.read_bytes()
    assert guarded.stop() == 0

    wiped = Session.from_dict(on_disk(path))
    wiped.messages = []
    write_atomic(path, serialize(wiped))  # the seed's own save, from another writer: no guard
    guarded.start()

    assert path.read_bytes() == after_undo
    assert len(guarded.get(f"/sessions/{SID}")["messages"]) == 8
    recovered = log_lines(guarded, "session.recovered")
    assert len(recovered) == 1 and f"sid={SID} " in recovered[0] and "count=8 " in recovered[0], recovered
    reasons = [(v.reason, v.count) for v in store_versions(sdir / ".sessionguard", SID)]
    assert sorted(reasons) == sorted([("intended", 10), ("shrink", 8), ("pre-restore", 0)])


# -- the server's own bytes and the cheap listing read -----------------------------------------

def test_the_bytes_on_disk_are_the_servers_own_serialization(sdir: Path, guarded: ChatServer) -> None:
    """Python's json with indent 2, ``ensure_ascii=False`` and the seed's field order — not orjson,
    which would write the ``NaN`` the file holds as ``null``."""
    path = sdir / f"{SID}.json"
    path.write_text(f'{{"session_id": "{SID}", "title": "t", "x_custom": NaN, "messages": []}}')
    guarded.start()
    guarded.post(f"/sessions/{SID}/messages", {"role": "user", "content": 'héllo ✓ 😀 "quoted"'})
    guarded.post(f"/sessions/{SID}/rename", {"title": "ünïcødé"})

    data = path.read_bytes()
    doc = json.loads(data)
    assert list(doc) == [*METADATA_KEYS, "x_custom", "messages", *TRAILING_KEYS]
    assert math.isnan(doc["x_custom"]) and b'"x_custom": NaN,' in data
    assert data == serialize(Session.from_dict(doc))
    assert data == json.dumps(doc, indent=2, ensure_ascii=False).encode()
    assert "héllo ✓ 😀".encode() in data and "ünïcødé".encode() in data and b"\\u" not in data
    assert sorted(os.listdir(sdir)) == [".sessionguard", f"{SID}.json"]  # no tmp file left


def test_metadata_only_load_equals_a_full_loads_metadata_and_reads_only_a_prefix(sdir: Path) -> None:
    """Through the guarded storage module itself (in this process): the listing read returns the
    full load's values for every key written before ``messages`` and reads a few KiB of a
    430 KB file; the key the seed writes after the messages needs the full load."""
    from chatserver import guarded

    data = write(sdir, make_session(SID, 1000, pinned=True, tool_calls=[{"id": "t1"}],
                                       extra={"x_custom": {"é": [1, None]}}))
    assert len(data) > 400_000
    guarded.startup(sdir)
    try:
        guarded.load_metadata(SID)  # warm: imports and caches are not what is measured
        start = rchar()
        meta = guarded.load_metadata(SID)
        read_meta = rchar() - start
        start = rchar()
        full = guarded.load_session(SID)
        read_full = rchar() - start
    finally:
        guarded.PLACE.guard.close()
    assert isinstance(meta, sessionguard.PartialDocument)
    assert list(meta) == [*METADATA_KEYS, "x_custom"]
    assert meta == {k: v for k, v in full.items() if k not in ("messages", *TRAILING_KEYS)}
    assert "tool_calls" not in meta and full["tool_calls"] == [{"id": "t1"}]
    assert read_meta <= 16384 < len(data) <= read_full, (read_meta, read_full)


# -- library events: the stdlib logger and on_event ----------------------------------------------

@pytest.fixture
def collected() -> Iterator[Collect]:
    with collecting() as handler:
        yield handler


def four_events(sdir: Path) -> list[sessionguard.GuardEvent]:
    """Make the guard keep a shrink, record an intended shrink, refuse a save and recover a wipe;
    what its ``on_event`` callbacks received."""
    seen: list[sessionguard.GuardEvent] = []
    guard = sessionguard.Guard(sdir, on_event=seen.append)
    try:
        guard.save(SID, make_session(SID, 10).to_dict())
        guard.save(SID, make_session(SID, 8).to_dict())  # kept: shrink
        guard.save(SID, make_session(SID, 6, clear_generation="cg-1").to_dict())  # intended
        guard.load(SID, metadata_only=True)
        with pytest.raises(sessionguard.PartialSessionError):
            guard.save_bytes(SID, serialize(make_session(SID, 0, clear_generation="cg-1")), count=0)  # refused
    finally:
        guard.close()
    write_atomic(sdir / f"{SID}.json", serialize(make_session(SID, 0, clear_generation="cg-1")))
    restarted = sessionguard.Guard(sdir, on_event=seen.append)
    try:
        assert [r.sid for r in restarted.recover_on_startup().restored] == [SID]  # recovered (and kept)
    finally:
        restarted.close()
    return seen


def test_every_event_reaches_the_stdlib_logger_and_on_event_with_its_fields(
        sdir: Path, collected: Collect) -> None:
    seen = four_events(sdir)
    records = [r for r in collected.records if getattr(r, "sid", None) == SID]
    assert [(r.sg_event, r.levelname) for r in records] == [  # type: ignore[attr-defined]
        ("session.shrunk", "WARNING"), ("session.shrunk", "INFO"), ("save.refused", "WARNING"),
        ("session.shrunk", "WARNING"), ("session.recovered", "WARNING")]
    assert [(e.name, e.sid, e.level) for e in seen] == [
        (r.sg_event, r.sid, r.levelname.lower()) for r in records]  # type: ignore[attr-defined]
    for record, event in zip(records, seen, strict=True):
        assert {k: getattr(record, k) for k in event.fields} == event.fields
        assert record.getMessage().startswith(f"{event.name} sid={SID} ")
    kept, intended, refused, foreign, recovered = seen
    assert (kept.fields["reason"], kept.fields["before"], kept.fields["after"]) == ("shrink", 10, 8)
    assert (intended.fields["reason"], intended.fields["before"], intended.fields["after"]) == ("intended", 8, 6)
    assert (refused.fields["before"], refused.fields["after"]) == (6, 0)
    assert (foreign.fields["reason"], foreign.fields["before"], foreign.fields["after"]) == ("shrink", 6, 0)
    assert (recovered.fields["count"], recovered.fields["before"]) == (6, 0)
    versions = {v.id: v for v in store_versions(sdir / ".sessionguard", SID)}
    for event in (kept, intended, foreign, recovered):
        assert event.fields["version"] in versions


def test_every_event_carries_sid_before_after_reason_and_version(sdir: Path, collected: Collect) -> None:
    """What a server's log pipeline can rely on: the same five ``extra`` fields on every event
    (``None`` where one does not apply), so one query finds every loss, refusal and recovery."""
    four_events(sdir)
    records = [r for r in collected.records if getattr(r, "sid", None) == SID]
    missing = {r.sg_event: [k for k in ("sid", "before", "after", "reason", "version")  # type: ignore[attr-defined]
                            if not hasattr(r, k)] for r in records}
    assert missing == {name: [] for name in ("session.shrunk", "save.refused", "session.recovered")}


def test_from_config_takes_the_watch_of_the_daemons_config(tmp_path: Path) -> None:
    """One source of truth: count, pattern, excludes, intent keys and retention come from the
    daemon's [[watch]] for the directory (a Path is fine for both arguments)."""
    from sessionguard import Guard

    sdir = tmp_path / "sessions"
    sdir.mkdir()
    cfg = tmp_path / "sessionguard.toml"
    cfg.write_text(f'[[watch]]\npath = "{sdir}"\npattern = "*.session"\nexclude = ["draft-*"]\n'
                   'intent_keys = ["wiped_on_purpose"]\nkeep_last = 3\n')
    g = Guard.from_config(sdir, cfg)
    assert (g.suffix, g.intent_keys, g.store.retention.keep_last) == (".session", ("wiped_on_purpose",), 3)
    g.save("a", {"messages": [1, 2, 3], "wiped_on_purpose": 1})
    assert (sdir / "a.session").exists()
    assert g.save("a", {"messages": [], "wiped_on_purpose": 2}).reason == "intended"
    (sdir / "draft-x.session").write_bytes(b'{"messages": []}')
    assert "draft-x" not in {r.sid for r in g.recover_on_startup().left_alone}, "excluded like the daemon does"
    with pytest.raises(Exception, match="no \\[\\[watch\\]\\]"):
        Guard.from_config(tmp_path / "elsewhere", cfg)

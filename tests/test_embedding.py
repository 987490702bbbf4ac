"""Embedding the guard in a real server: the seed-shaped chat server, a plain-dicts store, the events.

The chat server (``tests/chatserver``) runs as its own process with
``--storage chatserver.guarded``, a copy of its storage module that calls
``sessionguard.Guard``; everything is checked on the real files it leaves
and in the real log (stderr) it writes. ``docs/embedding.md`` shows the same
code: its snippets are extracted and run here, and its diffs are compared
with the diffs of the real files.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sessionguard
from chatserver import ChatServer, Session, make_session, serialize
from chatserver.model import METADATA_KEYS, TRAILING_KEYS
from chatserver.seedio import write_atomic
from sessionguard.testing import crash_guard_save, kill_before_rename, no_unintended_loss
from sghelpers import store_versions

SID = "abc123def456"
GUARDED = "chatserver.guarded"
TESTS = Path(__file__).resolve().parent
DOC = TESTS.parent / "docs" / "embedding.md"


def write(directory: Path, session: Session) -> bytes:
    """Put *session* on disk as the server writes it; its bytes."""
    data = serialize(session)
    (directory / f"{session.session_id}.json").write_bytes(data)
    return data


def on_disk(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes())  # type: ignore[no-any-return]


def log_lines(server: ChatServer, event: str) -> list[str]:
    """The lines of the server's own log (its stderr) that carry the library event *event*."""
    return [line for line in server.log_text().splitlines() if line.startswith(f"{event} ")]


@pytest.fixture
def guarded(sdir: Path) -> Iterator[ChatServer]:
    """The chat server on the guarded storage, not started yet: write the files first."""
    srv = ChatServer(sdir, storage=GUARDED)
    try:
        yield srv
    finally:
        srv.close()


# -- a dozen lines ------------------------------------------------------------------------

def changed_lines(before: str, after: str) -> tuple[int, int]:
    """(added, removed) lines of a unified diff of two texts."""
    diff = list(difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0))
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    return added, removed


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


def rchar() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


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


# -- sessionguard.testing: no unintended loss -------------------------------------------------

def restore_on_disk(path: Path, data: bytes) -> None:
    """What an admin's restore does behind a running server: other bytes renamed onto the name."""
    tmp = path.with_name(path.name + ".restoring")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_no_unintended_loss_names_the_session_a_guarded_server_shrank(sdir: Path, guarded: ChatServer) -> None:
    """Intended shrinks and a refused save pass the check. Then the guarded server's cache outlives
    another writer's change (two more messages): its next save writes the cached ten without intent.
    The guard keeps the version in the server's process; the check, reading the store, names it."""
    path = sdir / f"{SID}.json"
    write(sdir, make_session(SID, 10, intentional_shrink_generation="isg-0"))
    write(sdir, make_session("fedcba987654", 6))
    write(sdir, make_session("0123456789ab", 1000, active_stream_id="stream-1"))
    guarded.start()
    with no_unintended_loss(sdir):
        guarded.get("/sessions")  # the stale stream's metadata-only save: refused, nothing lost
        guarded.post("/sessions/fedcba987654/undo")
        guarded.post("/sessions/fedcba987654/clear")
        assert len(guarded.get(f"/sessions/{SID}")["messages"]) == 10
    assert guarded.get("/debug/stats")["saves"] == {"ok": 2, "failed": 1}

    restore_on_disk(path, serialize(make_session(SID, 12, intentional_shrink_generation="isg-0")))
    with pytest.raises(AssertionError) as failed, no_unintended_loss(sdir):
        guarded.post(f"/sessions/{SID}/rename", {"title": "renamed"})  # writes the cached ten
    message = str(failed.value)
    assert message.startswith(f"1 unintended loss(es) in {sdir}:\n  session {SID!r}: a write lost messages: "
                              "the 12 messages it replaced were kept as a 'shrink' version by the library ("), message
    assert "0123456789ab" not in message and "fedcba987654" not in message


def test_no_unintended_loss_sees_writers_that_bypass_every_guard(sdir: Path) -> None:
    """The unguarded seed's wipe (no store at all) is judged against the file as the block found it;
    a wipe after a guarded save against the guard's pin; a delete only with ``allow_delete=False``."""
    path = sdir / f"{SID}.json"
    write(sdir, make_session(SID, 30, active_stream_id="stream-1"))
    with pytest.raises(AssertionError, match=rf"session '{SID}': 30 → 0 messages, written without the guard "
                                             r"\(compared with the file when the block began\)"), \
            no_unintended_loss(sdir), ChatServer(sdir) as seed:
        seed.get("/sessions")
    assert on_disk(path)["messages"] == []

    guard = sessionguard.Guard(sdir)
    try:
        with pytest.raises(AssertionError, match=r"12 → 0 messages, written without the guard \(compared with "
                                                 r"the last version a guard or the daemon saw\)"), \
                no_unintended_loss(sdir):
            guard.save(SID, make_session(SID, 12).to_dict())
            write_atomic(path, serialize(make_session(SID, 0)))
        with no_unintended_loss(sdir):  # marked as meant: a changed intent key
            write_atomic(path, serialize(make_session(SID, 0, clear_generation=str(uuid.uuid4()))))
        with no_unintended_loss(sdir):
            path.unlink()
        write(sdir, make_session(SID, 3))
        with pytest.raises(AssertionError, match=r"3 → no file: deleted"), \
                no_unintended_loss(sdir, allow_delete=False):
            path.unlink()
    finally:
        guard.close()


def test_no_unintended_loss_counts_the_daemons_versions_of_writes_undone_before_the_end(
        sdir: Path, daemons: Any) -> None:
    """A wipe regrown before the block ends leaves a file with more messages than before: only a
    witness of each write sees the loss. With the daemon watching (and synced), it is a version."""
    path = sdir / f"{SID}.json"
    write(sdir, make_session(SID, 20))
    d = daemons("--watch", str(sdir))
    lost = rf"session '{SID}': a write lost messages: the 20 messages it replaced were kept as a 'shrink' version by "
    with pytest.raises(AssertionError, match=lost + "the daemon"), no_unintended_loss(sdir):
        write_atomic(path, serialize(make_session(SID, 0)))
        d.sync()
        write_atomic(path, serialize(make_session(SID, 25)))
        d.sync()
    with no_unintended_loss(sdir):  # the same, unwitnessed: only the final state is judged
        d.stop()
        write_atomic(path, serialize(make_session(SID, 0)))
        write_atomic(path, serialize(make_session(SID, 30)))


def test_the_pytest_fixture_is_one_line_in_a_servers_conftest(tmp_path: Path) -> None:
    """A server's own suite, run by a real pytest: ``pytest_plugins = ["sessionguard.testing"]``
    gives every test the ``no_unintended_loss`` fixture; a test whose code wipes a session fails at
    teardown naming it, one that only grows sessions passes."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text('pytest_plugins = ["sessionguard.testing"]\n')
    (suite / "test_server.py").write_text(FIXTURE_TESTS)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                          f"--basetemp={tmp_path / 'base'}", str(suite)],
                         capture_output=True, text=True, cwd=suite, timeout=120, check=False)
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert re.search(r"^PASSED test_server.py::test_growing$", out, re.M), out
    assert re.search(r"^FAILED test_server.py::test_wiping - AssertionError: 1 unintended loss", out, re.M), out
    assert re.search(r"^ERROR test_server.py::test_flush_at_teardown - Failed: at teardown", out, re.M), out
    for test, before in (("test_wiping", 3), ("test_flush_at_teardown", 5)):
        assert f"{tmp_path}/base/{test}0: session 'abc123def456': {before} → 0 messages, written without the guard" \
            in out, out
    assert "1 failed, 2 passed, 1 error" in out


FIXTURE_TESTS = '''
import json

import pytest


def save(path, n):
    path.write_text(json.dumps({"session_id": "abc123def456", "messages": [{"role": "user"}] * n}))


def test_growing(no_unintended_loss, tmp_path):
    save(tmp_path / "abc123def456.json", 3)
    no_unintended_loss(tmp_path)
    save(tmp_path / "abc123def456.json", 4)


def test_wiping(no_unintended_loss, tmp_path):
    save(tmp_path / "abc123def456.json", 3)
    no_unintended_loss(tmp_path)
    save(tmp_path / "abc123def456.json", 0)


@pytest.fixture
def server(no_unintended_loss, tmp_path):
    save(tmp_path / "abc123def456.json", 3)
    no_unintended_loss(tmp_path)
    yield tmp_path
    save(tmp_path / "abc123def456.json", 0)  # a buggy flush at shutdown


def test_flush_at_teardown(server):
    save(server / "abc123def456.json", 5)
'''


# -- sessionguard.testing: a crash between the write and the rename -----------------------------

def test_a_guard_save_killed_before_its_rename_is_cleaned_up_by_the_next_start(
        sdir: Path, guarded: ChatServer) -> None:
    path = sdir / f"{SID}.json"
    before = write(sdir, make_session(SID, 6))
    sessionguard.Guard(sdir).close()  # the store exists, as after any earlier run
    crash = crash_guard_save(sdir, SID, serialize(make_session(SID, 7)), count=7)
    assert path.read_bytes() == before
    assert [re.fullmatch(rf"\.{SID}\.json\.tmp-sg-{crash.pid}-[0-9a-f]{{8}}", n) is not None
            for n in crash.left] == [True], crash
    assert len((sdir / crash.left[0]).read_bytes()) == len(serialize(make_session(SID, 7)))  # written in full

    guarded.start()  # recover_on_startup sweeps the dead writer's tmp file
    assert sorted(os.listdir(sdir)) == [".sessionguard", f"{SID}.json"]
    assert len(guarded.get(f"/sessions/{SID}")["messages"]) == 6
    assert log_lines(guarded, "session.recovered") == []


def test_the_seeds_own_save_killed_before_its_rename(sdir: Path) -> None:
    """Any save function: the seed's ``write_atomic`` leaves ``<sid>.tmp.<pid>.<tid>``, the old file intact."""
    path = sdir / f"{SID}.json"
    before = write(sdir, make_session(SID, 2))
    crash = kill_before_rename(lambda: write_atomic(path, serialize(make_session(SID, 3))), path)
    assert path.read_bytes() == before
    assert [re.fullmatch(rf"{SID}\.tmp\.{crash.pid}\.\d+", n) is not None for n in crash.left] == [True], crash

    with pytest.raises(AssertionError, match=r"never reached the rename onto .*: the save raised ValueError: invalid"):
        kill_before_rename(lambda: int("no"), path)
    with pytest.raises(AssertionError, match=r"never reached the rename .*: the save returned"):
        kill_before_rename(lambda: (sdir / "other.json").write_text("{}"), path)
    assert path.read_bytes() == before

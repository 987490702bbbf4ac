"""The test chat server behaves like the seed (hermes-webui) as the field notes describe it.

Every test runs the real server process on real files: the listing is
metadata-only, the stale-stream repair wipes a 1000-message session, the
cache outlives a restore on disk and a rename writes the wipe back, ``reload``
shows the restored conversation, undo/truncate/clear change the right intent
marker, and the bytes on disk are the server's own serialization.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.events import FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from chatserver import ChatServer, ChatServerError, Session, make_session, serialize
from chatserver.model import METADATA_KEYS, TRAILING_KEYS
from daemonproc import eventually

SID = "abc123def456"


def write(directory: Path, session: Session) -> bytes:
    """Put *session* on disk as the server would write it; its bytes."""
    data = serialize(session)
    (directory / f"{session.session_id}.json").write_bytes(data)
    return data


def restore_on_disk(path: Path, data: bytes) -> None:
    """What an admin's restore does: other bytes renamed onto the session name."""
    tmp = path.with_name(path.name + ".restoring")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def on_disk(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes())  # type: ignore[no-any-return]


@pytest.fixture
def server(sdir: Path) -> Iterator[ChatServer]:
    """A server that is not started yet: write the files first, then ``server.start()``."""
    srv = ChatServer(sdir)
    try:
        yield srv
    finally:
        srv.close()
    assert not srv.running()


# -- the object model and its bytes (in process) ---------------------------------

def test_model_round_trip_order_and_partial() -> None:
    original = make_session(SID, 4, active_stream_id="s1", extra={"x_custom": [1, "é"]})
    data = serialize(original)
    doc = json.loads(data)
    assert list(doc) == [*METADATA_KEYS, "x_custom", "messages", *TRAILING_KEYS]
    assert data == json.dumps(doc, indent=2, ensure_ascii=False).encode()
    again = Session.from_dict(doc)
    assert serialize(again) == data and not again.partial
    partial = Session.from_dict(doc, partial=True)
    assert partial.partial and partial.messages == [] and partial.title == original.title
    not_sessions: list[Any] = [[], {"title": "no id"}, {"session_id": SID, "messages": {}}, {"session_id": 7}]
    for bad in not_sessions:
        with pytest.raises(ValueError):
            Session.from_dict(bad)


# -- metadata-only listing -------------------------------------------------------

def test_listing_loads_metadata_only(sdir: Path, server: ChatServer) -> None:
    """The listing never reads past ``"messages"``: a file torn inside its messages is still listed."""
    big = write(sdir, make_session(SID, 1000))
    write(sdir, make_session("0123456789ab", 3, updated_at=1.0))
    torn = serialize(make_session("20260424_231848_e7706c", 50))
    (sdir / "20260424_231848_e7706c.json").write_bytes(torn[: len(torn) // 2])
    (sdir / "_index.json").write_text('["abc123def456"]')  # the server's own file: not a session
    (sdir / "fedcba987654.json").symlink_to(sdir / f"{SID}.json")  # never followed
    server.start()

    listing = server.get("/sessions")
    assert [row["session_id"] for row in listing["sessions"]] == [SID, "20260424_231848_e7706c", "0123456789ab"]
    assert all("messages" not in row for row in listing["sessions"])
    assert listing["sessions"][0]["title"] == f"conversation {SID}"
    stats = server.get("/debug/stats")
    assert stats["loads"] == {"full": 0, "metadata": 3}
    assert {sid: c["partial"] for sid, c in stats["cache"].items()} == dict.fromkeys(
        [SID, "0123456789ab", "20260424_231848_e7706c"], True)
    assert stats["saves"] == {"ok": 0, "failed": 0}  # no stale stream: nothing written
    assert (sdir / f"{SID}.json").read_bytes() == big

    # A full read replaces the partial object; the torn file is refused only then.
    assert len(server.get(f"/sessions/{SID}")["messages"]) == 1000
    with pytest.raises(ChatServerError) as torn_read:
        server.get("/sessions/20260424_231848_e7706c")
    assert torn_read.value.status == 422
    stats = server.get("/debug/stats")
    assert stats["cache"][SID] == {"partial": False, "message_count": 1000}
    assert stats["loads"] == {"full": 2, "metadata": 3}
    assert server.request("GET", "/sessions/fedcba987654")[0] == 422  # ELOOP: the symlink is not followed


# -- the seed's wipe, and the cache outliving a restore ------------------------------

def test_stale_stream_wipes_a_1000_message_session_on_its_first_metadata_only_read(
        sdir: Path, server: ChatServer) -> None:
    session = make_session(SID, 1000, active_stream_id="stream-7f3a", pending_user_message="and then?",
                           intentional_shrink_generation="isg-0", clear_generation="cg-0", tool_calls=[{"id": "t1"}])
    before = write(sdir, session)
    assert len(before) > 400_000
    calm = write(sdir, make_session("0123456789ab", 20))  # no recorded stream: left alone
    early = write(sdir, make_session("fedcba987654", 30, active_stream_id="stream-0"))
    server.start()

    assert len(server.get("/sessions/fedcba987654")["messages"]) == 30  # first read full: repaired, not wiped
    server.get("/sessions")

    wiped = on_disk(sdir / f"{SID}.json")
    expected = {**json.loads(before), "messages": [], "tool_calls": [],
                "active_stream_id": None, "pending_user_message": None}
    assert wiped == expected  # every other metadata key, and both intent markers, unchanged
    assert len((sdir / f"{SID}.json").read_bytes()) < 1000
    assert (sdir / "0123456789ab.json").read_bytes() == calm
    kept = on_disk(sdir / "fedcba987654.json")
    assert kept == {**json.loads(early), "active_stream_id": None}
    # The cached object is now the server's truth: it serves the wipe.
    assert server.get(f"/sessions/{SID}")["messages"] == []
    assert server.get("/debug/stats")["cache"][SID] == {"partial": False, "message_count": 0}


def test_cache_outlives_a_restore_and_the_next_rename_writes_the_wipe_back(sdir: Path, server: ChatServer) -> None:
    path = sdir / f"{SID}.json"
    original = write(sdir, make_session(SID, 1000, active_stream_id="stream-7f3a"))
    server.start()
    server.get("/sessions")
    assert on_disk(path)["messages"] == []

    restore_on_disk(path, original)
    assert server.get(f"/sessions/{SID}")["messages"] == []  # still the cached object
    assert len(on_disk(path)["messages"]) == 1000  # reads never write
    answer = server.post(f"/sessions/{SID}/rename", {"title": "renamed"})
    assert answer == {"session_id": SID, "title": "renamed", "message_count": 0, "saved": True}
    rewiped = on_disk(path)
    assert rewiped["messages"] == [] and rewiped["title"] == "renamed"

    # The code path that reloads from disk shows the restored conversation.
    restore_on_disk(path, original)
    assert server.post(f"/reload/{SID}") == {"session_id": SID, "dropped": True}
    served = server.get(f"/sessions/{SID}")
    assert len(served["messages"]) == 1000 and served["active_stream_id"] is None
    assert len(on_disk(path)["messages"]) == 1000  # the repair saved the full object this time
    assert on_disk(path)["active_stream_id"] is None


def test_restored_bytes_retrigger_the_bug_after_a_reload_or_a_restart(sdir: Path, server: ChatServer) -> None:
    """A restored file still carries the stale stream: a listing first wipes it again."""
    path = sdir / f"{SID}.json"
    original = write(sdir, make_session(SID, 1000, active_stream_id="stream-7f3a"))
    server.start()
    server.get("/sessions")
    restore_on_disk(path, original)
    server.post(f"/reload/{SID}")
    server.get("/sessions")
    assert on_disk(path)["messages"] == []

    restore_on_disk(path, original)
    assert server.stop() == 0
    server.start()  # a restart: an empty cache
    assert len(server.get(f"/sessions/{SID}")["messages"]) == 1000


# -- intended shrinks and their markers --------------------------------------------

def test_undo_truncate_clear_change_the_right_marker(sdir: Path, server: ChatServer) -> None:
    path = sdir / f"{SID}.json"
    write(sdir, make_session(SID, 10, intentional_shrink_generation="isg-0", clear_generation="cg-0"))
    server.start()

    def markers() -> tuple[str, str]:
        doc = on_disk(path)
        return doc["intentional_shrink_generation"], doc["clear_generation"]

    assert server.post(f"/sessions/{SID}/messages", {"role": "user", "content": "more"})["message_count"] == 11
    assert markers() == ("isg-0", "cg-0")  # growing is not a shrink
    assert server.post(f"/sessions/{SID}/undo")["message_count"] == 10  # the lone trailing user turn
    isg1, cg = markers()
    assert isg1 != "isg-0" and cg == "cg-0"
    assert server.post(f"/sessions/{SID}/undo")["message_count"] == 8  # a user + assistant exchange
    isg2, cg = markers()
    assert isg2 not in ("isg-0", isg1) and cg == "cg-0"
    assert server.post(f"/sessions/{SID}/truncate", {"keep": 5})["message_count"] == 5
    isg3, cg = markers()
    assert isg3 not in ("isg-0", isg1, isg2) and cg == "cg-0"
    assert on_disk(path)["messages"] == make_session(SID, 5).messages
    cleared = server.post(f"/sessions/{SID}/clear")
    assert cleared == {"session_id": SID, "title": "Untitled", "message_count": 0, "saved": True}
    isg, cg = markers()
    assert isg == isg3 and cg != "cg-0"
    with pytest.raises(ChatServerError) as nothing:
        server.post(f"/sessions/{SID}/undo")
    assert nothing.value.status == 409


# -- the server's own bytes and save recipe ----------------------------------------

class _Moves(FileSystemEventHandler):
    def __init__(self) -> None:
        self.moves: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def on_moved(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileMovedEvent):
            with self.lock:
                self.moves.append((os.path.basename(str(event.src_path)), os.path.basename(str(event.dest_path))))


def test_saves_are_the_servers_own_bytes_by_tmp_and_rename(sdir: Path, server: ChatServer) -> None:
    path = sdir / f"{SID}.json"
    path.write_text(f'{{"session_id": "{SID}", "title": "t", "x_custom": NaN, "messages": []}}')
    server.start()
    moves = _Moves()
    observer = Observer()
    observer.schedule(moves, str(sdir))
    observer.start()
    try:
        server.post(f"/sessions/{SID}/messages", {"role": "user", "content": "héllo ✓ 😀 \"quoted\""})
        move = eventually(lambda: [m for m in moves.moves if m[1] == f"{SID}.json"], what="the save's rename")
    finally:
        observer.stop()
        observer.join()
    assert re.fullmatch(rf"{SID}\.tmp\.{server.pid}\.\d+", move[0][0]), move
    data = path.read_bytes()
    doc = json.loads(data)
    assert list(doc) == [*METADATA_KEYS, "x_custom", "messages", *TRAILING_KEYS]
    assert data == json.dumps(doc, indent=2, ensure_ascii=False).encode()
    assert "héllo ✓ 😀".encode() in data and b"\\u" not in data  # ensure_ascii=False
    assert b'"x_custom": NaN,' in data  # Python's json writes what it read
    assert doc["messages"] == [{"role": "user", "content": 'héllo ✓ 😀 "quoted"'}]
    assert sorted(os.listdir(sdir)) == [f"{SID}.json"]  # no tmp left behind


def test_startup_sweeps_the_servers_stale_tmp_files(sdir: Path, server: ChatServer) -> None:
    old, fresh = sdir / f"{SID}.tmp.1.2", sdir / f"{SID}.tmp.3.4"
    old.write_text("{")
    fresh.write_text("{")
    hour_ago = time.time() - 3700
    os.utime(old, (hour_ago, hour_ago))
    server.start()
    assert not old.exists() and fresh.exists()


# -- delete and bad requests -------------------------------------------------------

def test_delete_and_bad_requests(sdir: Path, server: ChatServer) -> None:
    write(sdir, make_session(SID, 4))
    (sdir / "0123456789ab.json").write_text("[1, 2]")  # parseable, but not a session
    server.start()
    assert server.get("/sessions")["skipped"] == [
        {"session_id": "0123456789ab", "error": "ValueError: a session is a JSON object, not a list"}]
    assert server.delete(f"/sessions/{SID}") == {"session_id": SID, "deleted": True}
    assert not (sdir / f"{SID}.json").exists()
    for method, route, body, status in [
        ("GET", f"/sessions/{SID}", None, 404),
        ("DELETE", f"/sessions/{SID}", None, 404),
        ("GET", "/sessions/0123456789ab", None, 422),
        ("GET", "/sessions/..", None, 404),
        ("GET", "/nowhere", None, 404),
        ("POST", f"/sessions/{SID}", None, 405),
        ("POST", "/sessions/0123456789ab/messages", {"role": "user"}, 400),
        ("POST", "/sessions/0123456789ab/truncate", {"keep": -1}, 400),
        ("POST", "/sessions/0123456789ab/rename", ["title"], 400),
    ]:
        answer = server.request(method, route, body)
        assert answer[0] == status, (method, route, answer)
    assert server.running()


# -- the storage seam a guarded variant plugs into ------------------------------------

MEMORY_STORAGE = '''
"""A storage module that keeps sessions in memory and records every call."""
import json, os, sys
from chatserver.model import make_session, serialize

FILES = {}

def _log(*call):
    print("storage", *call, file=sys.stderr, flush=True)

def startup(directory):
    _log("startup")
    FILES["abc123def456"] = serialize(make_session("abc123def456", 6, active_stream_id="s"))

def list_sids():
    return sorted(FILES)

def load_session(sid):
    _log("load_session", sid)
    return json.loads(FILES[sid])

def load_metadata(sid):
    _log("load_metadata", sid)
    return {k: v for k, v in json.loads(FILES[sid]).items() if k != "messages"}

def save_session(session):
    _log("save_session", session.session_id, len(session.messages))
    FILES[session.session_id] = serialize(session)

def delete_session(sid):
    _log("delete_session", sid)
    del FILES[sid]
'''


def test_the_storage_module_is_the_only_way_to_files(sdir: Path, tmp_path: Path) -> None:
    """``--storage`` swaps the whole storage layer: with one that keeps sessions in memory, every
    endpoint works and the session directory stays empty, so nothing else reads or writes files."""
    (tmp_path / "memstore.py").write_text(MEMORY_STORAGE)
    with ChatServer(sdir, storage="memstore", env={"PYTHONPATH": str(tmp_path)}) as srv:
        assert len(srv.get(f"/sessions/{SID}")["messages"]) == 6
        srv.post(f"/reload/{SID}")
        assert [r["session_id"] for r in srv.get("/sessions")["sessions"]] == [SID]
        srv.post(f"/sessions/{SID}/messages", {"role": "user", "content": "x"})
        srv.post(f"/sessions/{SID}/rename", {"title": "y"})
        srv.post(f"/sessions/{SID}/undo")
        srv.post(f"/sessions/{SID}/truncate", {"keep": 2})
        srv.post(f"/sessions/{SID}/clear")
        srv.delete(f"/sessions/{SID}")
        assert srv.get("/sessions")["sessions"] == []
        calls = [line.split()[1:] for line in srv.log_text().splitlines() if line.startswith("storage ")]
        assert srv.stop() == 0
    assert os.listdir(sdir) == []
    assert calls == [
        ["startup"],
        ["load_session", SID], ["save_session", SID, "6"],  # stale stream repaired on a full object
        ["load_metadata", SID],  # the listing, after the reload
        ["load_session", SID], ["save_session", SID, "7"],  # a partial object is loaded fully first
        ["save_session", SID, "7"], ["save_session", SID, "6"], ["save_session", SID, "2"],
        ["save_session", SID, "0"], ["delete_session", SID],
    ]

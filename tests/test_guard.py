"""The embeddable guard on real files: the original fix's six behaviours and beyond."""

from __future__ import annotations

import errno
import multiprocessing
import os
import threading
from pathlib import Path

import orjson
import pytest

import sessionguard
from sessionguard import Guard, PartialSessionError, UnsafeSessionFile
from sessionguard import guard as guard_mod
from sghelpers import count_of, make_session, needs_root, server_write, snapshot

SID = "abc123def456"


def vpath(g: Guard, v: sessionguard.Version) -> Path:
    """Where a version lives in the guard's store (an admin's `ls` sees the same)."""
    return Path(g.store.where) / "sessions" / v.sid / v.name


@pytest.fixture
def sessions(tmp_path: Path) -> Path:
    d = tmp_path / "sessions"
    d.mkdir()
    return d


def test_metadata_only_save_raises_and_file_keeps_its_messages(sessions: Path) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(1000))
    before = (sessions / f"{SID}.json").read_bytes()
    meta = g.load(SID, metadata_only=True)
    assert "messages" not in meta and meta["title"] == f"session {SID}"
    meta["messages"] = []  # what the buggy server's Session object did
    with pytest.raises(PartialSessionError):
        g.save(SID, meta)
    assert (sessions / f"{SID}.json").read_bytes() == before
    assert count_of(sessions / f"{SID}.json") == 1000
    assert g.versions(SID) == []


def test_shrink_keeps_the_prior_version(sessions: Path) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(1000))
    original = (sessions / f"{SID}.json").read_bytes()
    kept = g.save(SID, make_session(500))
    assert count_of(sessions / f"{SID}.json") == 500, "the server stays in charge: the write happens"
    versions = g.versions(SID)
    assert [v.count for v in versions] == [1000]
    assert kept == versions[0]
    assert versions[0].reason == "shrink" and versions[0].source == "library"
    assert versions[0].method == "link", "the library keeps the replaced inode: zero copy"
    assert vpath(g, versions[0]).read_bytes() == original


def test_growing_keeps_no_version_and_pins_by_hard_link(sessions: Path) -> None:
    g = Guard(sessions)
    for n in (10, 20, 1000):
        assert g.save(SID, make_session(n)) is None
    assert g.versions(SID) == []
    live = os.stat(sessions / f"{SID}.json")
    pin = g.store.pins.stat(SID)
    assert pin is not None and pin.st_ino == live.st_ino and live.st_nlink == 2, "pin is a hard link: no bytes copied"
    assert os.listdir(Path(g.store.where) / "sessions") == [], "no folder for a session without versions"


def test_a_file_replaced_between_the_save_and_its_pin_is_not_pinned(sessions: Path) -> None:
    """repin links the saved file by name: if another writer put a different file under
    that name first, the link names the wrong inode, is removed, and the pin stays."""
    g = Guard(sessions)
    g.save(SID, make_session(10))
    pinned = g.store.pins.stat(SID)
    name = f"{SID}.json"
    ours = os.stat(sessions / name)
    server_write(sessions / name, make_session(3))  # another writer, after "our" rename
    dir_fd = os.open(sessions, os.O_RDONLY | os.O_DIRECTORY)
    try:
        g.repin(SID, dir_fd, name, ours)
    finally:
        os.close(dir_fd)
    after = g.store.pins.stat(SID)
    assert pinned is not None and after is not None and after.st_ino == pinned.st_ino
    assert [n for n in os.listdir(Path(g.store.where) / "pins") if n != SID] == [], "no tmp link left behind"


def test_recovery_restores_a_session_emptied_through_the_guard(sessions: Path) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(1000))
    g.save(SID, make_session(0))  # unintended: allow_shrink=False
    report = Guard(sessions).recover_on_startup()  # a fresh process would do this
    assert [r.sid for r in report.restored] == [SID]
    assert count_of(sessions / f"{SID}.json") == 1000


def test_recovery_restores_a_session_emptied_by_a_writer_bypassing_the_guard(sessions: Path) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(1000))
    server_write(sessions / f"{SID}.json", make_session(0))
    report = Guard(sessions).recover_on_startup()
    assert [r.sid for r in report.restored] == [SID]
    assert count_of(sessions / f"{SID}.json") == 1000
    reasons = [v.reason for v in g.versions(SID)]
    assert "shrink" in reasons and "pre-restore" in reasons


def test_recovery_on_a_clean_directory_changes_nothing(sessions: Path) -> None:
    g = Guard(sessions)
    for i in range(5):
        g.save(f"s{i}", make_session(10 + i, sid=f"s{i}"))
    (sessions / "_index.json").write_bytes(b'[{"session_id": "s0"}]')
    before = snapshot(sessions)
    report = Guard(sessions).recover_on_startup()
    assert report.restored == []
    assert snapshot(sessions) == before, "byte-identical, same inodes, same mtimes"


def test_non_session_json_does_not_stop_recovery_of_the_others(sessions: Path) -> None:
    g = Guard(sessions)
    for sid in ("aaa", "bbb"):
        g.save(sid, make_session(50, sid=sid))
        server_write(sessions / f"{sid}.json", make_session(0, sid=sid))
    (sessions / "_index.json").write_bytes(b'[{"session_id": "aaa"}, {"session_id": "bbb"}]')
    (sessions / "notes.json").write_bytes(b'["a list, not a session"]')
    report = Guard(sessions).recover_on_startup()
    assert sorted(r.sid for r in report.restored) == ["aaa", "bbb"]
    assert count_of(sessions / "aaa.json") == 50 and count_of(sessions / "bbb.json") == 50
    assert any(a.sid == "notes" for a in report.left_alone)


def test_wipe_regrow_wipe_keeps_both_and_restore_means_the_last_damage(sessions: Path) -> None:
    """1000 -> 0 -> 2 -> 0: a single .bak slot would hold only the 2-message version. Both
    are kept; `restore` means the state just before the last damage (2), `most` the 1000."""
    g = Guard(sessions)
    g.save(SID, make_session(1000))
    g.save(SID, make_session(0))
    g.save(SID, make_session(2))
    g.save(SID, make_session(0))
    assert sorted(v.count for v in g.versions(SID)) == [2, 1000]
    g.restore(SID)
    assert count_of(sessions / f"{SID}.json") == 2
    g.restore(SID, most=True)
    assert count_of(sessions / f"{SID}.json") == 1000


def test_intended_undo_survives_startup_recovery(sessions: Path) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(10))
    kept = g.save(SID, make_session(4), allow_shrink=True, reason="user undo")
    assert kept is not None and kept.reason == "intended" and kept.count == 10
    report = Guard(sessions).recover_on_startup()
    assert report.restored == []
    assert count_of(sessions / f"{SID}.json") == 4


def test_intended_clear_to_zero_survives_startup_recovery(sessions: Path) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(10))
    g.save(SID, make_session(0), allow_shrink=True, reason="clear")
    report = Guard(sessions).recover_on_startup()
    assert report.restored == [] and count_of(sessions / f"{SID}.json") == 0


def test_save_does_not_parse_the_previous_file_on_the_hot_path(sessions: Path, monkeypatch) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(100))
    calls = []
    real = guard_mod.parse
    monkeypatch.setattr(guard_mod, "parse", lambda *a, **k: calls.append(1) or real(*a, **k))
    for n in range(101, 111):
        g.save(SID, make_session(n))
    assert calls == [], "the pin's (dev, ino, size, mtime_ns) key gave the count"
    server_write(sessions / f"{SID}.json", make_session(200))  # changed behind the guard's back
    g.save(SID, make_session(201))
    assert 1 <= len(calls) <= 2, "a foreign write is parsed once, and the pin at most once to compare"


def test_foreign_wipe_before_a_guarded_save_is_still_kept(sessions: Path) -> None:
    """Pin 1000, a bypassing writer wipes to 0, then the guard saves 5: the 1000 must survive."""
    g = Guard(sessions)
    g.save(SID, make_session(1000))
    server_write(sessions / f"{SID}.json", make_session(0))
    g.save(SID, make_session(5))
    assert [v.count for v in g.versions(SID)] == [1000]


def test_restore_is_atomic_and_undoable(sessions: Path) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(1000))
    g.save(SID, make_session(3))
    wiped = (sessions / f"{SID}.json").read_bytes()
    result = g.restore(SID)
    assert result.restored.count == 1000 and result.pre_restore is not None
    assert result.pre_restore.reason == "pre-restore" and result.pre_restore.count == 3
    assert count_of(sessions / f"{SID}.json") == 1000
    live = os.stat(sessions / f"{SID}.json")
    assert live.st_ino != os.stat(vpath(g, result.restored)).st_ino, "the live file never shares the version's inode"
    g.restore(SID, result.pre_restore.id)  # undo the restore
    assert (sessions / f"{SID}.json").read_bytes() == wiped
    assert not [n for n in os.listdir(sessions) if ".tmp" in n]


def test_restore_dry_run_writes_nothing(sessions: Path) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(100))
    g.save(SID, make_session(1))
    before = snapshot(sessions)
    result = g.restore(SID, dry_run=True)
    assert result.dry_run and result.restored.count == 100
    assert snapshot(sessions) == before and len(g.versions(SID)) == 1


def test_restore_keeps_the_mode_of_the_replaced_file(sessions: Path) -> None:
    g = Guard(sessions)
    g.save(SID, make_session(10))
    g.save(SID, make_session(1))
    os.chmod(sessions / f"{SID}.json", 0o604)
    g.restore(SID)
    assert os.stat(sessions / f"{SID}.json").st_mode & 0o777 == 0o604


def test_saves_get_their_mode_whatever_the_umask(sessions: Path) -> None:
    """A new file is made with its final mode to spare a fchmod per save; a umask
    that strips bits must not leak into the session's mode (new: 0640; replaced:
    the replaced file's)."""
    g = Guard(sessions)
    old = os.umask(0o277)
    try:
        g.save(SID, make_session(3))
        assert os.stat(sessions / f"{SID}.json").st_mode & 0o777 == 0o640
        os.chmod(sessions / f"{SID}.json", 0o664)
        g.save(SID, make_session(4))
        assert os.stat(sessions / f"{SID}.json").st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_symlinked_session_file_is_refused_not_followed(sessions: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_bytes(orjson.dumps(make_session(3)))
    before = target.read_bytes()
    (sessions / f"{SID}.json").symlink_to(target)
    g = Guard(sessions)
    with pytest.raises(UnsafeSessionFile):
        g.save(SID, make_session(1))
    with pytest.raises(UnsafeSessionFile):
        g.load(SID)
    assert target.read_bytes() == before
    assert os.path.islink(sessions / f"{SID}.json")


@pytest.mark.parametrize("bad", ["", ".", "..", "../etc/passwd", "a/b", "a\0b", ".hidden", "x" * 256])
def test_bad_session_ids_are_refused_and_nothing_is_written(sessions: Path, bad: str) -> None:
    g = Guard(sessions)
    before = sorted(os.listdir(sessions))
    with pytest.raises(ValueError):
        g.save(bad, make_session(1))
    assert sorted(os.listdir(sessions)) == before


def _hammer(directory: str, writer: int, rounds: int) -> None:
    g = Guard(directory)
    for i in range(rounds):
        g.save(SID, make_session(50 + (i * 7 + writer * 13) % 60), allow_shrink=True)


def _reader(path: Path, stop: threading.Event, errors: list[str]) -> None:
    while not stop.is_set():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            errors.append(f"torn read of {len(data)} bytes: {exc}")


def test_concurrent_threads_and_processes_never_tear_the_file(sessions: Path) -> None:
    Guard(sessions).save(SID, make_session(1))
    stop = threading.Event()
    errors: list[str] = []
    reader = threading.Thread(target=_reader, args=(sessions / f"{SID}.json", stop, errors))
    reader.start()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(sessions), w, 25)) for w in range(2)]
    threads = [threading.Thread(target=_hammer, args=(str(sessions), 10 + w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    stop.set()
    reader.join()
    assert errors == []
    assert 50 <= count_of(sessions / f"{SID}.json") < 110
    g = Guard(sessions)
    for v in g.versions(SID):
        assert len(orjson.loads(vpath(g, v).read_bytes())["messages"]) == v.count
    pin = g.store.pins.stat(SID)
    assert pin is not None and pin.st_ino == os.stat(sessions / f"{SID}.json").st_ino
    assert not [n for n in os.listdir(sessions) if ".tmp" in n]


@needs_root
def test_save_on_a_full_filesystem_raises_and_keeps_the_previous_file(tmpfs) -> None:
    mp = tmpfs("1m")
    g = Guard(mp)
    g.save(SID, make_session(500))  # ~240 KB
    before = (mp / f"{SID}.json").read_bytes()
    with pytest.raises(OSError) as exc:
        g.save(SID, make_session(3000))  # ~1.4 MB: cannot fit
    assert exc.value.errno == errno.ENOSPC
    assert (mp / f"{SID}.json").read_bytes() == before
    assert not [n for n in os.listdir(mp) if ".tmp" in n], "the failed tmp file was removed"
    g.save(SID, make_session(501))  # space is still usable afterwards
    assert count_of(mp / f"{SID}.json") == 501


def test_jsonl_and_pointer_counting(tmp_path: Path) -> None:
    g = Guard(tmp_path, count="jsonl")
    g.save("j1", [{"m": i} for i in range(5)])
    kept = g.save("j1", [{"m": 0}])
    assert kept is not None and kept.count == 5
    assert (tmp_path / "j1.jsonl").read_bytes().count(b"\n") == 1
    d = tmp_path / "p"
    d.mkdir()
    gp = Guard(d, count="/data/turns")
    gp.save("p1", {"title": "t", "data": {"turns": [1, 2, 3]}})
    meta = gp.load("p1", metadata_only=True)
    assert meta == {"title": "t", "data": {}}
    with pytest.raises(PartialSessionError):
        gp.save("p1", meta)
    with pytest.raises(PartialSessionError):  # loaded metadata-only and not fully since: no shrink
        gp.save("p1", {"title": "t", "data": {"turns": [1]}})
    gp.load("p1")
    assert gp.save("p1", {"title": "t", "data": {"turns": [1]}}).count == 3


def test_the_package_imports_without_daemon_dependencies(tmp_path: Path) -> None:
    """guard and store must work with only orjson + stdlib (a server embeds them)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('watchdog', 'structlog', 'systemd'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sessionguard\n"
        f"g = sessionguard.Guard({str(tmp_path)!r})\n"
        "g.save('a', {'messages': [1, 2]}); g.save('a', {'messages': []})\n"
        "assert [v.count for v in g.versions('a')] == [2]\n"
        "print('ok')\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert sessionguard.__version__


def test_a_foreign_shrink_regrown_before_the_next_save_keeps_the_lost_messages(tmp_path: Path) -> None:
    """Another writer dropped the last 4 of 10 messages and then wrote 6 new ones (12 in
    all) between two guarded saves: the count grew, but messages 6..9 exist only in the pin."""
    g = Guard(tmp_path)
    doc = make_session(10, SID)
    g.save(SID, doc)
    dropped = doc["messages"][6:]
    doc["messages"] = doc["messages"][:6] + [dict(m, content="regenerated") for m in make_session(6)["messages"]]
    server_write(tmp_path / f"{SID}.json", doc)
    doc["messages"].append({"role": "user", "content": "next"})
    g.save(SID, doc)
    kept = [v for v in g.versions(SID) if v.count == 10]
    assert kept, "the pin with the dropped messages was not kept"
    assert orjson.loads(vpath(g, kept[0]).read_bytes())["messages"][6:] == dropped


def test_an_in_place_rewrite_of_a_link_pinned_file_is_reported_not_mislabelled(tmp_path: Path, caplog) -> None:
    """The guard's pin is a hard link to the live file: a foreign in-place write rewrites
    it too. The store must not keep those bytes as the pinned 10-message version, and
    start-up recovery must not 'restore' them."""
    g = Guard(tmp_path)
    g.save(SID, make_session(10))
    with open(tmp_path / f"{SID}.json", "r+b") as f:  # an editor or a second tool, in place
        f.truncate(0)
        f.write(orjson.dumps(make_session(0)))
    with caplog.at_level("ERROR", logger="sessionguard"):
        report = g.recover_on_startup()
    assert not report.restored
    assert all(v.count == count_of(vpath(g, v)) for v in g.versions(SID)), "a version's label must match its bytes"
    assert any(getattr(r, "sg_event", None) == "pin.overwritten" for r in caplog.records)

"""sessionguardd as a real process, on real inotify and real files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest

from daemonproc import DaemonProc, eventually, stopped_thread
from sessionguard import Guard
from sessionguard.count import CountSpec, parse
from sghelpers import make_session, needs_root, pin_count, reconciliations, server_write, store_of, store_versions

SID = "abc123def456"


def versions(sdir: Path, sid: str = SID):
    """*sid*'s versions as the store's directory holds them (read here, not through a Guard:
    opening a store as another user than its owner is refused)."""
    return store_versions(store_of(sdir), sid)


def kept(sdir: Path, count: int, sid: str = SID, reason: str | None = None):
    """Wait until a version with *count* messages is in the store; return it."""
    def find():
        return next((v for v in versions(sdir, sid)
                     if v.count == count and (reason is None or v.reason == reason)), None)
    return eventually(find, what=f"a kept {count}-message version of {sid}")


def inplace_write(path: Path, doc: object) -> None:
    with open(path, "wb") as f:  # truncates, then writes: the half-written state is visible
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
        f.write(data[: len(data) // 2])
        f.flush()
        f.write(data[len(data) // 2:])


def outside_tmp_write(path: Path, doc: object, tmpdir: Path) -> None:
    tmp = tmpdir / f"{path.stem}.outside.tmp"
    tmp.write_bytes(orjson.dumps(doc))
    os.replace(tmp, path)


def link_publish(path: Path, doc: object, tmpdir: Path) -> None:
    tmp = tmpdir / f"{path.stem}.link.tmp"
    tmp.write_bytes(orjson.dumps(doc))
    path.unlink(missing_ok=True)
    os.link(tmp, path)
    os.unlink(tmp)


WRITERS = {
    "same-dir tmp + os.replace": lambda p, doc, t: server_write(p, doc),
    "tmp outside the watched dir": outside_tmp_write,
    "in-place rewrite": lambda p, doc, t: inplace_write(p, doc),
    "os.link publish": link_publish,
}


@pytest.mark.parametrize("style", list(WRITERS))
def test_each_writer_style_wiping_1000_messages_keeps_the_1000_version(style, sdir, tmp_path, daemons) -> None:
    write = WRITERS[style]
    write(sdir / f"{SID}.json", make_session(1000), tmp_path)
    d = daemons("--watch", str(sdir))
    write(sdir / f"{SID}.json", make_session(0), tmp_path)
    v = kept(sdir, 1000)
    assert v.source == "daemon" and v.reason in ("shrink", "deleted")
    assert len(orjson.loads(v.path.read_bytes())["messages"]) == 1000
    d.assert_alive()


def test_delete_and_rename_to_a_new_id_keep_the_prior_version(sdir, daemons) -> None:
    server_write(sdir / "gone.json", make_session(30, "gone"))
    server_write(sdir / "old.json", make_session(40, "old"))
    d = daemons("--watch", str(sdir))
    os.unlink(sdir / "gone.json")
    os.rename(sdir / "old.json", sdir / "new.json")
    assert kept(sdir, 30, "gone", "deleted")
    assert kept(sdir, 40, "old", "deleted")
    d.sync()
    # the new id is tracked from now on: wiping it keeps its 40 messages too
    server_write(sdir / "new.json", make_session(0, "new"))
    assert kept(sdir, 40, "new", "shrink")
    ev = d.wait_event("session.shrunk", lambda e: e["sid"] == "gone")
    assert ev["class"] == "deleted" and ev["level"] == "warning"


def test_library_and_daemon_keep_a_name_with_percent_in_one_folder(sdir, daemons) -> None:
    sid = "50%off%2Fsale"
    Guard(sdir).save(sid, make_session(5, sid))
    d = daemons("--watch", str(sdir))
    server_write(sdir / f"{sid}.json", make_session(0, sid))
    assert kept(sdir, 5, sid).source == "daemon"
    assert os.listdir(sdir / ".sessionguard" / "sessions") == [sid], "one folder: one store, one id"
    d.assert_alive()


def test_sync_cookies_of_a_killed_daemon_are_removed_at_start(sdir, daemons) -> None:
    from sessionguard.fsutil import TMP_MARK
    from sessionguard.watch import COOKIE_PREFIX

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = sdir / f"{COOKIE_PREFIX}{TMP_MARK}{dead}-7"  # what a daemon killed during sync leaves
    left.touch()
    d = daemons("--watch", str(sdir))
    assert not left.exists()
    d.sync()  # and its own cookies still work (and are gone after)
    assert not [n for n in os.listdir(sdir) if n.startswith(COOKIE_PREFIX)]


def test_a_killed_writers_tmp_files_in_the_store_are_swept_after_ready(sdir, daemons) -> None:
    """Crash leftovers in the store take space, nothing more: maintenance sweeps them a
    second after READY (a start does not list a million pins first) and says so."""
    from sessionguard.fsutil import TMP_MARK

    first = daemons("--watch", str(sdir))
    server_write(sdir / f"{SID}.json", make_session(5))
    first.sync()
    server_write(sdir / f"{SID}.json", make_session(0))
    assert kept(sdir, 5).source == "daemon"  # a version: the session has a folder
    first.stop()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    store = sdir / ".sessionguard"
    folder = next((store / "sessions").iterdir())
    left = [store / "pins" / f".{SID}{TMP_MARK}{dead}-0badc0de", folder / f".v{TMP_MARK}{dead}-0badc0de"]
    for path in left:
        path.write_bytes(b"torn")
    d = daemons("--watch", str(sdir))
    swept = d.wait_event("store.swept")
    assert swept["removed"] == 2 and not any(p.exists() for p in left)
    d.assert_alive()


def test_growing_writes_keep_no_version(sdir, daemons) -> None:
    d = daemons("--watch", str(sdir))
    for n in (1, 5, 50, 500):
        server_write(sdir / f"{SID}.json", make_session(n))
    d.sync()
    assert versions(sdir) == []
    assert pin_count(sdir, SID) == 500
    d.assert_alive()


def test_shrink_classes_are_logged_with_counts(sdir, daemons) -> None:
    server_write(sdir / f"{SID}.json", make_session(10))
    d = daemons("--watch", str(sdir))
    doc = make_session(10)
    doc["messages"] = doc["messages"][:6]
    server_write(sdir / f"{SID}.json", doc)
    d.sync()
    ev = d.wait_event("session.shrunk", lambda e: e["before"] == 10)
    assert (ev["class"], ev["after"]) == ("truncate", 6)
    other = make_session(2)
    other["messages"][0]["content"] = "edited"
    server_write(sdir / f"{SID}.json", other)
    d.sync()
    ev = d.wait_event("session.shrunk", lambda e: e["before"] == 6)
    assert (ev["class"], ev["after"]) == ("rewrite", 2)
    server_write(sdir / f"{SID}.json", make_session(0))
    ev = d.wait_event("session.shrunk", lambda e: e["before"] == 2)
    assert (ev["class"], ev["after"]) == ("wipe", 0)
    kept_ev = d.wait_event("version.kept", lambda e: e["count"] == 10)
    assert kept_ev["reason"] == "shrink" and kept_ev["sid"] == SID


def test_intent_keys_mark_a_shrink_as_intended(sdir, daemons) -> None:
    server_write(sdir / f"{SID}.json", make_session(10, extra={"clear_generation": "g1"}))
    d = daemons("--watch", str(sdir))
    server_write(sdir / f"{SID}.json", make_session(0, extra={"clear_generation": "g2"}))
    v = kept(sdir, 10)
    assert v.reason == "intended"
    ev = d.wait_event("session.shrunk")
    assert ev["level"] == "info" and ev["reason"] == "intended"


def test_library_intended_shrink_is_one_version_not_two(sdir, daemons) -> None:
    g = Guard(sdir)
    g.save(SID, make_session(10))
    d = daemons("--watch", str(sdir))
    g.save(SID, make_session(4), allow_shrink=True, reason="undo")
    d.sync()
    assert [(v.count, v.reason, v.source) for v in versions(sdir)] == [(10, "intended", "library")]
    d.assert_alive()


def test_foreign_in_place_truncation_is_recoverable_under_the_default_pin(sdir, daemons) -> None:
    server_write(sdir / f"{SID}.json", make_session(1000))
    daemons("--watch", str(sdir))
    server_write(sdir / f"{SID}.json", make_session(1001))  # the usual rename write
    eventually(lambda: pin_count(sdir, SID) == 1001,
               what="pin of the 1001 version")
    with open(sdir / f"{SID}.json", "r+b") as f:  # an editor / second tool truncating in place
        f.truncate(0)
    v = kept(sdir, 1001)
    assert v.reason == "unparseable" and len(orjson.loads(v.path.read_bytes())["messages"]) == 1001


def test_a_shrink_while_the_daemon_was_down_is_kept_at_start(sdir, daemons) -> None:
    server_write(sdir / f"{SID}.json", make_session(1000))
    d = daemons("--watch", str(sdir))
    eventually(lambda: pin_count(sdir, SID) is not None, what="pin")
    d.kill()  # SIGKILL: no clean shutdown
    server_write(sdir / f"{SID}.json", make_session(0))
    d2 = daemons("--watch", str(sdir))
    assert kept(sdir, 1000).reason == "shrink"
    scan = d2.wait_event("scan.completed")
    assert scan["files"] == 1


def test_restart_does_not_reread_unchanged_files(sdir, daemons) -> None:
    for i in range(20):
        server_write(sdir / f"s{i}.json", make_session(5, f"s{i}"))
    d = daemons("--watch", str(sdir))
    assert d.wait_event("scan.completed").get("new") == 20
    d.stop()
    d2 = daemons("--watch", str(sdir))
    scan = d2.wait_event("scan.completed")
    assert scan.get("unchanged") == 20 and "new" not in scan and "grew" not in scan
    # adopted unread, kept as places in the hint: listed, guarded and written back as if read
    rows = {r["sid"]: r for r in d2.call("list")["sessions"]}
    assert {sid: r["count"] for sid, r in rows.items()} == {f"s{i}": 5 for i in range(20)}
    server_write(sdir / "s3.json", make_session(0, "s3"))
    assert kept(sdir, 5, "s3").source == "daemon"
    d2.stop()
    d3 = daemons("--watch", str(sdir))
    scan = d3.wait_event("scan.completed")
    assert scan.get("unchanged") == 20 and "new" not in scan and "grew" not in scan


def test_a_start_after_a_kill_adopts_pins_that_hold_their_file_and_rewrites_no_other(sdir, daemons) -> None:
    """No restart hint after a kill: every file is read against its pin. A pin that holds the
    file's very bytes is kept as it is (same inode, no spare made); a session that changed
    while no daemon ran is pinned anew, and a loss meanwhile kept."""
    for i in range(20):
        server_write(sdir / f"s{i}.json", make_session(5, f"s{i}"))
    d = daemons("--watch", str(sdir))
    assert d.wait_event("scan.completed").get("new") == 20
    d.kill()  # SIGKILL: no pins.cache
    pins = store_of(sdir) / "pins"
    inodes = {p.name: p.stat().st_ino for p in pins.iterdir()}
    server_write(sdir / "s1.json", make_session(7, "s1"))  # grew while down
    server_write(sdir / "s2.json", make_session(1, "s2"))  # shrank while down
    d2 = daemons("--watch", str(sdir))
    scan = d2.wait_event("scan.completed")
    assert scan.get("unchanged") == 18 and scan.get("grew") == 1 and scan.get("shrunk") == 1, scan
    after = {p.name: p.stat().st_ino for p in pins.iterdir() if not p.name.startswith(".")}
    assert {sid for sid in after if after[sid] != inodes.get(sid)} == {"s1", "s2"}
    assert kept(sdir, 5, "s2").reason == "shrink"
    server_write(sdir / "s3.json", make_session(0, "s3"))  # an adopted pin is judged like any
    assert kept(sdir, 5, "s3").source == "daemon"


@pytest.mark.parametrize("pin", ["link"])
def test_pin_link_copies_no_bytes(sdir, daemons, pin) -> None:
    server_write(sdir / f"{SID}.json", make_session(100))
    d = daemons("--watch", str(sdir), "--pin", pin)
    server_write(sdir / f"{SID}.json", make_session(200))
    eventually(lambda: pin_count(sdir, SID) == 200, what="pin")
    live = os.stat(sdir / f"{SID}.json")
    pin = store_of(sdir) / "pins" / SID
    assert os.stat(pin).st_ino == live.st_ino and live.st_nlink == 2
    assert d.wait_event("daemon.started")["watches"][0]["pin_method"] == "link"
    assert d.events("watch.pin_link"), "the link risk is logged at start"


@needs_root
def test_reflink_pins_on_xfs_share_extents(tmp_path, daemons) -> None:
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("xfsprogs not installed (scripts/bootstrap installs it as root)")
    img, mp = tmp_path / "xfs.img", tmp_path / "xfs"
    mp.mkdir()
    subprocess.run(["truncate", "-s", "300M", str(img)], check=True)
    subprocess.run(["mkfs.xfs", "-q", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mp)], check=True)
    try:
        sdir = mp / "sessions"
        sdir.mkdir()
        big = make_session(20000)  # ~9 MB
        server_write(sdir / f"{SID}.json", big)
        os.sync()
        size = os.stat(sdir / f"{SID}.json").st_size

        def used() -> int:
            st = os.statvfs(mp)
            return (st.f_blocks - st.f_bfree) * st.f_frsize

        before = used()
        d = daemons("--watch", str(sdir))
        assert d.wait_event("daemon.started")["watches"][0]["pin_method"] == "reflink"
        eventually(lambda: pin_count(sdir, SID) is not None, what="pin")
        os.sync()
        pin = store_of(sdir) / "pins" / SID
        assert os.stat(pin).st_ino != os.stat(sdir / f"{SID}.json").st_ino, "independent inode"
        grown = used() - before
        assert grown < size // 4, f"pinning a {size}-byte file grew the filesystem by {grown} bytes"
        server_write(sdir / f"{SID}.json", make_session(0))
        v = kept(sdir, 20000)
        assert v.method == "reflink" and v.path.read_bytes() == orjson.dumps(big, option=orjson.OPT_INDENT_2)
    finally:
        subprocess.run(["umount", "-l", str(mp)], check=False)  # lazy: the daemon fixture stops it after


def test_bad_files_are_logged_and_skipped(sdir, tmp_path, daemons) -> None:
    secret = tmp_path / "secret.json"
    secret.write_bytes(orjson.dumps(make_session(3)))
    d = daemons("--watch", str(sdir), "--reconcile-interval", "1")
    (sdir / "corrupt.json").write_bytes(b'{"messages": [1, 2')
    os.mkfifo(sdir / "fifo.json")
    (sdir / "link.json").symlink_to(secret)
    (sdir / "empty.json").write_bytes(b"")
    (sdir / "huge.json").write_bytes(b" " * (2 * 1024 * 1024))
    for i in range(50):  # files that vanish between the event and the read
        p = sdir / f"vanish{i}.json"
        p.write_bytes(b"{}")
        p.unlink()
    d.wait_event("file.skipped", lambda e: e["path"].endswith("fifo.json"))
    d.wait_event("file.skipped", lambda e: e["path"].endswith("link.json"))
    passes = reconciliations(d)
    eventually(lambda: reconciliations(d) > passes, what="a reconciliation pass")
    # still working: a real wipe is caught after all that
    server_write(sdir / f"{SID}.json", make_session(7))
    d.sync()
    server_write(sdir / f"{SID}.json", make_session(0))
    assert kept(sdir, 7)
    d.assert_alive()
    store_files = [p for p in (sdir / ".sessionguard").rglob("*") if p.is_file()]
    assert not any(p.read_bytes() == secret.read_bytes() for p in store_files), "a symlink target leaked into the store"
    pinned = {name for name in os.listdir(sdir / ".sessionguard" / "pins") if not name.startswith(".")}  # no spares
    assert pinned <= {"corrupt", "empty", "huge", SID}, "no pin for symlinks, FIFOs or vanished files"


def test_over_the_size_cap_is_skipped_and_the_last_good_version_kept(sdir, tmp_path, daemons) -> None:
    cfg = tmp_path / "sg.toml"
    cfg.write_text(f'[[watch]]\npath = "{sdir}"\nmax_file_bytes = 100000\n')
    server_write(sdir / f"{SID}.json", make_session(100))  # ~45 KB
    d = daemons("--config", str(cfg))
    server_write(sdir / f"{SID}.json", make_session(1000))  # ~450 KB: over the cap
    d.wait_event("file.skipped", lambda e: "size cap" in e["why"])
    assert kept(sdir, 100).reason == "unparseable"
    d.assert_alive()


@needs_root
def test_unreadable_files_are_skipped_by_an_unprivileged_daemon(tmp_path) -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="sg-nobody-", dir="/tmp"))  # pytest's tmp root is 0700
    try:
        os.chmod(base, 0o755)
        sdir = base / "sessions"
        sdir.mkdir()
        (sdir / "secret.json").write_bytes(b'{"messages": [1]}')
        os.chmod(sdir / "secret.json", 0o600)  # root's, unreadable to nobody
        (sdir / "mine.json").write_bytes(b'{"messages": [1, 2]}')
        os.chown(sdir / "mine.json", 65534, 65534)
        os.chown(sdir, 65534, 65534)
        os.chown(base, 65534, 65534)
        d = DaemonProc(base, ["--watch", str(sdir)], user=(65534, 65534),
                       env={"PYTHONPATH": os.pathsep.join(sys.path), "HOME": str(base)})
        try:
            d.started()
            d.wait_event("file.skipped", lambda e: "permission" in e["why"] and e["path"].endswith("secret.json"))
            # an event for it that changes nothing (opened for writing, closed unwritten) is the
            # same state the start-up scan skipped: not logged again
            os.close(os.open(sdir / "secret.json", os.O_WRONLY))
            d.sync()
            assert len([e for e in d.events("file.skipped") if e["path"].endswith("secret.json")]) == 1
            (sdir / "mine.json").write_bytes(b'{"messages": []}')
            assert kept(sdir, 2, "mine")
            d.assert_alive()
        finally:
            d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_queue_overflow_flood_still_catches_the_shrink(sdir, daemons) -> None:
    """The wipe's own event is lost in the overflow: only the rescan can catch it."""
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    old = knob.read_text()
    knob.write_text("64\n")  # read at inotify_init: the daemon started below gets a tiny queue
    try:
        server_write(sdir / f"{SID}.json", make_session(1000))
        d = daemons("--watch", str(sdir), "--reconcile-interval", "3600")  # no periodic pass to help
    finally:
        knob.write_text(old)
    d.signal(signal.SIGSTOP)  # nobody drains the kernel queue now
    try:
        subprocess.run(f"cd {sdir} && seq 1 500 | sed 's/^/_noise/; s/$/.json/' | xargs touch", shell=True, check=True)
        server_write(sdir / f"{SID}.json", make_session(0))  # its events fall past the full queue
    finally:
        d.signal(signal.SIGCONT)
    d.wait_event("watch.overflow")
    assert kept(sdir, 1000).reason == "shrink"
    assert d.call("status")["overflows"] >= 1
    d.assert_alive()


@needs_root
def test_a_sync_whose_cookie_was_lost_in_an_overflow_is_answered_by_the_rescan(sdir, daemons) -> None:
    """``sync`` waits for its cookie file's event; an overflow can drop that event. The
    rescan the overflow starts looks at every file later than the call, so it answers the
    call: ``synced`` true at once, not false after the whole timeout."""
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    old = knob.read_text()
    knob.write_text("64\n")  # read at inotify_init: the daemon started below gets a tiny queue
    try:
        server_write(sdir / f"{SID}.json", make_session(1000))
        d = daemons("--watch", str(sdir), "--reconcile-interval", "3600")
    finally:
        knob.write_text(old)
    answer: list[object] = []
    with stopped_thread(d.proc.pid, "sg-inotify"):  # the kernel queue fills, nothing reads it
        subprocess.run(f"cd {sdir} && seq 1 200 | sed 's/^/_noise/; s/$/.json/' | xargs touch", shell=True,
                       check=True)
        caller = threading.Thread(target=lambda: answer.append(d.call("sync", {"timeout": 120}, timeout=150)))
        caller.start()
        eventually(lambda: [n for n in os.listdir(sdir) if n.startswith(".sessionguard-sync")],
                   what="the sync's cookie file, made while the queue is full")
    caller.join(150)
    assert answer == [{"synced": True}], d.text()
    d.wait_event("watch.overflow")
    assert len(d.events("scan.completed")) == 2  # the start-up scan and the overflow's rescan
    d.assert_alive()


def test_missing_watch_dir_is_reported_then_watched_when_created(tmp_path, daemons) -> None:
    sdir = tmp_path / "later"
    d = daemons("--watch", str(sdir))
    assert d.wait_event("watch.missing")["watch"] == str(sdir)
    sdir.mkdir()
    server_write(sdir / f"{SID}.json", make_session(12))
    d.wait_event("watch.restored")
    eventually(lambda: pin_count(sdir, SID) is not None, what="pin after the directory appeared")
    server_write(sdir / f"{SID}.json", make_session(0))
    assert kept(sdir, 12)


def test_watch_dir_removed_while_running_is_rewatched(sdir, daemons) -> None:
    d = daemons("--watch", str(sdir))
    shutil.rmtree(sdir)
    d.wait_event("watch.removed")
    sdir.mkdir()
    server_write(sdir / f"{SID}.json", make_session(9))
    d.wait_event("watch.restored")
    eventually(lambda: pin_count(sdir, SID) is not None, what="pin")
    server_write(sdir / f"{SID}.json", make_session(1))
    assert kept(sdir, 9)


def test_sigterm_stops_cleanly_with_exit_0(sdir, daemons) -> None:
    d = daemons("--watch", str(sdir))
    assert d.stop() == 0
    assert d.events("daemon.stopping") and d.events("daemon.stopped")


def test_sighup_reloads_the_config(sdir, tmp_path, daemons) -> None:
    other = tmp_path / "other"
    other.mkdir()
    cfg = tmp_path / "sg.toml"
    cfg.write_text(f'[[watch]]\npath = "{sdir}"\n')
    d = daemons("--config", str(cfg))
    cfg.write_text(f'[[watch]]\npath = "{sdir}"\n\n[[watch]]\npath = "{other}"\n')
    d.signal(signal.SIGHUP)
    d.wait_event("config.reloaded")
    server_write(other / "x.json", make_session(4, "x"))
    eventually(lambda: pin_count(other, "x") is not None, what="pin in the new watch")
    server_write(other / "x.json", make_session(0, "x"))
    assert kept(other, 4, "x")
    cfg.write_text("[[watch]]\npath = 3\n")
    d.signal(signal.SIGHUP)
    assert "watch[0].path" in d.wait_event("config.invalid")["error"]
    d.assert_alive()


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[[watch]]\npath = '/x'\npin = 'hard'\n", "watch[0].pin"),
        ("[[watch]]\npath = '/x'\nkeep_last = true\n", "watch[0].keep_last"),
        ("[daemon]\nreconcile_intervall = 3\n", "daemon.reconcile_intervall"),
        ("[[watch]]\npattern = '*.json'\n", "watch[0].path"),
        ("[[watch]]\npath = '/x'\ncount = ''\n", "watch[0].count"),
        ("not toml at all [", "not valid TOML"),
    ],
)
def test_invalid_config_is_one_clear_error_and_exit_2(tmp_path, toml, needle) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    sock = tmp_path / "sock"
    out = subprocess.run([sys.executable, "-m", "sessionguard.daemon", "--config", str(cfg), "--socket", str(sock)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and needle in lines[0], out.stderr
    assert not sock.exists() and not Path("/x").exists()


def test_no_arguments_runs_on_the_default_directory_as_a_normal_user(tmp_path, daemons) -> None:
    home = tmp_path / "home"
    sessions = home / ".hermes" / "webui" / "sessions"
    sessions.mkdir(parents=True)
    server_write(sessions / f"{SID}.json", make_session(3))
    env = {"HOME": str(home), "HERMES_WEBUI_STATE_DIR": ""}
    d = daemons(env=env)
    assert d.wait_event("daemon.started")["watches"][0]["path"] == str(sessions)
    server_write(sessions / f"{SID}.json", make_session(0))
    assert kept(sessions, 3)


def test_help_and_version() -> None:
    out = subprocess.run([sys.executable, "-m", "sessionguard.daemon", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--watch" in out.stdout and "SIGHUP" in out.stdout
    out = subprocess.run([sys.executable, "-m", "sessionguard.daemon", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("sessionguardd ")


def test_counts_match_the_kept_bytes(sdir, daemons) -> None:
    """The count in a version's name is the count of its bytes."""
    server_write(sdir / f"{SID}.json", make_session(33))
    daemons("--watch", str(sdir))
    server_write(sdir / f"{SID}.json", make_session(2))
    v = kept(sdir, 33)
    assert parse(v.path.read_bytes(), CountSpec.parse("messages")).count == v.count



def test_metrics_textfile_is_written_atomically_after_reconcile(sdir, tmp_path, daemons) -> None:
    prom = tmp_path / "sessionguard.prom"
    cfg = tmp_path / "sg.toml"
    cfg.write_text(f'[daemon]\nmetrics_textfile = "{prom}"\nreconcile_interval = 1\n\n[[watch]]\npath = "{sdir}"\n')
    server_write(sdir / f"{SID}.json", make_session(3))
    daemons("--config", str(cfg))
    text = eventually(lambda: prom.exists() and prom.read_text(), what="metrics textfile")
    assert f'sessionguard_sessions_tracked{{watch="{sdir}"}} 1' in text
    assert "# TYPE sessionguard_shrinks_total counter" in text
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n], "written by tmp + rename"


@needs_root
def test_the_overflow_itself_starts_the_rescan_that_keeps_the_wipe(sdir, daemons) -> None:
    """Issue 11: watchdog's ``on_queue_overflow`` hook, end to end. With no periodic pass to help
    (reconcile every 3600 s), a real overflow of a 64-event kernel queue — the wipe's own events
    fall past it — must be followed by ``watch.overflow``, then a rescan (a second
    ``scan.completed``) that finds the shrink and keeps the 1000-message version; no
    reconciliation ran. Without the hook nothing would look at the file for an hour."""
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    old = knob.read_text()
    knob.write_text("64\n")  # read at inotify_init: only the daemon started below gets the tiny queue
    try:
        server_write(sdir / f"{SID}.json", make_session(1000))
        d = daemons("--watch", str(sdir), "--reconcile-interval", "3600")
    finally:
        knob.write_text(old)
    assert len(d.events("scan.completed")) == 1  # the start-up scan
    d.signal(signal.SIGSTOP)  # nobody drains the kernel queue now
    try:
        for i in range(300):  # 600 events (create, close): the server's own names, never sessions
            (sdir / f"_noise{i}.json").write_bytes(b"{}")
        server_write(sdir / f"{SID}.json", make_session(0))  # its events fall past the full queue
    finally:
        d.signal(signal.SIGCONT)
    d.wait_event("watch.overflow")

    def after_overflow() -> list[str] | None:
        names = [e["event"] for e in d.events()]
        i = names.index("watch.overflow")
        return names[i:] if "scan.completed" in names[i:] else None

    names = eventually(after_overflow, what="a scan after the overflow")
    rescan = d.events("scan.completed")[1]
    assert rescan.get("shrunk") == 1, rescan  # the rescan, not an event, found the wipe
    kept_at = names.index("version.kept")
    assert kept_at < names.index("scan.completed"), names  # kept during that rescan
    assert d.events("version.kept")[0]["count"] == 1000
    assert kept(sdir, 1000).reason == "shrink"
    assert reconciliations(d) == 0, "a reconciliation ran: the overflow's own rescan is not what was shown"
    assert d.call("status")["overflows"] >= 1
    d.assert_alive()

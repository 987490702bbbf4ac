"""Faults against the real daemon: a full or read-only store, a store on another
filesystem, inotify limits, repeated queue overflows, and a watched directory
deleted, recreated or replaced. Real mounts, real sysctls, real inotify.

Every test restores what it changed (mounts, sysctls) in ``finally``. The
inotify limits are lowered inside a user namespace of the daemon's own
(``user.max_inotify_*``): the kernel checks them exactly like
``fs.inotify.max_user_*``, but other root processes (other tests running at
the same time) keep their watches.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from daemonproc import DaemonProc, eventually
from sessionguard import Guard
from sessionguard.store import FORMAT as STORE_FORMAT
from sessionguard.versions import content_hash
from sghelpers import OnDisk, maintenance_passes, make_session, needs_root, pin_count, server_write, store_versions

SID = "abc123def456"


# -- helpers -----------------------------------------------------------------------


def versions(store: Path, sid: str = SID) -> list[OnDisk]:
    return store_versions(store, sid)


def kept(store: Path, count: int, sid: str = SID) -> OnDisk:
    """Wait until *store* holds a version of *sid* with *count* messages; return it."""
    return eventually(lambda: next((v for v in versions(store, sid) if v.count == count), None),
                      what=f"a kept {count}-message version of {sid} in {store}")


def pinned(store: Path, count: int, sid: str = SID) -> Path:
    """Wait until *sid*'s pin in *store* holds *count* messages; return its path."""
    eventually(lambda: pin_count(None, sid, store=store) == count,
               what=f"a pin of {sid} with {count} messages in {store}")
    return Path(store) / "pins" / sid


def dump(doc: object) -> bytes:
    """The bytes server_write writes for *doc*."""
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def tmp_leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp-sg-" in p.name]


def store_on_tmpfs(sdir: Path, tmp_path: Path, tmpfs, daemons, size: str = "2m", extra: str = "",
                   doc: dict | None = None) -> tuple[DaemonProc, Path, Path]:
    """A 1000-message session (or *doc*), and a daemon whose store is on a *size* tmpfs
    (``extra``: more TOML keys for the watch), reconciling every second, with the session
    pinned. Returns (daemon, mountpoint, store)."""
    mp = tmpfs(size)
    store = mp / "store"
    cfg = tmp_path / "sg.toml"
    cfg.write_text(f'[[watch]]\npath = "{sdir}"\nstore = "{store}"\n{extra}')
    server_write(sdir / f"{SID}.json", doc if doc is not None else make_session(1000))
    d = daemons("--config", str(cfg), "--reconcile-interval", "1")
    pinned(store, 1000 if doc is None else len(doc["messages"]))
    return d, mp, store


def fill(mp: Path) -> Path:
    """Fill the filesystem at *mp* to the last byte with one file: ENOSPC from then on."""
    filler = mp / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def status(d: DaemonProc) -> dict:
    return d.call("status")


def remove_tree(path: Path) -> None:
    """rm -rf, again if the daemon kept a version in the store meanwhile (ENOTEMPTY)."""
    def gone() -> bool:
        shutil.rmtree(path, ignore_errors=True)
        return not os.path.lexists(path)
    eventually(gone, what=f"{path} removed")


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, timeout=60)


# -- 1. full disk ------------------------------------------------------------------


@needs_root
def test_full_store_keeps_the_last_good_version_and_recovers_by_itself(sdir, tmp_path, tmpfs, daemons) -> None:
    """The store fills up: degraded (status and log), the 1000-message version is kept
    and never pruned (keep_last 1, a 1-byte cap), and once space returns the periodic
    reconcile re-pins the session with no new write to it."""
    big = make_session(1000)
    d, mp, store = store_on_tmpfs(sdir, tmp_path, tmpfs, daemons, extra="keep_last = 1\nmax_store_bytes = 1\n",
                                  doc=big)
    filler = fill(mp)
    try:
        server_write(sdir / f"{SID}.json", make_session(0))  # the wipe, while the store is full
        v = kept(store, 1000)  # the old pin's inode got the version's name: no space needed
        failed = d.wait_event("pin.failed", lambda e: e.get("errno") == errno.ENOSPC)
        ev = d.wait_event("degraded", lambda e: e["component"].startswith("store:"))
        assert ev["level"] == "error" and ev["component"] == f"store:{store}" and "No space" in ev["why"], ev
        assert failed["sid"] == SID and failed["level"] == "error"
        assert any("No space" in why for why in status(d)["degraded"])
        # neither retention nor the byte cap (1 byte!) touches the newest / high-water version
        assert d.call("prune")["removed"] == []
        assert Path(v.path).read_bytes() == dump(big)
        assert pin_count(None, SID, store=store) == 1000, "the old pin stays while the new one cannot be written"
        d.assert_alive()
    finally:
        filler.unlink()
    # space is back; nothing writes to the session: the periodic reconcile re-pins it
    d.wait_event("degraded.cleared", lambda e: e["component"] == f"store:{store}")
    pinned(store, 0)
    # what stays is the 1-byte cap: only protected versions are left, and that is said
    assert [w for w in status(d)["degraded"] if "max_store_bytes" not in w] == []
    assert tmp_leftovers(store) == [], "no torn tmp file left in the store"
    assert Path(kept(store, 1000).path).read_bytes() == dump(big)
    # and it protects again
    server_write(sdir / f"{SID}.json", make_session(5))
    pinned(store, 5)
    server_write(sdir / f"{SID}.json", make_session(0))
    assert Path(kept(store, 5).path).read_bytes() == dump(make_session(5))
    d.assert_alive()


@needs_root
def test_store_full_at_start_is_reported_once_and_watched_when_space_returns(sdir, tmp_path, tmpfs,
                                                                             daemons) -> None:
    """A store that cannot even be created: one clear error (not one per retry), degraded,
    and the directory watched by itself once there is room."""
    mp = tmpfs("1m")
    store = mp / "store"  # does not exist yet: creating it needs space
    cfg = tmp_path / "sg.toml"
    cfg.write_text(f'[[watch]]\npath = "{sdir}"\nstore = "{store}"\n')
    server_write(sdir / f"{SID}.json", make_session(40))
    filler = fill(mp)
    try:
        d = daemons("--config", str(cfg), "--reconcile-interval", "1")
        ev = d.wait_event("watch.failed")
        assert ev["level"] == "error" and ev["errno"] == errno.ENOSPC and ev["store"] == str(store), ev
        assert "exception" not in ev, "an OSError is one line, not a traceback"
        assert any("No space" in why for why in status(d)["degraded"])
        passes = maintenance_passes(d)  # several retries (one a pass): none may log again
        eventually(lambda: maintenance_passes(d) >= passes + 3, what="three more maintenance passes")
        assert len(d.events("watch.failed")) == 1, d.text()
        d.assert_alive()
    finally:
        filler.unlink()
    d.wait_event("watch.restored")
    d.wait_event("degraded.cleared")
    pinned(store, 40)
    server_write(sdir / f"{SID}.json", make_session(0))
    kept(store, 40)
    assert status(d)["degraded"] == []


def test_a_store_from_a_newer_release_is_one_clear_error_not_a_traceback(sdir, daemons) -> None:
    """After a downgrade the store says a newer release wrote it: the admin gets one
    line that says so (no traceback, no advice about free space), the store is left as
    it is, and the directory is watched as soon as the store is one this release reads."""
    store = sdir / ".sessionguard"
    store.mkdir(mode=0o700)
    (store / "FORMAT").write_text("99\n")
    server_write(sdir / f"{SID}.json", make_session(40))
    d = daemons("--watch", str(sdir), "--reconcile-interval", "1")
    ev = d.wait_event("watch.failed")
    assert ev["level"] == "error" and "newer sessionguard (format 99)" in ev["error"], ev
    assert "exception" not in ev and "free space" not in ev["hint"], ev
    assert any("newer sessionguard" in why for why in status(d)["degraded"])
    assert sorted(p.name for p in store.iterdir()) == ["FORMAT"] and (store / "FORMAT").read_text() == "99\n"
    (store / "FORMAT").write_text(f"{STORE_FORMAT}\n")
    d.wait_event("watch.restored")
    pinned(store, 40)
    server_write(sdir / f"{SID}.json", make_session(0))
    kept(store, 40)


def test_a_defect_is_logged_with_its_traceback_and_a_hint_to_report_it(sdir, daemons) -> None:
    """A scan that fails the way a bug would (injected: tests/defect_scan.py) is not blamed
    on the disk: the traceback is in the log, the hint says to report it, and the retry
    a second later watches the directory."""
    server_write(sdir / f"{SID}.json", make_session(40))
    d = daemons("--watch", str(sdir), "--reconcile-interval", "1",
                wrap=[sys.executable, str(Path(__file__).with_name("defect_scan.py"))])
    ev = d.wait_event("watch.failed")
    (raised,) = ev["exception"]  # structured, as every traceback in the JSON log
    assert raised["exc_type"] == "RuntimeError" and "injected defect" in raised["exc_value"], ev
    assert "report it" in ev["hint"] and "free space" not in ev["hint"], ev
    d.wait_event("watch.restored")
    store = sdir / ".sessionguard"
    pinned(store, 40)
    server_write(sdir / f"{SID}.json", make_session(0))
    kept(store, 40)


@needs_root
def test_full_store_logs_the_shrink_once_however_often_it_retries(sdir, tmp_path, tmpfs, daemons) -> None:
    d, mp, store = store_on_tmpfs(sdir, tmp_path, tmpfs, daemons)
    filler = fill(mp)
    try:
        server_write(sdir / f"{SID}.json", make_session(0))
        kept(store, 1000)
        eventually(lambda: len(d.events("pin.failed")) >= 3, what="three retries of the pin")
    finally:
        filler.unlink()
    pinned(store, 0)
    assert len(d.events("session.shrunk")) == 1 and status(d)["shrinks"] == {"wipe": 1}, d.text()


@needs_root
def test_full_store_degraded_clears_when_the_failing_session_is_deleted(sdir, tmp_path, tmpfs, daemons) -> None:
    d, mp, store = store_on_tmpfs(sdir, tmp_path, tmpfs, daemons)
    filler = fill(mp)
    try:
        server_write(sdir / f"{SID}.json", make_session(0))
        d.wait_event("degraded")
        os.unlink(sdir / f"{SID}.json")  # the server deletes the session meanwhile
        eventually(lambda: pin_count(None, SID, store=store) is None, what="the pin of the deleted session dropped")
    finally:
        filler.unlink()
    assert kept(store, 1000).reason in ("shrink", "deleted")
    eventually(lambda: status(d)["degraded"] == [], timeout=5, what="degraded cleared: nothing is pending")


# -- 2. read-only store ------------------------------------------------------------


@needs_root
def test_read_only_store_degrades_and_keeps_the_version_once_writable(sdir, tmp_path, tmpfs, daemons) -> None:
    """chmod does not stop root: the store's filesystem is remounted read-only."""
    big = make_session(1000)
    d, mp, store = store_on_tmpfs(sdir, tmp_path, tmpfs, daemons, size="4m", doc=big)
    mount("-o", "remount,ro", str(mp))
    try:
        server_write(sdir / f"{SID}.json", make_session(0))
        failed = d.wait_event("pin.failed", lambda e: e.get("errno") == errno.EROFS)
        ev = d.wait_event("degraded", lambda e: e["component"].startswith("store:"))
        assert ev["level"] == "error" and "Read-only file system" in ev["why"], ev
        assert failed["sid"] == SID
        st = status(d)  # status must not try to write into the store
        assert any("Read-only" in why for why in st["degraded"]), st
        assert pin_count(None, SID, store=store) == 1000, "the last good version is still pinned"
        d.assert_alive()
    finally:
        mount("-o", "remount,rw", str(mp))
    # writable again: the next reconcile compares the wiped file with the pin it kept
    v = kept(store, 1000)
    assert v.reason == "shrink" and Path(v.path).read_bytes() == dump(big)
    d.wait_event("degraded.cleared")
    pinned(store, 0)
    assert status(d)["degraded"] == [] and tmp_leftovers(store) == []
    server_write(sdir / f"{SID}.json", make_session(8))
    pinned(store, 8)
    server_write(sdir / f"{SID}.json", make_session(0))
    kept(store, 8)


# -- 3. store on another filesystem ------------------------------------------------


@needs_root
@pytest.mark.parametrize("pin", ["link", "auto"])
def test_store_on_another_filesystem_copies_and_says_so(sdir, tmp_path, tmpfs, daemons, pin) -> None:
    mp = tmpfs("8m")
    store = mp / "store"
    cfg = tmp_path / "sg.toml"
    cfg.write_text(f'[[watch]]\npath = "{sdir}"\nstore = "{store}"\npin = "{pin}"\n')
    big = make_session(1000)
    server_write(sdir / f"{SID}.json", big)
    d = daemons("--config", str(cfg))
    assert os.stat(sdir).st_dev != os.stat(mp).st_dev
    ev = d.wait_event("watch.no_hardlinks")
    assert ev["pin"] == pin and ev["pin_method"] == "copy" and ev["store"] == str(store), ev
    assert ev["level"] == ("warning" if pin == "link" else "info")
    assert not d.events("watch.pin_link"), "no hard-link risk to warn about: there are no hard links"
    assert d.wait_event("daemon.started")["watches"][0]["pin_method"] == "copy"
    p = pinned(store, 1000)
    assert os.stat(p).st_ino != os.stat(sdir / f"{SID}.json").st_ino and os.stat(p).st_nlink == 1, "a copy"
    server_write(sdir / f"{SID}.json", make_session(0))
    v = kept(store, 1000)
    assert v.method == "copy" and "_daemon_copy_" in v.name and Path(v.path).read_bytes() == dump(big)
    d.assert_alive()


@needs_root
def test_library_with_a_store_on_another_filesystem_copies(sdir, tmpfs, daemons) -> None:
    """Guard(sdir, store=<other fs>): versions and pins cannot be hard links, so they are
    copies, named so; and a daemon sharing that store still catches a foreign wipe."""
    store = tmpfs("8m") / "store"
    g = Guard(sdir, store=store)
    g.save(SID, make_session(300))
    g.save(SID, make_session(100))  # a shrink through the library
    v = next(v for v in versions(store) if v.count == 300)
    assert v.method == "copy" and v.source == "library" and v.path.read_bytes() == dump(make_session(300))
    assert pin_count(None, SID, store=store) == 100
    assert os.stat(store / "pins" / SID).st_ino != os.stat(sdir / f"{SID}.json").st_ino
    cfg = sdir.parent / "shared.toml"
    cfg.write_text(f'[[watch]]\npath = "{sdir}"\nstore = "{store}"\n')
    daemons("--config", str(cfg))
    server_write(sdir / f"{SID}.json", make_session(0))  # a foreign writer wipes it
    w = kept(store, 100)
    assert w.source == "daemon" and w.method == "copy" and Path(w.path).read_bytes() == dump(make_session(100))


# -- 4. inotify limits -------------------------------------------------------------

KNOBS = {"watches": ("user.max_inotify_watches", "fs.inotify.max_user_watches", errno.ENOSPC),
         "instances": ("user.max_inotify_instances", "fs.inotify.max_user_instances", errno.EMFILE)}


def in_user_namespace(knob: str) -> list[str]:
    """A command prefix: run as root of a user namespace of its own, with the
    inotify limit *knob* (``user.max_inotify_…``) set to 0 there; exec keeps the pid."""
    return ["unshare", "--user", "--map-root-user", "sh", "-c",
            f'echo 0 > /proc/sys/{knob.replace(".", "/")} && exec "$@"', "sh"]


def raise_limit(d: DaemonProc, knob: str, value: int = 1000) -> None:
    subprocess.run(["nsenter", "-t", str(d.proc.pid), "--user", "sh", "-c",
                    f"echo {value} > /proc/sys/{knob.replace('.', '/')}"], check=True, timeout=60)


@needs_root
@pytest.mark.parametrize("limit", list(KNOBS))
def test_inotify_limit_exhausted_polls_then_watches_when_raised(sdir, daemons, limit, sessionguard_group) -> None:
    """inotify refuses the watch (watch limit: ENOSPC at add_watch; instance limit: EMFILE at
    inotify_init). Degraded mode, not an exit: every settled version is still kept by the
    periodic reconcile, and the watch comes back by itself once the limit is raised.
    With a ``sessionguard`` group on the machine, whose gid the user namespace does not map:
    the control socket comes up all the same (the group's rule disabled)."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs unshare and nsenter (util-linux)")
    ns_knob, sysctl, err = KNOBS[limit]
    server_write(sdir / f"{SID}.json", make_session(1000))
    d = daemons("--watch", str(sdir), "--reconcile-interval", "1", wrap=in_user_namespace(ns_knob))
    ev = d.wait_event("watch.failed")
    assert ev["level"] == "error" and ev["errno"] == err and sysctl in ev["hint"], ev
    assert "polling" in ev["action"]
    st = status(d)
    assert st["watches"][0]["available"] and not st["watches"][0]["inotify"]
    assert any("inotify refused" in why for why in st["degraded"]), st
    assert d.call("sync", {"timeout": 1})["synced"] is False, "nothing orders a polled directory's changes"
    # polled: the start-up scan pinned the old session, the reconcile pins a new one ...
    pinned(sdir / ".sessionguard", 1000)
    server_write(sdir / "new.json", make_session(30, "new"))
    pinned(sdir / ".sessionguard", 30, "new")
    # ... and wipes made once they settled are kept
    server_write(sdir / f"{SID}.json", make_session(0))
    server_write(sdir / "new.json", make_session(0, "new"))
    assert kept(sdir / ".sessionguard", 1000).reason == "shrink"
    assert kept(sdir / ".sessionguard", 30, "new").reason == "shrink"
    assert status(d)["events"] == 0, "no inotify event can have arrived: the watch really failed"
    d.assert_alive()
    raise_limit(d, ns_knob)
    restored = d.wait_event("watch.restored")
    assert restored["inotify"] is True
    d.wait_event("degraded.cleared", lambda e: e["component"] == f"inotify:{sdir}")
    assert status(d)["degraded"] == [] and status(d)["watches"][0]["inotify"]
    assert len(d.events("watch.failed")) == 1, "one error line, not one per retry"
    d.sync()  # inotify again
    server_write(sdir / "late.json", make_session(7, "late"))
    d.sync()
    server_write(sdir / "late.json", make_session(0, "late"))
    kept(sdir / ".sessionguard", 7, "late")
    assert status(d)["events"] > 0


# -- 5. repeated queue overflows ---------------------------------------------------


class Grower(threading.Thread):
    """A writer that keeps appending turns to its session (server style) until stopped."""

    def __init__(self, path: Path, sid: str) -> None:
        super().__init__(daemon=True)
        self.path, self.sid, self.count = path, sid, 0
        self.stop = threading.Event()
        self.writes = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.count += 1
            server_write(self.path, make_session(self.count, self.sid))
            self.writes += 1
            time.sleep(0.01)


def all_threads_stopped(pid: int) -> bool:
    """Every thread of *pid* is stopped (``T``): a SIGSTOP takes effect per thread, and
    one still running could drain the flood meant to overflow its queue."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat_line = (task / "stat").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        states.append(stat_line.rpartition(")")[2].split()[0])
    return bool(states) and all(st == "T" for st in states)


@needs_root
def test_repeated_overflows_while_writers_keep_writing_lose_nothing(sdir, daemons) -> None:
    """Several rounds of: daemon stopped (SIGSTOP), a flood overflows its 64-event queue while
    sessions are shrunk, wiped and deleted, daemon continued. Each round's rescan must keep
    every pre-shrink version (checked by content hash), and the writers that never stopped
    end with their last version pinned."""
    rounds, shrinkers = 4, 6
    store = sdir / ".sessionguard"
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    old = knob.read_text()
    knob.write_text("64\n")  # read at inotify_init: only the daemon started now gets the tiny queue
    try:
        d = daemons("--watch", str(sdir), "--reconcile-interval", "3600")  # only the rescans may help
    finally:
        knob.write_text(old)
    growers = [Grower(sdir / f"grow{i}.json", f"grow{i}") for i in range(2)]
    for g in growers:
        g.start()
    expected: list[tuple[str, str, int]] = []  # (sid, content hash, count) that must be kept
    try:
        for r in range(rounds):
            docs = {}
            for i in range(shrinkers):
                sid = f"s{i}"
                docs[sid] = make_session(100 + 10 * r + i, sid)
                server_write(sdir / f"{sid}.json", docs[sid])
            for sid, doc in docs.items():
                pinned(store, len(doc["messages"]), sid)
            overflows = len(d.events("watch.overflow"))
            d.signal(signal.SIGSTOP)
            eventually(lambda: all_threads_stopped(d.proc.pid), what="the daemon's threads to stop")
            try:
                for n in range(300):
                    (sdir / f"_noise{r}-{n}.json").touch()
                for i, (sid, doc) in enumerate(docs.items()):
                    if i % 3 == 0:
                        os.unlink(sdir / f"{sid}.json")
                    else:
                        server_write(sdir / f"{sid}.json", make_session(len(doc["messages"]) // (i % 3 + 1) - i, sid))
                    expected.append((sid, content_hash(dump(doc)), len(doc["messages"])))
            finally:
                d.signal(signal.SIGCONT)
            eventually(lambda n=overflows: len(d.events("watch.overflow")) > n, what=f"overflow of round {r}")
            for sid, digest, count in expected:
                eventually(lambda s=sid, h=digest: any(v.id == h for v in versions(store, s)),
                           what=f"round {r}: the {count}-message version of {sid}")
            for n in range(300):
                os.unlink(sdir / f"_noise{r}-{n}.json")
    finally:
        for g in growers:
            g.stop.set()
            g.join()
    for g in growers:
        pinned(store, g.count, g.sid)  # the writers' last versions are held
    lost = [(sid, count) for sid, digest, count in expected if not any(v.id == digest for v in versions(store, sid))]
    assert lost == [] and len(expected) == rounds * shrinkers
    assert status(d)["overflows"] >= rounds
    print(f"\noverflow rounds: {rounds}, overflows seen: {status(d)['overflows']}, shrinks+deletes: {len(expected)}, "
          f"versions lost: {len(lost)}, grower writes: {sum(g.writes for g in growers)}")
    d.assert_alive()


# -- 6. the watched directory deleted, recreated, replaced ---------------------------


def test_dir_removed_with_its_store_and_recreated_with_sessions(sdir, daemons) -> None:
    server_write(sdir / f"{SID}.json", make_session(20))
    server_write(sdir / "gone.json", make_session(4, "gone"))
    d = daemons("--watch", str(sdir))
    pinned(sdir / ".sessionguard", 20)
    remove_tree(sdir)  # the sessions and the default store inside the directory
    ev = d.wait_event("watch.removed")
    assert ev["level"] == "error" and ev["why"] == "no such directory"
    assert any(str(sdir) in why for why in status(d)["degraded"])
    sdir.mkdir()
    server_write(sdir / f"{SID}.json", make_session(3))
    server_write(sdir / "other.json", make_session(15, "other"))
    d.wait_event("watch.restored")
    d.wait_event("degraded.cleared", lambda e: e["component"] == f"watch:{sdir}")
    st = status(d)
    assert st["degraded"] == [] and st["sessions"] == 2, "only the recreated directory's sessions are tracked"
    assert (sdir / ".sessionguard" / "README.txt").exists(), "a new store in the recreated directory"
    pinned(sdir / ".sessionguard", 15, "other")
    pinned(sdir / ".sessionguard", 3)
    server_write(sdir / "other.json", make_session(0, "other"))
    kept(sdir / ".sessionguard", 15, "other")
    d.assert_alive()


def test_dir_replaced_faster_than_the_root_check_is_watched_anew(sdir, tmp_path, daemons) -> None:
    """mv sessions sessions.old && mkdir sessions (a restore from backup) within a second:
    the path is the same, the directory is not. The new one is watched with a new store."""
    server_write(sdir / f"{SID}.json", make_session(20))
    server_write(sdir / "old.json", make_session(2, "old"))
    d = daemons("--watch", str(sdir), "--reconcile-interval", "3600")
    pinned(sdir / ".sessionguard", 20)
    os.rename(sdir, tmp_path / "sessions.old")
    sdir.mkdir()
    server_write(sdir / f"{SID}.json", make_session(11))
    assert d.wait_event("watch.removed")["why"] == "replaced by another directory"
    d.wait_event("watch.restored")
    pinned(sdir / ".sessionguard", 11)
    assert status(d)["sessions"] == 1, "the old directory's sessions are not tracked any more"
    d.sync()
    server_write(sdir / f"{SID}.json", make_session(0))
    kept(sdir / ".sessionguard", 11)
    assert pin_count(None, SID, store=tmp_path / "sessions.old" / ".sessionguard") == 20, "the old store is untouched"
    assert status(d)["degraded"] == []


@pytest.mark.parametrize("replacement", ["symlink", "file"])
def test_dir_replaced_by_a_symlink_or_a_file_is_not_followed(sdir, tmp_path, daemons, replacement) -> None:
    """A symlink in place of the watched directory is never followed (its target is not read,
    no store is made there): a clear error, degraded, and watched again once a real
    directory is back."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server_write(elsewhere / "theirs.json", make_session(10, "theirs"))
    server_write(sdir / f"{SID}.json", make_session(20))
    d = daemons("--watch", str(sdir), "--reconcile-interval", "1")
    pinned(sdir / ".sessionguard", 20)
    os.rename(sdir, tmp_path / "sessions.old")
    if replacement == "symlink":
        sdir.symlink_to(elsewhere)
    else:
        sdir.write_bytes(b"{}")
    ev = d.wait_event("watch.removed")
    assert ev["level"] == "error"
    assert ("symbolic link" in ev["why"] and str(elsewhere) in ev["why"]) if replacement == "symlink" \
        else ev["why"] == "not a directory", ev
    st = status(d)
    assert not st["watches"][0]["available"] and any(str(sdir) in why for why in st["degraded"])
    server_write(elsewhere / "theirs.json", make_session(0, "theirs"))
    passes = maintenance_passes(d)  # root checks and retries: none may look through the link
    eventually(lambda: maintenance_passes(d) >= passes + 3, what="three more maintenance passes")
    assert not (elsewhere / ".sessionguard").exists(), "nothing written where the link points"
    assert not [e for e in d.events("session.shrunk") if e["sid"] == "theirs"]
    d.assert_alive()
    sdir.unlink()
    sdir.mkdir()
    server_write(sdir / f"{SID}.json", make_session(6))
    d.wait_event("watch.restored")
    pinned(sdir / ".sessionguard", 6)
    server_write(sdir / f"{SID}.json", make_session(0))
    kept(sdir / ".sessionguard", 6)
    assert status(d)["degraded"] == []


def test_a_symlinked_watch_path_is_refused_at_start(tmp_path, daemons) -> None:
    real = tmp_path / "real"
    real.mkdir()
    server_write(real / f"{SID}.json", make_session(5))
    link = tmp_path / "link"
    link.symlink_to(real)
    d = daemons("--watch", str(link))
    ev = d.wait_event("watch.missing")
    assert "symbolic link" in ev["why"] and str(real) in ev["why"], ev
    assert not (real / ".sessionguard").exists()
    assert d.wait_event("daemon.started")["watches"][0]["available"] is False

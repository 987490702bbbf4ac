"""The backup store on real files: layout, dedupe, retention, byte cap, crash leftovers."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest

from sessionguard import fsutil
from sessionguard.count import CountSpec, parse
from sessionguard.store import Retention, Store, VersionNotFound

SPEC = CountSpec.parse("messages")


def keep_bytes(store: Store, sid: str, data: bytes, reason: str = "shrink", source: str = "daemon"):
    """Keep *data* as a version of *sid* through the public API (pin it, then keep the pin)."""
    src = Path(store.root).parent / f"{sid}.src"
    src.write_bytes(data)
    fd, st = fsutil.open_regular(src)
    try:
        with store.lock(sid):
            store.set_pin(sid, store.pin(sid, tidy=True), fd, str(src), st, parse(data, SPEC).count, policy="copy")
            return store.keep_pin(sid, reason, source)
    finally:
        os.close(fd)


def doc(n: int) -> bytes:
    return orjson.dumps({"title": "t", "messages": [{"i": i} for i in range(n)]})


def test_same_bytes_kept_twice_are_one_version(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    a = keep_bytes(s, "x", doc(5), source="library")
    b = keep_bytes(s, "x", doc(5), source="daemon")
    assert a == b and len(s.versions("x")) == 1
    assert keep_bytes(s, "x", doc(6)).id != a.id and len(s.versions("x")) == 2


def test_layout_is_readable_with_ls_and_cp(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    for n in (3, 9, 5):
        keep_bytes(s, "abc", doc(n))
    folder = tmp_path / "store" / "sessions" / "abc"
    names = sorted(n for n in os.listdir(folder) if n.endswith(".version"))
    newest = subprocess.run(f"ls {folder} | grep version$ | tail -n 1", shell=True, capture_output=True, text=True).stdout.strip()
    largest = subprocess.run(f"ls {folder} | grep version$ | sort -t_ -k2 -n | tail -n 1", shell=True,
                             capture_output=True, text=True).stdout.strip()
    assert newest == names[-1] and "_5msgs_" in newest
    assert "_9msgs_" in largest
    assert (folder / largest).read_bytes() == doc(9), "a version is the session file, byte for byte"
    assert (tmp_path / "store" / "README.txt").read_text().startswith("sessionguard backup store")
    assert not any(n.endswith(".json") or n.endswith(".json.bak") for n in os.listdir(folder))


def test_find_by_prefix_and_best(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    v3 = keep_bytes(s, "a", doc(3))
    keep_bytes(s, "a", doc(7))
    keep_bytes(s, "a", doc(2))
    assert s.find("a").count == 7
    assert s.find("a", v3.id[:6]) == v3
    assert s.find("a", v3.name) == v3
    with pytest.raises(VersionNotFound):
        s.find("a", "ffffffffffff")
    with pytest.raises(ValueError):
        s.find("../a")


def test_retention_keeps_newest_n_and_never_the_newest_or_high_water(tmp_path: Path) -> None:
    s = Store(tmp_path / "store", retention=Retention(keep_last=3, max_age_days=365))
    kept = [keep_bytes(s, "a", doc(n)) for n in [50] + list(range(1, 20))]
    newest_created = kept[-1].created
    # Two days later every version is in one daily bucket: keep_last + high-water remain.
    with s.lock("a"):
        removed = s.apply_retention("a", now=newest_created + 2 * 86400)
    left = s.versions("a")
    assert {v.count for v in left} == {50, 17, 18, 19}
    assert len(removed) == 16
    # Past max age only the protected ones (and keep_last) survive.
    with s.lock("a"):
        s.apply_retention("a", now=newest_created + 400 * 86400)
    assert {v.count for v in s.versions("a")} == {50, 17, 18, 19}


def test_staggered_thinning_keeps_one_per_bucket(tmp_path: Path) -> None:
    s = Store(tmp_path / "store", retention=Retention(keep_last=1, max_age_days=365))
    for n in range(1, 6):
        keep_bytes(s, "a", doc(n))
    # One minute later all are younger than an hour, in one or two 30 s buckets.
    with s.lock("a"):
        s.apply_retention("a", now=s.versions("a")[-1].created + 60)
    left = s.versions("a")
    assert 1 <= len(left) <= 3 and left[-1].count == 5


def test_byte_cap_prunes_oldest_unprotected_only(tmp_path: Path) -> None:
    s = Store(tmp_path / "store", retention=Retention(keep_last=100, max_store_bytes=1))
    for sid in ("a", "b"):
        for n in (40, 10, 20, 30):
            keep_bytes(s, sid, doc(n))
    report = s.prune()
    for sid in ("a", "b"):
        assert sorted(v.count for v in s.versions(sid)) == [30, 40], "newest and high-water stay"
    assert len(report.removed) == 4 and report.bytes_freed > 0


def test_sweep_removes_tmp_files_of_dead_writers_only(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    keep_bytes(s, "a", doc(1))
    folder = Path(s.session_dir("a"))
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    orphan = folder / f".x{fsutil.TMP_MARK}{dead.pid}-abcd"
    mine = folder / f".y{fsutil.TMP_MARK}{os.getpid()}-abcd"
    orphan.write_bytes(b"torn")
    mine.write_bytes(b"in progress")
    assert s.sweep_tmp() == 1
    assert not orphan.exists() and mine.exists()


def test_store_refuses_a_symlinked_root(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "store").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match="symlink"):
        Store(tmp_path / "store")
    assert os.listdir(tmp_path / "elsewhere") == []


def test_crashed_pin_update_leaves_exactly_one_pin(tmp_path: Path) -> None:
    s = Store(tmp_path / "store")
    keep_bytes(s, "a", doc(1))
    old = s.pin("a")
    assert old is not None
    # Simulate a crash between creating a new pin and removing the old one.
    newer = old.path.replace(f"pin.{old.seq}.", f"pin.{old.seq + 1}.")
    os.link(old.path, newer)
    with s.lock("a"):
        assert s.pin("a", tidy=True).seq == old.seq + 1
    assert len([n for n in os.listdir(s.session_dir("a")) if n.startswith("pin.")]) == 1


def test_session_locks_exclude_threads_and_are_forgotten_when_free(tmp_path: Path) -> None:
    """Many threads on one session never overlap, nested use works, and a lock
    nobody holds or waits for is dropped (a daemon locks every session it sees)."""
    s = Store(tmp_path / "store")
    inside = 0
    overlaps = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, overlaps
        for _ in range(200):
            with s.lock("a"), s.lock("a"):  # nested, as restore does
                with guard:
                    inside += 1
                    overlaps += inside > 1
                time.sleep(0)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == 0
    for i in range(100):
        with s.lock(f"s{i}"):
            pass
    assert s._locks == {}, "free locks are forgotten"

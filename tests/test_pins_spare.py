"""Spare pin inodes: the daemon writes a pin over the pin before last and swaps it in,
never over an inode anything else holds, within bounds, and leaves none behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemonproc import DaemonProc, eventually
from sessionguard import fsutil
from sessionguard.store import Store
from sghelpers import make_session, server_write, store_of
from test_store import SID, data


def pins_dir(store: Store) -> Path:
    return Path(store.where) / "pins"


def spare_names(store: Store) -> list[str]:
    return sorted(p.name for p in pins_dir(store).iterdir() if p.name.endswith("-spare"))


def ino(path: Path) -> int:
    return os.lstat(path).st_ino


def test_the_pin_is_written_over_the_spare_and_the_old_pin_becomes_it(store: Store) -> None:
    pins, pin = store.pins, pins_dir(store) / SID
    pins.write(SID, data(3))
    first = ino(pin)
    pins.write(SID, data(5), spare=True)  # no spare yet: one is made, the old pin becomes the spare
    second = ino(pin)
    (spare,) = spare_names(store)
    assert second != first and ino(pins_dir(store) / spare) == first
    assert (pins_dir(store) / spare).read_bytes() == data(3)
    pins.write(SID, data(8), spare=True)  # written over the first inode, swapped in
    assert ino(pin) == first and pin.read_bytes() == data(8)
    assert ino(pins_dir(store) / spare) == second and spare_names(store) == [spare]
    pins.write(SID, data(1), spare=True)  # shorter than what the spare held: cut to length
    assert ino(pin) == second and pin.read_bytes() == data(1)
    assert sorted(os.listdir(pins_dir(store))) == sorted([SID, spare])


def test_an_inode_anything_else_holds_is_never_written_over(store: Store, sdir: Path) -> None:
    """A pin linked as a version (as capture does) and a spare linked elsewhere keep their bytes."""
    pins, pin = store.pins, pins_dir(store) / SID
    pins.write(SID, data(3))
    pins.write(SID, data(5), spare=True)
    version = sdir / "version-like"
    os.link(pin, version)  # the pin holding 5 is also a version now
    pins.write(SID, data(8), spare=True)
    assert version.read_bytes() == data(5) and pin.read_bytes() == data(8)
    assert spare_names(store) == []  # the old pin was not kept as a spare: it is the version's
    pins.write(SID, data(9), spare=True)
    (spare,) = spare_names(store)
    held = sdir / "held-spare"
    os.link(pins_dir(store) / spare, held)  # the spare (holding 8) is held elsewhere too
    pins.write(SID, data(12), spare=True)
    assert held.read_bytes() == data(8) and pin.read_bytes() == data(12)
    assert version.read_bytes() == data(5)


def test_a_spare_torn_by_a_kill_is_written_over(store: Store) -> None:
    """A kill while the spare is written leaves the pin whole; the next write cuts the spare to size."""
    pins, pin = store.pins, pins_dir(store) / SID
    pins.write(SID, data(3))
    pins.write(SID, data(5), spare=True)
    (spare,) = spare_names(store)
    (pins_dir(store) / spare).write_bytes(data(400)[: 10_000])  # as a kill mid-write would leave it
    assert pin.read_bytes() == data(5)
    pins.write(SID, data(6), spare=True)
    assert pin.read_bytes() == data(6)


def test_spares_are_bounded_and_go_with_their_pin(store: Store) -> None:
    pins = store.pins
    pins.spares.limit = 2
    sids = [f"{SID}{k}" for k in range(3)]
    for sid in sids:
        pins.write(sid, data(3))
        pins.write(sid, data(5), spare=True)
    assert len(spare_names(store)) == 2 and not any(n.startswith(f".{sids[0]}.") for n in spare_names(store))
    pins.drop(sids[1])
    assert [n for n in spare_names(store) if n.startswith(f".{sids[1]}.")] == []
    assert not (pins_dir(store) / sids[1]).exists()
    pins.drop_spares()
    assert spare_names(store) == [] and (pins_dir(store) / sids[2]).read_bytes() == data(5)
    pins.spares.limit, pins.spares.max_bytes = 10, len(data(5)) + 1
    for sid in (sids[0], sids[2]):
        pins.write(sid, data(5), spare=True)
    assert len(spare_names(store)) == 1  # two would hold more bytes than allowed


def test_the_sweep_keeps_live_spares_and_removes_dead_ones(store: Store) -> None:
    """A spare's mtime is its session's birth (weeks, maybe): while its daemon lives it stays,
    however old; a dead daemon's goes."""
    pins = store.pins
    pins.write(SID, data(3))
    os.utime(pins_dir(store) / SID, (0, 0))  # born long ago: the spare carries that birth
    pins.write(SID, data(5), spare=True)
    (ours,) = spare_names(store)
    assert os.lstat(pins_dir(store) / ours).st_mtime < time.time() - 3600  # the session's birth, set above
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    mark = fsutil.TMP_MARK
    planted = {"dead": f".s1{mark}{dead}-spare", "live": f".s3{mark}1-spare"}  # pid 1 always runs
    for name in planted.values():
        (pins_dir(store) / name).write_bytes(b"old pin")
        os.utime(pins_dir(store) / name, (0, 0))
    assert store.sweep_tmp() == 1
    assert spare_names(store) == sorted([ours, planted["live"]])


def test_a_library_write_leaves_the_daemons_spare_alone(store: Store, sdir: Path) -> None:
    """Only the daemon asks for spares: another process's store writes a new pin and sweeps
    nothing of a live daemon's."""
    store.pins.write(SID, data(3))
    store.pins.write(SID, data(5), spare=True)
    (spare,) = spare_names(store)
    code = ("import os, sys; sys.path[:0] = sys.argv[1:3]; from test_store import SID, data, open_store; "
            "from pathlib import Path; s, _ = open_store(Path(sys.argv[3])); s.pins.write(SID, data(7)); "
            "print(s.sweep_tmp())")
    here = Path(__file__).parent
    out = subprocess.run([sys.executable, "-c", code, str(here), str(here.parent / "daemon"), str(sdir)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"
    assert (pins_dir(store) / spare).read_bytes() == data(3) and (pins_dir(store) / SID).read_bytes() == data(7)
    store.pins.write(SID, data(8), spare=True)  # the library's pin was a new inode: ours to reuse after
    assert (pins_dir(store) / SID).read_bytes() == data(8)


def test_the_daemon_keeps_spares_while_it_runs_and_none_after_a_clean_stop(sdir: Path, tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, ["--watch", str(sdir)]).started()
    try:
        for n in (3, 4, 5):
            server_write(sdir / f"{SID}.json", make_session(n))
            d.sync()
        pins = store_of(sdir) / "pins"
        spares = eventually(lambda: [p for p in pins.iterdir() if p.name.endswith("-spare")] or None,
                            what="a spare pin")
        assert len(spares) == 1 and spares[0].name.startswith(f".{SID}{fsutil.TMP_MARK}{d.proc.pid}-")
    finally:
        assert d.stop() == 0
    assert sorted(p.name for p in (store_of(sdir) / "pins").iterdir()) == [SID]


@pytest.mark.parametrize("plant", ["symlink", "fifo", "directory"])
def test_something_else_at_the_spares_name_is_never_followed_or_written(store: Store, tmp_path: Path,
                                                                         plant: str) -> None:
    """Only a store shared with the directory's owner lets anyone else put a name in ``pins/``:
    whatever is there is not followed, not opened blocking, and the pin is written anyway."""
    pins, pin = store.pins, pins_dir(store) / SID
    pins.write(SID, data(3))
    name = store.pins.spares.name(SID)
    assert name is not None
    target = tmp_path / "victim"
    target.write_bytes(b"victim")
    at = pins_dir(store) / name
    if plant == "symlink":
        at.symlink_to(target)
    elif plant == "fifo":
        os.mkfifo(at)
    else:
        at.mkdir()
    pins.write(SID, data(5), spare=True)
    assert pin.read_bytes() == data(5) and target.read_bytes() == b"victim"
    pins.write(SID, data(6), spare=True)
    assert pin.read_bytes() == data(6) and target.read_bytes() == b"victim"

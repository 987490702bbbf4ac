"""A store written by release 0.1.0 (format 1), opened by this release: upgraded in place, nothing lost."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sessionguard import fsutil
from sessionguard.count import key_hash
from sessionguard.errors import StoreError
from sessionguard.store import Store
from sghelpers import tree

FIXTURE = Path(__file__).parent / "fixtures" / "store-0.1.0.tar.gz"
V1_PIN = re.compile(r"^pin\.(\d+)\.(link|reflink|copy)\.(\d+|x)\.(\d+)\.(\d+)\.(\d+)\.(\d+)$")
#: Sessions of the fixture whose v1 folder held no version (only a pin and a lock).
PIN_ONLY = {"50%off", "x" * 200}


def extract(where: Path) -> Path:
    where.mkdir()
    subprocess.run(["tar", "-C", str(where), "-xzf", str(FIXTURE)], check=True)
    return where / "sessions"


def open_store(sdir: Path) -> tuple[Store, str | None]:
    parent = fsutil.open_root(str(sdir))
    try:
        return Store.open(parent, where=str(sdir / ".sessionguard"), expect_uid=os.geteuid(), max_bytes=1 << 26)
    finally:
        os.close(parent)


def v1_layout(sdir: Path) -> tuple[dict[str, dict[str, bytes]], dict[str, tuple[bytes, re.Match[str]]]]:
    """Format 1's versions (sid → name → bytes) and each session's newest pin (sid → (bytes, its name))."""
    versions: dict[str, dict[str, bytes]] = {}
    pins: dict[str, tuple[bytes, re.Match[str]]] = {}
    for folder in (sdir / ".sessionguard" / "sessions").iterdir():
        versions[folder.name] = {p.name: p.read_bytes() for p in folder.glob("*.version")}
        found = sorted((m for m in map(V1_PIN.match, os.listdir(folder)) if m), key=lambda m: int(m[1]))
        if found:
            pins[folder.name] = ((folder / found[-1].string).read_bytes(), found[-1])
    return versions, pins


def check_v2(sdir: Path, versions: dict[str, dict[str, bytes]], pins: dict[str, tuple[bytes, re.Match[str]]],
             store: Store) -> None:
    root = sdir / ".sessionguard"
    assert (root / "FORMAT").read_text() == "2\n"
    for sid, named in versions.items():
        listed = store.versions.of(sid)
        assert {v.name for v in listed} == set(named), sid
        assert all(store.versions.read(v, 1 << 26) == named[v.name] for v in listed), sid
    assert {p.name for p in (root / "sessions").iterdir()} == {sid for sid, named in versions.items() if named}
    assert not list(root.glob("sessions/*/.lock")) and not list(root.glob("sessions/*/pin.*"))
    assert {p.name for p in (root / "pins").iterdir()} == set(pins)
    assert all((root / "pins" / sid).read_bytes() == pinned for sid, (pinned, _) in pins.items())
    for d in ("", "sessions", "pins"):
        assert stat.S_IMODE((root / d).stat().st_mode) == 0o700, d
    assert store.usage() == (sum(len(n) for n in versions.values()),
                             sum(len(b) for n in versions.values() for b in n.values()))


def test_a_release_0_1_0_store_is_upgraded_in_place(tmp_path: Path) -> None:
    sdir = extract(tmp_path / "a")
    versions, pins = v1_layout(sdir)
    assert len(pins) == 7 and sum(map(len, versions.values())) == 7 and set(versions) >= PIN_ONLY
    store, notice = open_store(sdir)
    try:
        assert notice is not None and "upgraded from format 1" in notice and "7 pins moved" in notice
        check_v2(sdir, versions, pins, store)
        cache = store.pins.load_cache()
        entries = {sid: cache.get(sid) for sid in cache}
        assert {sid: entry[:4] for sid, entry in entries.items() if entry is not None} == {
            sid: (key_hash((int(m[4]), int(m[5]), int(m[6]), int(m[7]))), None if m[3] == "x" else int(m[3]), 0, 0)
            for sid, (_, m) in pins.items()}
        for sid, entry in entries.items():  # the pin's own identity, so the daemon knows it is the one it meant
            pin = os.stat(sdir / ".sessionguard" / "pins" / sid)
            assert entry[4] == key_hash((pin.st_dev, pin.st_ino, pin.st_size, pin.st_mtime_ns))
        entry = store.pins.load_cache().get("unparse00001")
        assert entry is not None and entry[1] is None
    finally:
        store.close()
    before = tree(sdir)
    again, notice = open_store(sdir)  # reopening is a no-op
    again.close()
    assert notice is None and tree(sdir) == before


def test_an_interrupted_upgrade_is_finished_without_losing_or_reverting_a_pin(tmp_path: Path) -> None:
    pristine = extract(tmp_path / "pristine")
    versions, pins = v1_layout(pristine)
    sdir = extract(tmp_path / "work")
    store, _ = open_store(sdir)
    store.close()
    root = sdir / ".sessionguard"
    # The state of a crash half-way: FORMAT not yet written; one session not yet visited at
    # all; another whose newest pin was already moved when the crash came, its old folder
    # (lock, and a pin older than the moved one) still there.
    (root / "FORMAT").unlink()
    (root / "pins.cache").unlink()
    for sid in ("20260424_231848_e7706c", "abc123def456"):
        shutil.rmtree(root / "sessions" / sid)
        shutil.copytree(pristine / ".sessionguard" / "sessions" / sid, root / "sessions" / sid, symlinks=True)
    (root / "pins" / "20260424_231848_e7706c").unlink()
    moved = root / "pins" / "abc123def456"
    moved.write_bytes(b'{"messages": ["newer than the v1 pin left behind"]}')
    pins["abc123def456"] = (moved.read_bytes(), pins["abc123def456"][1])
    ino = moved.stat().st_ino
    store, notice = open_store(sdir)
    try:
        assert notice is not None and "1 pins moved" in notice
        check_v2(sdir, versions, pins, store)
        assert moved.stat().st_ino == ino  # not replaced by the older pin
        assert set(store.pins.load_cache()) == {"20260424_231848_e7706c"}  # a hint: a missing entry costs a read
    finally:
        store.close()


@pytest.mark.parametrize("marker, why", [("3\n", "newer sessionguard"), ("two\n", "damaged")])
def test_a_store_this_release_cannot_read_is_refused_untouched(tmp_path: Path, marker: str, why: str) -> None:
    sdir = tmp_path / "s"
    (sdir / ".sessionguard").mkdir(parents=True, mode=0o700)
    (sdir / ".sessionguard" / "FORMAT").write_text(marker)
    before = tree(sdir)
    with pytest.raises(StoreError, match=why):
        open_store(sdir)
    assert tree(sdir) == before

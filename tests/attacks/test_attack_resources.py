"""Attacks 6, 7 and 10 of the security review (issue 10): stalling and exhausting the daemon.

6. A session lock held to stall captures. The server's user cannot open the store's lock file
   (the store is the daemon's, ``0700``): proven in both layouts. To hold one anyway, the server
   user shares the store with a root daemon (``store_owner = "directory"``, the layout where a
   server embeds the library) and holds the victim's byte with an OFD lock: other sessions go
   on, the victim is ``degraded`` after 10 s and captured after the release. The packaged layout
   cannot share its store with the server's user (a daemon that is not root cannot give it
   files), so that half is moot there.
7. The control socket: a read-group member holding 300 connections while root restores, and
   64 of its clients asking ``show --messages`` for a 35 MB version and never reading. Run once,
   in the packaged layout: the socket's limits do not depend on the daemon's uid.
10. ``max_store_bytes = 1 MB`` and 3,000 create/delete cycles of distinct names by the server's
   user: the store never exceeds the cap by more than one version, empty folders go, evictions
   are logged, a live long conversation's newest and high-water versions stay.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from attackworld import LAYOUTS, World

from daemonproc import eventually
from sessionguard.locks import session_byte
from sghelpers import memory, store_versions, version_hash

Worlds = Callable[[str], World]
MiB = 1024 * 1024


# -- attack 6 --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_neither_the_server_user_nor_a_reader_can_take_a_session_lock(make_world: Worlds, layout: str) -> None:
    w = make_world(layout)
    sdir = w.tenant()
    srv = w.agent()
    srv("save", path=f"{sdir}/victim.json", sid="victim", n=10, tag="v")
    w.start()
    store = w.store()
    tries = {}
    byte = session_byte("victim")
    for who, agent in (("server user", srv), ("reader", w.agent("reader"))):
        tries.update({f"{who}: open lock rw": agent.attempt("open", path=f"{store}/lock", write=True),
                      f"{who}: open lock ro": agent.attempt("open", path=f"{store}/lock"),
                      f"{who}: open the store": agent.attempt("open", path=str(store)),
                      f"{who}: hold the byte": agent.attempt("lock", path=f"{store}/lock", byte=byte)})
    assert {k: (t["ok"], t.get("errno")) for k, t in tries.items()} == {k: (False, 13) for k in tries}


def test_a_held_session_lock_defers_only_that_session(make_world: Worlds) -> None:
    w = make_world("root")
    sdir = w.tenant()
    srv = w.agent()
    first = srv("save", path=f"{sdir}/victim.json", sid="victim", n=100, tag="victim")
    others = {f"other{i}": srv("save", path=f"{sdir}/other{i}.json", sid=f"other{i}", n=20, tag=f"o{i}")
              for i in range(3)}
    d = w.start(f'path = "{sdir}"\nstore_owner = "directory"')
    store = w.store()
    assert os.lstat(store).st_uid == w.cast.users["srv"].pw_uid, "the shared store is the server user's"
    w.arm()
    srv("lock", path=f"{store}/lock", byte=session_byte("victim"))
    held_at = time.monotonic()
    srv("save", path=f"{sdir}/victim.json", sid="victim", n=0, tag="victim")
    for sid in others:
        srv("save", path=f"{sdir}/{sid}.json", sid=sid, n=0, tag=sid)
    d.sync()
    for sid, saved in others.items():  # the others went on while the victim's lock is held
        assert [v.count for v in store_versions(store, sid)] == [20], sid
        assert version_hash(store_versions(store, sid)[0].path.read_bytes()) == saved["hash"]
    assert store_versions(store, "victim") == [], "captured although its lock is held"
    ev = d.wait_event("degraded", lambda e: e["component"] == f"lock:{sdir}", timeout=30)
    assert "victim" in ev["why"] and time.monotonic() - held_at >= 10
    assert any("victim" in why for why in d.call("status")["degraded"])
    srv("unlock")
    d.wait_event("degraded.cleared", lambda e: e["component"] == f"lock:{sdir}", timeout=15)
    [v] = store_versions(store, "victim")
    assert (v.count, version_hash(v.path.read_bytes())) == (100, first["hash"]), "the victim was not captured"
    w.assert_untouched()


# -- attack 7 --------------------------------------------------------------------------------


def test_a_reader_cannot_exhaust_the_control_socket(make_world: Worlds) -> None:
    w = make_world("packaged")
    sdir = w.tenant()
    srv = w.agent()
    big = srv("save", path=f"{sdir}/big.json", sid="big", n=77000, tag="big")
    srv("save", path=f"{sdir}/victim.json", sid="victim", n=50, tag="victim")
    d = w.start()
    srv("save", path=f"{sdir}/big.json", sid="big", n=0, tag="big")
    srv("save", path=f"{sdir}/victim.json", sid="victim", n=0, tag="victim")
    d.sync()
    [kept] = store_versions(w.store(), "big")
    assert version_hash(kept.path.read_bytes()) == big["hash"] and big["size"] > 35_000_000
    reader = w.agent("reader")

    held = reader("hold_connections", path=d.socket, n=300)
    assert held == {"held": 32, "busy": 268}, held
    restored = d.call("restore", {"sid": "victim"})  # root, while the reader holds its 32
    assert restored["restored"]["count"] == 50
    assert w.ctl("admin", d, "history", "victim").returncode == 0, "an admin is not locked out either"
    assert len([e for e in d.events("control.busy") if e["uid"] == w.cast.users["reader"].pw_uid]) == 1
    reader("close_sockets")

    before = memory(d.proc.pid)
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "show", "params": {"sid": "big", "messages": True}})
    assert reader("ask_and_do_not_read", path=d.socket, n=64, line=line + "\n") == 64
    answers = reader("answers")
    peak = memory(d.proc.pid)
    codes = Counter(a["error"]["code"] if a and "error" in a else 0 for a in answers)
    reader("close_sockets")
    time.sleep(1)
    after = memory(d.proc.pid)
    print(f"\n[attack 7] a reader asked 300 connections: {held}; 64 unread show --messages of a "
          f"{big['size'] / MiB:.1f} MiB version: answers {dict(codes)}; daemon RSS {before['VmRSS'] // MiB} MiB -> "
          f"peak {peak['VmHWM'] // MiB} MiB, {after['VmRSS'] // MiB} MiB after they left")
    assert all(a is not None and "error" in a for a in answers), "a 35 MB reply was queued whole"
    assert set(codes) <= {-32002, -32006}, codes
    assert peak["VmHWM"] - before["VmRSS"] < 768 * MiB, "the daemon's memory is not bounded"
    assert d.call("status")["pid"] == d.proc.pid
    unit = (Path(__file__).parents[2] / "sessionguard.service").read_text()
    assert "\nMemoryMax=" in unit, "the unit bounds the daemon's memory"


# -- attack 10 -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StoreSize:
    """Samples the bytes of every version file in a store (read from disk) until stopped."""

    def __init__(self, store: Path) -> None:
        self.store, self.samples, self.largest = store, [0], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def total(self) -> int:
        """Bytes of the version files now; folders and files removed meanwhile are skipped."""
        total = 0
        with os.scandir(self.store / "sessions") as folders:
            for folder in folders:
                try:
                    with os.scandir(folder.path) as files:
                        sizes = [f.stat(follow_symlinks=False).st_size for f in files if f.name.endswith(".version")]
                except FileNotFoundError:
                    continue
                total += sum(sizes)
                self.largest = max([self.largest, *sizes])
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(self.total())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return max(self.samples)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_flood_of_short_lived_names_cannot_fill_the_disk(make_world: Worlds, layout: str) -> None:
    cap = 1_000_000
    w = make_world(layout)
    sdir = w.tenant()
    srv = w.agent()
    srv("save", path=f"{sdir}/long.json", sid="long", n=300, tag="long")
    d = w.start(f'path = "{sdir}"\nmax_store_bytes = {cap}')
    store = w.store()
    for n in (100, 200, 50):  # high water 300, newest 200: both protected while "long" lives
        srv("save", path=f"{sdir}/long.json", sid="long", n=n, tag="long")
        d.sync()
    protected = {v.count for v in store_versions(store, "long")}
    assert protected == {300, 200}, protected
    w.arm()
    size = StoreSize(store)
    started, cpu_before = time.monotonic(), cpu_seconds(d.proc.pid)
    for batch in range(6):
        names = [f"flood{batch:02d}x{i:03d}" for i in range(500)]
        srv("create_many", folder=str(sdir), names=names, n=20)
        d.sync(60)
        srv("delete_many", folder=str(sdir), names=names)
        d.sync(60)
    largest = size.stop()
    took, cpu = time.monotonic() - started, cpu_seconds(d.proc.pid) - cpu_before
    folders = [p for p in (store / "sessions").iterdir()]
    evicted = d.events("version.evicted")
    print(f"\n[attack 10] 3000 create/delete cycles in {took:.1f} s ({cpu:.1f} s of daemon CPU): store at most "
          f"{largest} bytes (cap {cap}, largest version {size.largest}); {len(evicted)} evictions; "
          f"{len(folders)} folders left")
    assert largest <= cap + size.largest, f"the store reached {largest} bytes"
    # At rest no folder is without a version. sync() orders the events, not a reconcile pass
    # (every 30 s: one starts about when the flood ends), which may still be keeping a version
    # (its folder made before the version is named) or evicting one (unlinked before the rmdir).
    eventually(lambda: not [p.name for p in (store / "sessions").iterdir() if not any(p.glob("*.version"))],
               what="no version folder left without a version")
    assert {v.count for v in store_versions(store, "long")} >= protected, "a live conversation's versions went"
    assert len(evicted) >= 2000 and all(e["sid"].startswith("flood") for e in evicted)
    assert len(folders) < 600, "the store keeps a folder per name it ever saw"
    # a live conversation larger than the cap: kept all the same, and the store says it is over
    huge = srv("save", path=f"{sdir}/huge.json", sid="huge", n=2400, tag="huge")
    d.sync()
    srv("save", path=f"{sdir}/huge.json", sid="huge", n=0, tag="huge")
    d.sync()
    assert [version_hash(v.path.read_bytes()) for v in store_versions(store, "huge")] == [huge["hash"]]
    assert huge["size"] > cap and {v.count for v in store_versions(store, "long")} >= protected
    ev = d.wait_event("degraded", lambda e: e["component"] == f"cap:{store}")
    assert "only protected" in ev["why"] and any("max_store_bytes" in why for why in d.call("status")["degraded"])
    w.assert_untouched()

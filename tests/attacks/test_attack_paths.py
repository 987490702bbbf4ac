"""Attacks 2 and 12 of the security review (issue 10): paths below the watched directory.

2. A recursive watch's sub-directory exchanged (``renameat2(RENAME_EXCHANGE)``, by the
   server's user) for a symlink to a root-only directory holding a session-shaped ``0600``
   file with a marker; then a read-group member asks ``show --messages`` and an admin
   ``restore``: the marker is never read, kept or shown, nothing is written through the
   symlink, and the conversation that was there is kept.
12. A flat watch's file named ``a%2F..%2Fb.json``: guarded, and nameable over the socket by
   its id (history, diff, restore) without ever touching ``b.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from attackworld import LAYOUTS, World

from sghelpers import store_versions, version_hash, wait_for

Worlds = Callable[[str], World]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_subdirectory_exchanged_for_a_symlink_to_a_root_only_directory(make_world: Worlds, layout: str) -> None:
    w = make_world(layout)
    sdir = w.tenant()
    srv = w.agent()
    srv("mkdir", path=f"{sdir}/sub")
    mine = srv("save", path=f"{sdir}/sub/victim.json", sid="victim", n=30, tag="mine")
    d = w.start(f'path = "{sdir}"\nrecursive = true')
    sid, store = "sub%2Fvictim", w.store()
    w.arm()
    srv("symlink", target=str(w.canary / "secret"), path=f"{sdir}/.swap")
    srv("exchange", a=f"{sdir}/sub", b=f"{sdir}/.swap")  # sub → the root-only directory; .swap: the real one
    srv("save", path=f"{sdir}/.swap/victim.json", sid="victim", n=31, tag="mine")  # an event in the moved dir
    d.sync()
    kept = wait_for(lambda: mine["hash"] in {version_hash(v.path.read_bytes()) for v in store_versions(store, sid)})
    shown = w.ctl("reader", d, "show", sid, "--messages")
    restored = w.ctl("admin", d, "restore", sid)
    d.sync()

    w.assert_untouched()
    assert w.marker_in(store) == [], "the root-only file's content is in the store"
    assert w.marker not in shown.stdout + shown.stderr + restored.stdout + restored.stderr
    assert w.marker not in d.text()
    assert kept, "the conversation that was in the sub-directory was not kept"
    assert shown.returncode == 0, shown.stderr
    messages = json.loads(shown.stdout)["messages"]
    assert len(messages) == 30 and messages[0]["content"].startswith("mine message 0")
    assert restored.returncode == 1 and "symlinks are never followed" in restored.stderr, restored.stderr
    ev = d.wait_event("file.skipped", lambda e: e["path"] == f"{sdir}/sub/victim.json")
    assert "symlink" in ev["why"] or "not a directory" in ev["why"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_flat_watch_file_with_escapes_in_its_name_is_nameable(make_world: Worlds, layout: str) -> None:
    w = make_world(layout)
    sdir = w.tenant()
    srv = w.agent()
    sid = "a%2F..%2Fb"
    srv("mkdir", path=f"{sdir}/a")
    first = srv("save", path=f"{sdir}/{sid}.json", sid=sid, n=10, tag="escaped")
    decoy = srv("save", path=f"{sdir}/b.json", sid="b", n=7, tag="decoy")
    d = w.start()
    srv("save", path=f"{sdir}/{sid}.json", sid=sid, n=0, tag="escaped")
    d.sync()
    w.arm()
    assert [v.count for v in store_versions(w.store(), sid)] == [10], "the wipe of the escaped name was not kept"

    outs = {cmd: w.ctl("admin", d, cmd, sid) for cmd in ("history", "diff", "restore")}
    d.sync()

    w.assert_untouched()
    assert version_hash((sdir / "b.json").read_bytes()) == decoy["hash"], "b.json was touched"
    assert {cmd: p.returncode for cmd, p in outs.items()} == {"history": 0, "diff": 0, "restore": 0}, \
        {cmd: p.stderr for cmd, p in outs.items()}
    assert version_hash((sdir / f"{sid}.json").read_bytes()) == first["hash"]

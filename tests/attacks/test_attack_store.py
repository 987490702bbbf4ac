"""Attacks 1, 3 and 5 of the security review (issue 10): the server's user against the store
that lives in its directory — swapped for a symlink or a directory of its own, pointed at
another tenant's store, renamed away — performed as that user (``setpriv``) against a root
daemon and against the packaged layout (attackworld.py).

Each test looks at the worst outcome first (the canary standing for ``/etc``, the victim's
version on disk) and only then at what the daemon said, so that run against release 0.1.0
(``SG_ATTACKS_DAEMON_PATH``) it shows what the attack did rather than a missing log line.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from attackworld import LAYOUTS, Agent, World

from daemonproc import DaemonProc
from sghelpers import store_versions, version_hash, wait_for

Worlds = Callable[[str], World]


def kept(store: Path, sid: str, digest: str) -> list[str]:
    """Names of *sid*'s versions in *store* whose bytes (hashed here) are *digest*."""
    return [v.name for v in store_versions(store, sid) if version_hash(v.path.read_bytes()) == digest]


def owned_by_daemon(w: World, store: Path) -> bool:
    st = os.lstat(store)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == w.daemon_uid and stat.S_IMODE(st.st_mode) == 0o700


def asides(sdir: Path) -> list[Path]:
    return sorted(sdir.glob(".sessionguard.refused-*"))


def sessions(w: World, srv: Agent) -> dict[str, dict[str, object]]:
    """The attacker's own conversations: victim (100 messages), other (10), made before the daemon."""
    sdir = w.tenant()
    return {"victim": srv("save", path=f"{sdir}/victim.json", sid="victim", n=100, tag="victim"),
            "other": srv("save", path=f"{sdir}/other.json", sid="other", n=10, tag="other")}


def provoke(w: World, srv: Agent, d: DaemonProc) -> None:
    """What makes a daemon write, link and unlink in its store: a wipe, a new session, a deletion."""
    sdir = w.tenant()
    srv("save", path=f"{sdir}/victim.json", sid="victim", n=0, tag="victim")
    srv("save", path=f"{sdir}/newcomer.json", sid="newcomer", n=3, tag="new")
    srv("unlink", path=f"{sdir}/other.json")
    d.sync()


# -- attack 1: the store swapped -----------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_store_renamed_away_and_a_symlink_put_in_its_place(make_world: Worlds, layout: str) -> None:
    """The store is renamed within the directory and ``.sessionguard`` made a symlink to the
    canary; then the attacker wipes, creates and deletes sessions. Nothing is written, read,
    linked or removed in the canary; the store is put back (``store.reclaimed``), the symlink
    moved aside, and the wipe and the deletion were kept in the real store."""
    w = make_world(layout)
    srv = w.agent()
    before = sessions(w, srv)
    d = w.start()
    store, sdir = w.store(), w.tenant()
    ident = os.lstat(store).st_ino
    w.arm()
    srv("rename", src=str(store), dst=f"{sdir}/.stolen")
    srv("symlink", target=str(w.canary), path=str(store))
    provoke(w, srv, d)
    back = wait_for(lambda: not store.is_symlink() and store.is_dir() and os.lstat(store).st_ino == ident)

    w.assert_untouched()
    assert back, "the store was not put back under its name"
    assert kept(store, "victim", str(before["victim"]["hash"])), "the wipe right after the swap was not kept"
    assert kept(store, "other", str(before["other"]["hash"])), "the deletion was not kept"
    assert owned_by_daemon(w, store) and not (sdir / ".stolen").exists()
    [aside] = asides(sdir)
    assert aside.is_symlink() and os.readlink(aside) == str(w.canary)
    ev = d.wait_event("store.reclaimed")
    assert ev["store"] == str(store) and ev["level"] == "error"
    assert not d.events("worker.error") and not d.events("maintenance.error")


@pytest.mark.parametrize(("layout", "plant"), [
    ("root", "directory"), ("root", "symlink"), ("packaged", "symlink"), ("packaged", "directory")])
def test_a_store_planted_before_the_daemon_starts(make_world: Worlds, layout: str, plant: str) -> None:
    """Before the daemon starts, ``.sessionguard`` is the attacker's: a ``0700`` directory whose
    files and entries of ``pins/`` and ``sessions/`` are symlinks into the canary (its pins, its
    versions, ``logrotate.d``), or a symlink to the canary itself. Refused, moved aside
    untouched (``store.replaced``), a fresh store of the daemon's made; nothing in the canary
    touched; the victim's wipe kept in the fresh store."""
    w = make_world(layout)
    srv = w.agent()
    before = sessions(w, srv)
    store, sdir = w.store(), w.tenant()
    if plant == "symlink":
        srv("symlink", target=str(w.canary), path=str(store))
    else:
        for folder in ("", "/pins", "/sessions"):
            srv("mkdir", path=f"{store}{folder}", mode=0o755)
        srv("put", path=f"{store}/FORMAT", hex=b"2\n".hex())
        for name, target in (("pins/victim", "pins/victim"), ("pins/other", "passwd"),
                             ("sessions/victim", "sessions/victim"), ("sessions/other", "logrotate.d"),
                             ("sessions/newcomer", "logrotate.d"), ("lock", "shadow"), ("usage", "passwd"),
                             ("README.txt", "logrotate.d/rsyslog")):
            srv("symlink", target=str(w.canary / target), path=f"{store}/{name}")
        srv("chmod", path=str(store), mode=0o700)  # its own: nobody else may even look inside
    planted = sorted(str(p.relative_to(store)) for p in store.rglob("*")) if plant == "directory" else None
    w.arm()
    d = w.start()
    provoke(w, srv, d)

    w.assert_untouched()
    assert kept(store, "victim", str(before["victim"]["hash"])), "the victim's wipe was not kept"
    assert owned_by_daemon(w, store)
    [aside] = asides(sdir)
    if plant == "symlink":
        assert aside.is_symlink() and os.readlink(aside) == str(w.canary)
    else:
        assert os.lstat(aside).st_uid == w.cast.users["srv"].pw_uid
        assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*")) == planted
    ev = d.wait_event("store.replaced")
    assert "moved aside" in ev["why"] and aside.name in ev["why"]


# -- attack 3: one tenant pointing its store at another's ----------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("when", ["before-start", "while-running"])
def test_a_tenant_points_its_store_at_another_tenants(make_world: Worlds, layout: str, when: str) -> None:
    """One daemon guards tenants A (the attacker) and B. A makes ``A/.sessionguard`` a symlink
    to B's store (before the daemon starts, or by renaming its own away while it runs), then
    writes, wipes and deletes a session with the id of B's. B's wipe keeps B's conversation, B's
    store holds nothing of A's, and an admin's restore gives B its own bytes back."""
    w = make_world(layout)
    a_dir, b_dir = w.tenant("srv"), w.tenant("srv2")
    a, b = w.agent("srv"), w.agent("srv2")
    theirs = b("save", path=f"{b_dir}/victim.json", sid="victim", n=100, tag="tenant-B")
    mine: list[str] = [a("save", path=f"{a_dir}/victim.json", sid="victim", n=40, tag="tenant-A")["hash"]]
    if when == "before-start":
        a("symlink", target=str(w.store("srv2")), path=str(w.store("srv")))
    d = w.start(f'path = "{a_dir}"', f'path = "{b_dir}"')
    w.arm()
    if when == "while-running":
        a("rename", src=str(w.store("srv")), dst=f"{a_dir}/.mine")
        a("symlink", target=str(w.store("srv2")), path=str(w.store("srv")))
    for n in (60, 0, 5):
        mine.append(a("save", path=f"{a_dir}/victim.json", sid="victim", n=n, tag=f"tenant-A-{n}")["hash"])
    a("unlink", path=f"{a_dir}/victim.json")
    d.sync()
    b("save", path=f"{b_dir}/victim.json", sid="victim", n=0, tag="tenant-B")  # B's own wipe
    d.sync()

    b_store = w.store("srv2")
    in_b = {version_hash(p.read_bytes()) for p in b_store.rglob("*") if p.is_file() and not p.is_symlink()}
    assert not in_b & set(mine), "tenant A's bytes are in tenant B's store"
    assert kept(b_store, "victim", str(theirs["hash"])), "B's conversation was not kept at B's wipe"
    p = w.ctl("admin", d, "restore", "victim", "--watch", str(b_dir))
    assert p.returncode == 0, p.stderr
    assert version_hash((b_dir / "victim.json").read_bytes()) == theirs["hash"], "B's restore did not give B its bytes"
    w.assert_untouched()
    assert wait_for(lambda: w.store("srv").is_dir() and not w.store("srv").is_symlink()), "A's store not put back"
    assert owned_by_daemon(w, w.store("srv"))
    in_a = {version_hash(p.read_bytes()) for p in w.store("srv").rglob("*") if p.is_file() and not p.is_symlink()}
    assert theirs["hash"] not in in_a, "tenant B's conversation is in tenant A's store"
    if when == "before-start":
        ev = d.wait_event("store.replaced", lambda e: e["watch"] == str(a_dir))
        assert "symlink" in ev["why"]
    else:
        d.wait_event("store.reclaimed", lambda e: e["watch"] == str(a_dir))


# -- attack 5: the store renamed away or removed ---------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_attacker_cannot_remove_the_store_and_a_rename_is_undone(make_world: Worlds, layout: str) -> None:
    """The directory's owner cannot remove the store (``0700``, the daemon's) nor move it out of
    its directory (a directory moved to another parent needs write access to itself); it can
    rename it within. Renamed, the store is put back (``store.reclaimed``) and the wipe made right
    after the rename is kept."""
    w = make_world(layout)
    srv = w.agent()
    before = sessions(w, srv)
    d = w.start()
    store, sdir = w.store(), w.tenant()
    ident = os.lstat(store).st_ino
    w.arm()
    refused = {"rm -rf": srv.attempt("rmtree", path=str(store)),
               "list": srv.attempt("listdir", path=str(store)),
               "open lock": srv.attempt("open", path=f"{store}/lock", write=True)}
    srv("mkdir", path=f"{sdir}/mine")
    refused["move into a sub-directory"] = srv.attempt("rename", src=str(store), dst=f"{sdir}/mine/.sg")
    refused["move out of the directory"] = srv.attempt("rename", src=str(store), dst=f"{w.scratch}/.sg")
    assert {k: (r["ok"], r.get("errno")) for k, r in refused.items()} == {
        "rm -rf": (False, 13), "list": (False, 13), "open lock": (False, 13),
        "move into a sub-directory": (False, 13), "move out of the directory": (False, 13)}
    srv("rename", src=str(store), dst=f"{sdir}/.elsewhere")
    srv("save", path=f"{sdir}/victim.json", sid="victim", n=0, tag="victim")
    back = wait_for(lambda: store.is_dir() and os.lstat(store).st_ino == ident)
    d.sync()

    w.assert_untouched()
    assert back, "the store was not put back"
    assert kept(store, "victim", str(before["victim"]["hash"])), "the wipe right after the rename was not kept"
    assert not (sdir / ".elsewhere").exists() and owned_by_daemon(w, store)
    d.wait_event("store.reclaimed")
    assert not d.events("store.vanished"), "renamed is not vanished: no fresh store for a rename"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_rename_storm_does_not_make_the_daemon_abandon_its_store(make_world: Worlds, layout: str) -> None:
    """The attacker moves the store round ten names as fast as it can: the name the daemon's
    search for its store finds is most likely stale by the time it renames. The daemon must not
    give up the store it holds for a fresh, empty one: afterwards ``.sessionguard`` is the same
    store, the version kept before the storm is still there, and the wipe made during the storm
    is kept."""
    w = make_world(layout)
    srv = w.agent()
    sdir = w.tenant()
    first = srv("save", path=f"{sdir}/victim.json", sid="victim", n=100, tag="victim")
    d = w.start()
    second = srv("save", path=f"{sdir}/victim.json", sid="victim", n=50, tag="victim")  # 100 → 50: kept
    d.sync()
    store = w.store()
    ident = os.lstat(store).st_ino
    w.arm()
    srv.send("rename_storm", names=[str(store), *(f"{sdir}/.n{i}" for i in range(10))], seconds=5.0)
    w.agent()("save", path=f"{sdir}/victim.json", sid="victim", n=0, tag="victim")  # 50 → 0 in the storm
    storm = srv.reply()
    assert storm["ok"], storm
    back = wait_for(lambda: store.is_dir() and os.lstat(store).st_ino == ident, timeout=5)
    wiped_kept = wait_for(lambda: kept(store, "victim", str(second["hash"])), timeout=5 if back else 1)

    w.assert_untouched()
    problems = [why for bad, why in (
        (not back, f"the daemon's store is not under its name ({sorted(n for n in os.listdir(sdir) if n[0] == '.')})"),
        (not kept(store, "victim", str(first["hash"])), "the version kept before the storm is gone from the store"),
        (not wiped_kept, "the wipe during the storm was not kept"),
        (bool(d.events("store.vanished")), "the daemon made a fresh store while its own was in the directory"),
    ) if bad]
    assert problems == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_store_removed_by_root_is_made_again(make_world: Worlds, layout: str) -> None:
    """Only root can remove the store (an admin's mistake, a cleanup job). The daemon says so
    (``store.vanished``, ``degraded`` until a fresh store is made), pins every session again,
    and a wipe right after is kept."""
    w = make_world(layout)
    srv = w.agent()
    sdir = w.tenant()
    first = srv("save", path=f"{sdir}/victim.json", sid="victim", n=100, tag="victim")
    d = w.start()
    store = w.store()
    w.arm()
    shutil.rmtree(store)
    d.wait_event("store.vanished")
    d.wait_event("watch.restored")
    srv("save", path=f"{sdir}/victim.json", sid="victim", n=0, tag="victim")
    d.sync()

    w.assert_untouched()
    assert kept(store, "victim", str(first["hash"])), "the wipe after the store was made again was not kept"
    assert owned_by_daemon(w, store)
    degraded = d.wait_event("degraded", lambda e: e["component"] == f"store:{store}")
    assert "removed" in degraded["why"]
    d.wait_event("degraded.cleared", lambda e: e["component"] == f"store:{store}")

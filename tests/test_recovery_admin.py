"""The admin's view of the store on the real daemon (issue 12): ``list`` from the store and the
live files, ``forget`` (erasure on request) and the store's own README.txt run by hand.

``sessionguardctl`` runs as a subprocess, the store is read from disk; the
incident story itself (restore rule, ``recover``, a caching server) is in
test_recovery_story.py.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sessionguard
from chatserver import ChatServer, Session, make_session
from daemonproc import DaemonProc
from sgbackend import run_as
from sghelpers import (
    count_of,
    files_holding,
    local_when,
    next_second,
    pin_count,
    printed_command,
    rmtree,
    run_printed,
    seed_write,
    sgctl,
    sgctl_json,
    short_tmpdir,
    store_of,
    store_versions,
)

#: ``daemons(*args)`` (conftest): a started sessionguardd, stopped after the test.
StartDaemon = Callable[..., DaemonProc]


def count(d: Path, sid: str) -> int:
    return count_of(d / f"{sid}.json")


def watching(daemons: StartDaemon, d: Path) -> DaemonProc:
    return daemons("--watch", str(d))


# -- 4. list: from the store as well as the live files ---------------------------------------------------

OK, GONE, MEANT, LOST, AGAIN, BYLIB, GROWN = ("a1" * 6, "a2" * 6, "a3" * 6, "a4" * 6, "a5" * 6, "a6" * 6, "a7" * 6)


def rows(sock: str, *args: str) -> dict[str, dict[str, Any]]:
    return {r["sid"]: r for r in sgctl_json(sock, "list", *args)["sessions"]}


def on_disk_counts(sock: str, d: Path, sid: str) -> tuple[int, int, int]:
    """VERSIONS as list says it, history's length, and the version files in the store."""
    return (rows(sock)[sid]["versions"], len(sgctl_json(sock, "history", sid)["versions"]),
            len(store_versions(store_of(d), sid)))


def wipe(d: Path, sid: str, n: int = 0) -> None:
    """Write *sid* with *n* messages, the intent key unchanged (0: the seed's wipe)."""
    seed_write(d, make_session(sid, n, intentional_shrink_generation="isg-0"))


def test_list_shows_deleted_sessions_losses_only_with_shrunk_and_versions_as_on_disk(
        sdir: Path, daemons: StartDaemon) -> None:
    d = sdir
    for sid in (OK, GONE, MEANT, LOST, AGAIN, BYLIB):
        wipe(d, sid, 30)
    proc = watching(daemons, d)
    sock = proc.socket
    os.unlink(d / f"{GONE}.json")
    seed_write(d, make_session(MEANT, 10, intentional_shrink_generation="isg-1"))  # an undo: intent key changed
    for sid in (LOST, AGAIN, BYLIB):
        wipe(d, sid)
    proc.sync()
    for _ in range(2):  # restore, then the very same wipe again: each wipe is a version of its own
        assert sgctl(sock, "restore", AGAIN).returncode in (0, 5)
        proc.sync()
        wipe(d, AGAIN)
        proc.sync()
    guard = sessionguard.Guard(d)
    try:
        first = guard.restore(BYLIB)
        assert first.pre_restore is not None and count(d, BYLIB) == 30
        guard.restore(BYLIB, first.pre_restore.id)
    finally:
        guard.close()
    proc.sync()

    listed = rows(sock)
    assert {s: r["state"] for s, r in listed.items()} == {
        OK: "ok", GONE: "deleted", MEANT: "intended", LOST: "shrunk", AGAIN: "shrunk", BYLIB: "ok"}
    assert (listed[GONE]["count"], listed[GONE]["high_water"], listed[GONE]["last_loss"]["reason"]) == (
        None, 30, "deleted")
    assert (listed[LOST]["count"], listed[LOST]["high_water"], listed[LOST]["versions"]) == (0, 30, 1)
    assert listed[OK]["versions"] == 0 and listed[OK]["last_loss"] is None
    assert set(rows(sock, "--shrunk")) == {GONE, LOST, AGAIN}
    assert set(rows(sock, "--shrunk", "--all")) == {GONE, LOST, AGAIN, MEANT}
    human = sgctl(sock, "list", "--shrunk").stdout
    assert GONE in human and "deleted" in human and MEANT not in human
    history = sgctl_json(sock, "history", AGAIN)["versions"]
    assert [v["reason"] for v in history if v["reason"] == "shrink"] == ["shrink"] * 3
    for sid in (AGAIN, BYLIB, GONE, MEANT):
        versions, length, files = on_disk_counts(sock, d, sid)
        assert versions == length == files, sid
    assert on_disk_counts(sock, d, BYLIB)[0] == 3  # shrink, and the two library restores' pre-restore versions

    assert listed[AGAIN]["overwritten"] is not None  # the same wipe again undid the restore
    proc.stop()
    proc = watching(daemons, d)
    listed[AGAIN]["overwritten"] = None  # an undone restore is remembered by the running daemon only
    assert rows(proc.socket) == listed, "the same after a restart"


def test_after_the_same_wipe_twice_the_printed_undo_and_the_ids_history_shows_still_work(
        sdir: Path, daemons: StartDaemon) -> None:
    d = sdir
    wipe(d, AGAIN, 30)
    proc = watching(daemons, d)
    undo = ""
    for _ in range(2):
        wipe(d, AGAIN)
        proc.sync()
        p = sgctl(proc.socket, "restore", AGAIN)
        assert p.returncode in (0, 5) and count(d, AGAIN) == 30, p.stderr
        undo = printed_command(p.stdout, "to undo:")
        proc.sync()
    u = run_printed(undo)
    assert u.returncode in (0, 5), (undo, u.stderr)
    assert count(d, AGAIN) == 0
    proc.sync()
    shrink = next(v for v in sgctl_json(proc.socket, "history", AGAIN)["versions"] if v["reason"] == "shrink")
    assert sgctl(proc.socket, "restore", AGAIN, shrink["id"]).returncode in (0, 5)
    assert count(d, AGAIN) == 30


def test_list_shrunk_leaves_out_a_session_grown_past_its_damage(sdir: Path, daemons: StartDaemon) -> None:
    d = sdir
    wipe(d, GROWN, 20)
    proc = watching(daemons, d)
    wipe(d, GROWN)
    proc.sync()
    assert set(rows(proc.socket, "--shrunk")) == {GROWN}
    wipe(d, GROWN, 21)
    proc.sync()
    (row,) = sgctl_json(proc.socket, "recover", "--dry-run")["sessions"]
    assert (row["sid"], row["outcome"]) == (GROWN, "left alone")
    assert rows(proc.socket)[GROWN]["state"] != "shrunk"
    assert rows(proc.socket, "--shrunk") == {}


# -- 5. forget: erasure on request ---------------------------------------------------------------------

ERASED, KEPT = "e1" * 6, "e2" * 6


def with_marker(sid: str, n: int, marker: str, **meta: str) -> Session:
    session = make_session(sid, n, **meta)
    session.messages.append({"role": "user", "content": f"my card number, please forget it: {marker}"})
    return session


def erasure_case(d: Path, proc: DaemonProc, marker: str) -> None:
    """A conversation holding *marker* is wiped, recovered, then cleared and deleted by its user on
    purpose: the store keeps it in several versions."""
    keys = {"intentional_shrink_generation": "isg-0", "clear_generation": "cg-0"}
    seed_write(d, make_session(ERASED, 0, **keys))
    proc.sync()
    seed_write(d, with_marker(ERASED, 12, marker, **keys))
    proc.sync()
    seed_write(d, make_session(ERASED, 0, **keys))  # the seed's wipe
    proc.sync()
    assert sgctl(proc.socket, "recover").returncode == 0
    proc.sync()
    with ChatServer(d) as srv:
        srv.post(f"/sessions/{ERASED}/clear")
        proc.sync()  # two evaluations, not one: a delete right after a write may be judged with it
        srv.delete(f"/sessions/{ERASED}")
        assert srv.stop() == 0
    proc.sync()


@pytest.fixture
def world() -> Iterator[Path]:
    """A short, world-traversable base directory: the throwaway users must reach the socket."""
    base = Path(short_tmpdir("sgrec"))
    os.chmod(base, 0o755)
    (base / "sessions").mkdir()
    yield base
    rmtree(str(base))


@pytest.mark.root
def test_forget_removes_every_byte_of_a_session_for_admins_only(
        world: Path, accounts: dict[str, Any], public_client: tuple[str, dict[str, str]]) -> None:
    d = world / "sessions"
    cfg = world / "sg.toml"
    cfg.write_text(f'[daemon]\nread_group = "{accounts["groups"]["read"]}"\n'
                   f'admin_group = "{accounts["groups"]["admin"]}"\n\n[[watch]]\npath = "{d}"\n')
    proc = DaemonProc(world, ["--config", str(cfg)]).started()
    try:
        forget_story(d, proc, accounts, public_client)
    finally:
        proc.stop()


def forget_story(d: Path, proc: DaemonProc, accounts: dict[str, Any],
                 public_client: tuple[str, dict[str, str]]) -> None:
    os.chmod(proc.socket, 0o666)  # every test user may connect: SO_PEERCRED alone decides
    marker = f"MARKER-{secrets.token_hex(8)}"
    erasure_case(d, proc, marker)
    store = store_of(d)
    holding = files_holding(store, marker.encode())
    assert len(holding) >= 2 and all(h.startswith(f"sessions/{ERASED}/") for h in holding), holding
    assert [(r["sid"], r["state"]) for r in sgctl_json(proc.socket, "list")["sessions"]] == [(ERASED, "deleted")]
    kept = store_versions(store, ERASED)
    assert [v.reason for v in kept] == ["shrink", "pre-restore", "intended", "deleted"]

    refused = run_as("reader", accounts, public_client, proc.socket, "forget", ERASED)
    assert refused.returncode == 1 and "permission denied" in refused.stderr
    assert files_holding(store, marker.encode()) == holding

    done = run_as("admin", accounts, public_client, proc.socket, "forget", ERASED)
    assert done.returncode == 0, done.stderr
    assert f"forgot session {ERASED}" in done.stdout
    assert files_holding(store, marker.encode()) == []
    assert not (store / "sessions" / ERASED).exists() and not (store / "pins" / ERASED).exists()
    event = proc.wait_event("session.forgotten")
    assert (event["sid"], event["uid"], event["pin"]) == (ERASED, accounts["users"]["admin"].pw_uid, False)
    assert event["versions"] == len(kept)

    rec = sgctl_json(proc.socket, "recover")
    assert [r for r in rec["sessions"] if r["sid"] == ERASED] == [] and not (d / f"{ERASED}.json").exists()
    assert ERASED not in {r["sid"] for r in sgctl_json(proc.socket, "list")["sessions"]}
    proc.stop()  # a clean stop writes the daemon's own files: still nothing of the session
    assert files_holding(store, marker.encode()) == []


def test_forget_before_keeps_the_newer_versions_and_the_pin(sdir: Path, daemons: StartDaemon) -> None:
    d = sdir
    wipe(d, KEPT, 30)
    proc = watching(daemons, d)
    wipe(d, KEPT, 20)
    proc.sync()
    cut = next_second()
    wipe(d, KEPT, 10)
    proc.sync()
    wipe(d, KEPT, 0)
    proc.sync()
    store = store_of(d)
    old, *newer = store_versions(store, KEPT)
    assert [v.count for v in (old, *newer)] == [30, 20, 10]
    p = sgctl(proc.socket, "forget", KEPT, "--before", local_when(cut))
    assert p.returncode == 0, p.stderr
    assert "removed 1 file" in p.stdout
    assert store_versions(store, KEPT) == newer and not old.path.exists()
    assert pin_count(d, KEPT) == 0, "the pin (the live state) stays"
    (row,) = sgctl_json(proc.socket, "recover", "--dry-run")["sessions"]
    assert (row["sid"], row["after"], row["outcome"]) == (KEPT, 10, "would restore")

    live = (d / f"{KEPT}.json").read_bytes()
    gone = sgctl_json(proc.socket, "forget", KEPT)
    assert (gone["removed"], gone["pin_removed"]) == (2, True)
    assert store_versions(store, KEPT) == [] and pin_count(d, KEPT) is None
    assert (d / f"{KEPT}.json").read_bytes() == live, "forget never touches the live file"


# -- 6. the store's README.txt, run by hand on a store the daemon made ------------------------------------

HAND = "abc123def456"


def test_the_store_readme_commands_print_a_version_never_a_pin_on_a_daemon_store(
        sdir: Path, daemons: StartDaemon) -> None:
    d = sdir
    wipe(d, HAND, 1000)
    proc = watching(daemons, d)
    for n in (10, 9, 0):  # the newest version (9 messages) is not the largest (1000)
        wipe(d, HAND, n)
        proc.sync()
    store = store_of(d)
    assert (store / "pins" / HAND).is_file(), "a pin exists, holding the wiped content"
    text = (store / "README.txt").read_text()
    recipe = text.split("Restore by hand")[1].split("With the daemon running")[0]
    cmds = [line.split("  #")[0].strip() for line in recipe.splitlines() if line.startswith("  ")]
    assert cmds[0] == "cd sessions/<sid>" and len(cmds) == 5, cmds
    cd = cmds[0].replace("<sid>", HAND)
    folder = store / "sessions" / HAND
    for env in ({"LC_ALL": "C"}, {"LC_ALL": "C.UTF-8"}):
        out = [subprocess.run(["bash", "-ec", f"{cd}\n{cmd}"], cwd=store, capture_output=True, text=True,
                              check=True, env={"PATH": "/usr/bin:/bin", **env}).stdout.strip() for cmd in cmds[1:3]]
        assert [o.split("_")[1] for o in out] == ["9msgs", "1000msgs"], out
        assert all(o.endswith(".version") and (folder / o).is_file() and "/" not in o for o in out), out
    proc.stop()  # "when the daemon is down"
    steps = [c.replace("<sid>", HAND).replace("<session dir>", str(d)).replace("<version>", out[0]) for c in cmds[3:]]
    subprocess.run(["bash", "-ec", "\n".join([cd, *steps])], cwd=store, check=True, timeout=60)
    assert (d / f"{HAND}.json").read_bytes() == (folder / out[0]).read_bytes()
    assert count(d, HAND) == 9 and not list(d.glob("*.restoring"))

"""Getting the conversation back (issue 12), end to end, the way an admin lives it.

Everything is real: ``sessionguardd`` as a process on a real socket,
``sessionguardctl`` as a subprocess (its exit codes and the commands it prints
are what is checked), and the test chat server (``tests/chatserver``) as a
process that behaves like the seed: metadata-only listing, an in-memory cache,
and the stale-``active_stream_id`` repair that saves a metadata-only object as
``messages: []``. Files are read from disk, never through the daemon. The
README's "Recovering after an incident" is followed here command by command;
``list``, ``forget`` and the store's README.txt are in test_recovery_admin.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sessionguard
from chatserver import ChatServer, Session, make_session, serialize
from daemonproc import DaemonProc
from sghelpers import (
    count_of,
    local_when,
    next_second,
    printed_command,
    run_printed,
    seed_write,
    sgctl,
    sgctl_json,
    store_of,
    store_versions,
    tree,
)

STREAM = "stream-7f3a"
#: ``daemons(*args)`` (conftest): a started sessionguardd, stopped after the test.
StartDaemon = Callable[..., DaemonProc]


def count(d: Path, sid: str) -> int:
    return count_of(d / f"{sid}.json")


def watching(daemons: StartDaemon, *dirs: Path) -> DaemonProc:
    return daemons(*[a for d in dirs for a in ("--watch", str(d))])


def crash_mid_stream(d: Path, sid: str) -> bytes:
    """The server's last save before it died mid-stream: the session as it was, with the stream recorded."""
    session = Session.from_dict(json.loads((d / f"{sid}.json").read_bytes()))
    session.active_stream_id, session.pending_user_message = STREAM, "and then?"
    return seed_write(d, session)


def undo_then_wipe(d: Path, sid: str, sync: Callable[[], None]) -> bytes:
    """1000 messages; the user undoes the last exchange (998, intent key changed); the server dies
    mid-stream; its next start lists sessions and the stale-stream repair wipes the session.
    Returns the bytes just before the wipe: what a restore must bring back."""
    seed_write(d, make_session(sid, 1000, intentional_shrink_generation="isg-0", clear_generation="cg-0"))
    sync()
    with ChatServer(d) as srv:
        assert srv.post(f"/sessions/{sid}/undo")["message_count"] == 998
        assert srv.stop() == 0
    sync()
    stale = crash_mid_stream(d, sid)
    sync()
    with ChatServer(d) as srv:
        srv.get("/sessions")  # metadata-only load, the stale stream "repaired": saved with no messages
        assert srv.stop() == 0
    assert count(d, sid) == 0
    sync()
    return stale


# -- 1. one rule: undo, then wipe --------------------------------------------------------------------

def test_undo_then_wipe_restore_recover_and_startup_recovery_all_bring_back_the_undo(
        tmp_path: Path, daemons: StartDaemon) -> None:
    dirs = {sid: tmp_path / name for sid, name in
            (("a00000000001", "byrestore"), ("b00000000002", "byrecover"), ("c00000000003", "bylibrary"))}
    for where in dirs.values():
        where.mkdir()
    d = watching(daemons, *dirs.values())
    stale = {sid: undo_then_wipe(where, sid, d.sync) for sid, where in dirs.items()}
    a, b, c = dirs
    sock = d.socket

    hist = sgctl_json(sock, "history", a)
    assert [(v["reason"], v["count"]) for v in hist["versions"]] == [("intended", 1000), ("shrink", 998)]
    pick, most = hist["versions"][1], hist["versions"][0]
    assert (hist["restore"], hist["most"]) == (pick["id"], most["id"])
    human = sgctl(sock, "history", a).stdout.splitlines()
    assert human[1].split()[:4] == ["M", most["id"], "just", "now"] and " 1000 " in human[1], human
    assert human[2].split()[:2] == ["R", pick["id"]] and " 998 " in human[2], human
    shown = sgctl_json(sock, "show", a)
    diff = sgctl_json(sock, "diff", a)
    assert (shown["id"], shown["count"]) == (pick["id"], 998)
    assert (diff["version"]["id"], diff["version_count"], diff["missing_count"], diff["live_count"]) == (
        pick["id"], 998, 998, 0)
    picked_bytes = (store_of(dirs[a]) / "sessions" / a / pick["name"]).read_bytes()
    assert picked_bytes == stale[a]

    p = sgctl(sock, "restore", a)
    assert p.returncode == 0, p.stderr
    assert "998 messages" in p.stdout
    assert (dirs[a] / f"{a}.json").read_bytes() == stale[a], "the post-undo state, byte for byte"
    assert json.loads(stale[a])["active_stream_id"] == STREAM, "restored bytes still carry the trigger"

    p = sgctl(sock, "--watch", str(dirs[b]), "recover")
    assert p.returncode == 0, p.stderr
    (row,) = [line for line in p.stdout.splitlines() if line.startswith(b)]
    assert "0 → 998" in row and "restored" in row
    assert (dirs[b] / f"{b}.json").read_bytes() == stale[b]
    assert count(dirs[c], c) == 0, "recover --watch touched another watch"

    guard = sessionguard.Guard(dirs[c])
    try:
        report = guard.recover_on_startup()
    finally:
        guard.close()
    assert [(r.sid, r.version.count, r.count_before) for r in report.restored] == [(c, 998, 0)]
    assert (dirs[c] / f"{c}.json").read_bytes() == stale[c]

    most_run = sgctl(sock, "restore", a, "--most", "--dry-run")
    assert most_run.returncode == 0 and "1000 messages" in most_run.stdout, most_run.stdout
    assert [v.reason for v in store_versions(store_of(dirs[a]), a)] == ["intended", "shrink", "pre-restore"]


# -- 2. incident recovery in one command ---------------------------------------------------------------

WIPED = ("aa0000000001", "aa0000000002", "aa0000000003")
IN_PLACE, DELETED, INTENDED, GROWN, OLDER = "bb0000000004", "cc0000000005", "dd0000000006", "ee0000000007", \
    "ff0000000008"


def incident(d: Path, sync: Callable[[], None]) -> float:
    """Before the cut: one session wiped (an older, unrelated loss). After it, the bad release:
    three sessions wiped by the stale-stream repair, one truncated in place by another tool, one
    deleted, one truncated on purpose, one wiped and then grown past its old count. Returns the cut."""
    for sid in WIPED:
        seed_write(d, make_session(sid, 40, active_stream_id=STREAM))
    for sid, n in ((IN_PLACE, 30), (DELETED, 25), (INTENDED, 20), (GROWN, 20), (OLDER, 10)):
        seed_write(d, make_session(sid, n, intentional_shrink_generation="isg-0"))
    sync()
    seed_write(d, make_session(OLDER, 0, intentional_shrink_generation="isg-0"))
    sync()
    cut = next_second()
    with ChatServer(d) as srv:
        srv.get("/sessions")  # the buggy release: every stale stream wiped
        assert srv.post(f"/sessions/{INTENDED}/truncate", {"keep": 5})["message_count"] == 5
        assert srv.stop() == 0
    with open(d / f"{IN_PLACE}.json", "r+b") as f:  # an in-place writer: same inode, fewer messages
        f.write(serialize(make_session(IN_PLACE, 12, intentional_shrink_generation="isg-0")))
        f.truncate()
    os.unlink(d / f"{DELETED}.json")
    seed_write(d, make_session(GROWN, 0, intentional_shrink_generation="isg-0"))
    sync()
    seed_write(d, make_session(GROWN, 21, intentional_shrink_generation="isg-0"))
    sync()
    return cut


def live_state(d: Path, sids: tuple[str, ...]) -> dict[str, bytes | None]:
    return {sid: (d / f"{sid}.json").read_bytes() if (d / f"{sid}.json").exists() else None for sid in sids}


def test_recover_since_restores_exactly_the_damaged_and_one_printed_command_undoes_it(
        sdir: Path, daemons: StartDaemon) -> None:
    d = sdir
    proc = watching(daemons, d)
    sock = proc.socket
    cut = incident(d, proc.sync)
    five = (*WIPED, IN_PLACE, DELETED)
    everyone = (*five, INTENDED, GROWN, OLDER)
    before = live_state(d, everyone)
    assert before[DELETED] is None

    untouched = tree(d)
    dry = sgctl_json(sock, "recover", "--since", "10m", "--dry-run")
    assert dry["dry_run"] and dry["run"] is None
    assert {r["sid"]: r["outcome"] for r in dry["sessions"]} == {
        **dict.fromkeys((*WIPED, IN_PLACE, OLDER), "would restore"), DELETED: "would recreate",
        INTENDED: "left alone", GROWN: "left alone"}
    counts = {r["sid"]: (r["before"], r["after"]) for r in dry["sessions"]}
    assert [counts[s] for s in (*WIPED, IN_PLACE, DELETED, OLDER)] == [(0, 40)] * 3 + [(12, 30), (None, 25), (0, 10)]
    assert all(r["version"] == sgctl_json(sock, "history", r["sid"])["restore"] for r in dry["sessions"]
               if r["outcome"] != "left alone")
    assert {r["sid"]: r["why"] for r in dry["sessions"] if r["why"]}.keys() == {INTENDED, GROWN}
    human_dry = sgctl(sock, "recover", "--since", "10m", "--dry-run")
    assert human_dry.returncode == 0 and "dry run: nothing was changed" in human_dry.stdout
    assert tree(d) == untouched, "a dry run changes nothing, in the directory or the store"

    p = sgctl(sock, "recover", "--since", local_when(cut))
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines()[1:] if line[:12] in everyone}
    assert set(rows) == {*five, INTENDED, GROWN}, p.stdout  # the older loss is before WHEN: not even listed
    for sid, n in ((WIPED[0], 40), (WIPED[1], 40), (WIPED[2], 40), (IN_PLACE, 30)):
        assert f"→ {n}" in rows[sid] and "restored" in rows[sid], rows[sid]
        assert count(d, sid) == n
    assert "→ 25" in rows[DELETED] and "recreated" in rows[DELETED] and count(d, DELETED) == 25
    assert "left alone" in rows[INTENDED] and "intended" in rows[INTENDED]
    assert "left alone" in rows[GROWN] and "grown past" in rows[GROWN]
    assert live_state(d, (INTENDED, GROWN, OLDER)) == {s: before[s] for s in (INTENDED, GROWN, OLDER)}
    event = proc.wait_event("recover.completed", lambda e: not e["dry_run"])
    assert (event["restored"], event["uid"]) == (5, os.getuid())

    undo = printed_command(p.stdout, "to undo this whole run:")
    assert undo.startswith("sessionguardctl ") and " recover --undo " in undo
    proc.sync()
    u = run_printed(undo)
    assert u.returncode == 0, (undo, u.stdout, u.stderr)
    assert live_state(d, everyone) == before, "every session as it was before recover, byte for byte"
    proc.wait_event("recover.undone")


# -- 3. a caching server undoes a restore; the README procedure gets the conversation back -------------

CACHED = "abc123def456"
HINT = "stop the server (or make it reload the session)"


def wiped_by_a_running_server(d: Path, daemons: StartDaemon, srv: ChatServer) -> tuple[DaemonProc, bytes]:
    """A 1000-message session with a stale stream, wiped by the first listing of *srv* (started here
    on *d*), which keeps running with the wiped session in its cache. Returns the daemon and the original."""
    original = seed_write(d, make_session(CACHED, 1000, active_stream_id=STREAM))
    proc = watching(daemons, d)
    srv.start()
    srv.get("/sessions")
    assert count(d, CACHED) == 0
    proc.sync()
    return proc, original


def restore_undone_by_the_server(d: Path, proc: DaemonProc, srv: ChatServer, original: bytes) -> dict[str, Any]:
    """``sessionguardctl restore`` while the server runs, then its next save (a rename) of the cached
    object; the ``restore.overwritten`` event."""
    p = sgctl(proc.socket, "restore", CACHED)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^note: the session file was written \d+ s ago: .*" + re.escape(HINT), p.stdout, re.M), p.stdout
    assert (d / f"{CACHED}.json").read_bytes() == original
    restored = sgctl_json(proc.socket, "history", CACHED)["versions"][0]["id"]
    assert srv.get(f"/sessions/{CACHED}")["messages"] == [], "the server answers from its cache"
    assert srv.post(f"/sessions/{CACHED}/rename", {"title": "renamed"})["message_count"] == 0
    event = proc.wait_event("restore.overwritten")
    assert (event["level"], event["sid"], event["before"], event["after"], event["restored_version"]) == (
        "error", CACHED, 1000, 0, restored)
    assert isinstance(event["seconds_since_restore"], float) and event["seconds_since_restore"] >= 0
    proc.sync()
    return event


def test_a_caching_server_undoes_a_restore_and_the_readme_procedure_gets_it_back(
        sdir: Path, daemons: StartDaemon) -> None:
    srv = ChatServer(sdir)
    try:
        caching_server_story(sdir, daemons, srv)
    finally:
        srv.close()


def caching_server_story(d: Path, daemons: StartDaemon, srv: ChatServer) -> None:
    proc, original = wiped_by_a_running_server(d, daemons, srv)
    sock = proc.socket
    event = restore_undone_by_the_server(d, proc, srv, original)
    versions = sgctl_json(sock, "history", CACHED)["versions"]
    assert [(v["reason"], v["count"]) for v in versions] == [("shrink", 1000), ("pre-restore", 0), ("shrink", 1000)]
    assert versions[-1]["id"] == event["restored_version"], "the content undone is kept again"
    (row,) = sgctl_json(sock, "list")["sessions"]
    assert (row["state"], row["count"], row["overwritten"]["restored_count"], row["overwritten"]["count_after"]
            ) == ("shrunk", 0, 1000, 0)
    assert "shrunk, restore undone!" in sgctl(sock, "list").stdout
    (flag,) = sgctl_json(sock, "status")["overwritten_restores"]
    assert (flag["sid"], flag["restored_count"], flag["count_after"]) == (CACHED, 1000, 0)
    status = sgctl(sock, "status")
    assert f"Undone restore: {CACHED}" in status.stdout and HINT in status.stdout
    again = sgctl(sock, "restore", CACHED, "--dry-run")
    assert again.returncode == 5 and "was undone by a writer" in again.stdout and HINT in again.stdout

    # The README procedure: stop the server, recover, start it, open the session before any listing.
    assert srv.stop() == 0
    dry = sgctl(sock, "recover", "--since", "2h", "--dry-run")
    assert dry.returncode == 5 and "would restore, restore undone!" in dry.stdout and HINT in dry.stdout
    assert count(d, CACHED) == 0
    rec = sgctl(sock, "recover", "--since", "2h")
    assert rec.returncode == 5 and "0 → 1000" in rec.stdout and "restored, restore undone!" in rec.stdout
    assert rec.stdout.startswith("note: the session file was written "), rec.stdout
    assert (d / f"{CACHED}.json").read_bytes() == original, "the restored file still has the stale stream"
    srv.start()
    assert len(srv.get(f"/sessions/{CACHED}")["messages"]) == 1000
    srv.get("/sessions")
    assert count(d, CACHED) == 1000
    assert json.loads((d / f"{CACHED}.json").read_bytes())["active_stream_id"] is None
    proc.sync()
    assert sgctl(sock, "list", "--shrunk").stdout.strip() == "no sessions whose latest change is a loss"
    assert len(srv.get(f"/sessions/{CACHED}")["messages"]) == 1000

    # The flag stands until the conversation grows past the restored count.
    assert srv.post(f"/sessions/{CACHED}/messages", {"role": "user", "content": "I'm back"})["message_count"] == 1001
    proc.sync()
    assert sgctl_json(sock, "status")["overwritten_restores"] == []
    assert "restore undone" not in sgctl(sock, "list").stdout


def test_the_undone_flag_clears_once_the_readme_procedure_has_restored_the_session(
        sdir: Path, daemons: StartDaemon) -> None:
    srv = ChatServer(sdir)
    try:
        proc, original = wiped_by_a_running_server(sdir, daemons, srv)
        undone_flag_story(sdir, proc, srv, original)
    finally:
        srv.close()


def undone_flag_story(d: Path, proc: DaemonProc, srv: ChatServer, original: bytes) -> None:
    restore_undone_by_the_server(d, proc, srv, original)
    assert srv.stop() == 0
    assert sgctl(proc.socket, "recover", "--since", "2h").returncode == 5  # says what happened before
    srv.start()
    assert len(srv.get(f"/sessions/{CACHED}")["messages"]) == 1000
    srv.get("/sessions")
    proc.sync()
    assert count(d, CACHED) == 1000
    assert sgctl_json(proc.socket, "status")["overwritten_restores"] == []
    (row,) = sgctl_json(proc.socket, "list")["sessions"]
    assert row["overwritten"] is None and "restore undone" not in sgctl(proc.socket, "list").stdout


def test_recover_rows_say_unparseable_only_for_unparseable_files(sdir: Path, daemons: StartDaemon) -> None:
    d = sdir
    for sid, n in ((DELETED, 25), (IN_PLACE, 30), (INTENDED, 20)):
        seed_write(d, make_session(sid, n, intentional_shrink_generation="isg-0"))
    proc = watching(daemons, d)
    os.unlink(d / f"{DELETED}.json")
    (d / f"{IN_PLACE}.json").write_bytes(b'{"session_id": "torn", "messages": [')
    seed_write(d, make_session(INTENDED, 5, intentional_shrink_generation="isg-1"))
    proc.sync()
    p = sgctl(proc.socket, "recover", "--dry-run")
    assert p.returncode == 0, p.stderr
    lines = {line.split()[0]: line for line in p.stdout.splitlines() if line[:12] in (DELETED, IN_PLACE, INTENDED)}
    assert "unparseable → 30" in lines[IN_PLACE] and "would restore" in lines[IN_PLACE]
    assert "left alone" in lines[INTENDED] and "unparseable" not in lines[INTENDED], lines[INTENDED]
    assert "→ 25" in lines[DELETED] and "unparseable" not in lines[DELETED], lines[DELETED]

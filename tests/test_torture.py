"""The oracle ("torture") harness (tests/torture.py) in CI: short, bounded runs.

Each run asserts that nothing the oracle expects is lost, *and* that the run
exercised what it claims (shrinks, expected versions per write style, kills,
pin checks), so a broken harness cannot pass vacuously. The oracle itself is
shown to fail when versions are taken out of the store. The long run is
``scripts/soak --minutes N``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import torture
from daemonproc import DaemonProc
from sghelpers import make_session, server_write
from torture_disk import TMP_MARK, ZSTD_MAGIC, cache_entries, check_cache, pin_matches
from torture_oracle import FAILURE_KEYS, check, describe
from torture_plan import Plan, Run
from torture_writers import STYLES


def assert_nothing_lost(figs: dict) -> None:
    """Every failure the oracle knows (torture_oracle.FAILURE_KEYS) is zero, and every
    version's bytes were checked against its name."""
    report = describe(figs)
    for key in FAILURE_KEYS:
        assert figs.get(key, 0) == 0, f"{key}:\n{report}"
    assert figs["version_checks"] == figs["store_versions"], report


@pytest.fixture(scope="module")
def daemon_run(tmp_path_factory) -> Run:
    """4 writers (one per style) x 8 sessions under one daemon that is never killed."""
    return torture.run(Plan(seconds=30, kills=False), tmp_path_factory.mktemp("torture"))


@pytest.fixture(scope="module")
def library_run(tmp_path_factory) -> Run:
    """Three library writers and no daemon at all."""
    plan = Plan(seconds=15, styles=("library",) * 3, daemon=False)
    return torture.run(plan, tmp_path_factory.mktemp("torture-lib"))


def test_nothing_lost_under_the_daemon(daemon_run):
    figs = check(daemon_run)
    print(describe(figs, details=False))
    assert_nothing_lost(figs)
    assert figs["shrinks"] >= 40, "the writers hardly shrank anything: the run proves little"
    assert figs["expected"] >= 25
    for style in STYLES:
        assert figs["by_style"][style]["expected"] >= 2, f"{style}: too few expected versions to mean anything"
    assert figs["pin_checks"] >= 10 and figs["lag_samples"] >= 10
    # issue 10 item 8: in-place rewrites race the reads that name a version; every name still tells the truth
    assert figs["version_checks_by_style"]["inplace"] >= 2, "too few in-place writers' versions to check"


def test_nothing_lost_in_a_sigkill_storm(tmp_path):
    figs = torture.run_and_check(Plan(seconds=35, kills=True), tmp_path)
    print(describe(figs, details=False))
    assert_nothing_lost(figs)
    assert figs["daemon_kills"] >= 10 and figs["daemon_restarts"] == figs["daemon_kills"]
    planted = figs["tmp_planted_by_place"]
    for place in ("pins", "store", "session_dir"):  # and a version folder once one exists
        assert planted[place] == figs["daemon_kills"], f"each restart must have had a tmp file in {place} to sweep"
    assert planted["version_folder"] >= 1
    assert figs["pin_checks"] >= 50, "too few files unchanged across restarts to check their pins"
    assert figs["shrinks"] >= 40 and figs["expected"] >= 20


def test_nothing_lost_with_compressed_pins_in_a_sigkill_storm(tmp_path):
    """The storm again with ``pin = "zstd"``: the oracle decompresses every pin itself, so a
    compressed pin that holds other bytes than its file claims (or none) shows as a missing pin
    or a lost version, as a plain one would."""
    figs = torture.run_and_check(Plan(seconds=20, kills=True, pin="zstd"), tmp_path)
    print(describe(figs, details=False))
    assert_nothing_lost(figs)
    pins = [p.read_bytes()[:4] for p in (tmp_path / "sessions" / ".sessionguard" / "pins").iterdir()
            if TMP_MARK not in p.name and p.is_file()]
    # the daemon's pins are compressed (a library writer's link pins are its live files)
    assert sum(head == ZSTD_MAGIC for head in pins) >= 10, "the run did not use compressed pins"
    assert figs["daemon_kills"] >= 5 and figs["pin_checks"] >= 20
    assert figs["shrinks"] >= 20 and figs["expected"] >= 10


FILLER = 20_000


def test_kills_during_first_scans_leave_no_false_pin_and_lose_nothing(tmp_path):
    """Issue 15: the start-up scan over 20,000 sessions (seconds long) is ended at a random point
    three times — by SIGKILL as a power cut or the start timeout's final kill would, or (one time
    in three) by SIGTERM as a stop would — while the writers write; after each, a few sessions
    the ended scan had pinned are wiped. Then a start is let through. Pins claim nothing by name,
    so: every pin of a file unchanged across the kills equals it, ``pins.cache`` is absent after a
    kill or true where it would be believed, no tmp file is left, every wiped session's pinned
    bytes are kept, nothing the oracle expects is lost."""
    figs = torture.run_and_check(Plan(seconds=10, kills=False, filler=FILLER, first_scan_kills=3), tmp_path)
    print(describe(figs, details=False))
    assert_nothing_lost(figs)
    # a kill aimed past the end of a scan is one after it (the daemon was up: a restart), and does not count
    assert figs["scan_kills"] == 3 and figs["daemon_restarts"] == figs["kills_by_plan"].get("first-scan-missed", 0)
    # the scans reported progress, each report asking systemd for more time
    assert figs["scan_progress_reports"] >= 1 and figs["scan_reports_without_extend"] == 0
    assert max(figs["scan_kill_points"]) > 0, "no kill landed after the scan had pinned anything"
    # past its first 1,000 new pins a scan pins with two child processes; none outlives its daemon
    # (test_scanpool kills a daemon among them on purpose; here the random kills land where they do)
    assert figs["scan_children_outlived"] == []
    assert figs["pinned_then_wiped_checked"] >= 1
    assert figs["pin_checks"] >= FILLER - figs["pinned_then_wiped_checked"], "every untouched session checked"
    cache = figs["cache"]
    assert cache["checks_after_kill"] == figs["daemon_kills"] and cache["present_clean_stop"] == 1
    assert cache["believed_clean_stop"] >= FILLER, "the clean stop's cache was checked entry by entry"
    planted = figs["tmp_planted_by_place"]
    assert all(planted[p] == figs["daemon_kills"] for p in ("pins", "store", "session_dir")), planted
    assert figs["shrinks"] >= 10 and figs["version_checks_by_style"]["filler"] >= 1


def test_library_keeps_every_version_without_settle_time_or_daemon(library_run):
    figs = check(library_run)
    print(describe(figs, details=False))
    assert_nothing_lost(figs)
    assert figs["expected"] >= 12
    # versions replaced within the settle time were kept too: the library needs none
    assert figs["expected_unsettled"] >= 5
    assert figs["found"] == figs["expected"]


@pytest.mark.parametrize("which", ["daemon_run", "library_run"])
def test_the_oracle_reports_versions_taken_out_of_the_store(which, request, tmp_path):
    """Move expected versions (and one session's every copy) out of the store: the
    oracle must name exactly those as lost, then nothing once they are back."""
    run: Run = request.getfixturevalue(which)
    items = [i for i in check(run)["expected_items"]
             if i["paths"] and all(p.endswith(".version") for p in i["paths"])]
    assert len(items) >= 4, "not enough expected versions kept as .version files to remove"
    removed = items[:: max(1, len(items) // 4)][:4]
    victim = next(i["sid"] for i in items if i["sid"] not in {r["sid"] for r in removed})
    moves = [(Path(p), tmp_path / f"{n}-{Path(p).name}") for n, i in enumerate(removed) for p in i["paths"]]
    # every copy of the victim: its versions' folder, its pin (pins/<sid> in format 2), its live file
    for src, name in ((run.store / "sessions" / victim, "folder"), (run.store / "pins" / victim, "pin"),
                      (run.sdir / f"{victim}.json", "live")):
        if src.exists():
            moves.append((src, tmp_path / f"victim-{name}"))
    for src, dst in moves:
        shutil.move(src, dst)
    try:
        figs = check(run)
    finally:
        for src, dst in reversed(moves):  # a folder comes back before what was taken out of it
            shutil.move(dst, src)
    lost = {(d["sid"], d["sha"]) for d in figs["lost_details"]}
    assert {(i["sid"], i["sha"]) for i in removed} <= lost
    assert {sid for sid, _ in lost} <= {i["sid"] for i in removed} | {victim}
    assert any(sid == victim for sid, _ in lost) and figs["high_water_lost"] >= 1
    assert check(run)["lost"] == 0


def test_the_oracle_catches_a_lying_version_name_a_lying_cache_and_a_lost_pinned_version(daemon_run):
    """The checks beyond "lost" can fail too: a version renamed to claim one message more, a
    pin whose bytes changed while its identity (size, mtime) stayed what ``pins.cache`` says,
    and a pinned-then-wiped session whose pinned bytes are nowhere are each reported, exactly."""
    run: Run = daemon_run
    before = check_cache(run.store, run.sdir)
    assert before["present"] and before["believed"] >= 10 and before["wrong"] == [], before
    version = next(p for p in sorted((run.store / "sessions").rglob("*.version")) if "msgs_" in p.name)
    n = re.search(r"_(\d+)msgs_", version.name)
    assert n is not None
    liar = version.with_name(version.name.replace(n[0], f"_{int(n[1]) + 1}msgs_", 1))
    sid = next(s for s in sorted(cache_entries((run.store / "pins.cache").read_bytes()))
               if pin_matches(run.store, run.sdir, s) and b"lorem" in (run.store / "pins" / s).read_bytes())
    pin = run.store / "pins" / sid
    data, st = pin.read_bytes(), pin.stat()
    wiped = run.supervisor["pinned_then_wiped"]
    os.rename(version, liar)
    at = data.rindex(b"lorem")
    pin.write_bytes(data[:at] + b"LOREM" + data[at + 5:])  # same size, same mtime, other bytes
    os.utime(pin, ns=(st.st_atime_ns, st.st_mtime_ns))
    run.supervisor["pinned_then_wiped"] = [*wiped, [sid, "0" * 64]]
    try:
        figs = check(run)
        cache = check_cache(run.store, run.sdir)
    finally:
        os.rename(liar, version)
        pin.write_bytes(data)
        os.utime(pin, ns=(st.st_atime_ns, st.st_mtime_ns))
        run.supervisor["pinned_then_wiped"] = wiped
    assert figs["version_mismatches"] == 1 and liar.name in figs["version_mismatch_details"][0]
    assert figs["pinned_then_wiped_lost"] == 1 and sid in figs["pinned_then_wiped_lost_details"][0]
    assert len(cache["wrong"]) == 1 and cache["wrong"][0].startswith(f"{sid}:"), cache
    assert check(run)["version_mismatches"] == 0 and check_cache(run.store, run.sdir)["wrong"] == []


def test_a_shrink_regrown_while_the_daemon_was_down_keeps_the_lost_messages(tmp_path):
    """The daemon pinned 10 messages; while it was down the server dropped the last 4
    (regenerate) and wrote a longer answer: 6 + 6 = 12 messages. At restart the scan
    sees 10 -> 12, "grew", moves the pin, and messages 6..9 exist nowhere any more."""
    sdir = tmp_path / "sessions"
    sdir.mkdir()
    sid = "abc123def456"
    path = sdir / f"{sid}.json"
    doc = make_session(10, sid)
    d = DaemonProc(tmp_path, ["--watch", str(sdir)]).started()
    try:
        server_write(path, doc)
        d.sync()
    finally:
        d.kill()
    dropped = doc["messages"][6:]
    doc["messages"] = doc["messages"][:6]
    server_write(path, doc)  # the shrink nobody saw
    doc["messages"] += [dict(m, content="regenerated " + m["content"]) for m in make_session(6, sid)["messages"]]
    server_write(path, doc)
    d = DaemonProc(tmp_path, ["--watch", str(sdir)]).started()
    try:
        d.sync()
    finally:
        d.stop()
    store = sdir / ".sessionguard" / "sessions" / sid
    held = [f.read_bytes() for f in store.iterdir() if f.name != ".lock"] if store.is_dir() else []
    assert any(all(m["content"].encode() in data for m in dropped) for data in held)

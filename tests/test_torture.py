"""The oracle ("torture") harness (tests/torture.py) in CI: short, bounded runs.

Each run asserts that nothing the oracle expects is lost, *and* that the run
exercised what it claims (shrinks, expected versions per write style, kills,
pin checks), so a broken harness cannot pass vacuously. The oracle itself is
shown to fail when versions are taken out of the store. The long run is
``scripts/soak --minutes N``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import torture
from daemonproc import DaemonProc
from sghelpers import make_session, server_write


def assert_nothing_lost(figs: dict) -> None:
    report = torture.describe(figs)
    assert figs["lost"] == 0, report
    assert figs["high_water_lost"] == 0, report
    assert figs.get("tmp_after_restart", 0) == 0, report
    assert figs.get("missing_pins", 0) == 0, report


@pytest.fixture(scope="module")
def daemon_run(tmp_path_factory) -> torture.Run:
    """4 writers (one per style) x 8 sessions under one daemon that is never killed."""
    return torture.run(torture.Plan(seconds=30, kills=False), tmp_path_factory.mktemp("torture"))


@pytest.fixture(scope="module")
def library_run(tmp_path_factory) -> torture.Run:
    """Three library writers and no daemon at all."""
    plan = torture.Plan(seconds=15, styles=("library",) * 3, daemon=False)
    return torture.run(plan, tmp_path_factory.mktemp("torture-lib"))


def test_nothing_lost_under_the_daemon(daemon_run):
    figs = torture.check(daemon_run)
    print(torture.describe(figs, details=False))
    assert_nothing_lost(figs)
    assert figs["shrinks"] >= 40, "the writers hardly shrank anything: the run proves little"
    assert figs["expected"] >= 25
    for style in torture.STYLES:
        assert figs["by_style"][style]["expected"] >= 2, f"{style}: too few expected versions to mean anything"
    assert figs["pin_checks"] >= 10 and figs["lag_samples"] >= 10


def test_nothing_lost_in_a_sigkill_storm(tmp_path):
    figs = torture.run_and_check(torture.Plan(seconds=35, kills=True), tmp_path)
    print(torture.describe(figs, details=False))
    assert_nothing_lost(figs)
    assert figs["daemon_kills"] >= 10 and figs["daemon_restarts"] == figs["daemon_kills"]
    assert figs["tmp_planted"] == figs["daemon_kills"], "each restart must have had a tmp file to sweep"
    assert figs["pin_checks"] >= 50, "too few files unchanged across restarts to check their pins"
    assert figs["shrinks"] >= 40 and figs["expected"] >= 20


def test_library_keeps_every_version_without_settle_time_or_daemon(library_run):
    figs = torture.check(library_run)
    print(torture.describe(figs, details=False))
    assert_nothing_lost(figs)
    assert figs["expected"] >= 12
    # versions replaced within the settle time were kept too: the library needs none
    assert figs["expected_unsettled"] >= 5
    assert figs["found"] == figs["expected"]


@pytest.mark.parametrize("which", ["daemon_run", "library_run"])
def test_the_oracle_reports_versions_taken_out_of_the_store(which, request, tmp_path):
    """Move expected versions (and one session's every copy) out of the store: the
    oracle must name exactly those as lost, then nothing once they are back."""
    run: torture.Run = request.getfixturevalue(which)
    items = [i for i in torture.check(run)["expected_items"]
             if i["paths"] and all(p.endswith(".version") for p in i["paths"])]
    assert len(items) >= 4, "not enough expected versions kept as .version files to remove"
    removed = items[:: max(1, len(items) // 4)][:4]
    victim = next(i["sid"] for i in items if i["sid"] not in {r["sid"] for r in removed})
    moves = [(Path(p), tmp_path / f"{n}-{Path(p).name}") for n, i in enumerate(removed) for p in i["paths"]]
    folder = run.store / "sessions" / victim
    live = run.sdir / f"{victim}.json"
    moves.append((folder, tmp_path / "victim-folder"))
    if live.exists():
        moves.append((live, tmp_path / "victim-live"))
    for src, dst in moves:
        shutil.move(src, dst)
    try:
        figs = torture.check(run)
    finally:
        for src, dst in reversed(moves):  # a folder comes back before what was taken out of it
            shutil.move(dst, src)
    lost = {(d["sid"], d["sha"]) for d in figs["lost_details"]}
    assert {(i["sid"], i["sha"]) for i in removed} <= lost
    assert {sid for sid, _ in lost} <= {i["sid"] for i in removed} | {victim}
    assert any(sid == victim for sid, _ in lost) and figs["high_water_lost"] >= 1
    assert torture.check(run)["lost"] == 0


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

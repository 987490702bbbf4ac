"""A first start's new pins made by child processes (scanpool): what a child pins, what it
hands back to the daemon, a child that fails, and a daemon whose start uses them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from daemonproc import DaemonProc
from sessionguard import scanpool
from sessionguard.scanpool import BATCH, Pool, processes_for
from sessionguard.tracker import pin_new
from sessionguard.watchstate import Tracked, pin_key
from sghelpers import HeldElsewhere, make_session, needs_root
from test_pins_spare import pins_dir
from test_tracker import Env
from torture_supervisor import children_of, outliving


def body(sid: str, n: int = 5) -> bytes:
    return orjson.dumps(make_session(n, sid), option=orjson.OPT_INDENT_2)


def sessions(sdir: Path, count: int) -> list[str]:
    sids = [f"s{i:05d}abcdef" for i in range(count)]
    for sid in sids:
        (sdir / f"{sid}.json").write_bytes(body(sid))
    return sids


# -- pin_new: what a child does ------------------------------------------------------


def test_a_new_session_is_pinned_and_described(tmp_path: Path) -> None:
    env = Env(tmp_path)
    (tmp_path / "abc.json").write_bytes(body("abc", 7))
    got = pin_new(env.ws, ("abc.json",), "abc")
    assert got is not None and got.count == 7 and (got.first, got.prev) == (0, 0)
    pin = pins_dir(env.store) / "abc"
    assert pin.read_bytes() == body("abc", 7)
    assert got.pin == pin_key(os.lstat(pin))
    assert "abc" not in env.ws.files and env.log.events == []  # remembered and logged by the daemon only


def test_anything_but_a_plain_new_pin_is_handed_back_untouched(tmp_path: Path) -> None:
    """A pin that appeared meanwhile, a file over the size cap, a symlink, a FIFO: None,
    and nothing written (the daemon evaluates each itself, logs and all)."""
    env = Env(tmp_path, max_file_bytes=1000)
    (tmp_path / "had.json").write_bytes(body("had"))
    (pins_dir(env.store) / "had").write_bytes(b"the pin before")
    (tmp_path / "big.json").write_bytes(body("big", 50))
    (tmp_path / "link.json").symlink_to(tmp_path / "had.json")
    os.mkfifo(tmp_path / "fifo.json")
    for sid in ("had", "big", "link", "fifo"):
        assert pin_new(env.ws, (f"{sid}.json",), sid) is None, sid
    assert sorted(p.name for p in pins_dir(env.store).iterdir()) == ["had"]
    assert (pins_dir(env.store) / "had").read_bytes() == b"the pin before"


@needs_root
def test_someone_elses_hard_link_is_handed_back(tmp_path: Path) -> None:
    sdir = tmp_path / "s"
    sdir.mkdir()
    env = Env(sdir)
    secret = tmp_path / "secret"
    secret.write_bytes(body("x"))
    os.chown(secret, 4321, 4321)
    os.link(secret, sdir / "x.json")
    assert pin_new(env.ws, ("x.json",), "x") is None
    assert list(pins_dir(env.store).iterdir()) == []


def test_a_session_locked_elsewhere_is_handed_back(tmp_path: Path) -> None:
    env = Env(tmp_path)
    (tmp_path / "abc.json").write_bytes(body("abc"))
    with HeldElsewhere(env.store.where, "abc") as held:
        assert pin_new(env.ws, ("abc.json",), "abc") is None
        held.release()
    assert pin_new(env.ws, ("abc.json",), "abc") is not None


def test_processes_follow_the_setting() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert processes_for(1) == 0 and processes_for(3) == 3
    assert processes_for(0) == (min(cpus, scanpool.MAX_PROCESSES) if cpus > 1 else 0)


# -- the pool --------------------------------------------------------------------------


def test_a_failed_process_hands_back_what_it_had_not_answered(tmp_path: Path) -> None:
    """One of two children is stopped, given two batches, then killed: its names come back
    as None (the daemon pins them itself), the other's as pins; each name answered once."""
    env = Env(tmp_path)
    sids = sessions(tmp_path, 3 * BATCH)
    answers: dict[str, Tracked | None] = {}

    def answer(parts: tuple[str, ...], sid: str, tracked: Tracked | None) -> None:
        assert sid not in answers, f"{sid} answered twice"
        answers[sid] = tracked

    with env.store.locks.keeping():
        pool = Pool.start(env.ws, 2, answer, env.log)
        assert pool is not None
        stopped, running = pool.pids
        os.kill(stopped, signal.SIGSTOP)
        for sid in sids:  # batches 1 and 3 to the first child, 2 to the second
            pool.submit((f"{sid}.json",), sid)
        os.kill(stopped, signal.SIGKILL)
        pool.finish()
    assert sorted(answers) == sids
    handed_back = [sid for sid in sids if answers[sid] is None]
    assert handed_back == sids[:BATCH] + sids[2 * BATCH:]
    for sid in sids[BATCH:2 * BATCH]:
        t = answers[sid]
        assert t is not None and t.count == 5
        assert (pins_dir(env.store) / sid).read_bytes() == body(sid)
    assert not any((pins_dir(env.store) / sid).exists() for sid in handed_back)
    failed = [kw for _, event, kw in env.log.events if event == "scan.process_failed"]
    assert [kw["pid"] for kw in failed] == [stopped] and failed[0]["status"] == -signal.SIGKILL
    for pid in (stopped, running):
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: nothing left running or in the process table


def test_every_process_is_kept_busy(tmp_path: Path) -> None:
    """When every child has its fill of batches, the next goes to whichever answers first:
    with two children and sixteen batches each answers several (a pool that always waited
    on the first child left the second two batches and nothing more)."""
    env = Env(tmp_path)
    sids = sessions(tmp_path, 16 * BATCH)
    got: list[str] = []
    with env.store.locks.keeping():
        pool = Pool.start(env.ws, 2, lambda parts, sid, t: got.append(sid) if t is not None else None, env.log)
        assert pool is not None
        for sid in sids:
            pool.submit((f"{sid}.json",), sid)
        pool.finish()
    assert sorted(got) == sids
    assert sum(pool.answered.values()) == len(sids) and min(pool.answered.values()) >= 4 * BATCH, pool.answered


# -- a daemon's first start ---------------------------------------------------------------


@pytest.mark.parametrize("processes", [2, 1])
def test_a_first_start_pins_every_session_with_or_without_processes(tmp_path: Path, processes: int) -> None:
    """Past its first 1,000 new pins a first start hands the rest to its processes; what it
    ends with is the same as alone: every session pinned (a pin equal to its file) and
    remembered, and a wipe of any of them kept."""
    sdir = tmp_path / "s"
    sdir.mkdir()
    count = scanpool.SERIAL_FIRST + 3 * BATCH
    sids = sessions(sdir, count)
    d = DaemonProc(tmp_path, ["--watch", str(sdir), "--scan-processes", str(processes)])
    try:
        d.wait_event("daemon.started", timeout=120)
        done = d.events("scan.completed")[0]
        assert (done["new"], done["sessions"], done["files"]) == (count, count, count)
        started = d.events("scan.processes")
        assert [e["processes"] for e in started] == ([processes] if processes > 1 else [])
        store = sdir / ".sessionguard"
        assert all((store / "pins" / sid).read_bytes() == body(sid) for sid in sids)
        wiped = sids[-1]
        (sdir / f"{wiped}.json").write_bytes(orjson.dumps({"id": wiped, "messages": []}))
        kept = d.wait_event("version.kept", timeout=60)
        assert (kept["sid"], kept["count"]) == (wiped, 5)
    finally:
        d.stop()
    assert d.events("daemon.error") == [] and d.events("worker.error") == []


def test_a_daemon_killed_while_its_processes_pin_leaves_none_running_and_no_false_pin(tmp_path: Path) -> None:
    """SIGKILL the daemon as soon as it says its processes started: they die with it (none is
    left running or able to write), every pin left holds exactly its session's bytes, and
    the next start pins the rest."""
    sdir = tmp_path / "s"
    sdir.mkdir()
    sids = sessions(sdir, scanpool.SERIAL_FIRST + 16 * BATCH)
    d = DaemonProc(tmp_path, ["--watch", str(sdir), "--scan-processes", "2"])
    try:
        pids = d.wait_event("scan.processes", timeout=120)["pids"]
    finally:
        d.kill()
    assert len(pids) == 2 and outliving(pids, 10) == []
    pinned = sorted(p.name for p in (sdir / ".sessionguard" / "pins").iterdir())
    assert set(pinned) <= set(sids) and len(pinned) < len(sids), "killed after the scan: proves nothing"
    assert all((sdir / ".sessionguard" / "pins" / sid).read_bytes() == body(sid) for sid in pinned)
    d = DaemonProc(tmp_path, ["--watch", str(sdir), "--scan-processes", "2"])
    try:
        d.wait_event("daemon.started", timeout=120)
        assert all((sdir / ".sessionguard" / "pins" / sid).read_bytes() == body(sid) for sid in sids)
    finally:
        d.stop()


_ORPHANING = r"""
import os, sys, time
from pathlib import Path
sys.path[:0] = sys.argv[2:]
from test_scanpool import BATCH, sessions
from test_pins_spare import pins_dir
from test_tracker import Env
from sessionguard.scanpool import Pool
env = Env(Path(sys.argv[1]))
pool = Pool.start(env.ws, 2, lambda *a: None, env.log)
sids = iter(sessions(Path(sys.argv[1]), 40 * BATCH))
while min(pool.answered.values()) == 0:  # both past their start (which checks for a parent)
    for _ in range(BATCH):
        sid = next(sids)
        pool.submit((sid + ".json",), sid)
if os.fork() == 0:  # holds the pipes to the processes open: their input never ends
    time.sleep(120)
    os._exit(0)
print(" ".join(map(str, pool.pids)), flush=True)
time.sleep(120)
"""


def test_the_processes_die_with_their_daemon_even_if_their_input_stays_open(tmp_path: Path) -> None:
    """A daemon killed while a process of its own that it forked meanwhile (or anything else)
    still holds the processes' pipes: they must not wait for an end of input that never
    comes — they die with the daemon (PR_SET_PDEATHSIG)."""
    tests = str(Path(__file__).parent)
    helper = subprocess.Popen([sys.executable, "-c", _ORPHANING, str(tmp_path), tests, *sys.path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout is not None
        pids = [int(p) for p in helper.stdout.readline().split()]
        assert len(pids) == 2 and outliving(pids, 0) == pids
        holder = [p for p in children_of(helper.pid) if p not in pids]
        helper.kill()
        helper.wait()
        assert outliving(pids, 10) == []
    finally:
        helper.kill()
        for pid in holder if "holder" in locals() else []:
            os.kill(pid, signal.SIGKILL)

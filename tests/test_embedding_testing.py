"""``sessionguard.testing`` as a server's test suite uses it: the loss check and crashes mid-save.

Real processes throughout: the chat server (guarded and not), the daemon,
a second pytest run with the plugin enabled by one conftest line, and
children killed with SIGKILL between their write and their rename.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import sessionguard
from chatserver import ChatServer, make_session, serialize
from chatserver.seedio import write_atomic
from embedhelpers import SID, log_lines, on_disk, restore_on_disk, write
from sessionguard.testing import crash_guard_save, kill_before_rename, no_unintended_loss

# -- sessionguard.testing: no unintended loss -------------------------------------------------

def test_no_unintended_loss_names_the_session_a_guarded_server_shrank(sdir: Path, guarded: ChatServer) -> None:
    """Intended shrinks and a refused save pass the check. Then the guarded server's cache outlives
    another writer's change (two more messages): its next save writes the cached ten without intent.
    The guard keeps the version in the server's process; the check, reading the store, names it."""
    path = sdir / f"{SID}.json"
    write(sdir, make_session(SID, 10, intentional_shrink_generation="isg-0"))
    write(sdir, make_session("fedcba987654", 6))
    write(sdir, make_session("0123456789ab", 1000, active_stream_id="stream-1"))
    guarded.start()
    with no_unintended_loss(sdir):
        guarded.get("/sessions")  # the stale stream's metadata-only save: refused, nothing lost
        guarded.post("/sessions/fedcba987654/undo")
        guarded.post("/sessions/fedcba987654/clear")
        assert len(guarded.get(f"/sessions/{SID}")["messages"]) == 10
    assert guarded.get("/debug/stats")["saves"] == {"ok": 2, "failed": 1}

    restore_on_disk(path, serialize(make_session(SID, 12, intentional_shrink_generation="isg-0")))
    with pytest.raises(AssertionError) as failed, no_unintended_loss(sdir):
        guarded.post(f"/sessions/{SID}/rename", {"title": "renamed"})  # writes the cached ten
    message = str(failed.value)
    assert message.startswith(f"1 unintended loss(es) in {sdir}:\n  session {SID!r}: a write lost messages: "
                              "the 12 messages it replaced were kept as a 'shrink' version by the library ("), message
    assert "0123456789ab" not in message and "fedcba987654" not in message


def test_no_unintended_loss_sees_writers_that_bypass_every_guard(sdir: Path) -> None:
    """The unguarded seed's wipe (no store at all) is judged against the file as the block found it;
    a wipe after a guarded save against the guard's pin; a delete only with ``allow_delete=False``."""
    path = sdir / f"{SID}.json"
    write(sdir, make_session(SID, 30, active_stream_id="stream-1"))
    with pytest.raises(AssertionError, match=rf"session '{SID}': 30 → 0 messages, written without the guard "
                                             r"\(compared with the file when the block began\)"), \
            no_unintended_loss(sdir), ChatServer(sdir) as seed:
        seed.get("/sessions")
    assert on_disk(path)["messages"] == []

    guard = sessionguard.Guard(sdir)
    try:
        with pytest.raises(AssertionError, match=r"12 → 0 messages, written without the guard \(compared with "
                                                 r"the last version a guard or the daemon saw\)"), \
                no_unintended_loss(sdir):
            guard.save(SID, make_session(SID, 12).to_dict())
            write_atomic(path, serialize(make_session(SID, 0)))
        with no_unintended_loss(sdir):  # marked as meant: a changed intent key
            write_atomic(path, serialize(make_session(SID, 0, clear_generation=str(uuid.uuid4()))))
        with no_unintended_loss(sdir):
            path.unlink()
        write(sdir, make_session(SID, 3))
        with pytest.raises(AssertionError, match=r"3 → no file: deleted"), \
                no_unintended_loss(sdir, allow_delete=False):
            path.unlink()
    finally:
        guard.close()


def test_no_unintended_loss_counts_the_daemons_versions_of_writes_undone_before_the_end(
        sdir: Path, daemons: Any) -> None:
    """A wipe regrown before the block ends leaves a file with more messages than before: only a
    witness of each write sees the loss. With the daemon watching (and synced), it is a version."""
    path = sdir / f"{SID}.json"
    write(sdir, make_session(SID, 20))
    d = daemons("--watch", str(sdir))
    lost = rf"session '{SID}': a write lost messages: the 20 messages it replaced were kept as a 'shrink' version by "
    with pytest.raises(AssertionError, match=lost + "the daemon"), no_unintended_loss(sdir):
        write_atomic(path, serialize(make_session(SID, 0)))
        d.sync()
        write_atomic(path, serialize(make_session(SID, 25)))
        d.sync()
    with no_unintended_loss(sdir):  # the same, unwitnessed: only the final state is judged
        d.stop()
        write_atomic(path, serialize(make_session(SID, 0)))
        write_atomic(path, serialize(make_session(SID, 30)))


def test_the_pytest_fixture_is_one_line_in_a_servers_conftest(tmp_path: Path) -> None:
    """A server's own suite, run by a real pytest: ``pytest_plugins = ["sessionguard.testing"]``
    gives every test the ``no_unintended_loss`` fixture; a test whose code wipes a session fails at
    teardown naming it, one that only grows sessions passes."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text('pytest_plugins = ["sessionguard.testing"]\n')
    (suite / "test_server.py").write_text(FIXTURE_TESTS)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                          f"--basetemp={tmp_path / 'base'}", str(suite)],
                         capture_output=True, text=True, cwd=suite, timeout=120, check=False)
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert re.search(r"^PASSED test_server.py::test_growing$", out, re.M), out
    assert re.search(r"^FAILED test_server.py::test_wiping - AssertionError: 1 unintended loss", out, re.M), out
    assert re.search(r"^ERROR test_server.py::test_flush_at_teardown - Failed: at teardown", out, re.M), out
    for test, before in (("test_wiping", 3), ("test_flush_at_teardown", 5)):
        assert f"{tmp_path}/base/{test}0: session 'abc123def456': {before} → 0 messages, written without the guard" \
            in out, out
    assert "1 failed, 2 passed, 1 error" in out


FIXTURE_TESTS = '''
import json

import pytest


def save(path, n):
    path.write_text(json.dumps({"session_id": "abc123def456", "messages": [{"role": "user"}] * n}))


def test_growing(no_unintended_loss, tmp_path):
    save(tmp_path / "abc123def456.json", 3)
    no_unintended_loss(tmp_path)
    save(tmp_path / "abc123def456.json", 4)


def test_wiping(no_unintended_loss, tmp_path):
    save(tmp_path / "abc123def456.json", 3)
    no_unintended_loss(tmp_path)
    save(tmp_path / "abc123def456.json", 0)


@pytest.fixture
def server(no_unintended_loss, tmp_path):
    save(tmp_path / "abc123def456.json", 3)
    no_unintended_loss(tmp_path)
    yield tmp_path
    save(tmp_path / "abc123def456.json", 0)  # a buggy flush at shutdown


def test_flush_at_teardown(server):
    save(server / "abc123def456.json", 5)
'''


# -- sessionguard.testing: a crash between the write and the rename -----------------------------

def test_a_guard_save_killed_before_its_rename_is_cleaned_up_by_the_next_start(
        sdir: Path, guarded: ChatServer) -> None:
    path = sdir / f"{SID}.json"
    before = write(sdir, make_session(SID, 6))
    sessionguard.Guard(sdir).close()  # the store exists, as after any earlier run
    crash = crash_guard_save(sdir, SID, serialize(make_session(SID, 7)), count=7)
    assert path.read_bytes() == before
    assert [re.fullmatch(rf"\.{SID}\.json\.tmp-sg-{crash.pid}-[0-9a-f]{{8}}", n) is not None
            for n in crash.left] == [True], crash
    assert len((sdir / crash.left[0]).read_bytes()) == len(serialize(make_session(SID, 7)))  # written in full

    guarded.start()  # recover_on_startup sweeps the dead writer's tmp file
    assert sorted(os.listdir(sdir)) == [".sessionguard", f"{SID}.json"]
    assert len(guarded.get(f"/sessions/{SID}")["messages"]) == 6
    assert log_lines(guarded, "session.recovered") == []


def test_the_seeds_own_save_killed_before_its_rename(sdir: Path) -> None:
    """Any save function: the seed's ``write_atomic`` leaves ``<sid>.tmp.<pid>.<tid>``, the old file intact."""
    path = sdir / f"{SID}.json"
    before = write(sdir, make_session(SID, 2))
    crash = kill_before_rename(lambda: write_atomic(path, serialize(make_session(SID, 3))), path)
    assert path.read_bytes() == before
    assert [re.fullmatch(rf"{SID}\.tmp\.{crash.pid}\.\d+", n) is not None for n in crash.left] == [True], crash

    with pytest.raises(AssertionError, match=r"never reached the rename onto .*: the save raised ValueError: invalid"):
        kill_before_rename(lambda: int("no"), path)
    with pytest.raises(AssertionError, match=r"never reached the rename .*: the save returned"):
        kill_before_rename(lambda: (sdir / "other.json").write_text("{}"), path)
    with pytest.raises(AssertionError, match=r"never reached the rename .*: no answer within the timeout"):
        kill_before_rename(signal.pause, path, timeout=1)  # a save that hangs: the bound, then SIGKILL
    assert path.read_bytes() == before

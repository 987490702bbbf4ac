"""sessionguardctl, run as a subprocess against a real control socket over a real store.

Authorisation tests create throwaway users and groups (root only) and run the
client as them with ``setpriv --reuid --regid --init-groups``. The project's
venv interpreter is a symlink into /root (mode 0700), which another user may
not be able to execute, so the client is run by the first interpreter that a
probe shows the user can run ``import sessionguard.ctl`` with:
``sys.executable``, else ``/usr/bin/python3``; either way ``PYTHONPATH`` points
at a world-readable tmp copy of the ``sessionguard`` package and of ``orjson``
(a compiled wheel for the same CPython 3.11 ABI), so the checkout's location
does not matter. If no candidate works the tests skip saying why.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone

import orjson
import pytest

from sessionguard import ctl as ctlmod
from sessionguard.control import ControlServer
from sgbackend import SID, GuardBackend, Recorder, populate, rmtree, run_as, short_tmpdir
from sghelpers import count_of

CTL = [sys.executable, "-m", "sessionguard.ctl"]


@pytest.fixture
def world(tmp_path):
    guards, dirs = populate(str(tmp_path))
    return GuardBackend(guards), dirs


@pytest.fixture
def daemon(world):
    d = short_tmpdir()
    path = os.path.join(d, "ctl.sock")
    rec = Recorder()
    srv = ControlServer(world[0], path=path, logger=rec)
    srv.start()
    yield path, rec
    srv.stop()
    rmtree(d)


def run(*args: str, sock: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = list(CTL) + (["--socket", sock] if sock else []) + list(args)
    full_env = dict(os.environ)
    full_env.pop(ctlmod.SOCKET_ENV, None)
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=full_env)


# -- every command ------------------------------------------------------------------

def test_status(daemon):
    path, _ = daemon
    p = run("status", sock=path)
    assert p.returncode == 0, p.stderr
    assert "sessions:" in p.stdout and "degraded:" in p.stdout and "watch " in p.stdout
    assert " KiB" in p.stdout  # store size, humanised
    j = run("--json", "status", sock=path)
    assert orjson.loads(j.stdout)["sessions"] == 4


def test_list(daemon):
    path, _ = daemon
    p = run("list", sock=path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["SID", "COUNT", "HIGH", "VERSIONS", "LAST", "SHRINK", "WATCH"]
    row = next(line for line in lines if line.startswith(SID))
    assert row.split()[1:4] == ["3", "10", "1"] and "(20" in row  # relative + absolute time
    shrunk = run("list", "--shrunk", sock=path).stdout
    assert SID in shrunk and "steady" not in shrunk
    j = orjson.loads(run("--json", "list", sock=path).stdout)
    assert {s["sid"] for s in j["sessions"]} == {SID, "steady", "dup"}


def test_history(daemon, world):
    path, _ = daemon
    p = run("history", SID, sock=path)
    assert p.returncode == 0, p.stderr
    [v] = world[0].history(SID, None)
    assert f"* {v.id}" in p.stdout and "shrink" in p.stdout and "library" in p.stdout
    assert f"best version (restored when no VERSION is given): {v.id}" in p.stdout
    assert "steady has no kept versions" in run("history", "steady", sock=path).stdout


def test_show(daemon, world):
    path, _ = daemon
    [v] = world[0].history(SID, None)
    p = run("show", SID, v.id[:5], "--messages", sock=path)
    assert p.returncode == 0, p.stderr
    assert f"version:  {v.id}" in p.stdout and "messages: 10" in p.stdout and v.name in p.stdout
    assert "user: message 0:" in p.stdout and "assistant: message 9:" in p.stdout
    j = orjson.loads(run("--json", "show", SID, sock=path).stdout)
    assert j["id"] == v.id and "messages" not in j


def test_diff(daemon):
    path, _ = daemon
    p = run("diff", SID, sock=path)
    assert p.returncode == 0, p.stderr
    assert "10 messages" in p.stdout and "live file: 3 messages" in p.stdout
    assert "7 messages of the version missing from the live file" in p.stdout
    assert "assistant: message 3:" in p.stdout


def test_restore_and_undo(daemon, world):
    path, rec = daemon
    backend, dirs = world
    live = backend.guards[dirs["a"]].path(SID)

    dry = run("restore", SID, "--dry-run", sock=path)
    assert dry.returncode == 0, dry.stderr
    assert "would restore session" in dry.stdout and "now has 3 messages" in dry.stdout
    assert count_of(live) == 3

    p = run("restore", SID, sock=path)
    assert p.returncode == 0, p.stderr
    assert f"restored session {SID}" in p.stdout and "(10 messages" in p.stdout
    assert count_of(live) == 10
    undo_line = next(line for line in p.stdout.splitlines() if line.startswith("to undo: "))
    undo = shlex.split(undo_line[len("to undo: "):])
    assert undo[0] == "sessionguardctl" and undo[-3] == "restore" and undo[-2] == SID
    u = subprocess.run(CTL + undo[1:], capture_output=True, text=True, timeout=60)
    assert u.returncode == 0, u.stderr
    assert count_of(live) == 3
    assert [e["sid"] for e in rec.named("session.restored")] == [SID, SID]

    again = run("restore", SID, undo[-1], sock=path)
    assert "already identical" in again.stdout


def test_watch_option_before_or_after_command(daemon, world):
    path, _ = daemon
    _, dirs = world
    amb = run("history", "dup", sock=path)
    assert amb.returncode == 1 and "several" in amb.stderr
    assert run("history", "dup", "--watch", dirs["a"], sock=path).returncode == 0
    p = run("--watch", dirs["a"], "restore", "dup", sock=path)
    assert p.returncode == 0, p.stderr
    assert f"--watch {dirs['a']} restore dup" in p.stdout  # the undo command keeps the watch


def test_not_found_and_invalid(daemon):
    path, _ = daemon
    p = run("history", "nosuchsession", sock=path)
    assert p.returncode == 1 and "no session 'nosuchsession'" in p.stderr
    p = run("show", SID, "ffffffff", sock=path)
    assert p.returncode == 1 and "ffffffff" in p.stderr
    p = run("history", "../etc", sock=path)
    assert p.returncode == 1 and "sid" in p.stderr
    p = run("--json", "history", "nosuchsession", sock=path)
    assert p.returncode == 1 and orjson.loads(p.stderr)["error"]["code"] == -32004


def test_prune_sync_metrics(daemon, world):
    path, _ = daemon
    p = run("prune", sock=path)
    assert p.returncode == 0 and "removed 0 versions, freed 0 B" in p.stdout
    p = run("sync", "--timeout", "3", sock=path)
    assert p.returncode == 0 and "synced" in p.stdout
    assert world[0].sync_calls == [3.0]
    p = run("metrics", sock=path)
    assert p.returncode == 0 and "sessionguard_versions 2" in p.stdout


def test_env_socket(daemon):
    path, _ = daemon
    p = run("status", env={ctlmod.SOCKET_ENV: path})
    assert p.returncode == 0, p.stderr


def test_unreachable(tmp_path):
    missing = str(tmp_path / "nope.sock")
    p = run("status", sock=missing)
    assert p.returncode == 3
    assert missing in p.stderr and "systemctl status sessionguard" in p.stderr and "permission" in p.stderr
    notsock = tmp_path / "file"
    notsock.write_text("x")
    assert run("list", sock=str(notsock)).returncode == 3


def test_usage_errors():
    assert run().returncode == 2
    assert run("frobnicate").returncode == 2
    assert run("sync", "--timeout", "-1").returncode == 2
    assert run("history").returncode == 2
    h = run("--help")
    assert h.returncode == 0 and "examples:" in h.stdout and "restore abc123 --dry-run" in h.stdout


def test_formatting_helpers():
    assert ctlmod.human_size(412.3 * 1024) == "412.3 KiB"
    assert ctlmod.human_size(512) == "512 B"
    assert ctlmod.human_size(3 * 1024 ** 3) == "3.0 GiB"
    now = time.time()
    assert ctlmod.relative(datetime.fromtimestamp(now - 185, timezone.utc), now) == "3 min ago"
    assert ctlmod.relative(datetime.fromtimestamp(now - 3 * 86400, timezone.utc), now) == "3 days ago"
    assert ctlmod.when(None) == "-"
    assert "ago (" in ctlmod.when(datetime.fromtimestamp(now - 100, timezone.utc).isoformat())
    t = ctlmod.table(["A", "N"], [("x", 1), ("long", 100)], right=(1,))
    assert t.splitlines() == ["A       N", "x       1", "long  100"]


# -- authorisation with real users (root only) ----------------------------------------

@pytest.fixture
def shared_daemon(world, accounts):
    d = short_tmpdir()
    os.chmod(d, 0o755)
    path = os.path.join(d, "ctl.sock")
    rec = Recorder()
    srv = ControlServer(world[0], path=path, logger=rec, read_group=accounts["groups"]["read"],
                        admin_group=accounts["groups"]["admin"])
    srv.start()
    os.chmod(path, 0o666)  # let every test user connect: SO_PEERCRED alone decides
    yield path, rec
    srv.stop()
    rmtree(d)


def test_reader_can_list_but_not_restore(accounts, public_client, shared_daemon, world):
    path, rec = shared_daemon
    backend, dirs = world
    p = run_as("reader", accounts, public_client, path, "list")
    assert p.returncode == 0, p.stderr
    assert SID in p.stdout
    p = run_as("reader", accounts, public_client, path, "restore", SID)
    assert p.returncode == 1
    assert "permission denied: restore needs membership of the admin group" in p.stderr
    assert accounts["groups"]["admin"] in p.stderr
    assert count_of(backend.guards[dirs["a"]].path(SID)) == 3  # untouched
    uid = accounts["users"]["reader"].pw_uid
    assert {"uid": uid, "method": "restore"}.items() <= rec.named("control.denied")[-1].items()


def test_outsider_is_refused_even_list(accounts, public_client, shared_daemon):
    path, rec = shared_daemon
    p = run_as("outsider", accounts, public_client, path, "list")
    assert p.returncode == 1
    assert "permission denied: list needs membership of" in p.stderr
    assert accounts["groups"]["read"] in p.stderr
    assert rec.named("control.denied")[-1]["uid"] == accounts["users"]["outsider"].pw_uid


def test_admin_can_restore(accounts, public_client, shared_daemon, world):
    path, _ = shared_daemon
    backend, dirs = world
    p = run_as("admin", accounts, public_client, path, "restore", SID)
    assert p.returncode == 0, p.stderr
    assert count_of(backend.guards[dirs["a"]].path(SID)) == 10


def test_unprivileged_user_cannot_connect_to_0660_socket(accounts, public_client, world):
    """Without the chmod, the file mode keeps outsiders out before SO_PEERCRED: exit 3 with the hint."""
    d = short_tmpdir()
    os.chmod(d, 0o755)
    path = os.path.join(d, "ctl.sock")
    srv = ControlServer(world[0], path=path, logger=Recorder(), read_group=accounts["groups"]["read"])
    srv.start()
    try:
        p = run_as("outsider", accounts, public_client, path, "status")
        assert p.returncode == 3 and "Permission denied" in p.stderr and path in p.stderr
        p = run_as("reader", accounts, public_client, path, "status")  # socket group = read group
        assert p.returncode == 0, p.stderr
    finally:
        srv.stop()
        rmtree(d)

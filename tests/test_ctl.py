"""sessionguardctl, run as a subprocess against the REAL daemon (daemonproc.py): real files,
real inotify, real store. The client's formatting and exit codes on crafted results are in
test_ctl_views.py (stub server).

Authorisation and spoofing tests create throwaway users and groups (root only) and run
processes as them with ``setpriv``; the project's venv interpreter lives under /root, so
they use the interpreter the ``public_client`` fixture (conftest.py) found runnable.
Socket discovery runs in a private mount namespace with its own tmpfs on /run, so the
machine's /run/sessionguard.sock is never touched.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from daemonproc import DaemonProc
from sessionguard.paths import DAEMON_USER_ENV, SOCKET_ENV
from sgbackend import rmtree, run_as, short_tmpdir
from sghelpers import IS_ROOT, count_of, make_session, server_write

CTL = [sys.executable, "-m", "sessionguard.ctl"]
SID = "abc123def456"
TESTS = os.path.dirname(os.path.abspath(__file__))


def run(*args: str, sock: str | None = None, env: dict[str, str] | None = None,
        cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*CTL, *(["--socket", sock] if sock else []), *args]
    full_env = {k: v for k, v in os.environ.items() if k not in (SOCKET_ENV, DAEMON_USER_ENV)}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=full_env, cwd=cwd, check=False)


def _config(base: Path, groups: dict[str, str] | None) -> Path:
    cfg = base / "sg.toml"
    daemon = f'[daemon]\nread_group = "{groups["read"]}"\nadmin_group = "{groups["admin"]}"\n\n' if groups else ""
    cfg.write_text(f'{daemon}[[watch]]\npath = "{base / "a"}"\n\n[[watch]]\npath = "{base / "b"}"\n')
    return cfg


def start_world(base: Path, groups: dict[str, str] | None = None) -> DaemonProc:
    """Two watches: ``SID`` in a (10 messages, wiped to 3 while watched), ``steady`` in a
    (5), ``dup`` in a (4, cut to 2) and in b (6)."""
    for w in ("a", "b"):
        (base / w).mkdir()
    server_write(base / "a" / f"{SID}.json", make_session(10, SID))
    server_write(base / "a" / "steady.json", make_session(5, "steady"))
    server_write(base / "a" / "dup.json", make_session(4, "dup"))
    server_write(base / "b" / "dup.json", make_session(6, "dup"))
    d = DaemonProc(base, ["--config", str(_config(base, groups))]).started()
    shrunk = make_session(10, SID)
    shrunk["messages"] = shrunk["messages"][:3]
    server_write(base / "a" / f"{SID}.json", shrunk)
    dup = make_session(4, "dup")
    dup["messages"] = dup["messages"][:2]
    server_write(base / "a" / "dup.json", dup)
    d.sync()
    return d


@pytest.fixture
def world():
    """(daemon, base dir): a short, world-traversable base (other users reach the socket)."""
    base = Path(short_tmpdir("sgctl"))
    os.chmod(base, 0o755)
    d = start_world(base)
    yield d, base
    d.stop()
    rmtree(str(base))


# -- every command on the real daemon --------------------------------------------------------------


def test_status(world):
    d, base = world
    p = run("status", sock=d.socket)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Daemon\n") and f"Watch {base / 'a'}" in p.stdout and f"Watch {base / 'b'}" in p.stdout
    j = orjson.loads(run("--json", "status", sock=d.socket).stdout)
    assert j["sessions"] == 4 and [w["sessions"] for w in j["watches"]] == [3, 1]
    only_b = orjson.loads(run("--json", "status", "--watch", str(base / "b"), sock=d.socket).stdout)
    assert [w["path"] for w in only_b["watches"]] == [str(base / "b")] and only_b["sessions"] == 1


def test_list(world):
    d, base = world
    p = run("list", sock=d.socket)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["SID", "STATE", "COUNT", "HIGH", "VERSIONS", "LAST", "LOSS", "WATCH"]
    row = next(line for line in lines if line.startswith(SID))
    assert row.split()[1:5] == ["shrunk", "3", "10", "1"] and "(20" in row  # relative + absolute time
    shrunk = run("list", "--shrunk", sock=d.socket).stdout
    assert SID in shrunk and "steady" not in shrunk
    j = orjson.loads(run("--json", "list", sock=d.socket).stdout)
    assert {(s["sid"], s["state"]) for s in j["sessions"]} == {(SID, "shrunk"), ("steady", "ok"), ("dup", "shrunk"),
                                                                ("dup", "ok")}
    only_b = orjson.loads(run("--json", "list", "--watch", str(base / "b"), sock=d.socket).stdout)
    assert [s["sid"] for s in only_b["sessions"]] == ["dup"]


def test_history_show_diff(world):
    d, _ = world
    [v] = d.call("history", {"sid": SID})["versions"]
    p = run("history", SID, sock=d.socket)
    assert p.returncode == 0, p.stderr
    assert f"RM  {v['id']}" in p.stdout and "shrink" in p.stdout and "daemon" in p.stdout
    assert f"R  restored when no VERSION is given: {v['id']}" in p.stdout
    assert "steady has no kept versions" in run("history", "steady", sock=d.socket).stdout
    p = run("show", SID, v["id"][:5], "--messages", sock=d.socket)
    assert p.returncode == 0, p.stderr
    assert f"version:  {v['id']}" in p.stdout and "messages: 10" in p.stdout and v["name"] in p.stdout
    assert "user: message 0:" in p.stdout and "assistant: message 9:" in p.stdout
    page = run("show", SID, "--messages", "--first", "4", "--limit", "2", sock=d.socket).stdout
    assert "4  user: message 4:" in page and "message 6:" not in page and "more: --first 6" in page
    p = run("diff", SID, sock=d.socket)
    assert p.returncode == 0, p.stderr
    assert "10 messages" in p.stdout and "live file: 3 messages (content id " in p.stdout
    assert "7 messages of the version missing from the live file" in p.stdout
    assert "assistant: message 3:" in p.stdout


def test_restore_and_undo(world):
    d, base = world
    live = base / "a" / f"{SID}.json"
    dry = run("restore", SID, "--dry-run", sock=d.socket)
    assert dry.returncode == 0, dry.stderr
    assert "would restore session" in dry.stdout and "now has 3 messages" in dry.stdout
    assert count_of(live) == 3
    p = run("restore", SID, sock=d.socket)
    assert p.returncode == 0, p.stderr
    assert f"restored session {SID}" in p.stdout and "(10 messages" in p.stdout
    assert count_of(live) == 10
    undo = shlex.split(next(line for line in p.stdout.splitlines() if line.startswith("to undo: "))[9:])
    assert undo[0] == "sessionguardctl" and undo[-3:-1] == ["restore", SID] and str(base / "a") in undo
    u = subprocess.run(CTL + undo[1:], capture_output=True, text=True, timeout=60, check=False)
    assert u.returncode == 0, u.stderr
    assert count_of(live) == 3
    assert [e["sid"] for e in d.events("session.restored")] == [SID, SID]
    again = run("restore", SID, undo[-1], sock=d.socket)
    assert "already identical" in again.stdout
    assert len(d.events("session.restored")) == 2, "a restore that changed nothing is not logged as one"


def test_restore_expect_refuses_when_the_live_file_changed(world):
    d, base = world
    live_id = orjson.loads(run("--json", "diff", SID, sock=d.socket).stdout)["live_id"]
    server_write(base / "a" / f"{SID}.json", make_session(2, SID))  # a writer saves meanwhile
    d.sync()
    p = run("restore", SID, "--expect", live_id, sock=d.socket)
    assert p.returncode == 1 and "changed since you looked" in p.stderr
    assert count_of(base / "a" / f"{SID}.json") == 2
    now = orjson.loads(run("--json", "diff", SID, sock=d.socket).stdout)["live_id"]
    assert run("restore", SID, "--expect", now, sock=d.socket).returncode == 0
    assert count_of(base / "a" / f"{SID}.json") == 3, "the state just before the last damage (3 → 2)"


def test_watch_option(world):
    d, base = world
    amb = run("history", "dup", sock=d.socket)
    assert amb.returncode == 1 and "several" in amb.stderr
    assert run("history", "dup", "--watch", str(base / "a"), sock=d.socket).returncode == 0
    p = run("--watch", "a", "restore", "dup", sock=d.socket, cwd=str(base))  # relative to the caller's cwd
    assert p.returncode == 0, p.stderr
    assert f"--watch {base / 'a'} restore dup" in p.stdout  # the undo command names the watch
    nowatch = run("status", "--watch", str(base), sock=d.socket)
    assert nowatch.returncode == 1 and "is not a watched directory" in nowatch.stderr


def test_not_found_and_invalid(world):
    d, _ = world
    p = run("history", "nosuchsession", sock=d.socket)
    assert p.returncode == 1 and "no session 'nosuchsession'" in p.stderr
    p = run("show", SID, "ffffffff", sock=d.socket)
    assert p.returncode == 1 and "ffffffff" in p.stderr
    p = run("history", "../etc", sock=d.socket)
    assert p.returncode == 1 and "sid" in p.stderr
    p = run("--json", "history", "nosuchsession", sock=d.socket)
    assert p.returncode == 1 and orjson.loads(p.stderr)["error"]["code"] == -32004


def test_prune_sync_metrics_and_env_socket(world):
    d, _ = world
    p = run("prune", sock=d.socket)
    assert p.returncode == 0 and "removed 0 versions, freed 0 B" in p.stdout
    p = run("sync", "--timeout", "3", sock=d.socket)
    assert p.returncode == 0 and "synced" in p.stdout
    p = run("metrics", sock=d.socket)
    held = [float(line.split()[-1]) for line in p.stdout.splitlines()
            if line.startswith("sessionguard_store_versions{")]
    assert p.returncode == 0 and sum(held) == 2, p.stdout
    assert run("status", env={SOCKET_ENV: d.socket}).returncode == 0


def test_hostile_ids_and_messages_print_escaped(tmp_path):
    """A session file whose name and messages carry terminal escapes: every view prints them
    escaped (raw bytes checked), and the printed undo command works when pasted into bash."""
    base = Path(short_tmpdir("sgesc"))
    evil = "evil\x1b[31m\u202e"
    try:
        (base / "a").mkdir()
        (base / "b").mkdir()
        doc = make_session(4, "x")
        doc["messages"][2]["content"] = "pwned \x1b]0;title\x07 \x1b[2J \x9b1m"
        server_write(base / "a" / f"{evil}.json", doc)
        d = DaemonProc(base, ["--config", str(_config(base, None))]).started()
        try:
            server_write(base / "a" / f"{evil}.json", make_session(0, "x"))
            d.sync()
            outs = [subprocess.run([*CTL, "--socket", d.socket, *args], capture_output=True, timeout=60, check=False)
                    for args in (["list"], ["history", evil], ["show", evil, "--messages"], ["diff", evil])]
            for p in outs:
                assert p.returncode == 0, p.stderr
                for bad in (b"\x1b", b"\x07", "\x9b".encode(), "\u202e".encode()):
                    assert bad not in p.stdout, (bad, p.stdout[:500])
            assert b"evil\\x1b[31m\\u202e" in outs[0].stdout
            assert b"pwned \\x1b]0;title\\x07 \\x1b[2J \\x9b1m" in outs[2].stdout
            assert b"pwned \\x1b]0;title" in outs[3].stdout
            restored = subprocess.run([*CTL, "--socket", d.socket, "restore", evil], capture_output=True,
                                      text=True, timeout=60, check=False)
            undo = next(line for line in restored.stdout.splitlines() if line.startswith("to undo: "))[9:]
            env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
            assert shutil.which("sessionguardctl", path=env["PATH"]), "the venv's console script"
            u = subprocess.run(["bash", "-c", undo], capture_output=True, text=True, timeout=60, env=env, check=False)
            assert u.returncode == 0, (undo, u.stderr)
            assert count_of(base / "a" / f"{evil}.json") == 0, "the undo put the wiped file back"
        finally:
            d.stop()
    finally:
        rmtree(str(base))


# -- authorisation with real users (root only) ----------------------------------------------------


@pytest.fixture
def shared_world(accounts):
    base = Path(short_tmpdir("sgsh"))
    os.chmod(base, 0o755)
    d = start_world(base, accounts["groups"])
    os.chmod(d.socket, 0o666)  # let every test user connect: SO_PEERCRED alone decides
    yield d, base
    d.stop()
    rmtree(str(base))


def test_reader_can_list_but_not_restore(accounts, public_client, shared_world):
    d, base = shared_world
    p = run_as("reader", accounts, public_client, d.socket, "list")
    assert p.returncode == 0, p.stderr
    assert SID in p.stdout
    p = run_as("reader", accounts, public_client, d.socket, "restore", SID)
    assert p.returncode == 1
    assert "permission denied: restore needs membership of the admin group" in p.stderr
    assert accounts["groups"]["admin"] in p.stderr
    assert count_of(base / "a" / f"{SID}.json") == 3  # untouched
    uid = accounts["users"]["reader"].pw_uid
    assert {"uid": uid, "method": "restore"}.items() <= d.events("control.denied")[-1].items()


def test_outsider_is_refused_even_list(accounts, public_client, shared_world):
    d, _ = shared_world
    p = run_as("outsider", accounts, public_client, d.socket, "list")
    assert p.returncode == 1
    assert "permission denied: list needs membership of" in p.stderr
    assert accounts["groups"]["read"] in p.stderr
    assert d.events("control.denied")[-1]["uid"] == accounts["users"]["outsider"].pw_uid


def test_admin_can_restore(accounts, public_client, shared_world):
    d, base = shared_world
    p = run_as("admin", accounts, public_client, d.socket, "restore", SID)
    assert p.returncode == 0, p.stderr
    assert count_of(base / "a" / f"{SID}.json") == 10
    assert d.events("session.restored")[-1]["uid"] == accounts["users"]["admin"].pw_uid


def test_outsider_cannot_connect_to_the_0660_socket_and_is_told_the_group(accounts, public_client, shared_world):
    d, _ = shared_world
    os.chmod(d.socket, 0o660)
    p = run_as("outsider", accounts, public_client, d.socket, "status")
    assert p.returncode == 3 and "Permission denied" in p.stderr and d.socket in p.stderr
    assert f"usermod -aG {accounts['groups']['read']}" in p.stderr  # the socket's group
    p = run_as("reader", accounts, public_client, d.socket, "status")  # socket group = read group
    assert p.returncode == 0, p.stderr


SPOOF = textwrap.dedent("""\
    import socket, sys
    path, log = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(4)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.settimeout(2)
        try:
            data = c.recv(65536)
        except OSError:
            data = b""
        with open(log, "ab") as f:
            f.write(data)
        try:
            c.sendall(b'{"jsonrpc": "2.0", "id": 1, "result": {"sid": "abc123def456", "restored": '
                      b'{"id": "ffff", "count": 1000}, "pre_restore": null, "dry_run": false, "unchanged": false}}\\n')
        except OSError:
            pass  # the client left without a word
        c.close()
""")


def test_a_socket_served_by_another_user_gets_nothing(accounts, public_client):
    """Another local user creates the socket first and answers "restored": the client checks
    SO_PEERCRED before sending a byte, refuses, and says why; naming that user trusts it."""
    py, env = public_client
    pw = accounts["users"]["outsider"]
    d = short_tmpdir("sgspoof")
    os.chmod(d, 0o755)
    os.chown(d, pw.pw_uid, pw.pw_gid)
    sock, log = os.path.join(d, "evil.sock"), os.path.join(d, "received")
    server = subprocess.Popen(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                               py, "-c", SPOOF, sock, log], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        p = run("restore", SID, sock=sock)
        assert p.returncode == 3, (p.stdout, p.stderr)
        assert "refusing to talk to" in p.stderr and f"uid {pw.pw_uid} ({pw.pw_name})" in p.stderr
        assert "Nothing was sent" in p.stderr and "restored" not in p.stdout
        assert not os.path.exists(log) or os.path.getsize(log) == 0, "the client sent something"
        trusted = run("restore", SID, "--daemon-user", pw.pw_name, sock=sock)
        assert trusted.returncode == 0 and "restored session" in trusted.stdout, trusted.stderr
        assert b'"method":"restore"' in Path(log).read_bytes()
    finally:
        server.kill()
        server.wait()
        rmtree(d)


# -- where the client looks for the socket (a private /run) -----------------------------------------

DISCOVERY = textwrap.dedent("""\
    import json, os, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    from sgbackend import CannedBackend
    from sessionguard.control import ControlServer

    def ctl(*args, **env):
        e = {k: v for k, v in os.environ.items() if k not in ("SESSIONGUARD_SOCKET", "XDG_RUNTIME_DIR")}
        e.update(env)
        p = subprocess.run([sys.executable, "-m", "sessionguard.ctl", "--json", *args], capture_output=True,
                           text=True, env=e)
        return {"rc": p.returncode, "out": p.stdout, "err": p.stderr}

    out = {"nothing": ctl("status")}
    xdg = sys.argv[2]
    own = ControlServer(CannedBackend({"status": {"who": "xdg"}}), path=os.path.join(xdg, "sessionguard.sock"))
    own.start()
    out["xdg"] = ctl("status", XDG_RUNTIME_DIR=xdg)
    system = ControlServer(CannedBackend({"status": {"who": "system"}}), path="/run/sessionguard.sock")
    system.start()
    out["system"] = ctl("status", XDG_RUNTIME_DIR=xdg)
    out["env"] = ctl("status", XDG_RUNTIME_DIR=xdg, SESSIONGUARD_SOCKET=os.path.join(xdg, "sessionguard.sock"))
    system.stop()
    own.stop()
    print(json.dumps(out))
""")


def test_socket_discovery_order():
    """$SESSIONGUARD_SOCKET, else /run/sessionguard.sock when it exists, else
    $XDG_RUNTIME_DIR/sessionguard.sock; never /tmp; the hint names every path tried."""
    if not IS_ROOT or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare: a private mount namespace with its own /run")
    xdg = short_tmpdir("sgxdg")
    try:
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", DISCOVERY,
                            TESTS, xdg], capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
    finally:
        rmtree(xdg)
    nothing = out["nothing"]
    assert nothing["rc"] == 3, nothing
    assert "/run/sessionguard.sock (not there)" in nothing["err"]
    assert "XDG_RUNTIME_DIR is not set" in nothing["err"] and "/tmp" not in nothing["err"]
    assert "usermod -aG sessionguard" in nothing["err"]
    assert json.loads(out["xdg"]["out"]) == {"who": "xdg"}
    assert json.loads(out["system"]["out"]) == {"who": "system"}, "the system socket comes first"
    assert json.loads(out["env"]["out"]) == {"who": "xdg"}, "$SESSIONGUARD_SOCKET wins"


def test_a_non_root_daemon_without_a_socket_path_says_so_and_keeps_guarding(tmp_path):
    """No --socket, no XDG_RUNTIME_DIR, not root: no socket in /tmp; the daemon logs why and
    how to fix it, reports it degraded, and keeps protecting the files."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    sdir = tmp_path / "s"
    sdir.mkdir()
    server_write(sdir / f"{SID}.json", make_session(5, SID))
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "NOTIFY_SOCKET")}
    log = tmp_path / "log"
    with open(log, "wb") as f:  # a user namespace without mapping: the daemon sees uid 65534
        proc = subprocess.Popen(["unshare", "--user", sys.executable, "-m", "sessionguard.daemon", "--watch",
                                 str(sdir), "--log-format", "json"], stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        from daemonproc import eventually

        def events(name):
            return [e for e in map(json.loads, log.read_bytes().splitlines()) if e.get("event") == name]

        eventually(lambda: events("daemon.started") or proc.poll() is not None, what="daemon.started")
        [failed] = events("control.failed")
        assert "--socket" in failed["error"] and "XDG_RUNTIME_DIR" in failed["error"]
        assert not os.path.lexists("/tmp/sessionguard-65534.sock")
        server_write(sdir / f"{SID}.json", make_session(0, SID))
        eventually(lambda: list((sdir / ".sessionguard" / "sessions" / SID).glob("*_5msgs_*.version")),
                   what="the wipe kept all the same")
    finally:
        proc.terminate()
        proc.wait(30)

"""The whole admin story on the real daemon, real socket, sessionguardctl as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemonproc import DaemonProc
from sgbackend import rmtree, run_as, short_tmpdir
from sghelpers import count_of, make_session, server_write

SID = "20260424_231848_e7706c"


def ctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sessionguard.ctl", "--socket", sock, *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def world():
    """A short, world-traversable base dir (unprivileged clients must reach the socket)."""
    base = Path(short_tmpdir("sgadm"))
    os.chmod(base, 0o755)
    (base / "sessions").mkdir()
    yield base
    rmtree(str(base))


def test_wipe_list_history_diff_restore_and_undo(world: Path) -> None:
    sdir = world / "sessions"
    server_write(sdir / f"{SID}.json", make_session(1000, SID))
    d = DaemonProc(world, ["--watch", str(sdir)]).started()
    try:
        sock = d.socket
        # the server's bug: a metadata-only save replaces the conversation with nothing
        server_write(sdir / f"{SID}.json", make_session(0, SID))
        assert ctl(sock, "sync").returncode == 0

        out = ctl(sock, "list", "--shrunk")
        assert out.returncode == 0, out.stderr
        assert SID in out.stdout and "1000" in out.stdout
        listed = json.loads(ctl(sock, "--json", "list", "--shrunk").stdout)
        (row,) = [r for r in listed["sessions"] if r["sid"] == SID]
        assert (row["count"], row["high_water"], row["versions"]) == (0, 1000, 1)

        out = ctl(sock, "history", SID)
        assert out.returncode == 0 and "shrink" in out.stdout and "1000" in out.stdout

        diff = json.loads(ctl(sock, "--json", "diff", SID).stdout)
        assert diff["missing_count"] == 1000 and diff["live_count"] == 0

        dry = ctl(sock, "restore", SID, "--dry-run")
        assert dry.returncode == 0 and count_of(sdir / f"{SID}.json") == 0, "a dry run writes nothing"

        restored = json.loads(ctl(sock, "--json", "restore", SID).stdout)
        assert restored["restored"]["count"] == 1000
        assert count_of(sdir / f"{SID}.json") == 1000, "back to 1000 messages, parseable"
        undo_id = restored["pre_restore"]["id"]
        human = ctl(sock, "history", SID).stdout
        assert "pre-restore" in human

        # the restore itself is undoable
        assert ctl(sock, "restore", SID, undo_id).returncode == 0
        assert count_of(sdir / f"{SID}.json") == 0
        assert ctl(sock, "restore", SID).returncode == 0
        assert count_of(sdir / f"{SID}.json") == 1000
        restored_events = d.events("session.restored")
        assert len(restored_events) == 3 and restored_events[0]["uid"] == os.getuid()

        # the daemon tracks the restored file: wiping it again is caught again
        ctl(sock, "sync")
        server_write(sdir / f"{SID}.json", make_session(1, SID))
        ctl(sock, "sync")
        history = json.loads(ctl(sock, "--json", "history", SID).stdout)["versions"]
        shrinks = [v for v in history if v["reason"] == "shrink"]
        assert [v["count"] for v in shrinks] == [1000, 1000], "the second wipe is an event of its own"
        assert len({v["id"] for v in shrinks}) == 1, "…holding the same bytes (a hard link, no copy)"
        assert history[-1]["reason"] == "shrink", "its latest change is the loss: restore/recover act on it"
        d.assert_alive()
    finally:
        d.stop()


def test_read_group_can_read_but_not_restore_and_outsiders_can_do_neither(world, accounts, public_client) -> None:
    sdir = world / "sessions"
    server_write(sdir / f"{SID}.json", make_session(50, SID))
    cfg = world / "sg.toml"
    cfg.write_text(f'[daemon]\nread_group = "{accounts["groups"]["read"]}"\n'
                   f'admin_group = "{accounts["groups"]["admin"]}"\n\n[[watch]]\npath = "{sdir}"\n')
    d = DaemonProc(world, ["--config", str(cfg)]).started()
    try:
        os.chmod(d.socket, 0o666)  # let every test user connect: SO_PEERCRED alone decides
        server_write(sdir / f"{SID}.json", make_session(0, SID))
        assert ctl(d.socket, "sync").returncode == 0

        p = run_as("reader", accounts, public_client, d.socket, "list", "--shrunk")
        assert p.returncode == 0 and SID in p.stdout, p.stderr
        p = run_as("reader", accounts, public_client, d.socket, "restore", SID)
        assert p.returncode == 1 and "permission denied" in p.stderr
        assert count_of(sdir / f"{SID}.json") == 0, "a refused restore changes nothing"

        p = run_as("outsider", accounts, public_client, d.socket, "list")
        assert p.returncode == 1 and "permission denied" in p.stderr
        p = run_as("outsider", accounts, public_client, d.socket, "restore", SID)
        assert p.returncode == 1

        p = run_as("admin", accounts, public_client, d.socket, "restore", SID)
        assert p.returncode == 0, p.stderr
        assert count_of(sdir / f"{SID}.json") == 50

        denied = d.events("control.denied")
        uids = {e["uid"] for e in denied}
        assert accounts["users"]["reader"].pw_uid in uids and accounts["users"]["outsider"].pw_uid in uids
        assert all("pid" in e for e in denied)
        assert d.events("session.restored")[-1]["uid"] == accounts["users"]["admin"].pw_uid
    finally:
        d.stop()


HOSTILE = [
    (b"{not json\n", -32700),
    (b"[1, 2, 3]\n", -32600),
    (b'"just a string"\n', -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "rm -rf"}\n', -32601),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "list", "params": {"shrunk_only": "yes"}}\n', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "history", "params": {"sid": 42}}\n', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "history", "params": {"sid": "../../etc"}}\n', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "restore", "params": {"sid": ".."}}\n', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "show", "params": {"sid": "a/b"}}\n', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "restore", "params": {"sid": "x\\u0000y"}}\n', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "status", "params": {"evil": 1}}\n', -32602),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "list", "params": {"shrunk_only": '
     + b" " * (1 << 20) + b"true}}\n", -32600),
]


def test_hostile_clients_get_errors_and_the_daemon_keeps_answering(world: Path) -> None:
    import socket as sk

    from sgbackend import read_line

    sdir = world / "sessions"
    server_write(sdir / f"{SID}.json", make_session(5, SID))
    d = DaemonProc(world, ["--watch", str(sdir)]).started()
    try:
        for line, code in HOSTILE:
            with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(d.socket)
                s.sendall(line)
                reply = json.loads(read_line(s))
            assert reply["error"]["code"] == code, (line[:80], reply)
            assert d.call("status")["sessions"] == 1, "still answering after " + repr(line[:60])
        # hundreds of simultaneous clients, some silent, some asking
        socks = []
        try:
            for _i in range(300):
                s = sk.socket(sk.AF_UNIX, sk.SOCK_STREAM)
                s.connect(d.socket)
                socks.append(s)
            for s in socks[::3]:
                s.sendall(b'{"jsonrpc": "2.0", "id": 7, "method": "status"}\n')
            for s in socks[::3]:
                s.settimeout(30)
                reply = json.loads(read_line(s))
                assert reply.get("id") == 7 or reply["error"]["code"] == -32002  # answered, or "busy" past the cap
        finally:
            for s in socks:
                s.close()
        assert d.call("status")["sessions"] == 1
        # nothing was written outside the watch: the traversal ids touched no path
        assert not (world / "etc").exists() and not Path(str(sdir) + "/..").joinpath(".sessionguard").exists()
        # the watcher was never blocked: a wipe during all this is still caught
        server_write(sdir / f"{SID}.json", make_session(0, SID))
        d.sync()
        assert [v["count"] for v in d.call("history", {"sid": SID})["versions"]] == [5]
        d.assert_alive()
    finally:
        d.stop()

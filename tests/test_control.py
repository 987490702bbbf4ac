"""The control socket: real Unix sockets, a real store, hostile clients.

The backend is ``sgbackend.GuardBackend``: the control Backend protocol over
real ``Guard``s in a tmp dir (a fake daemon, not a fake filesystem).
"""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import orjson
import pytest

from sessionguard.control import (
    BUSY,
    DENIED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    PARSE_ERROR,
    ControlServer,
    Peer,
    peer_credentials,
)
from sessionguard import fsutil
from sessionguard.paths import default_socket_path
from sgbackend import SID, GuardBackend, Recorder, connect, populate, read_line, result, rmtree, rpc, rpc_raw, \
    short_tmpdir
from sghelpers import count_of


@pytest.fixture
def world(tmp_path):
    guards, dirs = populate(str(tmp_path))
    return GuardBackend(guards), dirs


@pytest.fixture
def sockdir():
    d = short_tmpdir()
    yield d
    rmtree(d)


@pytest.fixture
def make_server(world, sockdir):
    servers: list[ControlServer] = []

    def make(backend=None, **kw) -> tuple[ControlServer, str, Recorder]:
        rec = Recorder()
        path = kw.pop("path", os.path.join(sockdir, "ctl.sock"))
        srv = ControlServer(backend or world[0], path=path, logger=rec, **kw)
        srv.start()
        servers.append(srv)
        return srv, path, rec

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server):
    return make_server()


def alive(path: str) -> None:
    """The server still answers status on a fresh connection."""
    assert result(path, "status")["version"] == "test"


# -- happy paths --------------------------------------------------------------------


def test_status(server, world):
    srv, path, rec = server
    r = result(path, "status")
    assert r["sessions"] == 4  # SID, steady, dup (a), dup (b)
    assert r["versions"] == 2
    assert r["store_bytes"] > 0
    assert r["degraded"] == []
    assert rec.named("control.listening") == [{"path": path}]


def test_list_and_shrunk_only(server, world):
    _, path, _ = server
    sessions = result(path, "list")["sessions"]
    by = {(s["sid"], os.path.basename(s["watch"])): s for s in sessions}
    assert set(by) == {(SID, "a"), ("steady", "a"), ("dup", "a"), ("dup", "b")}
    assert by[(SID, "a")]["count"] == 3 and by[(SID, "a")]["high_water"] == 10
    assert by[(SID, "a")]["versions"] == 1 and by[(SID, "a")]["last_shrink"]
    assert by[("steady", "a")]["last_shrink"] is None
    shrunk = {s["sid"] for s in result(path, "list", {"shrunk_only": True})["sessions"]}
    assert shrunk == {SID, "dup"}


def test_history(server, world):
    _, path, _ = server
    r = result(path, "history", {"sid": SID})
    assert r["sid"] == SID
    [v] = r["versions"]
    assert v["count"] == 10 and v["reason"] == "shrink" and v["source"] == "library"
    assert v["name"].endswith(".version")


def test_show_and_messages(server, world):
    _, path, _ = server
    r = result(path, "show", {"sid": SID})
    assert r["count"] == 10 and "messages" not in r
    r = result(path, "show", {"sid": SID, "version": r["id"][:6], "messages": True})
    assert len(r["messages"]) == 10
    assert r["messages"][0]["content"].startswith("message 0:")


def test_show_unparseable_version_has_error_field(server, world):
    backend, dirs = world
    _, path, _ = server
    g = backend.guards[dirs["a"]]
    live = g.path("steady")
    Path(live).write_bytes(b'{"messages": [1, 2')  # a torn write, kept as the daemon would
    fd, st = fsutil.open_regular(live)
    try:
        with g.store.lock("steady"):
            kept = g.store.keep_fd("steady", fd, live, st, None, "unparseable", "daemon", link=False)
    finally:
        os.close(fd)
    r = result(path, "show", {"sid": "steady", "version": kept.id, "messages": True})
    assert r["messages"] is None and "invalid JSON" in r["messages_error"]


def test_diff_multiset(server, world):
    _, path, _ = server
    r = result(path, "diff", {"sid": SID})
    assert r["version_count"] == 10 and r["live_count"] == 3 and r["live_exists"] is True
    assert r["missing_count"] == 7
    assert [m["index"] for m in r["missing"]] == list(range(3, 10))
    assert r["missing"][0]["message"]["content"].startswith("message 3:")


def test_diff_duplicates_and_key_order(server, world):
    """Messages compare by canonical JSON (key order ignored), as a multiset."""
    backend, dirs = world
    _, path, _ = server
    g = backend.guards[dirs["a"]]
    m = {"role": "user", "content": "hi"}
    g.save("multi", {"messages": [m, m, m, {"role": "assistant", "content": "yo"}]})
    g.save("multi", {"messages": [{"content": "hi", "role": "user"}]})
    r = result(path, "diff", {"sid": "multi"})
    assert r["missing_count"] == 3
    assert [x["index"] for x in r["missing"]] == [1, 2, 3]


def test_diff_live_missing(server, world):
    backend, dirs = world
    _, path, _ = server
    os.unlink(backend.guards[dirs["a"]].path(SID))
    r = result(path, "diff", {"sid": SID})
    assert r["live_exists"] is False and r["live_count"] is None and r["missing_count"] == 10


def test_restore_dry_run_then_restore_and_undo(server, world):
    backend, dirs = world
    _, path, rec = server
    live = backend.guards[dirs["a"]].path(SID)
    r = result(path, "restore", {"sid": SID, "dry_run": True})
    assert r["dry_run"] is True and r["restored"]["count"] == 10 and r["live_count_before"] == 3
    assert count_of(live) == 3
    assert rec.named("session.restored") == []

    r = result(path, "restore", {"sid": SID})
    assert r["dry_run"] is False and r["restored"]["count"] == 10
    pre = r["pre_restore"]
    assert pre["reason"] == "pre-restore" and pre["count"] == 3 and pre["source"] == "admin"
    assert count_of(live) == 10
    [ev] = rec.named("session.restored")
    assert ev["sid"] == SID and ev["count"] == 10 and ev["uid"] == os.geteuid() and ev["pid"] == os.getpid()

    undo = result(path, "restore", {"sid": SID, "version": pre["id"]})
    assert undo["restored"]["id"] == pre["id"]
    assert count_of(live) == 3


def test_restore_unchanged(server, world):
    _, path, _ = server
    r = result(path, "restore", {"sid": SID})
    again = result(path, "restore", {"sid": SID, "version": r["restored"]["id"]})
    assert again["unchanged"] is True


def test_ambiguous_sid_needs_watch(server, world):
    _, dirs = world
    _, path, _ = server
    r = rpc(path, "history", {"sid": "dup"})
    assert r["error"]["code"] == NOT_FOUND and "several" in r["error"]["message"]
    assert len(result(path, "history", {"sid": "dup", "watch": dirs["a"]})["versions"]) == 1
    assert result(path, "history", {"sid": "dup", "watch": dirs["b"]})["versions"] == []


def test_prune_sync_metrics(server, world):
    backend, _ = world
    _, path, _ = server
    r = result(path, "prune")
    assert r == {"removed": [], "bytes_freed": 0}
    assert result(path, "sync", {"timeout": 2.5}) == {"synced": True}
    assert result(path, "sync") == {"synced": True}
    assert backend.sync_calls == [2.5, 5.0]
    assert "sessionguard_versions 2" in result(path, "metrics")["text"]


def test_several_requests_pipelined_on_one_connection(server):
    _, path, _ = server
    reqs = b"".join(orjson.dumps({"jsonrpc": "2.0", "id": i, "method": m}) + b"\n"
                    for i, m in enumerate(["status", "list", "metrics", "status"]))
    with connect(path) as s:
        s.sendall(reqs)
        buf = bytearray()
        ids = [orjson.loads(read_line(s, buf))["id"] for _ in range(4)]
    assert ids == [0, 1, 2, 3]


def test_not_found(server):
    _, path, _ = server
    r = rpc(path, "history", {"sid": "nosuchsession"})
    assert r["error"]["code"] == NOT_FOUND and "nosuchsession" in r["error"]["message"]
    r = rpc(path, "show", {"sid": SID, "version": "ffffffffffff"})
    assert r["error"]["code"] == NOT_FOUND and "ffffffffffff" in r["error"]["message"]
    r = rpc(path, "restore", {"sid": SID, "version": "ffffffffffff"})
    assert r["error"]["code"] == NOT_FOUND
    alive(path)


# -- hostile clients ---------------------------------------------------------------

def _req(method, params=None, rid=7):
    d = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        d["params"] = params
    return orjson.dumps(d)


HOSTILE = [
    ("malformed", b"{not json", PARSE_ERROR, "parse error"),
    ("truncated", b'{"jsonrpc": "2.0", "id": 1, "method": "sta', PARSE_ERROR, "parse error"),
    ("invalid utf8", b'{"jsonrpc": "2.0", "id": 1, "method": "\xff\xfe"}', PARSE_ERROR, "parse error"),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, PARSE_ERROR, "parse error"),
    ("batch", b"[" + _req("status") + b"]", INVALID_REQUEST, "batch requests are not supported"),
    ("empty batch", b"[]", INVALID_REQUEST, "batch"),
    ("string", b'"status"', INVALID_REQUEST, "JSON object"),
    ("number", b"42", INVALID_REQUEST, "JSON object"),
    ("null", b"null", INVALID_REQUEST, "JSON object"),
    ("no jsonrpc", b'{"id": 1, "method": "status"}', INVALID_REQUEST, "jsonrpc"),
    ("jsonrpc 1.0", b'{"jsonrpc": "1.0", "id": 1, "method": "status"}', INVALID_REQUEST, "jsonrpc"),
    ("method not a string", b'{"jsonrpc": "2.0", "id": 1, "method": 5}', INVALID_REQUEST, "method"),
    ("id an object", b'{"jsonrpc": "2.0", "id": {}, "method": "status"}', INVALID_REQUEST, "id"),
    ("unknown member", b'{"jsonrpc": "2.0", "id": 1, "method": "status", "x": 1}', INVALID_REQUEST, "'x'"),
    ("unknown method", _req("rm_rf"), METHOD_NOT_FOUND, "rm_rf"),
    ("private method", _req("_m_restore"), METHOD_NOT_FOUND, "_m_restore"),
    ("params array", _req("history", [SID]), INVALID_PARAMS, "object"),
    ("params string", _req("status", "x"), INVALID_PARAMS, "object"),
    ("wrong type bool", _req("list", {"shrunk_only": "yes"}), INVALID_PARAMS, "shrunk_only"),
    ("wrong type sid", _req("history", {"sid": 12}), INVALID_PARAMS, "sid"),
    ("wrong type version", _req("show", {"sid": SID, "version": 3}), INVALID_PARAMS, "version"),
    ("wrong type messages", _req("show", {"sid": SID, "messages": 1}), INVALID_PARAMS, "messages"),
    ("wrong type dry_run", _req("restore", {"sid": SID, "dry_run": "no"}), INVALID_PARAMS, "dry_run"),
    ("wrong type watch", _req("history", {"sid": SID, "watch": ["a"]}), INVALID_PARAMS, "watch"),
    ("sync timeout string", _req("sync", {"timeout": "5"}), INVALID_PARAMS, "timeout"),
    ("sync timeout negative", _req("sync", {"timeout": -1}), INVALID_PARAMS, "timeout"),
    ("sync timeout bool", _req("sync", {"timeout": True}), INVALID_PARAMS, "timeout"),
    ("sync timeout huge", _req("sync", {"timeout": 1e9}), INVALID_PARAMS, "timeout"),
    ("unknown param", _req("status", {"verbose": True}), INVALID_PARAMS, "verbose"),
    ("unknown param restore", _req("restore", {"sid": SID, "force": True}), INVALID_PARAMS, "force"),
    ("missing sid", _req("history", {}), INVALID_PARAMS, "sid"),
    ("sid with slash", _req("history", {"sid": "a/b"}), INVALID_PARAMS, "sid"),
    ("sid dotdot", _req("restore", {"sid": ".."}), INVALID_PARAMS, "sid"),
    ("sid traversal", _req("show", {"sid": "../../etc/passwd"}), INVALID_PARAMS, "sid"),
    ("sid hidden", _req("diff", {"sid": ".sessionguard"}), INVALID_PARAMS, "sid"),
    ("sid NUL", _req("history", {"sid": "a\u0000b"}), INVALID_PARAMS, "sid"),
    ("sid empty", _req("history", {"sid": ""}), INVALID_PARAMS, "sid"),
    ("version traversal", _req("show", {"sid": SID, "version": "../x"}), INVALID_PARAMS, "version"),
]


@pytest.mark.parametrize("line,code,words", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_request(server, line, code, words):
    _, path, _ = server
    with connect(path) as s:
        s.sendall(line + b"\n")
        resp = orjson.loads(read_line(s))
        assert resp["jsonrpc"] == "2.0"
        assert resp["error"]["code"] == code, resp
        assert words in resp["error"]["message"], resp
        # the same connection still works afterwards
        s.sendall(_req("status", rid="after") + b"\n")
        after = orjson.loads(read_line(s))
        assert after["id"] == "after" and after["result"]["version"] == "test"
    alive(path)


def test_error_echoes_id(server):
    _, path, _ = server
    r = rpc_raw(path, _req("nope", rid="abc") + b"\n")
    assert r["id"] == "abc" and r["error"]["code"] == METHOD_NOT_FOUND
    r = rpc_raw(path, b"{bad\n")
    assert r["id"] is None


def test_notifications_get_no_response(server, world):
    backend, _ = world
    _, path, _ = server
    with connect(path) as s:
        s.sendall(b'{"jsonrpc": "2.0", "method": "sync", "params": {"timeout": 1}}\n'
                  b'{"jsonrpc": "2.0", "method": "no_such_method"}\n'
                  b'{"jsonrpc": "2.0", "method": "list", "params": {"bad": 1}}\n'
                  + _req("status", rid=99) + b"\n")
        first = orjson.loads(read_line(s))
    assert first["id"] == 99 and "result" in first
    assert backend.sync_calls == [1.0]  # the notification was still carried out


def test_blank_lines_ignored_and_last_line_without_newline(server):
    _, path, _ = server
    with connect(path) as s:
        s.sendall(b"\n\r\n  \n" + _req("status", rid=5))
        s.shutdown(socket.SHUT_WR)
        r = orjson.loads(read_line(s))
    assert r["id"] == 5 and "result" in r


@pytest.mark.parametrize("with_newline", [False, True])
def test_line_over_1mib_is_refused_and_dropped(server, with_newline):
    _, path, rec = server
    big = b'{"jsonrpc": "2.0", "id": 1, "method": "status", "params": {"x": "' + b"a" * (1024 * 1024) + b'"}}'
    with connect(path) as s:
        try:
            s.sendall(big + (b"\n" if with_newline else b""))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before reading everything
        buf = bytearray()
        resp = orjson.loads(read_line(s, buf))
        assert resp["error"]["code"] == INVALID_REQUEST
        assert "over 1 MiB" in resp["error"]["message"]
        while s.recv(65536):  # then the server closes the connection
            pass
    assert {"reason": "too_long"}.items() <= rec.named("control.client_dropped")[0].items()
    alive(path)


def test_line_of_exactly_1mib_is_accepted(make_server):
    _, path, _ = make_server(max_line=4096)
    body = _req("status")
    pad = b" " * (4096 - len(body))
    with connect(path) as s:
        s.sendall(body + pad + b"\n")
        assert "result" in orjson.loads(read_line(s))
        s.sendall(body + pad + b" \n")
        assert orjson.loads(read_line(s))["error"]["code"] == INVALID_REQUEST


def test_idle_client_is_dropped(make_server):
    _, path, rec = make_server(idle_timeout=0.2)
    with connect(path) as s:
        assert s.recv(1) == b""  # EOF: dropped (recv itself would time out after 10 s)
    assert rec.named("control.client_dropped")[0]["reason"] == "timeout"
    with connect(path) as s:  # a slow-loris that never finishes its line is dropped too
        s.sendall(b'{"jsonrpc": ')
        assert s.recv(1) == b""
    alive(path)


def test_300_simultaneous_connections(server):
    """The cap (256) holds: the rest get a 'busy' error line and are closed; nobody hangs."""
    _, path, _ = server
    socks = [connect(path) for _ in range(300)]
    try:
        answers = []
        for i, s in enumerate(socks):
            try:
                s.sendall(_req("status", rid=i) + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        for s in socks:
            line = read_line(s)
            answers.append(orjson.loads(line))
    finally:
        for s in socks:
            s.close()
    ok = [a for a in answers if "result" in a]
    busy = [a for a in answers if "error" in a]
    assert all(a["error"]["code"] == BUSY and "too many connections" in a["error"]["message"] for a in busy)
    assert len(ok) == 256 and len(busy) == 44
    alive(path)


class _Blocking(GuardBackend):
    """A backend whose sync and restore block until released (a slow disk)."""

    def __init__(self, base: GuardBackend) -> None:
        super().__init__(list(base.guards.values()))
        self.entered = threading.Event()
        self.release = threading.Event()

    def sync(self, timeout: float) -> bool:
        self.entered.set()
        return self.release.wait(10)

    def restore(self, *a, **kw):
        self.entered.set()
        self.release.wait(10)
        return super().restore(*a, **kw)


@pytest.mark.parametrize("method,params", [("sync", {"timeout": 10}), ("restore", {"sid": SID, "dry_run": True})])
def test_slow_backend_call_blocks_no_one_else(make_server, world, method, params):
    backend = _Blocking(world[0])
    _, path, _ = make_server(backend)
    slow = connect(path)
    try:
        slow.sendall(_req(method, params) + b"\n")
        assert backend.entered.wait(10)
        alive(path)  # answered while the slow call is still blocked
        assert not backend.release.is_set()
        backend.release.set()
        assert "result" in orjson.loads(read_line(slow))
    finally:
        backend.release.set()
        slow.close()


class _Broken(GuardBackend):
    def metrics(self) -> str:
        raise RuntimeError("disk on fire")

    def history(self, sid, watch):
        raise KeyError("bug")  # a KeyError is a bug, not "not found"

    def list_sessions(self, shrunk_only):
        return [{"sid": object()}]  # not JSON-serialisable


@pytest.mark.parametrize("method,params", [("metrics", None), ("history", {"sid": SID}), ("list", None)])
def test_unexpected_exception_is_internal_error(make_server, world, method, params):
    _, path, rec = make_server(_Broken(list(world[0].guards.values())))
    r = rpc(path, method, params)
    assert r["error"]["code"] == INTERNAL_ERROR
    assert "disk on fire" not in r["error"]["message"]  # details go to the log, not to clients
    [ev] = rec.named("control.error")
    assert ev["method"] == method
    alive(path)


# -- authorisation (without other users: see test_ctl.py for real ones) ---------------

def test_peer_credentials_of_a_socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_credentials(a)
    assert peer.pid == os.getpid() and peer.uid == os.geteuid() and peer.gid == os.getegid()
    assert set(os.getgroups()) <= peer.groups | {os.getegid()}


def test_authorize_rules(world, sockdir):
    rec = Recorder()
    srv = ControlServer(world[0], path=os.path.join(sockdir, "x.sock"), logger=rec,
                        read_group="sg-no-such-group-r", admin_group="sg-no-such-group-a")
    srv._read_gid, srv._admin_gid, srv._uid = 5001, 5002, 4000  # as if resolved at start
    from sessionguard.control import _METHODS, RpcError

    def allowed(uid, groups, method):
        try:
            srv._authorize(method, _METHODS[method], Peer(123, uid, 9999, frozenset(groups)))
            return True
        except RpcError as exc:
            assert exc.code == DENIED and exc.data == {"uid": uid, "pid": 123}
            assert method in exc.message
            return False

    assert allowed(0, [], "restore") and allowed(4000, [], "prune")  # root and the daemon's uid
    assert allowed(1, [5001], "list") and not allowed(1, [5001], "restore") and not allowed(1, [5001], "prune")
    assert allowed(1, [5002], "list") and allowed(1, [5002], "restore")
    assert not allowed(1, [7], "status") and not allowed(1, [], "metrics")
    assert [e["method"] for e in rec.named("control.denied")] == ["restore", "prune", "status", "metrics"]


def test_missing_groups_are_logged_and_disabled(make_server):
    srv, path, rec = make_server(read_group="sg-no-such-group-r", admin_group="sg-no-such-group-a")
    assert srv._read_gid is None and srv._admin_gid is None
    assert {e["role"] for e in rec.named("control.group_missing")} == {"read", "admin"}
    alive(path)  # we are root or the daemon's uid


# -- the socket file -----------------------------------------------------------------

def test_socket_mode_and_removal_on_stop(make_server, sockdir):
    srv, path, _ = make_server()
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert os.listdir(sockdir) == ["ctl.sock"]  # no temporary name left behind
    srv.stop()
    assert not os.path.lexists(path)
    srv.stop()  # idempotent


def test_group_of_socket(make_server):
    if os.geteuid() != 0:
        pytest.skip("chown to another group needs root")
    import grp

    try:
        name = grp.getgrnam("nogroup").gr_name
    except KeyError:
        pytest.skip("no 'nogroup' group on this system")
    _, path, _ = make_server(read_group=name)
    assert os.lstat(path).st_gid == grp.getgrnam(name).gr_gid


def test_stale_socket_is_replaced(make_server, sockdir):
    path = os.path.join(sockdir, "ctl.sock")
    old = socket.socket(socket.AF_UNIX)
    old.bind(path)
    old.close()  # a stale socket file: nobody listens
    _, path, _ = make_server(path=path)
    alive(path)


def test_live_socket_is_not_stolen(make_server, sockdir):
    _, path, _ = make_server()
    with pytest.raises(OSError, match="another process is listening"):
        ControlServer(GuardBackend([]), path=path).start()
    alive(path)


@pytest.mark.parametrize("kind", ["file", "symlink", "dir"])
def test_non_socket_at_path_is_refused_and_left_alone(world, sockdir, kind):
    path = os.path.join(sockdir, "ctl.sock")
    target = os.path.join(sockdir, "target")
    Path(target).write_text("precious")
    if kind == "file":
        Path(path).write_text("precious")
    elif kind == "symlink":
        os.symlink(target, path)
    else:
        os.mkdir(path)
    srv = ControlServer(world[0], path=path)
    with pytest.raises(OSError, match="not a socket"):
        srv.start()
    srv.stop()
    assert os.path.lexists(path) and Path(target).read_text() == "precious"
    if kind == "file":
        assert Path(path).read_text() == "precious"


def test_handed_socket_is_served_and_its_file_kept(world, sockdir):
    """Socket activation: the daemon is handed a listening socket; stop() never removes its file."""
    path = os.path.join(sockdir, "activated.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    srv = ControlServer(world[0], sock=lsock, logger=Recorder())
    srv.start()
    try:
        alive(path)
    finally:
        srv.stop()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_stop_with_idle_and_busy_clients(make_server, world):
    backend = _Blocking(world[0])
    srv, path, _ = make_server(backend, stop_grace=0.2)
    idle = connect(path)
    slow = connect(path)
    slow.sendall(_req("sync", {"timeout": 10}) + b"\n")
    assert backend.entered.wait(10)
    srv.stop()  # returns: idle client cancelled, the slow one given its grace, then cut
    assert idle.recv(1) == b""
    backend.release.set()
    idle.close()
    slow.close()
    assert not os.path.lexists(path)


def test_default_socket_path(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket_path() == "/run/sessionguard.sock"
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert default_socket_path() == "/run/user/1234/sessionguard.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == "/tmp/sessionguard-1234.sock"

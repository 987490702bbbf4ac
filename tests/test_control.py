"""The control socket's transport: real Unix sockets, hostile clients, the method table.

The backend is ``sgbackend.CannedBackend``: canned results with no semantics, so these
tests are about what the server itself does (framing, checks, authorisation, error
mapping, the socket file). What results mean is tested on the real daemon
(test_ctl.py, test_admin_story.py, test_fuzz_socket.py); the resource bounds are in
test_control_limits.py.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import socket
import stat
import threading
from pathlib import Path

import orjson
import pytest

from daemonproc import eventually
from sessionguard import errors
from sessionguard.control import Backend, ControlServer
from sessionguard.paths import NO_DEFAULT_SOCKET, default_socket_path
from sessionguard.peers import Access, Peer, peer_credentials
from sessionguard.protocol import (
    BUSY,
    CONFLICT,
    DENIED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    METHODS,
    NOT_FOUND,
    PARSE_ERROR,
    STORE_ERROR,
    TOO_LARGE,
    UNPROCESSABLE,
    Caller,
    LineBuffer,
    LineTooLong,
    RpcError,
)
from sgbackend import CANNED, CannedBackend, Recorder, connect, read_line, result, rmtree, rpc, rpc_raw, short_tmpdir

SID = "abc123def456"


@pytest.fixture
def sockdir():
    d = short_tmpdir()
    yield d
    rmtree(d)


@pytest.fixture
def make_server(sockdir):
    servers: list[ControlServer] = []

    def make(backend=None, **kw) -> tuple[ControlServer, str, Recorder, CannedBackend]:
        rec = Recorder()
        backend = backend or CannedBackend()
        path = kw.pop("path", os.path.join(sockdir, "ctl.sock"))
        srv = ControlServer(backend, path=path, logger=rec, **kw)
        srv.start()
        servers.append(srv)
        return srv, path, rec, backend

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server):
    return make_server()


def alive(path: str) -> None:
    """The server still answers status on a fresh connection."""
    assert result(path, "status")["pid"] == CANNED["status"]["pid"]


def _req(method, params=None, rid=7):
    d = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        d["params"] = params
    return orjson.dumps(d)


# -- the method table drives the server ---------------------------------------------------


def test_backend_protocol_matches_the_method_table():
    """Every method of the table is a Backend method taking exactly its params (keyword-only) and caller."""
    for name, method in METHODS.items():
        sig = inspect.signature(getattr(Backend, name))
        kw = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        positional = [p.name for p in sig.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert positional == ["self"], name
        assert kw == [p.name for p in method.params] + ["caller"], name
    assert {n for n, f in inspect.getmembers(Backend, inspect.isfunction) if not n.startswith("_")} == set(METHODS)


DEFAULTS = {
    "status": {"watch": None},
    "list": {"watch": None, "shrunk_only": False, "intended": False},
    "history": {"sid": SID, "watch": None},
    "show": {"sid": SID, "version": None, "most": False, "watch": None, "messages": False, "first": 0, "limit": None},
    "diff": {"sid": SID, "version": None, "most": False, "watch": None},
    "sync": {"timeout": 5.0},
    "metrics": {},
    "restore": {"sid": SID, "version": None, "most": False, "watch": None, "dry_run": False, "expect": None},
    "recover": {"since": None, "watch": None, "dry_run": False, "undo": None},
    "forget": {"sid": SID, "watch": None, "before": None},
    "prune": {"watch": None},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_gets_checked_params_with_defaults_and_the_caller(server, method):
    _, path, _, backend = server
    params = {"sid": SID} if "sid" in DEFAULTS[method] else None
    assert result(path, method, params) == CANNED[method]  # carried as it is
    [kw] = backend.called(method)
    caller = kw.pop("caller")
    assert kw == DEFAULTS[method]
    assert caller == Caller(os.geteuid(), os.getpid())


def test_params_are_passed_as_given(server):
    _, path, _, backend = server
    given = {"sid": "sub%2Fx", "version": "813c", "most": True, "watch": "/srv/w", "messages": True, "first": 5,
             "limit": 10}
    result(path, "show", given)
    assert {k: v for k, v in backend.called("show")[0].items() if k != "caller"} == given
    result(path, "restore", {"sid": SID, "expect": "ABCDEF0123456789", "dry_run": True})
    assert backend.called("restore")[0]["expect"] == "abcdef0123456789"
    result(path, "recover", {"since": 1764000000, "undo": "r1-2.x", "dry_run": True})
    assert backend.called("recover")[0]["since"] == 1764000000.0


# -- error mapping -------------------------------------------------------------------------

RAISED = [
    (errors.NotFound("no session 'x'"), NOT_FOUND, "no session 'x'"),
    (errors.StoreError("session locked"), STORE_ERROR, "session locked"),
    (errors.SessionLocked("locked by pid 7"), STORE_ERROR, "locked by pid 7"),
    (errors.Conflict("the live file changed"), CONFLICT, "the live file changed"),
    (errors.Unprocessable("cannot be parsed"), UNPROCESSABLE, "cannot be parsed"),
    (OSError(errno.ENOSPC, "No space left on device", "/srv/x.json"), STORE_ERROR,
     "No space left on device: /srv/x.json"),
    (errors.UnsafeSessionFile(errno.ELOOP, "a symlink"), STORE_ERROR, "a symlink"),
]


@pytest.mark.parametrize("exc,code,words", RAISED, ids=[type(r[0]).__name__ for r in RAISED])
def test_errors_raised_on_purpose_are_mapped(make_server, exc, code, words):
    backend = CannedBackend()
    backend.raises["history"] = exc
    _, path, rec, _ = make_server(backend)
    r = rpc(path, "history", {"sid": SID})
    assert r["error"]["code"] == code and words in r["error"]["message"], r
    assert rec.named("control.error") == []
    alive(path)


@pytest.mark.parametrize("case", ["exception", "keyerror", "lookuperror", "unserialisable"])
def test_anything_else_is_an_internal_error_and_logged(make_server, case):
    backend = CannedBackend()
    if case == "exception":
        backend.raises["metrics"] = RuntimeError("disk on fire")
    elif case == "keyerror":
        backend.raises["metrics"] = KeyError("bug")  # a bug, not "not found"
    elif case == "lookuperror":
        backend.raises["metrics"] = LookupError("not one of ours")
    else:
        backend.results["metrics"] = {"text": object()}
    _, path, rec, _ = make_server(backend)
    r = rpc(path, "metrics")
    assert r["error"]["code"] == INTERNAL_ERROR and "disk on fire" not in r["error"]["message"]
    [ev] = rec.named("control.error")
    assert ev["method"] == "metrics" and ev["uid"] == os.geteuid()
    alive(path)


def test_a_result_nested_too_deep_to_encode_is_unprocessable(make_server):
    deep: object = "x"
    for _ in range(300):
        deep = [deep]
    backend = CannedBackend({"show": dict(CANNED["show"], messages=[deep])})
    _, path, rec, _ = make_server(backend)
    r = rpc(path, "show", {"sid": SID, "messages": True})
    assert r["error"]["code"] == UNPROCESSABLE and "byte for byte" in r["error"]["message"]
    assert rec.named("control.error") == []


def test_a_reply_over_the_size_limit_is_refused_with_a_hint(make_server):
    big = dict(CANNED["show"], messages=[{"role": "user", "content": "x" * 1000}] * 200, total=200)
    _, path, _, _ = make_server(CannedBackend({"show": big}), max_reply=64 * 1024)
    with connect(path) as s:
        s.sendall(_req("show", {"sid": SID, "messages": True}, rid="big") + b"\n")
        r = orjson.loads(read_line(s))
        assert r["id"] == "big" and r["error"]["code"] == TOO_LARGE, r
        assert "over the 64 KiB limit" in r["error"]["message"]
        assert "--first 0 --limit 1000" in r["error"]["message"]
        assert r["error"]["data"]["limit"] == 64 * 1024 and r["error"]["data"]["size"] > 64 * 1024
        s.sendall(_req("status", rid="after") + b"\n")  # the connection is still good
        assert orjson.loads(read_line(s))["id"] == "after"


# -- hostile clients ---------------------------------------------------------------------

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
    ("private method", _req("_answer"), METHOD_NOT_FOUND, "_answer"),
    ("dunder method", _req("__init__"), METHOD_NOT_FOUND, "__init__"),
    ("params array", _req("history", [SID]), INVALID_PARAMS, "object"),
    ("params string", _req("status", "x"), INVALID_PARAMS, "object"),
    ("wrong type bool", _req("list", {"shrunk_only": "yes"}), INVALID_PARAMS, "shrunk_only"),
    ("wrong type intended", _req("list", {"intended": 1}), INVALID_PARAMS, "intended"),
    ("wrong type sid", _req("history", {"sid": 12}), INVALID_PARAMS, "sid"),
    ("wrong type version", _req("show", {"sid": SID, "version": 3}), INVALID_PARAMS, "version"),
    ("wrong type messages", _req("show", {"sid": SID, "messages": 1}), INVALID_PARAMS, "messages"),
    ("first negative", _req("show", {"sid": SID, "first": -1}), INVALID_PARAMS, "first"),
    ("first a float", _req("show", {"sid": SID, "first": 1.5}), INVALID_PARAMS, "first"),
    ("first a bool", _req("show", {"sid": SID, "first": True}), INVALID_PARAMS, "first"),
    ("limit zero", _req("show", {"sid": SID, "limit": 0}), INVALID_PARAMS, "limit"),
    ("wrong type most", _req("diff", {"sid": SID, "most": "no"}), INVALID_PARAMS, "most"),
    ("wrong type dry_run", _req("restore", {"sid": SID, "dry_run": "no"}), INVALID_PARAMS, "dry_run"),
    ("expect not hex", _req("restore", {"sid": SID, "expect": "zzzzzzzzzzzzzzzz"}), INVALID_PARAMS, "expect"),
    ("expect too short", _req("restore", {"sid": SID, "expect": "abc"}), INVALID_PARAMS, "expect"),
    ("since a string", _req("recover", {"since": "2h"}), INVALID_PARAMS, "since"),
    ("since negative", _req("recover", {"since": -5}), INVALID_PARAMS, "since"),
    ("before a bool", _req("forget", {"sid": SID, "before": True}), INVALID_PARAMS, "before"),
    ("undo a path", _req("recover", {"undo": "../x"}), INVALID_PARAMS, "undo"),
    ("watch relative", _req("status", {"watch": "sessions"}), INVALID_PARAMS, "watch"),
    ("watch a list", _req("history", {"sid": SID, "watch": ["a"]}), INVALID_PARAMS, "watch"),
    ("watch for metrics", _req("metrics", {"watch": "/srv"}), INVALID_PARAMS, "watch"),
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
    # "x%2F..%2Fetc" is one safe component: whether it names a file is the watch's rule (a
    # recursive watch: no session; a flat watch: a file of that very name) — tested against the
    # real daemon in test_fuzz_socket.py and test_attacks.py, not here.
    ("sid hidden", _req("diff", {"sid": ".sessionguard"}), INVALID_PARAMS, "sid"),
    ("sid NUL", _req("history", {"sid": "a\u0000b"}), INVALID_PARAMS, "sid"),
    ("sid empty", _req("history", {"sid": ""}), INVALID_PARAMS, "sid"),
    ("sid too long", _req("history", {"sid": "a" * 256}), INVALID_PARAMS, "sid"),
    ("version traversal", _req("show", {"sid": SID, "version": "../x"}), INVALID_PARAMS, "version"),
]


@pytest.mark.parametrize("line,code,words", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_request(server, line, code, words):
    _, path, _, backend = server
    with connect(path) as s:
        s.sendall(line + b"\n")
        resp = orjson.loads(read_line(s))
        assert resp["jsonrpc"] == "2.0"
        assert resp["error"]["code"] == code, resp
        assert words in resp["error"]["message"], resp
        # the same connection still works afterwards
        s.sendall(_req("status", rid="after") + b"\n")
        after = orjson.loads(read_line(s))
        assert after["id"] == "after" and after["result"]["pid"] == CANNED["status"]["pid"]
    assert [n for n, _ in backend.calls] == ["status"], "the refused request reached the backend"


def test_error_echoes_id(server):
    _, path, _, _ = server
    r = rpc_raw(path, _req("nope", rid="abc") + b"\n")
    assert r["id"] == "abc" and r["error"]["code"] == METHOD_NOT_FOUND
    r = rpc_raw(path, b'{"jsonrpc": "1.0", "id": 9, "method": "status"}\n')
    assert r["id"] == 9 and r["error"]["code"] == INVALID_REQUEST
    r = rpc_raw(path, b"{bad\n")
    assert r["id"] is None


def test_several_requests_pipelined_on_one_connection(server):
    _, path, _, _ = server
    reqs = b"".join(orjson.dumps({"jsonrpc": "2.0", "id": i, "method": m}) + b"\n"
                    for i, m in enumerate(["status", "list", "metrics", "status"]))
    with connect(path) as s:
        s.sendall(reqs)
        buf = bytearray()
        ids = [orjson.loads(read_line(s, buf))["id"] for _ in range(4)]
    assert ids == [0, 1, 2, 3]


def test_notifications_get_no_response(server):
    _, path, _, backend = server
    with connect(path) as s:
        s.sendall(b'{"jsonrpc": "2.0", "method": "sync", "params": {"timeout": 1}}\n'
                  b'{"jsonrpc": "2.0", "method": "no_such_method"}\n'
                  b'{"jsonrpc": "2.0", "method": "list", "params": {"bad": 1}}\n'
                  + _req("status", rid=99) + b"\n")
        first = orjson.loads(read_line(s))
    assert first["id"] == 99 and "result" in first
    assert [kw["timeout"] for kw in backend.called("sync")] == [1.0]  # the notification was still carried out


def test_blank_lines_ignored_and_last_line_without_newline(server):
    _, path, _, _ = server
    with connect(path) as s:
        s.sendall(b"\n\r\n  \n" + _req("status", rid=5))
        s.shutdown(socket.SHUT_WR)
        r = orjson.loads(read_line(s))
    assert r["id"] == 5 and "result" in r


@pytest.mark.parametrize("with_newline", [False, True])
def test_line_over_1mib_is_refused_and_dropped(server, with_newline):
    _, path, rec, _ = server
    big = b'{"jsonrpc": "2.0", "id": 1, "method": "status", "params": {"x": "' + b"a" * (1024 * 1024) + b'"}}'
    with connect(path) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may close before reading all
            s.sendall(big + (b"\n" if with_newline else b""))
        buf = bytearray()
        resp = orjson.loads(read_line(s, buf))
        assert resp["error"]["code"] == INVALID_REQUEST
        assert "over 1 MiB" in resp["error"]["message"]
        while s.recv(65536):  # then the server closes the connection
            pass
    assert {"reason": "too_long"}.items() <= rec.named("control.client_dropped")[0].items()
    alive(path)


def test_line_of_exactly_the_limit_is_accepted(make_server):
    _, path, _, _ = make_server(max_line=4096)
    body = _req("status")
    pad = b" " * (4096 - len(body))
    with connect(path) as s:
        s.sendall(body + pad + b"\n")
        assert "result" in orjson.loads(read_line(s))
        s.sendall(body + pad + b" \n")
        assert orjson.loads(read_line(s))["error"]["code"] == INVALID_REQUEST


def test_line_buffer_splits_any_chunking_and_bounds_lines():
    lines = LineBuffer(max_line=8)
    got = []
    for ch in b'{"a":1}\n\n{"b":2}\n{"c"':
        lines.feed(bytes([ch]))
        while (line := lines.next_line()) is not None:
            got.append(line)
    assert got == [b'{"a":1}', b"", b'{"b":2}'] and lines.rest() == b'{"c"'
    lines.feed(b"12345")
    with pytest.raises(LineTooLong):
        lines.next_line()


def test_idle_client_is_dropped(make_server):
    _, path, rec, _ = make_server(idle_timeout=0.2)
    with connect(path) as s:
        assert s.recv(1) == b""  # EOF: dropped (recv itself would time out after 10 s)
    assert rec.named("control.client_dropped")[0]["reason"] == "timeout"
    with connect(path) as s:  # a slow-loris that never finishes its line is dropped too
        s.sendall(b'{"jsonrpc": ')
        assert s.recv(1) == b""
    alive(path)


@pytest.mark.parametrize("method,params", [("sync", {"timeout": 10}), ("restore", {"sid": SID, "dry_run": True})])
def test_slow_backend_call_blocks_no_one_else(make_server, method, params):
    backend = CannedBackend()
    release = backend.gates[method] = threading.Event()
    _, path, _, _ = make_server(backend)
    slow = connect(path)
    try:
        slow.sendall(_req(method, params) + b"\n")
        assert backend.entered.wait(10)
        alive(path)  # answered while the slow call is still blocked
        assert not release.is_set()
        release.set()
        assert "result" in orjson.loads(read_line(slow))
    finally:
        release.set()
        slow.close()


# -- authorisation (rules here; with real users in test_ctl.py and test_fuzz_socket.py) ------


def test_peer_credentials_of_a_socketpair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_credentials(a)
    assert peer.pid == os.getpid() and peer.uid == os.geteuid() and peer.gid == os.getegid()
    assert set(os.getgroups()) <= peer.groups | {os.getegid()}


def test_authorize_rules():
    access = Access(4000, "r", "a", read_gid=5001, admin_gid=5002)

    def allowed(uid, groups, method):
        try:
            access.authorize(METHODS[method], Peer(123, uid, 9999, frozenset(groups)))
            return True
        except RpcError as exc:
            assert exc.code == DENIED and exc.data == {"uid": uid, "pid": 123}
            assert method in exc.message
            return False

    assert allowed(0, [], "restore") and allowed(4000, [], "prune") and allowed(0, [], "forget")
    for method, spec in METHODS.items():
        assert allowed(1, [5001], method) is (not spec.admin), method  # the read group: read methods only
        assert allowed(1, [5002], method), method  # the admin group: everything
        assert not allowed(1, [7], method), method  # nobody else: nothing
    assert {m for m, spec in METHODS.items() if spec.admin} == {"restore", "recover", "forget", "prune"}


def test_missing_groups_are_logged_and_disabled(make_server):
    srv, path, rec, _ = make_server(read_group="sg-no-such-group-r", admin_group="sg-no-such-group-a")
    assert srv.access.read_gid is None and srv.access.admin_gid is None
    assert {e["role"] for e in rec.named("control.group_missing")} == {"read", "admin"}
    alive(path)  # we are root or the daemon's uid


def test_a_group_written_in_other_digits_is_a_missing_group_not_a_gid(make_server):
    """A group given as a number is a gid only in ASCII digits: "²" made the daemon fail
    to start (int() refuses it) and "١٢" made the admin group gid 12, somebody else's."""
    srv, path, rec, _ = make_server(read_group="²", admin_group="١٢")
    assert srv.access.read_gid is None and srv.access.admin_gid is None
    assert {e["group"] for e in rec.named("control.group_missing")} == {"²", "١٢"}
    alive(path)


# -- the socket file -----------------------------------------------------------------


def test_socket_mode_and_removal_on_stop(make_server, sockdir):
    srv, path, _, _ = make_server()
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
    _, path, rec, _ = make_server(read_group=name)
    assert os.lstat(path).st_gid == grp.getgrnam(name).gr_gid
    assert rec.named("control.group_unusable") == []


def test_stale_socket_is_replaced(make_server, sockdir):
    path = os.path.join(sockdir, "ctl.sock")
    old = socket.socket(socket.AF_UNIX)
    old.bind(path)
    old.close()  # a stale socket file: nobody listens
    _, path, _, _ = make_server(path=path)
    alive(path)


def test_live_socket_is_not_stolen(make_server):
    _, path, _, _ = make_server()
    with pytest.raises(OSError, match="another process is listening"):
        ControlServer(CannedBackend(), path=path).start()
    alive(path)


@pytest.mark.parametrize("kind", ["file", "symlink", "dir"])
def test_non_socket_at_path_is_refused_and_left_alone(sockdir, kind):
    path = os.path.join(sockdir, "ctl.sock")
    target = os.path.join(sockdir, "target")
    Path(target).write_text("precious")
    if kind == "file":
        Path(path).write_text("precious")
    elif kind == "symlink":
        os.symlink(target, path)
    else:
        os.mkdir(path)
    srv = ControlServer(CannedBackend(), path=path)
    with pytest.raises(OSError, match="not a socket"):
        srv.start()
    srv.stop()
    assert os.path.lexists(path) and Path(target).read_text() == "precious"
    if kind == "file":
        assert Path(path).read_text() == "precious"


def test_handed_socket_is_served_and_its_file_kept(sockdir):
    """Socket activation: the daemon is handed a listening socket; stop() never removes its file."""
    path = os.path.join(sockdir, "activated.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    srv = ControlServer(CannedBackend(), sock=lsock, logger=Recorder())
    srv.start()
    try:
        alive(path)
    finally:
        srv.stop()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_path_or_a_socket_is_required():
    with pytest.raises(ValueError):
        ControlServer(CannedBackend())


def test_stop_with_idle_and_busy_clients(make_server):
    backend = CannedBackend()
    release = backend.gates["sync"] = threading.Event()
    srv, path, _, _ = make_server(backend, stop_grace=0.2)
    idle = connect(path)
    slow = connect(path)
    slow.sendall(_req("sync", {"timeout": 10}) + b"\n")
    assert backend.entered.wait(10)
    srv.stop()  # returns: idle client cancelled, the slow one given its grace, then cut
    assert idle.recv(1) == b""
    release.set()
    idle.close()
    slow.close()
    assert not os.path.lexists(path)


def test_default_socket_path_is_never_in_tmp(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket_path() == "/run/sessionguard.sock"
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert default_socket_path() == "/run/user/1234/sessionguard.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == ""  # none: the daemon says NO_DEFAULT_SOCKET
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert default_socket_path() == ""
    assert "--socket" in NO_DEFAULT_SOCKET and "/tmp" in NO_DEFAULT_SOCKET


def test_busy_reply_shape(make_server):
    """Past the total cap every connection gets one -32002 line and is closed (nobody hangs)."""
    _, path, rec, _ = make_server(max_connections=4, reserved=1)
    socks = [connect(path) for _ in range(6)]
    try:
        for i, s in enumerate(socks):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(_req("status", rid=i) + b"\n")
        answers = [orjson.loads(read_line(s)) for s in socks]
    finally:
        for s in socks:
            s.close()
    busy = [a for a in answers if "error" in a]
    assert len(busy) == 2 and all(a["error"]["code"] == BUSY and "too many connections" in a["error"]["message"]
                                  for a in busy)
    assert len(rec.named("control.busy")) == 1, "logged once per uid, not per refused connection"
    eventually(lambda: "result" in rpc(path, "status"), what="a slot free again once the clients left")

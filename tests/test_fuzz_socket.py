"""Hostile socket clients against the real daemon: a property-based fuzzer (hypothesis).

One real ``sessionguardd`` (a subprocess, real inotify, real files) serves the
whole module. Its tmp root holds two watches with real sessions (``beta``
has a kept 1000-message version), a *canary* directory outside every watch and
store (files with known bytes and a session-like ``victim.json``), and
symlinks inside a watch that point at the canary. Hypothesis then throws at
the control socket:

* well-formed JSON-RPC requests: every method plus random names, params with
  hostile keys and values (ids with ``/``, ``..``, ``%2F``-encoded traversals,
  absolute paths, NUL, over-long strings, non-strings, nested values, huge
  integers, NaN/Infinity), ids of every type, notifications, pipelined;
* valid JSON that is not an object (batches, numbers, strings, null);
* raw bytes: binary junk, invalid UTF-8, mutated requests, lines without a
  newline before EOF, half-closed and abandoned connections;
* lines around and far beyond the 1 MiB line limit;
* the same requests from unprivileged peers (uid 65534): a read-group member
  and an outsider, connected by a helper process running as that user that
  hands the connected socket back over ``SCM_RIGHTS`` (``SO_PEERCRED`` is
  fixed at ``connect()``, so the daemon sees the helper's credentials).

Properties, per example: every line that is not a notification gets exactly
one JSON-RPC response object (the right id, a result or an error with an
integer code and a message; never -32603), in order, and garbage beyond the
limits gets one error and a clean close; nothing hangs (socket timeouts);
a fresh ``status`` call succeeds afterwards; ids that name no session never
get a result; peers get exactly what their group allows (-32001 for every
method they may not call, whatever the params); nothing outside the stores
(the canary, the live session files, the symlinks) changed and no store folder
appeared. Every id in the hostile list is also sent once to every method that
takes an id (not left to chance). After all examples (the last test, in file
order): the canary is byte-identical, no file appeared anywhere under the tmp
root outside the watches and their stores, the store holds folders only for
the real sessions, beta's version is still there, and the daemon logged no
``worker.error``, ``maintenance.error``, ``control.error`` or traceback. A
valid restore (and a restore over a live file replaced by a symlink to the
canary) is tested once, on its own daemon.

Reproducing: the CI run is derandomised (the same inputs every time, ~5,000
examples). A soak with fresh random inputs: ``SG_FUZZ_EXAMPLES=20000
.venv/bin/python -m pytest tests/test_fuzz_socket.py -s`` (20,000 root requests,
the other strategies scaled alike; a few minutes); hypothesis then prints a
``@reproduce_failure`` blob for any failure (``--hypothesis-seed=N`` fixes the
seed). ``-s`` shows the figures (examples per strategy, time).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from daemonproc import DaemonProc, eventually
from sessionguard import Guard
from sessionguard.protocol import (
    DENIED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_LINE,
    METHOD_NOT_FOUND,
    METHODS,
    NOT_FOUND,
    PARSE_ERROR,
)
from sessionguard.watch import COOKIE_PREFIX
from sgbackend import rmtree, short_tmpdir
from sghelpers import IS_ROOT, make_session, server_write

# -- budget ----------------------------------------------------------------------------

#: ``SG_FUZZ_EXAMPLES=N``: a soak with fresh random inputs, N examples of root requests
#: (2000 in CI) and the other strategies scaled alike (never below their CI budget).
SOAK = int(os.environ.get("SG_FUZZ_EXAMPLES", "0") or 0)


def budget(n: int) -> int:
    """Examples for a strategy whose CI budget is *n*."""
    return max(n, n * SOAK // 2000)


FUZZ = settings(
    deadline=None,
    derandomize=not SOAK,  # CI: the same inputs every run; a soak explores new ones
    database=None,  # no example database: derandomised, or print_blob reproduces a failure
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)

IO_TIMEOUT = 30.0  # a generous bound: hitting it means the daemon hung, not that it was slow
READ_METHODS = sorted(m for m, spec in METHODS.items() if not spec.admin)
ADMIN_METHODS = sorted(m for m, spec in METHODS.items() if spec.admin)
SID_METHODS = sorted(m for m, spec in METHODS.items() if spec.takes("sid"))

# -- the world ---------------------------------------------------------------------------

#: Real sessions: (watch key, sid). ``dup`` is in both watches; ``sub%2Fdelta`` is in a sub-directory.
REAL = {("w1", "alpha"), ("w1", "beta"), ("w1", "gamma"), ("w1", "dup"), ("w2", "dup"), ("w2", "sub%2Fdelta")}
REAL_SIDS = frozenset(sid for _, sid in REAL)
#: Ids of files inside a watch that are no sessions but whose ``<id>.json`` exists: the
#: server's own index, a symlink to the canary, a file reached through the symlinked
#: directory ``canarydir``. They must be treated like any other unknown id.
NON_SESSION_FILES = frozenset({"_index", "canary", "canarydir%2Fvictim"})


READER_GID = 65534  # nogroup: the daemon's read_group
OUTSIDER_GID = 54321  # a gid no group name has


@dataclass
class World:
    root: Path
    w1: Path
    w2: Path
    canary: Path
    run: Path
    daemon: DaemonProc
    tree: dict[str, tuple]
    store_folders: dict[str, set[str]]
    beta_version: str
    started: float = 0.0
    counts: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    responses: Counter = field(default_factory=Counter)

    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example
        return f"World({self.root})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def subst(self) -> dict[str, str]:
        return {"{root}": str(self.root), "{w1}": str(self.w1), "{w2}": str(self.w2),
                "{canary}": str(self.canary), "{canary_enc}": str(self.canary).replace("/", "%2F"),
                "{w1_enc}": str(self.w1).replace("/", "%2F"), "{beta_version}": self.beta_version}


def _file_state(path: str, st: os.stat_result) -> tuple:
    if stat.S_ISREG(st.st_mode):
        return ("file", hashlib.sha256(Path(path).read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns,
                st.st_mode, st.st_uid, st.st_gid, st.st_nlink)
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(path), st.st_ino, st.st_mtime_ns)
    if stat.S_ISDIR(st.st_mode):
        return ("dir", st.st_mode, st.st_uid, st.st_gid)
    return ("other", stat.S_IFMT(st.st_mode), st.st_ino)


def tree_state(root: Path, skip: set[Path]) -> dict[str, tuple]:
    """Every path under *root* (symlinks not followed), except the sub-trees in *skip*
    and the daemon's transient ``sync`` cookies."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in dirnames + filenames:
            if name.startswith(COOKIE_PREFIX):
                continue
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = _file_state(p, os.lstat(p))
    return out


def store_folders(watch: Path) -> set[str]:
    """Every id the store holds anything for: a pin (``pins/<sid>``) or versions (``sessions/<sid>/``)."""
    store = watch / ".sessionguard"
    return set(os.listdir(store / "pins")) | set(os.listdir(store / "sessions"))


def _write_config(path: Path, w1: Path, w2: Path) -> None:
    path.write_text(f"""\
[daemon]
read_group = "nogroup"
admin_group = "daemon"

[[watch]]
path = "{w1}"

[[watch]]
path = "{w2}"
recursive = true
""")


def build_world(root: Path) -> tuple[Path, Path, Path, Path, Path]:
    """Sessions, the canary outside every watch, symlinks from a watch into the canary."""
    w1, w2, canary, run = root / "w1", root / "w2", root / "canary", root / "run"
    for d in (w1, w2, w2 / "sub", canary, canary / "sub", run):
        d.mkdir()
    os.chmod(run, 0o755)  # the unprivileged peers reach the socket; nothing else is theirs
    (canary / "secret.bin").write_bytes(bytes(range(256)) * 16)
    (canary / "victim.json").write_bytes(orjson.dumps(make_session(50, "victim")))
    (canary / "sub" / "x.json").write_bytes(orjson.dumps(make_session(3, "x")))
    server_write(w1 / "alpha.json", make_session(5, "alpha"))
    server_write(w1 / "beta.json", make_session(1000, "beta"))
    server_write(w1 / "gamma.json", make_session(20, "gamma"))
    server_write(w1 / "dup.json", make_session(4, "dup"))
    (w1 / "_index.json").write_bytes(orjson.dumps([{"session_id": "alpha"}]))
    os.symlink(canary / "victim.json", w1 / "canary.json")
    os.symlink(canary, w1 / "canarydir")
    server_write(w2 / "dup.json", make_session(6, "dup"))
    server_write(w2 / "sub" / "delta.json", make_session(7, "delta"))
    config = run / "sessionguard.toml"
    _write_config(config, w1, w2)
    return w1, w2, canary, run, config


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(short_tmpdir("sgfuzz"))  # short: the socket path must fit sun_path
    os.chmod(root, 0o711)
    d: DaemonProc | None = None
    try:
        w1, w2, canary, run, config = build_world(root)
        d = DaemonProc(run, ["--config", str(config)]).started()
        server_write(w1 / "beta.json", make_session(0, "beta"))  # the wipe: 1000 -> 0
        beta = eventually(lambda: next((v for v in Guard(w1).versions("beta") if v.count == 1000), None),
                          what="the kept 1000-message version of beta")
        d.sync()
        os.chmod(d.socket, 0o666)  # let every test peer connect: SO_PEERCRED alone decides
        skip = {w1 / ".sessionguard", w2 / ".sessionguard", run}
        w = World(root, w1, w2, canary, run, d, tree=tree_state(root, skip),
                  store_folders={"w1": store_folders(w1), "w2": store_folders(w2)}, beta_version=beta.name)
        assert w.store_folders == {"w1": {"alpha", "beta", "gamma", "dup"}, "w2": {"dup", "sub%2Fdelta"}}
        w.started = time.monotonic()
        yield w
    finally:
        if d is not None:
            d.stop()
        rmtree(str(root))


def outside_stores(w: World) -> dict[str, tuple]:
    return tree_state(w.root, {w.w1 / ".sessionguard", w.w2 / ".sessionguard", w.run})


def check_the_aftermath(w: World) -> None:
    """After every example: nothing outside the stores touched, no stray store folder, no bug logged."""
    w.daemon.assert_alive()
    w.daemon.sync()
    for watch in (w.w1, w.w2):  # sync cookies of abandoned sync calls are removed by their callers
        eventually(lambda watch=watch: not [n for n in os.listdir(watch) if n.startswith(COOKIE_PREFIX)],
                   what=f"no sync cookie left in {watch}")
    assert outside_stores(w) == w.tree, "a file outside the stores changed, appeared or vanished"
    assert sorted(os.listdir(w.run)) == sorted(["sessionguard.toml", "sg.sock", w.daemon.logfile.name])
    assert {"w1": store_folders(w.w1), "w2": store_folders(w.w2)} == w.store_folders, \
        "the store holds a folder for an id that is no session"
    assert any(v.name == w.beta_version for v in Guard(w.w1).versions("beta")), "beta's version is gone"
    bugs = [e for e in w.daemon.events()
            if e.get("event") in ("worker.error", "maintenance.error", "control.error", "daemon.failed")]
    assert not bugs, bugs
    assert "Traceback" not in w.daemon.text()


def report(w: World, seconds: float) -> None:
    print(f"\n[fuzz] socket fuzz: {sum(w.counts.values())} examples in {seconds:.1f} s "
          f"({'soak, random' if SOAK else 'derandomised'})")
    for name in sorted(w.counts):
        print(f"[fuzz]   {name:<22} {w.counts[name]:>6} examples {w.seconds[name]:7.1f} s")
    print(f"[fuzz]   responses checked: {sum(w.responses.values())} "
          + ", ".join(f"{k}={v}" for k, v in sorted(w.responses.items())))


# -- connections ---------------------------------------------------------------------------

Connector = Callable[[], socket.socket]


def own_connection(w: World) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(IO_TIMEOUT)
    s.connect(w.daemon.socket)
    return s


HELPER = r"""
import os, socket, sys
ctrl = socket.socket(fileno=int(sys.argv[1]))
while ctrl.recv(1):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sys.argv[2])
    except OSError as exc:
        ctrl.send(b"E" + str(exc).encode())
    else:
        socket.send_fds(ctrl, [b"K%d %d %d" % (os.getuid(), os.getgid(), os.getpid())], [s.fileno()])
    s.close()
"""


class Unprivileged:
    """A helper process running as *uid:gid* (no supplementary groups) that connects to the
    daemon for us and passes the connected socket back: the daemon sees its credentials."""

    def __init__(self, sock_path: str, uid: int, gid: int) -> None:
        self.ctrl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctrl.settimeout(IO_TIMEOUT)
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
             "/usr/bin/python3", "-c", HELPER, str(child.fileno()), sock_path],
            pass_fds=[child.fileno()], env={"PATH": "/usr/bin:/bin"})
        child.close()
        self.uid, self.gid = uid, gid

    def connect(self) -> socket.socket:
        self.ctrl.send(b"c")
        msg, fds, _, _ = socket.recv_fds(self.ctrl, 4096, 1)
        assert msg.startswith(b"K") and fds, f"the unprivileged helper could not connect: {msg!r}"
        uid, gid, _ = map(int, msg[1:].split())
        assert (uid, gid) == (self.uid, self.gid)
        s = socket.socket(fileno=fds[0])
        s.settimeout(IO_TIMEOUT)
        return s

    def close(self) -> None:
        self.ctrl.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def peers(world: World) -> Iterator[dict[str, Unprivileged]]:
    if not IS_ROOT:
        pytest.skip("needs root: runs peers as uid 65534")
    if not os.path.exists("/usr/bin/python3") or shutil.which("setpriv") is None:
        pytest.skip("needs setpriv and /usr/bin/python3 for the unprivileged peers")
    made = {"reader": Unprivileged(world.daemon.socket, 65534, READER_GID),
            "outsider": Unprivileged(world.daemon.socket, 65534, OUTSIDER_GID)}
    try:
        for p in made.values():
            p.connect().close()  # fail here, clearly, if the helper cannot run
        yield made
    finally:
        for p in made.values():
            p.close()


@dataclass
class Exchange:
    lines: list[bytes]
    eof: bool


def exchange(connect: Connector, payload: bytes, mode: str, want: int | None = None,
             role: str = "root") -> Exchange:
    """Send *payload* and collect response lines.

    ``halfclose``: shut our write side after sending, read to EOF (the daemon must close).
    ``keepalive``: read *want* lines, then the caller goes on using the connection.
    ``abandon``: close right after sending, read nothing.
    The payload is sent from a thread so a big request cannot deadlock against big answers.
    """
    s = connect()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            s.sendall(payload)
            if mode == "halfclose":
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may close before reading all of an over-long line
        except BaseException as exc:
            errors.append(exc)

    if mode == "abandon":
        send()
        s.close()
        return Exchange([], False)
    t = threading.Thread(target=send, daemon=True)
    t.start()
    buf = bytearray()
    lines: list[bytes] = []
    eof = False
    try:
        while want is None or len(lines) < want:
            try:
                chunk = s.recv(1 << 20)
            except TimeoutError:
                raise AssertionError(f"the daemon did not answer within {IO_TIMEOUT} s (hang); "
                                     f"got {len(lines)} lines") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                eof = True
                break
            buf += chunk
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                lines.append(line)
        t.join(IO_TIMEOUT)
        assert not t.is_alive(), "sending the request hung"
        if errors:
            raise errors[0]
        if eof:
            assert not buf, f"the daemon closed mid-line: {bytes(buf[:200])!r}"
        if mode == "keepalive":
            s.sendall(b'{"jsonrpc": "2.0", "id": "after", "method": "status"}\n')
            after = _read_one(s)
            answered = "result" in after if role != "outsider" else after["error"]["code"] == DENIED
            assert after.get("id") == "after" and answered, \
                f"the connection is out of step after the example (an extra or missing response?): {after}"
    finally:
        s.close()
    return Exchange(lines, eof)


def _read_one(s: socket.socket) -> dict[str, Any]:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, "the daemon closed the connection instead of answering"
        buf += chunk
    return orjson.loads(bytes(buf).partition(b"\n")[0])


def alive(w: World) -> None:
    """A fresh connection gets a status answer: the daemon survived the example."""
    w.daemon.assert_alive()
    assert w.daemon.call("status", timeout=IO_TIMEOUT)["pid"] == w.daemon.proc.pid


# -- the oracle ------------------------------------------------------------------------------

@dataclass
class Expect:
    """What one request line must get back: *id* echoed, and a code in *codes*
    (None: a result or any error but -32603; a set containing "result": that too)."""

    id: Any
    codes: frozenset | None = None
    line: bytes = b""


def _valid_id(rid: Any) -> bool:
    return rid is None or (isinstance(rid, (str, int, float)) and not isinstance(rid, bool))


def envelope(line: bytes) -> tuple[Expect | None, dict[str, Any] | None]:
    """JSON-RPC 2.0's rules for one line: (what it must get, the request if well-formed).
    (None, req) is a notification, which must get nothing back."""
    try:
        req = orjson.loads(line)
    except orjson.JSONDecodeError:
        return Expect(None, frozenset({PARSE_ERROR}), line), None
    if not isinstance(req, dict):
        return Expect(None, frozenset({INVALID_REQUEST}), line), None
    rid = req.get("id")
    if not _valid_id(rid):
        return Expect(None, frozenset({INVALID_REQUEST}), line), None
    bad = (req.get("jsonrpc") != "2.0" or set(req) - {"jsonrpc", "id", "method", "params"}
           or not isinstance(req.get("method"), str))
    if bad:
        return Expect(rid, frozenset({INVALID_REQUEST}), line), None
    if "id" not in req:
        return None, req
    return Expect(rid, None, line), req


def refine(exp: Expect, req: dict[str, Any], role: str) -> Expect:
    """The documented answer for a well-formed request from a peer in *role*
    (root, reader: read methods only, outsider: nothing)."""
    method = req["method"]
    spec = METHODS.get(method)
    if spec is None:
        return Expect(exp.id, frozenset({METHOD_NOT_FOUND}), exp.line)
    if role == "outsider" or (role == "reader" and spec.admin):
        return Expect(exp.id, frozenset({DENIED}), exp.line)
    params = req.get("params")
    if method in SID_METHODS and isinstance(params, dict) and isinstance(params.get("sid"), str):
        sid = params["sid"]
        if sid not in REAL_SIDS:
            # an id that names no session: refused or not found, never a result
            return Expect(exp.id, frozenset({INVALID_PARAMS, NOT_FOUND}), exp.line)
    return exp


def expectations(payload: bytes, role: str, *, eof: bool) -> tuple[list[Expect], bool]:
    """What the daemon must answer to *payload*, in order, and whether it must then close
    (a line over the limit). Without *eof* a last line lacking its newline is not answered yet."""
    out: list[Expect] = []
    segments = payload.split(b"\n")
    last = segments.pop()  # after the last newline: a partial line
    if eof and last:
        segments.append(last)
    for seg in segments:
        if len(seg) > MAX_LINE:
            out.append(Expect(None, frozenset({INVALID_REQUEST}), seg[:100]))
            return out, True
        if not seg.strip():
            continue
        exp, req = envelope(seg)
        if exp is None:
            continue  # a notification
        out.append(refine(exp, req, role) if req is not None else exp)
    if not eof and len(last) > MAX_LINE:
        out.append(Expect(None, frozenset({INVALID_REQUEST}), last[:100]))
        return out, True
    return out, False


def check(w: World, exps: list[Expect], got: list[bytes], role: str) -> None:
    assert len(got) == len(exps), (f"{len(exps)} answers expected, {len(got)} received:\n"
                                   + "\n".join(g[:300].decode("utf-8", "replace") for g in got))
    for exp, raw in zip(exps, got, strict=False):
        resp = orjson.loads(raw)
        note(f"request {exp.line[:300]!r} -> {raw[:300]!r}")
        assert isinstance(resp, dict) and resp.get("jsonrpc") == "2.0" and "id" in resp, resp
        assert set(resp) in ({"jsonrpc", "id", "result"}, {"jsonrpc", "id", "error"}), resp
        assert resp["id"] == exp.id, (resp, exp)
        if "error" in resp:
            err = resp["error"]
            assert isinstance(err, dict) and set(err) <= {"code", "message", "data"}, err
            assert type(err["code"]) is int and isinstance(err["message"], str) and err["message"], err
            assert err["code"] != INTERNAL_ERROR, f"internal error (a bug): {err}"
            if exp.codes is not None:
                assert err["code"] in exp.codes, (err, exp)
            if err["code"] == DENIED:
                assert err["data"]["uid"] == (0 if role == "root" else 65534), err
            w.responses[f"error {err['code']}"] += 1
        else:
            assert exp.codes is None or "result" in exp.codes, f"a result where an error was due: {resp} {exp}"
            result = resp["result"]
            if isinstance(result, dict) and "sessions" in result and isinstance(result["sessions"], list):
                leaked = {s["sid"] for s in result["sessions"]} - REAL_SIDS
                assert not leaked, f"list shows ids that are no session: {leaked}"
            w.responses["result"] += 1


# -- strategies --------------------------------------------------------------------------------

#: Strings aimed at paths. ``{...}`` is replaced by the world's real paths at run time.
HOSTILE_STRINGS = [
    "", "/", ".", "..", "...", "./beta", "../beta", "../../canary/victim", "../canary/victim",
    "../" * 40 + "etc/passwd", "{canary}/victim", "{canary}", "{w1}/beta", "{root}", "/etc/shadow",
    "\0", "beta\0", "\0../x", "a" * 255, "a" * 256, "é" * 128, "x" * 5000, "%2F..", "beta%2F..",
    "x%2F..%2F..%2Fcanary%2Fvictim", "canarydir%2Fvictim", "canarydir%2F..%2Fw1%2Fbeta",
    "{canary_enc}%2Fvictim", "{w1_enc}%2Fbeta", "%2Fetc%2Fpasswd", "%2F", "sub%2F..%2F..%2Fcanary%2Fvictim",
    "sub%2F..%2F..%2Fw1%2Fbeta", "sub%2F%2Fdelta", "sub%2F.%2Fdelta", "sub%252Fdelta", "sub%2Fdelta%2F..",
    "sub%2F", "%2Fdelta", ".sessionguard", "sessions", "beta.json", "beta/", "~", "~root", "$HOME",
    "*", "?", "[a-z]*", "beta\n", " beta", "beta ", "BETA", "\u202ebeta", "be\u0301ta", "beta\\..\\..",
    "canarydir", "canary", "_index", "{beta_version}", "{beta_version}/../x",
]
REAL_STRINGS = [*sorted(REAL_SIDS), "{w1}", "{w2}", "{beta_version}", "0", "a", "f", "1", "2"]
BIG_INTS = [2 ** 63 - 1, 2 ** 63, -(2 ** 63) - 1, 2 ** 64, 10 ** 30, -(10 ** 30)]

hostile_strings = st.sampled_from(HOSTILE_STRINGS)
strings = st.one_of(hostile_strings, st.sampled_from(REAL_STRINGS), st.text(max_size=30))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.sampled_from(BIG_INTS),
    st.floats(allow_nan=True, allow_infinity=True), strings,
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(strings, inner, max_size=3), max_leaves=8)
PARAM_NAMES = sorted({p.name for spec in METHODS.values() for p in spec.params})
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "sid": st.one_of(hostile_strings, hostile_strings, strings),
    "watch": st.one_of(st.none(), strings), "version": st.one_of(st.none(), strings),
    "messages": st.booleans(), "dry_run": st.booleans(), "shrunk_only": st.booleans(), "intended": st.booleans(),
    "most": st.booleans(), "timeout": st.floats(0.001, 3),
    "first": st.one_of(st.integers(-3, 2000), st.sampled_from(BIG_INTS)),
    "limit": st.one_of(st.none(), st.integers(-3, 2000)),
    "expect": st.one_of(st.none(), st.text("0123456789abcdefABCDEFg", min_size=15, max_size=17), strings),
    "since": st.one_of(st.none(), st.floats(-10, 2e9), st.integers(-10, 2 * 10**9), strings),
    "before": st.one_of(st.none(), st.floats(-10, 2e9), strings),
    "undo": st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True), strings),
}
known_methods = st.sampled_from(sorted(METHODS))
methods = st.one_of(  # repeated branches weigh the real methods 3:1:1
    known_methods, known_methods, known_methods,
    st.sampled_from(["_m_status", "_call", "__init__", "stop", "_shutdown", "STATUS", "status ", " status",
                     "rpc.discover", "system.listMethods", "restore\0", "status\n", ""]),
    st.text(max_size=20),
)


@st.composite
def params_for(draw: st.DrawFn, method: str) -> Any:
    spec = METHODS.get(method)
    names = [p.name for p in spec.params] if spec else []
    shape = draw(st.sampled_from(["by-name"] * 5 + ["extra", "absent", "null", "other"]))
    if shape == "absent":
        return _ABSENT
    if shape == "null":
        return None
    if shape == "other":  # by-position or scalar params
        return draw(st.one_of(st.lists(values, max_size=3), scalars))
    out = {}
    for n in names:
        if n == "sid" or draw(st.booleans()):
            out[n] = draw(st.one_of(PLAUSIBLE.get(n, values), values))
    if shape == "extra":
        out.update(draw(st.dictionaries(st.one_of(st.sampled_from(PARAM_NAMES), strings), values,
                                        min_size=1, max_size=3)))
    return out


_ABSENT = object()
ids = st.one_of(st.integers(-(2 ** 70), 2 ** 70), strings, st.none(), st.floats(allow_nan=True),
                st.booleans(), st.lists(scalars, max_size=2), st.dictionaries(strings, scalars, max_size=2),
                st.just(_ABSENT))


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON-RPC request as a dict, mostly well-formed, sometimes with a bent envelope."""
    method = draw(methods)
    req: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    rid = draw(ids)
    if rid is not _ABSENT:
        req["id"] = rid
    params = draw(params_for(method))
    if params is not _ABSENT:
        req["params"] = params
    bend = draw(st.sampled_from(["none"] * 8 + ["jsonrpc", "no-jsonrpc", "member", "method-type"]))
    if bend == "jsonrpc":
        req["jsonrpc"] = draw(st.sampled_from(["1.0", "2", 2.0, 2, None, "2.0 ", ""]))
    elif bend == "no-jsonrpc":
        del req["jsonrpc"]
    elif bend == "member":
        req[draw(st.sampled_from(["x", "result", "error", "Method", "ID", "jsonrpc "]))] = draw(values)
    elif bend == "method-type":
        req["method"] = draw(st.one_of(st.integers(), st.none(), st.lists(st.just("status"), max_size=2)))
    return req


def render(value: Any, w: World) -> Any:
    """Put the world's real paths into ``{...}`` placeholders."""
    if isinstance(value, str):
        for k, v in w.subst().items():
            value = value.replace(k, v)
        return value
    if isinstance(value, list):
        return [render(x, w) for x in value]
    if isinstance(value, dict):
        return {render(k, w): render(v, w) for k, v in value.items()}
    return value


def made_safe(req: dict[str, Any]) -> dict[str, Any]:
    """The live files and the store must stay as they are (a valid restore is tested once, on
    its own daemon): a real session id reaches ``restore`` only as a dry run, ``recover`` runs
    only as a dry run, and ``forget`` never gets a real session id. Invalid ``dry_run`` values
    stay: they are refused before anything happens."""
    params = req.get("params")
    method = req.get("method")
    if method == "recover" and params is None:  # absent or null: the defaults, so not a dry run
        return dict(req, params={"dry_run": True})
    if not isinstance(params, dict):
        return req
    if method == "restore" and isinstance(params.get("sid"), str) and params["sid"] in REAL_SIDS \
            and params.get("dry_run", False) is False:
        return dict(req, params=dict(params, dry_run=True))
    if method == "recover" and params.get("dry_run", False) is False:
        return dict(req, params=dict(params, dry_run=True))
    if method == "forget" and isinstance(params.get("sid"), str) and params["sid"] in REAL_SIDS:
        return dict(req, params=dict(params, sid="no-such-session"))
    return req


def encode(req: Any, ascii_only: bool) -> bytes:
    """Stdlib json: huge integers survive as digits, NaN/Infinity come out as the invalid
    JSON tokens a careless client sends."""
    return json.dumps(req, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
non_objects = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=4),
    st.lists(st.lists(json_scalars, max_size=3), max_size=3),
    st.lists(requests(), min_size=0, max_size=3),  # batches
)


@st.composite
def raw_payloads(draw: st.DrawFn) -> bytes:
    """Bytes a broken or malicious client sends: junk, invalid UTF-8, mutated requests."""
    def mutated() -> bytes:
        method = draw(st.sampled_from(sorted(m for m in METHODS if m not in ("recover", "forget"))))
        params = {"sid": "beta", "dry_run": True} if method == "restore" else {"sid": "beta"}  # see made_safe
        line = bytearray(encode({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, True))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(line)))
            op = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
            if op == "flip" and i < len(line):
                line[i] ^= draw(st.integers(1, 255))
            elif op == "insert":
                line[i:i] = draw(st.binary(min_size=1, max_size=4))
            elif op == "delete" and i < len(line):
                del line[i]
            elif op == "cut":
                del line[i:]
        return bytes(line)

    frag = st.one_of(
        st.binary(max_size=120),
        st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"\r",
                         b"\x1b[2J", b"\xef\xbb\xbf{}", b"{", b"}", b'"', b"\\", b" \t "]),
        st.builds(lambda junk: b'{"jsonrpc": "2.0", "id": 1, "method": "' + junk + b'"}',
                  st.binary(min_size=1, max_size=8)),
        st.builds(lambda junk: b'{"jsonrpc": "2.0", "id": 2, "method": "history", "params": {"sid": "'
                  + junk + b'"}}', st.binary(min_size=1, max_size=8)),
        st.builds(lambda: b""),
    )
    parts = [draw(frag) if draw(st.integers(0, 3)) else mutated() for _ in range(draw(st.integers(1, 6)))]
    seps = [draw(st.sampled_from([b"\n", b"\r\n", b"", b"\n\n"])) for _ in parts]
    return b"".join(p + s for p, s in zip(parts, seps, strict=False))


# -- running one example ---------------------------------------------------------------------------

def run_payload(w: World, payload: bytes, mode: str, role: str, connect: Connector, name: str) -> None:
    t0 = time.monotonic()
    note(f"mode={mode} role={role} payload={payload[:2000]!r}{'…' if len(payload) > 2000 else ''}")
    tree, folders = outside_stores(w), {"w1": store_folders(w.w1), "w2": store_folders(w.w2)}
    if mode == "abandon":
        exchange(connect, payload, mode)
    else:
        exps, closes = expectations(payload, role, eof=(mode == "halfclose"))
        if closes:
            mode = "halfclose"  # the daemon closes; nothing more can be said on this connection
            w.responses["closed: line over the limit"] += 1
        got = exchange(connect, payload, mode, want=None if mode == "halfclose" else len(exps), role=role)
        check(w, exps, got.lines, role)
        if mode == "halfclose":
            assert got.eof, "the daemon did not close after our EOF"
    alive(w)
    untouched(w, tree, folders)
    w.counts[name] += 1
    w.seconds[name] += time.monotonic() - t0


def untouched(w: World, tree_before: dict[str, tuple], folders_before: dict[str, set[str]]) -> None:
    """Nothing outside the stores changed, and no store folder appeared during this example
    (compared with the state before it, so one failure does not fail every later example;
    the aftermath test compares with the start). A stray folder is removed before failing,
    so hypothesis can replay and shrink the example."""
    if outside_stores(w) != tree_before:
        w.daemon.sync()  # an abandoned connection's sync may still hold its cookie
    assert outside_stores(w) == tree_before, "a file outside the stores changed, appeared or vanished"
    for key, watch in (("w1", w.w1), ("w2", w.w2)):
        new = store_folders(watch) - folders_before[key]
        for name in new:
            rmtree(str(watch / ".sessionguard" / "sessions" / name))
            (watch / ".sessionguard" / "pins" / name).unlink(missing_ok=True)
        assert not new, f"the store of {key} got a folder for an id that is no session: {sorted(new)}"


def connector(w: World, peers: dict[str, Unprivileged] | None, role: str) -> Connector:
    return (lambda: own_connection(w)) if role == "root" else peers[role].connect


def request_lines(w: World, reqs: list[dict[str, Any]], blank: list[bool], ascii_only: bool) -> bytes:
    out = b""
    for req, b in zip(reqs, blank, strict=False):
        out += encode(made_safe(render(req, w)), ascii_only) + b"\n" + (b"\n \r\n" if b else b"")
    return out


pipelines = st.tuples(st.lists(requests(), min_size=1, max_size=4), st.lists(st.booleans(), min_size=4, max_size=4),
                      st.booleans(), st.sampled_from(["keepalive", "keepalive", "halfclose", "abandon"]))


@settings(FUZZ, max_examples=budget(2000))
@given(pipeline=pipelines)
def test_json_rpc_requests(world, pipeline) -> None:
    """Every method and random ones, hostile params and ids, pipelined, from root."""
    reqs, blank, ascii_only, mode = pipeline
    run_payload(world, request_lines(world, reqs, blank, ascii_only), mode, "root",
                connector(world, None, "root"), "requests (root)")


@settings(FUZZ, max_examples=budget(300))
@given(values=st.lists(non_objects, min_size=1, max_size=3),
       mode=st.sampled_from(["keepalive", "halfclose", "abandon"]))
def test_json_that_is_not_an_object(world, values, mode) -> None:
    payload = b"".join(encode(render(v, world), True) + b"\n" for v in values)
    run_payload(world, payload, mode, "root", connector(world, None, "root"), "non-objects")


@settings(FUZZ, max_examples=budget(1000))
@given(payload=raw_payloads(), mode=st.sampled_from(["halfclose", "halfclose", "abandon"]))
def test_raw_bytes(world, payload, mode) -> None:
    """Junk, invalid UTF-8, mutated requests, a last line without newline then EOF."""
    run_payload(world, payload, mode, "root", connector(world, None, "root"), "raw bytes")


@settings(FUZZ, max_examples=budget(40))
@given(reqs=st.lists(requests(), min_size=20, max_size=150), mode=st.sampled_from(["keepalive", "halfclose"]))
def test_pipelined_bursts(world, reqs, mode) -> None:
    """Up to 150 requests in one send: every answer, in order, none lost or doubled."""
    run_payload(world, request_lines(world, reqs, [False] * len(reqs), True), mode, "root",
                connector(world, None, "root"), "pipelined bursts")


@settings(FUZZ, max_examples=budget(20))
@given(before=st.integers(0, 2), size=st.sampled_from([MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, MAX_LINE + 65537,
                                                       3 * MAX_LINE]),
       kind=st.sampled_from(["request", "junk"]), newline=st.booleans(), after=st.booleans())
def test_lines_around_and_beyond_the_limit(world, before, size, kind, newline, after) -> None:
    """Up to the limit a line is answered; beyond it, one error (id null) and a clean close."""
    status = b'{"jsonrpc": "2.0", "id": "s", "method": "status"}\n'
    if kind == "request":
        head = b'{"jsonrpc": "2.0", "id": "big", "method": "status"'
        big = head + b" " * (size - len(head) - 1) + b"}"
    else:
        big = (b"\xff{[" * (size // 3 + 1))[:size]
    payload = status * before + big + (b"\n" if newline else b"") + (status if after and newline else b"")
    run_payload(world, payload, "halfclose", "root", connector(world, None, "root"), "long lines")


def _sweep(w: World, lines: list[tuple[bytes, Callable[[dict[str, Any]], bool]]]) -> None:
    """Send every line pipelined on one connection; each answer must satisfy its predicate."""
    got = exchange(lambda: own_connection(w), b"".join(line + b"\n" for line, _ in lines), "halfclose")
    assert len(got.lines) == len(lines)
    bad = [(line[:200], resp) for (line, ok), resp in zip(lines, map(orjson.loads, got.lines), strict=False)
           if not ok(resp)]
    assert not bad, "\n".join(f"{line!r} -> {resp}" for line, resp in bad)
    w.counts["hostile-id sweep (lines)"] += len(lines)


def _refused(resp: dict[str, Any]) -> bool:
    return resp.get("error", {}).get("code") in (INVALID_PARAMS, NOT_FOUND)


def test_every_hostile_id_at_every_method(world) -> None:
    """Not left to chance: each hostile string as sid, version and watch of every method that
    takes them. An id that names no session is refused or not found, never answered; a
    version or watch is answered only when it names the real one."""
    w = world
    lines: list[tuple[bytes, Callable[[dict[str, Any]], bool]]] = []
    beta = next(v for v in Guard(w.w1).versions("beta") if v.name == w.beta_version)

    def req(method: str, **params: Any) -> bytes:
        if method == "restore":
            params["dry_run"] = True
        return encode({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, True)

    for watch, sid in sorted(REAL):  # the real ids, sub-directory ones included, still work
        lines.append((req("history", sid=sid, watch=str(getattr(w, watch))), lambda r: "result" in r))
    for raw in HOSTILE_STRINGS:
        value = render(raw, w)
        for method in SID_METHODS:
            if value not in REAL_SIDS:
                lines.append((req(method, sid=value), _refused))
            if method == "forget":
                continue  # never with a real id (see made_safe)
            spec = METHODS[method]
            names_beta = bool(value) and (value == beta.name or beta.id.startswith(value))
            if spec.takes("version"):
                lines.append((req(method, sid="beta", version=value),
                              (lambda r: "result" in r) if names_beta else _refused))
            is_w1 = bool(value) and "\0" not in value and os.path.abspath(value) == str(w.w1)
            lines.append((req(method, sid="beta", watch=value), (lambda r: "result" in r) if is_w1 else _refused))
    _sweep(w, lines)
    alive(w)


# -- unauthorised peers -------------------------------------------------------------------------------

@settings(FUZZ, max_examples=budget(1000))
@given(pipeline=pipelines, role=st.sampled_from(["reader", "outsider"]))
def test_unprivileged_peers(world, peers, pipeline, role) -> None:
    """A read-group member gets the read methods and -32001 for restore/prune whatever the params;
    an outsider gets -32001 for every method; both get the same envelope errors as root."""
    reqs, blank, ascii_only, mode = pipeline
    run_payload(world, request_lines(world, reqs, blank, ascii_only), mode, role,
                connector(world, peers, role), f"requests ({role})")


@settings(FUZZ, max_examples=budget(200))
@given(payload=raw_payloads(), role=st.sampled_from(["reader", "outsider"]))
def test_unprivileged_raw_bytes(world, peers, payload, role) -> None:
    run_payload(world, payload, "halfclose", role, connector(world, peers, role), f"raw bytes ({role})")


def test_every_privileged_method_is_refused_to_peers_without_the_group(world, peers) -> None:
    """Each method once per role, plain params: the table in README's socket section, and a
    ``control.denied`` line with the peer's uid for each refusal."""
    before = len(world.daemon.events("control.denied"))
    plain = {"sid": "beta", "watch": str(world.w1)}
    params = {m: {k: v for k, v in plain.items() if spec.takes(k)} for m, spec in METHODS.items()}
    denied = 0
    for role in ("reader", "outsider"):
        for method in sorted(METHODS):
            line = encode({"jsonrpc": "2.0", "id": method, "method": method, "params": params[method]}, True)
            got = exchange(peers[role].connect, line + b"\n", "halfclose")
            [resp] = [orjson.loads(x) for x in got.lines]
            may = role == "reader" and method in READ_METHODS
            if may:
                assert "result" in resp, (role, resp)
            else:
                denied += 1
                assert resp["error"]["code"] == DENIED and resp["error"]["data"]["uid"] == 65534, (role, resp)
                assert f"permission denied: {method} needs" in resp["error"]["message"]
    assert denied == len(ADMIN_METHODS) + len(METHODS)
    for role in ("reader", "outsider"):  # refused before the params are looked at
        for method in ADMIN_METHODS:
            line = encode({"jsonrpc": "2.0", "id": 9, "method": method, "params": {"sid": "../x", "bogus": 1}}, True)
            [resp] = [orjson.loads(x) for x in exchange(peers[role].connect, line + b"\n", "halfclose").lines]
            assert resp["error"]["code"] == DENIED, (role, resp)
    events = world.daemon.events("control.denied")[before:]
    logged = Counter(e["method"] for e in events)
    assert all(logged[m] >= (2 if m in ADMIN_METHODS else 1) for m in METHODS), logged
    assert all(e["uid"] == 65534 for e in events)


# -- single cases the fuzz does not cover ---------------------------------------------------------------


@pytest.fixture
def small_daemon() -> Iterator[tuple[Path, Path, Callable[[], DaemonProc]]]:
    """(sessions dir, canary dir outside it, start()): a daemon of its own for a real restore."""
    root = Path(short_tmpdir("sgfz1"))
    started: list[DaemonProc] = []

    def start() -> DaemonProc:
        started.append(DaemonProc(root / "run", ["--watch", str(root / "s")]))
        return started[-1].started()

    try:
        for d in ("s", "canary", "run"):
            (root / d).mkdir()
        yield root / "s", root / "canary", start
    finally:
        for d in started:
            d.stop()
        rmtree(str(root))


def test_a_valid_restore_through_the_socket(small_daemon) -> None:
    """The one real restore: the 1000-message version comes back, the wiped file is kept as the undo."""
    sessions, _, start = small_daemon
    server_write(sessions / "beta.json", make_session(1000, "beta"))
    d = start()
    server_write(sessions / "beta.json", make_session(0, "beta"))
    eventually(lambda: [v for v in Guard(sessions).versions("beta") if v.count == 1000], what="kept version")
    d.sync()
    r = d.call("restore", {"sid": "beta"})
    assert r["restored"]["count"] == 1000 and r["pre_restore"]["count"] == 0 and r["dry_run"] is False
    assert len(orjson.loads((sessions / "beta.json").read_bytes())["messages"]) == 1000
    undo = d.call("restore", {"sid": "beta", "version": r["pre_restore"]["id"]})
    assert undo["restored"]["count"] == 0
    assert orjson.loads((sessions / "beta.json").read_bytes())["messages"] == []


def test_restore_over_a_live_symlink_never_writes_through_it(small_daemon) -> None:
    """A session with a kept version whose live file was replaced by a symlink to a file outside:
    a restore replaces the link itself (or refuses), and the link's target keeps its bytes."""
    sessions, canary, start = small_daemon
    victim = canary / "victim.json"
    victim.write_bytes(orjson.dumps(make_session(50, "victim")))
    before = victim.read_bytes()
    server_write(sessions / "eps.json", make_session(30, "eps"))
    d = start()
    os.unlink(sessions / "eps.json")
    os.symlink(victim, sessions / "eps.json")
    eventually(lambda: [v for v in Guard(sessions).versions("eps") if v.count == 30], what="kept version")
    d.sync()
    try:
        r = d.call("restore", {"sid": "eps"})
    except RuntimeError as exc:  # refused: with the reason, as "the store could not do it"
        assert "'code': -32003" in str(exc) and str(sessions / "eps.json") in str(exc), exc
        assert (sessions / "eps.json").is_symlink()
    else:
        assert r["restored"]["count"] == 30
        assert not (sessions / "eps.json").is_symlink()
        assert len(orjson.loads((sessions / "eps.json").read_bytes())["messages"]) == 30
    assert victim.read_bytes() == before and not victim.is_symlink()
    assert sorted(os.listdir(canary)) == ["victim.json"]
    assert not d.events("control.error") and "Traceback" not in d.text()


def test_non_session_files_are_not_sessions(small_daemon) -> None:
    """``_index.json`` (the server's own list), ``canary.json`` (a symlink out of the watch) and
    ``canarydir/victim.json`` (through a symlinked directory) are no sessions: their history is
    'not found' like any other non-session, and a restore of one leaves no folder in the store."""
    sessions, canary, start = small_daemon
    (canary / "victim.json").write_bytes(orjson.dumps(make_session(50, "victim")))
    (sessions / "_index.json").write_bytes(orjson.dumps([{"session_id": "alpha"}]))
    os.symlink(canary / "victim.json", sessions / "canary.json")
    os.symlink(canary, sessions / "canarydir")
    server_write(sessions / "alpha.json", make_session(5, "alpha"))
    d = start()
    for sid in sorted(NON_SESSION_FILES):
        for method, params in (("history", {"sid": sid}), ("restore", {"sid": sid, "dry_run": True})):
            with pytest.raises(RuntimeError, match=str(NOT_FOUND)):
                d.call(method, params)
    assert sorted(store_folders(sessions)) == ["alpha"]


def test_zz_the_aftermath_of_every_example(world) -> None:
    """Runs last (file order): the canary and everything outside the stores are as they were,
    the store holds folders only for the real sessions, beta's version is still there, and the
    daemon logged no bug. Prints the figures (``-s``)."""
    report(world, time.monotonic() - world.started)
    check_the_aftermath(world)

"""sd_notify, the watchdog and journald, proven against the real sessionguardd process.

The test is systemd here: it binds its own AF_UNIX datagram socket, hands it to
the daemon as ``NOTIFY_SOCKET`` and reads exactly what the daemon sends
(READY=1, STATUS=, WATCHDOG=1, RELOADING=1, STOPPING=1).  The watchdog is
exercised by wedging the worker for real: the test stops the daemon's
``sg-worker`` thread alone with ptrace(2) (the other threads run on), so the
queue stops draining. A session lock held by another process must NOT wedge
it: that session is deferred while the others go on.

Timing: waits are bounded polls (``eventually``); the only timing claims are
windows of silence chosen with wide margins around the daemon's own constants
(watchdog interval 2 s, ping tick 1 s).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemonproc import DaemonProc, eventually, stopped_thread
from sessionguard.locks import LOCK_FILE, session_byte
from sgbackend import rmtree, short_tmpdir
from sghelpers import IS_ROOT, make_session, pin_count, server_write, store_versions

WATCHDOG_USEC = 2_000_000
N_FILES = 200
SID = "abc123def456"


# --------------------------------------------------------------------------- #
# a notify socket: the test plays systemd


@dataclass
class Note:
    at: float  # time.monotonic() when received
    fields: dict[str, str]
    raw: str


class NotifySocket:
    """Binds an AF_UNIX datagram socket and records every sd_notify message."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o777)
        self.sock.settimeout(0.2)
        self.notes: list[Note] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self._lock:
                self.notes.append(Note(time.monotonic(), fields, text))

    def snapshot(self) -> list[Note]:
        with self._lock:
            return list(self.notes)

    def wait(self, pred: Callable[[Note], bool], after: int = 0, timeout: float = 15.0,
             what: str = "notification") -> tuple[int, Note]:
        """First note at index >= *after* matching *pred*: (index, note)."""
        def find():
            for i, n in enumerate(self.snapshot()[after:], start=after):
                if pred(n):
                    return i, n
            return None
        try:
            return eventually(find, timeout, what)
        except AssertionError:
            raise AssertionError(f"timed out waiting for {what}; got {[n.raw for n in self.snapshot()]}") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def has(key: str, value: str | None = None) -> Callable[[Note], bool]:
    return lambda n: key in n.fields and (value is None or n.fields[key] == value)


@pytest.fixture
def work():
    d = Path(short_tmpdir("sgnt"))
    (d / "sessions").mkdir()
    yield d
    rmtree(str(d))


@pytest.fixture
def notify_sock(work):
    ns = NotifySocket(str(work / "notify"))
    yield ns
    ns.close()


@pytest.fixture
def daemons(work):
    started: list[DaemonProc] = []

    def start(*args: str, env: dict[str, str] | None = None) -> DaemonProc:
        d = DaemonProc(work, list(args), env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.kill()


def sd_env(notify: NotifySocket, **extra: str) -> dict[str, str]:
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.update(extra)
    return env


def clean_env() -> None:
    """The test runner itself may be under systemd: never let that leak into a daemon."""
    for k in ("WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "JOURNAL_STREAM"):
        os.environ.pop(k, None)


clean_env()


# --------------------------------------------------------------------------- #
# the whole sd_notify life cycle


def test_notify_lifecycle_ready_status_watchdog_reload_stop(work, notify_sock, daemons):
    sdir = work / "sessions"
    sids = [f"{i:012x}" for i in range(1, N_FILES + 1)]
    for i, sid in enumerate(sids):
        server_write(sdir / f"{sid}.json", make_session(5 + i % 20, sid))
    (sdir / "_index.json").write_text(json.dumps(sids))  # the server's own file: not a session
    cfg = work / "sessionguard.toml"
    cfg.write_text(f'[daemon]\nreconcile_interval = 3600\n\n[[watch]]\npath = "{sdir}"\n')

    d = daemons("--config", str(cfg), env=sd_env(notify_sock))

    # READY=1 comes only after the initial scan pinned every file.
    i_ready, ready = notify_sock.wait(has("READY", "1"), timeout=60, what="READY=1")
    unpinned = [sid for sid in sids if pin_count(sdir, sid) is None]
    assert unpinned == [], f"READY=1 sent with {len(unpinned)} of {N_FILES} files not pinned yet"
    assert ready.fields["MAINPID"] == str(d.proc.pid)
    assert ready.fields["STATUS"].startswith(f"{N_FILES} sessions tracked, 0 versions kept"), ready.raw
    # before READY only the scan's progress (STATUS=scanning…, EXTEND_TIMEOUT_USEC=), no WATCHDOG=1
    early = notify_sock.snapshot()[:i_ready]
    assert early and all(n.fields.get("STATUS", "").startswith("scanning") for n in early), [n.raw for n in early]
    assert all("WATCHDOG" not in n.fields and "READY" not in n.fields for n in early)
    assert all(int(n.fields["EXTEND_TIMEOUT_USEC"]) > 0 for n in early), [n.raw for n in early]
    # the log agrees: the daemon announced itself before it told systemd it was ready
    assert d.events("daemon.started"), d.text()

    # STATUS= lines are human-readable; WATCHDOG=1 keeps arriving while healthy.
    notify_sock.wait(has("STATUS"), after=i_ready + 1, what="a periodic STATUS=")
    i3, _ = notify_sock.wait(has("WATCHDOG", "1"), after=i_ready + 1, what="first WATCHDOG=1")
    i4, _ = notify_sock.wait(has("WATCHDOG", "1"), after=i3 + 1, what="second WATCHDOG=1")
    notify_sock.wait(has("WATCHDOG", "1"), after=i4 + 1, what="third WATCHDOG=1")
    for n in notify_sock.snapshot()[i_ready:]:
        if "STATUS" in n.fields:
            assert "sessions tracked" in n.fields["STATUS"] and "versions kept" in n.fields["STATUS"], n.raw
    assert not d.events("watchdog.withheld")

    # A session lock held by another process does not wedge the worker: that session
    # waits, the others go on, and the watchdog keeps being fed.
    victim, other = sids[0], sids[1]
    lock_fd = os.open(sdir / ".sessionguard" / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.fcntl(lock_fd, fcntl.F_OFD_SETLK,
                    struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, session_byte(victim), 1, 0))
        server_write(sdir / f"{victim}.json", make_session(0, victim))
        server_write(sdir / f"{other}.json", make_session(0, other))
        eventually(lambda: store_versions(sdir / ".sessionguard", other), what="the other session's version")
        n_before = len(notify_sock.snapshot())
        notify_sock.wait(has("WATCHDOG", "1"), after=n_before, what="WATCHDOG=1 while a lock is held elsewhere")
        assert store_versions(sdir / ".sessionguard", victim) == [], "the worker should not have had the lock"
        assert not d.events("watchdog.withheld")
    finally:
        os.close(lock_fd)  # releases the lock
    kept = eventually(lambda: store_versions(sdir / ".sessionguard", victim), what="the deferred capture")
    assert kept[0].count == len(make_session(5, victim)["messages"]) and kept[0].reason == "shrink"

    # Wedge the worker for real: stop its thread alone, then give it work.
    with stopped_thread(d.proc.pid, "sg-worker"):
        server_write(sdir / f"{sids[2]}.json", make_session(0, sids[2]))
        t_write = time.monotonic()
        withheld = d.wait_event("watchdog.withheld", timeout=8)
        assert "stuck" in withheld["why"], withheld
        window = (t_write + 3.5, t_write + 6.0)
        while time.monotonic() < window[1]:
            time.sleep(0.1)
        pings_in_window = [n for n in notify_sock.snapshot()
                           if has("WATCHDOG")(n) and window[0] <= n.at <= window[1]]
        assert pings_in_window == [], f"{len(pings_in_window)} WATCHDOG=1 while the worker was wedged"

    # Pings resume once the worker runs again, and the shrink is handled.
    n_before = len(notify_sock.snapshot())
    notify_sock.wait(has("WATCHDOG", "1"), after=n_before, what="WATCHDOG=1 after the worker was released")
    d.wait_event("watchdog.resumed")
    eventually(lambda: store_versions(sdir / ".sessionguard", sids[2]), what="the version kept after the wipe")
    notify_sock.wait(lambda n: "STATUS" in n.fields and "3 versions kept" in n.fields["STATUS"],
                     after=n_before, what="STATUS= counting the kept versions")

    # SIGHUP: RELOADING=1, then READY=1.
    n_before = len(notify_sock.snapshot())
    d.signal(signal.SIGHUP)
    i_rel, _ = notify_sock.wait(has("RELOADING", "1"), after=n_before, what="RELOADING=1")
    i_rdy, rdy = notify_sock.wait(has("READY", "1"), after=i_rel + 1, what="READY=1 after reload")
    assert "sessions tracked" in rdy.fields.get("STATUS", ""), rdy.raw
    d.wait_event("config.reloaded")
    notify_sock.wait(has("WATCHDOG", "1"), after=i_rdy + 1, what="WATCHDOG=1 after reload")

    # SIGTERM: STOPPING=1 and exit code 0.
    n_before = len(notify_sock.snapshot())
    assert d.stop() == 0, d.text()
    notify_sock.wait(has("STOPPING", "1"), after=n_before, timeout=5, what="STOPPING=1")
    assert d.events("daemon.stopped")
    assert not d.events("daemon.failed") and not d.events("worker.error"), d.text()


# --------------------------------------------------------------------------- #
# systemd-python missing


BLOCK_SYSTEMD = r"""
import importlib.abc, sys

class NoSystemd(importlib.abc.MetaPathFinder):
    # behaves exactly like an environment without systemd-python installed
    def find_spec(self, name, path=None, target=None):
        if name == "systemd" or name.startswith("systemd."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoSystemd())
import sessionguard.daemon
sys.exit(sessionguard.daemon.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("how", ["NOTIFY_SOCKET", "LISTEN_FDS", "--log-format journal"])
def test_under_systemd_without_systemd_python_fails_with_one_line(work, how):
    sdir = work / "sessions"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS")}
    args = ["--watch", str(sdir), "--socket", str(work / "sg.sock"), "--log-format", "json"]
    if how == "NOTIFY_SOCKET":
        env["NOTIFY_SOCKET"] = str(work / "notify")
    elif how == "LISTEN_FDS":
        env["LISTEN_FDS"] = "1"
    else:
        args[-1] = "journal"
    r = subprocess.run([sys.executable, "-c", BLOCK_SYSTEMD, *args], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("sessionguardd: ") and "sessionguard[systemd]" in lines[0], lines[0]
    assert r.stdout == "", r.stdout  # nothing started, nothing logged
    assert not (work / "sg.sock").exists()
    assert not (sdir / ".sessionguard").exists()


def test_shim_is_honest_systemd_python_importable_otherwise():
    """The blocker above is what hides systemd-python; without it, it imports here."""
    r = subprocess.run([sys.executable, "-c", "import systemd.daemon, systemd.journal"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- #
# journald


def test_journal_format_without_journald_does_not_crash(work, notify_sock, daemons):
    """--log-format journal with no /run/systemd/journal/socket: logging is a silent no-op."""
    if os.path.exists("/run/systemd/journal/socket"):
        pytest.skip("a journald socket exists here; the no-journald case needs a host without one")
    sdir = work / "sessions"
    server_write(sdir / f"{SID}.json", make_session(30, SID))
    d = daemons("--watch", str(sdir), "--log-format", "journal", env=sd_env(notify_sock))
    notify_sock.wait(has("READY", "1"), timeout=30, what="READY=1")
    server_write(sdir / f"{SID}.json", make_session(0, SID))  # the wipe logs session.shrunk + version.kept
    kept = eventually(lambda: store_versions(sdir / ".sessionguard", SID), what="a kept version")
    assert kept[0].count == 30
    d.signal(signal.SIGHUP)  # config.reload_skipped etc. go through the renderer too
    n = len(notify_sock.snapshot())
    notify_sock.wait(has("READY", "1"), after=n, what="READY=1 after reload")
    d.assert_alive()
    assert d.stop() == 0, d.text()
    out = d.text()
    assert "Traceback" not in out and "Error" not in out, out
    assert out == "", f"journal format must not write log lines to stdout/stderr: {out!r}"


# -- catching native journal datagrams ------------------------------------------


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native protocol: KEY=value\\n, or KEY\\n<le64 size><bytes>\\n for binary values."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 1 + 8
            value = data[start:start + size]
            assert data[start + size:start + size + 1] == b"\n"
            i = start + size + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


# Runs inside `unshare --mount` with a tmpfs on /run: binds the journal socket,
# starts the daemon (argv[2:]) and writes every datagram as a JSON line to argv[1].
COLLECTOR = r"""
import json, os, socket, subprocess, sys
os.makedirs("/run/systemd/journal", exist_ok=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/run/systemd/journal/socket")
s.settimeout(0.2)
out = open(sys.argv[1], "w")
daemon = subprocess.Popen(sys.argv[2:])
while True:
    try:
        data, anc, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(16))
    except socket.timeout:
        if daemon.poll() is not None:
            break
        continue
    if anc:  # a large entry passed as a memfd
        fds = [int.from_bytes(c[2][:4], sys.byteorder) for c in anc if c[1] == socket.SCM_RIGHTS]
        data = os.pread(fds[0], 1 << 24, 0)
    out.write(json.dumps(data.hex()) + "\n")
    out.flush()
out.write(json.dumps({"exit": daemon.returncode}) + "\n")
out.close()
"""


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: a private mount namespace with its own /run")
def test_wipe_reaches_journald_with_structured_fields(work, notify_sock):
    sdir = work / "sessions"
    server_write(sdir / f"{SID}.json", make_session(42, SID))
    collected = work / "journal.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "JOURNAL_STREAM")}
    env.update(sd_env(notify_sock), PYTHONUNBUFFERED="1")
    daemon_cmd = [sys.executable, "-m", "sessionguard.daemon", "--watch", str(sdir),
                  "--socket", str(work / "sg.sock"), "--log-format", "journal"]
    script = 'mount -t tmpfs tmpfs /run && exec "$@"'
    with open(work / "collector.out", "wb") as errout:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                                 sys.executable, "-c", COLLECTOR, str(collected), *daemon_cmd],
                                env=env, stdout=errout, stderr=subprocess.STDOUT)
    daemon_pid = None
    try:
        _, ready = notify_sock.wait(has("READY", "1"), timeout=30, what="READY=1")
        daemon_pid = int(ready.fields["MAINPID"])

        def entries() -> list[dict[str, str]]:
            out = []
            if collected.exists():
                for line in collected.read_text().splitlines():
                    item = json.loads(line)
                    if isinstance(item, str):
                        out.append(parse_native(bytes.fromhex(item)))
            return out

        started = eventually(lambda: [e for e in entries() if e.get("SESSIONGUARD_EVENT") == "daemon.started"],
                             what="daemon.started in the journal")
        assert started[0]["PRIORITY"] == "6" and started[0]["SYSLOG_IDENTIFIER"] == "sessionguard"

        server_write(sdir / f"{SID}.json", make_session(0, SID))  # the wipe
        shrunk = eventually(lambda: [e for e in entries() if e.get("SESSIONGUARD_EVENT") == "session.shrunk"],
                            what="session.shrunk in the journal")
        e = shrunk[0]
        print(json.dumps(e, indent=1, sort_keys=True))
        assert e["SESSIONGUARD_SESSION"] == SID
        assert e["SESSIONGUARD_COUNT_BEFORE"] == "42"
        assert e["SESSIONGUARD_COUNT_AFTER"] == "0"
        assert e["PRIORITY"] == "4"
        assert e["MESSAGE_ID"] == "7b8f0c9e2a0b4d6c9a31f5e2d4c8b1a0"
        assert e["SYSLOG_IDENTIFIER"] == "sessionguard"
        assert e["MESSAGE"].startswith("session.shrunk")
        assert "SESSION_ID" not in e  # reserved by journald for login sessions
        kept = eventually(lambda: [x for x in entries() if x.get("SESSIONGUARD_EVENT") == "version.kept"],
                          what="version.kept in the journal")
        assert kept[0]["MESSAGE_ID"] == "2c4e6a8b0d1f4e3a9c7b5d3f1e0a2c4b"
        for entry in entries():  # every field name is a valid journal field name
            for key in entry:
                assert key.replace("_", "A").isalnum() and key.upper() == key and not key[0].isdigit(), key

        os.kill(daemon_pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        assert json.loads(collected.read_text().splitlines()[-1]) == {"exit": 0}
        assert [x for x in entries() if x.get("SESSIONGUARD_EVENT") == "daemon.stopped"]
    finally:
        if proc.poll() is None:
            if daemon_pid is not None:
                try:
                    os.kill(daemon_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
        print((work / "collector.out").read_text(errors="replace"))


# --------------------------------------------------------------------------- #
# a stop during the start-up scan

FIRST_SCAN_FILES = 20_000


def test_a_stop_during_the_first_scan_ends_it_and_the_next_start_finishes_the_job(work, notify_sock, daemons):
    """A first scan over a big tree takes long; ``systemctl stop`` (or systemd's start
    timeout) must not wait for the rest of it. The scan ends where it is, READY=1 is
    never sent, and the next start scans again: every session is pinned then."""
    sdir = work / "sessions"
    sids = [f"{i:012x}" for i in range(1, FIRST_SCAN_FILES + 1)]
    for sid in sids:  # plain writes: the tree is the fixture, not the server's saves
        (sdir / f"{sid}.json").write_bytes(json.dumps(make_session(3, sid)).encode())

    d = daemons("--watch", str(sdir), env=sd_env(notify_sock))
    notify_sock.wait(lambda n: " of " in n.fields.get("STATUS", "") and "files" in n.fields["STATUS"],
                     timeout=120, what="a progress STATUS= of the start-up scan")
    d.signal(signal.SIGTERM)
    assert d.proc.wait(120) == 0, d.text()
    abandoned = d.events("scan.abandoned")
    assert abandoned and 0 < abandoned[0]["files"] < FIRST_SCAN_FILES, d.text()
    assert not d.events("scan.completed"), "after SIGTERM the scan went on over the whole tree"
    assert not [n for n in notify_sock.snapshot() if has("READY")(n)], "READY=1 after a stop during the scan"
    assert d.events("daemon.stopped")

    # the next start scans again (no clean-stop cache was written) and pins every session
    d2 = daemons("--watch", str(sdir), env=sd_env(notify_sock))
    d2.wait_event("scan.completed", timeout=300)
    last = sids[-1]
    assert pin_count(sdir, last) == 3
    server_write(sdir / f"{last}.json", make_session(0, last))
    kept = eventually(lambda: store_versions(sdir / ".sessionguard", last), what="the wiped session's version")
    assert kept[0].count == 3
    assert d2.stop() == 0, d2.text()


@pytest.mark.parametrize("usec, pid, expected", [
    ("2000000", None, 2.0), ("2000000", "self", 2.0), ("0", None, None), ("", None, None),
    ("2000000", "1", None),  # another process's watchdog
    ("2000000", "abc", None), ("2000000", "\u00b2", None),  # no pid at all: sd_watchdog_enabled says no
    ("\u00b2", None, None), ("\u0663", None, None),  # not ASCII digits ("²".isdigit(); int() raised)
])
def test_the_watchdog_settings_are_read_as_sd_watchdog_enabled_reads_them(
        monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, expected: float | None) -> None:
    from sessionguard.systemd import watchdog_interval

    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert watchdog_interval() == expected


@pytest.mark.parametrize("stream", ["\u00b2:1", "1:\u0663", "x:1", "1", ""])
def test_a_journal_stream_that_is_not_two_numbers_is_not_the_journal(monkeypatch: pytest.MonkeyPatch,
                                                                      stream: str) -> None:
    from sessionguard.log import stderr_is_journal

    monkeypatch.setenv("JOURNAL_STREAM", stream)
    assert stderr_is_journal() is False
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert stderr_is_journal() is True

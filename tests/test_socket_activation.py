"""Socket activation: the daemon serves the listening socket it is handed
(LISTEN_FDS=1, LISTEN_PID=<its pid>, LISTEN_FDNAMES=control) and never binds
or removes a socket path itself.

Two real activators:

* ``systemd-socket-activate -l PATH --fdname=control CMD`` (shipped with
  systemd): it listens, and on the first connection execs the daemon in its own
  process with the fd and the LISTEN_* variables -- activation on demand;
* a listening socket made by the test, passed with ``pass_fds`` through
  ``bash -c 'LISTEN_PID=$$ exec ...'`` (``$$`` is the pid the daemon will have after
  ``exec``; a ``preexec_fn`` cannot set environment variables for ``exec``; bash,
  not dash, because dash's redirections take single-digit fds only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemonproc import eventually
from sgbackend import rmtree, short_tmpdir
from sghelpers import make_session, server_write

SID = "abc123def456"
CTL = [sys.executable, "-m", "sessionguard.ctl"]


def move_to_3(fd: int) -> str:
    """bash redirections that make *fd* the child's fd 3 (sd_listen_fds() counts from 3)."""
    return "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                        "LISTEN_FDNAMES", "JOURNAL_STREAM", "SESSIONGUARD_SOCKET")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log_events(logfile: Path, name: str) -> list[dict]:
    out = []
    for line in logfile.read_bytes().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == name:
            out.append(ev)
    return out


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


@pytest.fixture
def work():
    d = Path(short_tmpdir("sgsa"))
    (d / "sessions").mkdir()
    yield d
    rmtree(str(d))


def start_with_socket_activate(work: Path, daemon_args: list[str], log) -> tuple[subprocess.Popen, None]:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate not installed (it comes with the systemd package)")
    activated = work / "activated.sock"
    proc = subprocess.Popen([tool, "-l", str(activated), "--fdname=control",
                             sys.executable, "-m", "sessionguard.daemon", *daemon_args],
                            stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    eventually(lambda: is_socket(activated) or proc.poll() is not None, what="systemd-socket-activate listening")
    assert proc.poll() is None, (work / "daemon.log").read_text()
    return proc, None


def start_with_sh_wrapper(work: Path, daemon_args: list[str], log) -> tuple[subprocess.Popen, socket.socket]:
    activated = work / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(activated))
    listener.listen(16)
    fd = listener.fileno()
    script = move_to_3(fd) + 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=control exec "$@"'
    proc = subprocess.Popen(["bash", "-c", script, "bash", sys.executable, "-m", "sessionguard.daemon", *daemon_args],
                            stdout=log, stderr=subprocess.STDOUT, env=clean_env(), pass_fds=[fd])
    return proc, listener


@pytest.mark.parametrize("activator", ["systemd-socket-activate", "sh-wrapper"])
def test_daemon_serves_the_socket_it_is_handed(work, activator):
    sdir = work / "sessions"
    server_write(sdir / f"{SID}.json", make_session(12, SID))
    activated = work / "activated.sock"
    own = work / "own.sock"  # what the daemon would bind without activation
    logfile = work / "daemon.log"
    daemon_args = ["--watch", str(sdir), "--socket", str(own), "--log-format", "json"]
    start = start_with_socket_activate if activator == "systemd-socket-activate" else start_with_sh_wrapper
    with open(logfile, "wb") as log:
        proc, listener = start(work, daemon_args, log)
    try:
        # sessionguardctl talks to the handed socket (with systemd-socket-activate
        # this first connection is what starts the daemon).
        r = subprocess.run([*CTL, "--socket", str(activated), "--json", "status"], capture_output=True,
                           text=True, timeout=60, env=clean_env())
        assert r.returncode == 0, (r.stdout, r.stderr, logfile.read_text())
        status = json.loads(r.stdout)
        assert status["pid"] == proc.pid  # the activator exec'd the daemon: LISTEN_PID matched
        assert status["sessions"] == 1
        r = subprocess.run([*CTL, "--socket", str(activated), "status"], capture_output=True, text=True,
                           timeout=60, env=clean_env())
        assert r.returncode == 0 and "sessions" in r.stdout, (r.stdout, r.stderr)

        listening = log_events(logfile, "control.listening")
        assert [e["path"] for e in listening] == [str(activated)], listening
        assert not own.exists(), "the daemon bound its own socket path although one was handed to it"
        started = log_events(logfile, "daemon.started")
        assert started and started[0]["pid"] == proc.pid

        # SIGTERM: clean exit; the handed socket path is not the daemon's to remove.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, logfile.read_text()
        assert log_events(logfile, "daemon.stopped")
        assert is_socket(activated), "the daemon unlinked the socket path it was handed"
        assert not own.exists()
        assert "Traceback" not in logfile.read_text(), logfile.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if listener is not None:
            listener.close()


def test_listen_pid_of_another_process_is_ignored(work):
    """LISTEN_PID names someone else: not ours, so the daemon binds its configured path."""
    sdir = work / "sessions"
    own = work / "own.sock"
    logfile = work / "daemon.log"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(work / "activated.sock"))
    listener.listen(4)
    fd = listener.fileno()
    script = move_to_3(fd) + 'LISTEN_PID=1 LISTEN_FDS=1 LISTEN_FDNAMES=control exec "$@"'
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(["bash", "-c", script, "bash", sys.executable, "-m", "sessionguard.daemon",
                                 "--watch", str(sdir), "--socket", str(own), "--log-format", "json"],
                                stdout=log, stderr=subprocess.STDOUT, env=clean_env(), pass_fds=[fd])
    try:
        eventually(lambda: log_events(logfile, "daemon.started") or proc.poll() is not None,
                   what="daemon.started")
        assert [e["path"] for e in log_events(logfile, "control.listening")] == [str(own)], logfile.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not own.exists(), "a socket the daemon bound itself is removed on stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()

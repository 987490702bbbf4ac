"""Run the real sessionguardd as a subprocess and read its JSON log lines."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

WAIT = 15.0  # generous bound for "eventually": a wait, never a timing assertion


def eventually(check: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    """Poll *check* until it returns something truthy; fail with *what* after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class DaemonProc:
    """A sessionguardd process with its log captured to a file."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str] | None = None,
                 user: tuple[int, int] | None = None, wrap: list[str] | None = None) -> None:
        """*user* runs it as (uid, gid) with no groups; *wrap* is a command that
        execs its arguments (e.g. into a namespace), so the pid stays the daemon's."""
        self.workdir = workdir
        self.socket = str(workdir / "sg.sock")
        self.logfile = workdir / f"daemon-{time.monotonic_ns()}.log"
        self.args = args
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "sessionguard.daemon", "--log-format", "json", "--socket", self.socket, *args]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups", *cmd]
        cmd = [*(wrap or []), *cmd]
        self._log = open(self.logfile, "wb")  # noqa: SIM115 - open for the life of the process
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.logfile.read_bytes().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def wait_event(self, name: str, where: Callable[[dict[str, Any]], bool] = lambda e: True,
                   timeout: float = WAIT) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            if self.proc.poll() is not None and not [e for e in self.events(name) if where(e)]:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {name}:\n{self.text()}")
            return next((e for e in self.events(name) if where(e)), None)

        return eventually(found, timeout, f"log event {name}")

    def started(self) -> DaemonProc:
        self.wait_event("daemon.started")
        return self

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        """One JSON-RPC call on the control socket; returns the result or raises on an error."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.socket)
            request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def sync(self, timeout: float = WAIT) -> None:
        """Wait until every change made before this call has been processed."""
        if not self.call("sync", {"timeout": timeout}, timeout + 10)["synced"]:
            raise AssertionError(f"sync timed out after {timeout} s")

    def text(self) -> str:
        return self.logfile.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"daemon died ({self.proc.returncode}):\n{self.text()}"


# one thread of another process, stopped by ptrace(2) while the rest runs

_PTRACE_SEIZE, _PTRACE_INTERRUPT, _PTRACE_DETACH = 0x4206, 0x4207, 17
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def stopped_thread(pid: int, comm: str) -> Iterator[None]:
    """Stop the thread named *comm* of process *pid* (ptrace seize + interrupt: only
    that thread stops) for the duration of the block. Root only."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")
            if Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() == comm]
    assert len(tids) == 1, f"threads named {comm!r}: {tids}"
    tid = tids[0]
    if _libc.ptrace(_PTRACE_SEIZE, tid, None, None) != 0:
        raise OSError(ctypes.get_errno(), f"ptrace(SEIZE) of thread {comm!r}")
    try:
        assert _libc.ptrace(_PTRACE_INTERRUPT, tid, None, None) == 0
        os.waitpid(tid, 0x40000000)  # __WALL: the thread is stopped now
        yield
    finally:
        _libc.ptrace(_PTRACE_DETACH, tid, None, None)

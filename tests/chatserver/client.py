"""Start the test server as a process and talk to it (for tests)."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent.parent
WAIT = 15.0  # a bound for "started" / "stopped", never a timing assertion


class ChatServerError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class ChatServer:
    """``python -m chatserver`` on *session_dir*, as a context manager.

    ``with ChatServer(d) as srv: srv.get("/sessions")``. On exit the process is
    killed if it still runs (a crash, as far as the server can tell); call
    :meth:`stop` for a clean ``POST /shutdown``, and :meth:`start` again for a
    new process on the same directory (a restart: an empty cache). *storage*
    names the storage module (``chatserver.storage``, or a guarded copy); *env*
    is added to the environment (a ``PYTHONPATH`` in it is kept, after
    ``tests/``). The server's stderr (request log, tracebacks) is kept in a
    temporary file, readable with :meth:`log_text` until the context exits.
    """

    def __init__(self, session_dir: str | os.PathLike[str], *, storage: str = "chatserver.storage",
                 env: dict[str, str] | None = None) -> None:
        self.session_dir = Path(session_dir)
        self.storage = storage
        self.env = env or {}
        self.port = 0
        self.pid = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="chatserver-", suffix=".log")  # noqa: SIM115 - closed in close()

    def start(self) -> ChatServer:
        """Start the process and wait (bounded) for its ``{"port", "pid"}`` line."""
        if self.running():
            raise RuntimeError(f"chat server {self.pid} is already running")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "chatserver", "--dir", str(self.session_dir), "--storage", self.storage]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.kill()
            raise RuntimeError(f"chat server did not start:\n{self.log_text()}")
        hello = json.loads(line)
        self.port, self.pid = hello["port"], hello["pid"]
        return self

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request; the status and the decoded JSON answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {} if data is None else {"Content-Type": "application/json"}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def _ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.request(method, path, body)
        if status >= 400:
            raise ChatServerError(status, answer)
        return answer

    def get(self, path: str) -> Any:
        return self._ok("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self._ok("POST", path, body)

    def delete(self, path: str) -> Any:
        return self._ok("DELETE", path)

    # -- the process ------------------------------------------------------------

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        """``POST /shutdown`` and wait for the exit (SIGKILL past the bound); the exit code."""
        assert self.proc is not None
        if self.running():
            self.post("/shutdown")
            deadline = time.monotonic() + WAIT
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL if still running (a crash, as far as the server can tell). :meth:`start` may follow."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def close(self) -> None:
        """Kill the process if it runs and drop the log."""
        self.kill()
        if not self._log.closed:
            self._log.close()

    def log_text(self) -> str:
        if self._log.closed:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

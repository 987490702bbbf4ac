"""What every section shares: timing and statistics, /proc readers, documents, and the real daemon.

The daemon is always the real ``sessionguardd`` in a subprocess, started the
way the tests start it (``tests/daemonproc.py``), so a benchmark measures what
an operator runs, including the interpreter, watchdog's threads and the
control socket.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from daemonproc import DaemonProc  # noqa: E402  (tests/: runs the real sessionguardd)
from sghelpers import make_session, server_write  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SID = "bench"

__all__ = ["CLK_TCK", "ROOT", "SID", "DaemonProc", "make_session", "server_write"]


def pc() -> float:
    return time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    """Percentile with linear interpolation (p in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """Median, p90, p99, mean, min and max of *seconds*, in milliseconds."""
    ms = [x * 1e3 for x in seconds]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 4),
        "p90_ms": round(pct(ms, 90), 4),
        "p99_ms": round(pct(ms, 99), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "min_ms": round(min(ms), 4),
        "max_ms": round(max(ms), 4),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def median(values: list[float]) -> float:
    return float(statistics.median(values))


class Docs:
    """``make_session(n)`` for many *n* without rebuilding the messages each time.

    make_session's message i does not depend on n, so make_session(n) equals
    the metadata of make_session(n) plus the first n messages of a longer one.
    """

    def __init__(self, max_n: int, sid: str = "abc123def456") -> None:
        self.base = make_session(max_n, sid)
        self.msgs: list[Any] = self.base["messages"]
        self.meta = {k: v for k, v in self.base.items() if k != "messages"}

    def __call__(self, n: int) -> dict[str, Any]:
        if n > len(self.msgs):
            raise ValueError(n)
        doc = dict(self.meta)
        doc["updated_at"] = 1764000000.0 + n
        doc["messages"] = self.msgs[:n]
        return doc


# -- /proc ----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of *pid* (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of *pid*."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def thread_ticks(pid: int) -> dict[str, tuple[str, int, int]]:
    """Every thread of *pid*: its kernel name and (utime, stime) in clock ticks."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[tid] = (name, int(fields[11]), int(fields[12]))
    return out


#: The daemon's threads by kernel name (``sg-*``: named by the daemon; watchdog's emitter and
#: dispatcher and the control threads keep the process's name).
THREAD_GROUPS = {"sg-worker": "worker (evaluate + pin)", "sg-inotify": "inotify reader (watchdog InotifyFD)"}


def cpu_by_thread(before: dict[str, tuple[str, int, int]], after: dict[str, tuple[str, int, int]],
                  thousands: float) -> dict[str, dict[str, float]]:
    """CPU ms per 1,000 units of work (*thousands* of them were done) by thread group, user and system."""
    groups: dict[str, dict[str, float]] = {}
    for tid, (name, user, system) in after.items():
        _, u0, s0 = before.get(tid, (name, 0, 0))
        g = groups.setdefault(THREAD_GROUPS.get(name, "other threads (watchdog emitter + dispatcher, control)"),
                              {"user_ms": 0.0, "sys_ms": 0.0})
        g["user_ms"] += (user - u0) / CLK_TCK * 1e3 / thousands
        g["sys_ms"] += (system - s0) / CLK_TCK * 1e3 / thousands
    return {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in groups.items()}


def proc_io(pid: int | str) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = int(v)
    return out


def proc_mem_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def wait_quiet(threshold: float, poll: float = 30.0, limit: float = 1200.0) -> dict[str, Any]:
    """Wait until the 1-minute load average is below *threshold* (other jobs share this
    machine), polling every *poll* s for at most *limit* s; then go on anyway and say so."""
    t0 = time.monotonic()
    first = loadavg()
    while loadavg()[0] >= threshold and time.monotonic() - t0 < limit:
        log(f"waiting for a quiet machine: load {loadavg()[0]:.2f} >= {threshold}")
        time.sleep(poll)
    now = loadavg()
    return {"threshold": threshold, "load_when_asked": first, "load_at_start": now,
            "waited_s": round(time.monotonic() - t0, 1), "gave_up_waiting": now[0] >= threshold}


# -- files ----------------------------------------------------------------------------


def fresh(work: Path, name: str) -> Path:
    p = work / name
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


class Appender:
    """*sessions* sessions of *start_msgs* messages in a fresh ``work/name``, then
    :meth:`append` makes *writes* appending saves round-robin, as a busy server does
    (what the profiles of the event path run under)."""

    def __init__(self, work: Path, name: str, sessions: int, start_msgs: int, writes: int) -> None:
        self.dir = fresh(work, name)
        self.sessions, self.start_msgs, self.writes = sessions, start_msgs, writes
        self.docs = [Docs(start_msgs + writes // sessions + 2, sid=f"s{j:04d}") for j in range(sessions)]
        self.paths = [str(self.dir / f"s{j:04d}.json") for j in range(sessions)]
        for doc, path in zip(self.docs, self.paths, strict=True):
            server_write(path, doc(start_msgs))

    def append(self) -> None:
        for k in range(self.writes):
            j = k % self.sessions
            server_write(self.paths[j], self.docs[j](self.start_msgs + 1 + k // self.sessions))


def tree_bytes(path: str | Path, *, disk: bool = False) -> int:
    """Bytes of the regular files under *path*, each inode once: apparent sizes, or
    with *disk* the blocks allocated (``st_blocks``, what ``du`` counts)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512 if disk else st.st_size
    return total


def free_bytes(path: str | Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def free_inodes(path: str | Path) -> int:
    return os.statvfs(path).f_favail


# -- the daemon ----------------------------------------------------------------------


class Notify:
    """A ``NOTIFY_SOCKET`` of our own: the exact moment the daemon says ``READY=1``."""

    def __init__(self, work: Path) -> None:
        self.path = str(work / f"notify-{time.monotonic_ns()}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def wait_ready(self, timeout: float) -> float:
        """perf_counter() at which READY=1 arrived."""
        deadline = pc() + timeout
        while True:
            left = deadline - pc()
            if left <= 0:
                raise TimeoutError(f"no READY=1 within {timeout} s")
            self.sock.settimeout(left)
            msg = self.sock.recv(65536)
            if b"READY=1" in msg.split(b"\n"):
                return pc()

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def start_daemon(work: Path, watch: str | None, extra: list[str] | None = None, *, env: dict[str, str] | None = None,
                 wrap: list[str] | None = None, timeout: float = 120) -> DaemonProc:
    """The real sessionguardd, reconciliation pushed out to an hour so a periodic stat
    pass does not land inside a measurement; everything else is the default. *watch*
    None: the watches come from *extra* (``--config``); *wrap* as for DaemonProc."""
    args = [*(["--watch", watch] if watch is not None else []), "--reconcile-interval", "3600", *(extra or [])]
    d = DaemonProc(work, args, env=env, wrap=wrap)
    try:
        d.wait_event("daemon.started", timeout=timeout)
    except BaseException:
        d.kill()
        raise
    return d


def iso_ts(ev: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()

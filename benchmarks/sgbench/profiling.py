"""Where the daemon's CPU goes on the event path: py-spy attached to the real daemon under load.

The writer of section 2a (1,000-message sessions, each write appending one
message) runs while ``py-spy record`` samples every thread of the daemon
(``--format raw``: one line per distinct stack, each frame with its current
line). Idle threads are not sampled (py-spy's default), so the samples
are where the daemon was running or in a system call. Each function's
*inclusive* share is the fraction of samples with it anywhere on the stack;
its *self* share, the samples where it is the innermost Python frame (time in
C code and in system calls called from it counts as its self time: orjson's
parse is the self time of ``count._loads``).

py-spy's own idle detection does not work here (threads blocked in
``Condition.wait`` or ``select`` are sampled), so samples whose innermost frame
is one of :data:`WAITING` are counted as idle and left out of the shares; the
active samples divided by the rate are compared with the CPU /proc measured.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from .common import Docs, fresh, proc_cpu_s, server_write, start_daemon

#: Our own names for the stages of one event, each matched against the frames of a stack.
STAGES: dict[str, tuple[str, ...]] = {
    "inotify intake (watchdog emitter + our handler + queue)": ("watchdog/observers/", "_Handler."),
    "identify the path (Matcher, fnmatch)": ("Matcher.identify", "Tracker.watch_for"),
    "session lock": ("sessionguard/locks.py",),
    "open + stat the live file": ("open_regular", "lstat_at", "WatchState.open_parent", "foreign_link"),
    "read the live file": ("read_fd (sessionguard/fsutil.py",),
    "parse (orjson)": ("parse (sessionguard/count.py",),
    "content-aware check (Identity.of + replaced)": ("Identity.of", "replaced (sessionguard/rules.py"),
    "pin: reflink attempt (clone, copy, discard)": ("Pins.reflink",),
    "pin: write the copy": ("Pins.write",),
    "pin stat check (_still_pinned)": ("_still_pinned",),
    "control socket (sync, status)": ("sessionguard/control.py", "sessionguard/service.py"),
}


#: Innermost frames where a thread waits for work, not runs.
WAITING = ("Condition.wait (", "._check_inotify_fd (", "EpollSelector.select (", "_worker (concurrent/futures/",
           "Event.wait (", "DelayedQueue.get (", "Queue.get (")


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rpartition(" ")
    return stack.split(";")[1:], int(count)  # the first element names the thread


def _function(frame: str) -> str:
    """``Pins.write (sessionguard/pins.py:121)`` → ``Pins.write (sessionguard/pins.py)``."""
    return re.sub(r":\d+\)$", ")", frame)


def aggregate(raw: str, top: int = 25) -> dict[str, Any]:
    """Inclusive and self shares per function, and the share of each stage, from py-spy raw output."""
    total = idle = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in raw.splitlines():
        if not line.strip():
            continue
        frames, n = _frames(line)
        if not frames or any(w in frames[-1] for w in WAITING):
            idle += n
            continue
        total += n
        threads[line.split(";", 1)[0].split(": ", 1)[-1]] += n
        for f in {_function(f) for f in frames}:
            inclusive[f] += n
        own[_function(frames[-1])] += n
        lines[frames[-1]] += n
        for stage, marks in STAGES.items():
            if any(m in f for f in frames for m in marks):
                stages[stage] += n
    if not total:
        return {"samples": 0}

    def share(c: Counter[str], k: int) -> list[list[Any]]:
        return [[name, round(n / total, 3)] for name, n in c.most_common(k)]

    return {"samples": total, "idle_samples": idle, "threads": share(threads, 10), "stages": share(stages, len(STAGES)),
            "inclusive": share(inclusive, top), "self": share(own, top), "self_lines": share(lines, top)}


def bench_profile(work: Path, sessions: int, writes: int, rate: int = 200) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(__import__("sys").executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    docs = [Docs(1000 + writes // sessions + 2, sid=f"s{j:04d}") for j in range(sessions)]
    d = fresh(work, "profile")
    paths = [str(d / f"s{j:04d}.json") for j in range(sessions)]
    for j, p in enumerate(paths):
        server_write(p, docs[j](1000))
    out = work / "py-spy.txt"
    proc = start_daemon(work, str(d))
    try:
        proc.sync(60)
        rec = subprocess.Popen([spy, "record", "-p", str(proc.proc.pid), "-o", str(out), "-f", "raw",
                                "-r", str(rate), "--threads"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proc.sync(60)  # py-spy attaches within this round trip's time; a few samples of idle start-up are fine
        cpu0 = proc_cpu_s(proc.proc.pid)
        for k in range(writes):
            j = k % sessions
            server_write(paths[j], docs[j](1001 + k // sessions))
        proc.sync(120)
        cpu = proc_cpu_s(proc.proc.pid) - cpu0
        evals = proc.call("status")["evaluations"]
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=60)
    finally:
        proc.stop()
    shutil.rmtree(d)
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"}
    result = aggregate(out.read_text())
    result.update(writes=writes, sessions=sessions, rate_hz=rate, daemon_cpu_s=round(cpu, 3),
                  active_sample_s=round(result.get("samples", 0) / rate, 3), evaluations=evals,
                  cpu_ms_per_1000_writes=round(cpu / writes * 1e6, 1))
    return result

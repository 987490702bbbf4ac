"""Where the daemon's time goes on the event path: py-spy attached to the real daemon under load.

The writer of section 2a (each write appending one message) runs while
``py-spy record`` samples every thread of the daemon (``--format raw``: one
line per distinct stack, each frame with its current line). Two views:

* CPU by thread, from /proc (``utime``/``stime`` of each task): the worker
  that evaluates and pins, watchdog's inotify reader, and the other threads
  (watchdog's emitter and dispatcher, control). This is CPU, exactly.
* Where busy threads are, from py-spy: a sample counts when the thread is
  running *or inside a system call* (py-spy cannot tell them apart), so the
  shares are of busy time, not of CPU — a rename that waits for the journal
  counts. Samples whose innermost frame is one of :data:`WAITING` (a thread
  waiting for work: py-spy's own idle detection does not work here) are left
  out. A function's *inclusive* share counts samples with it anywhere on the
  stack; its *self* share, samples where it is the innermost Python frame
  (time in C code and system calls counts as the caller's: orjson's parse is
  the self time of ``count._loads``).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .common import Appender, cpu_by_thread, proc_cpu_s, start_daemon, thread_ticks

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


def bench_profile(work: Path, sessions: int, start_msgs: int, writes: int, rate: int = 200) -> dict[str, Any]:
    """Profile the daemon while *writes* appending writes go round-robin to *sessions* sessions
    of *start_msgs* messages."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    load = Appender(work, "profile", sessions, start_msgs, writes)
    d = load.dir
    out = work / f"py-spy-{start_msgs}.txt"
    proc = start_daemon(work, str(d))
    try:
        proc.sync(60)
        rec = subprocess.Popen([spy, "record", "-p", str(proc.proc.pid), "-o", str(out), "-f", "raw",
                                "-r", str(rate), "--threads"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proc.sync(60)  # py-spy attaches within this round trip's time; a few samples of idle start-up are fine
        cpu0, ev0 = proc_cpu_s(proc.proc.pid), proc.call("status")["evaluations"]
        threads0 = thread_ticks(proc.proc.pid)
        load.append()
        proc.sync(120)
        cpu = proc_cpu_s(proc.proc.pid) - cpu0
        by_thread = cpu_by_thread(threads0, thread_ticks(proc.proc.pid), writes / 1000)
        evals = proc.call("status")["evaluations"] - ev0
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=60)
    finally:
        proc.stop()
    shutil.rmtree(d)
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"}
    result = aggregate(out.read_text())
    result.update(writes=writes, sessions=sessions, start_msgs=start_msgs, rate_hz=rate,
                  daemon_cpu_s=round(cpu, 3), active_sample_s=round(result.get("samples", 0) / rate, 3),
                  evaluations=evals, cpu_ms_per_1000_writes=round(cpu / writes * 1e6, 1),
                  cpu_by_thread_per_1000_writes=by_thread)
    return result

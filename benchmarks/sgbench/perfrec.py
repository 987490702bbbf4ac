"""The worker thread's CPU by system call and by library: ``perf`` on the real daemon under load.

py-spy sees Python frames but cannot tell CPU from waiting inside a system
call; ``perf record -e cpu-clock`` on the worker thread alone samples only
while it is on a CPU, in the kernel too. Each sample is put in one bucket:
the system call it is inside (``__x64_sys_*`` on its kernel stack; a rename
over an existing file whose stack shows ext4 starting writeback of the new
file is its own bucket: ext4's ``auto_da_alloc``), a page fault, other kernel
work (interrupts, scheduling), or the user-space library it is in
(``libpython`` is the interpreter, ``orjson`` the parse). Needs ``perf``
(Debian: linux-perf); skipped without it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from .common import Appender, start_daemon, thread_ticks

_SYSCALL = re.compile(r"(?:__x64_sys_|__do_sys_)(\w+)")


def _bucket(frames: list[str]) -> str:
    syms = [f.split(" ", 1)[1].split("+", 1)[0] if " " in f else f for f in frames]
    for s in syms:
        m = _SYSCALL.match(s)
        if m:
            name = f"system call {m.group(1)}"
            if "ext4_rename" in syms and any("fdatawrite" in x for x in syms):
                name += ": ext4 writeback of the file renamed over another"
            return name
    if any("exc_page_fault" in s for s in syms):
        return "page faults"
    dso = re.search(r"\(([^)]*)\)$", frames[0]) if frames else None
    lib = dso.group(1).rsplit("/", 1)[-1] if dso else "?"
    return "kernel, outside system calls" if lib == "[kernel.kallsyms]" else f"user: {lib}"


def aggregate(script: str) -> dict[str, Any]:
    """Shares of samples per bucket, from ``perf script`` output (one block per sample)."""
    buckets: Counter[str] = Counter()
    for block in script.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) > 1:
            buckets[_bucket(lines[1:])] += 1
    total = sum(buckets.values())
    return {"samples": total, "buckets": [[k, round(v / total, 3)] for k, v in buckets.most_common(16)]}


def bench_perf(work: Path, sessions: int, start_msgs: int, writes: int) -> dict[str, Any]:
    if not shutil.which("perf"):
        return {"skipped": "perf is not installed"}
    load = Appender(work, "perf", sessions, start_msgs, writes)
    d = load.dir
    data = work / f"perf-{start_msgs}.data"
    proc = start_daemon(work, str(d))
    try:
        proc.sync(60)
        pid = proc.proc.pid
        tid = next(t for t, (name, _, _) in thread_ticks(pid).items() if name == "sg-worker")
        rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-t", tid, "-o", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proc.sync(60)  # perf attaches meanwhile
        t0 = thread_ticks(pid)[tid]
        load.append()
        proc.sync(120)
        t1 = thread_ticks(pid)[tid]
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=60)
    finally:
        proc.stop()
    shutil.rmtree(d)
    if not data.exists():
        return {"error": f"perf wrote nothing: {err.decode(errors='replace')[-300:]}"}
    script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True, check=True).stdout
    os.unlink(data)
    out = aggregate(script)
    ticks = (t1[1] - t0[1]) + (t1[2] - t0[2])
    out.update(writes=writes, sessions=sessions, start_msgs=start_msgs,
               worker_cpu_ms_per_1000_writes=round(ticks / os.sysconf("SC_CLK_TCK") * 1e6 / writes, 1))
    return out

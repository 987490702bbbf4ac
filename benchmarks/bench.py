"""sessionguard benchmarks: the guard's save and the real daemon, each against
a baseline measured in the same run. Run through ``benchmarks/run``.

Every result is reported as absolute numbers *and* a ratio to its baseline,
because this machine (and any CI runner) is shared and noisy: only
same-run ratios are comparable between runs. Nothing here is tuned or
hard-coded; BENCHMARKS.md explains how to read the output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import orjson  # noqa: E402

import sessionguard  # noqa: E402
from daemonproc import DaemonProc  # noqa: E402  (tests/: runs the real sessionguardd)
from sessionguard import fsutil  # noqa: E402
from sghelpers import make_session, server_write  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NAIVE = ROOT / "benchmarks" / "naive_watcher.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SID = "bench"

# --------------------------------------------------------------------------
# small helpers


def pc() -> float:
    return time.perf_counter()


def pct(values: list[float], p: float) -> float:
    """Percentile with linear interpolation (p in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(seconds: list[float]) -> dict[str, float]:
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


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Docs:
    """make_session(n) for many n without rebuilding the messages each time.

    make_session's message i does not depend on n, so make_session(n) equals
    the metadata of make_session(n) plus the first n messages of a longer one.
    """

    def __init__(self, max_n: int, sid: str = "abc123def456") -> None:
        self.base = make_session(max_n, sid)
        self.msgs = self.base["messages"]
        self.meta = {k: v for k, v in self.base.items() if k != "messages"}

    def __call__(self, n: int) -> dict[str, Any]:
        if n > len(self.msgs):
            raise ValueError(n)
        doc = dict(self.meta)
        doc["updated_at"] = 1764000000.0 + n
        doc["messages"] = self.msgs[:n]
        return doc


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


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


def tree_bytes(path: str) -> int:
    """Apparent bytes of the regular files under *path*, each inode once."""
    seen, total = set(), 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def start_daemon(work: Path, watch: str, extra: list[str] | None = None, timeout: float = 120) -> DaemonProc:
    """The real sessionguardd, started the way tests/daemonproc.py starts it.

    Reconciliation is pushed out to an hour so a periodic stat pass does not
    land inside a measurement; everything else is the default.
    """
    d = DaemonProc(work, ["--watch", watch, "--reconcile-interval", "3600", *(extra or [])])
    try:
        d.wait_event("daemon.started", timeout=timeout)
    except BaseException:
        d.kill()
        raise
    return d


def iso_ts(ev: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()


def fresh(work: Path, name: str) -> Path:
    p = work / name
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


# --------------------------------------------------------------------------
# 1. guard save vs plain save vs naive guard


def naive_guard_save(path: str, doc: dict[str, Any]) -> None:
    """What a guard written in five minutes does: read and parse the previous
    file to count its messages, copy it to .bak when the write shrinks, then
    the plain save."""
    try:
        with open(path, "rb") as f:
            old = orjson.loads(f.read())
        if len(doc["messages"]) < len(old.get("messages", [])):
            shutil.copyfile(path, path + ".bak")
    except FileNotFoundError:
        pass
    server_write(path, doc)


def bench_guard_save(work: Path, iters: int, breakdown_iters: int) -> dict[str, Any]:
    warm = 5
    docs = Docs(1000 + 2 * (iters + warm) + 10)
    base_size = len(orjson.dumps(docs(1000), option=orjson.OPT_INDENT_2))
    dirs = {v: fresh(work, f"save-{v}") for v in ("plain", "guard", "naive", "guard_shrink", "plain_dirfsync")}
    guard = sessionguard.Guard(dirs["guard"])
    guard_s = sessionguard.Guard(dirs["guard_shrink"])
    paths = {v: str(dirs[v] / f"{SID}.json") for v in dirs}

    # Alternating series: grow by 2, shrink by 1 (every other save is a shrink,
    # and each shrink keeps a version with different bytes, so nothing dedups).
    def shrink_n(k: int) -> int:
        return 1002 + k // 2 if k % 2 == 0 else 1001 + (k - 1) // 2

    shrink_k = 0

    def do(variant: str, n: int) -> float:
        nonlocal shrink_k
        if variant == "guard_shrink":
            doc = docs(shrink_n(shrink_k))
            shrink_k += 1
        else:
            doc = docs(n)
        t0 = pc()
        if variant == "plain":
            server_write(paths["plain"], doc)
        elif variant == "guard":
            guard.save(SID, doc)
        elif variant == "naive":
            naive_guard_save(paths["naive"], doc)
        elif variant == "plain_dirfsync":
            server_write(paths["plain_dirfsync"], doc)
            fsutil.fsync_dir(str(dirs["plain_dirfsync"]))
        else:
            guard_s.save(SID, doc)
        return pc() - t0

    # Initial file (1000 messages) for everyone, then round-robin.
    server_write(paths["plain"], docs(1000))
    naive_guard_save(paths["naive"], docs(1000))
    guard.save(SID, docs(1000))
    guard_s.save(SID, docs(1000))
    server_write(paths["plain_dirfsync"], docs(1000))
    variants = ["plain", "guard", "naive", "guard_shrink", "plain_dirfsync"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    shrink_flags: list[bool] = []
    for r in range(iters + warm):
        m = r % len(variants)
        order = variants[m:] + variants[:m]  # rotate: nobody always goes first
        for v in order:
            if v == "guard_shrink":
                is_shrink = shrink_k % 2 == 1
            t = do(v, 1001 + r)
            if r >= warm:
                times[v].append(t)
                if v == "guard_shrink":
                    shrink_flags.append(is_shrink)
    versions_kept = len(guard_s.versions(SID))
    assert not guard.versions(SID), "growth-only series must keep no versions"
    out: dict[str, Any] = {
        "session_bytes": base_size,
        "iterations": iters,
        "order": "round-robin over plain, guard, naive, guard_shrink, plain_dirfsync, rotated each round",
        "plain": summary_ms(times["plain"]),
        "guard": summary_ms(times["guard"]),
        "naive": summary_ms(times["naive"]),
        "plain_dirfsync_info": summary_ms(times["plain_dirfsync"]),
        "guard_shrink_alternating": {
            "shrink_saves": summary_ms([t for t, s in zip(times["guard_shrink"], shrink_flags, strict=False) if s]),
            "growth_saves": summary_ms([t for t, s in zip(times["guard_shrink"], shrink_flags, strict=False) if not s]),
            "versions_left_after_retention": versions_kept,
        },
    }
    pm = out["plain"]["median_ms"]
    p90 = out["plain"]["p90_ms"]
    for v in ("guard", "naive", "plain_dirfsync_info"):
        out[v]["ratio_median_vs_plain"] = ratio(out[v]["median_ms"], pm)
        out[v]["ratio_p90_vs_plain"] = ratio(out[v]["p90_ms"], p90)
    for k in ("shrink_saves", "growth_saves"):
        g = out["guard_shrink_alternating"][k]
        g["ratio_median_vs_plain"] = ratio(g["median_ms"], pm)
        g["ratio_p90_vs_plain"] = ratio(g["p90_ms"], p90)
    out["guard_within_10pct_target"] = out["guard"]["ratio_median_vs_plain"] <= 1.10
    out["breakdown"] = guard_breakdown(work, docs, breakdown_iters)
    return out


def guard_breakdown(work: Path, docs: Docs, iters: int) -> dict[str, Any]:
    """What each filesystem operation the guard adds to a save costs here.

    The operations are timed on their own, interleaved, on a session of the
    benchmark's size — not by replaying guard.py's code path, which would
    have to be kept in step with it. BENCHMARKS.md lists which of them a
    growth save performs (``strace -f`` of one ``Guard.save`` shows them).
    """
    d = fresh(work, "breakdown")
    store = sessionguard.Guard(d).store
    path = str(d / f"{SID}.json")
    data = orjson.dumps(docs(1000), option=orjson.OPT_INDENT_2)
    server_write(path, docs(1000))
    store.session_dir(SID, create=True)
    pin_name = os.path.join(store.session_dir(SID), "pin.bench")
    steps: dict[str, list[float]] = {s: [] for s in (
        "lock+unlock", "pin_lookup", "tmp+write+fsync+rename", "dir_fsync_after_rename",
        "reopen+fstat+close", "pin_link+lstat+unlink_old")}

    def timed(step: str, fn: Any) -> None:
        t0 = pc()
        fn()
        steps[step].append(pc() - t0)

    def lock() -> None:
        with store.lock(SID):
            pass

    def reopen() -> None:
        fd, _ = fsutil.open_regular(path)
        os.close(fd)

    names = [pin_name + ".a", pin_name + ".b"]
    os.link(path, names[0])

    def relink() -> None:  # the new pin name, its inode check, the old name removed
        os.link(path, names[1], follow_symlinks=False)
        os.lstat(names[1])
        os.unlink(names[0])
        names.reverse()

    for _ in range(iters):
        timed("lock+unlock", lock)
        timed("pin_lookup", lambda: store.pin(SID, tidy=True))
        timed("tmp+write+fsync+rename", lambda: fsutil.atomic_write(path, data, sync_dir=False))
        timed("dir_fsync_after_rename", lambda: fsutil.fsync_dir(str(d)))
        timed("reopen+fstat+close", reopen)
        timed("pin_link+lstat+unlink_old", relink)
    return {
        "iterations": iters,
        "steps_median_ms": {s: round(statistics.median(v) * 1e3, 4) for s, v in steps.items()},
        "note": "each operation timed on its own, interleaved; see BENCHMARKS.md for which a save performs",
    }


# --------------------------------------------------------------------------
# 2a. events per second


def bench_events(work: Path, n_sessions: int, writes: int, reps: int) -> dict[str, Any]:
    rounds = writes // n_sessions + 2
    docsets = [Docs(6 + rounds, sid=f"s{j:04d}") for j in range(n_sessions)]
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "daemon": []}
    for rep in range(reps):
        for mode in (("baseline", "daemon") if rep % 2 == 0 else ("daemon", "baseline")):
            d = fresh(work, f"events-{mode}-{rep}")
            paths = [str(d / f"s{j:04d}.json") for j in range(n_sessions)]
            for j, p in enumerate(paths):
                server_write(p, docsets[j](5))
            proc = start_daemon(work, str(d)) if mode == "daemon" else None
            try:
                idle_sync = None
                if proc:
                    t = pc()
                    proc.sync(120)
                    idle_sync = pc() - t
                    cpu0 = proc_cpu_s(proc.proc.pid)
                    st0 = proc.call("status")
                t0 = pc()
                for k in range(writes):
                    j = k % n_sessions
                    server_write(paths[j], docsets[j](6 + k // n_sessions))
                t1 = pc()
                row: dict[str, Any] = {"writes": writes, "seconds": round(t1 - t0, 4),
                                       "writes_per_s": round(writes / (t1 - t0), 1)}
                if proc:
                    proc.sync(120)
                    t2 = pc()
                    cpu1 = proc_cpu_s(proc.proc.pid)
                    st1 = proc.call("status")
                    ev = st1["events"] - st0["events"]
                    evals = st1["evaluations"] - st0["evaluations"]
                    row.update({
                        "drain_after_last_write_ms": round((t2 - t1) * 1e3, 2),
                        "idle_sync_roundtrip_ms": round(idle_sync * 1e3, 2),
                        "daemon_cpu_s": round(cpu1 - cpu0, 3),
                        "daemon_cpu_ms_per_1000_writes": round((cpu1 - cpu0) / writes * 1e6, 1),
                        "inotify_events": ev,
                        "daemon_cpu_ms_per_1000_events": round((cpu1 - cpu0) / ev * 1e6, 1) if ev else None,
                        "evaluations": evals,
                        "evaluations_per_write": round(evals / writes, 3),
                        "errors": st1["errors"],
                        "end_to_end_writes_per_s": round(writes / (t2 - t0), 1),
                    })
            finally:
                if proc:
                    proc.stop()
            runs[mode].append(row)
            shutil.rmtree(d)
    base = statistics.median(r["writes_per_s"] for r in runs["baseline"])
    dmn = statistics.median(r["writes_per_s"] for r in runs["daemon"])
    e2e = statistics.median(r["end_to_end_writes_per_s"] for r in runs["daemon"])
    return {
        "sessions": n_sessions,
        "writes_per_run": writes,
        "session_messages": "5 growing by 1 per write (~2.5-3 KB)",
        "baseline_writes_per_s": base,
        "daemon_writes_per_s": dmn,
        "ratio_writes_per_s_daemon_vs_baseline": ratio(dmn, base),
        "daemon_end_to_end_writes_per_s": e2e,
        "ratio_end_to_end_vs_baseline": ratio(e2e, base),
        "drain_after_last_write_ms": statistics.median(r["drain_after_last_write_ms"] for r in runs["daemon"]),
        "idle_sync_roundtrip_ms": statistics.median(r["idle_sync_roundtrip_ms"] for r in runs["daemon"]),
        "daemon_cpu_ms_per_1000_writes": statistics.median(r["daemon_cpu_ms_per_1000_writes"] for r in runs["daemon"]),
        "evaluations_per_write": statistics.median(r["evaluations_per_write"] for r in runs["daemon"]),
        "daemon_cpu_ms_per_1000_events": statistics.median(
            r["daemon_cpu_ms_per_1000_events"] for r in runs["daemon"] if r["daemon_cpu_ms_per_1000_events"]),
        "runs": runs,
    }


# --------------------------------------------------------------------------
# 2b. shrink -> durable version latency


def bench_shrink_latency(work: Path, wipes: int) -> dict[str, Any]:
    docs = Docs(1000 + wipes + 2)
    d = fresh(work, "wipe")
    path = str(d / f"{SID}.json")
    server_write(path, docs(1000))
    proc = start_daemon(work, str(d))
    sdir = d / ".sessionguard" / "sessions" / SID
    lat, save, sync_done, regrow_save = [], [], [], []
    timeouts = 0
    try:
        proc.sync(120)
        for i in range(wipes):
            t = pc()
            server_write(path, docs(1001 + i))  # regrow: distinct bytes each time
            regrow_save.append(pc() - t)
            proc.sync(120)
            before = {n for n in os.listdir(sdir) if n.endswith(".version")}
            wipe = dict(docs.meta, messages=[], updated_at=1764000000.0 + 10_000_000 + i)
            ts = pc()
            server_write(path, wipe)
            t0 = pc()
            deadline = t0 + 30
            while True:
                if any(n.endswith(".version") and n not in before for n in os.listdir(sdir)):
                    break
                if pc() > deadline:
                    timeouts += 1
                    break
                time.sleep(0.001)
            t1 = pc()
            proc.sync(120)
            t2 = pc()
            lat.append(t1 - t0)
            save.append(t0 - ts)
            sync_done.append(t2 - t0)
        kept = proc.call("status")["versions_kept"]
    finally:
        proc.stop()
        shutil.rmtree(d)
    out = {
        "wipes": wipes,
        "poll": "os.listdir of the store session dir every ~1 ms (resolution ~1 ms)",
        "version_appears": summary_ms(lat),
        "writer_wipe_save": summary_ms(save),
        "writer_regrow_save_1000msgs": summary_ms(regrow_save),
        "sync_returns_after_wipe": summary_ms(sync_done),
        "versions_kept_by_daemon": kept,
        "timeouts": timeouts,
    }
    out["ratio_median_vs_wipe_save"] = ratio(out["version_appears"]["median_ms"], out["writer_wipe_save"]["median_ms"])
    out["ratio_p99_vs_wipe_save"] = ratio(out["version_appears"]["p99_ms"], out["writer_wipe_save"]["p99_ms"])
    out["ratio_median_vs_regrow_save"] = ratio(out["version_appears"]["median_ms"],
                                               out["writer_regrow_save_1000msgs"]["median_ms"])
    return out


# --------------------------------------------------------------------------
# 2c + 2d. memory and restart over many sessions


def make_many(d: Path, n: int) -> int:
    """n five-message sessions, written fast (no fsync), then one sync(2)."""
    docs = Docs(5)
    total = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    for i in range(n):
        sid = f"s{i:06d}"
        doc = dict(docs.meta, session_id=sid, title=f"session {sid}", messages=docs.msgs)
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
        fd = os.open(d / f"{sid}.json", flags, 0o644)
        os.write(fd, data)
        os.close(fd)
        total += len(data)
    os.sync()
    return total


def one_start(work: Path, d: Path, timeout: float) -> dict[str, Any]:
    t_launch = time.time()
    proc = start_daemon(work, str(d), timeout=timeout)
    try:
        started = proc.wait_event("daemon.started")
        scan = proc.wait_event("scan.completed")
        time.sleep(1.0)  # settle before reading memory
        mem = proc_mem_kb(proc.proc.pid)
        status = proc.call("status")
    finally:
        proc.stop()
    return {
        "start_to_started_s": round(iso_ts(started) - t_launch, 3),
        "scan_duration_ms": scan.get("duration_ms"),
        "scan": {k: v for k, v in scan.items() if k not in ("event", "level", "timestamp", "watch")},
        "VmRSS_kB": mem.get("VmRSS"),
        "VmHWM_kB": mem.get("VmHWM"),
        "sessions_tracked": status["sessions"],
    }


def bench_scale(work: Path, sizes: list[int]) -> dict[str, Any]:
    empty = fresh(work, "scale-0")
    zero = one_start(work, empty, 60)
    shutil.rmtree(empty)
    out: dict[str, Any] = {"baseline_0_sessions": zero, "sizes": {}}
    for n in sizes:
        d = fresh(work, f"scale-{n}")
        t = pc()
        nbytes = make_many(d, n)
        gen_s = pc() - t
        log(f"  {n} sessions generated in {gen_s:.1f}s; first start (pins everything)")
        first = one_start(work, d, 3600)
        os.sync()
        log(f"  first start {first['start_to_started_s']}s; restart")
        second = one_start(work, d, 3600)
        row = {
            "session_file_bytes_total": nbytes,
            "first_start": first,
            "restart": second,
            "restart_read_nothing": second["scan"].get("unchanged") == n and second["scan"].get("files") == n,
            "ratio_restart_vs_first_start": ratio(second["start_to_started_s"], first["start_to_started_s"]),
            "ratio_restart_vs_0_sessions_start": ratio(second["start_to_started_s"], zero["start_to_started_s"]),
            "ratio_rss_vs_0_sessions_first": ratio(first["VmRSS_kB"], zero["VmRSS_kB"]),
            "ratio_rss_vs_0_sessions_restart": ratio(second["VmRSS_kB"], zero["VmRSS_kB"]),
            "rss_kB_per_session_restart": round((second["VmRSS_kB"] - zero["VmRSS_kB"]) / n, 3),
            "hwm_kB_per_session_first": round((first["VmHWM_kB"] - zero["VmHWM_kB"]) / n, 3),
        }
        out["sizes"][str(n)] = row
        t = pc()
        shutil.rmtree(d)
        log(f"  cleaned up in {pc() - t:.1f}s")
    return out


# --------------------------------------------------------------------------
# 2e. write amplification


class NaiveWatcher:
    def __init__(self, watch: Path, backup: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(NAIVE), str(watch), str(backup)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.watch = watch
        self.n = 0
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"naive watcher: {line!r}")

    def sync(self) -> None:
        self.n += 1
        token = f"{os.getpid()}-{self.n}"
        cookie = self.watch / f".naive-sync-{token}"
        cookie.touch()
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("naive watcher exited")
            if line.strip() == f"synced {token}":
                break
        cookie.unlink()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bench_write_amp(work: Path, megabytes: float) -> dict[str, Any]:
    """Bytes the watcher writes per MB the server writes, daemon vs naive copier.

    Two writer patterns: *paced* waits (sync) after every write, so every
    write is seen on its own — the worst case for the daemon; *burst* writes
    as fast as it can, so the daemon's coalescing queue may skip
    intermediate versions (the naive copier has no queue to coalesce).
    """
    start_n = 900  # ~410 KB
    per = len(orjson.dumps(make_session(start_n), option=orjson.OPT_INDENT_2))
    writes = max(int(megabytes * 1e6 / per), 5)
    docs = Docs(start_n + writes + 2)
    out: dict[str, Any] = {"writes": writes, "session_bytes_at_start": per, "patterns": {}}
    for pattern in ("paced", "burst"):
        modes: dict[str, Any] = {}
        for mode in ("daemon_auto", "daemon_link", "naive"):
            d = fresh(work, f"amp-{mode}")
            backup = work / f"amp-{mode}-backup"
            path = str(d / f"{SID}.json")
            server_write(path, docs(start_n))
            if mode == "naive":
                w: Any = NaiveWatcher(d, backup)
                pid, store_dir, do_sync = w.proc.pid, backup, w.sync
            else:
                w = start_daemon(work, str(d), ["--pin", mode.split("_")[1]])
                pid, store_dir, do_sync = w.proc.pid, d / ".sessionguard", (lambda w=w: w.sync(120))
            try:
                do_sync()
                io0, me0 = proc_io(pid), proc_io("self")
                ev0 = w.call("status")["evaluations"] if mode != "naive" else None
                store0 = tree_bytes(str(store_dir))
                logical = 0
                t0 = pc()
                for k in range(writes):
                    server_write(path, docs(start_n + 1 + k))
                    logical += os.stat(path).st_size
                    if pattern == "paced":
                        do_sync()
                do_sync()
                secs = pc() - t0
                io1, me1 = proc_io(pid), proc_io("self")
                store1 = tree_bytes(str(store_dir))
                evals = w.call("status")["evaluations"] - ev0 if mode != "naive" else None
                copies = None if mode != "naive" else len(os.listdir(backup))
            finally:
                w.stop()
            mb = logical / 1e6
            wb = io1["write_bytes"] - io0["write_bytes"]
            modes[mode] = {
                "logical_MB_written_by_writer": round(mb, 3),
                "writer_write_bytes_per_MB": round((me1["write_bytes"] - me0["write_bytes"]) / mb),
                "watcher_write_bytes": wb,
                "watcher_write_bytes_per_MB": round(wb / mb),
                "watcher_wchar_per_MB": round((io1["wchar"] - io0["wchar"]) / mb),
                "watcher_read_bytes_per_MB": round((io1["read_bytes"] - io0["read_bytes"]) / mb),
                "watcher_rchar_per_MB": round((io1["rchar"] - io0["rchar"]) / mb),
                "store_bytes_added": store1 - store0,
                "store_bytes_added_per_MB": round((store1 - store0) / mb),
                "daemon_evaluations": evals,
                "naive_copies": copies,
                "seconds": round(secs, 3),
            }
            shutil.rmtree(d)
            shutil.rmtree(backup, ignore_errors=True)
        naive = modes["naive"]
        for mode in ("daemon_auto", "daemon_link"):
            m = modes[mode]
            m["ratio_write_bytes_vs_naive"] = ratio(m["watcher_write_bytes_per_MB"],
                                                    naive["watcher_write_bytes_per_MB"])
            m["ratio_store_bytes_added_vs_naive"] = ratio(m["store_bytes_added_per_MB"],
                                                         naive["store_bytes_added_per_MB"])
        out["patterns"][pattern] = modes
    return out


# --------------------------------------------------------------------------
# machine, table, main


def machine(workdir: Path) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        df = subprocess.run(["df", "--output=source,fstype", str(workdir)], capture_output=True,
                            text=True, check=True).stdout.splitlines()[-1].split()
    except (OSError, subprocess.CalledProcessError, IndexError):
        df = ["?", "?"]
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), "?")
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "daemon"],
                                    capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        commit, dirty = "?", None
    import watchdog.version
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_kB": int(mem) if mem.isdigit() else mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "orjson": orjson.__version__,
        "watchdog": watchdog.version.VERSION_STRING,
        "workdir": str(workdir),
        "workdir_device": df[0],
        "workdir_fstype": df[1],
        "git_commit": commit,
        "daemon_tree_dirty": dirty,
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, value: str, base: str, r: Any) -> None:
        rows.append((name, value, base, "" if r is None else f"{r:.3f}x"))

    g = res.get("guard_save")
    if isinstance(g, dict) and "plain" in g:
        p = g["plain"]
        base = f"plain {p['median_ms']:.3f} / {p['p90_ms']:.3f} ms"
        for v, label in (("guard", "1b guard save (growth)"), ("naive", "1c naive guard save (growth)")):
            add(label + " median", f"{g[v]['median_ms']:.3f} ms", f"plain {p['median_ms']:.3f} ms",
                g[v]["ratio_median_vs_plain"])
            add(label + " p90", f"{g[v]['p90_ms']:.3f} ms", f"plain {p['p90_ms']:.3f} ms", g[v]["ratio_p90_vs_plain"])
        s = g["guard_shrink_alternating"]["shrink_saves"]
        add("1  guard save, shrinking (info) median", f"{s['median_ms']:.3f} ms", f"plain {p['median_ms']:.3f} ms",
            s["ratio_median_vs_plain"])
        add("1  guard save, shrinking (info) p90", f"{s['p90_ms']:.3f} ms", f"plain {p['p90_ms']:.3f} ms",
            s["ratio_p90_vs_plain"])
        i = g["plain_dirfsync_info"]
        add("1  plain + dir fsync (info) median", f"{i['median_ms']:.3f} ms", f"plain {p['median_ms']:.3f} ms",
            i["ratio_median_vs_plain"])
        add("1  guard vs plain + dir fsync (info)", f"{g['guard']['median_ms']:.3f} ms",
            f"plain+dirfsync {i['median_ms']:.3f} ms", ratio(g["guard"]["median_ms"], i["median_ms"]))
        add("1  guard within 10% of plain?", "yes" if g["guard_within_10pct_target"] else "NO", base, None)
    e = res.get("events")
    if isinstance(e, dict) and "baseline_writes_per_s" in e:
        add("2a writes/s with daemon", f"{e['daemon_writes_per_s']:.0f}/s",
            f"no daemon {e['baseline_writes_per_s']:.0f}/s", e["ratio_writes_per_s_daemon_vs_baseline"])
        add("2a writes/s incl. drain", f"{e['daemon_end_to_end_writes_per_s']:.0f}/s",
            f"no daemon {e['baseline_writes_per_s']:.0f}/s", e["ratio_end_to_end_vs_baseline"])
        add("2a drain after last write", f"{e['drain_after_last_write_ms']:.1f} ms",
            f"idle sync {e['idle_sync_roundtrip_ms']:.1f} ms",
            ratio(e["drain_after_last_write_ms"], e["idle_sync_roundtrip_ms"]))
        add("2a daemon CPU per 1000 writes", f"{e['daemon_cpu_ms_per_1000_writes']:.0f} ms",
            f"{e['evaluations_per_write']:.2f} evaluations/write", None)
        add("2a daemon CPU per 1000 inotify events", f"{e['daemon_cpu_ms_per_1000_events']:.0f} ms", "", None)
    s = res.get("shrink_latency")
    if isinstance(s, dict) and "version_appears" in s:
        v, w = s["version_appears"], s["writer_wipe_save"]
        add("2b wipe -> version visible, median", f"{v['median_ms']:.2f} ms", f"wipe save {w['median_ms']:.2f} ms",
            s["ratio_median_vs_wipe_save"])
        add("2b wipe -> version visible, p99", f"{v['p99_ms']:.2f} ms", f"wipe save {w['p99_ms']:.2f} ms",
            s["ratio_p99_vs_wipe_save"])
    sc = res.get("scale")
    if isinstance(sc, dict) and "sizes" in sc:
        z = sc["baseline_0_sessions"]
        for n, row in sc["sizes"].items():
            f, r = row["first_start"], row["restart"]
            add(f"2c RSS, {n} sessions (after restart)", f"{r['VmRSS_kB'] / 1024:.1f} MiB",
                f"0 sessions {z['VmRSS_kB'] / 1024:.1f} MiB", row["ratio_rss_vs_0_sessions_restart"])
            add(f"2c HWM, {n} sessions (first start)", f"{f['VmHWM_kB'] / 1024:.1f} MiB",
                f"0 sessions {z['VmHWM_kB'] / 1024:.1f} MiB", ratio(f["VmHWM_kB"], z["VmHWM_kB"]))
            add(f"2d restart, {n} unchanged", f"{r['start_to_started_s']:.2f} s",
                f"first start {f['start_to_started_s']:.2f} s", row["ratio_restart_vs_first_start"])
            add(f"2d restart read nothing ({n})", "yes" if row["restart_read_nothing"] else "NO",
                f"unchanged={r['scan'].get('unchanged')}", None)
    a = res.get("write_amp")
    if isinstance(a, dict) and "patterns" in a:
        for pattern, modes in a["patterns"].items():
            nv = modes["naive"]
            for mode in ("daemon_auto", "daemon_link"):
                m = modes[mode]
                add(f"2e {pattern} {mode} write_bytes/MB", f"{m['watcher_write_bytes_per_MB'] / 1e6:.3f} MB",
                    f"naive {nv['watcher_write_bytes_per_MB'] / 1e6:.3f} MB", m["ratio_write_bytes_vs_naive"])
                add(f"2e {pattern} {mode} store growth/MB", f"{m['store_bytes_added_per_MB'] / 1e6:.3f} MB",
                    f"naive {nv['store_bytes_added_per_MB'] / 1e6:.3f} MB", m["ratio_store_bytes_added_vs_naive"])
    for k in ("guard_save", "events", "shrink_latency", "scale", "write_amp"):
        if isinstance(res.get(k), dict) and "error" in res[k]:
            rows.append((k, "NOT RUN", res[k]["error"][:60], ""))
    w = [max(len(r[i]) for r in [*rows, ("benchmark", "value", "baseline (same run)", "ratio")]) for i in range(4)]
    lines = []
    for r in [("benchmark", "value", "baseline (same run)", "ratio"), *rows]:
        lines.append("  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(r)))
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # The guard logs every kept version at WARNING; keep the benchmark's output to the table.
    logging.getLogger("sessionguard").addHandler(logging.NullHandler())
    logging.getLogger("sessionguard").propagate = False
    ap = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (~2-3 minutes)")
    ap.add_argument("--only", action="append",
                    choices=("guard_save", "events", "shrink_latency", "scale", "write_amp"),
                    help="run only these sections (repeatable)")
    ap.add_argument("--workdir", default=None,
                    help="parent of the scratch dir (default: the system temp dir; must be the filesystem "
                         "you want to measure)")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"))
    ap.add_argument("--table-only", metavar="JSON", help="print the table of an existing results file")
    args = ap.parse_args(argv)
    if args.table_only:
        print(table(json.loads(Path(args.table_only).read_text())))
        return 0
    q = args.quick
    plan = {
        "guard_save": (lambda w: bench_guard_save(w, 100 if q else 500, 50 if q else 200)),
        "events": (lambda w: bench_events(w, 50 if q else 200, 2000 if q else 10000, 1 if q else 3)),
        "shrink_latency": (lambda w: bench_shrink_latency(w, 50 if q else 200)),
        "scale": (lambda w: bench_scale(w, [10_000] if q else [10_000, 100_000])),
        "write_amp": (lambda w: bench_write_amp(w, 20 if q else 100)),
    }
    sections = args.only or list(plan)
    work = Path(tempfile.mkdtemp(prefix="sgbench-", dir=args.workdir))
    res: dict[str, Any] = {
        "command": "benchmarks/run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": q,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(work),
    }
    t_all = pc()
    try:
        for name in sections:
            log(f"{name} ...")
            t = pc()
            try:
                res[name] = plan[name](work)
            except Exception as exc:
                traceback.print_exc()
                res[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name} done in {pc() - t:.1f}s")
            res.setdefault("section_seconds", {})[name] = round(pc() - t, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["total_seconds"] = round(pc() - t_all, 1)
    res["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"\nresults: {out}  ({res['total_seconds']} s)")
    return 0 if not any(isinstance(v, dict) and "error" in v for v in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

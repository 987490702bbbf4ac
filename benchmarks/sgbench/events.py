"""Section 2a: the daemon's event path under a writer as fast as it can go (issues 11 and 15).

Two loads: many small sessions (5 messages, ~2.5 KB) and a few 1,000-message
ones (~450 KB), each write adding one message, round-robin over the
sessions, by the seed's own save (tmp + fsync + rename). Each load runs
without a daemon (the baseline), with this tree's daemon, and with release
0.1.0's, alternating, *reps* times (rounds); medians over the runs. The writer's
rate without a daemon varies by a third from one run to the next on a shared
machine, so each daemon's rate is also given against the no-daemon run of its
own round (the median of those ratios), beside the ratio of the medians.

Measured per daemon run: the writer's rate, the drain (last write → the
daemon's ``sync`` says everything before it was processed), and the daemon's
CPU (utime + stime from /proc) per 1,000 writes. The CPU floor is the same
files read and parsed (orjson) once per write in one Python loop, in this
process. The content-aware check (issue 15) is measured two ways: its own
calls (``Identity.of`` + ``replaced``) timed on the same parsed documents and
related to the measured CPU per write, and, for the large load, the real
daemon against one with the check bypassed (``nocheck.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sessionguard.count import CountSpec, parse
from sessionguard.glance import parse_for_rules
from sessionguard.rules import Identity, replaced

from .common import (
    DaemonProc,
    Docs,
    cpu_by_thread,
    fresh,
    median,
    pc,
    proc_cpu_s,
    proc_cpu_split,
    ratio,
    server_write,
    start_daemon,
    thread_ticks,
)

NOCHECK = Path(__file__).with_name("nocheck.py")


@dataclass(frozen=True)
class Load:
    label: str
    sessions: int
    start_msgs: int
    writes: int


def _docsets(load: Load) -> list[Docs]:
    rounds = load.writes // load.sessions + 2
    return [Docs(load.start_msgs + rounds + 1, sid=f"s{j:04d}") for j in range(load.sessions)]


def _daemon(work: Path, watch: Path, mode: str, old_env: dict[str, str] | None) -> DaemonProc:
    if mode == "old":
        return start_daemon(work, str(watch), env=old_env)
    if mode == "nocheck":
        return start_daemon(work, str(watch), wrap=[sys.executable, str(NOCHECK)])
    return start_daemon(work, str(watch))


def _one(work: Path, load: Load, docsets: list[Docs], mode: str, old_env: dict[str, str] | None) -> dict[str, Any]:
    """One run of the writer over fresh files, with the daemon of *mode* (or none)."""
    d = fresh(work, f"events-{load.label}-{mode}")
    paths = [str(d / f"s{j:04d}.json") for j in range(load.sessions)]
    for j, p in enumerate(paths):
        server_write(p, docsets[j](load.start_msgs))
    proc = _daemon(work, d, mode, old_env) if mode != "none" else None
    try:
        row: dict[str, Any] = {"mode": mode, "writes": load.writes}
        if proc:
            t = pc()
            proc.sync(120)
            row["idle_sync_ms"] = round((pc() - t) * 1e3, 2)
            cpu0, split0 = proc_cpu_s(proc.proc.pid), proc_cpu_split(proc.proc.pid)
            threads0 = thread_ticks(proc.proc.pid)
            st0 = proc.call("status")
        t0 = pc()
        for k in range(load.writes):
            j = k % load.sessions
            server_write(paths[j], docsets[j](load.start_msgs + 1 + k // load.sessions))
        t1 = pc()
        row.update(seconds=round(t1 - t0, 4), writes_per_s=round(load.writes / (t1 - t0), 1))
        if proc:
            proc.sync(300)
            t2 = pc()
            cpu1, split1 = proc_cpu_s(proc.proc.pid), proc_cpu_split(proc.proc.pid)
            row["cpu_by_thread_per_1000_writes"] = cpu_by_thread(threads0, thread_ticks(proc.proc.pid),
                                                                 load.writes / 1000)
            st1 = proc.call("status")
            evals = st1["evaluations"] - st0["evaluations"]
            row.update(drain_ms=round((t2 - t1) * 1e3, 2),
                       cpu_ms_per_1000_writes=round((cpu1 - cpu0) / load.writes * 1e6, 1),
                       user_ms_per_1000_writes=round((split1[0] - split0[0]) / load.writes * 1e6, 1),
                       sys_ms_per_1000_writes=round((split1[1] - split0[1]) / load.writes * 1e6, 1),
                       inotify_events=st1["events"] - st0["events"], evaluations=evals,
                       evaluations_per_write=round(evals / load.writes, 3), errors=st1["errors"] - st0["errors"],
                       end_to_end_writes_per_s=round(load.writes / (t2 - t0), 1))
        else:
            row["floor_cpu_ms_per_1000_writes"] = _floor(paths, load.writes)
            row["check"] = _check_cost(paths, docsets, load)
    finally:
        if proc:
            proc.stop()
    shutil.rmtree(d)
    return row


def _floor(paths: list[str], writes: int) -> float:
    """CPU ms per 1,000 of: open, read and orjson-parse the file a write left, in one loop."""
    c0 = time.process_time()
    for k in range(writes):
        fd = os.open(paths[k % len(paths)], os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, os.fstat(fd).st_size + 1)
        finally:
            os.close(fd)
        orjson.loads(data)
    return round((time.process_time() - c0) / writes * 1e6, 1)


def _check_cost(paths: list[str], docsets: list[Docs], load: Load) -> dict[str, Any]:
    """CPU µs of the content-aware check per evaluation, on the documents the writer left
    as the daemon parses them (``parse_for_rules``: on a glance, each message the check
    reads is made a Python value then, and that is timed too): the new pin's identity
    (``Identity.of``) and the test against the pin before the write (``replaced``, which
    for an append compares both keys, given the first one as the daemon gives it: three
    message keys hashed per write)."""
    spec = CountSpec.parse("messages")
    cases = []
    for j, p in enumerate(paths):
        new = parse_for_rules(Path(p).read_bytes(), spec)
        assert new.count is not None
        before = parse(orjson.dumps(docsets[j](new.count - 1), option=orjson.OPT_INDENT_2), spec)
        pinned = Identity.of(before)
        assert pinned is not None and not replaced(pinned, new), "an append continues the pin"
        cases.append((pinned, new))
    loops = max(2000 // len(cases), 1)
    c0 = time.process_time()
    for _ in range(loops):
        for pinned, new in cases:
            ident = Identity.of(new)
            replaced(pinned, new, ident.first if ident is not None else None)
    us = (time.process_time() - c0) / (loops * len(cases)) * 1e6
    return {"us_per_evaluation": round(us, 2), "evaluations_timed": loops * len(cases)}


def _thread_medians(rs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    groups = {g for r in rs for g in r["cpu_by_thread_per_1000_writes"]}
    return {g: {k: median([r["cpu_by_thread_per_1000_writes"].get(g, {}).get(k, 0.0) for r in rs])
                for k in ("user_ms", "sys_ms")} for g in sorted(groups)}


def _summary(load: Load, runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    base = [r for r in runs if r["mode"] == "none"]
    base_rate = median([r["writes_per_s"] for r in base])
    floor = median([r["floor_cpu_ms_per_1000_writes"] for r in base])
    check_us = median([r["check"]["us_per_evaluation"] for r in base])
    out: dict[str, Any] = {"load": load.__dict__, "baseline_writes_per_s": base_rate,
                           "floor_cpu_ms_per_1000_writes": floor, "check_us_per_evaluation": check_us}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        m: dict[str, Any] = {k: median([r[k] for r in rs]) for k in (
            "writes_per_s", "end_to_end_writes_per_s", "drain_ms", "idle_sync_ms", "cpu_ms_per_1000_writes",
            "user_ms_per_1000_writes", "sys_ms_per_1000_writes", "evaluations_per_write")}
        m["drain_ms_max"] = max(r["drain_ms"] for r in rs)
        m["errors"] = sum(r["errors"] for r in rs)
        m["ratio_writes_per_s_vs_none"] = ratio(m["writes_per_s"], base_rate)
        paired = [r["writes_per_s"] / b["writes_per_s"] for r, b in zip(rs, base, strict=True)]
        m["round_ratios_writes_per_s"] = [round(x, 3) for x in paired]
        m["median_round_ratio_writes_per_s"] = round(median(paired), 3)
        m["ratio_cpu_vs_floor"] = ratio(m["cpu_ms_per_1000_writes"], floor)
        m["cpu_by_thread_per_1000_writes"] = _thread_medians(rs)
        if mode == "new":
            check_ms = check_us * m["evaluations_per_write"]  # µs per write = ms per 1,000 writes
            m["check_ms_per_1000_writes"] = round(check_ms, 2)
            m["check_share_of_cpu"] = ratio(check_ms, m["cpu_ms_per_1000_writes"])
        out[mode] = m
    if "old" in out:
        out["ratio_cpu_new_vs_old"] = ratio(out["new"]["cpu_ms_per_1000_writes"], out["old"]["cpu_ms_per_1000_writes"])
        out["ratio_writes_per_s_new_vs_old"] = ratio(out["new"]["writes_per_s"], out["old"]["writes_per_s"])
    if "nocheck" in out:
        with_check, without = out["new"]["cpu_ms_per_1000_writes"], out["nocheck"]["cpu_ms_per_1000_writes"]
        out["ab_check_share_of_cpu"] = ratio(with_check - without, with_check)
    return out


def bench_events(work: Path, loads: list[Load], reps: int, old_env: dict[str, str] | None,
                 ab_labels: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for load in loads:
        docsets = _docsets(load)
        modes = ["new", *(["old"] if old_env is not None else []), *(["nocheck"] if load.label in ab_labels else [])]
        every = ["none", *modes]
        runs = []
        for rep in range(reps):
            k = rep % len(every)
            for mode in every[k:] + every[:k]:  # rotated: no mode always runs first
                runs.append(_one(work, load, docsets, mode, old_env))
        out[load.label] = dict(_summary(load, runs, modes), runs=runs)
    return out

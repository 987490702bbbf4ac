"""Section 5: compressed pins (``pin = "zstd"``) against copy pins, same tree, same writer (issue 15).

A tree of sessions of real text (``textgen``: message counts spread
log-uniformly from 5 to 1,000) is pinned by a daemon with ``--pin copy``,
``--pin zstd`` and ``--pin auto`` (the default: reflink where the filesystem
can, else a copy), each on a fresh copy of the tree. Measured for each: the
disk the store's ``pins/`` takes as a share of the sessions' own (apparent
bytes, and blocks allocated as ``du`` counts them), the daemon's CPU per
write for a writer appending one message per write round-robin, and the
capture latency of section 2b (wipe → version), whose version is always
plain (a zstd pin is decompressed to keep it).

How much zstd saves depends on the text: the same counts with
``make_session``'s repeated sentence are also compressed in-process
(``pins.compress``, the daemon's own call) to show the spread.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson

from sessionguard.pins import compress

from .common import fresh, make_session, median, proc_cpu_s, ratio, server_write, start_daemon, tree_bytes
from .latency import bench_shrink_latency
from .textgen import TextDocs

MODES = ("copy", "zstd", "auto")


def counts(n: int) -> list[int]:
    """n message counts from 5 to 1,000, spread log-uniformly (most sessions are short)."""
    return [round(5 * 200 ** (i / max(n - 1, 1))) for i in range(n)]


def _lorem_share(cs: list[int]) -> dict[str, Any]:
    raw = comp = 0
    for c in cs:
        data = orjson.dumps(make_session(c), option=orjson.OPT_INDENT_2)
        raw += len(data)
        comp += len(compress(data))
    return {"session_bytes": raw, "zstd_bytes": comp, "share": ratio(comp, raw)}


def _one_mode(work: Path, mode: str, docsets: list[TextDocs], cs: list[int], writes: int) -> dict[str, Any]:
    d = fresh(work, f"zstd-{mode}")
    paths = [str(d / f"{docs.meta['session_id']}.json") for docs in docsets]
    for p, docs, c in zip(paths, docsets, cs, strict=True):
        server_write(p, docs(c))
    live = {"apparent": tree_bytes(d), "disk": tree_bytes(d, disk=True)}  # before the store exists
    proc = start_daemon(work, str(d), ["--pin", mode])
    try:
        proc.sync(120)
        pins_dir = d / ".sessionguard" / "pins"
        pins = {"apparent": tree_bytes(pins_dir), "disk": tree_bytes(pins_dir, disk=True)}
        cpu0, ev0 = proc_cpu_s(proc.proc.pid), proc.call("status")["evaluations"]
        for k in range(writes):
            j = k % len(paths)
            server_write(paths[j], docsets[j](cs[j] + 1 + k // len(paths)))
        proc.sync(300)
        cpu = proc_cpu_s(proc.proc.pid) - cpu0
        evals = proc.call("status")["evaluations"] - ev0
    finally:
        proc.stop()
        shutil.rmtree(d)
    return {
        "sessions_bytes": live,
        "pins_bytes": pins,
        "pins_share_apparent": ratio(pins["apparent"], live["apparent"]),
        "pins_share_disk": ratio(pins["disk"], live["disk"]),
        "cpu_ms_per_1000_writes": round(cpu / writes * 1e6, 1),
        "evaluations_per_write": round(evals / writes, 3),
        "cpu_ms_per_1000_evaluations": round(cpu / evals * 1e6, 1) if evals else None,
    }


def bench_zstd(work: Path, sessions: int, writes: int, wipes: int, reps: int) -> dict[str, Any]:
    cs = counts(sessions)
    docsets = [TextDocs(c + writes // sessions + 2, f"z{j:04d}", seed=j) for j, c in enumerate(cs)]
    wipe_docs = TextDocs(1000 + wipes + 2, "bench", seed=10_000)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for rep in range(reps):
        for mode in MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]:
            row = _one_mode(work, mode, docsets, cs, writes)
            row["capture"] = bench_shrink_latency(work, wipes, wipe_docs, pin=mode, label=f"zstd-wipe-{mode}")
            runs[mode].append(row)
    out: dict[str, Any] = {"sessions": sessions, "message_counts": [cs[0], cs[len(cs) // 2], cs[-1]],
                           "writes_per_run": writes, "wipes_per_run": wipes, "reps": reps,
                           "content": "real text (stdlib source slices)", "lorem_content": _lorem_share(cs)}
    for mode, rs in runs.items():
        out[mode] = {
            "pins_share_apparent": rs[0]["pins_share_apparent"],
            "pins_share_disk": rs[0]["pins_share_disk"],
            "sessions_bytes": rs[0]["sessions_bytes"],
            "pins_bytes": rs[0]["pins_bytes"],
            "cpu_ms_per_1000_writes": median([r["cpu_ms_per_1000_writes"] for r in rs]),
            "evaluations_per_write": median([r["evaluations_per_write"] for r in rs]),
            "capture_median_ms": median([r["capture"]["version_appears"]["median_ms"] for r in rs]),
            "capture_p99_ms": median([r["capture"]["version_appears"]["p99_ms"] for r in rs]),
            "capture_sync_median_ms": median([r["capture"]["sync_returns"]["median_ms"] for r in rs]),
            "captures_kept": sum(r["capture"]["versions_kept_by_daemon"] for r in rs),
            "capture_timeouts": sum(r["capture"]["timeouts"] for r in rs),
            "runs": rs,
        }
    z, c = out["zstd"], out["copy"]
    out["ratios_zstd_vs_copy"] = {
        "pins_disk": ratio(z["pins_bytes"]["disk"], c["pins_bytes"]["disk"]),
        "cpu_per_write": ratio(z["cpu_ms_per_1000_writes"], c["cpu_ms_per_1000_writes"]),
        "capture_median": ratio(z["capture_median_ms"], c["capture_median_ms"]),
        "capture_p99": ratio(z["capture_p99_ms"], c["capture_p99_ms"]),
    }
    out["ratio_cpu_auto_vs_copy"] = ratio(out["auto"]["cpu_ms_per_1000_writes"], c["cpu_ms_per_1000_writes"])
    return out

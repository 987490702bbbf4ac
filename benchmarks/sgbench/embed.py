"""Section 1: the embedded guard's save and load (issue 13), against equally durable plain saves.

A 1,000-message session (~450 KB as written with ``OPT_INDENT_2``) saved
with a growing message count (1001, 1002, …: nothing shrinks, so nothing is
kept), every variant in its own directory, interleaved round-robin with the
order rotated each round, warm-up rounds dropped. Three consecutive runs,
each reported on its own: the targets hold only if every run meets them.

Baselines: a plain atomic save with the guard's durability (tmp, write,
fsync, rename, directory fsync) that also serialises the document with
orjson (for ``save(doc)``), and the same plain save of the same bytes (for
``save_bytes``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

import sessionguard

from .common import SID, Docs, fresh, pc, ratio, summary_ms
from .seedfix import seed_save

WARM = 5
#: Metadata-only loads in a row, as a listing makes them (see _metadata_load).
BLOCK = 20
VARIANTS = ("plain_doc", "guard_doc", "plain_bytes", "guard_bytes", "guard_bytes_nocount", "seed_fix",
            "guard_shrink")


def plain_save(path: str, data: bytes) -> None:
    """The baseline: tmp, write, fsync, rename, fsync of the directory — the guard's durability."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _dump(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


class _Run:
    """One run: a directory, a path and (for guard variants) a Guard per variant."""

    def __init__(self, work: Path, idx: int, docs: Docs) -> None:
        self.docs = docs
        self.dirs = {v: fresh(work, f"embed{idx}-{v}") for v in VARIANTS}
        self.paths = {v: str(self.dirs[v] / f"{SID}.json") for v in VARIANTS}
        self.guards = {v: sessionguard.Guard(self.dirs[v]) for v in VARIANTS if v.startswith("guard")}
        self.shrink_k = 0
        self.shrink_flags: list[bool] = []
        first = docs(1000)
        for v in VARIANTS:
            if v in self.guards:
                self.guards[v].save(SID, first)
            elif v == "seed_fix":
                seed_save(Path(self.paths[v]), first)
            else:
                plain_save(self.paths[v], _dump(first))

    def shrink_n(self) -> int:
        """Alternating grow by 2 / shrink by 1: every other save keeps a version (distinct bytes)."""
        k = self.shrink_k
        self.shrink_k += 1
        self.shrink_flags.append(k % 2 == 1)
        return 1002 + k // 2 if k % 2 == 0 else 1001 + (k - 1) // 2

    def op(self, variant: str, n: int, data: bytes) -> Callable[[], object]:
        """The timed call for *variant* (documents and bytes are made before the clock starts)."""
        path, guard = self.paths[variant], self.guards.get(variant)
        if variant == "plain_doc":
            doc = self.docs(n)
            return lambda: plain_save(path, _dump(doc))
        if variant == "plain_bytes":
            return lambda: plain_save(path, data)
        if variant == "seed_fix":
            doc = self.docs(n)
            return lambda: seed_save(Path(path), doc)
        assert guard is not None
        if variant == "guard_doc":
            doc = self.docs(n)
            return lambda: guard.save(SID, doc)
        if variant == "guard_bytes":
            return lambda: guard.save_bytes(SID, data, count=n)
        if variant == "guard_bytes_nocount":
            return lambda: guard.save_bytes(SID, data)
        doc = self.docs(self.shrink_n())
        return lambda: guard.save(SID, doc)

    def close(self) -> None:
        for g in self.guards.values():
            g.close()


def _one_run(work: Path, idx: int, docs: Docs, iters: int) -> dict[str, Any]:
    run = _Run(work, idx, docs)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for r in range(iters + WARM):
            n = 1001 + r
            data = _dump(docs(n))
            m = r % len(VARIANTS)
            for v in VARIANTS[m:] + VARIANTS[:m]:  # rotated: nobody always goes first
                call = run.op(v, n, data)
                t0 = pc()
                call()
                if r >= WARM:
                    times[v].append(pc() - t0)
        flags = run.shrink_flags[WARM:]
        kept = len(run.guards["guard_shrink"].versions(SID))
        assert not run.guards["guard_doc"].versions(SID), "a growth-only series keeps no versions"
        meta = _metadata_load(run.guards["guard_doc"], iters)
    finally:
        run.close()
    out: dict[str, Any] = {v: summary_ms(times[v]) for v in VARIANTS if v != "guard_shrink"}
    out["guard_shrink_saves"] = summary_ms([t for t, s in zip(times["guard_shrink"], flags, strict=True) if s])
    out["guard_shrink_versions_left"] = kept
    out["metadata_load"] = meta
    out["ratios"] = _ratios(out)
    return out


def _ratios(out: dict[str, Any]) -> dict[str, Any]:
    def both(a: str, b: str) -> dict[str, float | None]:
        return {"median": ratio(out[a]["median_ms"], out[b]["median_ms"]),
                "p90": ratio(out[a]["p90_ms"], out[b]["p90_ms"])}

    return {
        "guard_doc_vs_plain_doc": both("guard_doc", "plain_doc"),
        "guard_bytes_vs_plain_bytes": both("guard_bytes", "plain_bytes"),
        "guard_bytes_nocount_vs_plain_bytes": both("guard_bytes_nocount", "plain_bytes"),
        "seed_fix_vs_plain_doc": both("seed_fix", "plain_doc"),
        "guard_doc_vs_seed_fix": both("guard_doc", "seed_fix"),
        "guard_shrink_vs_plain_doc": both("guard_shrink_saves", "plain_doc"),
    }


def _metadata_load(guard: sessionguard.Guard, iters: int) -> dict[str, Any]:
    """``load(metadata_only=True)`` vs a full ``load`` of the same 1,000+-message file, two ways:
    in blocks of :data:`BLOCK` calls of each kind alternating (a listing loads the metadata of
    many sessions in a row: the target's measure), and one for one (reported)."""
    out: dict[str, Any] = {}
    for how, block in (("blocks", BLOCK), ("one_for_one", 1)):
        t: dict[str, list[float]] = {"meta": [], "full": []}
        rounds = max((iters + WARM) // block, 2)
        for r in range(rounds):
            for which in (("meta", "full") if r % 2 == 0 else ("full", "meta")):
                for _ in range(block):
                    t0 = pc()
                    guard.load(SID, metadata_only=which == "meta")
                    dt = pc() - t0
                    if r * block >= WARM:
                        t[which].append(dt)
        meta, full = summary_ms(t["meta"]), summary_ms(t["full"])
        out[how] = {"metadata_only": meta, "full": full, "ratio_median": ratio(meta["median_ms"], full["median_ms"]),
                    "ratio_p90": ratio(meta["p90_ms"], full["p90_ms"])}
    out["block"] = BLOCK
    return out


def bench_embed(work: Path, iters: int, runs: int = 3) -> dict[str, Any]:
    docs = Docs(1000 + 2 * (iters + WARM) + 10)
    first = docs(1000)
    out: dict[str, Any] = {
        "session_messages": 1000,
        "session_bytes": len(_dump(first)),
        "iterations_per_run": iters,
        "warm_up_rounds_dropped": WARM,
        "order": "round-robin over " + ", ".join(VARIANTS) + ", rotated each round",
        "runs": [_one_run(work, i, docs, iters) for i in range(runs)],
    }
    return out

"""Section 2b: a wipe → the durable version of what it replaced (also used by section 5 per pin method).

A 1,000-message session is regrown (a rename write, then ``sync``) and wiped
to 0 messages with a rename write, *wipes* times. Latency is from
``os.replace`` returning to the version file appearing in
``<store>/sessions/<sid>/`` (polled with ``os.listdir`` about every 0.2 ms),
and to ``sync`` returning (everything done, directory fsynced). The baseline
is the writer's own wipe save.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import SID, fresh, pc, ratio, server_write, start_daemon, summary_ms


def _versions(sdir: Path) -> set[str]:
    try:
        return {n for n in os.listdir(sdir) if n.endswith(".version")}
    except FileNotFoundError:  # the session's folder exists from its first version on
        return set()


def bench_shrink_latency(work: Path, wipes: int, doc_of: Callable[[int], dict[str, Any]], *,
                         pin: str | None = None, label: str = "wipe") -> dict[str, Any]:
    """*doc_of(n)* gives the session with n messages; *pin* the daemon's ``--pin`` (default: its own)."""
    d = fresh(work, label)
    path = str(d / f"{SID}.json")
    server_write(path, doc_of(1000))
    proc = start_daemon(work, str(d), ["--pin", pin] if pin else None)
    sdir = d / ".sessionguard" / "sessions" / SID
    lat, save, sync_done = [], [], []
    timeouts = 0
    try:
        proc.sync(120)
        for i in range(wipes):
            server_write(path, doc_of(1001 + i))  # regrow: distinct bytes each time
            proc.sync(120)
            before = _versions(sdir)
            wipe = dict(doc_of(0), updated_at=1764000000.0 + 10_000_000 + i)
            ts = pc()
            server_write(path, wipe)
            t0 = pc()
            deadline = t0 + 30
            while not (_versions(sdir) - before):
                if pc() > deadline:
                    timeouts += 1
                    break
                time.sleep(0.0002)
            t1 = pc()
            proc.sync(120)
            lat.append(t1 - t0)
            save.append(t0 - ts)
            sync_done.append(pc() - t0)
        kept = proc.call("status")["versions_kept"]
    finally:
        proc.stop()
        shutil.rmtree(d)
    out: dict[str, Any] = {
        "wipes": wipes,
        "pin": pin or "default",
        "version_appears": summary_ms(lat),
        "sync_returns": summary_ms(sync_done),
        "writer_wipe_save": summary_ms(save),
        "versions_kept_by_daemon": kept,
        "timeouts": timeouts,
    }
    out["ratio_median_vs_wipe_save"] = ratio(out["version_appears"]["median_ms"], out["writer_wipe_save"]["median_ms"])
    out["ratio_p99_vs_wipe_save"] = ratio(out["version_appears"]["p99_ms"], out["writer_wipe_save"]["p99_ms"])
    return out

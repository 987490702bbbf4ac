"""Sections 3 and 4: first start, restart and memory over many small sessions (issue 15).

N five-message sessions (~2.5 KB) are generated without fsync, then one
``sync(2)``. Floors, each one pass in this process over the same tree with a
warm page cache (caches are never dropped: the machine is shared):

* first start: scan the directory, read, parse (orjson) and copy every file
  once into a flat folder, then one ``syncfs`` — what pinning everything
  durably cannot go below;
* restart: a bare ``os.scandir`` + ``stat`` of every entry.

The daemon is timed from launch to ``READY=1`` on a ``NOTIFY_SOCKET`` of our
own (the moment systemd would consider it started; READY comes only after
every file is pinned), and also to its ``daemon.started`` log line. RSS and
its high-water mark are read from /proc 1 s after the store's leftovers
sweep that maintenance makes after READY (``store.swept``). The restart follows
a clean stop (SIGTERM: ``pins.cache`` written), over the unchanged tree.

The first start is taken *pairs* times, each right after a floor pass of its
own, over the same tree, each with a new store (a config file's ``store``)
and the floor with a new folder: nothing is removed until the end, because on
this journal-less ext4 creating files just after many were removed is slow
(see ``over_tree``), and one pair read 1.86x in one run and 2.44x in the next on the same
code. The verdict is on the median start against the median floor.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson

from .common import (
    DaemonProc,
    Docs,
    Notify,
    free_bytes,
    free_inodes,
    fresh,
    iso_ts,
    log,
    median,
    pc,
    proc_mem_kb,
    ratio,
)

_libc = ctypes.CDLL(None, use_errno=True)
#: Disk one session costs while section 4 runs: its file, its pin and the floor's copy (a block each).
BYTES_PER_SESSION = 3 * 4096
RESERVE = 4 << 30  # leave this much free for everyone else


def make_many(d: Path, n: int) -> int:
    """n five-message sessions, written fast (no fsync), then one sync(2); their total bytes."""
    docs = Docs(5)
    total = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    for i in range(n):
        sid = f"s{i:07d}"
        doc = dict(docs.meta, session_id=sid, title=f"session {sid}", messages=docs.msgs)
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
        fd = os.open(d / f"{sid}.json", flags, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        total += len(data)
    os.sync()
    return total


def floor_first_start(src: Path, dst: Path) -> dict[str, float]:
    """Read, parse and copy every session once into *dst*, then one syncfs: seconds and CPU."""
    c0, t0 = time.process_time(), pc()
    dst_fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with os.scandir(src) as it:
            for entry in it:
                if not entry.name.endswith(".json"):
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    data = os.read(fd, os.fstat(fd).st_size + 1)
                finally:
                    os.close(fd)
                orjson.loads(data)
                out = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
                try:
                    os.write(out, data)
                finally:
                    os.close(out)
        if _libc.syncfs(dst_fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(dst_fd)
    return {"seconds": round(pc() - t0, 3), "cpu_s": round(time.process_time() - c0, 3)}


def floor_restart(src: Path) -> dict[str, float]:
    """A bare scandir + stat of every entry: seconds and CPU."""
    c0, t0 = time.process_time(), pc()
    n = 0
    with os.scandir(src) as it:
        for entry in it:
            entry.stat(follow_symlinks=False)
            n += 1
    return {"seconds": round(pc() - t0, 3), "cpu_s": round(time.process_time() - c0, 3), "entries": n}


def one_start(work: Path, d: Path, timeout: float, store: Path | None = None) -> dict[str, Any]:
    """Start the daemon over *d* (its store at *store*, else the default), time READY, read
    its memory, stop it cleanly."""
    note = Notify(work)
    args = ["--watch", str(d)]
    if store is not None:
        config = work / f"start-{store.name}.toml"
        config.write_text(f'[[watch]]\npath = "{d}"\nstore = "{store}"\n')
        args = ["--config", str(config)]
    launched_wall, t_launch = time.time(), pc()
    proc = DaemonProc(work, [*args, "--reconcile-interval", "3600"], env={"NOTIFY_SOCKET": note.path})
    try:
        t_ready = note.wait_ready(timeout)
        started = proc.wait_event("daemon.started")
        scan = proc.wait_event("scan.completed")
        swept = proc.wait_event("store.swept", timeout=600)  # maintenance, a second after READY
        time.sleep(1.0)  # settle before reading memory
        mem = proc_mem_kb(proc.proc.pid)
        status = proc.call("status", timeout=600)
        t_stop = pc()
        code = proc.stop(timeout=600)
        stop_s = pc() - t_stop
    except BaseException:
        proc.kill()
        raise
    finally:
        note.close()
    return {
        "launch_to_ready_s": round(t_ready - t_launch, 3),
        "launch_to_started_log_s": round(iso_ts(started) - launched_wall, 3),
        "scan": {k: v for k, v in scan.items() if k not in ("event", "level", "timestamp", "watch")},
        "store_sweep_ms": swept.get("duration_ms"),
        "VmRSS_kB": mem.get("VmRSS"),
        "VmHWM_kB": mem.get("VmHWM"),
        "sessions_tracked": status["sessions"],
        "clean_stop_s": round(stop_s, 3),
        "exit_code": code,
    }


def affordable(work: Path, n: int) -> int:
    """The largest count up to *n* whose files, pins and floor copies fit beside RESERVE."""
    by_bytes = (free_bytes(work) - RESERVE) // BYTES_PER_SESSION
    by_inodes = (free_inodes(work) - 1_000_000) // 3
    return int(max(0, min(n, by_bytes, by_inodes)))


def _mib(kb: int | None) -> float | None:
    return round(kb / 1024, 1) if kb is not None else None


def over_tree(work: Path, n: int, empty: dict[str, Any], pairs: int = 1) -> dict[str, Any]:
    """Generate n sessions; *pairs* of (floor, first start), then a restart; everything
    removed after."""
    d = fresh(work, f"start-{n}")
    made: list[Path] = []
    try:
        t = pc()
        nbytes = make_many(d, n)
        log(f"  {n:,} sessions generated in {pc() - t:.1f}s")
        floors, firsts, stores = [], [], []
        for k in range(pairs):
            # Every copy and store stays until the end: on an ext4 without a journal, inodes
            # freed in the last minute (six while their table block is still dirty) are
            # skipped one by one when a new one is allocated (recently_deleted(),
            # RECENTCY_MIN/_DIRTY), so removing n files just before the daemon creates n
            # pins made its first start pay for the floor's clean-up.
            copy, store = fresh(work, f"start-{n}-floor{k}"), work / f"start-{n}-store{k}"
            made += [copy, store]
            stores.append(store)
            floors.append(floor_first_start(d, copy))
            firsts.append(one_start(work, d, 7200, store))
            log(f"  pair {k + 1}: floor {floors[-1]['seconds']}s, first start {firsts[-1]['launch_to_ready_s']}s")
        floor2 = floor_restart(d)
        second = one_start(work, d, 7200, stores[-1])
        log(f"  restart floor {floor2['seconds']}s, restart {second['launch_to_ready_s']}s")
    finally:
        t = pc()
        for path in (d, *made):
            shutil.rmtree(path, ignore_errors=True)
        log(f"  cleaned up in {pc() - t:.1f}s")
    floor_s = median([f["seconds"] for f in floors])
    first_s = median([f["launch_to_ready_s"] for f in firsts])
    first = firsts[-1]  # memory: the last start, as the restart reads the same store
    return {
        "sessions": n,
        "session_file_bytes_total": nbytes,
        "empty_tree_start": empty,
        "floor_first_start": floors[-1],
        "first_start": first,
        "floors_first_start_s": [f["seconds"] for f in floors],
        "first_starts_s": [f["launch_to_ready_s"] for f in firsts],
        "pair_ratios_first_start": [ratio(f["launch_to_ready_s"], fl["seconds"]) for f, fl in zip(firsts, floors,
                                                                                                  strict=True)],
        "median_floor_first_start_s": floor_s,
        "median_first_start_s": first_s,
        "floor_restart": floor2,
        "restart": second,
        "restart_read_nothing": second["scan"].get("unchanged") == n,
        "ratio_first_start_vs_floor": ratio(first_s, floor_s),
        "ratio_restart_vs_floor": ratio(second["launch_to_ready_s"], floor2["seconds"]),
        "rss_MiB_first": _mib(first["VmRSS_kB"]),
        "hwm_MiB_first": _mib(first["VmHWM_kB"]),
        "rss_MiB_restart": _mib(second["VmRSS_kB"]),
        "hwm_MiB_restart": _mib(second["VmHWM_kB"]),
        "rss_MiB_empty": _mib(empty["VmRSS_kB"]),
    }


def bench_startup(work: Path, sizes: list[int], pairs: int) -> dict[str, Any]:
    empty_dir = fresh(work, "start-0")
    empty = one_start(work, empty_dir, 120)
    shutil.rmtree(empty_dir)
    return {"pairs": pairs, "sizes": {str(n): over_tree(work, n, empty, pairs) for n in sizes}}


def bench_scale(work: Path, n: int) -> dict[str, Any]:
    fits = affordable(work, n)
    out: dict[str, Any] = {"asked": n, "free_bytes_before": free_bytes(work), "free_inodes_before": free_inodes(work)}
    if fits < n:
        log(f"  only {fits:,} sessions fit on {work} (asked {n:,}): running that")
    if fits <= 0:
        return dict(out, error="no room for the scale run")
    empty_dir = fresh(work, "scale-0")
    empty = one_start(work, empty_dir, 120)
    shutil.rmtree(empty_dir)
    t = pc()
    out.update(over_tree(work, fits, empty), reduced_to_fit=fits < n)
    out["section_seconds"] = round(pc() - t, 1)
    return out

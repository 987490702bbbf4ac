"""Section 2e: bytes the watcher writes per MB the server writes — the daemon's pin methods vs a naive copier.

One ~410 KB session (``make_session(900)``) rewritten with rename writes,
each adding a message. Measured: the watcher process's ``write_bytes`` from
/proc/PID/io (counted when a page is dirtied) and the bytes added to its
store or backup folder (each inode once). The naive copier
(``naive_watcher.py``) copies the file on every close/rename event and keeps
every copy. Two writer patterns: *paced* waits for the watcher after every
write (each write seen alone, the worst case for the daemon), *burst* writes
as fast as it can (the daemon's queue coalesces, the copier cannot).

On ext4 ``auto`` means a reflink attempt that fails, then a copy; on XFS
(``xfs_child``, a loop-mounted image in a private mount namespace) it is a
reflink: zero bytes copied.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from .common import SID, Docs, fresh, make_session, pc, proc_io, ratio, server_write, start_daemon, tree_bytes

NAIVE = Path(__file__).resolve().parents[1] / "naive_watcher.py"


class NaiveWatcher:
    """benchmarks/naive_watcher.py in a subprocess, with its own sync protocol."""

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


def _one(work: Path, mode: str, pattern: str, docs: Docs, *, start_n: int, writes: int) -> dict[str, Any]:
    d = fresh(work, f"amp-{mode}")
    backup = work / f"amp-{mode}-backup"
    path = str(d / f"{SID}.json")
    server_write(path, docs(start_n))
    w: Any
    if mode == "naive":
        w = NaiveWatcher(d, backup)
        pid, store_dir, do_sync = w.proc.pid, backup, w.sync
    else:
        w = start_daemon(work, str(d), ["--pin", mode.split("_", 1)[1]])
        pid, store_dir, do_sync = w.proc.pid, d / ".sessionguard", (lambda: w.sync(120))
    try:
        do_sync()
        io0, me0 = proc_io(pid), proc_io("self")
        ev0 = w.call("status")["evaluations"] if mode != "naive" else None
        store0 = tree_bytes(store_dir)
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
        store1 = tree_bytes(store_dir)
        evals = w.call("status")["evaluations"] - ev0 if ev0 is not None else None
        copies = len(os.listdir(backup)) if mode == "naive" else None
    finally:
        w.stop()
        shutil.rmtree(d)
        shutil.rmtree(backup, ignore_errors=True)
    mb = logical / 1e6
    wb = io1["write_bytes"] - io0["write_bytes"]
    return {
        "logical_MB_written_by_writer": round(mb, 3),
        "writer_write_bytes_per_MB": round((me1["write_bytes"] - me0["write_bytes"]) / mb),
        "watcher_write_bytes_per_MB": round(wb / mb),
        "watcher_cancelled_write_bytes_per_MB": round(
            (io1["cancelled_write_bytes"] - io0["cancelled_write_bytes"]) / mb),
        "watcher_wchar_per_MB": round((io1["wchar"] - io0["wchar"]) / mb),
        "watcher_rchar_per_MB": round((io1["rchar"] - io0["rchar"]) / mb),
        "store_bytes_added_per_MB": round((store1 - store0) / mb),
        "daemon_evaluations": evals,
        "naive_copies": copies,
        "seconds": round(secs, 3),
    }


def bench_write_amp(work: Path, megabytes: float, modes: tuple[str, ...]) -> dict[str, Any]:
    start_n = 900  # ~410 KB
    per = len(orjson.dumps(make_session(start_n), option=orjson.OPT_INDENT_2))
    writes = max(int(megabytes * 1e6 / per), 5)
    docs = Docs(start_n + writes + 2)
    out: dict[str, Any] = {"writes": writes, "session_bytes_at_start": per, "patterns": {}}
    for pattern in ("paced", "burst"):
        rows = {mode: _one(work, mode, pattern, docs, start_n=start_n, writes=writes) for mode in modes}
        naive = rows["naive"]
        for mode, m in rows.items():
            if mode != "naive":
                m["ratio_write_bytes_vs_naive"] = ratio(m["watcher_write_bytes_per_MB"],
                                                        naive["watcher_write_bytes_per_MB"])
                m["ratio_store_growth_vs_naive"] = ratio(m["store_bytes_added_per_MB"],
                                                         naive["store_bytes_added_per_MB"])
        out["patterns"][pattern] = rows
    return out


def xfs_write_amp(work: Path, megabytes: float, bench_py: Path) -> dict[str, Any]:
    """The same on a loop-mounted XFS (reflinks), inside a private mount namespace that
    disappears with its process: no mount is ever left behind, even if the run is killed."""
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs") or not shutil.which("unshare"):
        return {"skipped": "needs root, mkfs.xfs (xfsprogs) and unshare"}
    img, mnt, res = work / "xfs.img", work / "xfs", work / "xfs-result.json"
    with open(img, "wb") as f:
        f.truncate(1536 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    mnt.mkdir()
    script = 'mount -o loop "$1" "$2" && exec "$3" "$4" --xfs-child "$2" --xfs-megabytes "$5" --out "$6"'
    try:
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(img),
                        str(mnt), sys.executable, str(bench_py), str(megabytes), str(res)], check=True)
        result: dict[str, Any] = orjson.loads(res.read_bytes())
    finally:
        img.unlink(missing_ok=True)
    return result

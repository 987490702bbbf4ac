"""What slows section 2a's small writer when a watcher runs beside it (issue 15), by controls.

The writer of 2a's small load (200 sessions of 5+ messages, one message
appended per write, tmp + fsync + rename) runs in rounds, each mode once per
round in rotated order, always in the same directory (emptied between runs,
so the files land in the same place on disk). Against the writer alone:

* this tree's daemon, the same daemon with its store on tmpfs, and the same
  daemon writing each session's pin at most every 2 s (``stalepins.py``: about
  one pin in ten under this load; a control, its pins lag);
* a bare inotify reader with the daemon's mask, reading on every event (each
  event wakes it) or every 20 ms (the daemon's pause between batches);
* a *mimic* of the daemon's file work: the 20 ms reader, then for every
  session renamed in, open + read it and nothing else (what any watcher that
  looks at content must do); or read it and write it over a spare in a store
  folder and swap the two (``RENAME_EXCHANGE``), as copy pins are written;
  with that folder beside the sessions (same filesystem) and on tmpfs; and
  the same bytes written in place over the pin, with no spare and no rename
  (not crash-safe: the control that isolates the cost of the swap); and two
  slots per session written in place in turn, each followed by an
  ``fsetxattr`` of a sequence number and CRC-32 (what would let a reader
  pick the whole slot after a kill: the crash-safe way to pin without a rename);
* a process burning 37% of a CPU (about the daemon's share at the writer's
  rate) or all of one, touching no file.

Each figure is the median over rounds of the writer's rate divided by the
rate of the writer alone in the same round. Opt-in (``--only interference``):
it explains 2a's figure, it is not a target.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from .common import DaemonProc, Docs, fresh, median, pc, proc_cpu_s, ratio, server_write, start_daemon

#: IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_DELETE_SELF | IN_DONT_FOLLOW | IN_ONLYDIR
_MASK = 0x100 | 0x8 | 0x40 | 0x80 | 0x200 | 0x400 | 0x02000000 | 0x01000000
_IN_MOVED_TO = 0x80
_SHM = Path("/dev/shm")
STALEPINS = Path(__file__).with_name("stalepins.py")
MODES = ("alone", "daemon", "daemon, store on tmpfs", "daemon, a pin per session at most every 2 s",
         "inotify reader, woken by every event", "inotify reader, every 20 ms", "mimic: read only, no pin",
         "mimic: read + pin by exchange, store beside",
         "mimic: read + pin by exchange, store on tmpfs", "mimic: read + write in place, no rename, store beside",
         "mimic: read + two slots in turn, checksum xattr, store beside",
         "CPU burner, 37% of a CPU", "CPU burner, a whole CPU")


def watcher(directory: str, pause: float, store: str | None, how: str) -> None:
    """The bare reader (*how* empty) or the mimic (*how*: ``read``, or with *store* one of
    ``exchange``, ``in-place`` and ``slots``), run as a child: ``python -m sgbench.interference``."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0 or libc.inotify_add_watch(fd, directory.encode(), _MASK) < 0:
        raise OSError(ctypes.get_errno(), "inotify")
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    store_fd = None
    slots: dict[bytes, int] = {}
    if store is not None:
        os.makedirs(store, exist_ok=True)
        store_fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    print("ready", flush=True)
    while True:
        if pause:
            time.sleep(pause)
        buf, i, names = os.read(fd, 1 << 20), 0, set()
        while i < len(buf):
            _wd, mask, _cookie, length = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16:i + 16 + length].rstrip(b"\0")
            i += 16 + length
            if mask & _IN_MOVED_TO and name.endswith(b".json"):
                names.add(name)
        if not how:
            continue
        for name in names:
            src = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            data = os.pread(src, os.fstat(src).st_size + 1, 0)
            os.close(src)
            if store_fd is None:  # read only
                continue
            if how == "slots":
                slots[name] = seq = slots.get(name, 0) + 1
                target = name + (b".a" if seq % 2 else b".b")
            else:
                target = name if how == "in-place" else b"." + name + b".spare"
            out = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=store_fd)
            os.pwrite(out, data, 0)
            os.ftruncate(out, len(data))
            if how == "slots":
                os.setxattr(out, "user.sg", struct.pack("<QI", seq, zlib.crc32(data)))
            os.close(out)
            if how == "exchange" and libc.renameat2(store_fd, target, store_fd, name, 2) != 0:  # no pin yet
                os.rename(target, name, src_dir_fd=store_fd, dst_dir_fd=store_fd)


_BURN = "import time,sys\nd=float(sys.argv[1])\nwhile True:\n t=time.perf_counter()\n" \
        " while time.perf_counter()-t<d*0.01: pass\n if d<1: time.sleep((1-d)*0.01)\n"


def _start(mode: str, d: Path, work: Path) -> tuple[DaemonProc | None, subprocess.Popen[bytes] | None]:
    """The daemon (DaemonProc) or the child process of *mode*, running and ready."""
    tmpfs_store = _SHM / f"sgbench-interference-{os.getpid()}"
    shutil.rmtree(tmpfs_store, ignore_errors=True)
    if mode == "daemon":
        return start_daemon(work, str(d)), None
    if "at most every" in mode:
        return start_daemon(work, str(d), wrap=[sys.executable, str(STALEPINS)]), None
    if mode.startswith("daemon"):  # its store on tmpfs: only a config file says where a store goes
        cfg = work / "interference.toml"
        cfg.write_text(f'[[watch]]\npath = "{d}"\nstore = "{tmpfs_store}"\n')
        return start_daemon(work, None, ["--config", str(cfg)]), None
    if mode.startswith("CPU"):
        duty = "1" if "whole" in mode else "0.37"
        child = subprocess.Popen([sys.executable, "-c", _BURN, duty])
        time.sleep(0.3)
        return None, child
    pause = "0" if "every event" in mode else "0.02"
    mimic = [] if mode.startswith("inotify") else ["read"] if "read only" in mode else [
        "in-place" if "in place" in mode else "slots" if "slots" in mode else "exchange",
        str(tmpfs_store if "tmpfs" in mode else d / ".mimic")]
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    child = subprocess.Popen([sys.executable, "-m", "sgbench.interference", str(d), pause, *mimic],
                             stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=path))
    assert child.stdout is not None
    if child.stdout.readline() != b"ready\n":
        raise RuntimeError(f"{mode}: the watcher did not start")
    return None, child


def _one(work: Path, d: Path, docsets: list[Docs], writes: int, mode: str) -> dict[str, Any]:
    for e in os.scandir(d):
        shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
    paths = [str(d / f"s{j:04d}.json") for j in range(len(docsets))]
    for j, p in enumerate(paths):
        server_write(p, docsets[j](5))
    daemon, child = _start(mode, d, work) if mode != "alone" else (None, None)
    try:
        if daemon is not None:
            daemon.sync(60)
            cpu0 = proc_cpu_s(daemon.proc.pid)
        t0 = pc()
        for k in range(writes):
            j = k % len(paths)
            server_write(paths[j], docsets[j](6 + k // len(paths)))
        row: dict[str, Any] = {"mode": mode, "writes_per_s": round(writes / (pc() - t0), 1)}
        if child is not None and child.poll() is not None:  # else its figure would be the writer alone's
            raise RuntimeError(f"{mode}: the control died during the run (exit status {child.returncode})")
        if daemon is not None:
            daemon.sync(120)
            row["daemon_cpu_ms_per_1000_writes"] = round((proc_cpu_s(daemon.proc.pid) - cpu0) / writes * 1e6, 1)
    finally:
        if daemon is not None:
            daemon.stop()
        if child is not None:
            child.kill()
            child.wait()
        shutil.rmtree(_SHM / f"sgbench-interference-{os.getpid()}", ignore_errors=True)
    return row


def bench_interference(work: Path, rounds: int, writes: int) -> dict[str, Any]:
    sessions = 200
    docsets = [Docs(6 + writes // sessions + 1, sid=f"s{j:04d}") for j in range(sessions)]
    d = fresh(work, "interference")
    modes = [m for m in MODES if "tmpfs" not in m or _SHM.is_dir()]
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        k = r % len(modes)
        for mode in modes[k:] + modes[:k]:
            runs.append(dict(_one(work, d, docsets, writes, mode), round=r))
    shutil.rmtree(d)
    alone = {r["round"]: r["writes_per_s"] for r in runs if r["mode"] == "alone"}
    out: dict[str, Any] = {"sessions": sessions, "writes": writes, "rounds": rounds, "modes": {}, "runs": runs}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        per_round = [r["writes_per_s"] / alone[r["round"]] for r in rs]
        m = {"writes_per_s": median([r["writes_per_s"] for r in rs]),
             "median_round_ratio": round(median(per_round), 3), "round_ratios": [round(x, 3) for x in per_round]}
        m["ratio_of_medians"] = ratio(m["writes_per_s"], median(list(alone.values())))
        if "daemon_cpu_ms_per_1000_writes" in rs[0]:
            m["daemon_cpu_ms_per_1000_writes"] = median([r["daemon_cpu_ms_per_1000_writes"] for r in rs])
        out["modes"][mode] = m
    return out


if __name__ == "__main__":
    watcher(sys.argv[1], float(sys.argv[2]), sys.argv[4] if len(sys.argv) > 4 else None,
            sys.argv[3] if len(sys.argv) > 3 else "")

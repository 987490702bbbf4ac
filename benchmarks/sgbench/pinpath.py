"""The event path's file operations one by one, on the run's filesystem, to back the profile with costs.

Each operation is timed on its own (CPU of this process and wall time),
interleaved, on a session of the 2a large load's size. They are the steps a
daemon evaluation of an appending write performs with copy pins, plus the
alternatives the profile suggests: replacing the pin by ``RENAME_EXCHANGE``
and an unlink (ext4 does not start writeback for it, unlike a rename over an
existing file: its ``auto_da_alloc`` heuristic), and what the default ``auto``
pin costs on a filesystem without reflinks (a clone attempt that falls back
to an in-kernel copy, then is thrown away before the copy pin is written).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from sessionguard import fsutil

from .common import Docs, fresh, pc

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, _FLAGS, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def bench_pinpath(work: Path, iters: int) -> dict[str, Any]:
    return {"large": _ops(work, iters, 1000), "small": _ops(work, iters, 5)}


def _ops(work: Path, iters: int, messages: int) -> dict[str, Any]:
    d = fresh(work, f"pinpath-{messages}")
    data = orjson.dumps(Docs(messages)(messages), option=orjson.OPT_INDENT_2)
    dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    live = "live.json"
    _write(dir_fd, live, data)
    _write(dir_fd, "pin-a", data)
    _write(dir_fd, "pin-b", data)
    live_fd = os.open(live, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)

    def read_live() -> None:
        fd = os.open(live, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.read(fd, os.fstat(fd).st_size + 1)
        finally:
            os.close(fd)

    def pin_rename_over() -> None:
        _write(dir_fd, "pin-a.tmp", data)
        os.rename("pin-a.tmp", "pin-a", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def pin_exchange_unlink() -> None:
        _write(dir_fd, "pin-b.tmp", data)
        fsutil.exchange(dir_fd, "pin-b.tmp", "pin-b")
        os.unlink("pin-b.tmp", dir_fd=dir_fd)

    def clone_attempt() -> None:
        _method, pending = fsutil.create_clone(live_fd, dir_fd, "clone", allow_reflink=True)
        pending.discard()

    ops: dict[str, Callable[[], object]] = {
        "open + read the live file": read_live,
        "parse (orjson.loads)": lambda: orjson.loads(data),
        "pin: write tmp + rename over the old pin": pin_rename_over,
        "pin: write tmp + RENAME_EXCHANGE + unlink": pin_exchange_unlink,
        "auto pin without reflinks: clone attempt (copy) + discard": clone_attempt,
    }
    cpu: dict[str, list[float]] = {k: [] for k in ops}
    wall: dict[str, list[float]] = {k: [] for k in ops}
    try:
        for _ in range(iters):
            for name, fn in ops.items():
                c0, t0 = time.process_time(), pc()
                fn()
                wall[name].append(pc() - t0)
                cpu[name].append(time.process_time() - c0)
    finally:
        os.close(live_fd)
        os.close(dir_fd)
    return {
        "messages": messages,
        "session_bytes": len(data),
        "iterations": iters,
        "ops": {k: {"cpu_ms_median": round(statistics.median(cpu[k]) * 1e3, 4),
                    "cpu_ms_mean": round(statistics.fmean(cpu[k]) * 1e3, 4),
                    "wall_ms_median": round(statistics.median(wall[k]) * 1e3, 4)} for k in ops},
    }

"""sessionguard benchmarks: the embedded guard and the real daemon, each against a baseline
measured in the same run. Run through ``benchmarks/run``; BENCHMARKS.md explains the output.

Every result is reported as absolute numbers *and* a ratio to its baseline,
because this machine (and any CI runner) is shared and noisy: only same-run
ratios are comparable between runs. Nothing here is tuned or hard-coded.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from sgbench import (
    embed,
    events,
    interference,
    latency,
    olddaemon,
    perfrec,
    pinpath,
    profiling,
    startup,
    tables,
    writeamp,
    zstdpins,
)
from sgbench.common import ROOT, Docs, loadavg, log, pc, wait_quiet
from sgbench.report import Table, render

RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("embed", "events", "latency", "startup", "zstd", "write_amp", "write_amp_xfs", "profile", "perf",
            "pinpath")
BUILDERS: list[tuple[str, Callable[[Any], Table]]] = [
    ("embed", tables.embed), ("events", tables.events), ("latency", tables.latency), ("startup", tables.startup),
    ("scale", tables.scale), ("zstd", tables.zstd), ("write_amp", tables.write_amp),
    ("write_amp_xfs", tables.write_amp), ("profile", tables.profile), ("perf", tables.perf),
    ("pinpath", tables.pinpath), ("interference", tables.interference),
]

Plan = dict[str, Callable[[Path], dict[str, Any]]]


def _events(w: Path, quick: bool) -> dict[str, Any]:
    if quick:
        loads = [events.Load("small", 50, 5, 2000), events.Load("large", 10, 1000, 400)]
    else:
        loads = [events.Load("small", 200, 5, 10_000), events.Load("large", 20, 1000, 2000)]
    # nine rounds: with five, the writer-rate ratio moved by ±0.1 from one run to the next
    return events.bench_events(w, loads, 1 if quick else 9, olddaemon.export(w), () if quick else ("large",))


def _write_amp(w: Path, megabytes: float) -> dict[str, Any]:
    modes = ("daemon_auto", "daemon_copy", "daemon_link", "daemon_zstd", "naive")
    return dict(writeamp.bench_write_amp(w, megabytes, modes), filesystem=machine_fs(w)[1])


def plan(quick: bool, scale: int | None) -> Plan:
    q = quick
    docs = Docs(1400)
    p: Plan = {
        "embed": lambda w: embed.bench_embed(w, 40 if q else 500),
        "events": lambda w: _events(w, q),
        "latency": lambda w: latency.bench_shrink_latency(w, 40 if q else 300, docs),
        # three pairs: one pair's ratio moved 1.86x -> 2.44x between two runs of the same code
        "startup": lambda w: startup.bench_startup(w, [10_000] if q else [100_000], 1 if q else 3),
        "zstd": lambda w: zstdpins.bench_zstd(w, 20 if q else 60, 200 if q else 1200, 20 if q else 100, 1 if q else 2),
        "write_amp": lambda w: _write_amp(w, 20 if q else 100),
        "write_amp_xfs": lambda w: writeamp.xfs_write_amp(w, 20 if q else 100, Path(__file__)),
        "profile": lambda w: {"large": profiling.bench_profile(w, 10, 1000, 300 if q else 1500),
                              "small": profiling.bench_profile(w, 100, 5, 1000 if q else 6000)},
        "perf": lambda w: {"large": perfrec.bench_perf(w, 10, 1000, 300 if q else 1500),
                           "small": perfrec.bench_perf(w, 100, 5, 1000 if q else 6000)},
        "pinpath": lambda w: pinpath.bench_pinpath(w, 50 if q else 300),
    }
    p["scale"] = lambda w: startup.bench_scale(w, scale or 1_000_000)
    p["interference"] = lambda w: interference.bench_interference(w, 2 if q else 8, 1000 if q else 5000)
    return p


def machine_fs(path: Path) -> tuple[str, str]:
    try:
        out = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True, text=True,
                             check=True).stdout.splitlines()[-1].split()
        return out[0], out[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "?", "?"


def ext4_journal(dev: str) -> str | None:
    """"yes"/"no" for an ext4 device (sysfs names its journal thread, ``<none>`` without one).

    It matters: ext4 without a journal skips recently deleted inodes when it
    allocates one (``recently_deleted``), so the daemon's create-and-replace of
    a pin per write costs several times more kernel CPU there than on a
    journaled ext4.
    """
    try:
        task = Path("/sys/fs/ext4", Path(dev).name, "journal_task").read_text().strip()
    except OSError:
        return None
    return "no" if task == "<none>" else "yes"


def machine(workdir: Path) -> dict[str, Any]:
    import watchdog.version
    import zstandard

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), "0")
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain", "daemon"], capture_output=True, text=True,
                                check=False).stdout.strip())
    import orjson

    dev, fstype = machine_fs(workdir)
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "mem_total_kB": int(mem), "kernel": platform.release(),
            "python": platform.python_version(), "orjson": orjson.__version__,
            "watchdog": watchdog.version.VERSION_STRING, "zstandard": zstandard.__version__,
            "pysimdjson": importlib.metadata.version("pysimdjson"),
            "workdir": str(workdir), "workdir_device": dev, "workdir_fstype": fstype,
            "workdir_journal": ext4_journal(dev) if fstype == "ext4" else None, "git_commit": commit,
            "daemon_tree_dirty": dirty, "loadavg_start": loadavg()}


def run_sections(res: dict[str, Any], names: list[str], p: Plan, work: Path) -> None:
    for name in names:
        log(f"{name} ...")
        t, load0 = pc(), loadavg()
        try:
            res[name] = p[name](work)
        except Exception as exc:
            traceback.print_exc()
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        res["sections"][name] = {"seconds": round(pc() - t, 1), "load_start": load0, "load_end": loadavg()}
        log(f"{name} done in {pc() - t:.1f}s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (a few minutes; not for BENCHMARKS.md)")
    ap.add_argument("--only", action="append", choices=(*SECTIONS, "scale", "interference"),
                    help="run only these sections (repeatable; interference, about 10 minutes, runs only when named); "
                         "with --table-only, print only their tables")
    ap.add_argument("--scale", nargs="?", type=int, const=1_000_000, metavar="N",
                    help="the scale run alone (default N: 1,000,000 sessions; fewer if the disk cannot hold "
                         "them); with --only, those sections too")
    ap.add_argument("--workdir", default=None, help="parent of the scratch dir (default: the system temp dir; "
                    "it must be the filesystem you want to measure)")
    ap.add_argument("--out", default=None, help="results file (default: benchmarks/results/latest.json, "
                    "or scale.json for --scale)")
    ap.add_argument("--table-only", metavar="JSON", help="print the tables of an existing results file")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine first")
    ap.add_argument("--quiet-load", type=float, default=0.7, help="1-minute load average to wait for (0.7)")
    ap.add_argument("--xfs-child", metavar="MNT", help=argparse.SUPPRESS)
    ap.add_argument("--xfs-megabytes", type=float, default=100, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def xfs_child(mnt: Path, megabytes: float, out: Path) -> int:
    """Inside writeamp.xfs_write_amp's private mount namespace: section 2e on the XFS mount."""
    work = mnt / "w"
    work.mkdir()
    res = writeamp.bench_write_amp(work, megabytes, ("daemon_auto", "naive"))
    res["filesystem"] = "XFS, loop-mounted, reflink=1"
    out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def _terminated(signum: int, frame: FrameType | None) -> NoReturn:
    """``kill`` (or a CI job's timeout) ends a run as Ctrl-C does: through every
    ``finally``, so no daemon, control process or scratch directory outlives it."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    # The guard logs every kept version at WARNING; keep the benchmark's output to the tables.
    logging.getLogger("sessionguard").addHandler(logging.NullHandler())
    logging.getLogger("sessionguard").propagate = False
    args = parse_args(argv)
    if args.table_only:
        saved = json.loads(Path(args.table_only).read_text())
        if args.only:  # some sections' tables alone, without the header (to paste between prose)
            print(render(saved, [b for b in BUILDERS if b[0] in args.only], header_too=False))
        else:
            print(render(saved, BUILDERS))
        return 0
    if args.xfs_child:
        return xfs_child(Path(args.xfs_child), args.xfs_megabytes, Path(args.out))
    names = list(args.only or ([] if args.scale is not None else SECTIONS))
    if args.scale is not None:
        names.append("scale")
    out = Path(args.out or RESULTS / ("scale.json" if args.scale is not None else "latest.json"))
    quiet = None if args.no_wait else wait_quiet(args.quiet_load)
    work = Path(tempfile.mkdtemp(prefix="sgbench-", dir=args.workdir))
    res: dict[str, Any] = {
        "command": "benchmarks/run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick, "quiet": quiet, "sections": {},
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": machine(work),
    }
    t_all = pc()
    signal.signal(signal.SIGTERM, _terminated)
    try:
        run_sections(res, names, plan(args.quick, args.scale), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["total_seconds"] = round(pc() - t_all, 1)
    res["machine"]["loadavg_end"] = loadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(render(res, BUILDERS))
    print(f"results: {out}  ({res['total_seconds']} s)")
    return 0 if not any(isinstance(v, dict) and "error" in v for v in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

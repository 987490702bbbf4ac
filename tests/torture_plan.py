"""What an oracle ("torture") run is: its plan, and what it leaves for the oracle besides the disk.

``run.json`` in the work directory holds the plan, the seed, the clocks and
the daemon's up-windows, so ``torture.py check DIR`` can judge a kept run
again (e.g. after taking versions out of its store by hand).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from torture_writers import SETTLE_SECONDS, STYLES


@dataclass
class Plan:
    """What to run: one writer process per entry of *styles*, each with *sessions* sessions.

    *filler* sessions are written before anything starts (the tree a first
    start scans); *first_scan_kills* daemons are SIGKILLed in the middle of
    their start-up scan before the first one is let through. *pin* is the
    watch's ``pin`` setting (``zstd``: the oracle decompresses every pin itself).
    """

    seconds: float = 25.0
    styles: tuple[str, ...] = STYLES
    sessions: int = 8
    daemon: bool = True
    kills: bool = False
    seed: int | None = None
    max_messages: int = 200
    settle: float = SETTLE_SECONDS
    progress_every: float = 0.0  # seconds between progress lines on stdout (0: none)
    filler: int = 0
    first_scan_kills: int = 0
    pin: str = "auto"


@dataclass
class Run:
    plan: Plan
    seed: int
    workdir: Path
    sdir: Path
    store: Path
    journals: Path
    t0: float = 0.0
    t_end: float = 0.0
    wall_minus_mono: float = 0.0  # time.time() - time.monotonic(), to place daemon log lines
    windows: list[list[float]] = field(default_factory=list)
    supervisor: dict[str, Any] = field(default_factory=dict)


def new_run(plan: Plan, seed: int, workdir: Path) -> Run:
    sdir = workdir / "sessions"
    return Run(plan, seed, workdir, sdir, sdir / ".sessionguard", workdir / "journals")


def save_run(r: Run) -> None:
    """What the oracle needs besides the journals and the disk: ``torture.py check`` reads it."""
    meta = {"plan": {**asdict(r.plan), "styles": list(r.plan.styles)}, "seed": r.seed, "t0": r.t0,
            "t_end": r.t_end, "wall_minus_mono": r.wall_minus_mono, "windows": r.windows,
            "supervisor": r.supervisor}
    (r.workdir / "run.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))


def load_run(workdir: Path) -> Run:
    meta = orjson.loads((workdir / "run.json").read_bytes())
    plan = Plan(**{**meta["plan"], "styles": tuple(meta["plan"]["styles"])})
    r = new_run(plan, meta["seed"], workdir)
    r.t0, r.t_end, r.wall_minus_mono = meta["t0"], meta["t_end"], meta["wall_minus_mono"]
    r.windows, r.supervisor = meta["windows"], meta["supervisor"]
    return r

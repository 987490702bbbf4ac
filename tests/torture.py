#!/usr/bin/env python3
"""The oracle ("torture") harness: is any version a writer produced ever lost?

Writer processes, each with one write style, hammer disjoint sessions of one
watched directory while the real ``sessionguardd`` runs over it — optionally
SIGKILLed and restarted many times, or killed again and again in the middle
of its start-up scan over a large tree. Every writer journals each operation
(content hash, message count, ``CLOCK_MONOTONIC`` start and end, which is
system-wide and so comparable across processes). Afterwards the oracle
decides from the journals alone which versions *must* be recoverable, and
looks for their exact bytes in the store and the live files itself: it never
asks the daemon what it kept.

The promise checked (issue 6): a version that stayed on disk at least the
settle time (1 s) while the daemon was up, and was followed by a loss (a
delete, a corrupt write, or fewer messages — intended truncates included), is
recoverable; so is each session's high-water version among those. With the
embedded library as the writer, every version followed by a loss is
recoverable with no settle time and no daemon at all.

The parts: torture_writers.py (the writer processes, the filler tree),
torture_supervisor.py (the daemon, its kills and the checks after each),
torture_oracle.py (the judgement), torture_disk.py (reading the disk),
torture_plan.py (what a run is). Usage (the long runs are ``scripts/soak``;
short runs are in tests/test_torture.py)::

    python tests/torture.py run --minutes 5            # with SIGKILL storms
    python tests/torture.py run --seconds 30 --no-kills
    python tests/torture.py run --seconds 20 --no-daemon --styles library,library
    python tests/torture.py run --minutes 5 --first-scan   # kills during start-up scans of 50,000 sessions
    python tests/torture.py check WORKDIR              # judge a kept run again
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from torture_oracle import check, describe, failures  # noqa: E402
from torture_plan import Plan, Run, load_run, new_run, save_run  # noqa: E402
from torture_supervisor import Supervisor  # noqa: E402
from torture_writers import NO_RETENTION, STYLES, make_filler  # noqa: E402

#: ``--first-scan`` without ``--filler``/``--first-scan-kills``: a tree whose start-up scan takes seconds.
FIRST_SCAN_FILLER = 50_000
FIRST_SCAN_KILLS = 8


def _write_config(path: Path, sdir: Path, pin: str) -> None:
    path.write_text(
        "[daemon]\nreconcile_interval = 1\n\n"
        f"[[watch]]\npath = \"{sdir}\"\nkeep_last = {NO_RETENTION}\npin = \"{pin}\"\n"
    )


def _spawn_writer(run: Run, i: int, style: str, sids: list[str], seed: int) -> subprocess.Popen[bytes]:
    name = f"w{i}-{style}"
    cmd = [sys.executable, str(HERE / "torture_writers.py"), "--name", name, "--style", style,
           "--dir", str(run.sdir), "--outside", str(run.workdir / "outside"),
           "--journal", str(run.journals / f"{name}.jsonl"), "--sids", ",".join(sids), "--seed", str(seed),
           "--max-messages", str(run.plan.max_messages), "--until", str(time.monotonic() + run.plan.seconds + 900)]
    with open(run.workdir / f"{name}.err", "wb") as err:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


def _wait(r: Run, sup: Supervisor | None, plan: Plan, end: float) -> None:
    """Let the writers run until *end*, with a progress line now and then."""
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, plan.progress_every or left))
        if plan.progress_every and time.monotonic() < end:
            ops = sum(len(p.read_bytes().splitlines()) for p in r.journals.glob("*.jsonl"))
            kills = sum(sup.kills.values()) if sup else 0
            print(f"torture: {time.monotonic() - r.t0:6.0f} s: {ops} operations, {kills} daemon kills", flush=True)


def _bring_up(sup: Supervisor, plan: Plan, filler: list[str]) -> None:
    """The daemon up for good (after the planned kills during start-up scans), with its probes."""
    if plan.first_scan_kills:
        sup.first_scan_storm(plan.first_scan_kills, filler)
    sup.launch()
    sup.start_prober()
    if plan.kills:
        sup.start_storm()


def run(plan: Plan, workdir: Path) -> Run:
    """Writers (and the daemon) for *plan.seconds*; returns what the oracle needs.

    With first-scan kills the writers start first and write through every killed
    scan; *plan.seconds* then counts from the start that is let through.
    """
    seed = plan.seed if plan.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    r = new_run(plan, seed, workdir)
    for d in (r.sdir, workdir / "outside", r.journals):
        d.mkdir(parents=True)
    filler = make_filler(r.sdir, plan.filler, rng.randrange(2**32)) if plan.filler else []
    config = workdir / "sessionguardd.toml"
    _write_config(config, r.sdir, plan.pin)
    sup = Supervisor(r, config, random.Random(rng.random())) if plan.daemon else None
    writers: list[subprocess.Popen[bytes]] = []
    try:
        if sup is not None and not plan.first_scan_kills:
            _bring_up(sup, plan, filler)
        r.wall_minus_mono = time.time() - time.monotonic()
        r.t0 = time.monotonic()
        for i, style in enumerate(plan.styles):
            sids = [f"{i:02d}{style[:3]}{k:04d}{rng.randrange(16**3):03x}" for k in range(plan.sessions)]
            writers.append(_spawn_writer(r, i, style, sids, rng.randrange(2**32)))
        if sup is not None and plan.first_scan_kills:
            _bring_up(sup, plan, filler)
        _wait(r, sup, plan, time.monotonic() + plan.seconds if plan.first_scan_kills else r.t0 + plan.seconds)
        _stop_writers(writers, workdir, plan)
        r.t_end = sup.finish() if sup is not None else time.monotonic()
        if sup is not None:
            r.windows = sup.windows
            r.supervisor = sup.figures()
        save_run(r)
        return r
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        if sup is not None:
            sup.abort()


def _stop_writers(writers: list[subprocess.Popen[bytes]], workdir: Path, plan: Plan) -> None:
    for w in writers:
        w.send_signal(signal.SIGTERM)
    for i, w in enumerate(writers):
        if w.wait(timeout=60) != 0:
            err = (workdir / f"w{i}-{plan.styles[i]}.err").read_text(errors="replace")
            raise RuntimeError(f"writer {i} ({plan.styles[i]}) failed ({w.returncode}):\n{err}")


def run_and_check(plan: Plan, workdir: Path) -> dict[str, Any]:
    return check(run(plan, workdir))


# -- command line ----------------------------------------------------------------

def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torture.py run", description="Writers, the daemon (SIGKILLed and "
                                "restarted unless --no-kills) and the oracle; exit 1 if anything is lost.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, help="how long the writers run (default 30)")
    g.add_argument("--seconds", type=float, help="the same in seconds")
    p.add_argument("--styles", default=",".join(STYLES), help="one writer per entry (default: %(default)s)")
    p.add_argument("--sessions", type=int, default=8, help="sessions per writer (default: %(default)s)")
    p.add_argument("--no-kills", action="store_true", help="never SIGKILL the daemon")
    p.add_argument("--no-daemon", action="store_true", help="no daemon at all (library writers only)")
    p.add_argument("--first-scan", action="store_true",
                   help=f"kill daemons during their start-up scan first (--filler {FIRST_SCAN_FILLER}, "
                        f"--first-scan-kills {FIRST_SCAN_KILLS} unless given)")
    p.add_argument("--filler", type=int, help="sessions written before the daemon starts (default 0)")
    p.add_argument("--first-scan-kills", type=int, help="SIGKILLs during start-up scans (default 0)")
    p.add_argument("--pin", choices=("auto", "copy", "zstd"), default="auto",
                   help="the watch's pin method (default: %(default)s)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-messages", type=int, default=200)
    p.add_argument("--workdir", help="where to run (default: a new directory under $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work directory even if nothing was lost")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def _run_main(argv: list[str]) -> int:
    p = _run_parser()
    a = p.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else 60 * (a.minutes if a.minutes is not None else 30)
    styles = tuple(s for s in a.styles.split(",") if s)
    if not set(styles) <= set(STYLES) or (a.no_daemon and set(styles) != {"library"}):
        p.error(f"--styles: each of {', '.join(STYLES)}; only library with --no-daemon")
    filler = a.filler if a.filler is not None else FIRST_SCAN_FILLER if a.first_scan else 0
    scan_kills = a.first_scan_kills if a.first_scan_kills is not None else FIRST_SCAN_KILLS if a.first_scan else 0
    if scan_kills and (a.no_daemon or not filler):
        p.error("kills during start-up scans need a daemon and --filler sessions to scan")
    plan = Plan(seconds=seconds, styles=styles, sessions=a.sessions, daemon=not a.no_daemon,
                kills=not (a.no_kills or a.no_daemon), seed=a.seed, max_messages=a.max_messages,
                progress_every=60.0, filler=filler, first_scan_kills=scan_kills, pin=a.pin)
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="sgsoak-"))
    if a.workdir:
        workdir.mkdir(parents=True, exist_ok=False)
    print(f"torture: {plan} in {workdir}", flush=True)
    figs = run_and_check(plan, workdir)
    bad = _report(figs, a.json)
    if bad or a.keep or figs["hidden_messages_lost"]:
        print(f"torture: work directory kept: {workdir} (torture.py check {workdir} runs the oracle again)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bad else 0


def _report(figs: dict[str, Any], as_json: bool) -> list[str]:
    if as_json:
        sys.stdout.write(orjson.dumps({k: v for k, v in figs.items() if k != "expected_items"},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(describe(figs))
    bad = failures(figs)
    print("torture: FAILED: " + ", ".join(bad) if bad else "torture: OK, nothing lost")
    return bad


def _check_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="torture.py check", description="Run the oracle again over a kept run "
                                "(e.g. after removing versions from its store by hand).")
    p.add_argument("workdir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    return 1 if _report(check(load_run(Path(a.workdir))), a.json) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return _run_main(argv[1:])
    if argv[:1] == ["check"]:
        return _check_main(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

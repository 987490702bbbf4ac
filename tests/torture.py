#!/usr/bin/env python3
"""The oracle ("torture") harness: is any version a writer produced ever lost?

Writer processes, each with one write style, hammer disjoint sessions of one
watched directory while the real ``sessionguardd`` runs over it — optionally
SIGKILLed and restarted many times. Every writer journals each operation
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

Usage (the long run is ``scripts/soak --minutes N``; short runs are in
tests/test_torture.py)::

    python tests/torture.py run --minutes 5            # with SIGKILL storms
    python tests/torture.py run --seconds 30 --no-kills
    python tests/torture.py run --seconds 20 --no-daemon --styles library,library

``python tests/torture.py writer ...`` is one writer process (internal).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from daemonproc import DaemonProc  # noqa: E402 - run as a script too: its own directory first

STYLES = ("atomic", "inplace", "link", "library")
#: The issue's figure: a version on disk this long while the daemon runs must be kept.
SETTLE_SECONDS = 1.0
#: How often a writer picks each operation for an existing session: a burst (a turn)
#: starts with a user action — often a loss — and then streams appends, with the
#: occasional loss mid-burst so that short-lived versions are lost too.
FIRST_WEIGHTS = {"append": 50, "truncate": 12, "regenerate": 10, "wipe": 8, "corrupt": 10, "delete": 10}
BURST_WEIGHTS = {"append": 85, "truncate": 3, "regenerate": 3, "wipe": 2, "corrupt": 4, "delete": 3}
LOSS_OPS = ("truncate", "regenerate", "wipe", "corrupt", "delete")
INTENT_KEY = "intentional_shrink_generation"  # one of config.DEFAULT_INTENT_KEYS
TMP_MARK = ".tmp-sg-"  # the store's tmp-file marker (fsutil.TMP_MARK)
COOKIE_PREFIX = ".sessionguard-sync"  # the daemon's sync cookies (watch.COOKIE_PREFIX)
#: No retention during a run: thinning is a deliberate policy (tested on its own) that
#: the oracle could not tell from a loss.
NO_RETENTION = 10**9

StatKey = tuple[int, int, int, int]


# -- writers ---------------------------------------------------------------------

def _message(sid: str, rev: int, i: int) -> dict[str, Any]:
    """~400 bytes, unique per (session, revision, index) so every version has its own bytes.

    ``id`` ("<revision>.<index>") lets the oracle tell which messages a file holds.
    """
    return {
        "id": f"{rev}.{i}",
        "role": "user" if i % 2 == 0 else "assistant",
        "content": f"{sid} r{rev} m{i}: " + "lorem ipsum dolor sit amet " * 13,
        "timestamp": 1764000000.0 + i,
    }


def _new_doc(sid: str) -> dict[str, Any]:
    """A hermes-webui-shaped session (like sghelpers.make_session) with an intent marker."""
    now = time.time()
    return {
        "session_id": sid,
        "title": f"session {sid}",
        "workspace": "/home/user/project",
        "model": "gpt-5",
        "created_at": now,
        "updated_at": now,
        "pinned": False,
        "active_stream_id": None,
        INTENT_KEY: uuid.uuid4().hex,
        "messages": [],
    }


def _dump(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def _revs(messages: list[Any]) -> list[int]:
    """The revision (write) that added each message: which conversation a file holds."""
    return [int(str(m["id"]).partition(".")[0]) for m in messages]


def _rle(revs: list[int]) -> list[list[int]]:
    """[[revision, n], ...]: a version's messages, compactly, for the journal."""
    out: list[list[int]] = []
    for r in revs:
        if out and out[-1][0] == r:
            out[-1][1] += 1
        else:
            out.append([r, 1])
    return out


def _unrle(segs: list[list[int]]) -> list[int]:
    return [r for r, n in segs for _ in range(n)]


def write_atomic(path: str, data: bytes, outside: str) -> None:
    """The real server's save (sghelpers.server_write): same-dir tmp, fsync, os.replace."""
    tmp = f"{path[:-len('.json')]}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_inplace(path: str, data: bytes, outside: str) -> None:
    """Truncate and rewrite the same inode in two halves: the torn state is visible."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        f.write(data[len(data) // 2:])


def write_link(path: str, data: bytes, outside: str) -> None:
    """Publish with os.link from a tmp file outside the watched dir (same filesystem)."""
    tmp = os.path.join(outside, f"{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.link(tmp, path)
    os.unlink(tmp)


RAW_WRITERS: dict[str, Callable[[str, bytes, str], None]] = {
    "atomic": write_atomic,
    "inplace": write_inplace,
    "link": write_link,
    # The library never writes corrupt bytes: a corrupt write to one of its
    # sessions comes from another tool, which replaces the file by rename.
    "library": write_atomic,
}


class Writer:
    """One writer process: owns *sids*, writes them in one style, journals every operation."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.name, self.style, self.dir, self.outside = a.name, a.style, a.dir, a.outside
        self.sids: list[str] = a.sids.split(",")
        self.rng = random.Random(a.seed)
        self.max_messages = a.max_messages
        self.until = a.until
        self.docs: dict[str, dict[str, Any] | None] = {sid: None for sid in self.sids}
        self.rev = 0
        self.stopping = False
        self.journal = open(a.journal, "ab")  # noqa: SIM115 - open for the writer's whole life
        self.guard = None
        if self.style == "library":
            from sessionguard import Guard
            from sessionguard.retention import Retention

            self.guard = Guard(self.dir, retention=Retention(keep_last=NO_RETENTION))

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        parent = os.getppid()
        while not self.stopping and time.monotonic() < self.until and os.getppid() == parent:
            sid = self.rng.choice(self.sids)
            first = self.step(sid, FIRST_WEIGHTS)
            # the rest of the turn, milliseconds apart (after an undo or a clear, half the time a pause)
            more = self.rng.randint(0, 4) if first not in LOSS_OPS or self.rng.random() < 0.5 else 0
            for _ in range(more):
                if self.stopping:
                    break
                time.sleep(self.rng.uniform(0.001, 0.03))
                self.step(sid, BURST_WEIGHTS)
            if self.rng.random() < 0.2:  # sometimes all of this writer's sessions stay still a while
                self._sleep(self.rng.uniform(SETTLE_SECONDS + 0.2, SETTLE_SECONDS + 1.5))
            else:
                self._sleep(self.rng.uniform(0.05, 0.4))
        self.journal.close()

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.05, max(end - time.monotonic(), 0)))

    def choose(self, sid: str, weights: dict[str, int]) -> str:
        doc = self.docs[sid]
        if doc is None:
            return "create"
        n = len(doc["messages"])
        if n >= self.max_messages:
            return "truncate"
        op = self.rng.choices(list(weights), list(weights.values()))[0]
        if (op == "truncate" and n < 2) or (op in ("regenerate", "wipe") and n < 1):
            return "append"
        return op

    def _grow(self, doc: dict[str, Any], k: int) -> None:
        self.rev += 1
        n = len(doc["messages"])
        doc["messages"].extend(_message(doc["session_id"], self.rev, n + i) for i in range(k))

    def step(self, sid: str, weights: dict[str, int]) -> str:
        op = self.choose(sid, weights)
        path = os.path.join(self.dir, f"{sid}.json")
        doc = self.docs[sid]
        t_start = time.monotonic()
        sha: str | None = None
        count: int | None = None
        revs: list[list[int]] | None = None
        if op == "delete":
            os.unlink(path)
            self.docs[sid] = None
        elif op == "corrupt":
            assert doc is not None
            full = _dump(doc)
            data = full[: self.rng.randint(0, len(full) - 1)]  # truncated JSON (possibly empty)
            RAW_WRITERS[self.style](path, data, self.outside)
            sha = hashlib.sha256(data).hexdigest()
        else:
            if op == "create":
                doc = self.docs[sid] = _new_doc(sid)
                self._grow(doc, self.rng.randint(1, 20))
            elif op == "append":
                assert doc is not None
                self._grow(doc, self.rng.randint(1, 20))
            elif op == "truncate":  # intended: a user's undo/compress, marked with a new intent value
                assert doc is not None
                del doc["messages"][len(doc["messages"]) // 2:]
                doc[INTENT_KEY] = uuid.uuid4().hex
            elif op == "regenerate":  # unmarked: drop the last turns before resending
                assert doc is not None
                del doc["messages"][-self.rng.randint(1, min(3, len(doc["messages"]))):]
            elif op == "wipe":  # the bug: a metadata-only copy saved back
                assert doc is not None
                doc["messages"] = []
            assert doc is not None
            doc["updated_at"] = time.time()
            count = len(doc["messages"])
            revs = _rle(_revs(doc["messages"]))
            sha = self._write_doc(sid, path, op, doc)
        t_end = time.monotonic()
        rec = {"w": self.name, "sid": sid, "op": op, "style": self.style, "sha": sha, "count": count,
               "revs": revs, "t_start": t_start, "t_end": t_end}
        self.journal.write(orjson.dumps(rec) + b"\n")
        self.journal.flush()
        return op

    def _write_doc(self, sid: str, path: str, op: str, doc: dict[str, Any]) -> str:
        if self.guard is None:
            data = _dump(doc)
            RAW_WRITERS[self.style](path, data, self.outside)
            return hashlib.sha256(data).hexdigest()
        intended = op == "truncate"
        self.guard.save(sid, doc, allow_shrink=intended, reason="torture: intended truncate" if intended else None)
        # We are this session's only writer: what is there now is exactly what the guard wrote.
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- files on disk ---------------------------------------------------------------

def live_keys(sdir: Path) -> dict[str, StatKey]:
    """(dev, ino, size, mtime_ns) of every regular session file, by session id."""
    out: dict[str, StatKey] = {}
    with os.scandir(sdir) as it:
        for e in it:
            if not e.name.endswith(".json") or e.name.startswith(("_", ".")):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[e.name[: -len(".json")]] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def pin_matches(store: Path, sdir: Path, sid: str) -> bool:
    """Does *sid*'s pin hold exactly what its live file holds? (A pin claims nothing in its
    name: only its content says what it is.)"""
    try:
        return (store / "pins" / sid).read_bytes() == (sdir / f"{sid}.json").read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return False


def tmp_files(dirs: list[Path], owners: set[int] | None = None) -> list[str]:
    """Store tmp files (``.tmp-sg-<pid>-…``) under *dirs*, optionally only those of *owners*."""
    found = []
    for top in dirs:
        for root, _, files in os.walk(top):
            for name in files:
                _, sep, rest = name.partition(TMP_MARK)
                if not sep:
                    continue
                pid = rest.partition("-")[0]
                if owners is None or (pid.isdigit() and int(pid) in owners):
                    found.append(os.path.join(root, name))
    return found


def cookies_of(sdir: Path, owners: set[int]) -> list[str]:
    return [n for n in os.listdir(sdir)
            if n.startswith(COOKIE_PREFIX)
            and n[len(COOKIE_PREFIX):].removeprefix(TMP_MARK).partition("-")[0] in {str(p) for p in owners}]


def store_usage(store: Path) -> dict[str, int]:
    files = versions = pins = total = 0
    seen: set[tuple[int, int]] = set()
    for root, _, names in os.walk(store):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            files += 1
            versions += name.endswith(".version")
            pins += os.path.basename(root) == "pins" and TMP_MARK not in name
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return {"store_files": files, "store_versions": versions, "store_pins": pins, "store_bytes": total}


class LogTail:
    """New complete lines of a growing file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        return complete

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return out


# -- the daemon supervisor -------------------------------------------------------

class Supervisor:
    """Runs the real sessionguardd and records when it was up.

    An up-window opens when ``daemon.started`` is seen in the log (the daemon
    logs it after the start-up scan pinned every file; seen a little later
    than written, so the window is if anything too short) and closes just
    before the SIGKILL. With *kills*, a storm thread kills it at random
    moments — some just after a writer's shrink or just after the daemon
    logged a capture, so kills land mid-way through keeping a version or
    writing a pin — and restarts it, checking each time that the start-up
    left no tmp file of a killed daemon behind and pinned every file.
    """

    def __init__(self, workdir: Path, sdir: Path, store: Path, journals: Path, config: Path,
                 rng: random.Random) -> None:
        self.workdir, self.sdir, self.store, self.journals, self.config = workdir, sdir, store, journals, config
        self.rng = rng
        self.windows: list[list[float]] = []
        self.daemon: DaemonProc | None = None
        self.tail: LogTail | None = None
        self.killed_pids: set[int] = set()
        self.kills: Counter[str] = Counter()
        self.launches = 0
        self.torn_tmp = 0          # tmp files a kill left behind (to be swept at restart)
        self.planted = 0           # … and one more planted after each kill
        self.tmp_leftovers: set[str] = set()  # … still there once the next daemon was up: must stay empty
        self.cookies_left: set[str] = set()
        self.pin_checks = 0
        self.missing_pins: list[str] = []
        self.lags: list[float] = []
        self._before_kill: dict[str, StatKey] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._journal_tails: dict[Path, LogTail] = {}

    # -- lifecycle --

    def launch(self) -> None:
        """Start a daemon and wait for ``daemon.started``; after a kill, check what it left."""
        d = DaemonProc(self.workdir, ["--config", str(self.config), "--reconcile-interval", "1"])
        tail = LogTail(d.logfile)
        deadline = time.monotonic() + 120
        while not any(e.get("event") == "daemon.started" for e in tail.events()):
            if d.proc.poll() is not None:
                raise RuntimeError(f"sessionguardd exited ({d.proc.returncode}) before starting:\n{d.text()}")
            if time.monotonic() > deadline:
                d.kill()
                raise RuntimeError(f"sessionguardd did not start in 120 s:\n{d.text()}")
            time.sleep(0.005)
        self.windows.append([time.monotonic(), float("nan")])
        self.daemon, self.tail = d, tail
        self.launches += 1
        if self.killed_pids:
            self._check_restart()

    def _check_restart(self) -> None:
        """The start-up scan is done: no tmp file of a killed daemon, and every file
        unchanged since before the kill is pinned exactly as it is."""
        self.tmp_leftovers.update(tmp_files([self.store, self.sdir], self.killed_pids))
        self.cookies_left.update(cookies_of(self.sdir, self.killed_pids))
        now = live_keys(self.sdir)
        matched = {sid for sid in now if pin_matches(self.store, self.sdir, sid)}
        again = live_keys(self.sdir)
        for sid, key in now.items():
            if self._before_kill.get(sid) == key == again.get(sid):
                self.pin_checks += 1
                if sid not in matched:
                    self.missing_pins.append(f"after restart {self.launches - 1}: {sid} {key}")

    def kill(self, plan: str) -> None:
        d = self.daemon
        assert d is not None
        self._before_kill = live_keys(self.sdir)
        self.windows[-1][1] = time.monotonic()  # closed before the signal: never too long
        pid = d.proc.pid
        d.kill()
        self.daemon = None
        self.killed_pids.add(pid)
        self.kills[plan] += 1
        self.torn_tmp += len(tmp_files([self.store, self.sdir], {pid}))
        self._plant_tmp(pid)

    def _plant_tmp(self, pid: int) -> None:
        """Leave a tmp file as a kill mid-write would (named by fsutil.tmp_path's rule), so that
        every restart has at least one to sweep even when the kill did not land mid-write."""
        folders = [p for p in (self.store / "sessions").iterdir() if p.is_dir()] + [self.store / "pins"]
        where = self.rng.choice(folders)
        (where / f".pin.planted{TMP_MARK}{pid}-{self.rng.randrange(16**8):08x}").write_bytes(b"torn")
        self.planted += 1

    def start_storm(self) -> None:
        self._spawn(self._storm)

    def start_prober(self) -> None:
        self._spawn(self._probe)

    def _spawn(self, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, daemon=True)
        self._threads.append(t)
        t.start()

    def finish(self) -> float:
        """Stop the storm (the daemon is left up), wait until it processed every
        change, close the last window, check every live file is pinned, stop it."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)
        if self.daemon is None:
            self.launch()
        assert self.daemon is not None
        self.daemon.sync(timeout=120)
        t_end = time.monotonic()
        self.windows[-1][1] = t_end
        for sid, key in live_keys(self.sdir).items():
            self.pin_checks += 1
            if not pin_matches(self.store, self.sdir, sid):
                self.missing_pins.append(f"at the end: {sid} {key}")
        self.daemon.assert_alive()
        self.daemon.stop()
        self.daemon = None
        return t_end

    def abort(self) -> None:
        self._stop.set()
        if self.daemon is not None and self.daemon.proc.poll() is None:
            self.daemon.kill()

    # -- threads --

    def _storm(self) -> None:
        plans = ["random", "after-shrink", "mid-capture"]
        while not self._stop.is_set():
            plan = self.rng.choice(plans)
            if self._stop.wait(self.rng.uniform(0.3, 2.0)):
                break
            if plan != "random" and not self._wait_trigger(plan, timeout=3.0):
                if self._stop.is_set():
                    break
                plan = "random"  # nothing to aim at: kill anyway
            self.kill(plan)
            self._stop.wait(self.rng.uniform(0.0, 1.0))  # writes land while it is down
            self.launch()  # always: the run ends with a daemon up

    def _wait_trigger(self, plan: str, timeout: float) -> bool:
        """Wait for a writer's shrink (after-shrink) or the daemon's capture log line (mid-capture)."""
        assert self.tail is not None
        self._new_journal_ops()
        self.tail.events()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if plan == "mid-capture":
                if any(e.get("event") == "session.shrunk" for e in self.tail.events()):
                    return True  # keep_pin done, the new pin is being written
            elif any(op.get("op") in LOSS_OPS for op in self._new_journal_ops()):
                time.sleep(self.rng.uniform(0, 0.02))  # while the daemon handles it
                return True
            time.sleep(0.002)
        return False

    def _new_journal_ops(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for path in self.journals.glob("*.jsonl"):
            out += self._journal_tails.setdefault(path, LogTail(path)).events()
        return out

    def _probe(self) -> None:
        """Queue lag as the daemon's own ``sync`` round trip, once a second."""
        while not self._stop.wait(1.0):
            d = self.daemon
            if d is None:
                continue
            t0 = time.monotonic()
            try:
                if d.call("sync", {"timeout": 30}, timeout=40)["synced"]:
                    self.lags.append(time.monotonic() - t0)
            except (OSError, ValueError, RuntimeError, KeyError):
                pass  # killed meanwhile

    def figures(self) -> dict[str, Any]:
        lags = sorted(self.lags)
        up = sum(b - a for a, b in self.windows)
        return {
            "daemon_kills": sum(self.kills.values()),
            "kills_by_plan": dict(self.kills),
            "daemon_restarts": self.launches - 1,
            "daemon_up_seconds": round(up, 1),
            "torn_tmp_left_by_kills": self.torn_tmp,
            "tmp_planted": self.planted,
            "tmp_after_restart": len(self.tmp_leftovers),
            "tmp_after_restart_files": sorted(self.tmp_leftovers)[:20],
            "sync_cookies_left_by_kills": len(self.cookies_left),
            "pin_checks": self.pin_checks,
            "missing_pins": len(self.missing_pins),
            "missing_pin_details": self.missing_pins[:20],
            "lag_p50_s": round(lags[len(lags) // 2], 3) if lags else None,
            "lag_max_s": round(lags[-1], 3) if lags else None,
            "lag_samples": len(lags),
        }


# -- a run -----------------------------------------------------------------------

@dataclass
class Plan:
    """What to run: one writer process per entry of *styles*, each with *sessions* sessions."""

    seconds: float = 25.0
    styles: tuple[str, ...] = STYLES
    sessions: int = 8
    daemon: bool = True
    kills: bool = False
    seed: int | None = None
    max_messages: int = 200
    settle: float = SETTLE_SECONDS
    progress_every: float = 0.0  # seconds between progress lines on stdout (0: none)


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


def save_run(r: Run) -> None:
    """What the oracle needs besides the journals and the disk: ``torture.py check`` reads it."""
    meta = {"plan": {**asdict(r.plan), "styles": list(r.plan.styles)}, "seed": r.seed, "t0": r.t0,
            "t_end": r.t_end, "wall_minus_mono": r.wall_minus_mono, "windows": r.windows,
            "supervisor": r.supervisor}
    (r.workdir / "run.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))


def load_run(workdir: Path) -> Run:
    meta = orjson.loads((workdir / "run.json").read_bytes())
    plan = Plan(**{**meta["plan"], "styles": tuple(meta["plan"]["styles"])})
    sdir = workdir / "sessions"
    return Run(plan, meta["seed"], workdir, sdir, sdir / ".sessionguard", workdir / "journals", meta["t0"],
               meta["t_end"], meta["wall_minus_mono"], meta["windows"], meta["supervisor"])


def _write_config(path: Path, sdir: Path) -> None:
    path.write_text(
        "[daemon]\nreconcile_interval = 1\n\n"
        f"[[watch]]\npath = \"{sdir}\"\nkeep_last = {NO_RETENTION}\n"
    )


def _spawn_writer(run: Run, i: int, style: str, sids: list[str], seed: int) -> subprocess.Popen[bytes]:
    name = f"w{i}-{style}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "writer", "--name", name, "--style", style,
           "--dir", str(run.sdir), "--outside", str(run.workdir / "outside"),
           "--journal", str(run.journals / f"{name}.jsonl"), "--sids", ",".join(sids), "--seed", str(seed),
           "--max-messages", str(run.plan.max_messages), "--until", str(time.monotonic() + run.plan.seconds + 300)]
    with open(run.workdir / f"{name}.err", "wb") as err:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


def _wait(r: Run, sup: Supervisor | None, plan: Plan) -> None:
    """Let the writers run for the planned time, with a progress line now and then."""
    end = r.t0 + plan.seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, plan.progress_every or left))
        if plan.progress_every and time.monotonic() < end:
            ops = sum(len(p.read_bytes().splitlines()) for p in r.journals.glob("*.jsonl"))
            kills = sum(sup.kills.values()) if sup else 0
            print(f"torture: {time.monotonic() - r.t0:6.0f} s: {ops} operations, {kills} daemon kills", flush=True)


def run(plan: Plan, workdir: Path) -> Run:
    """Writers (and the daemon) for *plan.seconds*; returns what the oracle needs."""
    seed = plan.seed if plan.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    sdir = workdir / "sessions"
    r = Run(plan, seed, workdir, sdir, sdir / ".sessionguard", workdir / "journals")
    for d in (sdir, workdir / "outside", r.journals):
        d.mkdir(parents=True)
    config = workdir / "sessionguardd.toml"
    _write_config(config, sdir)
    sup = Supervisor(workdir, sdir, r.store, r.journals, config, random.Random(rng.random())) if plan.daemon else None
    writers: list[subprocess.Popen[bytes]] = []
    try:
        if sup is not None:
            sup.launch()
            sup.start_prober()
            if plan.kills:
                sup.start_storm()
        r.wall_minus_mono = time.time() - time.monotonic()
        r.t0 = time.monotonic()
        for i, style in enumerate(plan.styles):
            sids = [f"{i:02d}{style[:3]}{k:04d}{rng.randrange(16**3):03x}" for k in range(plan.sessions)]
            writers.append(_spawn_writer(r, i, style, sids, rng.randrange(2**32)))
        _wait(r, sup, plan)
        for w in writers:
            w.send_signal(signal.SIGTERM)
        for i, w in enumerate(writers):
            if w.wait(timeout=60) != 0:
                err = (workdir / f"w{i}-{plan.styles[i]}.err").read_text(errors="replace")
                raise RuntimeError(f"writer {i} ({plan.styles[i]}) failed ({w.returncode}):\n{err}")
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


# -- the oracle ------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    w: str
    sid: str
    op: str
    style: str
    sha: str | None
    count: int | None
    revs: list[list[int]] | None
    t_start: float
    t_end: float


def load_journals(journals: Path) -> dict[str, list[Op]]:
    """Every operation of every writer, per session, in the order it happened."""
    ops: dict[str, list[Op]] = defaultdict(list)
    for path in sorted(journals.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            if line.strip():
                op = Op(**orjson.loads(line))
                ops[op.sid].append(op)
    for history in ops.values():
        history.sort(key=lambda o: o.t_start)
    return ops


@dataclass
class OnDisk:
    """What one session has on disk: sha256 → paths, and the messages each file holds."""

    paths: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    conversations: set[tuple[int, ...]] = field(default_factory=set)

    def add(self, path: Path) -> None:
        data = path.read_bytes()
        self.paths[hashlib.sha256(data).hexdigest()].append(str(path))
        try:
            self.conversations.add(tuple(_revs(orjson.loads(data)["messages"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            pass  # unparseable: holds no conversation

    def holds_messages_of(self, op: Op) -> bool:
        """Does one file hold every message of *op*'s version (the same or a longer conversation)?"""
        want = tuple(_unrle(op.revs or []))
        return any(c[: len(want)] == want for c in self.conversations)


def copies_on_disk(run: Run) -> dict[str, OnDisk]:
    """Every file of every session's store folder, and its live file, hashed and parsed here.

    Nothing the daemon says about its store is trusted.
    """
    out: dict[str, OnDisk] = defaultdict(OnDisk)
    root = run.store / "sessions"
    if root.is_dir():
        for sdir in root.iterdir():
            for name in os.listdir(sdir):
                path = sdir / name
                if TMP_MARK in name or path.is_symlink() or not path.is_file():
                    continue
                out[sdir.name].add(path)
    pins = run.store / "pins"
    if pins.is_dir():
        for path in pins.iterdir():
            if TMP_MARK not in path.name and path.is_file() and not path.is_symlink():
                out[path.name].add(path)
    for sid in live_keys(run.sdir):
        try:
            out[sid].add(run.sdir / f"{sid}.json")
        except FileNotFoundError:
            continue
    return out


def overlap(a: float, b: float, windows: list[list[float]]) -> float:
    """Seconds of [a, b] during which the daemon was up."""
    return sum(max(0.0, min(b, hi) - max(a, lo)) for lo, hi in windows)


def _kind(path: str) -> str:
    name = os.path.basename(path)
    if name.endswith(".version"):
        return "version"
    return "pin" if os.path.basename(os.path.dirname(path)) == "pins" else "live"


def _loses(before: Op, after: Op) -> bool:
    """Does *after* leave fewer messages than *before* had (deleted and corrupt count as none)?"""
    return after.count is None or before.count is None or after.count < before.count


def check(run: Run) -> dict[str, Any]:
    """The oracle: figures of the run, and every version that should be recoverable and is not.

    Version *v* (a write with at least one message) is **expected** when

    * it was followed by a loss (a delete, a corrupt write, or fewer messages;
      intended truncates included);
    * it stayed on disk at least the settle time while the daemon was up —
      so the daemon had the time to read it; and
    * the loss stayed at least the settle time while the daemon was up, from
      the loss until a write gave the session as many messages as *v* again —
      so the daemon had the time to see it. A loss undone sooner is **hidden**
      (counted apart): a watcher that compares message counts cannot see it.

    For the library every version followed by a loss is expected: it keeps the
    prior version itself, at save time. Recoverable means the exact bytes are
    in the session's store folder (a version or its pin) or live.
    """
    settle = run.plan.settle
    history = load_journals(run.journals)
    disk = copies_on_disk(run)
    ops: Counter[str] = Counter()
    f: Counter[str] = Counter()
    by_style: dict[str, Counter[str]] = defaultdict(Counter)
    found_as: Counter[str] = Counter()
    lost: list[dict[str, Any]] = []
    hidden_lost: list[dict[str, Any]] = []
    expected_items: list[dict[str, Any]] = []
    hw_lost: list[str] = []
    for sid, hist in sorted(history.items()):
        style = hist[0].style
        library = style == "library"
        on_disk = disk.get(sid, OnDisk())
        eligible_hw = absolute_hw = recoverable_hw = 0
        for i, op in enumerate(hist):
            ops[op.op] += 1
            if op.count is None or op.count < 1:
                continue
            f["versions_written"] += 1
            nxt = hist[i + 1] if i + 1 < len(hist) else None
            up = overlap(op.t_end, nxt.t_start if nxt else run.t_end, run.windows)
            eligible = library or up >= settle
            paths = on_disk.paths.get(op.sha or "", [])
            if paths:
                f["versions_recoverable"] += 1
                recoverable_hw = max(recoverable_hw, op.count)
            absolute_hw = max(absolute_hw, op.count)
            eligible_hw = max(eligible_hw, op.count if eligible else 0)
            if nxt is None or not _loses(op, nxt):
                continue
            f["shrinks"] += 1
            by_style[style]["shrinks"] += 1
            if not eligible:
                f["shrinks_of_unsettled_versions"] += 1  # replaced too soon (or daemon down): nothing promised
                continue
            healed = next((o for o in hist[i + 2:] if not _loses(op, o)), None)
            loss_up = overlap(nxt.t_end, healed.t_start if healed else run.t_end, run.windows)
            if not (library or loss_up >= settle):
                f["hidden"] += 1
                if paths:
                    f["hidden_kept"] += 1
                elif on_disk.holds_messages_of(op):
                    f["hidden_in_a_longer_file"] += 1
                else:
                    f["hidden_messages_lost_daemon_up" if loss_up > 0 else "hidden_messages_lost_daemon_down"] += 1
                    detail = _lost_detail(run, sid, hist, i, up)
                    assert healed is not None  # a loss left in place to the end is seen by the final sync
                    detail["undone"] = (f"{nxt.op} at {nxt.t_start - run.t0:.3f}, undone by {healed.op} "
                                        f"({healed.count} msgs) {1000 * (healed.t_start - nxt.t_end):.0f} ms "
                                        f"later; daemon up {1000 * loss_up:.0f} ms of that")
                    hidden_lost.append(detail)
                continue
            f["expected"] += 1
            by_style[style]["expected"] += 1
            if nxt.t_start - op.t_end < settle:
                f["expected_unsettled"] += 1  # on disk less than the settle time (library only)
            expected_items.append({"sid": sid, "sha": op.sha, "count": op.count, "paths": paths})
            if paths:
                f["found"] += 1
                by_style[style]["found"] += 1
                found_as[min((_kind(p) for p in paths), key=("version", "pin", "live").index)] += 1
            else:
                lost.append(_lost_detail(run, sid, hist, i, up, on_disk.holds_messages_of(op)))
        if eligible_hw:
            f["high_water_required"] += 1
            if recoverable_hw >= eligible_hw:
                f["high_water_recoverable"] += 1
            else:
                hw_lost.append(f"{sid}: high water {eligible_hw} msgs, best recoverable {recoverable_hw}")
        if absolute_hw:
            f["sessions_with_versions"] += 1
            f["absolute_high_water_recoverable"] += recoverable_hw >= absolute_hw
    live_bytes = sum(k[2] for k in live_keys(run.sdir).values())
    usage = store_usage(run.store) if run.store.is_dir() else {"store_files": 0, "store_versions": 0,
                                                                "store_pins": 0, "store_bytes": 0}
    return {
        "seed": run.seed,
        "duration_s": round(run.t_end - run.t0, 1),
        "writers": len(run.plan.styles),
        "styles": ",".join(run.plan.styles),
        "sessions": len(history),
        "operations": sum(ops.values()),
        "ops_by_type": dict(sorted(ops.items())),
        "versions_written": f["versions_written"],
        "shrinks": f["shrinks"],
        "shrinks_of_unsettled_versions": f["shrinks_of_unsettled_versions"],
        "expected": f["expected"],
        "expected_unsettled": f["expected_unsettled"],
        "found": f["found"],
        "found_as": dict(found_as),
        "lost": len(lost),
        "by_style": {s: {k: by_style[s][k] for k in ("shrinks", "expected", "found")} for s in sorted(by_style)},
        "hidden": f["hidden"],
        "hidden_kept": f["hidden_kept"],
        "hidden_in_a_longer_file": f["hidden_in_a_longer_file"],
        "hidden_messages_lost": len(hidden_lost),
        "hidden_messages_lost_daemon_up": f["hidden_messages_lost_daemon_up"],
        "hidden_messages_lost_daemon_down": f["hidden_messages_lost_daemon_down"],
        "high_water_required": f["high_water_required"],
        "high_water_recoverable": f["high_water_recoverable"],
        "high_water_lost": len(hw_lost),
        "sessions_with_versions": f["sessions_with_versions"],
        "absolute_high_water_recoverable": f["absolute_high_water_recoverable"],
        "versions_recoverable": f["versions_recoverable"],
        **run.supervisor,
        **usage,
        "live_bytes": live_bytes,
        "store_over_live": round(usage["store_bytes"] / live_bytes, 1) if live_bytes else None,
        "lost_details": lost,
        "hidden_lost_details": hidden_lost,
        "high_water_details": hw_lost,
        "expected_items": expected_items,
    }


def _lost_detail(run: Run, sid: str, hist: list[Op], i: int, up: float,
                 messages_elsewhere: bool = False) -> dict[str, Any]:
    """Everything needed to find which event or decision lost the version."""
    def rel(t: float) -> float:
        return round(t - run.t0, 3)

    op = hist[i]
    around = [f"{'>' if j == i else ' '} {rel(o.t_start)}..{rel(o.t_end)} {o.op} count={o.count} "
              f"sha={(o.sha or '-')[:12]}" for j, o in enumerate(hist) if abs(j - i) <= 3]
    events = []
    for log in sorted(run.workdir.glob("daemon-*.log")):
        for line in log.read_bytes().splitlines():
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if ev.get("sid") == sid:
                try:
                    mono = datetime.fromisoformat(ev["timestamp"]).timestamp() - run.wall_minus_mono
                except (KeyError, ValueError):
                    continue
                if op.t_start - 5 <= mono <= hist[min(i + 1, len(hist) - 1)].t_end + 5:
                    keep = {k: ev[k] for k in ("event", "reason", "before", "after", "count", "version", "class")
                            if k in ev}
                    events.append(f"{rel(mono)} {log.name}: {keep}")
    windows = [f"{rel(a)}..{rel(b)}" for a, b in run.windows if b >= op.t_start - 5 and a <= op.t_end + 30]
    return {"sid": sid, "style": op.style, "count": op.count, "sha": op.sha, "up_seconds": round(up, 3),
            "messages_in_a_longer_file": messages_elsewhere, "journal": around, "daemon_log": events,
            "up_windows": windows}


FAILURE_KEYS = ("lost", "high_water_lost", "tmp_after_restart", "missing_pins")


def failures(figs: dict[str, Any]) -> list[str]:
    return [f"{k}={figs[k]}" for k in FAILURE_KEYS if figs.get(k)]


def describe(figs: dict[str, Any], details: bool = True) -> str:
    """The figures as text (and what went wrong, in detail)."""
    skip = {"lost_details", "hidden_lost_details", "high_water_details", "expected_items", "missing_pin_details",
            "tmp_after_restart_files"}
    lines = [f"  {k:34} {v}" for k, v in figs.items() if k not in skip]
    if details:
        for d in figs.get("lost_details", [])[:10] + figs.get("hidden_lost_details", [])[:5]:
            what = "LOST" if d in figs.get("lost_details", []) else "HIDDEN LOSS (messages gone)"
            lines.append(f"{what} {d['sid']} ({d['style']}) {d['count']} msgs sha {str(d['sha'])[:12]} "
                         f"up {d['up_seconds']} s; windows {d['up_windows']}")
            if "undone" in d:
                lines.append(f"    {d['undone']}")
            lines += [f"    {x}" for x in d["journal"]]
            lines += [f"    {x}" for x in d["daemon_log"]]
        for k in ("high_water_details", "missing_pin_details", "tmp_after_restart_files"):
            lines += [f"{k}: {x}" for x in figs.get(k, [])]
    return "\n".join(lines)


def run_and_check(plan: Plan, workdir: Path) -> dict[str, Any]:
    return check(run(plan, workdir))


# -- command line ----------------------------------------------------------------

def _writer_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="torture.py writer")
    p.add_argument("--name", required=True)
    p.add_argument("--style", choices=STYLES, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--outside", required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--sids", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--max-messages", type=int, default=200)
    p.add_argument("--until", type=float, required=True, help="CLOCK_MONOTONIC deadline (a safety net)")
    Writer(p.parse_args(argv)).run()
    return 0


def _run_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="torture.py run", description="Writers, the daemon (SIGKILLed and "
                                "restarted unless --no-kills) and the oracle; exit 1 if anything is lost.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, help="how long the writers run (default 30)")
    g.add_argument("--seconds", type=float, help="the same in seconds")
    p.add_argument("--styles", default=",".join(STYLES), help="one writer per entry (default: %(default)s)")
    p.add_argument("--sessions", type=int, default=8, help="sessions per writer (default: %(default)s)")
    p.add_argument("--no-kills", action="store_true", help="never SIGKILL the daemon")
    p.add_argument("--no-daemon", action="store_true", help="no daemon at all (library writers only)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-messages", type=int, default=200)
    p.add_argument("--workdir", help="where to run (default: a new directory under $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work directory even if nothing was lost")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else 60 * (a.minutes if a.minutes is not None else 30)
    styles = tuple(s for s in a.styles.split(",") if s)
    if not set(styles) <= set(STYLES) or (a.no_daemon and set(styles) != {"library"}):
        p.error(f"--styles: each of {', '.join(STYLES)}; only library with --no-daemon")
    plan = Plan(seconds=seconds, styles=styles, sessions=a.sessions, daemon=not a.no_daemon,
                kills=not (a.no_kills or a.no_daemon), seed=a.seed, max_messages=a.max_messages,
                progress_every=60.0)
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
    if argv[:1] == ["writer"]:
        return _writer_main(argv[1:])
    if argv[:1] == ["run"]:
        return _run_main(argv[1:])
    if argv[:1] == ["check"]:
        return _check_main(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

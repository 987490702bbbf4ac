"""The daemon side of the oracle ("torture") run: start the real sessionguardd, kill it, check what it left.

The supervisor records when the daemon was up (the oracle's promise holds
only then), SIGKILLs it in storms (at random, right after a writer's shrink,
right after the daemon logged a capture) and in the middle of start-up
scans, and after every kill checks the disk itself: no tmp file of a killed
daemon left once the next one is up, every file unchanged across the restart
pinned with exactly its bytes, ``pins.cache`` absent or true, and a session
pinned by a killed scan and wiped while no daemon ran still recoverable.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemonproc import DaemonProc
from torture_disk import (
    TMP_MARK,
    LogTail,
    StatKey,
    check_cache,
    cookies_of,
    live_keys,
    pin_matches,
    session_bytes,
    tmp_files,
)
from torture_plan import Run
from torture_writers import LOSS_OPS, wipe_filler

#: A start-up scan's progress line (daemon.Daemon._progress) and the extension that must come with it.
_PROGRESS = re.compile(r"STATUS=scanning .*: ([\d,]+) of ([\d,]+) files")
_EXTEND = "EXTEND_TIMEOUT_USEC="
#: Filler sessions wiped after each first-scan kill, among those the killed scan had pinned.
WIPES_PER_SCAN_KILL = 3


class NotifySocket:
    """What the daemon tells systemd (``NOTIFY_SOCKET``), caught as systemd would catch it."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []  # (CLOCK_MONOTONIC when read, datagram)

    def drain(self) -> list[tuple[float, str]]:
        with contextlib.suppress(BlockingIOError):
            while True:
                data = self.sock.recv(65536)
                self.messages.append((time.monotonic(), data.decode(errors="replace")))
        return self.messages

    def progress(self) -> list[tuple[float, int, int, bool]]:
        """``(when, files done, files in all, EXTEND_TIMEOUT_USEC= sent with it)`` of every progress report."""
        out = []
        for when, msg in self.drain():
            m = _PROGRESS.search(msg)
            if m:
                out.append((when, int(m[1].replace(",", "")), int(m[2].replace(",", "")), _EXTEND in msg))
        return out

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Supervisor:
    """Runs the real sessionguardd and records when it was up.

    An up-window opens when ``daemon.started`` is seen in the log (the daemon
    logs it after the start-up scan pinned every file; seen a little later
    than written, so the window is if anything too short) and closes just
    before the SIGKILL. A daemon killed during its start-up scan was never up.
    """

    def __init__(self, r: Run, config: Path, rng: random.Random) -> None:
        self.workdir, self.sdir, self.store, self.journals = r.workdir, r.sdir, r.store, r.journals
        self.config = config
        self.rng = rng
        self.windows: list[list[float]] = []
        self.daemon: DaemonProc | None = None
        self.tail: LogTail | None = None
        self.killed_pids: set[int] = set()
        self.kills: Counter[str] = Counter()
        self.launches = 0
        self.torn_tmp = 0          # tmp files a kill left behind (to be swept at restart)
        self.planted: Counter[str] = Counter()  # … and more planted after each kill, by place
        self.tmp_leftovers: set[str] = set()  # … still there once the next daemon was up: must stay empty
        self.cookies_left: set[str] = set()
        self.pin_checks = 0
        self.missing_pins: list[str] = []
        self.lags: list[float] = []
        self.scan_kill_points: list[float] = []  # share of the filler pinned when each scan was killed
        self.scan_reports: list[tuple[float, int, int, bool]] = []
        self.cache: Counter[str] = Counter()
        self.cache_wrong: list[str] = []
        self.pinned_then_wiped: list[list[str]] = []  # [sid, sha256 of the pin a killed scan left]
        self.scan_children: list[int] = []  # the scan processes each ended scan had (scanpool)
        self.scan_children_outlived: list[int] = []  # … still running 10 s after it ended: must stay empty
        self._before_kill: dict[str, StatKey] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._journal_tails: dict[Path, LogTail] = {}

    # -- lifecycle --

    def _spawn_daemon(self, env: dict[str, str] | None = None) -> tuple[DaemonProc, LogTail]:
        # two scan processes whatever the CPUs (the default follows them): kills land among them too
        d = DaemonProc(self.workdir, ["--config", str(self.config), "--reconcile-interval", "1",
                                      "--scan-processes", "2"], env=env)
        return d, LogTail(d.logfile)

    def launch(self) -> None:
        """Start a daemon and wait for ``daemon.started``; after a kill, check what it left."""
        d, tail = self._spawn_daemon()
        deadline = time.monotonic() + 120
        seen: list[dict[str, Any]] = []
        while not any(e.get("event") == "daemon.started" for e in seen):
            self._alive_until(d, deadline, "start")
            time.sleep(0.005)
            seen += tail.events()
        self._up(d, tail, seen)

    @staticmethod
    def _alive_until(d: DaemonProc, deadline: float, what: str) -> None:
        if d.proc.poll() is not None:
            raise RuntimeError(f"sessionguardd exited ({d.proc.returncode}) before it could {what}:\n{d.text()}")
        if time.monotonic() > deadline:
            d.kill()
            raise RuntimeError(f"sessionguardd did not {what} in time:\n{d.text()}")

    def _up(self, d: DaemonProc, tail: LogTail, seen: list[dict[str, Any]]) -> None:
        self.windows.append([time.monotonic(), float("nan")])
        self.daemon, self.tail = d, tail
        self.launches += 1
        if self.killed_pids:
            self._check_restart(d, tail, seen)

    def _swept(self, d: DaemonProc, tail: LogTail, seen: list[dict[str, Any]]) -> None:
        """Wait for the store's leftovers sweep, which maintenance makes a second after READY."""
        deadline = time.monotonic() + 60
        while not any(e.get("event") == "store.swept" for e in seen):
            self._alive_until(d, deadline, "sweep the store")
            time.sleep(0.005)
            seen = tail.events()

    def _check_restart(self, d: DaemonProc, tail: LogTail, seen: list[dict[str, Any]]) -> None:
        """The start-up scan is done: no tmp file of a killed daemon in the directory (the
        scan swept them), and every file unchanged since before the kill is pinned exactly
        as it is; once maintenance swept the store, no tmp file of a killed daemon there."""
        store = os.path.realpath(self.store) + os.sep  # the store is in the directory: checked below
        self.tmp_leftovers.update(p for p in tmp_files([self.sdir], self.killed_pids) if not p.startswith(store))
        self.cookies_left.update(cookies_of(self.sdir, self.killed_pids))
        now = live_keys(self.sdir)
        matched = {sid for sid in now if pin_matches(self.store, self.sdir, sid)}
        again = live_keys(self.sdir)
        for sid, key in now.items():
            if self._before_kill.get(sid) == key == again.get(sid):
                self.pin_checks += 1
                if sid not in matched:
                    self.missing_pins.append(f"after restart {self.launches - 1}: {sid} {key}")
        self._swept(d, tail, seen)
        self.tmp_leftovers.update(tmp_files([self.store], self.killed_pids))

    def kill(self, plan: str) -> None:
        d = self.daemon
        assert d is not None
        self._before_kill = live_keys(self.sdir)
        self.windows[-1][1] = time.monotonic()  # closed before the signal: never too long
        self.daemon = None
        self._killed(d, plan)

    def _killed(self, d: DaemonProc, plan: str) -> None:
        d.kill()
        self._after_kill(d.proc.pid, plan)

    def _after_kill(self, pid: int, plan: str) -> None:
        self.killed_pids.add(pid)
        self.kills[plan] += 1
        self.torn_tmp += len(tmp_files([self.store, self.sdir], {pid}))
        self._plant_tmp(pid)
        self._check_cache("after_kill")

    def _plant_tmp(self, pid: int) -> None:
        """Leave tmp files as a kill mid-write would (named by fsutil.tmp_name's rule) in every
        place the daemon writes one — pins/, a version folder, the store root, the session
        directory — so every restart has them to sweep even when no kill landed mid-write."""
        folders = [p for p in (self.store / "sessions").iterdir() if p.is_dir()]
        places = {"pins": self.store / "pins", "store": self.store, "session_dir": self.sdir}
        if folders:
            places["version_folder"] = self.rng.choice(folders)
        for place, where in places.items():
            (where / f".{place}.planted{TMP_MARK}{pid}-{self.rng.randrange(16**8):08x}").write_bytes(b"torn")
            self.planted[place] += 1

    def _check_cache(self, when: str) -> None:
        c = check_cache(self.store, self.sdir)
        self.cache[f"checks_{when}"] += 1
        self.cache[f"present_{when}"] += c["present"]
        self.cache[f"believed_{when}"] += c["believed"]
        self.cache["pin_moved"] += c["pin_moved"]
        self.cache_wrong += [f"{when}: {w}" for w in c["wrong"]]

    # -- kills during a start-up scan --

    def first_scan_storm(self, kills: int, filler: list[str]) -> None:
        """End *kills* daemons in the middle of their start-up scan over *filler* (each at a
        random moment of it), as a power cut, systemd's start timeout or a stop would; between
        kills, wipe a few sessions the killed scan had pinned. The next start that finishes
        is checked like any restart; the wiped sessions' pinned bytes must be kept."""
        # seconds, replaced by each scan seen to finish. Short on purpose: a first scan with
        # its processes runs ~0.1 ms a file here, and an estimate too short only lands a kill
        # earlier in the scan, where one too long lands it after (and the next start, with
        # every session pinned, has no first scan left to kill)
        estimate = max(1.0, len(filler) * 0.00005)
        for _ in range(4 * kills):
            if self.scan_kills() >= kills:
                return
            estimate = self._first_scan_attempt(filler, estimate)
        raise RuntimeError(f"only {self.scan_kills()} of {kills} kills landed during a scan")

    def scan_kills(self) -> int:
        """Daemons ended (SIGKILL or SIGTERM) while their start-up scan ran."""
        return self.kills["first-scan"] + self.kills["first-scan-stop"]

    def _first_scan_attempt(self, filler: list[str], estimate: float) -> float:
        """One start killed at a random point of its scan (a random share of its files done, as
        the daemon's own progress reports project it); returns the scan-time estimate."""
        notify = NotifySocket(self.workdir / f"notify-{self.launches}-{sum(self.kills.values())}.sock")
        try:
            d, tail = self._spawn_daemon({"NOTIFY_SOCKET": str(notify.path)})
            deadline = time.monotonic() + 120
            while not any(m.startswith("STATUS=scanning") for _, m in notify.drain()):
                self._alive_until(d, deadline, "begin its scan")
                time.sleep(0.005)
            began, share = time.monotonic(), self.rng.uniform(0.05, 0.95)
            seen: list[dict[str, Any]] = []
            while not any(e.get("event") == "daemon.started" for e in seen):
                reports = notify.progress()
                if reports:  # the scan's length projected from how far it got, and when
                    when, done_files, total, _ = reports[-1]
                    estimate = (when - began) * total / done_files
                if time.monotonic() >= began + share * estimate:
                    break
                self._alive_until(d, deadline, "scan")
                seen += tail.events()
                time.sleep(0.002)
            self._before_kill = live_keys(self.sdir)
            done = next((e for e in seen if e.get("event") == "scan.completed"), None)
            self.scan_reports += notify.progress()
        finally:
            notify.close()
        if done is not None:  # the scan won the race: an ordinary start, killed after it
            while not any(e.get("event") == "daemon.started" for e in seen):
                self._alive_until(d, deadline, "start")
                seen += tail.events()
                time.sleep(0.005)
            self._up(d, tail, seen)
            self.kill("first-scan-missed")
            return max(1.0, 1.1 * float(done["duration_ms"]) / 1000)
        plan, during = self._interrupt(d)
        self._after_kill(d.proc.pid, plan)
        if during:
            self._after_scan_kill(filler)
        return estimate

    def _interrupt(self, d: DaemonProc) -> tuple[str, bool]:
        """SIGKILL the scanning daemon — or, one time in three, SIGTERM it (``systemctl stop``, or
        the start timeout's first signal), which ends the scan where it is. Returns the kill's
        plan and whether the scan was still running (the log, read once the daemon is gone, says)."""
        children = children_of(d.proc.pid)
        try:
            if self.rng.random() < 1 / 3:
                d.signal(signal.SIGTERM)
                d.stop(timeout=120)
                during = bool(d.events("scan.abandoned"))
                return ("first-scan-stop" if during else "first-scan-stop-late"), during
            d.kill()
            during = not d.events("scan.completed")
            return ("first-scan" if during else "first-scan-late"), during
        finally:
            self.scan_children.append(len(children))
            self.scan_children_outlived += outliving(children, 10)

    def _after_scan_kill(self, filler: list[str]) -> None:
        """How far the killed scan got, and a few of the sessions it pinned wiped while no daemon runs."""
        pinned = [sid for sid in filler if pin_matches(self.store, self.sdir, sid)]
        self.scan_kill_points.append(round(len(pinned) / max(len(filler), 1), 3))
        wiped = {sid for sid, _ in self.pinned_then_wiped}
        for sid in self.rng.sample([s for s in pinned if s not in wiped], min(WIPES_PER_SCAN_KILL, len(pinned))):
            pin = session_bytes((self.store / "pins" / sid).read_bytes())
            wipe_filler(self.sdir / f"{sid}.json")
            self.pinned_then_wiped.append([sid, hashlib.sha256(pin).hexdigest()])

    # -- storms and probes --

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
        change, close the last window, check every live file is pinned, stop it
        cleanly and check the ``pins.cache`` it leaves."""
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
        self._check_cache("clean_stop")
        return t_end

    def abort(self) -> None:
        self._stop.set()
        if self.daemon is not None and self.daemon.proc.poll() is None:
            self.daemon.kill()

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
                    return True  # the version is kept, the new pin is being written
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
            "tmp_planted": sum(self.planted.values()),
            "tmp_planted_by_place": dict(self.planted),
            "tmp_after_restart": len(self.tmp_leftovers),
            "tmp_after_restart_files": sorted(self.tmp_leftovers)[:20],
            "sync_cookies_left_by_kills": len(self.cookies_left),
            "pin_checks": self.pin_checks,
            "missing_pins": len(self.missing_pins),
            "missing_pin_details": self.missing_pins[:20],
            "scan_kills": self.scan_kills(),
            "scan_stops": self.kills["first-scan-stop"],
            "scan_kill_points": self.scan_kill_points,
            "scan_children_at_kill": self.scan_children,
            "scan_children_outlived": self.scan_children_outlived,
            "scan_progress_reports": len(self.scan_reports),
            "scan_reports_without_extend": sum(not extend for *_, extend in self.scan_reports),
            "cache": dict(self.cache),
            "cache_wrong": len(self.cache_wrong),
            "cache_wrong_details": self.cache_wrong[:20],
            "pinned_then_wiped": self.pinned_then_wiped,
            "lag_p50_s": round(lags[len(lags) // 2], 3) if lags else None,
            "lag_max_s": round(lags[-1], 3) if lags else None,
            "lag_samples": len(lags),
        }


def children_of(pid: int) -> list[int]:
    """The live child processes of *pid* (every thread's), from ``/proc``."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def outliving(pids: list[int], seconds: float) -> list[int]:
    """Those of *pids* still running (not gone, not a zombie) after up to *seconds*."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(pid)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)

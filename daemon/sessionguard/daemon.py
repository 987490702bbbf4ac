"""``sessionguardd``: wires config, logging, the watches, the control socket and systemd.

Threads: the main thread handles signals, sd_notify and watchdog pings; the
watcher's worker evaluates changed files; the maintenance thread runs
checks, rescans and reconciliations; the control server runs its own loop.
The daemon owns :class:`~sessionguard.stats.Stats`, so a reload (SIGHUP)
keeps every counter and every degraded state. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from . import __version__, config, fsutil, passes, paths, systemd
from . import log as logconf
from .config import Config
from .errors import ConfigError, StoreError
from .scanpool import processes_for
from .service import Service
from .stats import Stats
from .supervisor import CHECK_SECONDS, Supervisor
from .tracker import Tracker
from .watch import Watcher, name_os_thread
from .watchstate import WatchState

#: A lock held by another process for longer than this makes the watch degraded.
LOCK_DEGRADED_SECONDS = 10.0
#: While the initial scan makes progress, systemd's start timeout is pushed this far
#: ahead (µs), at most every PROGRESS_SECONDS.
EXTEND_USEC = 30_000_000
PROGRESS_SECONDS = 2.0


class Daemon:
    """One running sessionguardd."""

    def __init__(self, cfg: Config, log: Any) -> None:
        self.cfg, self.log = cfg, log
        self.started = time.time()
        self.stats = Stats(log)
        self._wake = threading.Event()
        self._stopping = False
        self._reload = False
        self._metrics_error: str | None = None
        self._scanning = ""
        self._last_progress = 0.0
        self.control: Any = None
        self._build()

    # -- the watching machinery (rebuilt on reload; Stats survives) ------------------------

    def _build(self) -> None:
        self.tracker = Tracker([WatchState(w) for w in self.cfg.watches], self.stats, self.log)
        self.watcher = Watcher(self.tracker, self.log, self._on_overflow)
        self.supervisor = Supervisor(self.tracker, self.watcher, self.stats, self.log,
                                     reconcile_interval=self.cfg.reconcile_interval, progress=self._progress,
                                     scan_processes=processes_for(self.cfg.scan_processes),
                                     stopping=lambda: self._stopping or self._maint_stop.is_set())
        self.service = Service(tracker=self.tracker, watcher=self.watcher, supervisor=self.supervisor,
                               stats=self.stats, log=self.log,
                               restore_recent_seconds=getattr(self.cfg, "restore_recent_seconds", 60.0),
                               started=self.started)
        self._rescan = threading.Event()
        self._maint_stop = threading.Event()
        self._maint = threading.Thread(target=self._maintain, name="sessionguard-maint", daemon=True)

    def _start_watching(self) -> None:
        """Watch and scan every directory (pins in place), then start maintenance."""
        self.watcher.start()
        total = len(self.tracker.watches)
        gc.disable()  # see _settle_heap
        try:
            for i, ws in enumerate(self.tracker.watches, 1):
                if self._stopping:
                    break
                self._scanning = f"{ws.root} ({i} of {total} watches)"
                systemd.notify(f"STATUS=scanning {self._scanning}", f"EXTEND_TIMEOUT_USEC={EXTEND_USEC}")
                self.supervisor.bring_up(ws, initial=True)
        finally:
            _settle_heap()
        self._maint.start()

    def _progress(self, done: int, total: int) -> None:
        """During the initial scan: say how far it is, and ask systemd for more time — only
        while files are being done, so a scan that hangs still meets the start timeout."""
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_SECONDS:
            return
        self._last_progress = now
        systemd.notify(f"STATUS=scanning {self._scanning}: {done:,} of {total:,} files",
                       f"EXTEND_TIMEOUT_USEC={EXTEND_USEC}")

    def _stop_watching(self) -> None:
        """Stop maintenance, then the watcher (which finishes the file in hand), then the stores."""
        self._maint_stop.set()
        self._rescan.set()
        if self._maint.is_alive():  # not started when a start-up fails (another daemon's store)
            self._maint.join(timeout=30)
        self.watcher.stop()
        for ws in self.tracker.watches:
            self.supervisor.stop(ws)

    def _start_control(self) -> None:
        from .control import ControlServer

        sock = systemd.activated_socket("control")
        if sock is None and not self.cfg.socket:
            self.stats.degrade("control", f"control socket unavailable: {paths.NO_DEFAULT_SOCKET}")
            self.log.error("control.failed", socket=None, error=paths.NO_DEFAULT_SOCKET)
            return
        try:
            self.control = ControlServer(self.service, path=None if sock else self.cfg.socket, sock=sock,
                                         read_group=self.cfg.read_group, admin_group=self.cfg.admin_group,
                                         logger=self.log)
            self.control.start()
        except OSError as exc:
            self.stats.degrade("control", f"control socket unavailable: {exc}")
            self.log.error("control.failed", socket=self.cfg.socket, error=str(exc))
            self.control = None

    def start(self) -> None:
        """Watch, scan every watched file (pins in place), then serve. READY comes after this."""
        self._start_watching()
        self._start_control()
        self.log.info("daemon.started", version=__version__, pid=os.getpid(), socket=self.cfg.socket,
                      config=self.cfg.source, watches=[self.supervisor.describe(ws) for ws in self.tracker.watches])

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            self.start()
        except StoreError as exc:  # another daemon serves a store: say so, start nothing
            self.log.error("daemon.failed", error=str(exc))
            print(f"sessionguardd: {exc}", file=sys.stderr)
            self._stop_watching()
            return 1
        if not self._stopping:  # a stop during the first scan ends it; never say READY then
            systemd.notify("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")
        ping = systemd.watchdog_interval()
        tick = min(1.0, ping / 2) if ping else 1.0
        last_status, was_healthy = 0.0, True
        while not self._stopping:
            self._wake.wait(tick)
            self._wake.clear()
            if self._reload and not self._stopping:
                self._reload = False
                self.reload()
            healthy, why = self.healthy(ping or 30.0)
            if ping and healthy:
                systemd.notify("WATCHDOG=1")
            if healthy != was_healthy:  # log transitions, not every tick
                was_healthy = healthy
                if healthy:
                    self.log.info("watchdog.resumed")
                else:
                    self.log.error("watchdog.withheld", why=why)
            if time.monotonic() - last_status >= 5:
                last_status = time.monotonic()
                systemd.notify(f"STATUS={self.status_line()}")
        self.shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stopping = True
        self._wake.set()

    def shutdown(self) -> None:
        systemd.notify("STOPPING=1", "STATUS=stopping")
        self.log.info("daemon.stopping", in_hand=self.watcher.in_hand, queued=len(self.watcher.queue))
        if self.control is not None:
            self.control.stop()
        self._stop_watching()
        self.log.info("daemon.stopped")

    def reload(self) -> None:
        """SIGHUP: re-read the config; on error keep running with the old one.

        Watches, intervals and ``log_level`` apply at once; keys that need a
        restart (the socket, the log format, the groups) are named in the log.
        """
        systemd.notify("RELOADING=1", "STATUS=reloading configuration")
        if self.cfg.source is None:
            self.log.info("config.reload_skipped", why="no config file: started from flags only")
            systemd.notify("READY=1", f"STATUS={self.status_line()}")
            return
        try:
            new = config.load_file(self.cfg.source)
        except ConfigError as exc:
            self.log.error("config.invalid", error=str(exc), action="kept the running configuration")
            systemd.notify("READY=1", f"STATUS={self.status_line()}")
            return
        restart = config.needs_restart(self.cfg, new)
        if restart:
            self.log.warning("config.needs_restart", keys=restart,
                             note="these keys keep their running values until the daemon is restarted")
        new = replace(new, socket=self.cfg.socket, log_format=self.cfg.log_format,
                      read_group=self.cfg.read_group, admin_group=self.cfg.admin_group)
        logconf.set_level(new.log_level)
        self._stop_watching()
        self.cfg = new
        self._build()
        if self.control is not None:
            self.control.backend = self.service
        self._start_watching()
        self.log.info("config.reloaded", watches=[self.supervisor.describe(ws) for ws in self.tracker.watches])
        systemd.notify("READY=1", f"STATUS={self.status_line()}")

    # -- maintenance ---------------------------------------------------------------------

    def _on_overflow(self) -> None:
        """Called on watchdog's inotify thread: events were lost, rescan everything."""
        self.stats.overflow()
        self.log.warning("watch.overflow", action="full rescan of every watch")
        self._rescan.set()

    def _maintain(self) -> None:
        """Every second: rescans after an overflow, directory and store checks, retries of
        sessions another process held locked; every ``reconcile_interval``: a reconciliation."""
        name_os_thread("sg-maintenance")
        self._next_reconcile = time.monotonic() + self.cfg.reconcile_interval
        orphans_due = True
        while not self._maint_stop.is_set():
            self._rescan.wait(CHECK_SECONDS)
            if self._maint_stop.is_set():
                break
            try:
                self._tick(orphans_due)
                orphans_due = False
            except Exception as exc:  # maintenance must keep running
                self.stats.bump("errors")
                self.log.exception("maintenance.error", error=str(exc))

    def _tick(self, orphans: bool) -> None:
        self.stats.bump("maintenance_passes")
        available = [ws for ws in self.tracker.watches if ws.available]
        if self._rescan.is_set():
            self._rescan.clear()
            for ws in available:
                waiting = self.watcher.pending_syncs(ws)
                if not passes.scan(self.tracker, ws, stop=self._maint_stop.is_set).get("abandoned"):
                    for done in waiting:
                        done.set()
            self._next_reconcile = time.monotonic() + self.cfg.reconcile_interval
        for ws in self.tracker.watches:
            self.supervisor.check(ws)
            if ws.available:
                self.supervisor.sweep_leftovers(ws)
                passes.retry_deferred(self.tracker, ws, LOCK_DEGRADED_SECONDS)
        if orphans:  # pins the daemon never knew (the library's): after READY, not before
            for ws in available:
                passes.orphans(self.tracker, ws)
        if time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + self.cfg.reconcile_interval
            for ws in self.tracker.watches:
                if ws.available:
                    passes.reconcile(self.tracker, ws)
            self._write_metrics_textfile()

    def healthy(self, stall_seconds: float) -> tuple[bool, str]:
        ok, why = self.watcher.healthy(stall_seconds)
        if ok and not self._maint.is_alive():
            return False, "maintenance thread died"
        return ok, why

    def status_line(self) -> str:
        s = self.stats.snapshot()
        tracked = sum(len(ws.files) for ws in self.tracker.watches)
        last = (f"last shrink {s.last_shrink[0]} ({s.last_shrink[2]})" if s.last_shrink else "no shrink seen")
        degraded = f"; DEGRADED: {', '.join(s.degraded.values())}" if s.degraded else ""
        return f"{tracked} sessions tracked, {s.versions_kept} versions kept, {last}{degraded}"

    def _write_metrics_textfile(self) -> None:
        """The metrics textfile; a failure is logged once per distinct error, not every pass."""
        path = self.cfg.metrics_textfile
        if not path:
            return
        from .metrics import render

        try:
            fd = fsutil.open_root(os.path.dirname(path))
            try:
                fsutil.write_file(fd, os.path.basename(path), render(self.stats.snapshot(),
                                                                     self.tracker.watches).encode(), mode=0o644)
            finally:
                os.close(fd)
        except OSError as exc:
            if self._metrics_error != str(exc):
                self._metrics_error = str(exc)
                self.log.warning("metrics.write_failed", path=path, error=str(exc))
            return
        if self._metrics_error is not None:
            self._metrics_error = None
            self.log.info("metrics.write_resumed", path=path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sessionguardd",
        description="Watch chat/agent session directories and keep the prior version of every "
                    "session that a write shrinks, makes unparseable, replaces or deletes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
With no arguments, watches {config.default_watch_dir()}
(hermes-webui's default; $HERMES_WEBUI_STATE_DIR/sessions when set), or the
watches in {config.DEFAULT_CONFIG_FILE} when that file exists.

examples:
  sessionguardd                                  # default directory
  sessionguardd --watch /srv/chat/sessions --watch /srv/agents/sessions
  sessionguardd --config /etc/sessionguard/sessionguard.toml --check-config

signals: SIGTERM/SIGINT stop cleanly (exit 0), SIGHUP reloads the config file.
exit codes: 0 stopped cleanly, 1 failed to start (e.g. another daemon serves the
store), 2 invalid configuration.
""",
    )
    p.add_argument("--version", action="version", version=f"sessionguardd {__version__}")
    p.add_argument("--config", metavar="FILE", help=f"TOML config (default: {config.DEFAULT_CONFIG_FILE} if present)")
    p.add_argument("--watch", metavar="DIR", action="append", help="session directory to watch (repeatable; "
                   "replaces the config file's watches)")
    p.add_argument("--socket", metavar="PATH", help="control socket (default: /run/sessionguard.sock as root, "
                   "else $XDG_RUNTIME_DIR/sessionguard.sock; never a path in /tmp)")
    p.add_argument("--pin", choices=config.PIN_METHODS,
                   help="pin method for every watch (default auto: reflink where possible, else copy; "
                        "zstd: compressed copies)")
    p.add_argument("--reconcile-interval", type=float, metavar="SECONDS",
                   help="seconds between stat-only reconciliation passes (default 30)")
    p.add_argument("--scan-processes", type=int, metavar="N",
                   help="processes that pin a first start's new sessions beside the daemon (default 0: one "
                        "per CPU, at most 4; 1: none)")
    p.add_argument("--log-format", choices=config.LOG_FORMATS, help="default auto: journal under systemd, "
                   "console on a TTY, else JSON lines on stdout")
    p.add_argument("--log-level", choices=config.LOG_LEVELS)
    p.add_argument("--check-config", action="store_true", help="validate the configuration, print it, and exit")
    return p


def _settle_heap() -> None:
    """After the start-up scans (run with the cyclic collector off): keep what they made
    out of every later collection, and give their freed memory back to the system.

    A scan makes one small object per session and keeps it for the daemon's
    life; with the collector on, each full collection during the scan walks all
    of them again (a second of a restart at a million sessions), and so would
    every full collection after it. ``gc.freeze`` moves them out of its sight;
    they are still freed the usual way when a session goes (they hold no
    cycles). A restart's hint and a scan's sets are a few hundred megabytes at a
    million sessions, freed before READY; glibc keeps freed heap for reuse and
    raises its mmap threshold after big frees, so without ``malloc_trim`` the
    daemon's RSS stays that much higher for its whole life (BENCHMARKS.md,
    section 4). Elsewhere (musl) there is nothing to call and nothing is done."""
    gc.freeze()
    gc.enable()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config.from_args(args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"sessionguardd: invalid configuration: {line}", file=sys.stderr)
        return 2
    if args.check_config:
        return config.check_config(cfg, sys.stdout, sys.stderr)
    fmt = logconf.resolve_format(cfg.log_format)
    try:
        if systemd.under_systemd() or fmt == "journal":
            systemd.require()
    except systemd.SystemdUnavailable as exc:
        print(f"sessionguardd: {exc}", file=sys.stderr)
        return 1
    logger = logconf.configure(fmt, cfg.log_level, journal_renderer=systemd.journal_renderer)
    try:
        return Daemon(cfg, logger).run()
    except Exception as exc:  # one line for the admin, the traceback for the log
        logger.exception("daemon.failed", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())

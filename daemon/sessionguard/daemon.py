"""``sessionguardd``: wires config, logging, store, tracker, watcher, control socket and systemd.

Threads: the main thread handles signals, sd_notify and watchdog pings; the
watcher's worker evaluates changed files; a maintenance thread runs scans,
reconciliations and overflow rescans; the control server runs its own loop.
Nothing below this module imports it.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from . import __version__, config, fsutil, log as logconf, paths, systemd
from .config import Config, ConfigError
from .service import DaemonService
from .tracker import Tracker, WatchState
from .watch import Watcher, inotify_hint

#: How often the maintenance thread checks that every watch root still exists.
ROOT_CHECK_SECONDS = 1.0


#: A directory's identity: the same path holding another directory (``rm -rf`` and
#: ``mkdir``, a backup moved into place) is a new watch with a new store.
RootId = tuple[int, int]


def _dir_state(path: str) -> tuple[str, RootId | None]:
    """``("", (dev, ino))`` for a directory that can be watched, else ``(why not, None)``.

    The last component must be a real directory, never a symlink: one swapped
    in for the session directory would make the daemon read, copy and keep a
    store in a directory nobody configured. The admin is told to configure
    the link's target instead.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "no such directory", None
    except PermissionError:
        return "permission denied (check the daemon user's access to every parent directory)", None
    except OSError as exc:
        return exc.strerror or str(exc), None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"a symbolic link (to {target}): never followed; configure the directory itself", None
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory", None
    return "", (st.st_dev, st.st_ino)


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


class Daemon:
    """One running sessionguardd (its control backend is :class:`~sessionguard.service.DaemonService`)."""

    def __init__(self, cfg: Config, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self.started = time.time()
        self._wake = threading.Event()
        self._stopping = False
        self._reload = False
        self.control: Any = None
        self.service = DaemonService(self, describe=self._describe, polled=lambda: set(self._polled))
        self._build_watching()

    # -- lifecycle -----------------------------------------------------------

    def _build_watching(self) -> None:
        """Tracker, watcher and maintenance thread for the current config (again on reload)."""
        self.tracker = Tracker(list(self.cfg.watches), self.log)
        self.watcher = Watcher(self.tracker, self.log, self._on_overflow)
        self._rescan = threading.Event()
        self._maint_stop = threading.Event()
        self._maint = threading.Thread(target=self._maintain, name="sessionguard-maint", daemon=True)
        self._roots: dict[str, RootId] = {}  # identity of each watched directory when it was brought up
        self._polled: dict[str, str] = {}  # directories inotify refused, polled meanwhile: why
        self._failed: dict[str, str] = {}  # directories that could not be brought up: the error logged
        self._pin_methods: dict[str, tuple[str, bool]] = {}  # see _pin_method

    def _start_watching(self) -> None:
        """Watch and scan every directory (pins in place), then start maintenance."""
        self.watcher.start()
        for ws in self.tracker.watches:
            self._bring_up(ws, initial=True)
        self._maint.start()

    def _stop_watching(self) -> None:
        """Stop maintenance, then the watcher (which finishes the file in hand)."""
        self._maint_stop.set()
        self._rescan.set()
        self._maint.join(timeout=30)
        self.watcher.stop()

    def start(self) -> None:
        """Watch, scan every watched file (pins in place), then serve. READY comes after this."""
        self._start_watching()
        self._start_control()
        self.log.info(
            "daemon.started",
            version=__version__,
            pid=os.getpid(),
            socket=self.cfg.socket,
            config=self.cfg.source,
            watches=[self._describe(ws) for ws in self.tracker.watches],
        )

    def _describe(self, ws: WatchState) -> dict[str, Any]:
        method, _ = self._pin_methods.get(ws.root, (ws.cfg.pin, True))
        return {"path": ws.root, "available": ws.available, "inotify": ws.available and ws.root not in self._polled,
                "pin": ws.cfg.pin, "pin_method": method, "store": ws.cfg.store_path}

    def _pin_method(self, ws: WatchState) -> tuple[str, bool]:
        """The method the daemon's pins of *ws* use, and whether hard links are possible.

        Found once per bring-up, not per ``status``: the reflink probe writes
        into the store. Neither a hard link nor a reflink crosses filesystems,
        so a store elsewhere always gets copies.
        """
        try:
            same_fs = fsutil.same_filesystem(ws.root, ws.cfg.store_path)
        except OSError:
            same_fs = True  # cannot tell; the names of pins and versions record what was done
        if ws.cfg.pin == "copy" or not same_fs:
            return "copy", same_fs
        if ws.cfg.pin == "link":
            return "link", True
        try:
            return ("reflink" if fsutil.reflink_supported(ws.cfg.store_path) else "copy"), True
        except OSError:  # a read-only store: nothing will be written anyway
            return "copy", True

    def _bring_up(self, ws: WatchState, *, initial: bool = False) -> None:
        """Watch and scan one directory, if it exists. Scheduling comes first so
        nothing written during the scan is missed. A directory inotify refuses
        (its limits) is scanned all the same and then polled by every
        reconciliation until a retry of the watch succeeds."""
        problem, root_id = _dir_state(ws.root)
        if problem:
            if initial or ws.available:
                self.log.warning("watch.missing", watch=ws.root, why=problem,
                                 hint="it will be watched as soon as it is a directory (checked every second)")
            ws.available = False
            return
        try:
            refused = self._schedule(ws)
            self.tracker.scan(ws)
        except Exception as exc:  # noqa: BLE001 - one bad watch must not stop the others
            self.watcher.unschedule(ws)
            ws.available = False
            self._bring_up_failed(ws, exc)
            return
        assert root_id is not None
        ws.available = True
        self._roots[ws.root] = root_id
        self._pin_methods[ws.root] = self._pin_method(ws)
        self._failed.pop(ws.root, None)
        if refused is not None:
            self._inotify_refused(ws, refused)
        if not initial:
            self.log.info("watch.restored", **self._describe(ws))
        self.tracker.degrade(f"watch:{ws.root}", None)
        self._log_pin_caveats(ws)

    def _schedule(self, ws: WatchState) -> OSError | None:
        """Put an inotify watch on *ws*; the error if inotify refuses (limits), else None."""
        try:
            self.watcher.schedule(ws)
        except OSError as exc:
            return exc
        self._polled.pop(ws.root, None)
        return None

    def _inotify_refused(self, ws: WatchState, exc: OSError) -> None:
        """No inotify for *ws*: poll it (every reconciliation) and say so once, not on every retry."""
        why = f"{ws.root}: inotify refused ({exc.strerror or exc}): polled every {self.cfg.reconcile_interval:g} s"
        if self._polled.get(ws.root) != why:
            self._polled[ws.root] = why
            self.tracker.bump("errors")
            self.log.error("watch.failed", watch=ws.root, error=str(exc), errno=exc.errno, hint=inotify_hint(exc),
                           action=f"polling: files are compared with their pins every "
                                  f"{self.cfg.reconcile_interval:g} s; the watch is retried every "
                                  f"{ROOT_CHECK_SECONDS:g} s")
        self.tracker.degrade(f"inotify:{ws.root}", why)

    def _retry_inotify(self, ws: WatchState) -> None:
        """A polled directory: try the inotify watch again; once it holds, rescan what polling may have missed."""
        refused = self._schedule(ws)
        if refused is not None:
            self._inotify_refused(ws, refused)
            return
        self.log.info("watch.restored", **self._describe(ws))
        self.tracker.degrade(f"inotify:{ws.root}", None)
        self.tracker.scan(ws)

    def _bring_up_failed(self, ws: WatchState, exc: Exception) -> None:
        """The directory is there but could not be watched or scanned (e.g. the store
        cannot be created: full, read-only). Logged once per distinct error; retried every second."""
        if isinstance(exc, OSError):  # not str(exc): it may name a tmp file, new on every retry
            why = f"{ws.root}: not watched: {exc.strerror or exc} (store {ws.cfg.store_path})"
        else:
            why = f"{ws.root}: not watched: {type(exc).__name__}: {exc}"
        if self._failed.get(ws.root) != why:
            self._failed[ws.root] = why
            self.tracker.bump("errors")
            fields = {"watch": ws.root, "store": ws.cfg.store_path, "error": str(exc),
                      "hint": "check free space and write access to the store; retried every second"}
            if isinstance(exc, OSError):
                self.log.error("watch.failed", errno=exc.errno, **fields)
            else:
                self.log.exception("watch.failed", **fields)
        self.tracker.degrade(f"watch:{ws.root}", why)

    def _log_pin_caveats(self, ws: WatchState) -> None:
        """One line when the pins are not what the config suggests: hard links impossible, or risky."""
        method, same_fs = self._pin_methods[ws.root]
        if not same_fs:
            log = self.log.warning if ws.cfg.pin == "link" else self.log.info
            log("watch.no_hardlinks", watch=ws.root, store=ws.cfg.store_path, pin=ws.cfg.pin, pin_method=method,
                why="the store is on another filesystem than the watched directory: hard links cannot cross it",
                effect="every pin and version is a full copy, by the daemon and by the embedded library")
        elif method == "link":
            self.log.warning("watch.pin_link", watch=ws.root,
                             risk="hard-link pins share the live inode: an in-place truncating write "
                                  "destroys the prior version too; use only for rename-only writers")

    def _start_control(self) -> None:
        from .control import ControlServer

        sock = systemd.activated_socket("control")
        if sock is None and not self.cfg.socket:
            self.tracker.stats.degraded["control"] = f"control socket unavailable: {paths.NO_DEFAULT_SOCKET}"
            self.log.error("control.failed", socket=None, error=paths.NO_DEFAULT_SOCKET)
            return
        try:
            self.control = ControlServer(self.service, path=None if sock else self.cfg.socket, sock=sock,
                                         read_group=self.cfg.read_group, admin_group=self.cfg.admin_group,
                                         logger=self.log)
            self.control.start()
        except OSError as exc:
            self.tracker.stats.degraded["control"] = f"control socket unavailable: {exc}"
            self.log.error("control.failed", socket=self.cfg.socket, error=str(exc))
            self.control = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads the config."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        self.start()
        systemd.notify("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")
        ping = systemd.watchdog_interval()
        tick = min(1.0, ping / 2) if ping else 1.0
        last_status = 0.0
        was_healthy = True
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
        """SIGHUP: re-read the config; on error keep running with the old one."""
        systemd.notify("RELOADING=1", "STATUS=reloading configuration")
        try:
            new = config.load_file(self.cfg.source) if self.cfg.source else self.cfg
            if self.cfg.source is None:
                self.log.info("config.reload_skipped", why="no config file: started from flags only")
        except ConfigError as exc:
            self.log.error("config.invalid", error=str(exc), action="kept the running configuration")
            systemd.notify("READY=1", f"STATUS={self.status_line()}")
            return
        new = replace(new, socket=self.cfg.socket, log_format=self.cfg.log_format)
        self._stop_watching()
        self.cfg = new
        self._build_watching()
        self._start_watching()
        self.log.info("config.reloaded", watches=[self._describe(ws) for ws in self.tracker.watches])
        systemd.notify("READY=1", f"STATUS={self.status_line()}")

    # -- maintenance ---------------------------------------------------------

    def _on_overflow(self) -> None:
        """Called on watchdog's thread: events were lost, rescan everything."""
        with self.tracker._stats_lock:
            self.tracker.stats.overflows += 1
            self.tracker.stats.last_overflow = time.time()
        self.log.warning("watch.overflow", action="full rescan of every watch")
        self._rescan.set()

    def _maintain(self) -> None:
        next_reconcile = time.monotonic() + self.cfg.reconcile_interval
        stop, rescan, tracker = self._maint_stop, self._rescan, self.tracker
        while not stop.is_set():
            rescan.wait(ROOT_CHECK_SECONDS)
            if stop.is_set():
                break
            try:
                if rescan.is_set():
                    rescan.clear()
                    for ws in tracker.watches:
                        if ws.available:
                            tracker.scan(ws)
                    next_reconcile = time.monotonic() + self.cfg.reconcile_interval
                self._check_roots()
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + self.cfg.reconcile_interval
                    for ws in tracker.watches:
                        if ws.available:
                            tracker.reconcile(ws)
                    self._write_metrics_textfile()
            except Exception as exc:  # noqa: BLE001 - maintenance must keep running
                tracker.bump("errors")
                self.log.exception("maintenance.error", error=str(exc))

    def _check_roots(self) -> None:
        """A watched directory removed, replaced (by another directory, a symlink or
        a file) is reported and let go; when a directory is there again it is
        watched again. A polled directory gets its inotify watch retried."""
        for ws in self.tracker.watches:
            problem, root_id = _dir_state(ws.root)
            if ws.available and root_id != self._roots.get(ws.root):
                self._take_down(ws, problem or "replaced by another directory")
            if not ws.available:
                if not problem:
                    self._bring_up(ws)
            elif ws.root in self._polled:
                self._retry_inotify(ws)

    def _take_down(self, ws: WatchState, why: str) -> None:
        """Stop watching a directory that is gone or is not the one watched any more."""
        ws.available = False
        ws.store = None  # the default store lived inside it: re-created on return
        ws.files.clear()  # ... and so did the pins these described
        ws.skipped.clear()
        self.watcher.unschedule(ws)
        self.log.error("watch.removed", watch=ws.root, why=why,
                       hint="watched again as soon as a directory is there (checked every second)")
        if self._polled.pop(ws.root, None) is not None:
            self.tracker.degrade(f"inotify:{ws.root}", None)
        self.tracker.degrade(f"watch:{ws.root}", f"{ws.root}: {why}")

    def healthy(self, stall_seconds: float) -> tuple[bool, str]:
        ok, why = self.watcher.healthy(stall_seconds)
        if ok and not self._maint.is_alive():
            return False, "maintenance thread died"
        return ok, why

    # -- views (status line, status, list, metrics) --------------------------

    def status_line(self) -> str:
        s = self.tracker.stats
        tracked = sum(len(ws.files) for ws in self.tracker.watches)
        last = f"last shrink {s.last_shrink[0]} ({s.last_shrink[2]}) at {_iso(s.last_shrink[1])}" if s.last_shrink else "no shrink seen"
        degraded = f"; DEGRADED: {', '.join(s.degraded.values())}" if s.degraded else ""
        return f"{tracked} sessions tracked, {s.versions_kept} versions kept, {last}{degraded}"

    def _write_metrics_textfile(self) -> None:
        if not self.cfg.metrics_textfile:
            return
        try:
            fsutil.atomic_write(self.cfg.metrics_textfile, self.service.metrics_text().encode(), mode=0o644)
        except OSError as exc:
            self.log.warning("metrics.write_failed", path=self.cfg.metrics_textfile, error=str(exc))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sessionguardd",
        description="Watch chat/agent session directories and keep the prior version of every "
                    "session that a write shrinks, makes unparseable or deletes.",
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
exit codes: 0 stopped cleanly, 1 failed to start, 2 invalid configuration.
""",
    )
    p.add_argument("--version", action="version", version=f"sessionguardd {__version__}")
    p.add_argument("--config", metavar="FILE", help=f"TOML config (default: {config.DEFAULT_CONFIG_FILE} if present)")
    p.add_argument("--watch", metavar="DIR", action="append", help="session directory to watch (repeatable; "
                   "replaces the config file's watches)")
    p.add_argument("--socket", metavar="PATH", help=f"control socket (default: {config.default_socket_path()})")
    p.add_argument("--pin", choices=("auto", "copy", "link"),
                   help="pin method for every watch (default auto: reflink where possible, else copy)")
    p.add_argument("--reconcile-interval", type=float, metavar="SECONDS",
                   help="seconds between stat-only reconciliation passes (default 30)")
    p.add_argument("--log-format", choices=config.LOG_FORMATS, help="default auto: journal under systemd, "
                   "console on a TTY, else JSON lines on stdout")
    p.add_argument("--log-level", choices=config.LOG_LEVELS)
    p.add_argument("--check-config", action="store_true", help="validate the configuration, print it, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config.from_args(args)
    except ConfigError as exc:
        print(f"sessionguardd: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"configuration OK ({cfg.source or 'defaults and flags'}):")
        for w in cfg.watches:
            print(f"  watch {w.path}  pattern={w.pattern} count={w.count} pin={w.pin} store={w.store_path}")
        print(f"  socket {cfg.socket}")
        return 0
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
    except Exception as exc:  # noqa: BLE001 - one line for the admin, the traceback for the log
        logger.exception("daemon.failed", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Prometheus exposition text: what ``sessionguardctl metrics`` and the textfile hold.

Counters and gauges per watch (label ``watch``) where they belong to one,
daemon-wide otherwise, plus ``sessionguard_build_info``. Values are the
running tallies at the moment of the call; nothing here walks a store.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import __version__
from .stats import Snapshot
from .watchstate import WatchState

CLASSES = ("wipe", "truncate", "rewrite", "replaced", "unparseable", "deleted")


def _label(value: str) -> str:
    """A label value escaped as the exposition format wants (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(s: Snapshot, watches: Iterable[WatchState]) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP sessionguard_{name} {help_}")
        lines.append(f"# TYPE sessionguard_{name} {kind}")
        lines.extend(f"sessionguard_{name}{labels} {value:g}" for labels, value in samples)

    ws_list = list(watches)
    per = [(f'{{watch="{_label(ws.root)}"}}', ws) for ws in ws_list]
    metric("build_info", "gauge", "Version of the running daemon.", [(f'{{version="{_label(__version__)}"}}', 1)])
    metric("up", "gauge", "1 while the watch's directory is watched (inotify or polled).",
           [(lbl, 1 if ws.available else 0) for lbl, ws in per])
    metric("sessions_tracked", "gauge", "Session files currently tracked.", [(lbl, len(ws.files)) for lbl, ws in per])
    metric("store_versions", "gauge", "Versions held in the store.",
           [(lbl, ws.store.usage()[0] if ws.store else 0) for lbl, ws in per])
    metric("store_bytes", "gauge", "Bytes held by versions in the store.",
           [(lbl, ws.store.usage()[1] if ws.store else 0) for lbl, ws in per])
    metric("last_reconcile_timestamp_seconds", "gauge", "Unix time of the last reconciliation pass (0: none yet).",
           [(lbl, ws.last_reconcile or 0) for lbl, ws in per])
    metric("shrinks_total", "counter", "Writes that lost messages, by class.",
           [(f'{{class="{c}"}}', s.shrinks.get(c, 0)) for c in CLASSES])
    metric("last_shrink_timestamp_seconds", "gauge", "Unix time of the last write that lost messages (0: none).",
           [("", s.last_shrink[1] if s.last_shrink else 0)])
    metric("versions_kept_total", "counter", "Versions kept by this daemon.", [("", s.versions_kept)])
    metric("restores_total", "counter", "Restores made through the control socket.", [("", s.restores)])
    metric("restores_overwritten", "gauge", "Restores a writer undid before the session grew past them.",
           [("", len(s.overwritten))])
    metric("events_total", "counter", "Filesystem events received.", [("", s.events)])
    metric("overflows_total", "counter", "inotify queue overflows (events lost, rescanned).", [("", s.overflows)])
    metric("reconciliations_total", "counter", "Stat-only reconciliation passes.", [("", s.reconciliations)])
    metric("maintenance_passes_total", "counter", "Passes of the maintenance loop (directory and store checks, "
           "retries), one a second while it is alive.", [("", s.maintenance_passes)])
    metric("errors_total", "counter", "Errors (each also logged).", [("", s.errors)])
    metric("degraded", "gauge", "1 while something is degraded (see status).", [("", 1 if s.degraded else 0)])
    return "\n".join(lines) + "\n"

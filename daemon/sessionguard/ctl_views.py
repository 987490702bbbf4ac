"""What ``sessionguardctl`` prints for each result, and the exit code it means.

Each view takes the parsed arguments and the method's result (the shapes
are in the README's socket section) and returns the exit code; every string
that came from the daemon is printed through :func:`~.ctl_format.safe`.
:func:`exit_code` alone decides the code, so ``--json`` exits like the
human views do.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Callable
from typing import Any

from .ctl_format import clip, count, duration, human_size, pad, safe, summarize, table, when, width

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_DEGRADED = 4
EXIT_OVERWRITTEN = 5

#: What the client says the undone-restore state means, wherever it shows it.
OVERWRITTEN_HINT = ("a writer undid a restore of this session: the server probably holds it in memory; "
                    "stop the server (or make it reload the session) before restoring again")


def out(text: str = "") -> None:
    print(text)


def exit_code(command: str, args: argparse.Namespace, r: dict[str, Any]) -> int:
    """The exit code a result means, whatever the output format."""
    if command == "status":
        degraded = r.get("degraded") or any(w.get("degraded") for w in r.get("watches") or [] if isinstance(w, dict))
        return EXIT_DEGRADED if degraded else EXIT_OK
    if command == "sync":
        return EXIT_OK if r.get("synced") else EXIT_FAILED
    if command == "show" and getattr(args, "p_messages", False) and r.get("messages") is None:
        return EXIT_FAILED
    if command == "restore":
        return EXIT_OVERWRITTEN if r.get("overwritten") else EXIT_OK
    if command == "recover":
        rows = [s for s in r.get("sessions") or [] if isinstance(s, dict)]
        if any(s.get("outcome") == "failed" for s in rows):
            return EXIT_FAILED
        return EXIT_OVERWRITTEN if any(s.get("overwritten") for s in rows) else EXIT_OK
    return EXIT_OK


def _cells() -> int:
    return max(shutil.get_terminal_size((120, 24)).columns - 10, 40)


def shell_quote(text: str) -> str:
    """A shell word that gives back *text*: ``$'…'`` with escapes when it holds
    characters a terminal would act on, so a pasted undo command is exact and safe."""
    if safe(text) == text:
        return shlex.quote(text)
    body = "".join("\\\\" if ch == "\\" else "\\'" if ch == "'" else safe(ch) for ch in text)
    return f"$'{body}'"


def command_line(args: argparse.Namespace, *words: str) -> str:
    parts = ["sessionguardctl"]
    if args.socket_given:
        parts += ["--socket", args.socket]
    return " ".join(shell_quote(p) for p in [*parts, *words])


# -- status --------------------------------------------------------------------------


def _block(title: str, rows: list[tuple[str, str]], degraded: list[Any], color: bool, label: int) -> list[str]:
    """A resolvectl-style block: its title, then its degraded reasons first, then label: value rows."""
    lines = [title]
    for why in degraded:
        text = f"{pad('DEGRADED', label, right=True)}: {safe(why)}"
        lines.append(f"\x1b[1;31m{text}\x1b[0m" if color else text)
    if not degraded:
        rows = [("Health", "ok"), *rows]
    lines += [f"{pad(k, label, right=True)}: {v}" for k, v in rows]
    return lines


def _watch_rows(w: dict[str, Any]) -> list[tuple[str, str]]:
    if not w.get("available"):
        watching = "no (directory not available)"
    else:
        watching = "inotify" if w.get("inotify") else "polled (inotify refused it)"
    return [
        ("Watching", watching),
        ("Pins", f"{safe(w.get('pin_method'))} (pin = {safe(w.get('pin'))})"),
        ("Store", safe(w.get("store"))),
        ("Sessions", safe(w.get("sessions"))),
        ("Versions", f"{safe(w.get('versions'))} ({human_size(w.get('store_bytes'))})"),
        ("Last reconcile", when(w.get("last_reconcile"))),
        ("Last shrink", when(w.get("last_shrink"))),
    ]


def view_status(args: argparse.Namespace, r: dict[str, Any]) -> int:
    shrinks = r.get("shrinks") or {}
    rows = [
        ("Version", f"sessionguardd {safe(r.get('version'))} (pid {safe(r.get('pid'))})"),
        ("Uptime", duration(r.get("uptime"))),
        ("Sessions", safe(r.get("sessions"))),
        ("Versions", f"{safe(r.get('versions'))} ({human_size(r.get('store_bytes'))})"),
        ("Events", f"{safe(r.get('events'))} (evaluations {safe(r.get('evaluations'))}, "
                   f"queued {safe(r.get('queued'))})"),
        ("Versions kept", safe(r.get("versions_kept"))),
        ("Shrinks", ", ".join(f"{safe(k)} {safe(v)}" for k, v in sorted(shrinks.items())) or "none"),
        ("Restores", safe(r.get("restores"))),
        ("Errors", safe(r.get("errors"))),
        ("Overflows", f"{safe(r.get('overflows'))} (last: {when(r.get('last_overflow'))})"),
    ]
    for o in r.get("overwritten_restores") or []:
        rows.append(("Undone restore", f"{safe(o.get('sid'))} in {safe(o.get('watch'))}: restored "
                                       f"{count(o.get('restored_count'))}, now {count(o.get('count_after'))} "
                                       f"({when(o.get('at'))})"))
    watches = [w for w in r.get("watches") or [] if isinstance(w, dict)]
    label = max(width(k) for k, _ in [*rows, *_watch_rows({}), ("DEGRADED", "")])
    color = sys.stdout.isatty()
    lines = _block("Daemon", rows, list(r.get("degraded") or []), color, label)
    for w in watches:
        lines += ["", *_block(f"Watch {safe(w.get('path'))}", _watch_rows(w), list(w.get("degraded") or []),
                              color, label)]
    if r.get("overwritten_restores"):
        lines += ["", f"note: {OVERWRITTEN_HINT}"]
    out("\n".join(lines))
    return exit_code("status", args, r)


# -- sessions and versions ---------------------------------------------------------------


def _state(s: dict[str, Any]) -> str:
    state = safe(s.get("state"))
    return f"{state}, restore undone!" if s.get("overwritten") else state


def view_list(args: argparse.Namespace, r: dict[str, Any]) -> int:
    sessions = [s for s in r.get("sessions") or [] if isinstance(s, dict)]
    if not sessions:
        out("no sessions whose latest change is a loss" if args.p_shrunk_only else "no sessions")
        return EXIT_OK
    rows = [(s.get("sid"), _state(s), count(s.get("count")), s.get("high_water"), s.get("versions"),
             when((s.get("last_loss") or {}).get("at")) if s.get("last_loss") else "-", s.get("watch"))
            for s in sessions]
    out(table(["SID", "STATE", "COUNT", "HIGH", "VERSIONS", "LAST LOSS", "WATCH"], rows, right=(2, 3, 4)))
    if any(s.get("overwritten") for s in sessions):
        out(f"\nrestore undone!: {OVERWRITTEN_HINT}")
    return EXIT_OK


def view_history(args: argparse.Namespace, r: dict[str, Any]) -> int:
    versions = [v for v in r.get("versions") or [] if isinstance(v, dict)]
    if not versions:
        out(f"session {safe(args.p_sid)} has no kept versions")
        return EXIT_OK
    pick, most = r.get("restore"), r.get("most")

    def mark(v: dict[str, Any]) -> str:
        return ("R" if v.get("id") == pick else " ") + ("M" if v.get("id") == most else " ")

    rows = [(mark(v), v.get("id"), when(v.get("created")), count(v.get("count")), human_size(v.get("size")),
             v.get("reason"), v.get("source")) for v in versions]
    out(table(["", "ID", "CREATED", "MESSAGES", "SIZE", "REASON", "SOURCE"], rows, right=(3, 4)))
    out("")
    out(f"R  restored when no VERSION is given: {safe(pick) if pick else 'none (the latest change was intended)'}")
    if most:
        out(f"M  the most messages (--most): {safe(most)}")
    return EXIT_OK


def _version_lines(v: dict[str, Any]) -> list[str]:
    return [
        f"version:  {safe(v.get('id'))}",
        f"session:  {safe(v.get('sid'))}",
        f"created:  {when(v.get('created'))}",
        f"messages: {count(v.get('count'))}",
        f"size:     {human_size(v.get('size'))}",
        f"reason:   {safe(v.get('reason'))} (by {safe(v.get('source'))}, {safe(v.get('method'))})",
        f"file:     {safe(v.get('name'))}",
    ]


def view_show(args: argparse.Namespace, r: dict[str, Any]) -> int:
    for line in _version_lines(r):
        out(line)
    if not args.p_messages:
        return EXIT_OK
    msgs = r.get("messages")
    if not isinstance(msgs, list):
        out(f"\nmessages cannot be shown: {safe(r.get('messages_error', 'unparseable'))}")
        return EXIT_FAILED
    first: int = r["first"] if isinstance(r.get("first"), int) else 0
    total = r.get("total")
    out("")
    w = len(str(first + max(len(msgs) - 1, 0)))
    for i, m in enumerate(msgs, start=first):
        out(f"{i:>{w}}  {summarize(m, _cells())}")
    if isinstance(total, int) and first + len(msgs) < total:
        out(f"\nmessages {first}-{first + len(msgs) - 1} of {total}; more: --first {first + len(msgs)}")
    return EXIT_OK


def view_diff(args: argparse.Namespace, r: dict[str, Any]) -> int:
    v = r.get("version") or {}
    if not r.get("live_exists"):
        live = "missing"
    elif r.get("live_count") is None:
        live = f"unparseable ({safe(r.get('live_error'))})"
    else:
        live = f"{safe(r['live_count'])} messages (content id {safe(r.get('live_id'))})"
    out(f"version {safe(v.get('id'))}: {safe(r.get('version_count'))} messages, created {when(v.get('created'))}")
    out(f"live file: {live}")
    n = r.get("missing_count") or 0
    if not n:
        out("every message of the version is in the live file")
        return EXIT_OK
    out(f"{safe(n)} message{'s' if n != 1 else ''} of the version missing from the live file:")
    missing = [m for m in r.get("missing") or [] if isinstance(m, dict)]
    w = max((len(safe(m.get("index"))) for m in missing), default=1)
    for m in missing:
        out(f"  {pad(safe(m.get('index')), w, right=True)}  {summarize(m.get('message'), _cells())}")
    return EXIT_OK


# -- changes ----------------------------------------------------------------------------------


def _overwritten(o: dict[str, Any]) -> str:
    return (f"warning: a restore of this session {when(o.get('at'))} ({count(o.get('restored_count'))} messages) "
            f"was undone by a writer (now {count(o.get('count_after'))}): {OVERWRITTEN_HINT}")


def view_restore(args: argparse.Namespace, r: dict[str, Any]) -> int:
    if r.get("hint"):
        out(f"note: {safe(r['hint'])}")
    v = r.get("restored") or {}
    sid = safe(r.get("sid", args.p_sid))
    what = f"version {safe(v.get('id'))} ({count(v.get('count'))} messages, created {when(v.get('created'))})"
    before = r.get("live_count_before")
    if r.get("unchanged"):
        out(f"session {sid}: the live file is already identical to {what}; nothing to do")
    elif r.get("dry_run"):
        out(f"would restore session {sid} from {what}")
        out(f"the live file now has {safe(before)} messages" if before is not None
            else "the live file is missing or unparseable now")
        out("the live file would first be kept as a pre-restore version, so this can be undone")
    else:
        out(f"restored session {sid} from {what}")
        pre = r.get("pre_restore")
        if pre:
            out(f"the previous live file ({count(pre.get('count'))} messages) was kept as version "
                f"{safe(pre.get('id'))}")
            watch = ["--watch", r["watch"]] if isinstance(r.get("watch"), str) else []
            out(f"to undo: {command_line(args, *watch, 'restore', str(r.get('sid', args.p_sid)), pre.get('id', ''))}")
        else:
            out("there was no live file before: nothing to undo")
    if r.get("overwritten"):
        out(_overwritten(r["overwritten"]))
    return exit_code("restore", args, r)


def _before(row: dict[str, Any]) -> str:
    """What a recover row's live file was: its count, or missing / unparseable, or - (not looked at)."""
    live = row.get("live")
    if live in ("missing", "unparseable"):
        return str(live)
    return count(row.get("before")) if live == "present" else "-"


def view_recover(args: argparse.Namespace, r: dict[str, Any]) -> int:
    if r.get("hint"):
        out(f"note: {safe(r['hint'])}")
    rows = [s for s in r.get("sessions") or [] if isinstance(s, dict)]
    if not rows:
        out("no session's latest change is an unintended loss" + (f" since {when(r['since'])}" if r.get("since")
                                                                     else "") + ": nothing to do")
        return exit_code("recover", args, r)
    table_rows = [(s.get("sid"), f"{_before(s)} → {count(s.get('after')) if s.get('version') else '-'}",
                   s.get("version"),
                   safe(s.get("outcome")) + (", restore undone!" if s.get("overwritten") else ""),
                   clip(safe(s.get("why") or ""), 60), s.get("watch")) for s in rows]
    out(table(["SID", "MESSAGES", "VERSION", "OUTCOME", "WHY", "WATCH"], table_rows))
    if r.get("dry_run"):
        out("\ndry run: nothing was changed")
    elif r.get("run"):
        out(f"\nto undo this whole run: {command_line(args, 'recover', '--undo', str(r['run']))}")
    if any(s.get("overwritten") for s in rows):
        out(f"restore undone!: {OVERWRITTEN_HINT}")
    return exit_code("recover", args, r)


def view_forget(args: argparse.Namespace, r: dict[str, Any]) -> int:
    n = r.get("removed")
    out(f"forgot session {safe(r.get('sid', args.p_sid))} in {safe(r.get('watch'))}: removed {safe(n)} "
        f"file{'s' if n != 1 else ''}, freed {human_size(r.get('bytes_freed'))}")
    return EXIT_OK


def view_prune(args: argparse.Namespace, r: dict[str, Any]) -> int:
    removed = r.get("removed")
    n = len(removed) if isinstance(removed, list) else 0
    out(f"removed {n} version{'s' if n != 1 else ''}, freed {human_size(r.get('bytes_freed', 0))}")
    return EXIT_OK


def view_sync(args: argparse.Namespace, r: dict[str, Any]) -> int:
    if r.get("synced"):
        out("synced: every change made before this call has been processed")
        return EXIT_OK
    out(f"not synced within {args.p_timeout:g} s: the daemon is still catching up, or a watch is "
        "polled because inotify refused it (see status)")
    return EXIT_FAILED


def view_metrics(args: argparse.Namespace, r: dict[str, Any]) -> int:
    sys.stdout.write(safe(r.get("text", "")).replace("\\x0a", "\n"))
    return EXIT_OK


VIEWS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], int]] = {
    "status": view_status, "list": view_list, "history": view_history, "show": view_show, "diff": view_diff,
    "restore": view_restore, "recover": view_recover, "forget": view_forget, "prune": view_prune,
    "sync": view_sync, "metrics": view_metrics,
}

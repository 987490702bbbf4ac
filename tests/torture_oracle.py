"""The oracle of the torture run: from the writers' journals and the disk alone, what was lost?

It trusts neither the daemon's logs nor its bookkeeping: it hashes every
pin, every version and every live file itself. A version *v* (a write with
at least one message) is **expected** when

* it was followed by a loss (a delete, a corrupt write, or fewer messages;
  intended truncates included);
* it stayed on disk at least the settle time while the daemon was up — so
  the daemon had the time to read it; and
* the loss stayed at least the settle time while the daemon was up, from the
  loss until a write gave the session as many messages as *v* again — so the
  daemon had the time to see it. A loss undone sooner is **hidden** (counted
  apart): a watcher that compares message counts cannot see it.

For the library every version followed by a loss is expected: it keeps the
prior version itself, at save time. Recoverable means the exact bytes are in
the session's store (a version or its pin) or live.

Besides: every version's bytes must match its name (the count parsed here,
the BLAKE2b-64 content hash computed here), and every filler session that a
killed start-up scan had pinned and that was wiped while no daemon ran must
still have its pinned bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from torture_disk import TMP_MARK, count_messages, live_keys, session_bytes, store_usage
from torture_plan import Run
from torture_writers import revs_of, unrle

#: A version's name (naming.version_name): only the count and the hash matter here.
_VERSION_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z_(?:(?P<count>\d+)msgs|unparseable)_[a-z-]+_[a-z]+_[a-z]+"
                           r"_(?P<hash>[0-9a-f]{16})\.version$")
FAILURE_KEYS = ("lost", "high_water_lost", "tmp_after_restart", "missing_pins", "version_mismatches",
                "cache_wrong", "pinned_then_wiped_lost")


def content_hash(data: bytes) -> str:
    """The hash a version's name carries (versions.content_hash): 64 bits of BLAKE2b, computed here."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


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

    def add(self, path: Path, data: bytes) -> None:
        self.paths[hashlib.sha256(data).hexdigest()].append(str(path))
        try:
            self.conversations.add(tuple(revs_of(orjson.loads(data)["messages"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            pass  # unparseable: holds no conversation

    def holds_messages_of(self, op: Op) -> bool:
        """Does one file hold every message of *op*'s version (the same or a longer conversation)?"""
        want = tuple(unrle(op.revs or []))
        return any(c[: len(want)] == want for c in self.conversations)


@dataclass
class VersionCheck:
    """Every version's bytes against its name: how many were checked (per session), which disagreed."""

    checked: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)

    def add(self, sid: str, path: Path, data: bytes) -> None:
        self.checked[sid] += 1
        m = _VERSION_NAME.match(path.name)
        if m is None:
            self.wrong.append(f"{sid}/{path.name}: not a version name")
            return
        named = None if m["count"] is None else int(m["count"])
        count, digest = count_messages(data), content_hash(data)
        if named != count or m["hash"] != digest:
            self.wrong.append(f"{sid}/{path.name}: holds {count} msgs, hash {digest}")


def copies_on_disk(run: Run) -> tuple[dict[str, OnDisk], VersionCheck]:
    """Every pin, every version and every live file, hashed and parsed here; every version
    checked against its name. Nothing the daemon says about its store is trusted."""
    out: dict[str, OnDisk] = defaultdict(OnDisk)
    versions = VersionCheck()
    root = run.store / "sessions"
    for folder in (root.iterdir() if root.is_dir() else ()):
        for name in os.listdir(folder):
            path = folder / name
            if TMP_MARK in name or path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            out[folder.name].add(path, data)
            versions.add(folder.name, path, data)
    pins = run.store / "pins"
    for path in (pins.iterdir() if pins.is_dir() else ()):
        if TMP_MARK not in path.name and path.is_file() and not path.is_symlink():
            out[path.name].add(path, session_bytes(path.read_bytes()))
    for sid in live_keys(run.sdir):
        path = run.sdir / f"{sid}.json"
        try:
            out[sid].add(path, path.read_bytes())
        except FileNotFoundError:
            continue
    return out, versions


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


@dataclass
class _Tally:
    """What the oracle counts while it walks every session's history."""

    ops: Counter[str] = field(default_factory=Counter)
    f: Counter[str] = field(default_factory=Counter)
    by_style: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    found_as: Counter[str] = field(default_factory=Counter)
    lost: list[dict[str, Any]] = field(default_factory=list)
    hidden_lost: list[dict[str, Any]] = field(default_factory=list)
    expected_items: list[dict[str, Any]] = field(default_factory=list)
    hw_lost: list[str] = field(default_factory=list)


def check(run: Run) -> dict[str, Any]:
    """The oracle: figures of the run, and everything that should be recoverable and is not."""
    history = load_journals(run.journals)
    disk, versions = copies_on_disk(run)
    t = _Tally()
    for sid, hist in sorted(history.items()):
        _judge_session(run, sid, hist, disk.get(sid, OnDisk()), t)
    wiped = run.supervisor.get("pinned_then_wiped", [])
    wiped_lost = [f"{sid}: pinned bytes {sha[:12]} kept nowhere" for sid, sha in wiped
                  if not disk.get(sid, OnDisk()).paths.get(sha)]
    style_of = {sid: hist[0].style for sid, hist in history.items()}
    by_style = Counter(style_of.get(sid, "filler") for sid in versions.checked.elements())
    return {**_figures(run, history, t),
            "version_checks": sum(versions.checked.values()),
            "version_checks_by_style": dict(sorted(by_style.items())),
            "version_mismatches": len(versions.wrong),
            "version_mismatch_details": versions.wrong[:20],
            "pinned_then_wiped_checked": len(wiped),
            "pinned_then_wiped_lost": len(wiped_lost),
            "pinned_then_wiped_lost_details": wiped_lost[:20]}


def _judge_session(run: Run, sid: str, hist: list[Op], on_disk: OnDisk, t: _Tally) -> None:
    library = hist[0].style == "library"
    eligible_hw = absolute_hw = recoverable_hw = 0
    for i, op in enumerate(hist):
        t.ops[op.op] += 1
        if op.count is None or op.count < 1:
            continue
        t.f["versions_written"] += 1
        nxt = hist[i + 1] if i + 1 < len(hist) else None
        up = overlap(op.t_end, nxt.t_start if nxt else run.t_end, run.windows)
        eligible = library or up >= run.plan.settle
        if on_disk.paths.get(op.sha or ""):
            t.f["versions_recoverable"] += 1
            recoverable_hw = max(recoverable_hw, op.count)
        absolute_hw = max(absolute_hw, op.count)
        eligible_hw = max(eligible_hw, op.count if eligible else 0)
        if nxt is not None and _loses(op, nxt):
            _judge_loss(run, hist, i, on_disk, t, eligible=eligible, up=up)
    if eligible_hw:
        t.f["high_water_required"] += 1
        if recoverable_hw >= eligible_hw:
            t.f["high_water_recoverable"] += 1
        else:
            t.hw_lost.append(f"{sid}: high water {eligible_hw} msgs, best recoverable {recoverable_hw}")
    if absolute_hw:
        t.f["sessions_with_versions"] += 1
        t.f["absolute_high_water_recoverable"] += recoverable_hw >= absolute_hw


def _judge_loss(run: Run, hist: list[Op], i: int, on_disk: OnDisk, t: _Tally, *, eligible: bool,
                up: float) -> None:
    """Version ``hist[i]`` was followed by a loss: expected, hidden, or not promised?"""
    op, nxt = hist[i], hist[i + 1]
    style, sid = op.style, op.sid
    t.f["shrinks"] += 1
    t.by_style[style]["shrinks"] += 1
    if not eligible:
        t.f["shrinks_of_unsettled_versions"] += 1  # replaced too soon (or daemon down): nothing promised
        return
    paths = on_disk.paths.get(op.sha or "", [])
    healed = next((o for o in hist[i + 2:] if not _loses(op, o)), None)
    loss_up = overlap(nxt.t_end, healed.t_start if healed else run.t_end, run.windows)
    # A loss left in place to the end was seen: the final sync returned only once the daemon
    # had processed every change, however short the time from the loss to the end.
    if healed is not None and style != "library" and loss_up < run.plan.settle:
        t.f["hidden"] += 1
        if paths:
            t.f["hidden_kept"] += 1
        elif on_disk.holds_messages_of(op):
            t.f["hidden_in_a_longer_file"] += 1
        else:
            t.f["hidden_messages_lost_daemon_up" if loss_up > 0 else "hidden_messages_lost_daemon_down"] += 1
            detail = _lost_detail(run, hist, i, up)
            detail["undone"] = (f"{nxt.op} at {nxt.t_start - run.t0:.3f}, undone by {healed.op} "
                                f"({healed.count} msgs) {1000 * (healed.t_start - nxt.t_end):.0f} ms "
                                f"later; daemon up {1000 * loss_up:.0f} ms of that")
            t.hidden_lost.append(detail)
        return
    t.f["expected"] += 1
    t.by_style[style]["expected"] += 1
    if nxt.t_start - op.t_end < run.plan.settle:
        t.f["expected_unsettled"] += 1  # on disk less than the settle time (library only)
    t.expected_items.append({"sid": sid, "sha": op.sha, "count": op.count, "paths": paths})
    if paths:
        t.f["found"] += 1
        t.by_style[style]["found"] += 1
        t.found_as[min((_kind(p) for p in paths), key=("version", "pin", "live").index)] += 1
    else:
        t.lost.append(_lost_detail(run, hist, i, up, on_disk.holds_messages_of(op)))


def _figures(run: Run, history: dict[str, list[Op]], t: _Tally) -> dict[str, Any]:
    f = t.f
    live_bytes = sum(k[2] for k in live_keys(run.sdir).values())
    usage = store_usage(run.store)
    return {
        "seed": run.seed,
        "duration_s": round(run.t_end - run.t0, 1),
        "writers": len(run.plan.styles),
        "styles": ",".join(run.plan.styles),
        "sessions": len(history),
        "filler_sessions": run.plan.filler,
        "operations": sum(t.ops.values()),
        "ops_by_type": dict(sorted(t.ops.items())),
        **{k: f[k] for k in ("versions_written", "shrinks", "shrinks_of_unsettled_versions", "expected",
                             "expected_unsettled", "found")},
        "found_as": dict(t.found_as),
        "lost": len(t.lost),
        "by_style": {s: {k: t.by_style[s][k] for k in ("shrinks", "expected", "found")} for s in sorted(t.by_style)},
        **{k: f[k] for k in ("hidden", "hidden_kept", "hidden_in_a_longer_file")},
        "hidden_messages_lost": len(t.hidden_lost),
        **{k: f[k] for k in ("hidden_messages_lost_daemon_up", "hidden_messages_lost_daemon_down",
                             "high_water_required", "high_water_recoverable")},
        "high_water_lost": len(t.hw_lost),
        **{k: f[k] for k in ("sessions_with_versions", "absolute_high_water_recoverable", "versions_recoverable")},
        **run.supervisor,
        **usage,
        "live_bytes": live_bytes,
        "store_over_live": round(usage["store_bytes"] / live_bytes, 1) if live_bytes else None,
        "lost_details": t.lost,
        "hidden_lost_details": t.hidden_lost,
        "high_water_details": t.hw_lost,
        "expected_items": t.expected_items,
    }


def _lost_detail(run: Run, hist: list[Op], i: int, up: float, messages_elsewhere: bool = False) -> dict[str, Any]:
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
            if ev.get("sid") != op.sid:
                continue
            try:
                mono = datetime.fromisoformat(ev["timestamp"]).timestamp() - run.wall_minus_mono
            except (KeyError, ValueError):
                continue
            if op.t_start - 5 <= mono <= hist[min(i + 1, len(hist) - 1)].t_end + 5:
                keep = {k: ev[k] for k in ("event", "reason", "before", "after", "count", "version", "class")
                        if k in ev}
                events.append(f"{rel(mono)} {log.name}: {keep}")
    windows = [f"{rel(a)}..{rel(b)}" for a, b in run.windows if b >= op.t_start - 5 and a <= op.t_end + 30]
    return {"sid": op.sid, "style": op.style, "count": op.count, "sha": op.sha, "up_seconds": round(up, 3),
            "messages_in_a_longer_file": messages_elsewhere, "journal": around, "daemon_log": events,
            "up_windows": windows}


def failures(figs: dict[str, Any]) -> list[str]:
    return [f"{k}={figs[k]}" for k in FAILURE_KEYS if figs.get(k)]


_DETAILS = ("high_water_details", "missing_pin_details", "tmp_after_restart_files", "version_mismatch_details",
            "cache_wrong_details", "pinned_then_wiped_lost_details")


def describe(figs: dict[str, Any], details: bool = True) -> str:
    """The figures as text (and what went wrong, in detail)."""
    skip = {"lost_details", "hidden_lost_details", "expected_items", "pinned_then_wiped", *_DETAILS}
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
        for k in _DETAILS:
            lines += [f"{k}: {x}" for x in figs.get(k, [])]
    return "\n".join(lines)

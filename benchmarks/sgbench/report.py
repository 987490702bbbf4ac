"""Markdown tables from a results file: one table per section, every target named MET or MISSED.

The same text is printed at the end of a run, by ``--table-only`` for any
results file, and pasted into BENCHMARKS.md, so no figure there is typed by
hand. A verdict is computed from the measured ratio only: MISSED says by how
much (the ratio's distance from the target, in percent of the target).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Row = tuple[str, str, str, str, str, str]
HEAD: Row = ("measure", "value", "baseline (same run)", "ratio", "target", "verdict")


def at_most(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return "MET" if value <= limit else f"MISSED by {(value / limit - 1) * 100:.1f}%"


def at_least(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return "MET" if value >= limit else f"MISSED by {(1 - value / limit) * 100:.1f}%"


def x(r: float | None) -> str:
    return "" if r is None else f"{r:.3f}x"


def ms(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f} ms"


class Table:
    """Rows of one section's table."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def add(self, measure: str, value: str, base: str = "", r: float | None = None, target: str = "", *,
            verdict: str = "") -> None:
        self.rows.append((measure, value, base, x(r), target, verdict))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        if not self.rows and not self.notes:
            return ""
        widths = [max(len(r[i]) for r in [HEAD, *self.rows]) for i in range(len(HEAD))]

        def line(r: Row) -> str:
            return "| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |"

        out = [f"### {self.title}", ""]
        if self.rows:
            out += [line(HEAD), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, self.rows)]
        if self.notes:
            out += ["", *self.notes]
        return "\n".join(out)


def header(res: dict[str, Any]) -> str:
    m = res.get("machine", {})
    q = res.get("quiet", {})
    wait = "did not wait for a quiet machine"
    if q:
        wait = (f"waited {q.get('waited_s')} s for a 1-minute load average below {q.get('threshold')}"
                + (" and gave up: ran anyway" if q.get("gave_up_waiting") else ""))
    lines = [
        f"`{res.get('command', '?')}` — commit `{m.get('git_commit', '?')}`"
        + (" (daemon/ modified)" if m.get("daemon_tree_dirty") else "") + f", started {res.get('started', '?')}, "
        f"{res.get('total_seconds', '?')} s",
        f"- machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('mem_total_kB', 0) // 1024} MiB RAM, "
        f"kernel {m.get('kernel')}, scratch on {m.get('workdir_fstype')} ({m.get('workdir_device')})"
        + {"no": ", without a journal", "yes": ", journaled"}.get(m.get("workdir_journal") or "", ""),
        f"- software: Python {m.get('python')}, orjson {m.get('orjson')}, watchdog {m.get('watchdog')}, "
        f"zstandard {m.get('zstandard')}, pysimdjson {m.get('pysimdjson', '(not used)')}",
        f"- load average (1, 5, 15 min): {m.get('loadavg_start')} at start, {m.get('loadavg_end')} at end; {wait}",
    ]
    secs = res.get("sections", {})
    if secs:
        lines.append("- sections: " + "; ".join(
            f"{k} {v.get('seconds')} s (load {v.get('load_start', ['?'])[0]} → {v.get('load_end', ['?'])[0]})"
            for k, v in secs.items()))
    return "\n".join(lines)


def targets(built: list[Table]) -> Table:
    """Every row that has a verdict, gathered: the run's targets at a glance."""
    t = Table("Targets")
    for table in built:
        section = table.title.split(":", 1)[0].split(" (", 1)[0]
        for measure, value, base, r, target, verdict in table.rows:
            if verdict:
                t.rows.append((f"{section} — {measure}", value, base, r, target, verdict))
    return t


def render(res: dict[str, Any], builders: list[tuple[str, Callable[[Any], Table]]], *,
           header_too: bool = True) -> str:
    built: list[Table] = []
    for key, build in builders:
        sec = res.get(key)
        if sec is None:
            continue
        if isinstance(sec, dict) and ("error" in sec or "skipped" in sec):
            t = Table(key)
            t.note(f"{key}: NOT RUN — {sec.get('error') or sec.get('skipped')}")
            built.append(t)
            continue
        built.append(build(sec))
    parts = [header(res), targets(built).render()] if header_too else []
    parts += [t.render() for t in built]
    return "\n\n".join(p for p in parts if p) + "\n"

"""One table builder per section (see ``report`` for the table itself and the verdicts)."""

from __future__ import annotations

from typing import Any

from .report import Table, at_least, at_most, ms


def embed(s: dict[str, Any]) -> Table:
    t = Table(f"1. Embedding: {s['session_messages']}-message session ({s['session_bytes']:,} bytes), "
              f"{s['iterations_per_run']} saves per variant per run")
    t.note("In a row: metadata-only loads in blocks of "
           f"{s['runs'][0]['metadata_load']['block']} alternating with blocks of full loads, as a listing makes them.")
    for i, run in enumerate(s["runs"], 1):
        r = run["ratios"]
        for label, key, base, ratio_key in (("save(doc)", "guard_doc", "plain_doc", "guard_doc_vs_plain_doc"),
                                            ("save_bytes(count=N)", "guard_bytes", "plain_bytes",
                                             "guard_bytes_vs_plain_bytes")):
            for stat in ("median", "p90"):
                t.add(f"run {i}: {label} {stat}", ms(run[key][f"{stat}_ms"]),
                      f"plain durable save {ms(run[base][f'{stat}_ms'])}", r[ratio_key][stat], "≤ 1.10x",
                      verdict=at_most(r[ratio_key][stat], 1.10))
        t.add(f"run {i}: save_bytes without count, median", ms(run["guard_bytes_nocount"]["median_ms"]),
              f"plain durable save {ms(run['plain_bytes']['median_ms'])}",
              r["guard_bytes_nocount_vs_plain_bytes"]["median"], "reported")
        t.add(f"run {i}: the seed's fix as written, median", ms(run["seed_fix"]["median_ms"]),
              f"plain durable save {ms(run['plain_doc']['median_ms'])}", r["seed_fix_vs_plain_doc"]["median"],
              "reported")
        t.add(f"run {i}: save(doc) vs the seed's fix, median", ms(run["guard_doc"]["median_ms"]),
              f"seed's fix {ms(run['seed_fix']['median_ms'])}", r["guard_doc_vs_seed_fix"]["median"], "reported")
        t.add(f"run {i}: a shrinking save(doc) (keeps a version), median",
              ms(run["guard_shrink_saves"]["median_ms"]), f"plain durable save {ms(run['plain_doc']['median_ms'])}",
              r["guard_shrink_vs_plain_doc"]["median"], "reported")
        m, one = run["metadata_load"]["blocks"], run["metadata_load"]["one_for_one"]
        for stat in ("median", "p90"):
            t.add(f"run {i}: load(metadata_only=True) {stat}, in a row", ms(m["metadata_only"][f"{stat}_ms"], 4),
                  f"full load {ms(m['full'][f'{stat}_ms'])}", m[f"ratio_{stat}"], "≤ 0.05x",
                  verdict=at_most(m[f"ratio_{stat}"], 0.05))
        t.add(f"run {i}: load(metadata_only=True) median, one for one with full loads",
              ms(one["metadata_only"]["median_ms"], 4), f"full load {ms(one['full']['median_ms'])}",
              one["ratio_median"], "≤ 0.05x", verdict=at_most(one["ratio_median"], 0.05))
    return t


def _per_eval(m: dict[str, Any]) -> float | None:
    e = m.get("evaluations_per_write")
    return round(m["cpu_ms_per_1000_writes"] / e, 1) if e else None


def events(s: dict[str, Any]) -> Table:
    t = Table("2a. Daemon event path: a writer as fast as it can, with and without the daemon")
    for label, e in s.items():
        ld, new, old = e["load"], e["new"], e.get("old")
        what = f"{label} ({ld['sessions']} × {ld['start_msgs']}+ msgs, {ld['writes']:,} writes)"
        base = f"no daemon {e['baseline_writes_per_s']:.0f}/s"
        t.add(f"{what}: writer rate", f"{new['writes_per_s']:.0f}/s", base, new["ratio_writes_per_s_vs_none"],
              "≥ 0.9x", verdict=at_least(new["ratio_writes_per_s_vs_none"], 0.9))
        t.add(f"{what}: writer rate, each round against its own no-daemon run",
              f"median of {len(new['round_ratios_writes_per_s'])}",
              f"{min(new['round_ratios_writes_per_s']):.2f}x–{max(new['round_ratios_writes_per_s']):.2f}x",
              new["median_round_ratio_writes_per_s"], "reported")
        t.add(f"{what}: drain after the last write (median; max)",
              f"{new['drain_ms']:.1f} ms; {new['drain_ms_max']:.1f} ms", f"idle sync {new['idle_sync_ms']:.1f} ms",
              None, "< 100 ms", verdict=at_most(new["drain_ms_max"], 99.999))
        floor = f"read+parse floor {e['floor_cpu_ms_per_1000_writes']:.0f} ms"
        t.add(f"{what}: daemon CPU per 1,000 writes", f"{new['cpu_ms_per_1000_writes']:.0f} ms", floor,
              new["ratio_cpu_vs_floor"], "≤ 2x" if label == "large" else "reported",
              verdict=at_most(new["ratio_cpu_vs_floor"], 2.0) if label == "large" else "")
        t.add(f"{what}: evaluations per write; CPU per 1,000 evaluations",
              f"{new['evaluations_per_write']:.2f}; {_per_eval(new)} ms", "", None, "reported")
        for group, c in new["cpu_by_thread_per_1000_writes"].items():
            t.add(f"{what}: CPU per 1,000 writes in {group}", f"{c['user_ms'] + c['sys_ms']:.0f} ms",
                  f"user {c['user_ms']:.0f} + system {c['sys_ms']:.0f} ms", None, "reported")
        if old:
            t.add(f"{what}: 0.1.0 writer rate", f"{old['writes_per_s']:.0f}/s", base, old["ratio_writes_per_s_vs_none"],
                  "reported")
            t.add(f"{what}: 0.1.0 drain (median; max)", f"{old['drain_ms']:.1f} ms; {old['drain_ms_max']:.1f} ms",
                  f"idle sync {old['idle_sync_ms']:.1f} ms", None, "reported")
            t.add(f"{what}: 0.1.0 CPU per 1,000 writes", f"{old['cpu_ms_per_1000_writes']:.0f} ms", floor,
                  old["ratio_cpu_vs_floor"], "reported")
            t.add(f"{what}: 0.1.0 evaluations per write; CPU per 1,000 evaluations",
                  f"{old['evaluations_per_write']:.2f}; {_per_eval(old)} ms", "", None, "reported")
            t.add(f"{what}: CPU per 1,000 writes, this tree vs 0.1.0", f"{new['cpu_ms_per_1000_writes']:.0f} ms",
                  f"0.1.0 {old['cpu_ms_per_1000_writes']:.0f} ms", e["ratio_cpu_new_vs_old"], "≤ 1.00x (no worse)",
                  verdict=at_most(e["ratio_cpu_new_vs_old"], 1.0))
        t.add(f"{what}: content-aware check, its calls timed", f"{new['check_ms_per_1000_writes']:.2f} ms per 1,000",
              f"daemon CPU {new['cpu_ms_per_1000_writes']:.0f} ms", new["check_share_of_cpu"], "≤ 0.05x",
              verdict=at_most(new["check_share_of_cpu"], 0.05))
        if "nocheck" in e:
            nc = e["nocheck"]
            t.add(f"{what}: content-aware check, A/B (bypassed)", f"{nc['cpu_ms_per_1000_writes']:.0f} ms without",
                  f"with {new['cpu_ms_per_1000_writes']:.0f} ms", e["ab_check_share_of_cpu"], "reported (noisy)")
    t.note("CPU is utime + stime of the daemon process from /proc (10 ms ticks), from before the first write "
           "until `sync` returns; the floor is the same files opened, read and parsed once per write in one loop.")
    return t


def latency(s: dict[str, Any]) -> Table:
    t = Table(f"2b. Wipe → durable version of the 1,000-message session ({s['wipes']} wipes, pin {s['pin']})")
    v, w, sy = s["version_appears"], s["writer_wipe_save"], s["sync_returns"]
    t.add("version file visible, median", ms(v["median_ms"], 2), f"writer's wipe save {ms(w['median_ms'], 2)}",
          s["ratio_median_vs_wipe_save"], "reported")
    t.add("version file visible, p99", ms(v["p99_ms"], 2), f"writer's wipe save {ms(w['p99_ms'], 2)}",
          s["ratio_p99_vs_wipe_save"], "reported")
    t.add("sync returns (durable), median", ms(sy["median_ms"], 2), "", None, "reported")
    t.add("versions kept / wipes; time-outs", f"{s['versions_kept_by_daemon']} / {s['wipes']}; {s['timeouts']}",
          "", None, "every wipe kept", verdict="MET" if s["versions_kept_by_daemon"] >= s["wipes"] and not s["timeouts"]
          else "MISSED")
    return t


def _starts(t: Table, n: str, row: dict[str, Any], *, scale: bool) -> None:
    f, r, f1, f2 = row["first_start"], row["restart"], row["floor_first_start"], row["floor_restart"]
    starts = row.get("first_starts_s", [f["launch_to_ready_s"]])  # results from before the pairs have one
    floors = row.get("floors_first_start_s", [f1["seconds"]])
    many = f" (median of {len(starts)})" if len(starts) > 1 else ""
    t.add(f"{n}: first start, launch → READY{many}", f"{row.get('median_first_start_s', starts[0]):.2f} s",
          f"read+parse+copy+syncfs {row.get('median_floor_first_start_s', floors[0]):.2f} s",
          row["ratio_first_start_vs_floor"], "reported (the scan's ratio)" if scale else "≤ 2x",
          verdict="" if scale else at_most(row["ratio_first_start_vs_floor"], 2.0))
    if len(starts) > 1:
        t.add(f"{n}: first start, each pair (floor, then start)", " / ".join(f"{x:.2f} s" for x in starts),
              "floors " + " / ".join(f"{x:.2f} s" for x in floors),
              None, "reported: " + " / ".join(f"{x:.2f}x" for x in row["pair_ratios_first_start"]))
    t.add(f"{n}: restart after a clean stop, launch → READY", f"{r['launch_to_ready_s']:.2f} s",
          f"scandir+stat {f2['seconds']:.2f} s", row["ratio_restart_vs_floor"], "≤ 2x" if scale else "reported",
          verdict=at_most(row["ratio_restart_vs_floor"], 2.0) if scale else "")
    e = row["empty_tree_start"]
    t.add(f"{n}: the same daemon over an empty tree, launch → READY", f"{e['launch_to_ready_s']:.2f} s", "", None,
          "reported")
    t.add(f"{n}: RSS after first start; after restart", f"{row['rss_MiB_first']} MiB; {row['rss_MiB_restart']} MiB",
          f"empty tree {row['rss_MiB_empty']} MiB", None, "< 400 MiB" if scale else "reported",
          verdict=at_most(max(row["rss_MiB_first"], row["rss_MiB_restart"]), 399.999) if scale else "")
    t.add(f"{n}: high-water RSS, first start; restart", f"{row['hwm_MiB_first']} MiB; {row['hwm_MiB_restart']} MiB",
          "", None, "reported")
    t.add(f"{n}: restart read no session file", "yes" if row["restart_read_nothing"] else "NO",
          f"scan: {r['scan']}", None, "reported")
    t.add(f"{n}: clean stop (writes pins.cache)", f"{f['clean_stop_s']:.2f} s", "", None, "reported")
    if "store_sweep_ms" in r:  # results from before the sweep moved after READY have none
        t.add(f"{n}: the store's leftovers sweep after READY, first start; restart",
              f"{f['store_sweep_ms']} ms; {r['store_sweep_ms']} ms", "", None, "reported")


def startup(s: dict[str, Any]) -> Table:
    t = Table("3. Start-up: small (5-message) sessions")
    for n, row in s["sizes"].items():
        _starts(t, f"{int(n):,} sessions", row, scale=False)
    return t


def scale(s: dict[str, Any]) -> Table:
    n = s["sessions"]
    t = Table(f"4. --scale: {n:,} sessions" + (f" (asked {s['asked']:,}: the disk held no more)"
                                                 if s.get("reduced_to_fit") else ""))
    _starts(t, f"{n:,} sessions", s, scale=True)
    t.note(f"Section time {s.get('section_seconds')} s (generation, floors, both starts, clean-up).")
    return t


def zstd(s: dict[str, Any]) -> Table:
    t = Table(f"5. Compressed pins: {s['sessions']} sessions of real text ({s['message_counts'][0]}–"
              f"{s['message_counts'][-1]} messages), {s['writes_per_run']:,} appending writes and "
              f"{s['wipes_per_run']} wipes per run, {s['reps']} run(s) per method")
    c, z, a, r = s["copy"], s["zstd"], s["auto"], s["ratios_zstd_vs_copy"]
    for mode, m in (("copy", c), ("zstd", z), ("auto", a)):
        t.add(f"pin = {mode}: pins' disk as a share of the sessions'",
              f"{m['pins_bytes']['disk'] / 1e6:.1f} MB", f"sessions {m['sessions_bytes']['disk'] / 1e6:.1f} MB",
              m["pins_share_disk"], "reported")
    t.add("pin = zstd: pins' apparent bytes as a share", f"{z['pins_bytes']['apparent'] / 1e6:.2f} MB",
          f"sessions {z['sessions_bytes']['apparent'] / 1e6:.2f} MB", z["pins_share_apparent"], "reported")
    lo = s["lorem_content"]
    t.add("zstd on make_session's repeated sentence (same counts)", f"{lo['zstd_bytes'] / 1e6:.2f} MB",
          f"sessions {lo['session_bytes'] / 1e6:.2f} MB", lo["share"], "reported")
    t.add("daemon CPU per 1,000 writes, zstd vs copy", f"{z['cpu_ms_per_1000_writes']:.0f} ms",
          f"copy {c['cpu_ms_per_1000_writes']:.0f} ms", r["cpu_per_write"], "reported")
    t.add("daemon CPU per 1,000 writes, auto (default) vs copy", f"{a['cpu_ms_per_1000_writes']:.0f} ms",
          f"copy {c['cpu_ms_per_1000_writes']:.0f} ms", s["ratio_cpu_auto_vs_copy"], "reported")
    t.add("capture (wipe → version visible), median, zstd vs copy", ms(z["capture_median_ms"], 2),
          f"copy {ms(c['capture_median_ms'], 2)}", r["capture_median"], "reported")
    t.add("capture, p99, zstd vs copy", ms(z["capture_p99_ms"], 2), f"copy {ms(c['capture_p99_ms'], 2)}",
          r["capture_p99"], "reported")
    t.add("capture until sync returns (durable), median, zstd; copy", ms(z["capture_sync_median_ms"], 2),
          f"copy {ms(c['capture_sync_median_ms'], 2)}", None, "reported")
    t.add("wipes kept: zstd; copy; auto",
          f"{z['captures_kept']}; {c['captures_kept']}; {a['captures_kept']}",
          f"time-outs {z['capture_timeouts'] + c['capture_timeouts'] + a['capture_timeouts']}", None, "reported")
    return t


def write_amp(s: dict[str, Any]) -> Table:
    t = Table(f"2e. Write amplification: {s['writes']} rename writes of a ~{s['session_bytes_at_start'] // 1000} KB "
              "session" + (f" ({s['filesystem']})" if s.get("filesystem") else " (ext4)"))
    for pattern, rows in s["patterns"].items():
        nv = rows["naive"]
        for mode, m in rows.items():
            if mode == "naive":
                continue
            cancelled = m["watcher_cancelled_write_bytes_per_MB"] / 1e6
            t.add(f"{pattern}, {mode}: bytes written per MB", f"{m['watcher_write_bytes_per_MB'] / 1e6:.3f} MB"
                  + (f" ({cancelled:.3f} MB cancelled)" if cancelled >= 0.01 else ""),
                  f"naive copier {nv['watcher_write_bytes_per_MB'] / 1e6:.3f} MB", m["ratio_write_bytes_vs_naive"],
                  "reported")
            t.add(f"{pattern}, {mode}: store growth per MB", f"{m['store_bytes_added_per_MB'] / 1e6:.3f} MB",
                  f"naive copier {nv['store_bytes_added_per_MB'] / 1e6:.3f} MB", m["ratio_store_growth_vs_naive"],
                  "reported")
            if m.get("daemon_evaluations") is not None:
                t.add(f"{pattern}, {mode}: evaluations", str(m["daemon_evaluations"]), f"writes {s['writes']}",
                      None, "reported")
    return t


def _ran(t: Table, label: str, s: dict[str, Any], key: str) -> bool:
    """Whether a profile section has its *key*; if not, a note says why it did not run."""
    if key in s:
        return True
    t.note(f"{label}: NOT RUN — {s.get('error') or s.get('skipped')}")
    return False


def profile(sections: dict[str, Any]) -> Table:
    t = Table("Profile of the event path: the daemon while a writer appends (CPU from /proc, busy time from py-spy)")
    for label, s in sections.items():
        if not _ran(t, label, s, "stages"):
            continue
        what = f"{label} ({s['sessions']} × {s['start_msgs']}+ msgs)"
        t.add(f"{what}: daemon CPU per 1,000 writes", f"{s['cpu_ms_per_1000_writes']:.0f} ms",
              f"{s['evaluations'] / s['writes']:.2f} evaluations per write")
        for group, c in s["cpu_by_thread_per_1000_writes"].items():
            t.add(f"{what}: CPU in {group}", f"{c['user_ms'] + c['sys_ms']:.0f} ms per 1,000 writes",
                  f"user {c['user_ms']:.0f} + system {c['sys_ms']:.0f} ms")
        for stage, share in s["stages"]:
            t.add(f"{what}, busy in: {stage}", f"{share * 100:.1f}%")
        for fn, share in s["self"][:10]:
            t.add(f"{what}, self: {fn}", f"{share * 100:.1f}%")
        for fn, share in s["self_lines"][:6]:
            t.add(f"{what}, self, by line: {fn}", f"{share * 100:.1f}%")
        t.note(f"{what}: {s['writes']:,} writes, py-spy at {s['rate_hz']} Hz: {s['samples']} busy samples "
               f"({s['active_sample_s']} s) against {s['daemon_cpu_s']} s of CPU; {s['idle_samples']} samples of "
               "threads waiting for work left out. Percentages are of the busy samples (running or in a system call).")
    return t


def perf(sections: dict[str, Any]) -> Table:
    t = Table("The worker thread's CPU by system call and library (perf, cpu-clock, while a writer appends)")
    for label, s in sections.items():
        if not _ran(t, label, s, "buckets"):
            continue
        what = f"{label} ({s['sessions']} × {s['start_msgs']}+ msgs)"
        per = s["worker_cpu_ms_per_1000_writes"]
        t.add(f"{what}: worker CPU per 1,000 writes (/proc)", f"{per:.0f} ms", f"{s['samples']} perf samples")
        for bucket, share in s["buckets"][:12]:
            t.add(f"{what}: {bucket}", f"{share * 100:.1f}%", f"≈ {share * per:.0f} ms per 1,000 writes")
    return t


def pinpath(sections: dict[str, Any]) -> Table:
    first = next(iter(sections.values()))
    t = Table(f"The event path's file operations one by one ({first['iterations']} iterations each, interleaved; "
              "medians)")
    for label, s in sections.items():
        for name, o in s["ops"].items():
            t.add(f"{label} ({s['session_bytes']:,} bytes): {name}",
                  f"{o['cpu_ms_median']:.3f} ms CPU (mean {o['cpu_ms_mean']:.3f})",
                  f"wall {o['wall_ms_median']:.3f} ms")
    return t


def interference(s: dict[str, Any]) -> Table:
    t = Table(f"What slows 2a's small writer: {s['sessions']} sessions, {s['writes']:,} writes a run, "
              f"{s['rounds']} rounds, each mode once a round (medians; opt-in section)")
    alone = s["modes"]["alone"]["writes_per_s"]
    for mode, m in s["modes"].items():
        if mode == "alone":
            continue
        cpu = m.get("daemon_cpu_ms_per_1000_writes")
        t.add(f"writer rate beside: {mode}", f"{m['writes_per_s']:.0f}/s",
              f"writer alone {alone:.0f}/s" + ("" if cpu is None else f"; daemon CPU {cpu:.0f} ms per 1,000 writes"),
              m["median_round_ratio"], "reported")
    t.note("Ratio: the median over rounds of the rate against the writer alone in the same round "
           "(ratio of the medians in the results file).")
    return t

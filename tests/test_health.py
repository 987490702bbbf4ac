"""What an admin sees of the daemon's health: status, its exit code, metrics, one daemon per store.

Real daemons on real directories; the metrics are checked with Debian's
``promtool check metrics`` (scripts/bootstrap puts it in .venv/bin) and parsed
with ``prometheus_client``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemonproc import DaemonProc, eventually
from sghelpers import make_session, server_write

SID = "abc123def456"
PROMTOOL = Path(sys.executable).parent / "promtool"


def ctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sessionguard.ctl", "--socket", sock, *args],
                          capture_output=True, text=True, timeout=60)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_missing_watch_directory_is_degraded_and_status_exits_4(tmp_path: Path, daemons) -> None:
    present, missing = tmp_path / "present", tmp_path / "missing"
    present.mkdir()
    server_write(present / f"{SID}.json", make_session(3))
    cfg = tmp_path / "sg.toml"
    cfg.write_text(f'[[watch]]\npath = "{present}"\n\n[[watch]]\npath = "{missing}"\n')
    d = daemons("--config", str(cfg))
    p = ctl(d.socket, "status")
    assert p.returncode == 4, p.stdout + p.stderr
    assert str(missing) in p.stdout and "no such directory" in p.stdout
    j = d.call("status")
    assert any(str(missing) in why for why in j["degraded"])
    by_path = {w["path"]: w for w in j["watches"]}
    assert by_path[str(missing)]["degraded"] and not by_path[str(present)]["degraded"]
    missing.mkdir()  # it appears: watched, and healthy again
    eventually(lambda: ctl(d.socket, "status").returncode == 0, what="status healthy once the directory exists")


def test_metrics_are_valid_exposition_with_a_series_per_watch(tmp_path: Path, daemons) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    server_write(a / f"{SID}.json", make_session(5))
    cfg = tmp_path / "sg.toml"
    cfg.write_text(f'[[watch]]\npath = "{a}"\n\n[[watch]]\npath = "{b}"\n')
    d = daemons("--config", str(cfg))
    server_write(a / f"{SID}.json", make_session(0))
    d.sync()
    text = d.call("metrics")["text"]
    if PROMTOOL.exists() or shutil.which("promtool"):
        tool = str(PROMTOOL) if PROMTOOL.exists() else "promtool"
        check = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    got = samples(text)
    assert got[("sessionguard_up", (("watch", str(a)),))] == 1
    assert got[("sessionguard_up", (("watch", str(b)),))] == 0, "a missing directory is down"
    assert got[("sessionguard_sessions_tracked", (("watch", str(a)),))] == 1
    assert got[("sessionguard_store_versions", (("watch", str(a)),))] == 1
    assert got[("sessionguard_shrinks_total", (("class", "wipe"),))] == 1
    assert got[("sessionguard_last_shrink_timestamp_seconds", ())] > 0
    assert got[("sessionguard_degraded", ())] == 1
    assert any(name == "sessionguard_build_info" for name, _ in got)


def test_counts_are_exact_at_the_moment_of_the_call(sdir: Path, daemons) -> None:
    """No reconcile in between: versions and bytes come from the running tally."""
    d = daemons("--watch", str(sdir), "--reconcile-interval", "3600")
    server_write(sdir / f"{SID}.json", make_session(7))
    d.sync()
    server_write(sdir / f"{SID}.json", make_session(0))
    d.sync()
    st = d.call("status")
    on_disk = [p for p in (sdir / ".sessionguard" / "sessions" / SID).iterdir()]
    assert st["versions"] == len(on_disk) == 1
    assert st["store_bytes"] == sum(p.stat().st_size for p in on_disk)
    assert st["last_shrink"]["sid"] == SID


def test_one_daemon_per_store(sdir: Path, tmp_path: Path, daemons) -> None:
    server_write(sdir / f"{SID}.json", make_session(3))
    first = daemons("--watch", str(sdir))
    (tmp_path / "second").mkdir()
    second = DaemonProc(tmp_path / "second", ["--watch", str(sdir)])
    try:
        code = second.proc.wait(60)
        assert code == 1, second.text()
        assert "another sessionguardd already serves this store" in second.text()
        failed = second.events("daemon.failed")  # one clear line, no traceback of the stop after it
        assert [e.get("error") for e in failed] == ["another sessionguardd already serves this store"], failed
        assert "exception" not in failed[0], failed
        assert os.path.exists(second.socket) is False, "the second daemon opened no socket"
    finally:
        second.stop()
    first.assert_alive()
    server_write(sdir / f"{SID}.json", make_session(0))
    first.sync()
    assert (sdir / ".sessionguard" / "sessions" / SID).is_dir(), "the first daemon still guards the store"


@pytest.mark.parametrize("flag", ["--version"])
def test_the_client_says_its_version(flag: str) -> None:
    p = subprocess.run([sys.executable, "-m", "sessionguard.ctl", flag], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("sessionguardctl ")

"""The nspawn harness itself: boot, run a Type=notify unit, shut down."""

from __future__ import annotations

import time
from pathlib import Path

import nspawn
import pytest

# A Type=notify service whose main process is a few lines of Python: it tells
# systemd READY=1 and a STATUS= over $NOTIFY_SOCKET itself, then sleeps.
NOTIFY_CODE = ("import os, socket, time; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
               "s.connect(os.environ['NOTIFY_SOCKET']); s.send(b'READY=1\\\\nSTATUS=harness ok'); time.sleep(3600)")
NOTIFY_UNIT = f"""\
[Unit]
Description=harness self-test (Type=notify)

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/python3 -c "{NOTIFY_CODE}"
"""


@pytest.mark.root
@pytest.mark.slow
def test_boot_notify_unit_and_shutdown(nspawn_ok: None, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with nspawn.booted_systemd(extra_units=[("sg-notify-test.service", NOTIFY_UNIT)]) as c:
        print(f"container booted in {c.boot_seconds:.1f}s (pid {c.pid})")
        assert c.run(["systemctl", "is-system-running"], check=False).stdout.strip() in (
            "running",
            "degraded",
        )
        c.systemctl("start", "sg-notify-test.service")
        props = c.show("sg-notify-test.service", "ActiveState", "SubState", "StatusText", "Type")
        assert props == {
            "ActiveState": "active",
            "SubState": "running",
            "StatusText": "harness ok",
            "Type": "notify",
        }, c.journal("sg-notify-test.service")
        assert "active (running)" in c.systemctl("status", "sg-notify-test.service", check=False).stdout
        c.systemctl("stop", "sg-notify-test.service")
        assert not c.is_active("sg-notify-test.service")
        nspawn_proc = c.nspawn
    # left the with-block: powered off and reaped
    assert nspawn_proc.poll() is not None
    for base in nspawn._cgroup_bases():
        assert not (base / "payload").exists(), f"leftover cgroup {base / 'payload'}"
    print(f"boot + test + shutdown: {time.monotonic() - t0:.1f}s")

"""Log shipping through a real shipper: rsyslogd with packaging/logship/rsyslog.conf, unchanged.

A real sessionguardd (tests/daemonproc.py) watches a directory in which a
session is wiped; its JSON lines become the file the shipped config reads
(``/var/log/sessionguard/sessionguard.jsonl``). rsyslogd runs with that config,
included by a main config holding only Debian's ``$WorkDirectory`` line, in a
private mount and network namespace: ``/var/log``, ``/var/spool`` and ``/run``
are tmpfs there (nothing on the host is touched) and ``127.0.0.1:5140``, where
the shipped config forwards, is a TCP listener of this test that no other
process on the machine can collide with. The test asserts what arrives there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sghelpers import make_session, server_write

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "packaging" / "logship" / "rsyslog.conf"
SID = "abc123def456"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: private mount and network namespaces"),
    pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="no rsyslogd (scripts/bootstrap installs it)"),
]

# Run inside `unshare --mount --net`: tmpfs on /var/log, /var/spool and /run, loopback up,
# a TCP listener on the shipped config's target, rsyslogd in the foreground; every line
# received is written to argv[3] until one is session.shrunk for argv[4] (or 60 s pass).
SHIP = textwrap.dedent("""
    import json, os, socket, subprocess, sys, time
    main_conf, events_file, received_file, sid = sys.argv[1:5]
    for d in ("/var/log", "/var/spool", "/run"):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", d], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.makedirs("/var/log/sessionguard")
    os.makedirs("/var/spool/rsyslog")
    with open(events_file, "rb") as src, open("/var/log/sessionguard/sessionguard.jsonl", "wb") as dst:
        dst.write(src.read())
    listener = socket.create_server(("127.0.0.1", 5140))
    rsyslogd = subprocess.Popen(["rsyslogd", "-n", "-f", main_conf, "-i", "/run/rsyslogd.pid"])
    listener.settimeout(60)
    conn, _ = listener.accept()
    conn.settimeout(1)
    buf, deadline, done = b"", time.monotonic() + 60, False
    with open(received_file, "wb") as out:
        while not done and time.monotonic() < deadline:
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\\n")
            for line in lines:
                out.write(line + b"\\n")
                out.flush()
                event = json.loads(line)
                done = done or (event.get("event") == "session.shrunk" and event.get("sid") == sid)
    rsyslogd.terminate()
    sys.exit(0 if rsyslogd.wait(30) in (0, -15) else 1)
""")


def test_rsyslog_ships_session_shrunk_with_its_fields(tmp_path: Path, sdir: Path, daemons: Any) -> None:
    # 1. a real daemon run in which a session is wiped
    server_write(sdir / f"{SID}.json", make_session(12))
    d = daemons("--watch", str(sdir))
    d.sync()
    server_write(sdir / f"{SID}.json", make_session(0))
    logged = d.wait_event("session.shrunk")
    d.wait_event("version.kept")
    assert d.stop() == 0
    assert (logged["sid"], logged["before"], logged["after"]) == (SID, 12, 0)

    # 2. rsyslogd with the shipped config on those lines
    main_conf = tmp_path / "rsyslog.conf"
    main_conf.write_text(f"$WorkDirectory /var/spool/rsyslog\n$IncludeConfig {SHIPPED}\n")
    check = subprocess.run(["rsyslogd", "-N1", "-f", str(main_conf)], capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "error" not in check.stderr.lower(), check.stderr
    script = tmp_path / "ship.py"
    script.write_text(SHIP)
    received = tmp_path / "received.jsonl"
    r = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", sys.executable, str(script),
                        str(main_conf), str(d.logfile), str(received), SID],
                       capture_output=True, text=True, timeout=120, check=False)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr

    # 3. what arrived: every event, session.shrunk with its fields as fields
    events = [json.loads(line) for line in received.read_text().splitlines()]
    print(json.dumps(events[-3:], indent=1))
    sent = [e["event"] for e in d.events()]
    assert [e["event"] for e in events] == sent[:len(events)], "in order, none lost"
    (shrunk,) = [e for e in events if e["event"] == "session.shrunk"]
    assert shrunk["sid"] == SID
    assert shrunk["class"] == "wipe"
    assert (shrunk["before"], shrunk["after"]) == (12, 0), "numbers stay numbers"
    assert shrunk["level"] == "warning" and shrunk["watch"] == str(sdir)
    assert shrunk["alert"] == "true" and shrunk["host"]
    assert [e for e in events if e.get("alert")] == [shrunk], "one alert per loss"
    started = next(e for e in events if e["event"] == "daemon.started")
    assert started["watches"][0]["path"] == str(sdir), "nested fields stay structured"

"""log.py and the journald renderer, in real processes writing to real streams and a real journal socket.

* stdlib records (the embedded library's events: logger ``sessionguard``,
  fields passed as ``extra=``) keep those fields in the JSON lines;
* ``log.set_level`` applies to loggers already in use (what a SIGHUP needs);
* under journald no value is a Python repr: lists and dicts are JSON, ``None``
  is left out, and a library event names its own line in CODE_FILE/LINE/FUNC.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

EMIT = textwrap.dedent("""
    import logging, sys
    from sessionguard import log
    fmt = sys.argv[1]
    renderer = None
    if fmt == "journal":
        from sessionguard import systemd
        renderer = systemd.journal_renderer
    sg = log.configure(fmt, "info", journal_renderer=renderer)
    lib = logging.getLogger("sessionguard")

    def library_save():
        lib.warning("session.shrunk sid=%s before=%s", "abc123", 7,
                    extra={"sg_event": "session.shrunk", "sid": "abc123", "reason": "shrink", "before": 7})

    library_save()
    logging.getLogger("watchdog.observers").warning("plain %s", "text")
    sg.info("daemon.started", watches=[{"path": "/s", "pin": "auto"}], config=None, ok=True, n=3)
    sg.debug("reconcile.completed", watch="/s")
    log.set_level("debug")
    sg.debug("reconcile.completed", watch="/s")
    lib.debug("library debug", extra={"sg_event": "pin.checked", "sid": "abc123"})
""")


def run_emit(tmp_path: Path, fmt: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    script = tmp_path / "emit.py"
    script.write_text(EMIT)
    return subprocess.run([*(wrap or []), sys.executable, str(script), fmt], capture_output=True, timeout=60,
                          check=False)


def test_library_events_keep_their_fields_in_json_lines(tmp_path: Path) -> None:
    r = run_emit(tmp_path, "json")
    assert r.returncode == 0, r.stderr.decode()
    events = [json.loads(line) for line in r.stdout.splitlines()]
    print(json.dumps(events, indent=1))
    by_name = {e["event"]: e for e in events}
    shrunk = by_name["session.shrunk"]
    assert (shrunk["sid"], shrunk["reason"], shrunk["before"], shrunk["level"]) == ("abc123", "shrink", 7, "warning")
    assert shrunk["message"] == "session.shrunk sid=abc123 before=7"
    assert shrunk["timestamp"].endswith("Z")
    assert "sg_event" not in shrunk and "_record" not in shrunk
    plain = by_name["watchdog.observers.log"]
    assert plain["message"] == "plain text" and plain["level"] == "warning"
    started = by_name["daemon.started"]
    assert started["watches"] == [{"path": "/s", "pin": "auto"}] and started["config"] is None


def test_set_level_applies_to_loggers_already_in_use(tmp_path: Path) -> None:
    r = run_emit(tmp_path, "json")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    names = [e["event"] for e in events]
    assert names.count("reconcile.completed") == 1, "info drops the first debug line, debug lets the second through"
    assert names.index("reconcile.completed") > names.index("daemon.started")
    assert next(e for e in events if e["event"] == "pin.checked")["sid"] == "abc123"


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native protocol: ``KEY=value\\n``, or ``KEY\\n<le64 size><bytes>\\n`` for values with newlines."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            value = data[nl + 9:nl + 9 + size]
            i = nl + 9 + size + 1
        fields[key.decode()] = value.decode()
    return fields


# Binds /run/systemd/journal/socket (in a private mount namespace with a tmpfs on
# /run), runs the command in argv[2:], then writes every datagram (hex) to argv[1].
COLLECT = textwrap.dedent("""
    import json, os, socket, subprocess, sys
    os.makedirs("/run/systemd/journal", exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("/run/systemd/journal/socket")
    rc = subprocess.run(sys.argv[2:]).returncode
    s.setblocking(False)
    out = []
    while True:
        try:
            out.append(s.recv(1 << 20).hex())
        except BlockingIOError:
            break
    json.dump({"rc": rc, "datagrams": out}, open(sys.argv[1], "w"))
""")


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a private mount namespace with its own /run")
def test_journal_values_are_never_python_reprs(tmp_path: Path) -> None:
    pytest.importorskip("systemd.journal")
    (tmp_path / "emit.py").write_text(EMIT)
    (tmp_path / "collect.py").write_text(COLLECT)
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount -t tmpfs tmpfs /run && exec "$@"', "sh", sys.executable, str(tmp_path / "collect.py"),
                        str(result), sys.executable, str(tmp_path / "emit.py"), "journal"],
                       capture_output=True, timeout=60, env=env, check=False)
    assert r.returncode == 0, r.stderr.decode()
    collected: dict[str, Any] = json.loads(result.read_text())
    assert collected["rc"] == 0
    entries = {e["SESSIONGUARD_EVENT"]: e for e in (parse_native(bytes.fromhex(d)) for d in collected["datagrams"])}
    print(json.dumps(entries, indent=1, sort_keys=True))
    started = entries["daemon.started"]
    assert json.loads(started["SESSIONGUARD_WATCHES"]) == [{"path": "/s", "pin": "auto"}]
    assert "SESSIONGUARD_CONFIG" not in started, "None is left out, not written as 'None'"
    assert (started["SESSIONGUARD_OK"], started["SESSIONGUARD_N"]) == ("true", "3")
    assert "None" not in started["MESSAGE"] and "'" not in started["MESSAGE"]
    shrunk = entries["session.shrunk"]
    assert (shrunk["SESSIONGUARD_SESSION"], shrunk["SESSIONGUARD_REASON"], shrunk["SESSIONGUARD_COUNT_BEFORE"]) == (
        "abc123", "shrink", "7")
    assert shrunk["PRIORITY"] == "4" and shrunk["MESSAGE_ID"] == "7b8f0c9e2a0b4d6c9a31f5e2d4c8b1a0"
    # the library's own line, not logging's or the renderer's
    assert shrunk["CODE_FILE"] == str(tmp_path / "emit.py") and shrunk["CODE_FUNC"] == "library_save", shrunk
    assert int(shrunk["CODE_LINE"]) == EMIT.splitlines().index(
        '    lib.warning("session.shrunk sid=%s before=%s", "abc123", 7,') + 1
    assert entries["watchdog.observers.log"]["SESSIONGUARD_MESSAGE"] == "plain text"
    assert entries["pin.checked"]["SESSIONGUARD_SESSION"] == "abc123"
    for entry in entries.values():
        for key, value in entry.items():
            assert key.replace("_", "A").isalnum() and key.isupper(), key
            assert not value.startswith(("[{'", "{'", "None")), (key, value)


def test_the_readme_catalogue_names_every_event_the_code_logs() -> None:
    """An admin writes alerts from the README's table: an event missing there is one
    nobody alerts on. Every event name logged or emitted in the package must be in it."""
    root = Path(__file__).resolve().parents[1]
    src = "\n".join(p.read_text() for p in (root / "daemon" / "sessionguard").glob("*.py"))
    logged = set(re.findall(r"\b(?:log\.(?:debug|info|warning|error|exception)|emit)\(\s*\"([a-z_]+\.[a-z_]+)\"", src))
    readme = (root / "README.md").read_text()
    section = readme.split("\n## Log events\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", section))
    assert len(logged) > 40, sorted(logged)  # the pattern still finds the calls
    assert sorted(logged - listed) == [], "events logged but not in the README's Log events table"

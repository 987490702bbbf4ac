"""sessionguardctl's command line, views and exit codes, against a STUB server.

The server is the real ``ControlServer`` on a real socket, but its backend is
``sgbackend.CannedBackend``: canned results of the documented shapes, no
semantics. So these tests check what the client makes of a result (escaping,
alignment, exit codes, the params it sends); what the daemon's results mean is
tested against the real daemon in test_ctl.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import orjson
import pytest

from sessionguard import ctl_format
from sessionguard.control import ControlServer
from sessionguard.ctl_views import shell_quote
from sessionguard.params import parse_when
from sessionguard.paths import SOCKET_ENV
from sgbackend import CANNED, PRE, VERSION, WATCH, CannedBackend, Recorder, rmtree, short_tmpdir

CTL = [sys.executable, "-m", "sessionguard.ctl"]
SID = "abc123def456"

#: Session ids and contents a hostile directory owner can write: CSI colour, clear screen,
#: an OSC title with BEL, a C1 CSI, a bidi override, a line separator, a bare CR.
EVIL_IDS = ["evil\x1b[31m", "\x1b[2J", "c1\x9b31m", "rtl\u202eexe.json", "ls\u2028x", "cr\rover"]
EVIL_CONTENT = "hi \x1b]0;pwned\x07 there \x1b[2J\x9b1m\u202e!"
RAW_FORBIDDEN = [b"\x1b", b"\x07", b"\r", "\x9b".encode(), "\u202e".encode(), "\u2028".encode()]


@pytest.fixture
def stub():
    """(socket path, backend): a real ControlServer over a CannedBackend."""
    d = short_tmpdir("sgv")
    backend = CannedBackend()
    srv = ControlServer(backend, path=os.path.join(d, "ctl.sock"), logger=Recorder())
    srv.start()
    yield srv.path, backend
    srv.stop()
    rmtree(d)


def run(sock: str | None, *args: str, env: dict[str, str] | None = None,
        cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    full_env.update(env or {})
    cmd = [*CTL, *(["--socket", sock] if sock else []), *args]
    return subprocess.run(cmd, capture_output=True, timeout=60, env=full_env, cwd=cwd, check=False)


def text(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stdout.decode()


# -- terminal safety -----------------------------------------------------------------------


def _no_raw_controls(raw: bytes) -> None:
    for bad in RAW_FORBIDDEN:
        assert bad not in raw, (bad, raw[:2000])


def test_list_escapes_ids_and_aligns_by_display_width(stub):
    path, backend = stub
    row = CANNED["list"]["sessions"][1]
    ids = [*EVIL_IDS, "会话二三", "cafe\u0301-x", "plain"]
    backend.results["list"] = {"sessions": [dict(row, sid=i, watch="/srv/\x1b[1mw") for i in ids]}
    p = run(path, "list")
    assert p.returncode == 0, p.stderr
    _no_raw_controls(p.stdout)
    out = text(p)
    for escaped in ["evil\\x1b[31m", "\\x1b[2J", "c1\\x9b31m", "rtl\\u202eexe.json", "ls\\u2028x", "cr\\x0dover",
                    "/srv/\\x1b[1mw"]:
        assert escaped in out, escaped
    lines = out.splitlines()
    header = lines[0]
    state_at = ctl_format.width(header[: header.index("STATE")])
    for line in lines[1:]:  # the STATE column starts at the same cell on every row
        cut = next(i for i in range(len(line)) if line[i:].startswith("ok"))
        assert ctl_format.width(line[:cut]) == state_at, line


def test_show_messages_and_diff_escape_content(stub):
    path, backend = stub
    msgs = [{"role": "user", "content": EVIL_CONTENT}, {"role": "assistant\x1b[5m", "content": "line\nbreak"}]
    backend.results["show"] = dict(CANNED["show"], sid=EVIL_IDS[0], id="\x1b[2J", messages=msgs, total=2)
    p = run(path, "show", SID, "--messages")
    assert p.returncode == 0, p.stderr
    _no_raw_controls(p.stdout)
    assert "hi \\x1b]0;pwned\\x07 there \\x1b[2J\\x9b1m\\u202e!" in text(p)
    assert "assistant\\x1b[5m: line break" in text(p)
    backend.results["diff"] = dict(CANNED["diff"], missing=[{"index": 3, "message": msgs[0]}])
    p = run(path, "diff", SID)
    assert p.returncode == 0, p.stderr
    _no_raw_controls(p.stdout)
    assert "\\x1b]0;pwned" in text(p)


def test_history_and_restore_escape_and_quote_the_undo(stub):
    path, backend = stub
    evil = EVIL_IDS[0]
    backend.results["history"] = dict(CANNED["history"], sid=evil, versions=[dict(VERSION, reason="shr\x1bink")])
    p = run(path, "history", SID)
    _no_raw_controls(p.stdout)
    assert "shr\\x1bink" in text(p)
    backend.results["restore"] = dict(CANNED["restore"], sid=evil)
    p = run(path, "restore", SID)
    _no_raw_controls(p.stdout)
    undo = next(line for line in text(p).splitlines() if line.startswith("to undo: "))
    # the undo command is printed safely and, pasted into bash, gives back the exact id
    echo = subprocess.run(["bash", "-c", "printf %s " + shell_quote(evil)], capture_output=True, timeout=30,
                          check=False)
    assert echo.stdout == evil.encode() and shell_quote(evil) in undo


def test_display_width_and_escaping_helpers():
    assert ctl_format.width("会话") == 4 and ctl_format.width("e\u0301") == 1 and ctl_format.width("abc") == 3
    assert ctl_format.safe("a\x1b[31mb\x9b\u202e\u2028") == "a\\x1b[31mb\\x9b\\u202e\\u2028"
    assert ctl_format.safe(None) == "-" and ctl_format.safe("é 会") == "é 会"
    t = ctl_format.table(["ID", "N"], [("会话", 1), ("ab", 100)], right=(1,))
    assert t.splitlines() == ["ID      N", "会话    1", "ab    100"]
    assert ctl_format.clip("会话会话", 5) == "会话…"
    assert ctl_format.human_size(412.3 * 1024) == "412.3 KiB" and ctl_format.human_size(512) == "512 B"
    now = time.time()
    assert ctl_format.relative(datetime.fromtimestamp(now - 185, UTC), now) == "3 min ago"
    assert ctl_format.relative(datetime.fromtimestamp(now - 3 * 86400, UTC), now) == "3 days ago"
    assert shell_quote("abc") == "abc" and shell_quote("a b") == "'a b'"
    assert shell_quote("it's\x1b") == "$'it\\'s\\x1b'"


# -- status ------------------------------------------------------------------------------------


def test_status_blocks_like_resolvectl(stub):
    path, _ = stub
    p = run(path, "status")
    assert p.returncode == 0, p.stderr
    lines = text(p).splitlines()
    assert lines[0] == "Daemon" and "Watch /srv/chat/sessions" in lines
    w = lines.index("Watch /srv/chat/sessions")
    assert lines[w + 1].strip() == "Health: ok"
    assert any(line.strip() == "Pins: reflink (pin = auto)" for line in lines[w:])
    assert any(line.strip().startswith("Versions: 3 (805.4 KiB)") for line in lines[w:])
    colons = {line.index(":") for line in lines if ":" in line and not line.startswith("Watch")}
    assert len(colons) == 1, "labels are right-aligned to one column"


def test_status_degraded_first_highlighted_and_exit_4(stub):
    path, backend = stub
    bad_watch = dict(WATCH, path="/srv/gone", available=False, degraded=["/srv/gone: no such directory"])
    backend.results["status"] = dict(CANNED["status"], degraded=["store:/x: full \x1b[2J"],
                                     watches=[WATCH, bad_watch])
    p = run(path, "status")
    assert p.returncode == 4, p.stderr
    _no_raw_controls(p.stdout)  # not a TTY: no highlight escapes either
    lines = text(p).splitlines()
    assert lines[1].strip() == "DEGRADED: store:/x: full \\x1b[2J"
    g = lines.index("Watch /srv/gone")
    assert lines[g + 1].strip() == "DEGRADED: /srv/gone: no such directory"
    assert "no (directory not available)" in lines[g + 2]
    assert run(path, "--json", "status").returncode == 4
    backend.results["status"] = dict(CANNED["status"], watches=[bad_watch])  # a watch alone is enough
    assert run(path, "status").returncode == 4


def test_status_highlights_on_a_tty(stub):
    path, backend = stub
    backend.results["status"] = dict(CANNED["status"], degraded=["store:/x: full"])
    import pty

    main, child = pty.openpty()
    try:
        env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
        p = subprocess.run([*CTL, "--socket", path, "status"], stdout=child, stderr=subprocess.PIPE, timeout=60,
                           env=env, check=False)
        os.close(child)
        child = -1
        out = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        if child >= 0:
            os.close(child)
    assert p.returncode == 4
    assert b"\x1b[1;31m" in out and b"DEGRADED: store:/x: full\x1b[0m" in out


# -- exit codes and other views ------------------------------------------------------------------


def test_restore_prints_the_hint_first_and_exit_5_when_overwritten(stub):
    path, backend = stub
    overwritten = {"at": "2026-11-24T11:00:00+00:00", "restored_count": 1000, "count_after": 0}
    backend.results["restore"] = dict(CANNED["restore"], hint="the session file was written 3 s ago: the server "
                                                              "may still hold it in memory", overwritten=overwritten)
    p = run(path, "restore", SID)
    assert p.returncode == 5, p.stderr
    lines = text(p).splitlines()
    assert lines[0].startswith("note: the session file was written 3 s ago")
    assert lines[1].startswith(f"restored session {SID} from version {VERSION['id']}")
    assert any(line.startswith("to undo: sessionguardctl --socket") and line.endswith(f"restore {SID} {PRE['id']}")
               for line in lines)
    assert "was undone by a writer (now 0)" in lines[-1] and "stop the server" in lines[-1]
    assert run(path, "--json", "restore", SID).returncode == 5


def test_recover_rows_undo_and_exit_codes(stub):
    path, backend = stub
    rows = [dict(CANNED["recover"]["sessions"][0]),
            dict(CANNED["recover"]["sessions"][0], sid="deleted1", live="missing", before=None, after=40,
                 outcome="recreated"),
            dict(CANNED["recover"]["sessions"][0], sid="garbled", live="unparseable", before=None, after=12),
            dict(CANNED["recover"]["sessions"][0], sid="grew", before=30, after=30, version=None,
                 outcome="left alone", why="grew past the damage since")]
    backend.results["recover"] = dict(CANNED["recover"], sessions=rows)
    p = run(path, "recover", "--since", "2h")
    assert p.returncode == 0, p.stderr
    out = text(p)
    assert "0 → 1000" in out and "missing → 40" in out and "unparseable → 12" in out
    assert "recreated" in out and "left alone" in out
    undo = out.splitlines()[-1]
    assert undo.startswith("to undo this whole run: sessionguardctl")
    assert undo.endswith("recover --undo r20261124T120000-1")
    [kw] = backend.called("recover")
    assert abs(kw["since"] - (time.time() - 7200)) < 60 and kw["dry_run"] is False
    rows.append(dict(rows[0], sid="again", overwritten=True))
    assert run(path, "recover").returncode == 5
    rows.append(dict(rows[0], sid="bad", outcome="failed", why="locked"))
    assert run(path, "recover").returncode == 1
    backend.results["recover"] = dict(CANNED["recover"], sessions=[], run=None)
    assert "nothing to do" in text(run(path, "recover", "--dry-run"))


def test_errors_sync_and_unreachable_exit_codes(stub, tmp_path):
    path, backend = stub
    from sessionguard import errors

    backend.raises["history"] = errors.NotFound("no session 'x\x1b[2J'")
    p = run(path, "history", "x")
    assert p.returncode == 1 and b"\x1b" not in p.stderr and "no session 'x\\x1b[2J'" in p.stderr.decode()
    p = run(path, "--json", "history", "x")
    assert p.returncode == 1 and orjson.loads(p.stderr)["error"]["code"] == -32004
    backend.results["sync"] = {"synced": False}
    assert run(path, "sync", "--timeout", "1").returncode == 1
    backend.results["show"] = dict(CANNED["show"], messages=None, messages_error="invalid JSON")
    assert run(path, "show", SID, "--messages").returncode == 1
    assert run(path, "show", SID).returncode == 0
    assert run(str(tmp_path / "nope.sock"), "status").returncode == 3


def test_forget_prune_metrics_views(stub):
    path, backend = stub
    p = run(path, "forget", SID, "--before", "2026-11-24T10:00")
    assert p.returncode == 0 and "forgot session abc123def456 in /srv/chat/sessions: removed 2 files" in text(p)
    assert backend.called("forget")[0]["before"] == datetime(2026, 11, 24, 10, 0).timestamp()  # local time
    assert "removed 0 versions, freed 0 B" in text(run(path, "prune"))
    assert text(run(path, "metrics")) == CANNED["metrics"]["text"]


# -- the command line is the method table -----------------------------------------------------------


def test_arguments_become_params(stub, tmp_path):
    path, backend = stub
    run(path, "show", SID, "813c", "--most", "--messages", "--first", "5", "--limit", "10")
    kw = backend.called("show")[0]
    assert (kw["sid"], kw["version"], kw["most"], kw["messages"], kw["first"], kw["limit"]) == \
        (SID, "813c", True, True, 5, 10)
    run(path, "list", "--shrunk", "--all")
    assert backend.called("list")[0]["shrunk_only"] is True and backend.called("list")[0]["intended"] is True
    run(path, "restore", SID, "--dry-run", "--expect", "0123456789abcdef")
    assert backend.called("restore")[0]["expect"] == "0123456789abcdef"
    (tmp_path / "sessions").mkdir()
    for where in (["--watch", "sessions", "status"], ["status", "--watch", "sessions"]):
        run(path, *where, cwd=str(tmp_path))  # relative: resolved against the caller's directory
        assert backend.called("status")[-1]["watch"] == str(tmp_path / "sessions")
    for command in ("list", "prune", "recover", "history"):
        run(path, command, *([SID] if command == "history" else []), "--watch", str(tmp_path))
        assert backend.called(command)[-1]["watch"] == str(tmp_path), command


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["sync", "--timeout", "-1"], ["history"],
                                  ["metrics", "--watch", "/srv"], ["--watch", "/srv", "sync"],
                                  ["recover", "--since", "yesterday"], ["show", "x", "--limit", "0"],
                                  ["show", "x", "--first", "-1"]])
def test_usage_errors_exit_2_and_send_nothing(stub, argv):
    path, backend = stub
    p = run(path, *argv)
    assert p.returncode == 2, p
    assert backend.calls == []


def test_help_and_version():
    h = subprocess.run([*CTL, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert h.returncode == 0 and "examples:" in h.stdout
    for code in ("0  ok", "3  the daemon cannot be reached", "4  status: something is degraded",
                 "5  done, but a restore"):
        assert code in h.stdout, code
    v = subprocess.run([*CTL, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert v.returncode == 0 and v.stdout.startswith("sessionguardctl ")


def test_when():
    now = 1_800_000_000.0
    assert parse_when("90s", now) == now - 90 and parse_when("2h", now) == now - 7200
    assert parse_when("1d", now) == now - 86400 and parse_when("30m", now) == now - 1800
    assert parse_when("2026-11-24T10:00") == datetime(2026, 11, 24, 10, 0).timestamp()
    for bad in ("yesterday", "2x", "", "-1h"):
        with pytest.raises(ValueError):
            parse_when(bad, now)


def test_undo_command_runs_in_bash(stub, tmp_path):
    """The printed undo command, pasted into a shell, calls restore with the same id and version."""
    path, backend = stub
    backend.results["restore"] = dict(CANNED["restore"], sid="it's \x1b[31m")
    undo = next(line for line in text(run(path, "restore", SID)).splitlines() if line.startswith("to undo: "))
    shown = undo[len("to undo: "):]
    got = subprocess.run(["bash", "-c", f'set -- {shown}; printf "%s\\0" "$@"'], capture_output=True, timeout=30,
                         check=False)
    assert got.stdout.split(b"\0")[:-1] == [b"sessionguardctl", b"--socket", path.encode(), b"--watch",
                                            WATCH["path"].encode(), b"restore", b"it's \x1b[31m",
                                            PRE["id"].encode()]

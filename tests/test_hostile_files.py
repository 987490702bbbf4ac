"""Hostile files in a watched directory, against the real daemon (issue 6).

Every test throws files at a running ``sessionguardd`` that a careless or
malicious writer could leave in a session directory — bad content, a 1 GB
file, names that are not UTF-8, symlinks to ``/etc/shadow``, FIFOs, device
nodes, sockets, hard links to other users' files — and ends with the same
proof: the daemon still catches a real wipe of a normal session, still
answers ``status``, logged no internal error, and nothing hostile reached
the store (no store file holds a secret's bytes or marker, no store folder
exists for a skipped name). "Never read" is also proved where the kernel can
show it: the target's atime (relatime) and the daemon's peak memory.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import uuid
from pathlib import Path

import orjson
import pytest

from daemonproc import DaemonProc, eventually
from sessionguard.naming import validate_sid
from sghelpers import make_session, needs_root, pin_count, reconciliations, server_write, store_versions

NOBODY = 65534
SHADOW = Path("/etc/shadow")


# -- fixtures and helpers ------------------------------------------------------------

def versions(sdir: Path, sid: str):
    """*sid*'s versions as the store's directory holds them (never through a Guard: opening a
    store as another user than its owner is refused)."""
    return store_versions(sdir / ".sessionguard", sid)


def kept(sdir: Path, count: int, sid: str, reason: str | None = None):
    """Wait until a version with *count* messages is in the store; return it."""
    def find():
        return next((v for v in versions(sdir, sid)
                     if v.count == count and (reason is None or v.reason == reason)), None)
    return eventually(find, what=f"a kept {count}-message version of {sid}")


def pinned(sdir: Path, sid: str, count: int | None) -> Path:
    """Wait until *sid*'s pin holds *count* messages (None: unparseable); return its path."""
    eventually(lambda: pin_count(sdir, sid) == (-1 if count is None else count),
               what=f"a pin of {sid} with count {count}")
    return sdir / ".sessionguard" / "pins" / sid


def secret_session(marker: str) -> bytes:
    """A perfectly valid session holding *marker*: if the daemon read it, it would pin it."""
    doc = make_session(3, "secret")
    doc["messages"][0]["content"] = f"the secret {marker}"
    return orjson.dumps(doc)


def skipped(d: DaemonProc, name: str | bytes, needle: str = "") -> dict:
    """Wait for the ``file.skipped`` event of the file named *name* (its why containing *needle*)."""
    shown = name if isinstance(name, str) else name.decode("utf-8", "backslashreplace")
    return d.wait_event("file.skipped", lambda e: e["path"].endswith("/" + shown) and needle in e["why"])


def store_files(sdir: Path) -> list[bytes]:
    """Every regular file under the store (bytes paths: the walk itself must survive odd names)."""
    out = []
    for root, _dirs, files in os.walk(os.fsencode(sdir / ".sessionguard")):
        for name in files:
            path = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                out.append(path)
    return out


def store_folders(sdir: Path) -> list[bytes]:
    """Names the store holds something for: version folders and pins."""
    out: list[bytes] = []
    for sub in ("sessions", "pins"):
        try:
            out += os.listdir(os.fsencode(sdir / ".sessionguard" / sub))
        except FileNotFoundError:
            continue
    return out


def assert_nothing_leaked(d: DaemonProc, sdir: Path, secrets: list[bytes], markers: list[str],
                          skipped_sids: list[str]) -> None:
    """No secret in the store (bytes or marker), none in the log, no store folder for skipped names."""
    for path in store_files(sdir):
        data = Path(os.fsdecode(path)).read_bytes()
        assert data not in secrets, f"a secret's bytes leaked into the store: {path!r}"
        for m in markers:
            assert m.encode() not in data, f"secret marker {m} leaked into the store: {path!r}"
    log = d.text()
    for m in markers:
        assert m not in log, f"secret marker {m} leaked into the log"
    folders = store_folders(sdir)
    for f in folders:
        f.decode("utf-8")  # a store folder for a non-UTF-8 name would be a leak of a skipped name
    for sid in skipped_sids:
        assert sid.encode() not in folders, f"a store folder was made for the skipped name {sid!r}"


def assert_still_works(d: DaemonProc, sdir: Path, n: int = 7) -> None:
    """A real wipe of a normal session is still kept; status answers; no internal error was logged."""
    sid = f"canary{n}"
    server_write(sdir / f"{sid}.json", make_session(n, sid))
    d.sync()
    server_write(sdir / f"{sid}.json", make_session(0, sid))
    assert kept(sdir, n, sid, "shrink")
    status = d.call("status")
    assert status["pid"] == d.proc.pid
    assert status["errors"] == 0, d.text()
    d.call("list")  # every tracked id serialises
    for bad in ("worker.error", "pin.failed", "watchdog.withheld", "daemon.failed"):
        assert not d.events(bad), f"{bad} logged:\n{d.text()}"
    d.assert_alive()


def can_see_reads() -> bool:
    """Does this filesystem update atime on a read (relatime on the test dir)? Then atime proves "never read"."""
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"sg-atime-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"x")
        os.utime(probe, (1, 2))
        probe.read_bytes()
        return os.stat(probe).st_atime != 1
    finally:
        probe.unlink(missing_ok=True)


def arm_atime(path: Path) -> None:
    """Set atime before mtime: under relatime the next read of *path* moves atime."""
    st = os.lstat(path)
    os.utime(path, ns=(1_000_000_000, st.st_mtime_ns), follow_symlinks=False)


def assert_never_read(path: Path) -> None:
    assert os.stat(path).st_atime_ns == 1_000_000_000, f"{path} was read"


# -- content -------------------------------------------------------------------------

def _bad_contents() -> dict[str, bytes]:
    real = orjson.dumps(make_session(20), option=orjson.OPT_INDENT_2)
    return {
        "truncated": real[: len(real) // 2],
        "corrupt": b'{"messages": [1, 2',
        "list": b"[1, 2, 3]",
        "index-like": orjson.dumps([{"session_id": "x", "title": "t"}]),
        "number": b"42",
        "string": b'"just a string"',
        "null": b"null",
        "nested-lists": b"[" * 100_000,
        "nested-closed": b"[" * 100_000 + b"]" * 100_000,
        "nested-objects": b'{"a":' * 100_000,
        "nested-messages": b'{"messages": ' + b"[" * 100_000,
        "invalid-utf8": b'{"messages": ["\xff\xfe\xc3\x28"]}',
        "messages-object": b'{"messages": {"0": "a"}}',
        "messages-string": b'{"messages": "hello"}',
        "nul-filled": b"\0" * (1 << 20),
        "nul-in-json": b'{"messages": [1]}\0\0\0',
        "random-bytes": bytes((i * 7919 + 13) % 256 for i in range(65536)),
        "empty": b"",
    }


def _what_servers_write(n: int) -> dict[str, bytes]:
    """Sessions of *n* messages that orjson refuses but their servers read back: Python's
    json.dump writes NaN/Infinity by default, json.dumps and JSON.stringify write lone
    surrogate escapes, some editors add a UTF-8 BOM."""
    msgs = [{"role": "user", "content": f"message {i}", "score": 0.5} for i in range(n)]
    plain = json.dumps({"title": "t", "messages": msgs}, indent=2).encode()
    return {
        "nan": plain.replace(b'"score": 0.5', b'"score": NaN', 1),
        "infinity": plain.replace(b'"score": 0.5', b'"score": -Infinity', 1),
        "surrogate": plain.replace(b'"message 0"', b'"message \\ud83d 0"', 1),
        "bom": b"\xef\xbb\xbf" + plain,
    }


def test_what_servers_write_is_counted_kept_and_restored_byte_identical(sdir, daemons) -> None:
    """Issue 10, item 4: these four 1000-message sessions were pinned as unparseable, and
    the metadata-only wipe that followed kept nothing. Now each is counted, its wipe keeps
    it, and a restore brings back the exact bytes."""
    whole = _what_servers_write(1000)
    for name, data in whole.items():
        (sdir / f"{name}.json").write_bytes(data)
    d = daemons("--watch", str(sdir))
    for name in whole:
        pinned(sdir, name, 1000)
        (sdir / f"{name}.json").write_bytes(b'{"title": "t", "messages": []}')  # the metadata-only save
    d.sync()
    for name, data in whole.items():
        v = kept(sdir, 1000, name, "shrink")
        assert Path(v.path).read_bytes() == data
        d.call("restore", {"sid": name})
        assert (sdir / f"{name}.json").read_bytes() == data, f"{name}: restored bytes differ"
    assert_still_works(d, sdir)


def test_bad_content_is_counted_unparseable_and_never_crashes(sdir, daemons) -> None:
    bad = _bad_contents()
    before = dict(list(bad.items())[: len(bad) // 2])  # half met by the start-up scan, half by events
    for name, data in before.items():
        (sdir / f"{name}.json").write_bytes(data)
    server_write(sdir / "victim.json", make_session(9, "victim"))
    d = daemons("--watch", str(sdir))
    for name, data in bad.items():
        if name not in before:
            (sdir / f"{name}.json").write_bytes(data)
    # a real session overwritten with hostile content: its last good version is kept
    (sdir / "victim.json").write_bytes(bad["nested-messages"])
    d.sync()
    for name in bad:
        pinned(sdir, name, None)
    v = kept(sdir, 9, "victim", "unparseable")
    assert orjson.loads(Path(v.path).read_bytes())["messages"] == make_session(9, "victim")["messages"]
    assert d.wait_event("session.shrunk", lambda e: e["sid"] == "victim")["class"] == "unparseable"
    assert_still_works(d, sdir)


def test_deeply_nested_messages_that_shrink_keep_their_version(sdir, daemons) -> None:
    """orjson parses up to 1024 levels; comparing two such messages overflows Python's
    recursion limit. A truncate of such a session must still keep the prior version."""
    def deep_session(n: int) -> bytes:  # orjson.dumps stops at 254 levels: splice the nesting in
        doc = make_session(n, "deep")
        doc["messages"][0]["content"] = "@@deep@@"
        return orjson.dumps(doc).replace(b'"@@deep@@"', b"[" * 1000 + b"]" * 1000)

    whole = deep_session(3)
    (sdir / "deep.json").write_bytes(whole)
    d = daemons("--watch", str(sdir))
    pinned(sdir, "deep", 3)
    (sdir / "deep.json").write_bytes(deep_session(1))
    v = kept(sdir, 3, "deep", "shrink")
    assert Path(v.path).read_bytes() == whole
    pinned(sdir, "deep", 1)
    # Too deep to send back as JSON: a clear -32005 naming the way out, not an internal error…
    with pytest.raises(RuntimeError, match=r"-32005.*version file"):
        d.call("show", {"sid": "deep", "messages": True})
    # …while diff compares by message identity and sends only what is missing (not deep here)
    assert d.call("diff", {"sid": "deep"})["missing_count"] == 2
    assert not d.events("control.error")
    assert_still_works(d, sdir)


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_a_1_gb_file_is_skipped_without_being_read(sdir, daemons) -> None:
    gib = 1 << 30
    with open(sdir / "huge-before.json", "wb") as f:
        f.truncate(gib)  # sparse: costs no disk
    server_write(sdir / "grows.json", make_session(12, "grows"))
    d = daemons("--watch", str(sdir))  # default cap: 256 MiB
    with open(sdir / "huge-after.json", "wb") as f:
        f.write(b'{"messages": [')
        f.truncate(gib)
    with open(sdir / "grows.json", "r+b") as f:  # a pinned session blown up in place
        f.truncate(gib)
    d.sync()
    for name in ("huge-before.json", "huge-after.json", "grows.json"):
        assert "size cap" in skipped(d, name)["why"]
    assert kept(sdir, 12, "grows", "unparseable").size < 1 << 20
    # not read: the daemon never held even a quarter of it in memory…
    hwm = _vm_hwm_kib(d.proc.pid)
    assert hwm * 1024 < gib // 4, f"the daemon's peak RSS was {hwm} KiB: it read the 1 GB file"
    # …and nothing of it reached the store: for the file that was 1 GB from the start no pin
    # and no version; the other may have been pinned while it was still empty or 14 bytes
    # (its create event can be read before the truncate), never larger
    store = sdir / ".sessionguard"
    assert not (store / "pins" / "huge-before").exists() and not (store / "sessions" / "huge-before").exists()
    after = [store / "pins" / "huge-after", *(store / "sessions" / "huge-after").glob("*")]
    assert all(os.path.getsize(p) <= 14 for p in after if p.exists())
    assert sum(os.path.getsize(p) for p in store_files(sdir)) < 1 << 20
    assert_still_works(d, sdir)


# -- names -----------------------------------------------------------------------------

NON_UTF8_NAMES = [
    b"\xff\xfe.json",          # not UTF-8 at all
    b"caf\xe9.json",           # Latin-1
    b"\xc3\x28.json",          # a broken two-byte sequence
    b"\xc0\xaf.json",          # overlong '/'
    b"\xed\xa0\x80.json",      # a UTF-8-encoded surrogate
    b"ok\x80tail.json",        # a stray continuation byte
]


def test_validate_sid_rejects_names_that_are_not_utf8() -> None:
    for name in NON_UTF8_NAMES:
        sid = os.fsdecode(name)[: -len(".json")]
        with pytest.raises(ValueError, match="must be valid UTF-8"):
            validate_sid(sid)
    assert validate_sid("é" * 125) == "é" * 125  # 250 bytes of valid UTF-8 is fine


def test_logging_never_raises_on_a_non_utf8_name() -> None:
    """The JSON renderer, and the journald renderer behind log.py's guard, on lone surrogates."""
    from sessionguard import log

    event = {"event": "file.skipped", "path": "/s/\udcff\udcfe.json", "nested": {"k\udcff": ["\ud800", 1]}}
    data = log._dumps(event)
    assert orjson.loads(data)["path"] == "/s/\\xff\\xfe.json"
    assert orjson.loads(data)["nested"] == {"k\\xff": ["\\ud800", 1]}
    assert log._dumps({"event": "plain"}) == b'{"event":"plain"}'
    try:
        import systemd.journal  # noqa: F401

        from sessionguard import systemd as sg_systemd
    except ImportError:
        return
    import structlog

    with pytest.raises(UnicodeEncodeError):  # systemd.journal_renderer alone cannot send it…
        sg_systemd.journal_renderer(None, "warning", dict(event))
    with pytest.raises(structlog.DropEvent):  # …behind log.py's retry it is sent (and dropped from the chain)
        log._retry_printable(sg_systemd.journal_renderer)(None, "warning", dict(event))


def test_non_utf8_names_are_skipped_and_logged_not_tracked(sdir, daemons) -> None:
    bsdir = os.fsencode(sdir)
    markers = [uuid.uuid4().hex for _ in NON_UTF8_NAMES]
    secrets = [secret_session(m) for m in markers]
    half = len(NON_UTF8_NAMES) // 2
    for name, data in list(zip(NON_UTF8_NAMES, secrets, strict=False))[:half]:
        Path(os.fsdecode(bsdir + b"/" + name)).write_bytes(data)
    server_write(sdir / "renamed.json", make_session(8, "renamed"))
    d = daemons("--watch", str(sdir), "--reconcile-interval", "1")
    for name, data in list(zip(NON_UTF8_NAMES, secrets, strict=False))[half:]:
        with open(bsdir + b"/" + name, "wb") as f:
            f.write(data)
    # a normal session renamed to a non-UTF-8 name: for the session, that is a delete
    os.rename(sdir / "renamed.json", bsdir + b"/\xffrenamed.json")
    assert kept(sdir, 8, "renamed", "deleted")
    d.sync()
    for name in [*NON_UTF8_NAMES, b"\xffrenamed.json"]:
        ev = skipped(d, name)
        assert ev["why"] == "name is not valid UTF-8: not a session id"
    # once per file state (a file created after start may be seen empty first, then written):
    # reconciliation passes over the unchanged files log nothing new
    logged = len(d.events("file.skipped"))
    passes = reconciliations(d)
    eventually(lambda: reconciliations(d) >= passes + 3, what="three reconciliation passes")
    assert len(d.events("file.skipped")) == logged, d.events("file.skipped")[logged:]
    assert {s["sid"] for s in d.call("list")["sessions"]} <= {"renamed"}
    assert_nothing_leaked(d, sdir, secrets, markers, [])
    assert_still_works(d, sdir)


def test_journal_logging_survives_a_non_utf8_name(sdir, daemons) -> None:
    """journald needs UTF-8 too: under --log-format journal the same name must not fail a log call."""
    pytest.importorskip("systemd.journal")
    d = daemons("--watch", str(sdir), "--log-format", "journal", wait=False)

    def answers() -> dict | None:
        try:
            return d.call("status")
        except OSError:
            return None

    eventually(answers, what="the control socket")
    with open(os.fsencode(sdir) + b"/\xff\xfe.json", "wb") as f:
        f.write(secret_session("journal"))
    server_write(sdir / "canary.json", make_session(5, "canary"))
    d.sync()
    server_write(sdir / "canary.json", make_session(0, "canary"))
    assert kept(sdir, 5, "canary")
    assert d.call("status")["errors"] == 0, "a log call failed (worker.error, written to stderr as a last resort)"
    assert "logging it failed" not in d.text()
    d.assert_alive()


def test_a_store_folder_with_a_non_utf8_name_from_an_older_version_does_not_stop_the_watch(sdir, daemons) -> None:
    """Before the fix, a non-UTF-8 session name got a store folder; such a store must still work."""
    old = os.fsencode(sdir / ".sessionguard" / "sessions") + b"/\xff\xfe"
    os.makedirs(old)
    Path(os.fsdecode(old + b"/.lock")).write_bytes(b"")
    os.chmod(sdir / ".sessionguard", 0o750)  # as release 0.1.0 left it
    d = daemons("--watch", str(sdir))
    assert d.wait_event("daemon.started")["watches"][0]["available"]
    assert_still_works(d, sdir)


def test_names_at_the_255_byte_limit_and_odd_but_valid_names_are_sessions(sdir, tmp_path, daemons) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    names = {  # file name (without .json) -> messages
        "a" * 250: 4,                 # 255-byte file name, 250-byte id
        "é" * 125: 5,                 # the same in two-byte characters
        "a%2Fb": 6,                   # looks like an escaped sub-directory
        "100%25": 7,
        "-rf --all": 8,               # an option to a careless shell script
        "line\nbreak": 9,
        "\x1b[31mred\x1b[0m": 10,     # a terminal escape in a log line
        "back\\slash": 11,
        "emoji 🦀": 12,
    }

    def write(name: str, n: int) -> None:
        # a 250-byte name leaves no room for a same-dir tmp name: write through a tmp outside the dir
        (stage / "w.tmp").write_bytes(orjson.dumps(make_session(n, name)))
        os.replace(stage / "w.tmp", sdir / f"{name}.json")

    for name, n in names.items():
        assert len(os.fsencode(name + ".json")) <= 255
        write(name, n)
    d = daemons("--watch", str(sdir))
    for name, n in names.items():
        pinned(sdir, name, n)
        write(name, 0)
    for name, n in names.items():
        assert kept(sdir, n, name, "shrink")
    listed = {s["sid"]: s["high_water"] for s in d.call("list")["sessions"]}
    assert {name: listed.get(name) for name in names} == names
    assert d.call("history", {"sid": "a" * 250})["versions"][0]["count"] == 4
    assert_still_works(d, sdir)


def test_tmp_names_whose_pid_is_not_ascii_digits_are_left_alone(sdir, daemons) -> None:
    """The scan sweeps writers' tmp files (``.<name>.tmp-sg-<pid>-…``) whose pid is gone.
    ``str.isdigit`` says yes to "²" (``int`` then raised out of the scan: the server's user
    could stop the first start with one file name) and to other scripts' digits ("٣" read as
    pid 3): only ASCII digits name a pid; anything else is not our tmp file and is left."""
    odd = [".a.json.tmp-sg-\u00b2-1", ".b.json.tmp-sg-\u0663-1", ".c.json.tmp-sg-\uff11\uff12-1"]
    for name in odd:
        (sdir / name).write_bytes(b"not ours")
    gone = sdir / ".d.json.tmp-sg-999999999-1"  # ours, its writer long dead: swept
    gone.write_bytes(b"a crashed writer's")
    server_write(sdir / "live.json", make_session(3, "live"))
    d = daemons("--watch", str(sdir))
    pinned(sdir, "live", 3)
    assert sorted(p.name for p in sdir.iterdir() if "tmp-sg" in p.name) == sorted(odd)
    assert_still_works(d, sdir)


def test_a_session_at_the_255_byte_limit_can_be_restored(sdir, daemons) -> None:
    sid = "a" * 250
    (sdir / f"{sid}.json").write_bytes(orjson.dumps(make_session(4, sid)))
    d = daemons("--watch", str(sdir))
    (sdir / f"{sid}.json").write_bytes(orjson.dumps(make_session(0, sid)))
    assert kept(sdir, 4, sid)
    assert d.call("restore", {"sid": sid})["restored"]["count"] == 4
    assert len(orjson.loads((sdir / f"{sid}.json").read_bytes())["messages"]) == 4


# -- things that are not regular files -----------------------------------------------

def _bind_socket(path: Path) -> socket.socket:
    """A Unix socket file at *path* (bound from its directory: sun_path is only 108 bytes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        s.bind(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)
    return s


def test_symlinks_are_never_followed(sdir, tmp_path, daemons) -> None:
    if not can_see_reads():
        pytest.skip("this filesystem does not update atime on reads: 'never read' cannot be shown")
    outside = tmp_path / "outside"
    outside.mkdir()
    markers = [uuid.uuid4().hex, uuid.uuid4().hex]
    secrets = [secret_session(m) for m in markers]
    targets = [outside / "a.json", outside / "b.json"]
    for t, data in zip(targets, secrets, strict=False):
        t.write_bytes(data)
    os.mkfifo(outside / "fifo")
    if SHADOW.exists() and SHADOW.stat().st_size:
        secrets.append(SHADOW.read_bytes())
    links = {  # name -> target
        "shadow-before": SHADOW, "outside-before": targets[0], "dotdot-before": Path("../outside/b.json"),
        "shadow-after": SHADOW, "outside-after": targets[1], "dotdot-after": Path("../outside/a.json"),
        "dangling": outside / "nothing-here", "loop": sdir / "loop.json", "dev-zero": Path("/dev/zero"),
        "fifo-outside": outside / "fifo", "a-directory": outside, "root": Path("/"),
    }
    sessions = {"was-session-shadow": SHADOW, "was-session-outside": targets[0]}
    for i, sid in enumerate(sessions):
        server_write(sdir / f"{sid}.json", make_session(5 + i, sid))
    for name, target in links.items():
        if name.endswith("before"):
            (sdir / f"{name}.json").symlink_to(target)
    for t in targets:
        arm_atime(t)
    d = daemons("--watch", str(sdir))
    for name, target in links.items():
        if not name.endswith("before"):
            (sdir / f"{name}.json").symlink_to(target)
    for sid, target in sessions.items():  # a session replaced by a symlink (rename over it)
        (sdir / f"{sid}.tmp.link").symlink_to(target)
        os.rename(sdir / f"{sid}.tmp.link", sdir / f"{sid}.json")
    for i, sid in enumerate(sessions):
        assert kept(sdir, 5 + i, sid)
    d.sync()
    for name in list(links) + list(sessions):
        assert "symlink" in skipped(d, f"{name}.json")["why"]
    for t in targets:
        assert_never_read(t)
    assert_nothing_leaked(d, sdir, secrets, markers, list(links))
    for sid in sessions:
        assert pin_count(sdir, sid) is None, "the pin of a session replaced by a symlink is dropped"
    assert_still_works(d, sdir)


@needs_root
def test_fifos_devices_and_sockets_are_never_opened(sdir, daemons) -> None:
    made: list[socket.socket] = []

    def make_all(suffix: str) -> list[str]:
        names = [f"fifo-{suffix}", f"null-{suffix}", f"zero-{suffix}", f"blk-{suffix}", f"sock-{suffix}"]
        os.mkfifo(sdir / f"{names[0]}.json")
        os.mknod(sdir / f"{names[1]}.json", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(sdir / f"{names[2]}.json", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # endless if read
        os.mknod(sdir / f"{names[3]}.json", stat.S_IFBLK | 0o600, os.makedev(7, 200))
        made.append(_bind_socket(sdir / f"{names[4]}.json"))
        return names

    try:
        names = make_all("before")
        server_write(sdir / "was-session.json", make_session(6, "was-session"))
        d = daemons("--watch", str(sdir))
        names += make_all("after")
        os.unlink(sdir / "was-session.json")  # a session replaced by a FIFO
        os.mkfifo(sdir / "was-session.json")
        # the daemon never blocks on any of them: a wipe right after is still caught
        server_write(sdir / "right-after.json", make_session(4, "right-after"))
        pinned(sdir, "right-after", 4)
        server_write(sdir / "right-after.json", make_session(0, "right-after"))
        assert kept(sdir, 4, "right-after")
        assert kept(sdir, 6, "was-session")
        d.sync()
        kinds = {"fifo": "FIFO", "null": "character device", "zero": "character device", "blk": "block device",
                 "sock": "socket"}
        for name in names:
            assert kinds[name.split("-")[0]] in skipped(d, f"{name}.json")["why"], name
        assert "FIFO" in skipped(d, "was-session.json")["why"]
        assert_nothing_leaked(d, sdir, [], [], names)
        assert_still_works(d, sdir)
    finally:
        for s in made:
            s.close()


def test_directories_named_like_sessions_are_skipped(sdir, daemons) -> None:
    (sdir / "dir-before.json").mkdir()
    (sdir / "dir-before.json" / "inner.json").write_bytes(orjson.dumps(make_session(3)))
    server_write(sdir / "was-session.json", make_session(5, "was-session"))
    d = daemons("--watch", str(sdir))
    (sdir / "dir-after.json").mkdir()
    os.rename(sdir / "dir-after.json", sdir / "dir-moved.json")  # a directory event on a session name
    os.rmdir(sdir / "dir-moved.json")
    os.unlink(sdir / "was-session.json")
    (sdir / "was-session.json").mkdir()
    assert kept(sdir, 5, "was-session")
    (sdir / "was-session.json").rmdir()  # a directory removed where a session was: nothing to do
    os.rename(sdir / "dir-before.json", sdir / "renamed-dir.json")
    d.sync()
    assert_nothing_leaked(d, sdir, [], [], ["dir-before", "dir-after", "dir-moved", "renamed-dir", "inner"])
    assert_still_works(d, sdir)


# -- other users' files ------------------------------------------------------------------

def _foreign_secret(where: Path, marker: str, owner: int = NOBODY) -> tuple[Path, bytes]:
    """A file of another user, mode 0600, holding a valid session with *marker*."""
    where.mkdir(exist_ok=True)
    path = where / f"secret-{marker[:8]}"
    data = secret_session(marker)
    path.write_bytes(data)
    os.chown(path, owner, owner)
    os.chmod(path, 0o600)
    return path, data


@needs_root
def test_hard_links_to_another_users_file_are_never_read(sdir, tmp_path, daemons) -> None:
    if not can_see_reads():
        pytest.skip("this filesystem does not update atime on reads: 'never read' cannot be shown")
    outside = tmp_path / "outside"
    markers = [uuid.uuid4().hex for _ in range(3)]
    secrets = [_foreign_secret(outside, m) for m in markers]
    for path, _ in secrets:
        arm_atime(path)
    os.link(secrets[0][0], sdir / "hl-before.json")
    server_write(sdir / "was-session.json", make_session(6, "was-session"))
    d = daemons("--watch", str(sdir), "--reconcile-interval", "1")
    os.link(secrets[1][0], sdir / "hl-after.json")
    os.link(secrets[2][0], sdir / "was-session.tmp.x")  # a pinned session replaced by such a link
    os.rename(sdir / "was-session.tmp.x", sdir / "was-session.json")
    assert kept(sdir, 6, "was-session")
    d.sync()
    why = "hard link to a file owned by uid 65534; the directory belongs to uid 0: not read"
    for name in ("hl-before.json", "hl-after.json", "was-session.json"):
        assert skipped(d, name)["why"] == why
    for path, _ in secrets:
        assert_never_read(path)
    assert pin_count(sdir, "was-session") is None
    assert_nothing_leaked(d, sdir, [s for _, s in secrets], markers, ["hl-before", "hl-after"])
    assert_still_works(d, sdir)


@needs_root
def test_a_skipped_hard_link_is_looked_at_again_when_its_link_count_or_owner_changes(sdir, tmp_path,
                                                                                       daemons) -> None:
    """Removing the other name or a chown changes only ctime: the skip key must see nlink and uid."""
    outside = tmp_path / "outside"
    (a, _), (b, _) = _foreign_secret(outside, uuid.uuid4().hex), _foreign_secret(outside, uuid.uuid4().hex)
    os.link(a, sdir / "unlinked.json")
    os.link(b, sdir / "chowned.json")
    d = daemons("--watch", str(sdir), "--reconcile-interval", "1")
    skipped(d, "unlinked.json", "hard link")
    skipped(d, "chowned.json", "hard link")
    os.unlink(a)  # nlink 2 → 1: another user's file with one name is a session (see the README)
    os.chown(sdir / "chowned.json", 0, 0)  # now the directory owner's own hard link
    pinned(sdir, "unlinked", 3)
    pinned(sdir, "chowned", 3)
    assert_still_works(d, sdir)


@needs_root
def test_same_owner_hard_links_are_read_normally(tmp_path, daemons) -> None:
    """The os.link publish (tmp outside the dir, still linked) by the directory's owner is a session;
    a root-owned file linked into that user's directory is not."""
    sdir = tmp_path / "sessions"
    sdir.mkdir()
    stage = tmp_path / "stage"
    stage.mkdir()
    os.chown(sdir, NOBODY, NOBODY)
    marker = uuid.uuid4().hex
    root_file, root_secret = _foreign_secret(tmp_path / "root-owned", marker, owner=0)
    d = daemons("--watch", str(sdir), "--reconcile-interval", "1")

    def publish(sid: str, n: int) -> Path:
        tmp = stage / f"{sid}.link.tmp"
        tmp.write_bytes(orjson.dumps(make_session(n, sid)))
        os.chown(tmp, NOBODY, NOBODY)
        (sdir / f"{sid}.json").unlink(missing_ok=True)
        os.link(tmp, sdir / f"{sid}.json")
        return tmp

    tmp = publish("published", 10)
    pinned(sdir, "published", 10)
    assert os.stat(sdir / "published.json").st_nlink == 2, "still linked when the daemon looked"
    tmp.unlink()
    publish("published", 0).unlink()
    assert kept(sdir, 10, "published")
    os.link(root_file, sdir / "rootlink.json")
    assert skipped(d, "rootlink.json")["why"] == (
        "hard link to a file owned by uid 0; the directory belongs to uid 65534: not read")
    assert_nothing_leaked(d, sdir, [root_secret], [marker], ["rootlink"])
    assert_still_works(d, sdir)


@needs_root
def test_link_pins_of_another_users_file_are_not_mistaken_for_foreign_links(sdir, daemons) -> None:
    """With pin = "link" the pin itself is a second name of the live file: it does not count."""
    server_write(sdir / "theirs.json", make_session(5, "theirs"))
    os.chown(sdir / "theirs.json", NOBODY, NOBODY)
    d = daemons("--watch", str(sdir), "--pin", "link", "--reconcile-interval", "1")
    pin = pinned(sdir, "theirs", 5)
    assert os.stat(pin).st_ino == os.stat(sdir / "theirs.json").st_ino and os.stat(pin).st_nlink == 2
    os.utime(sdir / "theirs.json", ns=(1, 10**18))  # touched (no event): the next pass looks again
    passes = reconciliations(d)

    def repinned() -> bool:  # two whole reconciliations after the touch: it was looked at again
        return reconciliations(d) >= passes + 2

    eventually(repinned, what="the touched file re-pinned (not skipped)")
    assert not [e for e in d.events("file.skipped") if "theirs" in e["path"]], d.text()
    assert versions(sdir, "theirs") == [], "a spurious version of a live session"
    server_write(sdir / "theirs.json", make_session(0, "theirs"))
    assert kept(sdir, 5, "theirs", "shrink")
    assert_still_works(d, sdir)


@needs_root
def test_another_users_file_with_one_name_is_a_session_for_a_root_daemon(sdir, daemons) -> None:
    """Documented in the README: the store is private to the daemon and its read group."""
    server_write(sdir / "theirs.json", make_session(6, "theirs"))
    os.chown(sdir / "theirs.json", NOBODY, NOBODY)
    os.chmod(sdir / "theirs.json", 0o600)
    d = daemons("--watch", str(sdir))
    pinned(sdir, "theirs", 6)
    (sdir / "theirs.json").write_bytes(orjson.dumps(make_session(0, "theirs")))
    assert kept(sdir, 6, "theirs", "shrink")
    store = sdir / ".sessionguard"
    assert stat.S_IMODE(os.stat(store).st_mode) & 0o007 == 0, "the store is not world-readable"
    assert_still_works(d, sdir)

"""The tracker's decisions and the whole-directory passes, in-process, on real files."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from sessionguard import fsutil, hint, passes
from sessionguard.config import WatchConfig
from sessionguard.count import message_key
from sessionguard.naming import Version
from sessionguard.stats import Stats
from sessionguard.store import Store
from sessionguard.tracker import Tracker, WatchState
from sghelpers import HeldElsewhere, Recorder, make_session, needs_root

SID = "abc123def456"
SECRET = b'{"messages": ["root:$6$never-to-be-copied"]}'


def data(n: int, sid: str = SID, **extra: object) -> bytes:
    return orjson.dumps(make_session(n, sid, extra=extra or None), option=orjson.OPT_INDENT_2)


def other(n: int) -> bytes:
    """Another conversation of *n* messages (~400 bytes each, as make_session's)."""
    return orjson.dumps({"messages": [{"role": "user", "content": f"elsewhere {i}: " + "consectetur adipiscing " * 16}
                                      for i in range(n)]})


def streamed(n: int) -> bytes:
    """*n* messages, the last one still being streamed (its text rewritten)."""
    doc = make_session(n)
    doc["messages"][-1]["content"] += " and more tokens"
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def put(path: Path, body: bytes) -> None:
    """A server's save: tmp in the same directory, then rename."""
    tmp = path.with_name(".test-saving")
    tmp.write_bytes(body)
    os.replace(tmp, path)


class Env:
    """One watch built by hand, as the daemon's supervisor would, with a recording logger."""

    def __init__(self, sdir: Path, **cfg: object) -> None:
        self.sdir = sdir
        self.ws = WatchState(WatchConfig(path=str(sdir), **cfg))  # type: ignore[arg-type]
        fd = fsutil.open_root(str(sdir))
        st = os.fstat(fd)
        self.ws.root_fd, self.ws.root_uid, self.ws.root_dev = fd, st.st_uid, st.st_dev
        self.ws.root_ident = (st.st_dev, st.st_ino)
        self.ws.store, _ = Store.open(fd, where=self.ws.cfg.store_path, expect_uid=os.geteuid(),
                                      max_bytes=self.ws.cfg.max_file_bytes, retention=self.ws.cfg.retention)
        self.ws.available = True
        self.log = Recorder()
        self.stats = Stats(self.log)
        self.tracker = Tracker([self.ws], self.stats, self.log)

    @property
    def store(self) -> Store:
        assert self.ws.store is not None
        return self.ws.store

    def ev(self, name: str = f"{SID}.json") -> str:
        return self.tracker.evaluate(str(self.sdir / name))

    def versions(self, sid: str = SID) -> list[Version]:
        return self.store.versions.of(sid)

    def store_holds(self, needle: bytes) -> bool:
        for dirpath, _, files in os.walk(self.store.where):
            if any(needle in Path(dirpath, f).read_bytes() for f in files):
                return True
        return False

    def close(self) -> None:
        self.store.close()
        os.close(self.ws.root_fd or -1)


@pytest.fixture
def env(sdir: Path) -> Iterator[Env]:
    e = Env(sdir)
    yield e
    e.close()


# -- one event, one decision -------------------------------------------------------------------

@pytest.mark.parametrize("n", [5, 40], ids=["small: parsed", "large: glanced"])  # ~2.5 KB; ~18 KB
@pytest.mark.parametrize(
    "after, outcome, kept",
    [
        (data, "unchanged", None),  # the same file: not even read
        (lambda n: data(n + 1), "grew", None),
        (lambda n: data(n, title="renamed"), "same", None),
        (streamed, "same", None),  # a streaming rewrite of the last message
        (lambda n: data(n // 2), "shrunk", ("shrink", "truncate")),
        (lambda n: data(0), "shrunk", ("shrink", "wipe")),
        (lambda n: b'{"messages": [', "unparseable", ("unparseable", "unparseable")),
        (other, "same", ("replaced", "replaced")),  # another conversation, as long
        (lambda n: other(n + 4), "grew", ("replaced", "replaced")),  # another conversation, longer
        (lambda n: data(n // 2, intentional_shrink_generation="u2"), "shrunk", ("intended", "truncate")),
    ],
)
def test_decisions(env: Env, after: Callable[[int], bytes], outcome: str, kept: tuple[str, str] | None,
                   n: int) -> None:
    live = env.sdir / f"{SID}.json"
    new = after(n)
    put(live, data(n, intentional_shrink_generation="u1") if b"u2" in new else data(n))
    assert env.ev() == "new"
    if new != data(n):
        put(live, new)
    assert env.ev() == outcome
    vs = env.versions()
    shrunk = env.log.named("session.shrunk")
    if kept is None:
        assert vs == [] and shrunk == []
        return
    reason, cls = kept
    assert [(v.count, v.reason, v.source) for v in vs] == [(n, reason, "daemon")]
    assert [(s["reason"], s["class"], s["before"]) for s in shrunk] == [(reason, cls, n)]
    assert env.log.levels("session.shrunk") == ["info" if reason == "intended" else "warning"]
    assert env.store.read_pin(SID)[0] == new  # the pin moved on after the version was kept
    assert env.ev() == "unchanged"


def test_deleted_then_gone(env: Env) -> None:
    put(env.sdir / f"{SID}.json", data(5))
    env.ev()
    (env.sdir / f"{SID}.json").unlink()
    assert env.ev() == "deleted"
    assert [(v.count, v.reason) for v in env.versions()] == [(5, "deleted")]
    assert env.store.pins.stat(SID) is None and SID not in env.ws.files
    assert env.ev() == "gone" and len(env.versions()) == 1


def test_names_that_are_not_sessions_are_ignored_or_explained(env: Env) -> None:
    for name in ("_index.json", "notes.txt", f".{SID}.json", f"{SID}.tmp.1.2"):
        (env.sdir / name).write_bytes(data(1))
        assert env.ev(name) == "ignored"
    bad = os.fsdecode(b"caf\xe9.json")
    with open(os.fsencode(env.sdir) + b"/caf\xe9.json", "wb") as f:
        f.write(data(1))
    assert env.ev(bad) == "skipped"
    assert "not valid UTF-8" in env.log.named("file.skipped")[0]["why"]
    assert env.tracker.evaluate("/elsewhere/x.json") == "ignored"
    assert env.store.sessions() == set()


@pytest.mark.parametrize("sid", ["x" * 250, "a%2F..%2Fb", "50%off", "é" * 125])
def test_awkward_but_valid_names_are_guarded_like_any_other(env: Env, sid: str) -> None:
    """255-byte file names (the tmp and pin names must still fit) and %-escapes in a flat watch."""
    live = env.sdir / f"{sid}.json"
    put(live, data(5, sid))
    assert env.ev(live.name) == "new"
    put(live, data(0, sid))
    assert env.ev(live.name) == "shrunk"
    assert [(v.count, v.reason) for v in env.versions(sid)] == [(5, "shrink")]
    assert env.ws.matcher.parts_for(sid) == (live.name,)  # nameable by its id, over the socket too
    assert not [n for n in os.listdir(env.sdir) if n != live.name and not n.startswith(".sessionguard")]


def test_over_the_size_cap_the_last_version_is_kept_and_the_file_never_read(sdir: Path) -> None:
    e = Env(sdir, max_file_bytes=len(data(5)) + 10)
    try:
        put(sdir / f"{SID}.json", data(5))
        assert e.ev() == "new"
        put(sdir / f"{SID}.json", data(40))
        assert e.ev() == "skipped" and e.ev() == "skipped"
        assert [(v.count, v.reason) for v in e.versions()] == [(5, "unparseable")]
        assert len(e.log.named("file.skipped")) == 1 and "size cap" in e.log.named("file.skipped")[0]["why"]
        assert len(e.log.named("session.shrunk")) == 1  # kept once, not re-reported on every pass
        assert not e.store_holds(b"message 39:")
    finally:
        e.close()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_symlink_or_fifo_swapped_in_keeps_the_last_version_and_is_skipped_once(env: Env, tmp_path: Path,
                                                                                   kind: str) -> None:
    live = env.sdir / f"{SID}.json"
    put(live, data(5))
    env.ev()
    swap = env.sdir / ".swap"
    if kind == "symlink":
        (tmp_path / "secret.json").write_bytes(SECRET)
        swap.symlink_to(tmp_path / "secret.json")
    else:
        os.mkfifo(swap)  # a blocking open would hang the worker: it must never be opened for reading
    os.replace(swap, live)
    assert env.ev() == "skipped" and env.ev() == "skipped"
    assert [(v.count, v.reason) for v in env.versions()] == [(5, "unparseable")]
    skipped = env.log.named("file.skipped")
    assert len(skipped) == 1 and ("symlink" if kind == "symlink" else "FIFO") in skipped[0]["why"]
    assert len(env.log.named("session.shrunk")) == 1
    assert env.store.pins.stat(SID) is None and not env.store_holds(b"never-to-be-copied")
    put(live, data(1))  # a regular file again: a new start
    assert env.ev() == "new"


@needs_root
def test_a_hard_link_to_another_users_file_is_never_read(sdir: Path, tmp_path: Path) -> None:
    os.chown(sdir, 4242, 4242)  # the server's user owns the directory; the daemon is root
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o700)
    (etc / "shadow").write_bytes(SECRET)
    os.chmod(etc / "shadow", 0o600)
    e = Env(sdir)
    try:
        os.link(etc / "shadow", sdir / "stolen.json")
        assert e.ev("stolen.json") == "skipped"
        assert "hard link to a file owned by uid 0" in e.log.named("file.skipped")[0]["why"]
        assert not e.store_holds(b"never-to-be-copied") and e.store.sessions() == set()
        assert passes.scan(e.tracker, e.ws).get("skipped") == 1 and not e.store_holds(b"never-to-be-copied")
    finally:
        e.close()


def test_a_session_locked_by_another_process_is_deferred_then_retried(env: Env) -> None:
    live = env.sdir / f"{SID}.json"
    put(live, data(5))
    env.ev()
    put(live, data(1))
    put(env.sdir / "free.json", data(3, "free"))
    with HeldElsewhere(env.store.where, SID) as holder:
        assert env.ev() == "deferred" and SID in env.ws.deferred
        assert env.ev("free.json") == "new"  # other sessions go on
        passes.retry_deferred(env.tracker, env.ws, degraded_after=3600)
        assert f"lock:{env.ws.root}" not in env.stats.snapshot().degraded
        passes.retry_deferred(env.tracker, env.ws, degraded_after=0)
        why = env.stats.snapshot().degraded[f"lock:{env.ws.root}"]
        assert SID in why and "locked by another process" in why and env.versions() == []
        holder.release()
    passes.retry_deferred(env.tracker, env.ws, degraded_after=0)
    assert env.ws.deferred == {} and f"lock:{env.ws.root}" not in env.stats.snapshot().degraded
    assert [(v.count, v.reason) for v in env.versions()] == [(5, "shrink")]
    assert env.log.named("degraded.cleared") == [{"component": f"lock:{env.ws.root}"}]


# -- whole-directory passes ------------------------------------------------------------------

def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every file read through fsutil.read_fd (live files and pins alike)."""
    names: list[str] = []
    real = fsutil.read_fd

    def reading(fd: int, st: os.stat_result, max_bytes: int, name: str = "") -> bytes:
        names.append(name)
        return real(fd, st, max_bytes, name)

    monkeypatch.setattr(fsutil, "read_fd", reading)
    return names


@pytest.mark.parametrize("settings", [True, False], ids=["written-with-settings", "older-daemon-s-cache"])
def test_a_restart_with_the_cache_reads_only_what_changed(sdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                         settings: bool) -> None:
    """A hint that names its watch settings is taken at its word (ids without the matcher);
    one from an older daemon, without settings, is believed as before: same outcome."""
    sids = [f"s{i:011d}" for i in range(6)]
    for i, sid in enumerate(sids):
        put(sdir / f"{sid}.json", data(i + 1, sid))
    first = Env(sdir)
    assert passes.scan(first.tracker, first.ws)["new"] == 6
    if settings:  # a clean stop
        first.store.pins.save_cache(passes.cache_entries(first.ws), first.ws.cache_settings())
    else:  # as release 0.1.x left it: JSON, no settings
        (sdir / ".sessionguard" / "pins.cache").write_bytes(
            orjson.dumps({"version": 2, "pins": passes.cache_entries(first.ws)}))
    first.close()
    put(sdir / f"{sids[0]}.json", data(9, sids[0]))  # written while the daemon was down
    (sdir / f"{sids[1]}.json").unlink()  # deleted while the daemon was down
    put(sdir / "notes.txt", b"not a session")
    second = Env(sdir)
    try:
        cache = second.store.pins.load_cache(second.ws.cache_settings())
        assert len(cache) == 6 and cache.exact is settings
        reads = count_reads(monkeypatch)
        result = passes.scan(second.tracker, second.ws, cache)
        assert (result["unchanged"], result["grew"], result["deleted"], result["files"]) == (4, 1, 1, 5)
        assert not set(reads) & ({f"{s}.json" for s in sids[2:]} | set(sids[2:]))  # adopted unread
        assert f"{sids[0]}.json" in reads
        assert [(v.count, v.reason) for v in second.versions(sids[1])] == [(2, "deleted")]
        assert {s: second.ws.files.entry(s) for s in sids[2:]} == {s: cache.get(s) for s in sids[2:]}
        reads.clear()
        assert passes.scan(second.tracker, second.ws)["unchanged"] == 5 and reads == []
    finally:
        second.close()


@pytest.mark.parametrize("order", ["as-listed", "reversed", "shuffled"])
def test_a_restart_adopts_whatever_order_the_hint_and_the_directory_are_in(sdir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          order: str) -> None:
    """A restart compares each name with the hint's next id first (the directory lists its
    names in the order the hint was made in); names out of that order — the hint's or the
    directory's, sessions made or deleted while the daemon was down, the server's own
    ``_index.json`` — are looked up instead: every unchanged session is still adopted
    unread, the new one pinned, the deleted one's pin kept."""
    sids = [f"s{i:011d}" for i in range(40)]
    for i, sid in enumerate(sids):
        put(sdir / f"{sid}.json", data(i % 7 + 1, sid))
    first = Env(sdir)
    passes.scan(first.tracker, first.ws)
    entries = passes.cache_entries(first.ws)
    listed = [n[:-5] for n in os.listdir(sdir) if n.endswith(".json")]
    assert list(entries) == listed  # the hint is written in the order the scan listed the files
    ids = {"as-listed": listed, "reversed": listed[::-1],
           "shuffled": sorted(listed, key=lambda s: hash(s) % 97)}[order]
    first.store.pins.save_cache({sid: entries[sid] for sid in ids}, first.ws.cache_settings())
    first.close()
    (sdir / f"{sids[5]}.json").unlink()
    put(sdir / "snew0000000001.json", data(3, "snew0000000001"))
    put(sdir / "_index.json", b'["not a session"]')
    second = Env(sdir)
    try:
        cache = second.store.pins.load_cache(second.ws.cache_settings())
        reads = count_reads(monkeypatch)
        result = passes.scan(second.tracker, second.ws, cache)
        assert (result["unchanged"], result["new"], result["deleted"], result["files"]) == (39, 1, 1, 40)
        kept = [s for s in sids if s != sids[5]]
        assert not set(reads) & ({f"{s}.json" for s in kept} | set(kept))  # neither file nor pin read
        assert "snew0000000001.json" in reads
        assert [(v.count, v.reason) for v in second.versions(sids[5])] == [(6, "deleted")]
        assert set(second.ws.files) == (set(sids) - {sids[5]}) | {"snew0000000001"}
    finally:
        second.close()


def test_a_session_adopted_from_the_hint_is_guarded_as_if_it_had_been_read(sdir: Path) -> None:
    """A restart keeps an adopted session as its place in the hint (no object): a wipe
    after it still keeps the version with the hint's count, a clean stop writes the same
    entries back, and a second hint turns the first one's places into objects."""
    sids = [f"s{i:011d}" for i in range(5)]
    for i, sid in enumerate(sids):
        put(sdir / f"{sid}.json", data(i + 3, sid))
    first = Env(sdir)
    passes.scan(first.tracker, first.ws)
    written = passes.cache_entries(first.ws)
    first.store.pins.save_cache(written, first.ws.cache_settings())
    first.close()
    second = Env(sdir)
    try:
        cache = second.store.pins.load_cache(second.ws.cache_settings())
        assert passes.scan(second.tracker, second.ws, cache)["unchanged"] == 5
        assert all(isinstance(dict.get(second.ws.files, s), int) for s in sids)  # places, not objects
        assert passes.cache_entries(second.ws) == written
        assert second.ws.files.key(sids[1]) == written[sids[1]][0]
        put(sdir / f"{sids[1]}.json", data(0, sids[1]))
        assert second.ev(f"{sids[1]}.json") == "shrunk"
        assert [v.count for v in second.versions(sids[1])] == [4]
        again = second.store.pins.load_cache(second.ws.cache_settings())  # another hint object
        second.ws.files.refer_to(again)
        assert not any(isinstance(dict.get(second.ws.files, s), int) for s in sids)
        assert {s: second.ws.files.entry(s) for s in sids if s != sids[1]} == \
            {s: e for s, e in written.items() if s != sids[1]}
    finally:
        second.close()


@pytest.mark.parametrize("change", [{"count": "turns"}, {"exclude": ("s00000000002*",)}, {"pattern": "s*.json"}],
                         ids=["count", "exclude", "pattern"])
def test_a_cache_written_under_other_watch_settings_is_not_believed(sdir: Path, change: dict[str, object]) -> None:
    """Its counts were another rule's (a loss could pass for a growth), or its ids another
    matcher's: the restart reads every file instead."""
    sids = [f"s{i:011d}" for i in range(4)]
    for i, sid in enumerate(sids):
        put(sdir / f"{sid}.json", data(i + 1, sid))
    first = Env(sdir)
    passes.scan(first.tracker, first.ws)
    first.store.pins.save_cache(passes.cache_entries(first.ws), first.ws.cache_settings())
    first.close()
    same, other = Env(sdir), Env(sdir, **change)
    try:
        assert len(same.store.pins.load_cache(same.ws.cache_settings())) == 4
        assert len(other.store.pins.load_cache(other.ws.cache_settings())) == 0
        assert len(other.store.pins.load_cache()) == 4  # asked without settings: as an older daemon did
    finally:
        same.close()
        other.close()


def test_a_damaged_cache_is_no_hint_and_a_whole_one_round_trips(sdir: Path) -> None:
    """pins.cache is packed (ids and fixed-size entries): every entry comes back as written,
    an unparseable count included; cut short, padded or garbled, it is simply no hint."""
    for i, sid in enumerate(["s1", "s2", "héllo wörld", "x\ny"]):
        put(sdir / f"{sid}.json", data(i + 1, sid))
    put(sdir / "broken.json", b'{"messages": [')
    env = Env(sdir)
    try:
        passes.scan(env.tracker, env.ws)
        entries = passes.cache_entries(env.ws)
        assert entries["broken"][1] is None and len(entries) == 5
        env.store.pins.save_cache(entries, env.ws.cache_settings())
        path = sdir / ".sessionguard" / "pins.cache"
        whole = path.read_bytes()
        hint = env.store.pins.load_cache(env.ws.cache_settings())
        assert {sid: hint.get(sid) for sid in hint} == entries and hint.exact
        for damaged in (whole[:-1], whole[:len(whole) // 2], whole + b"x\0", b"SGPC" + whole[4:20], b"\0" * 64, b""):
            path.write_bytes(damaged)
            assert len(env.store.pins.load_cache(env.ws.cache_settings())) == 0, damaged[:40]
    finally:
        env.close()


def test_a_cache_with_message_keys_of_the_hash_before_costs_reads_not_versions(
        sdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pins.cache from before message keys became CRC-based holds blake2b keys, which match
    no message now. A restart still believes its identities (no file read); each session's
    first write then finds the keys differ and has the store read its pin and judge on keys
    of its own: a streaming rewrite keeps nothing, another conversation as long is kept as
    "replaced", and the pins written next carry the new keys."""
    sids = ("aaa111", "bbb222")
    for sid in sids:
        put(sdir / f"{sid}.json", data(5, sid))
    first = Env(sdir)
    passes.scan(first.tracker, first.ws, find_orphans=True)
    for sid in sids:  # a write each: the pins now have message keys
        put(sdir / f"{sid}.json", data(6, sid))
        assert first.ev(f"{sid}.json") == "grew"
    settings = first.ws.cache_settings()
    entries = passes.cache_entries(first.ws)
    first.close()

    def blake(message: object) -> int:  # message_key before the CRC
        raw = orjson.dumps(message, option=orjson.OPT_SORT_KEYS)
        return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
    before = {}
    for sid, (key, count, first_key, prev, pin) in entries.items():
        msgs = make_session(6, sid)["messages"]
        assert (count, first_key, prev) == (6, message_key(msgs[0]), message_key(msgs[4]))
        before[sid] = (key, count, blake(msgs[0]), blake(msgs[4]), pin)
    (sdir / ".sessionguard" / "pins.cache").write_bytes(hint.encode(before, settings))
    env = Env(sdir)
    try:
        cache = env.store.pins.load_cache(env.ws.cache_settings())
        assert {sid: cache.get(sid) for sid in cache} == before
        assert passes.scan(env.tracker, env.ws, cache).get("unchanged") == 2
        opened: list[str] = []
        real_open = env.store.pins.open
        monkeypatch.setattr(env.store.pins, "open", lambda sid: opened.append(sid) or real_open(sid))
        doc = make_session(6, "bbb222")
        doc["messages"][-1]["content"] += " and more tokens"
        put(sdir / "bbb222.json", orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        assert env.ev("bbb222.json") == "same"
        assert env.versions("bbb222") == [] and opened == ["bbb222"]
        put(sdir / "aaa111.json", other(6))
        assert env.ev("aaa111.json") == "same"
        assert [(v.count, v.reason) for v in env.versions("aaa111")] == [(6, "replaced")]
        for sid in sids:
            tracked = env.ws.files.tracked(sid)
            assert tracked is not None and tracked.first == message_key(orjson.loads(
                (sdir / f"{sid}.json").read_bytes())["messages"][0])
    finally:
        env.close()


def test_a_scan_without_cache_finds_orphan_pins(env: Env) -> None:
    env.store.pins.write("orphan000001", data(4, "orphan000001"))  # a library pin whose file went away
    put(env.sdir / f"{SID}.json", data(2))
    result = passes.scan(env.tracker, env.ws, find_orphans=True)
    assert (result["new"], result["deleted"]) == (1, 1)
    assert [(v.count, v.reason) for v in env.versions("orphan000001")] == [(4, "deleted")]
    assert env.store.pins.stat("orphan000001") is None and passes.orphans(env.tracker, env.ws) == {}


def test_a_first_scan_judges_every_file_against_a_pin_it_listed(env: Env) -> None:
    """A start without a hint lists the pins once and looks only for those: a pin left
    by a crash (or the library) is still the one a shrunk file is judged against."""
    env.store.pins.write(SID, data(9))
    put(env.sdir / f"{SID}.json", data(3))
    put(env.sdir / "fresh0000001.json", data(4, "fresh0000001"))
    result = passes.scan(env.tracker, env.ws, find_orphans=True)
    assert (result["new"], result["shrunk"]) == (1, 1), result
    assert [(v.count, v.reason) for v in env.versions()] == [(9, "shrink")]
    assert env.store.pins.stat("fresh0000001") is not None and tmp_leftovers(env) == []


def test_a_pin_made_after_the_scan_listed_none_is_judged_not_replaced(env: Env) -> None:
    """The scan's listing said "no pin", then the library pinned a longer version before
    the scan reached the file: the new pin refuses to replace it, and it is judged."""
    env.store.pins.write(SID, data(9))  # appeared after the listing
    put(env.sdir / f"{SID}.json", data(3))
    outcome = env.tracker.evaluate_at(env.ws, (f"{SID}.json",), SID, None, unseen=True, pinless=True)
    assert outcome == "shrunk"
    assert [(v.count, v.reason) for v in env.versions()] == [(9, "shrink")]
    assert tmp_leftovers(env) == []


@pytest.mark.parametrize("start", ["first start", "start after a crash", "start after a clean stop"])
def test_a_scans_pins_carry_no_message_keys_and_the_first_write_reads_them(sdir: Path, start: str) -> None:
    """A scan pins (or adopts) every session without its two message keys (a first start
    makes 100,000 pins, most never written again), and a restart's hint carries none for
    them: the first write that keeps the count is judged against the pin's own keys, read
    then. Another conversation as long is kept as "replaced"; a streaming rewrite of the
    last message keeps nothing."""
    sids = ("aaa111", "bbb222")
    for sid in sids:
        put(sdir / f"{sid}.json", data(5, sid))
    if start != "first start":
        first = Env(sdir)  # pinned; then killed (no pins.cache), or stopped (pins.cache)
        passes.scan(first.tracker, first.ws, find_orphans=True)
        if start == "start after a clean stop":
            first.store.pins.save_cache(passes.cache_entries(first.ws), first.ws.cache_settings())
        first.close()
    env = Env(sdir)
    try:
        cache = env.store.pins.load_cache(env.ws.cache_settings()) if start == "start after a clean stop" else None
        result = passes.scan(env.tracker, env.ws, cache, find_orphans=cache is None)
        assert result.get("new" if start == "first start" else "unchanged") == 2, result
        for sid in sids:
            tracked = env.ws.files.tracked(sid)
            assert tracked is not None and tracked.count == 5 and tracked.identity() is None
        put(sdir / "aaa111.json", other(5))
        assert env.ev("aaa111.json") == "same"
        assert [(v.count, v.reason) for v in env.versions("aaa111")] == [(5, "replaced")]
        doc = make_session(5, "bbb222")
        doc["messages"][-1]["content"] += " and more tokens"
        put(sdir / "bbb222.json", orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        assert env.ev("bbb222.json") == "same"
        assert env.versions("bbb222") == []
        for sid in sids:  # the pins just written have their keys: no read at the next write
            tracked = env.ws.files.tracked(sid)
            assert tracked is not None and tracked.identity() is not None
    finally:
        env.close()


def test_a_one_message_pin_without_keys_is_not_read_at_its_first_write(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pin of one message can never be "replaced" (its first message is its last, maybe
    still streaming): a scan's such pin is not read for keys when its session grows."""
    put(env.sdir / f"{SID}.json", data(1))
    passes.scan(env.tracker, env.ws, find_orphans=True)
    opened: list[str] = []
    real_open = env.store.pins.open
    monkeypatch.setattr(env.store.pins, "open", lambda sid: opened.append(sid) or real_open(sid))
    put(env.sdir / f"{SID}.json", data(2))
    assert env.ev() == "grew"
    assert opened == [] and env.versions() == []


def tmp_leftovers(env: Env) -> list[str]:
    return [n for n in os.listdir(env.store.where + "/pins") if fsutil.TMP_MARK in n]


def test_a_scan_keeps_a_pin_that_unseen_writes_overtook(env: Env) -> None:
    put(env.sdir / f"{SID}.json", data(5))
    passes.scan(env.tracker, env.ws)
    doc = make_session(7)
    del doc["messages"][1]  # one message dropped, more added after: no event showed the shrink
    put(env.sdir / f"{SID}.json", orjson.dumps(doc))
    assert passes.scan(env.tracker, env.ws)["grew"] == 1
    assert [(v.count, v.reason) for v in env.versions()] == [(5, "replaced")]


def test_reconcile_leaves_files_being_written_alone(env: Env) -> None:
    live = env.sdir / f"{SID}.json"
    put(live, data(5))
    passes.scan(env.tracker, env.ws)
    put(live, data(1))
    ahead = time.time() + 60  # "just written", with a margin no slow machine can eat up
    os.utime(live, (ahead, ahead))
    evaluations = env.stats.snapshot().evaluations
    assert passes.reconcile(env.tracker, env.ws)["changed"] == 0
    assert env.stats.snapshot().evaluations == evaluations and env.versions() == []
    settled = time.time() - 10
    os.utime(live, (settled, settled))
    put(env.sdir / "late.json", data(2, "late"))  # missed by the event stream, written long ago
    os.utime(env.sdir / "late.json", (settled, settled))
    assert passes.reconcile(env.tracker, env.ws)["changed"] == 2
    assert [(v.count, v.reason) for v in env.versions()] == [(5, "shrink")] and "late" in env.ws.files
    assert env.stats.snapshot().reconciliations == 2


def test_a_swapped_sub_directory_is_never_read_through(sdir: Path, tmp_path: Path) -> None:
    (sdir / "sub").mkdir()
    put(sdir / "sub" / "x.json", data(5, "x"))
    elsewhere = tmp_path / "root-only"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "x.json").write_bytes(SECRET)
    e = Env(sdir, recursive=True)
    try:
        assert passes.scan(e.tracker, e.ws)["new"] == 1 and "sub%2Fx" in e.ws.files
        os.rename(sdir / "sub", sdir / "was-sub")
        os.rename(sdir / "was-sub" / "x.json", sdir / "was-sub" / "x.json.old")
        (sdir / "sub").symlink_to(elsewhere)
        assert e.ev("sub/x.json") == "skipped"
        assert [(v.count, v.reason) for v in e.versions("sub%2Fx")] == [(5, "unparseable")]
        for _ in range(2):
            passes.scan(e.tracker, e.ws, find_orphans=True)
            passes.reconcile(e.tracker, e.ws)
        assert not e.store_holds(b"never-to-be-copied") and "sub%2Fx" not in e.ws.files
        assert e.store.pins.stat("sub%2Fx") is None
    finally:
        e.close()


@needs_root
def test_a_sub_directory_of_another_owner_is_not_entered(sdir: Path) -> None:
    (sdir / "sub").mkdir()
    put(sdir / "sub" / "x.json", SECRET)
    os.chown(sdir / "sub", 4242, 4242)
    e = Env(sdir, recursive=True)
    try:
        assert e.ev("sub/x.json") == "skipped"
        assert "owned by uid 4242" in e.log.named("file.skipped")[0]["why"]
        passes.scan(e.tracker, e.ws)
        assert not e.store_holds(b"never-to-be-copied") and e.ws.files == {}
    finally:
        e.close()


@needs_root
def test_a_sub_directory_on_another_filesystem_is_not_entered(sdir: Path, tmpfs: Callable[..., Path]) -> None:
    mnt = tmpfs("1m", "sessions/mnt")  # e.g. someone else's mount inside the watched tree
    put(mnt / "x.json", SECRET)
    e = Env(sdir, recursive=True)
    try:
        assert e.ev("mnt/x.json") == "skipped"
        assert "another filesystem" in e.log.named("file.skipped")[0]["why"]
        passes.scan(e.tracker, e.ws)
        assert not e.store_holds(b"never-to-be-copied") and e.ws.files == {}
    finally:
        e.close()


def test_a_pin_the_library_moved_is_the_one_compared(env: Env) -> None:
    from sessionguard import Guard

    put(env.sdir / f"{SID}.json", data(2))
    assert env.ev() == "new"
    guard = Guard(env.sdir)  # the server embeds the library on the same directory and store
    try:
        guard.save(SID, make_session(10))
        put(env.sdir / f"{SID}.json", data(5))  # another writer, without the library; one event for both writes
        env.ev()
        assert 10 in [v.count for v in env.versions()]
    finally:
        guard.close()


def test_the_worker_is_handed_session_names_only(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename write is four inotify events (tmp created, tmp closed, tmp moved away, the
    session moved in); only the session's name may reach the worker, and it still keeps
    what a wipe loses."""
    from sessionguard.watch import Watcher

    handed: list[str] = []
    evaluate = env.tracker.evaluate

    def recording(path: str, *, unseen: bool = False) -> str:
        handed.append(path)
        return evaluate(path, unseen=unseen)

    monkeypatch.setattr(env.tracker, "evaluate", recording)
    watcher = Watcher(env.tracker, env.log, on_overflow=lambda: None)
    watcher.start()
    try:
        watcher.schedule(env.ws)
        session = env.sdir / f"{SID}.json"
        put(session, data(20))
        assert watcher.sync([env.ws], 30)
        put(session, data(0))
        assert watcher.sync([env.ws], 30)
    finally:
        watcher.stop()
    assert handed and set(handed) == {str(session)}
    assert env.stats.snapshot().events >= 8  # every event is still counted
    assert [v.count for v in env.versions()] == [20]

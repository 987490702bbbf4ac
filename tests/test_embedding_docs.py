"""``docs/embedding.md`` is code that runs: its diffs are the real files', its snippets are run here.

Every fenced block in the page carries a marker (``<!-- diff: A B -->``,
``<!-- file: NAME -->`` or ``<!-- run: NAME -->``) and this module runs each
one: the plain-dicts store before and after the guard (the miniature of the
chat server's tests), its endpoints and its own test suite (a real pytest
run), the snippets with the names they expect, the configuration with a root
daemon sharing its store with a server of another uid, and the README's
embedding snippet.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import sessionguard
from embedhelpers import SID, changed_lines, collecting, rchar, restore_on_disk
from sghelpers import IS_ROOT, make_session, rmtree, short_tmpdir, store_versions

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "embedding.md"
README = REPO / "README.md"
MARKED = re.compile(r"<!-- (diff|file|run): (.+?) -->\n```\w+\n(.*?)```\n", re.S)
EXPECTED = {
    ("diff", "tests/chatserver/storage.py tests/chatserver/guarded.py"),
    ("file", "before/mystore.py"), ("file", "after/mystore.py"), ("file", "endpoints.py"),
    ("run", "intent"), ("run", "save"), ("run", "recover"), ("run", "from_config"), ("file", "sessionguard.toml"),
    ("run", "events"), ("file", "tests/conftest.py"), ("file", "tests/test_mystore.py"),
}
#: The paths the snippets name, replaced by the test's own when they run.
EXAMPLE_DIR, EXAMPLE_CONFIG = "/var/lib/hermes/sessions", "/etc/sessionguard/sessionguard.toml"


def blocks(text: str) -> dict[tuple[str, str], str]:
    return {(kind, name): code for kind, name, code in MARKED.findall(text)}


def snippet(kind: str, name: str) -> str:
    return blocks(DOC.read_text())[(kind, name)]


def run(name: str, text: str | None = None, **namespace: Any) -> dict[str, Any]:
    """Run the ``run`` snippet *name* (of the page, or of *text*) in *namespace*; the namespace after."""
    code = blocks(text if text is not None else DOC.read_text())[("run", name)]
    for example, real in ((EXAMPLE_DIR, namespace.pop("example_dir", EXAMPLE_DIR)),
                          (EXAMPLE_CONFIG, namespace.pop("example_config", EXAMPLE_CONFIG))):
        code = code.replace(example, str(real))
    namespace.update(sessionguard=sessionguard, json=json, logging=logging, uuid=uuid)
    exec(compile(code, f"{DOC.name}:{name}", "exec"), namespace)
    return namespace


def plain_bytes(doc: Any) -> bytes:
    """How the plain-dicts store writes a document (its own format)."""
    return json.dumps(doc, indent=2, ensure_ascii=False).encode()


def test_every_block_of_the_page_is_marked_and_run_here() -> None:
    text = DOC.read_text()
    found = MARKED.findall(text)
    assert text.count("```") == 2 * len(found), "a code block without a marker is not run by any test"
    assert {(kind, name) for kind, name, _ in found} == EXPECTED


def test_the_pages_diff_is_the_real_diff_of_the_guarded_chat_server() -> None:
    for (kind, name), code in blocks(DOC.read_text()).items():
        if kind != "diff":
            continue
        old, new = name.split()
        diff = difflib.unified_diff((REPO / old).read_text().splitlines(keepends=True),
                                    (REPO / new).read_text().splitlines(keepends=True), old, new)
        assert code == "".join(diff)


# -- the plain-dicts store, before and after ----------------------------------------------------

@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Callable[[str], tuple[ModuleType, ModuleType]]]:
    """``plain("before")`` / ``plain("after")``: the page's ``mystore`` and ``endpoints`` as modules."""
    def load(variant: str) -> tuple[ModuleType, ModuleType]:
        folder = tmp_path / variant
        folder.mkdir()
        for name in ("mystore.py", "endpoints.py"):
            (folder / name).write_text(snippet("file", f"{variant}/{name}" if name == "mystore.py" else name))
        modules = []
        for name in ("mystore", "endpoints"):
            spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # endpoints imports mystore by name
            spec.loader.exec_module(module)
            modules.append(module)
        for name in ("mystore", "endpoints"):
            del sys.modules[name]
        return modules[0], modules[1]

    yield load


def test_the_plain_dicts_store_is_twelve_changed_lines() -> None:
    """``after/mystore.py`` differs from ``before/mystore.py`` by 12 lines: 7 added, 5 removed."""
    assert changed_lines(snippet("file", "before/mystore.py"), snippet("file", "after/mystore.py")) == (7, 5)


def test_the_plain_listing_wipes_unguarded_and_is_refused_and_logged_guarded(
        sdir: Path, plain: Callable[[str], tuple[ModuleType, ModuleType]]) -> None:
    path = sdir / f"{SID}.json"
    original = plain_bytes(make_session(200, extra={"active_stream_id": "stream-1"}))
    path.write_bytes(original)
    before_store, before_endpoints = plain("before")
    rows = before_endpoints.listing(before_store.Sessions(sdir), [SID])
    assert rows[0]["active_stream_id"] is None and "messages" not in json.loads(path.read_bytes())  # the wipe

    path.write_bytes(original)
    store, endpoints = plain("after")
    with collecting(logging.WARNING) as logged:
        sessions = store.Sessions(sdir)
        try:
            rows = endpoints.listing(sessions, [SID])
        finally:
            sessions.guard.close()
    assert rows[0]["title"] == f"session {SID}" and path.read_bytes() == original
    refused = [r for r in logged.records if r.sg_event == "save.refused"]  # type: ignore[attr-defined]
    assert [(r.sid, r.before, r.after) for r in refused] == [(SID, 200, 0)]  # type: ignore[attr-defined]
    assert store_versions(sdir / ".sessionguard", SID) == []


def test_the_plain_stores_clear_survives_a_restart_and_an_undo_then_a_wipe_comes_back_undone(
        sdir: Path, plain: Callable[[str], tuple[ModuleType, ModuleType]]) -> None:
    store, endpoints = plain("after")
    cleared, undone = sdir / f"{SID}.json", sdir / "0123456789ab.json"
    cleared.write_bytes(plain_bytes(make_session(30)))
    undone.write_bytes(plain_bytes(make_session(10, "0123456789ab")))
    sessions = store.Sessions(sdir)
    endpoints.clear(sessions, SID)
    assert endpoints.undo(sessions, "0123456789ab") == 8
    after_clear, after_undo = cleared.read_bytes(), undone.read_bytes()
    sessions.guard.close()
    wipe = json.loads(after_undo)
    wipe["messages"] = []
    restore_on_disk(undone, plain_bytes(wipe))  # a second writer, bypassing the guard (by rename, as servers do)

    restarted = store.Sessions(sdir)
    try:
        assert restarted.load(SID)["messages"] == [] and cleared.read_bytes() == after_clear
        assert undone.read_bytes() == after_undo and len(restarted.load("0123456789ab")["messages"]) == 8
    finally:
        restarted.guard.close()


def test_the_plain_stores_bytes_and_its_cheap_listing_read(
        sdir: Path, plain: Callable[[str], tuple[ModuleType, ModuleType]]) -> None:
    """Its own bytes (a ``NaN`` stays ``NaN``); the listing read gives the full load's values
    after reading a few KiB of a 450 KB file (the metadata holds nothing orjson refuses)."""
    store, _ = plain("after")
    odd = make_session(3, "0123456789ab", extra={"x_custom": float("nan"), "note": "ünïcødé ✓"})
    doc = make_session(1000, extra={"note": "ünïcødé ✓", "tags": [{"a": None}, 1.5e300]})
    sessions = store.Sessions(sdir)
    try:
        sessions.save("0123456789ab", odd)
        sessions.save(SID, doc)
        odd_data, data = (sdir / "0123456789ab.json").read_bytes(), (sdir / f"{SID}.json").read_bytes()
        assert math.isnan(sessions.load_meta("0123456789ab")["x_custom"])  # a full parse: orjson refuses NaN
        sessions.load_meta(SID)  # warm
        start = rchar()
        meta = sessions.load_meta(SID)
        read_meta = rchar() - start
        full = sessions.load(SID)
    finally:
        sessions.guard.close()
    assert odd_data == plain_bytes(odd) and b'"x_custom": NaN,' in odd_data and data == plain_bytes(doc)
    assert "ünïcødé ✓".encode() in data and b"\\u" not in data
    assert meta == {k: v for k, v in full.items() if k != "messages"} and list(meta) == list(full)[:-1]
    assert read_meta <= 16384 < len(data), read_meta


@pytest.mark.parametrize(("variant", "outcome"), [("after", "3 passed"), ("before", "2 failed, 1 passed")])
def test_the_pages_test_suite_passes_guarded_and_catches_both_bugs_unguarded(
        tmp_path: Path, variant: str, outcome: str) -> None:
    suite = tmp_path / "suite"
    (suite / "tests").mkdir(parents=True)
    for name in ("endpoints.py", "tests/conftest.py", "tests/test_mystore.py"):
        (suite / name).write_text(snippet("file", name))
    (suite / "mystore.py").write_text(snippet("file", f"{variant}/mystore.py"))
    env = {**os.environ, "PYTHONPATH": str(suite)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           f"--basetemp={tmp_path / 'base'}", "tests"],
                          capture_output=True, text=True, cwd=suite, env=env, timeout=120, check=False)
    out = done.stdout
    assert re.search(rf"^{outcome} in ", out, re.M), out + done.stderr
    if variant == "before":
        assert "session 'abc123def456': 4 → 0 messages, written without the guard" in out
        killed = "test_a_save_killed_before_its_rename_leaves_the_session_whole"
        assert re.search(rf"^FAILED tests/test_mystore.py::{killed}", out, re.M), out
        assert "abc123def456.json.tmp" in out


# -- the snippets -------------------------------------------------------------------------------

def test_the_intent_snippet_keeps_an_intended_version_that_recovery_leaves_alone(sdir: Path) -> None:
    (sdir / f"{SID}.json").write_bytes(plain_bytes(make_session(10)))
    ns = run("intent", SESSION_DIR=sdir, sid=SID)
    ns["guard"].close()
    assert [(v.reason, v.count) for v in store_versions(sdir / ".sessionguard", SID)] == [("intended", 10)]
    guard = sessionguard.Guard(sdir)
    try:
        assert guard.recover_on_startup().restored == [] and len(guard.load(SID)["messages"]) == 8
    finally:
        guard.close()


def test_the_save_snippet_ends_with_the_servers_own_bytes(sdir: Path) -> None:
    guard = sessionguard.Guard(sdir)
    try:
        doc = make_session(5, extra={"note": "ünïcødé"})
        ns = run("save", guard=guard, sid=SID, doc=doc)
    finally:
        guard.close()
    assert (sdir / f"{SID}.json").read_bytes() == ns["data"] == plain_bytes(doc)
    assert store_versions(sdir / ".sessionguard", SID) == []


def test_the_recover_snippet_reports_what_it_restored(sdir: Path) -> None:
    guard = sessionguard.Guard(sdir)
    guard.save(SID, make_session(12))
    guard.close()
    restore_on_disk(sdir / f"{SID}.json", plain_bytes(make_session(0)))  # a writer bypassing the guard
    (sdir / "0123456789ab.json").write_bytes(plain_bytes(make_session(3)))
    guard = sessionguard.Guard(sdir)
    try:
        with collecting() as logged:
            ns = run("recover", guard=guard, log=logging.getLogger("sessionguard.example"))
    finally:
        guard.close()
    assert [(r.sid, r.version.count) for r in ns["report"].restored] == [(SID, 12)]
    texts = [r.getMessage() for r in logged.records if r.name == "sessionguard.example"]
    assert f"restored {SID} from version {ns['report'].restored[0].version.id} (12 messages)" in texts
    assert "left 0123456789ab alone: has 3 messages" in texts


def test_from_config_reads_the_daemons_watch(sdir: Path, tmp_path: Path) -> None:
    config = tmp_path / "sessionguard.toml"
    config.write_text(snippet("file", "sessionguard.toml").replace(EXAMPLE_DIR, str(sdir)))
    ns = run("from_config", example_dir=sdir, example_config=config)
    guard = ns["guard"]
    try:
        assert guard.session_dir == str(sdir) and guard.intent_keys == ("intentional_shrink_generation",
                                                                       "clear_generation")
    finally:
        guard.close()
    with pytest.raises(sessionguard.NotFound, match=r"has no \[\[watch\]\] with path"):
        sessionguard.Guard.from_config(tmp_path, str(config))


def test_the_events_snippet_shows_a_refusal_in_the_servers_own_ui(sdir: Path) -> None:
    logger = logging.getLogger("sessionguard")
    level = logger.level
    try:
        (sdir / f"{SID}.json").write_bytes(plain_bytes(make_session(10)))
        ns = run("events", SESSION_DIR=sdir)
        assert logger.level == logging.INFO
        guard = ns["guard"]
        try:
            guard.load(SID, metadata_only=True)
            with pytest.raises(sessionguard.PartialSessionError):
                guard.save_bytes(SID, plain_bytes(make_session(0)), count=0)
        finally:
            guard.close()
    finally:
        logger.setLevel(level)
    assert ns["alerts"] == [f"save.refused: {SID} 10 → 0"]


def test_the_readme_snippet_runs(sdir: Path) -> None:
    readme = README.read_text()
    (sdir / f"{SID}.json").write_bytes(plain_bytes(make_session(4)))
    data = plain_bytes(make_session(5))
    ns = run("readme", readme, SESSION_DIR=sdir, sid=SID, data=data, n=5)
    ns["guard"].close()
    assert len(ns["doc"]["messages"]) == 4 and "messages" not in ns["meta"]
    assert (sdir / f"{SID}.json").read_bytes() == data


# -- a store shared with a root daemon -------------------------------------------------------------

UID = 4242  # a uid with no account: the directory's owner and the server's user

AS_SERVER = """
import json, sys
import sessionguard
sessions, config, step = sys.argv[1:]
guard = sessionguard.Guard.from_config(sessions, config)
doc = {"session_id": "abc123def456", "messages": [{"role": "user", "content": str(i)} for i in range(10)]}
if step == "save":
    guard.save("abc123def456", doc)
    doc["messages"] = doc["messages"][:4]
    guard.save("abc123def456", doc)
elif step == "recover":
    print(json.dumps([[r.sid, r.version.count, r.version.source] for r in guard.recover_on_startup().restored]))
"""


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_root_daemon_and_the_servers_guard_share_one_store(daemons: Any) -> None:
    top = short_tmpdir("sgemb")  # pytest's tmp_path is not reachable by another uid
    try:
        os.chmod(top, 0o755)
        sessions = Path(top) / "sessions"
        sessions.mkdir()
        os.chown(sessions, UID, UID)
        config = Path(top) / "sessionguard.toml"
        config.write_text(snippet("file", "sessionguard.toml").replace(EXAMPLE_DIR, str(sessions)))
        script = Path(top) / "server.py"
        script.write_text(AS_SERVER)

        def as_server(*argv: str) -> str:
            done = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                                   sys.executable, *argv], capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            return done.stdout

        try:
            as_server("-c", "import sessionguard")
        except AssertionError as exc:
            pytest.skip(f"uid {UID} cannot run {sys.executable} with sessionguard: {exc}")
        d = daemons("--config", str(config))
        as_server(str(script), str(sessions), str(config), "save")  # 10, then 4 (no intent): the library keeps 10
        live = sessions / f"{SID}.json"
        d.sync()
        wiped = json.loads(live.read_bytes())
        wiped["messages"] = []
        tmp = sessions / f"{SID}.tmp.1.1"
        tmp.write_bytes(json.dumps(wiped).encode())
        os.chown(tmp, UID, UID)
        tmp.replace(live)  # a writer bypassing the guard: the daemon keeps the 4
        d.sync()
        assert json.loads(as_server(str(script), str(sessions), str(config), "recover")) == [[SID, 4, "daemon"]]
        assert len(json.loads(live.read_bytes())["messages"]) == 4
        d.stop()
        store = sessions / ".sessionguard"
        owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [store, *store.rglob("*")]}
        assert owners == {(UID, UID)}
        kept = {(v.count, v.reason, v.source) for v in store_versions(store, SID)}
        assert {(10, "shrink", "library"), (4, "shrink", "daemon"), (0, "pre-restore", "library")} <= kept, kept
        assert d.events("store.replaced") == []
    finally:
        rmtree(top)

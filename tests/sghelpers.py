"""Test helpers: realistic sessions and a server-style writer that bypasses the guard."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest


def make_session(n: int, sid: str = "abc123def456", *, extra: dict | None = None) -> dict:
    """A hermes-webui-shaped session: metadata first, ~400 bytes per message."""
    doc = {
        "session_id": sid,
        "title": f"session {sid}",
        "workspace": "/home/user/project",
        "model": "gpt-5",
        "created_at": 1764000000.0,
        "updated_at": 1764000000.0 + n,
        "pinned": False,
        "active_stream_id": None,
    }
    if extra:
        doc.update(extra)
    doc["messages"] = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"message {i}: " + ("lorem ipsum dolor sit amet " * 13),
            "timestamp": 1764000000.0 + i,
        }
        for i in range(n)
    ]
    return doc


def server_write(path: str | os.PathLike[str], doc: object) -> None:
    """Write like hermes-webui: tmp `<sid>.tmp.<pid>.<tid>` in the same dir, fsync, os.replace."""
    path = os.fspath(path)
    base = path[: -len(".json")] if path.endswith(".json") else path
    tmp = f"{base}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def count_of(path: str | os.PathLike[str]) -> int:
    return len(orjson.loads(Path(path).read_bytes())["messages"])


def snapshot(directory: str | os.PathLike[str]) -> dict[str, tuple[str, int, int]]:
    """sha256, inode and mtime_ns of every regular file directly in *directory*."""
    out = {}
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            out[entry.name] = (hashlib.sha256(Path(entry.path).read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
    return out


IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mount/sysctl/other users)")
def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of *pid*, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


#: What throwaway accounts are made and removed with (tests that need them skip without).
ACCOUNT_TOOLS = ("useradd", "userdel", "groupadd", "groupdel", "setpriv")


def skip_without_account_tools() -> None:
    """Skip the test when a tool that makes or removes throwaway accounts is missing."""
    for tool in ACCOUNT_TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


@contextlib.contextmanager
def throwaway_accounts(groups: Iterable[str], users: Iterable[tuple[str, str, Sequence[str]]]) -> Iterator[None]:
    """Make *groups*, then *users* ``(name, primary group, supplementary groups)`` with no
    home and no login shell; remove every one made afterwards, also after a failure half-way."""
    made_groups: list[str] = []
    made_users: list[str] = []
    try:
        for g in groups:
            subprocess.run(["groupadd", g], check=True, capture_output=True, timeout=60)
            made_groups.append(g)
        for name, primary, extra in users:
            cmd = ["useradd", "--no-create-home", "--no-user-group", "--gid", primary,
                   "--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent"]
            if extra:
                cmd += ["--groups", ",".join(extra)]
            subprocess.run([*cmd, name], check=True, capture_output=True, timeout=60)
            made_users.append(name)
        yield
    finally:
        for u in made_users:
            subprocess.run(["userdel", u], capture_output=True, timeout=60, check=False)
        for g in made_groups:
            subprocess.run(["groupdel", g], capture_output=True, timeout=60, check=False)



def short_tmpdir(prefix: str = "sg") -> str:
    """A short directory in /tmp (sun_path is 108 bytes; pytest's tmp_path can be longer)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def store_of(sdir: str | os.PathLike[str]) -> Path:
    """The default store of a session directory."""
    return Path(sdir) / ".sessionguard"


def pin_count(sdir: str | os.PathLike[str], sid: str, *, store: str | os.PathLike[str] | None = None) -> int | None:
    """Messages in *sid*'s pin (read here, not from any name), -1 when it is unparseable,
    None when the session has no pin."""
    path = Path(store or store_of(sdir)) / "pins" / sid
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    from sessionguard.count import CountSpec, parse
    from sessionguard.pins import plain

    count = parse(plain(data, 1 << 30), CountSpec.parse("messages")).count
    return -1 if count is None else count


def version_files(sdir: str | os.PathLike[str], sid: str, *, store: str | os.PathLike[str] | None = None) -> list[Path]:
    """*sid*'s version files in the store, oldest first (names sort by time)."""
    folder = Path(store or store_of(sdir)) / "sessions" / sid
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(".version"))


@dataclass(frozen=True)
class OnDisk:
    """A version file as a test finds it on disk (its name parsed, its path known)."""

    path: Path
    id: str
    count: int | None
    reason: str
    source: str
    method: str
    name: str
    size: int


def store_versions(store: str | os.PathLike[str], sid: str) -> list[OnDisk]:
    """*sid*'s versions in *store*, read from the directory itself, oldest first."""
    from sessionguard.naming import parse_version_name

    folder = Path(store) / "sessions" / sid
    out = []
    for p in sorted(folder.glob("*.version")) if folder.is_dir() else []:
        v = parse_version_name(sid, p.name, p.stat().st_size)
        if v is not None:
            out.append(OnDisk(p, v.id, v.count, v.reason, v.source, v.method, v.name, v.size))
    return out


def maintenance_passes(d) -> int:
    """How many passes the daemon's maintenance loop has made (a positive marker that its
    checks and retries ran, instead of sleeping through a window where "nothing happens")."""
    for line in d.call("metrics")["text"].splitlines():
        if line.startswith("sessionguard_maintenance_passes_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no sessionguard_maintenance_passes_total in the metrics")


def reconciliations(d) -> int:
    """How many reconciliation passes the daemon *d* has completed (from its metrics):
    a positive marker that a pass ran, instead of waiting for "nothing happens"."""
    for line in d.call("metrics")["text"].splitlines():
        if line.startswith("sessionguard_reconciliations_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no sessionguard_reconciliations_total in the metrics")


# -- in-process core tests: a recording logger, another process holding a lock ------

class Recorder:
    """A structlog-style logger that remembers every event (what the tracker and Stats log to)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()

    def _add(self, level: str, event: str, **kw: object) -> None:
        with self.lock:
            self.events.append((level, event, kw))

    def debug(self, event: str, **kw: object) -> None:
        self._add("debug", event, **kw)

    def info(self, event: str, **kw: object) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: object) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: object) -> None:
        self._add("error", event, **kw)

    def named(self, event: str) -> list[dict]:
        with self.lock:
            return [kw for _, e, kw in self.events if e == event]

    def levels(self, event: str) -> list[str]:
        with self.lock:
            return [lvl for lvl, e, _ in self.events if e == event]


def _store_fd(store: str) -> int:
    return os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _hold(store: str, what: str, ready, release) -> None:  # runs in a spawned process
    from sessionguard.locks import Locks

    locks = Locks(_store_fd(store))
    if what == "daemon":
        locks.claim_daemon()
        ready.set()
        release.wait(120)
        return
    with locks.session(what):
        ready.set()
        release.wait(120)


def _try_once(store: str, what: str) -> None:  # runs in a spawned process: exit 0 = got it, 3 = held
    from sessionguard.errors import StoreError
    from sessionguard.locks import Locks

    locks = Locks(_store_fd(store))
    try:
        if what == "daemon":
            locks.claim_daemon()
        else:
            with locks.session(what, wait=0):
                pass
    except StoreError:
        raise SystemExit(3) from None


class HeldElsewhere:
    """Another process (multiprocessing, spawn) holding session *what*'s lock — or, with
    ``"daemon"``, the daemon claim — in the store directory *store* until :meth:`release`
    or :meth:`kill`. A context manager; always cleaned up."""

    def __init__(self, store: str | os.PathLike[str], what: str) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._ready, self._release = ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_hold, args=(os.fspath(store), what, self._ready, self._release))

    def __enter__(self) -> HeldElsewhere:
        self.proc.start()
        if not self._ready.wait(60):
            self.kill()
            raise RuntimeError("the lock holder never got its lock")
        return self

    def release(self) -> None:
        self._release.set()
        self.proc.join(60)
        assert self.proc.exitcode == 0, self.proc.exitcode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(60)

    def __exit__(self, *exc: object) -> None:
        if self.proc.is_alive():
            self._release.set()
            self.proc.join(10)
            if self.proc.is_alive():
                self.kill()


def lockable_elsewhere(store: str | os.PathLike[str], what: str) -> bool:
    """Can another process take session *what*'s lock (or the daemon claim) in *store* right now?"""
    import multiprocessing

    p = multiprocessing.get_context("spawn").Process(target=_try_once, args=(os.fspath(store), what))
    p.start()
    p.join(60)
    if p.exitcode not in (0, 3):
        p.kill()
        raise RuntimeError(f"lock probe failed: exit {p.exitcode}")
    return p.exitcode == 0


def tree(root: str | os.PathLike[str]) -> dict[str, tuple[int, int, int, str]]:
    """Every entry below *root* (no symlink followed): relative path → (inode, mode, mtime_ns, sha256 or '')."""
    out = {}
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.isfile(p) and \
                not os.path.islink(p) else ""
            out[os.path.relpath(p, root)] = (st.st_ino, st.st_mode, st.st_mtime_ns, digest)
    return out


# -- the admin's side: sessionguardctl as a subprocess, WHEN values, the store searched byte by byte --

def sgctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``sessionguardctl --socket SOCK ARGS…`` run as its own process (the exit code is the caller's to check)."""
    return subprocess.run([sys.executable, "-m", "sessionguard.ctl", "--socket", sock, *args],
                          capture_output=True, text=True, timeout=120, check=False)


def sgctl_json(sock: str, *args: str, codes: tuple[int, ...] = (0,)) -> Any:
    """``sessionguardctl --json …``: the parsed result, after checking the exit code is one of *codes*."""
    p = sgctl(sock, "--json", *args)
    assert p.returncode in codes, (args, p.returncode, p.stdout, p.stderr)
    return orjson.loads(p.stdout)


def printed_command(stdout: str, label: str) -> str:
    """The command the client printed after *label* (e.g. ``to undo this whole run:``), exactly as printed."""
    lines = [line.split(label, 1)[1].strip() for line in stdout.splitlines() if label in line]
    assert len(lines) == 1, (label, stdout)
    return lines[0]


def run_printed(command: str) -> subprocess.CompletedProcess[str]:
    """Run a command the client printed, in a shell, as an admin would paste it (``sessionguardctl``
    is the one installed beside this interpreter)."""
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"]))
    return subprocess.run(["bash", "-ec", command], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def local_when(ts: float) -> str:
    """An absolute WHEN for ``--since``/``--before`` (local time, whole seconds, as an admin types it)."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%dT%H:%M:%S")


def next_second() -> float:
    """Wait (bounded) until the clock has passed the next whole second; that second, as a Unix time.

    Orders "before" and "after" for an absolute WHEN with one-second resolution:
    a wait for an ordering, never a timing assertion."""
    cut = float(int(time.time()) + 1)
    deadline = time.monotonic() + 5
    while time.time() <= cut:
        assert time.monotonic() < deadline, "the clock did not move"
        time.sleep(0.05)
    return cut


def files_holding(root: str | os.PathLike[str], needle: bytes) -> list[str]:
    """Every regular file below *root* (no symlink followed) whose bytes contain *needle*, relative to *root*."""
    assert needle
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path) and needle in Path(path).read_bytes():
                found.append(os.path.relpath(path, root))
    return sorted(found)


def seed_write(d: str | os.PathLike[str], session: Any) -> bytes:
    """Save a test chat server ``Session`` into directory *d* the way that server does (its own
    bytes, ``<sid>.tmp.<pid>.<tid>`` + fsync + rename); the bytes written."""
    from chatserver import serialize
    from chatserver.seedio import write_atomic

    data: bytes = serialize(session)
    write_atomic(Path(d) / f"{session.session_id}.json", data)
    return data


# -- the attacks of the security review (tests/attacks/): what "nothing outside changed" means --

from typing import TYPE_CHECKING  # noqa: E402  (appended section: the module's head is not ours to edit)

if TYPE_CHECKING:
    from collections.abc import Callable


def wait_for(check: Callable[[], object], timeout: float = 15.0, step: float = 0.05) -> bool:
    """Poll *check* until it is truthy; False (never an exception) after *timeout*.

    For attacks whose worst outcome must be looked at before a missing log line fails
    the test: an old release never logs ``store.reclaimed``, and what it did to the
    canary is the finding."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def version_hash(data: bytes) -> str:
    """A version's content id, computed here (64 bits of BLAKE2b), not taken from the daemon."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class Witness:
    """Everything below a directory standing for ``/etc``, proven untouched.

    :meth:`arm` records every entry (no symlink followed): name, type and mode,
    owner, size, inode, link count, mtime and ctime, and a content hash; it then
    sets each entry's atime before its mtime, so that under ``relatime`` the next
    read of a file (or listing of a directory) moves it. :meth:`changes` looks at
    the atimes first (stat only, no read), then at everything else, and lists
    every difference: an entry created, removed, linked, rewritten, chmod-ed or
    read.
    """

    _ATIME_NS = 1_000_000_000

    def __init__(self, root: str | os.PathLike[str], exclude: tuple[str, ...] = ()) -> None:
        """*exclude*: paths relative to *root* (directories or files) left out with all they hold."""
        self.root = Path(root)
        self.exclude = frozenset(exclude)
        self.before: dict[str, tuple[object, ...]] = {}
        self.hashes: dict[str, str] = {}

    def _entries(self) -> list[str]:
        out = [""]
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            dirnames[:] = [n for n in dirnames if os.path.normpath(os.path.join(rel_dir, n)) not in self.exclude]
            for name in dirnames + filenames:
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if rel not in self.exclude:
                    out.append(rel)
        return sorted(out)

    def _stat(self, rel: str) -> tuple[object, ...]:
        st = os.lstat(self.root / rel)
        return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns)

    def _hash(self, rel: str) -> str:
        p = self.root / rel
        if p.is_symlink():
            return "->" + os.readlink(p)
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
        return ""

    def arm(self) -> None:
        """Record the tree and set every atime back (call after the tree is complete)."""
        names = self._entries()
        self.hashes = {rel: self._hash(rel) for rel in names}
        for rel in names:
            st = os.lstat(self.root / rel)
            os.utime(self.root / rel, ns=(self._ATIME_NS, st.st_mtime_ns), follow_symlinks=False)
        self.before = {rel: self._stat(rel) for rel in names}

    def changes(self) -> list[str]:
        """Every difference since :meth:`arm`; empty when nothing was touched."""
        out = []
        for rel in self.before:
            try:
                st = os.lstat(self.root / rel)
            except FileNotFoundError:
                continue
            if st.st_atime_ns != self._ATIME_NS and not os.path.islink(self.root / rel):
                out.append(f"{rel or '.'}: read (atime moved)")
        now = self._entries()
        for rel in sorted(set(now) - set(self.before)):
            out.append(f"{rel}: created")
        for rel in sorted(set(self.before) - set(now)):
            out.append(f"{rel}: removed")
        for rel in sorted(set(now) & set(self.before)):
            if self._stat(rel) != self.before[rel]:
                out.append(f"{rel}: metadata changed {self.before[rel]} -> {self._stat(rel)}")
            if self._hash(rel) != self.hashes[rel]:
                out.append(f"{rel}: content changed")
        return out

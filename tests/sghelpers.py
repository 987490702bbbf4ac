"""Test helpers: realistic sessions and a server-style writer that bypasses the guard."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

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

    count = parse(data, CountSpec.parse("messages")).count
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


def reconciliations(d) -> int:
    """How many reconciliation passes the daemon *d* has completed (from its metrics):
    a positive marker that a pass ran, instead of waiting for "nothing happens"."""
    for line in d.call("metrics")["text"].splitlines():
        if line.startswith("sessionguard_reconciliations_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no sessionguard_reconciliations_total in the metrics")

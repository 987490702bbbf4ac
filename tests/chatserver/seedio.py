"""How the seed reads and writes its files, under the names ``storage`` calls.

Kept apart from ``storage`` so that a guarded copy of ``storage`` replaces
calls, not code: it imports fewer of these names and calls
``sessionguard.Guard`` in their place. Saving is the seed's recipe:
``<sid>.tmp.<pid>.<tid>`` in the same directory, ``fsync``, ``os.replace`` —
no directory ``fsync``, no lock. Reading is Python's ``json``. No name is
followed when it is a symbolic link (``ELOOP`` instead).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: A session id as the seed makes them (12 hex chars, or agent ids like
#: ``20260424_231848_e7706c``); names starting with ``_`` or ``.`` are not sessions.
SID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

_TMP_MAX_AGE = 3600  # the seed sweeps its own tmp files older than an hour

#: What the seed's listing read looks for: the top-level ``messages`` key in its
#: own indent-2 format (a string value cannot hold a raw newline, so this
#: cannot match inside one, and nested keys are indented deeper).
_MESSAGES_MARK = b'\n  "messages": '


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def session_ids(directory: Path) -> list[str]:
    """Every ``<sid>.json`` regular file (``_index.json``, tmp files and symlinks are not sessions)."""
    with os.scandir(directory) as entries:
        return sorted(e.name[:-5] for e in entries
                      if e.name.endswith(".json") and SID.fullmatch(e.name[:-5]) and e.is_file(follow_symlinks=False))


def sweep_tmp(directory: Path) -> None:
    """Remove the seed's tmp files (``*.tmp.*``) older than an hour: leftovers of crashed saves."""
    stale = time.time() - _TMP_MAX_AGE
    with os.scandir(directory) as entries:
        for entry in entries:
            if ".tmp." in entry.name and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime < stale:
                        os.unlink(entry.path)


def read_json(path: Path) -> Any:
    """The whole file, parsed with Python's json (``ValueError`` if it is not JSON)."""
    with open(path, "rb", opener=_nofollow) as f:
        return json.loads(f.read())


def read_metadata(path: Path) -> Any:
    """Everything before ``"messages"`` without reading further; the whole file if not in our format."""
    with open(path, "rb", opener=_nofollow) as f:
        meta = metadata_from_prefix(f.read)
    return meta if meta is not None else read_json(path)


def metadata_from_prefix(read: Callable[[int], bytes]) -> dict[str, Any] | None:
    """The seed's cheap listing read: the document up to its ``messages`` key, closed and parsed.

    Reads 4 KiB chunks only until the key; ``None`` when the file is not in
    the server's own format. Raises ``ValueError`` when the prefix is not JSON.
    """
    head = b""
    while (cut := head.find(_MESSAGES_MARK)) < 0:
        chunk = read(4096)
        if not chunk:
            return None
        head += chunk
    prefix = head[:cut].rstrip()
    if not prefix.endswith(b","):
        return None
    data = json.loads(prefix[:-1] + b"\n}")
    return data if isinstance(data, dict) else None


def write_atomic(path: Path, data: bytes) -> None:
    """The seed's save: ``<sid>.tmp.<pid>.<tid>`` beside *path*, fsync, replace."""
    tmp = path.with_name(f"{path.name.removesuffix('.json')}.tmp.{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "wb", opener=_nofollow) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

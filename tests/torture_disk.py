"""What the session directory and the store hold, read here and never asked of the daemon.

Helpers of the oracle ("torture") run: live files by identity, pins compared
with their live files by content (a pin's name claims nothing), tmp files of
killed daemons, the store's size, ``pins.cache`` checked against reality,
message counts parsed from bytes, and a tail of a growing log or journal.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import orjson

from sessionguard.count import key_hash, stat_key
from sessionguard.watchstate import pin_key

TMP_MARK = ".tmp-sg-"  # the store's tmp-file marker (fsutil.TMP_MARK)
COOKIE_PREFIX = ".sessionguard-sync"  # the daemon's sync cookies (watch.COOKIE_PREFIX)
CACHE_FILE = "pins.cache"  # the daemon's restart hint (pins.CACHE_FILE), written only at a clean stop

StatKey = tuple[int, int, int, int]


def live_keys(sdir: Path) -> dict[str, StatKey]:
    """(dev, ino, size, mtime_ns) of every regular session file, by session id."""
    out: dict[str, StatKey] = {}
    with os.scandir(sdir) as it:
        for e in it:
            if not e.name.endswith(".json") or e.name.startswith(("_", ".")):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[e.name[: -len(".json")]] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


#: The first four bytes of every zstd frame (RFC 8878); no JSON session starts with them.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def session_bytes(data: bytes) -> bytes:
    """What a pin holds: its bytes, or (``pin = "zstd"``) the session they decompress to,
    decompressed here with ``zstandard`` itself, not by the daemon's code. A frame that does
    not decompress comes back as it is: it then matches no session's bytes, so the checks
    report it (a missing pin, a lost version) instead of the oracle failing on it."""
    if data[:4] != ZSTD_MAGIC:
        return data
    import zstandard

    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dobj.decompress(data)
    except zstandard.ZstdError:
        return data
    # exactly one whole frame: a torn one would give a prefix, trailing bytes would be ignored
    return out if dobj.eof and not dobj.unused_data else data


def read_pin(path: Path) -> bytes | None:
    data = read_or_none(path)
    return None if data is None else session_bytes(data)


def pin_matches(store: Path, sdir: Path, sid: str) -> bool:
    """Does *sid*'s pin hold exactly what its live file holds? (A pin claims nothing in its
    name: only its content says what it is.)"""
    pin = read_pin(store / "pins" / sid)
    return pin is not None and pin == read_or_none(sdir / f"{sid}.json")


def count_messages(data: bytes) -> int | None:
    """The message count of a session file's bytes, parsed here (None: unparseable).

    orjson first, then the standard library, which also reads what Python's
    ``json.dump`` writes (NaN, Infinity): the daemon reads both the same way.
    """
    try:
        doc: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            doc = json.loads(data)
        except ValueError:
            return None
    messages = doc.get("messages") if isinstance(doc, dict) else None
    return len(messages) if isinstance(messages, list) else None


def tmp_files(dirs: list[Path], owners: set[int] | None = None) -> list[str]:
    """Store tmp files (``.tmp-sg-<pid>-…``) under *dirs*, optionally only those of *owners*
    (each file once, however the directories nest)."""
    found: set[str] = set()
    for top in dirs:
        for root, _, files in os.walk(top):
            for name in files:
                _, sep, rest = name.partition(TMP_MARK)
                if not sep:
                    continue
                pid = rest.partition("-")[0]
                if owners is None or (pid.isdigit() and int(pid) in owners):
                    found.add(os.path.realpath(os.path.join(root, name)))
    return sorted(found)


def cookies_of(sdir: Path, owners: set[int]) -> list[str]:
    return [n for n in os.listdir(sdir)
            if n.startswith(COOKIE_PREFIX)
            and n[len(COOKIE_PREFIX):].removeprefix(TMP_MARK).partition("-")[0] in {str(p) for p in owners}]


def store_usage(store: Path) -> dict[str, int]:
    files = versions = pins = total = 0
    seen: set[tuple[int, int]] = set()
    if store.is_dir():
        for root, _, names in os.walk(store):
            for name in names:
                st = os.lstat(os.path.join(root, name))
                files += 1
                versions += name.endswith(".version")
                pins += os.path.basename(root) == "pins" and TMP_MARK not in name
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return {"store_files": files, "store_versions": versions, "store_pins": pins, "store_bytes": total}


def cache_entries(raw: bytes) -> dict[str, tuple[int, int | None, int, int, int]]:
    """The entries of a ``pins.cache``, decoded here rather than by the daemon's own code
    (an oracle that shares the reader would share its bugs): the JSON of release 0.1.x,
    or the packed form (``SGPC``, version, settings JSON, count, 40-byte records, the ids
    each ended by NUL)."""
    if raw[:1] == b"{":
        return {sid: tuple(e) for sid, e in orjson.loads(raw)["pins"].items()}  # type: ignore[misc]
    magic, version, size = struct.unpack_from("<4sII", raw)
    assert (magic, version) == (b"SGPC", 3), (magic, version)
    at = 12 + size
    (n,) = struct.unpack_from("<Q", raw, at)
    at += 8
    ids = raw[at + 40 * n:].split(b"\0")
    assert len(ids) == n + 1 and ids[-1] == b"", "pins.cache cut short"
    out = {}
    for i, sid in enumerate(ids[:-1]):
        key, count, first, prev, pin = struct.unpack_from("<qqQQq", raw, at + 40 * i)
        out[sid.decode("utf-8", "surrogateescape")] = (key, None if count < 0 else count, first, prev, pin)
    return out


def check_cache(store: Path, sdir: Path) -> dict[str, Any]:
    """Does ``pins.cache`` tell the truth wherever the daemon would believe it?

    A start with a cache does not read a live file whose identity is the one
    an entry names: it takes the entry's count as what the pin holds. So for
    every such entry the pin must exist, and — unless the pin's own identity
    changed since (then the daemon reads the pin before judging anything) —
    hold exactly the live file's bytes and the entry's count. Entries whose
    live file changed are not believed and not checked.
    """
    out: dict[str, Any] = {"present": False, "entries": 0, "believed": 0, "pin_moved": 0, "wrong": []}
    raw = read_or_none(store / CACHE_FILE)
    if raw is None:
        return out
    out["present"] = True
    pins = cache_entries(raw)
    out["entries"] = len(pins)
    for sid, (key, count, _first, _prev, pin_ident) in pins.items():
        try:
            live_st = os.lstat(sdir / f"{sid}.json")
        except FileNotFoundError:
            continue
        if key_hash(stat_key(live_st)) != key:
            continue
        out["believed"] += 1
        try:
            pin_st = os.lstat(store / "pins" / sid)
        except FileNotFoundError:
            out["wrong"].append(f"{sid}: the cache names a pin that is not there")
            continue
        if pin_ident and pin_key(pin_st) != pin_ident:
            out["pin_moved"] += 1
            continue
        pin = read_pin(store / "pins" / sid)
        live = read_or_none(sdir / f"{sid}.json")
        if pin is None or pin != live or count_messages(pin) != count:
            got = None if pin is None else count_messages(pin)
            out["wrong"].append(f"{sid}: the cache says {count} msgs pinned; the pin holds {got} msgs, "
                                f"{'the live bytes' if pin == live else 'other bytes than the live file'}")
    return out


class LogTail:
    """New complete lines of a growing file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        return complete

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return out

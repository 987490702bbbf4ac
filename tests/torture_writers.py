#!/usr/bin/env python3
"""The writers of the oracle ("torture") run: one process per write style, each journaling every operation.

A writer owns a few sessions of the watched directory and writes them the way
one kind of server does (``atomic``: same-dir tmp + ``os.replace``, the real
server's way; ``inplace``: the same inode rewritten in two halves; ``link``:
``os.link`` from a tmp file outside the directory; ``library``: the embedded
``sessionguard.Guard``). It appends one line per operation to its own journal
(content hash, message count, which messages, ``CLOCK_MONOTONIC`` start and
end), which is all the oracle (tests/torture_oracle.py) believes.

Also here: the filler sessions of a first-scan run, written once before any
daemon starts, with messages the oracle can tell apart like the writers' own.

Run by tests/torture.py as ``python tests/torture_writers.py --name … --style …``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

STYLES = ("atomic", "inplace", "link", "library")
#: The issue's figure: a version on disk this long while the daemon runs must be kept.
SETTLE_SECONDS = 1.0
#: How often a writer picks each operation for an existing session: a burst (a turn)
#: starts with a user action — often a loss — and then streams appends, with the
#: occasional loss mid-burst so that short-lived versions are lost too.
FIRST_WEIGHTS = {"append": 50, "truncate": 12, "regenerate": 10, "wipe": 8, "corrupt": 10, "delete": 10}
BURST_WEIGHTS = {"append": 85, "truncate": 3, "regenerate": 3, "wipe": 2, "corrupt": 4, "delete": 3}
LOSS_OPS = ("truncate", "regenerate", "wipe", "corrupt", "delete")
INTENT_KEY = "intentional_shrink_generation"  # one of config.DEFAULT_INTENT_KEYS
#: No retention during a run: thinning is a deliberate policy (tested on its own) that
#: the oracle could not tell from a loss.
NO_RETENTION = 10**9
#: Revision number of every filler session's messages (writers count theirs from 1).
FILLER_REV = 0


def message(sid: str, rev: int, i: int) -> dict[str, Any]:
    """~400 bytes, unique per (session, revision, index) so every version has its own bytes.

    ``id`` ("<revision>.<index>") lets the oracle tell which messages a file holds.
    """
    return {
        "id": f"{rev}.{i}",
        "role": "user" if i % 2 == 0 else "assistant",
        "content": f"{sid} r{rev} m{i}: " + "lorem ipsum dolor sit amet " * 13,
        "timestamp": 1764000000.0 + i,
    }


def new_doc(sid: str) -> dict[str, Any]:
    """A hermes-webui-shaped session (like sghelpers.make_session) with an intent marker."""
    now = time.time()
    return {
        "session_id": sid,
        "title": f"session {sid}",
        "workspace": "/home/user/project",
        "model": "gpt-5",
        "created_at": now,
        "updated_at": now,
        "pinned": False,
        "active_stream_id": None,
        INTENT_KEY: uuid.uuid4().hex,
        "messages": [],
    }


def dump(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def revs_of(messages: list[Any]) -> list[int]:
    """The revision (write) that added each message: which conversation a file holds."""
    return [int(str(m["id"]).partition(".")[0]) for m in messages]


def rle(revs: list[int]) -> list[list[int]]:
    """[[revision, n], ...]: a version's messages, compactly, for the journal."""
    out: list[list[int]] = []
    for r in revs:
        if out and out[-1][0] == r:
            out[-1][1] += 1
        else:
            out.append([r, 1])
    return out


def unrle(segs: list[list[int]]) -> list[int]:
    return [r for r, n in segs for _ in range(n)]


def write_atomic(path: str, data: bytes, outside: str) -> None:
    """The real server's save (sghelpers.server_write): same-dir tmp, fsync, os.replace."""
    tmp = f"{path[:-len('.json')]}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_inplace(path: str, data: bytes, outside: str) -> None:
    """Truncate and rewrite the same inode in two halves: the torn state is visible."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        f.write(data[len(data) // 2:])


def write_link(path: str, data: bytes, outside: str) -> None:
    """Publish with os.link from a tmp file outside the watched dir (same filesystem)."""
    tmp = os.path.join(outside, f"{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.link(tmp, path)
    os.unlink(tmp)


RAW_WRITERS: dict[str, Callable[[str, bytes, str], None]] = {
    "atomic": write_atomic,
    "inplace": write_inplace,
    "link": write_link,
    # The library never writes corrupt bytes: a corrupt write to one of its
    # sessions comes from another tool, which replaces the file by rename.
    "library": write_atomic,
}


def filler_sid(i: int) -> str:
    return f"fill{i:07d}"


def make_filler(sdir: Path, n: int, seed: int) -> list[str]:
    """*n* small sessions (2-9 messages, ~1-4 KB) written once, before any daemon starts:
    the tree a first start has to scan. Returns their ids."""
    rng = random.Random(seed)
    sids = [filler_sid(i) for i in range(n)]
    for sid in sids:
        doc = new_doc(sid)
        doc["messages"] = [message(sid, FILLER_REV, i) for i in range(rng.randint(2, 9))]
        (sdir / f"{sid}.json").write_bytes(dump(doc))
    return sids


def wipe_filler(path: Path) -> None:
    """The bug on a filler session while no daemon runs: its messages dropped, saved by rename."""
    doc = orjson.loads(path.read_bytes())
    doc["messages"] = []
    write_atomic(str(path), dump(doc), "")


class Writer:
    """One writer process: owns *sids*, writes them in one style, journals every operation."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.name, self.style, self.dir, self.outside = a.name, a.style, a.dir, a.outside
        self.sids: list[str] = a.sids.split(",")
        self.rng = random.Random(a.seed)
        self.max_messages = a.max_messages
        self.until = a.until
        self.docs: dict[str, dict[str, Any] | None] = dict.fromkeys(self.sids)
        self.rev = 0
        self.stopping = False
        self.journal = open(a.journal, "ab")  # noqa: SIM115 - open for the writer's whole life
        self.guard: Any = None
        if self.style == "library":
            from sessionguard import Guard
            from sessionguard.retention import Retention

            self.guard = Guard(self.dir, retention=Retention(keep_last=NO_RETENTION))

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        parent = os.getppid()
        while not self.stopping and time.monotonic() < self.until and os.getppid() == parent:
            sid = self.rng.choice(self.sids)
            first = self.step(sid, FIRST_WEIGHTS)
            # the rest of the turn, milliseconds apart (after an undo or a clear, half the time a pause)
            more = self.rng.randint(0, 4) if first not in LOSS_OPS or self.rng.random() < 0.5 else 0
            for _ in range(more):
                if self.stopping:
                    break
                time.sleep(self.rng.uniform(0.001, 0.03))
                self.step(sid, BURST_WEIGHTS)
            if self.rng.random() < 0.2:  # sometimes all of this writer's sessions stay still a while
                self._sleep(self.rng.uniform(SETTLE_SECONDS + 0.2, SETTLE_SECONDS + 1.5))
            else:
                self._sleep(self.rng.uniform(0.05, 0.4))
        self.journal.close()

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.05, max(end - time.monotonic(), 0)))

    def choose(self, sid: str, weights: dict[str, int]) -> str:
        doc = self.docs[sid]
        if doc is None:
            return "create"
        n = len(doc["messages"])
        if n >= self.max_messages:
            return "truncate"
        op = self.rng.choices(list(weights), list(weights.values()))[0]
        if (op == "truncate" and n < 2) or (op in ("regenerate", "wipe") and n < 1):
            return "append"
        return op

    def _grow(self, doc: dict[str, Any], k: int) -> None:
        self.rev += 1
        n = len(doc["messages"])
        doc["messages"].extend(message(doc["session_id"], self.rev, n + i) for i in range(k))

    def step(self, sid: str, weights: dict[str, int]) -> str:
        op = self.choose(sid, weights)
        path = os.path.join(self.dir, f"{sid}.json")
        t_start = time.monotonic()
        sha: str | None = None
        count: int | None = None
        revs: list[list[int]] | None = None
        if op == "delete":
            os.unlink(path)
            self.docs[sid] = None
        elif op == "corrupt":
            doc = self.docs[sid]
            assert doc is not None
            full = dump(doc)
            data = full[: self.rng.randint(0, len(full) - 1)]  # truncated JSON (possibly empty)
            RAW_WRITERS[self.style](path, data, self.outside)
            sha = hashlib.sha256(data).hexdigest()
        else:
            doc = self._edit(sid, op)
            count = len(doc["messages"])
            revs = rle(revs_of(doc["messages"]))
            sha = self._write_doc(sid, path, op, doc)
        t_end = time.monotonic()
        rec = {"w": self.name, "sid": sid, "op": op, "style": self.style, "sha": sha, "count": count,
               "revs": revs, "t_start": t_start, "t_end": t_end}
        self.journal.write(orjson.dumps(rec) + b"\n")
        self.journal.flush()
        return op

    def _edit(self, sid: str, op: str) -> dict[str, Any]:
        """The document after *op* (create, append, truncate, regenerate or wipe)."""
        doc = self.docs[sid]
        if op == "create":
            doc = self.docs[sid] = new_doc(sid)
            self._grow(doc, self.rng.randint(1, 20))
        assert doc is not None
        if op == "append":
            self._grow(doc, self.rng.randint(1, 20))
        elif op == "truncate":  # intended: a user's undo/compress, marked with a new intent value
            del doc["messages"][len(doc["messages"]) // 2:]
            doc[INTENT_KEY] = uuid.uuid4().hex
        elif op == "regenerate":  # unmarked: drop the last turns before resending
            del doc["messages"][-self.rng.randint(1, min(3, len(doc["messages"]))):]
        elif op == "wipe":  # the bug: a metadata-only copy saved back
            doc["messages"] = []
        doc["updated_at"] = time.time()
        return doc

    def _write_doc(self, sid: str, path: str, op: str, doc: dict[str, Any]) -> str:
        if self.guard is None:
            data = dump(doc)
            RAW_WRITERS[self.style](path, data, self.outside)
            return hashlib.sha256(data).hexdigest()
        intended = op == "truncate"
        self.guard.save(sid, doc, allow_shrink=intended, reason="torture: intended truncate" if intended else None)
        # We are this session's only writer: what is there now is exactly what the guard wrote.
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="torture_writers.py", description="One writer of the oracle run (internal).")
    p.add_argument("--name", required=True)
    p.add_argument("--style", choices=STYLES, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--outside", required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--sids", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--max-messages", type=int, default=200)
    p.add_argument("--until", type=float, required=True, help="CLOCK_MONOTONIC deadline (a safety net)")
    Writer(p.parse_args(argv)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

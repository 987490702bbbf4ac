"""Helpers shared by the embedding tests (the chat server's files and log, a stdlib log handler)."""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatserver import ChatServer, Session, serialize

SID = "abc123def456"
GUARDED = "chatserver.guarded"


def write(directory: Path, session: Session) -> bytes:
    """Put *session* on disk as the server writes it; its bytes."""
    data = serialize(session)
    (directory / f"{session.session_id}.json").write_bytes(data)
    return data


def on_disk(path: Path) -> dict[str, Any]:
    return json.loads(path.read_bytes())  # type: ignore[no-any-return]


def log_lines(server: ChatServer, event: str) -> list[str]:
    """The lines of the server's own log (its stderr) that carry the library event *event*."""
    return [line for line in server.log_text().splitlines() if line.startswith(f"{event} ")]


def restore_on_disk(path: Path, data: bytes) -> None:
    """Other bytes renamed onto *path*, as an admin's restore or another server's save does
    (never in place: that would rewrite a library pin, which shares the file's inode, too)."""
    tmp = path.with_name(path.name + ".restoring")
    tmp.write_bytes(data)
    tmp.replace(path)


def changed_lines(before: str, after: str) -> tuple[int, int]:
    """(added, removed) lines of a unified diff of two texts."""
    diff = list(difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0))
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    return added, removed


def rchar() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


class Collect(logging.Handler):
    """A plain stdlib handler: keeps every record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def collecting(level: int = logging.INFO) -> Iterator[Collect]:
    """The ``sessionguard`` logger at *level* with a :class:`Collect` handler on it, for a block."""
    logger = logging.getLogger("sessionguard")
    handler, before = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)

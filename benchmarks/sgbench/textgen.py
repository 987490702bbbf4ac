"""Sessions whose messages are real text, for anything that depends on how well content compresses.

``make_session``'s messages repeat one sentence, which zstd shrinks ~50x: a
compression figure from it says nothing about real conversations. These
messages are consecutive slices of the Python standard library's own source
(code, docstrings and comments: close to what agent sessions hold), 150 to
1,200 characters each, different in every message and every session.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path
from typing import Any

_CORPUS: list[str] = []


def corpus(limit: int = 12_000_000) -> str:
    """The standard library's top-level modules, concatenated (up to *limit* characters)."""
    if not _CORPUS:
        parts, size = [], 0
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            text = f.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            size += len(text)
            if size >= limit:
                break
        _CORPUS.append("".join(parts))
    return _CORPUS[0]


class TextDocs:
    """``doc(n)``: a hermes-shaped session of *n* messages of real text (message i is fixed)."""

    def __init__(self, max_n: int, sid: str, seed: int) -> None:
        text = corpus()
        rng = random.Random(seed)
        self.meta: dict[str, Any] = {
            "session_id": sid, "title": f"session {sid}", "workspace": "/home/user/project", "model": "gpt-5",
            "created_at": 1764000000.0, "updated_at": 1764000000.0, "pinned": False, "active_stream_id": None,
        }
        self.msgs: list[dict[str, Any]] = []
        at = rng.randrange(len(text) // 2)
        for i in range(max_n):
            size = rng.randrange(150, 1200)
            if at + size > len(text):
                at = rng.randrange(len(text) // 2)
            self.msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text[at:at + size],
                              "timestamp": 1764000000.0 + i})
            at += size

    def __call__(self, n: int) -> dict[str, Any]:
        doc = dict(self.meta)
        doc["updated_at"] = 1764000000.0 + n
        doc["messages"] = self.msgs[:n]
        return doc

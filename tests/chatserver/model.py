"""The server's object model and its own serialization, as the seed has them.

A session file is turned into a :class:`Session` and only that object is
served, cached and saved: whatever the file held that the object does not
(messages after a metadata-only load, in particular) is gone at the next save.
The bytes are Python's ``json`` with ``indent=2`` and ``ensure_ascii=False``
(so a ``NaN`` read from a file is written back as ``NaN``), metadata keys in a
fixed order first, then ``messages``, then ``tool_calls`` — the one key the
seed writes after the messages, which a prefix-only metadata read never sees.

Pure functions only: no file is touched here (see ``storage``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_TITLE = "Untitled"

#: The metadata keys, in the order the seed writes them (unknown keys follow them).
METADATA_KEYS = (
    "session_id", "title", "workspace", "model", "created_at", "updated_at", "pinned",
    "active_stream_id", "pending_user_message", "intentional_shrink_generation", "clear_generation",
)
#: Keys written after ``messages``.
TRAILING_KEYS = ("tool_calls",)


@dataclass
class Session:
    """One conversation as the server holds it in memory.

    ``partial`` is not written: it says the object was built from a
    metadata-only load, so its ``messages`` (and ``tool_calls``) are empty
    placeholders, not the file's.
    """

    session_id: str
    title: str = DEFAULT_TITLE
    workspace: str | None = None
    model: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    pinned: bool = False
    active_stream_id: str | None = None
    pending_user_message: str | None = None
    intentional_shrink_generation: str | None = None
    clear_generation: str | None = None
    messages: list[Any] = field(default_factory=list)
    tool_calls: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    partial: bool = False

    @classmethod
    def from_dict(cls, data: Any, *, partial: bool = False) -> Session:
        """Build from a loaded document; ``ValueError`` when it is not a session.

        Known keys become attributes (values are taken as the file has them,
        like the seed does); unknown keys are kept in ``extra`` and written
        back after the known metadata.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a session is a JSON object, not a {type(data).__name__}")
        if not isinstance(data.get("session_id"), str):
            raise ValueError("a session needs a string session_id")
        for key in ("messages", *TRAILING_KEYS):
            if not isinstance(data.get(key, []), list):
                raise ValueError(f"{key} must be a list")
        known = {f.name for f in fields(cls)} - {"extra", "partial"}
        session = cls(**{k: v for k, v in data.items() if k in known}, partial=partial)
        session.extra = {k: v for k, v in data.items() if k not in known}
        if partial:
            session.messages, session.tool_calls = [], []
        return session

    def metadata(self) -> dict[str, Any]:
        """The keys written before ``messages``, in the seed's order."""
        out = {key: getattr(self, key) for key in METADATA_KEYS}
        out.update((k, v) for k, v in self.extra.items() if k not in out)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The whole document in the seed's field order."""
        return {**self.metadata(), "messages": self.messages, **{k: getattr(self, k) for k in TRAILING_KEYS}}


def serialize(session: Session) -> bytes:
    """The seed's own bytes for *session* (``UnicodeEncodeError`` on a lone surrogate, as the seed)."""
    return json.dumps(session.to_dict(), indent=2, ensure_ascii=False).encode("utf-8")


def make_session(sid: str, n_messages: int = 0, **meta: Any) -> Session:
    """A session with *n_messages* alternating user/assistant turns of ~420 bytes each on disk (for tests)."""
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant",
         "content": f"message {i}: " + "lorem ipsum dolor sit amet, ünïcødé ✓ " * 8}
        for i in range(n_messages)
    ]
    base: dict[str, Any] = {"title": f"conversation {sid}", "workspace": "/home/user/project", "model": "gpt-5",
                            "created_at": 1764000000.0, "updated_at": 1764000000.0 + n_messages}
    base.update(meta)
    return Session(session_id=sid, messages=messages, **base)

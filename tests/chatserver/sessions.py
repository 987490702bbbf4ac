"""The server's in-memory session cache and what each endpoint does to it (no HTTP here).

Every endpoint reads the cache first, as the seed does: once a session is in
memory, the file on disk is not looked at again until the session is dropped
(``reload``) or the process restarts (only an object built by a metadata-only
load is replaced, by a full load, when a request needs the messages). That is
why a restore on disk does not reach a running server, and why its next save
writes the cached state back.

The seed's bug lives in :meth:`Sessions._load`: a session recorded with an
``active_stream_id`` is "repaired" (this process runs no streams, so every
recorded one is a leftover of a process that died mid-stream) and saved at
once — when the object came from a metadata-only load, with no messages.
Saves swallow every exception, like the seed's (``except Exception: pass``):
nothing is logged, only ``stats()`` counts them and the endpoint's answer says
``"saved": false``, so a refusal is in the logs only if the storage layer
itself logs it.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Protocol

from .model import DEFAULT_TITLE, Session


class Storage(Protocol):
    """What the server needs from its storage module (``storage`` or a guarded copy of it)."""

    def startup(self, directory: Any) -> None: ...
    def list_sids(self) -> list[str]: ...
    def load_session(self, sid: str) -> Any: ...
    def load_metadata(self, sid: str) -> Any: ...
    def save_session(self, session: Session) -> None: ...
    def delete_session(self, sid: str) -> None: ...


class Conflict(Exception):
    """The request cannot apply to the session as it is (e.g. nothing to undo)."""


class Sessions:
    """The cache ``{sid: Session}`` and the endpoints' logic; one lock serialises them all."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.cache: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.loads = {"full": 0, "metadata": 0}
        self.saves = {"ok": 0, "failed": 0}

    # -- cache ----------------------------------------------------------------

    def _load(self, sid: str, *, full: bool) -> Session:
        self.loads["full" if full else "metadata"] += 1  # reads attempted, failed ones included
        data = self.storage.load_session(sid) if full else self.storage.load_metadata(sid)
        session = Session.from_dict(data, partial=not full)
        if session.session_id != sid:
            raise ValueError(f"file {sid}.json holds session {session.session_id!r}")
        self.cache[sid] = session
        if session.active_stream_id is not None:  # the seed's stale-stream repair, on a possibly partial object
            session.active_stream_id = None
            session.pending_user_message = None
            self._save(session)
        return session

    def _get(self, sid: str, *, full: bool) -> Session:
        """The cached object; loaded if absent (or, when *full*, if the cached one is partial)."""
        session = self.cache.get(sid)
        if session is None or (full and session.partial):
            session = self._load(sid, full=full)
        return session

    def _save(self, session: Session) -> bool:
        try:
            self.storage.save_session(session)
        except Exception:  # the seed swallows save errors; counted, not logged
            self.saves["failed"] += 1
            return False
        self.saves["ok"] += 1
        session.partial = False  # the seed takes what it just wrote to be the file from now on
        return True

    def _saved(self, session: Session) -> dict[str, Any]:
        ok = self._save(session)
        return {"session_id": session.session_id, "title": session.title,
                "message_count": len(session.messages), "saved": ok}

    # -- endpoints --------------------------------------------------------------

    def listing(self) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """Every session's metadata (metadata-only loads), newest first, and the files skipped with why."""
        rows, skipped = [], []
        with self.lock:
            for sid in self.storage.list_sids():
                try:
                    rows.append(self._get(sid, full=False).metadata())
                except (OSError, ValueError, TypeError) as exc:
                    skipped.append({"session_id": sid, "error": f"{type(exc).__name__}: {exc}"})
        rows.sort(key=lambda r: r["updated_at"] if isinstance(r["updated_at"], int | float) else 0, reverse=True)
        return rows, skipped

    def get(self, sid: str) -> dict[str, Any]:
        with self.lock:
            return self._get(sid, full=True).to_dict()

    def append(self, sid: str, role: str, content: str) -> dict[str, Any]:
        with self.lock:
            session = self._get(sid, full=True)
            session.messages.append({"role": role, "content": content})
            session.updated_at = time.time()
            return self._saved(session)

    def rename(self, sid: str, title: str) -> dict[str, Any]:
        """Saves the cached object as it is, whatever it holds (partial, or stale after a restore)."""
        with self.lock:
            session = self.cache.get(sid) or self._get(sid, full=True)
            session.title = title
            session.updated_at = time.time()
            return self._saved(session)

    def undo(self, sid: str) -> dict[str, Any]:
        """Drop the last exchange: the last user message and everything after it."""
        with self.lock:
            session = self._get(sid, full=True)
            users = [i for i, m in enumerate(session.messages) if isinstance(m, dict) and m.get("role") == "user"]
            if not users:
                raise Conflict("nothing to undo")
            return self._shrink(session, users[-1])

    def truncate(self, sid: str, keep: int) -> dict[str, Any]:
        with self.lock:
            return self._shrink(self._get(sid, full=True), keep)

    def _shrink(self, session: Session, keep: int) -> dict[str, Any]:
        session.messages = session.messages[:keep]
        session.intentional_shrink_generation = str(uuid.uuid4())
        session.updated_at = time.time()
        return self._saved(session)

    def clear(self, sid: str) -> dict[str, Any]:
        with self.lock:
            session = self._get(sid, full=True)
            session.messages = []
            session.title = DEFAULT_TITLE
            session.clear_generation = str(uuid.uuid4())
            session.updated_at = time.time()
            return self._saved(session)

    def delete(self, sid: str) -> dict[str, Any]:
        with self.lock:
            self.cache.pop(sid, None)
            self.storage.delete_session(sid)
            return {"session_id": sid, "deleted": True}

    def reload(self, sid: str) -> dict[str, Any]:
        """Forget the cached object: the next request reads the file again."""
        with self.lock:
            return {"session_id": sid, "dropped": self.cache.pop(sid, None) is not None}

    def stats(self) -> dict[str, Any]:
        """What is cached (partial or not, how many messages) and how many loads and saves happened."""
        with self.lock:
            cached = {sid: {"partial": s.partial, "message_count": len(s.messages)} for sid, s in self.cache.items()}
            return {"cache": cached, "loads": dict(self.loads), "saves": dict(self.saves)}

"""A test chat server shaped like the seed's (hermes-webui), and a client to drive it.

Run it from ``tests/`` (or with ``tests/`` on ``PYTHONPATH``)::

    python -m chatserver --dir SESSION_DIR [--storage chatserver.storage] [--port 0]

It prints ``{"port": N, "pid": P}`` on stdout once it listens on 127.0.0.1.
From a test, :class:`ChatServer` does that and more::

    from chatserver import ChatServer
    with ChatServer(session_dir) as srv:
        srv.get("/sessions")
        srv.post(f"/sessions/{sid}/rename", {"title": "x"})

What it shares with the seed, on purpose (see ``/work/shared/FIELD-NOTES.md``):
an object model built from each file (``model.Session``) held in an in-memory
cache that every endpoint reads first (``sessions``); its own bytes (Python
``json``, ``indent=2``, ``ensure_ascii=False``, a fixed field order, one key
after ``messages``); saves by ``<sid>.tmp.<pid>.<tid>`` + fsync + replace; a
listing that loads sessions metadata-only; and the seed's bug, which saves a
metadata-only object with a stale ``active_stream_id`` as ``messages: []``.
Only ``storage`` (through ``seedio``) touches files; the endpoints are listed in ``app``.
"""

from .client import ChatServer, ChatServerError
from .model import Session, make_session, serialize

__all__ = ["ChatServer", "ChatServerError", "Session", "make_session", "serialize"]

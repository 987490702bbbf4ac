"""The seed's own fix for the wipe, as it is written, to compare the guard with.

hermes-webui's ``Session.save`` (``api/models.py``, its "#1558 backup
safeguard", read at commit df65251d5) does, on every save: serialise the
session with the standard library (``json.dumps(..., ensure_ascii=False,
indent=2)``); if the file exists, read it whole and parse it with ``json`` to
count its messages; refuse an empty save over a non-empty file while a
stream is active; when the file has more messages than the new document,
write the old text to ``<sid>.json.bak`` (tmp + fsync + replace); then tmp +
fsync + ``os.replace`` of the new text (no directory fsync). This module
does the same steps in the same order (re-implemented here, not copied; the
session index the server also rewrites is left out: it is not part of the fix).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def seed_save(path: Path, doc: dict[str, Any]) -> None:
    """Save *doc* to *path* exactly as the seed's fixed ``Session.save`` does."""
    payload = json.dumps(doc, ensure_ascii=False, indent=2)
    incoming = len(doc.get("messages") or [])
    if path.exists():
        existing_text = path.read_text(encoding="utf-8")
        try:
            existing = len(json.loads(existing_text).get("messages") or [])
        except ValueError:
            existing = -1  # corrupt: always backed up
        if existing > 0 and incoming == 0 and (doc.get("active_stream_id") or doc.get("pending_user_message")):
            return  # the seed refuses this save (and logs a warning)
        if existing > incoming:
            _write_replace(path.with_suffix(".json.bak"), existing_text)
    _write_replace(path, payload)


def _write_replace(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

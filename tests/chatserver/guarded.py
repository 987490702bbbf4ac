"""The server's storage: the only functions through which the server touches files.

The server calls nothing else to read, save or delete a session (the I/O
itself, the seed's way, is in ``seedio``). The guarded variant of this server
is a copy of this module, chosen with ``--storage MODULE``, in which these
bodies call ``sessionguard.Guard`` instead: ``startup`` builds the guard and
runs ``guard.recover_on_startup()``; ``load_session`` is ``guard.load(sid)``;
``load_metadata`` is ``guard.load(sid, metadata_only=True)``; ``save_session``
is ``guard.save_bytes(sid, serialize(session), count=len(session.messages))``.
A test can count the lines by which the two modules differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model import Session, serialize
from .seedio import session_ids, sweep_tmp


@dataclass
class _Place:
    directory: Path = Path()
    guard: Any = None


PLACE = _Place()


def path_of(sid: str) -> Path:
    return PLACE.directory / f"{sid}.json"


def startup(directory: Path) -> None:
    """Before serving: remember the directory, sweep stale tmp files (as the seed does)."""
    import sessionguard
    PLACE.directory = directory
    sweep_tmp(directory)
    PLACE.guard = sessionguard.Guard(directory)
    PLACE.guard.recover_on_startup()


def list_sids() -> list[str]:
    return session_ids(PLACE.directory)


def load_session(sid: str) -> Any:
    return PLACE.guard.load(sid)


def load_metadata(sid: str) -> Any:
    return PLACE.guard.load(sid, metadata_only=True)


def save_session(session: Session) -> None:
    PLACE.guard.save_bytes(session.session_id, serialize(session), count=len(session.messages))


def delete_session(sid: str) -> None:
    os.unlink(path_of(sid))

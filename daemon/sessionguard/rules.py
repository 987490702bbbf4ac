"""What counts as a loss, what a writer meant, and which version undoes the damage.

Pure functions over counts, parsed documents and version lists — no I/O —
so that the library, the daemon, ``restore``, ``recover`` and start-up
recovery decide alike, and a table of cases tests each rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .count import Parsed, message_key
from .naming import LOSS_REASONS, Reason, Version


def is_loss(before: int | None, after: int | None, *, exists: bool = True) -> bool:
    """Does going from *before* to *after* messages lose anything?

    ``None`` means unparseable: an unparseable *before* has nothing countable
    to lose; an unparseable or missing *after* loses a parseable *before*.
    """
    if before is None:
        return False
    if not exists or after is None:
        return True
    return after < before


def loss_reason(after: int | None, *, exists: bool = True) -> Reason:
    """The version reason for a loss: ``deleted``, ``unparseable`` or ``shrink``."""
    if not exists:
        return "deleted"
    return "unparseable" if after is None else "shrink"


def classify(old: Parsed, new: Parsed | None) -> str:
    """Name a shrink for logs and metrics: wipe, truncate, rewrite, unparseable or deleted."""
    if new is None:
        return "deleted"
    if not new.ok:
        return "unparseable"
    if new.count == 0:
        return "wipe"
    try:
        if old.messages is not None and new.messages == old.messages[: len(new.messages or [])]:
            return "truncate"
    except RecursionError:
        pass
    return "rewrite"


def intent_changed(old_doc: Any, new_doc: Any, keys: Sequence[str]) -> bool:
    """Did the writer mark this shrink as meant (a changed value of an intent key)?"""
    if not keys or not isinstance(old_doc, dict) or not isinstance(new_doc, dict):
        return False
    return any(k in new_doc and new_doc.get(k) != old_doc.get(k) for k in keys)


@dataclass(frozen=True, slots=True)
class Identity:
    """What is remembered of a pinned conversation to tell, without reading the
    pin, whether a longer write still continues it: the count, and the keys of
    its first message and of the one before its last (the last may still be
    streaming)."""

    count: int
    first: int = 0
    prev: int = 0

    @classmethod
    def of(cls, parsed: Parsed) -> Identity | None:
        msgs = parsed.messages
        if parsed.count is None or msgs is None:
            return None
        n, lenient = len(msgs), parsed.lenient
        return cls(n, message_key(msgs[0], lenient=lenient) if n else 0,
                   message_key(msgs[n - 2], lenient=lenient) if n >= 2 else 0)


def replaced(pinned: Identity, new: Parsed, first: int | None = None) -> bool:
    """Is *new* (as many messages or more) a different conversation than the pin?

    O(1): compares two message keys. A write that only rewrites or appends at
    the end (streaming) continues the pin; one whose first message, or whose
    message before the pinned last, differs replaced it (two sessions saved to
    one file, an id reused, a buggy merge) and the pin must be kept. *first*:
    the key of *new*'s first message, if the caller has it (the daemon takes it
    for its next pin anyway: one hash less per write).
    """
    msgs = new.messages
    if msgs is None or new.count is None or new.count < pinned.count or pinned.count < 2:
        return False  # a one-message pin's first message is its last: it may still be streaming
    if (message_key(msgs[0], lenient=new.lenient) if first is None else first) != pinned.first:
        return True
    return message_key(msgs[pinned.count - 2], lenient=new.lenient) != pinned.prev


def overtaken(old: Parsed, new: Parsed) -> bool:
    """Did writes nobody saw drop some of *old*'s messages, even if more were added
    after (a shrink undone before anyone looked)? True when *new* does not start
    with every message of *old*. Costs a full comparison: for unseen writes only."""
    if not old.count or old.messages is None or not new.ok or new.messages is None:
        return False
    try:
        return list(new.messages[: len(old.messages)]) != list(old.messages)
    except RecursionError:
        return True  # too deep to compare: keeping a version is the safe answer


def latest_change(versions: Sequence[Version]) -> Version | None:
    """The newest version: what the last recorded change to the session was."""
    return max(versions, key=lambda v: (v.created, v.name), default=None)


def restore_candidate(versions: Sequence[Version]) -> Version | None:
    """THE version "restore" means: the state just before the damage.

    The newest version kept by an unintended loss (shrink, unparseable,
    deleted) since the session's last intended shrink; nothing when the last
    change was intended. Versions holding unparseable content are never
    picked (they can still be restored by id). Example: 1000 messages, the
    user undoes to 998 (intended), a bug wipes to 0 → the 998 version, never
    the 1000 one that would undo the user's undo.
    """
    newest = latest_change(versions)
    if newest is None or newest.reason == "intended":
        return None
    last_intended = max((v.created for v in versions if v.reason == "intended"), default=float("-inf"))
    candidates = [v for v in versions if v.reason in LOSS_REASONS and v.created > last_intended
                  and v.count is not None]
    return latest_change(candidates)


def most_messages(versions: Sequence[Version]) -> Version | None:
    """The version with the most messages (then the newest): ``--most``."""
    counted = [v for v in versions if v.count is not None]
    return max(counted, key=lambda v: (v.count or 0, v.created, v.name), default=None)

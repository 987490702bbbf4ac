"""What the library tells its host: every event to the ``sessionguard`` logger and to a callback.

A server that swallows exceptions from its save (many do) must still learn
that a save was refused or a version kept. Each event goes to the standard
``logging`` logger ``sessionguard`` with its fields as ``extra`` (``sg_event``
holds the event's name, the same names the daemon logs), so a server's own
logging — or the daemon's structlog, through ``ProcessorFormatter`` and
``ExtraAdder`` — carries them as fields; and to an optional ``on_event``
callback, for a server that wants to show them in its own UI.

Every event carries ``sid``, ``before``, ``after``, ``reason`` and ``version``
(None where one does not apply) and its own extras. Events: ``session.shrunk``
(reason ``shrink``/``intended``/…), ``save.refused`` (reason ``partial``,
why), ``session.restored`` and ``session.recovered`` (after: the restored
count, reason: the restored version's), ``pin.overwritten``,
``recovery.failed``, ``store.replaced``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sessionguard")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
#: Fields every event carries (None where one does not apply), besides ``sid``.
STANDARD_FIELDS = ("before", "after", "reason", "version")
#: Attributes a LogRecord already has: a field of that name travels as ``sg_<name>``.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


@dataclass(frozen=True)
class GuardEvent:
    """One thing the guard did or refused: *name* (``save.refused``…), the session, the fields."""

    name: str
    sid: str
    level: str
    fields: dict[str, Any] = field(default_factory=dict)


class Emitter:
    """Sends events to the logger and to *on_event*; a failing callback is logged, never raised."""

    def __init__(self, on_event: Callable[[GuardEvent], None] | None) -> None:
        self._on_event = on_event

    def __call__(self, name: str, sid: str, *, level: str = "info", **fields: Any) -> GuardEvent:
        for key in STANDARD_FIELDS:  # one query finds every loss, refusal and recovery
            fields.setdefault(key, None)
        event = GuardEvent(name, sid, level, fields)
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        log.log(_LEVELS[level], "%s sid=%s %s", name, sid, text,
                extra={"sg_event": name, "sid": sid, **{f"sg_{k}" if k in _RESERVED else k: v
                                                        for k, v in fields.items()}})
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # the host's callback must not break its own save
                log.exception("on_event callback failed for %s", name)
        return event

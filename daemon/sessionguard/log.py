"""structlog configuration: JSON lines for shipping, a readable console on a TTY.

Every event has a stable dotted name (``session.shrunk``) and flat fields;
the README's catalogue lists them. Tracebacks are rendered as dicts *without*
local variables, which would leak message contents into logs.

Logging never raises on a string: a file name that is not valid UTF-8 reaches
us as a str with lone surrogates (``os.fsdecode``), which neither orjson nor
journald can encode. Such strings are rewritten as readable escapes
(``\\xff``) — only on that rare failure path, never on every event.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from structlog.processors import CallsiteParameter

Processor = Callable[[Any, str, dict[str, Any]], Any]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal (``JOURNAL_STREAM=dev:ino``)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def resolve_format(fmt: str) -> str:
    """``auto`` → ``journal`` under systemd's journal, ``console`` on a TTY, else ``json``."""
    if fmt != "auto":
        return fmt
    if stderr_is_journal():
        return "journal"
    return "console" if sys.stderr.isatty() else "json"


def configure(fmt: str, level: str, *, journal_renderer: Processor | None = None) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog once for the process and return the daemon's logger.

    *fmt* is already resolved (``json``, ``console`` or ``journal``); the
    journal renderer comes from :mod:`sessionguard.systemd`, which owns the
    systemd-python import.
    """
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    factory: Any
    if fmt == "console":
        processors = shared + [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    elif fmt == "journal":
        if journal_renderer is None:
            raise ValueError("journal logging needs the systemd renderer")
        processors = shared + [
            # journald's CODE_FILE/CODE_LINE/CODE_FUNC: the line that logged, not the renderer
            # (stdlib records forwarded by _ToStructlog resolve to their caller, past logging).
            structlog.processors.CallsiteParameterAdder(
                {CallsiteParameter.PATHNAME, CallsiteParameter.LINENO, CallsiteParameter.FUNC_NAME},
                additional_ignores=["logging", __name__]),
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            _retry_printable(journal_renderer),
        ]
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        processors = shared + [
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        factory = structlog.BytesLoggerFactory(file=sys.stdout.buffer)
    set_level(level)
    structlog.configure(
        processors=[_threshold, *processors],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _forward_stdlib_logging(_LEVELS[level])
    return structlog.get_logger("sessionguard")


_threshold_level = [logging.INFO]


def set_level(level: str) -> None:
    """Change the log level of a running daemon (a reload applies ``log_level`` at once)."""
    _threshold_level[0] = _LEVELS[level]
    logging.getLogger().setLevel(max(_LEVELS[level], logging.INFO))


def _threshold(_logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    if _LEVELS.get(method, logging.ERROR) < _threshold_level[0]:
        raise structlog.DropEvent
    return event


def printable(value: Any) -> Any:
    """*value* with every str (also in nested dicts and lists) made encodable as UTF-8.

    A lone surrogate from ``os.fsdecode`` becomes the escape of the byte it
    stands for (``\\xff``); any other lone surrogate its code point (``\\ud800``).
    """
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {printable(k) if isinstance(k, str) else k: printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return value


def _dumps(obj: Any, **kw: Any) -> bytes:
    """orjson; on a str it refuses (a lone surrogate), again with :func:`printable` strings."""
    try:
        return orjson.dumps(obj, **kw)
    except TypeError:
        return orjson.dumps(printable(obj), **kw)


def _retry_printable(renderer: Processor) -> Processor:
    """Call *renderer* (which consumes its event) again with printable strings if it cannot encode one."""

    def render(logger: Any, method: str, event: dict[str, Any]) -> Any:
        try:
            return renderer(logger, method, dict(event))
        except UnicodeError:
            return renderer(logger, method, printable(event))

    return render


class _ToStructlog(logging.Handler):
    """Route stdlib logging (the library's guard, watchdog) into the same stream."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "sg_event", None) or f"{record.name}.log"
            log = structlog.get_logger(record.name)
            method = {logging.DEBUG: log.debug, logging.INFO: log.info, logging.WARNING: log.warning}.get(
                record.levelno, log.error)
            method(event, message=record.getMessage())
        except Exception:
            self.handleError(record)


def _forward_stdlib_logging(level: int) -> None:
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _ToStructlog)]
    root.addHandler(_ToStructlog())
    root.setLevel(max(level, logging.INFO))

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
from typing import Any, BinaryIO, TextIO

import orjson
import structlog
from structlog.processors import CallsiteParameter
from structlog.typing import EventDict, Processor, ProcessorReturnValue

from .naming import ascii_int

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal (``JOURNAL_STREAM=dev:ino``)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev_text, _, ino_text = stream.partition(":")
    dev, ino = ascii_int(dev_text), ascii_int(ino_text)
    if dev is None or ino is None:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def resolve_format(fmt: str) -> str:
    """``auto`` → ``journal`` under systemd's journal, ``console`` on a TTY, else ``json``."""
    if fmt != "auto":
        return fmt
    if stderr_is_journal():
        return "journal"
    return "console" if sys.stderr.isatty() else "json"


def configure(fmt: str, level: str, *,
              journal_renderer: Processor | None = None) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog once for the process and return the daemon's logger.

    *fmt* is already resolved (``json``, ``console`` or ``journal``); the
    journal renderer comes from :mod:`sessionguard.systemd`, which owns the
    systemd-python import. The daemon's own events take structlog's direct
    path; stdlib records (the embedded library's events, watchdog) go through
    :class:`structlog.stdlib.ProcessorFormatter`, which runs the same
    processors, so both end as the same kind of line or journal entry.
    """
    shared: list[Processor] = [
        _below_threshold,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    tracebacks = structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
    prepare: list[Processor]
    render: Processor
    factory: Any
    if fmt == "console":
        prepare, render = [], structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        render_text: Processor = render
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
        write = _text_writer(sys.stderr)
    elif fmt == "journal":
        if journal_renderer is None:
            raise ValueError("journal logging needs the systemd renderer")
        # journald's CODE_FILE/CODE_LINE/CODE_FUNC: the line that logged, not the renderer
        # (a stdlib record carries its own, which the adder takes from the record).
        prepare = [structlog.processors.CallsiteParameterAdder(
            {CallsiteParameter.PATHNAME, CallsiteParameter.LINENO, CallsiteParameter.FUNC_NAME},
            additional_ignores=["logging", __name__]), tracebacks]
        render = render_text = _retry_printable(journal_renderer)  # sends, then drops the event
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
        write = _text_writer(sys.stderr)
    else:
        prepare, render = [tracebacks], structlog.processors.JSONRenderer(serializer=_dumps)
        render_text = structlog.processors.JSONRenderer(serializer=_dumps_text)
        factory = structlog.BytesLoggerFactory(file=sys.stdout.buffer)
        write = _bytes_writer(sys.stdout.buffer)
    structlog.configure(
        processors=[*shared, *prepare, render],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),  # _below_threshold filters
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), _name_library_event, *shared],
        processors=[*prepare, structlog.stdlib.ProcessorFormatter.remove_processors_meta, render_text],
    )
    _route_stdlib_logging(formatter, write)
    set_level(level)
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("sessionguard")
    return logger


def set_level(level: str) -> None:
    """Log *level* and above from now on, for both paths (a SIGHUP applies ``log_level`` with this)."""
    _threshold[0] = _LEVELS[level]
    logging.getLogger("sessionguard").setLevel(_LEVELS[level])
    # Other libraries (watchdog) say nothing useful below info.
    logging.getLogger().setLevel(max(_LEVELS[level], logging.INFO))


_threshold = [logging.INFO]
_METHOD_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
                  "error": logging.ERROR, "exception": logging.ERROR, "critical": logging.CRITICAL}


def _below_threshold(_logger: Any, method: str, event: EventDict) -> EventDict:
    """Drop events under the current level: a processor, so :func:`set_level` works on cached loggers."""
    if _METHOD_LEVELS.get(method, logging.INFO) < _threshold[0]:
        raise structlog.DropEvent
    return event


def _name_library_event(_logger: Any, _method: str, event: EventDict) -> EventDict:
    """A stdlib record's event name is its ``sg_event`` extra (else ``<logger>.log``); its text is ``message``.

    ``ExtraAdder`` has already copied the record's ``extra=`` fields (``sid``…) into *event*.
    """
    record = event.get("_record")
    text = event.pop("event", "")
    event.pop("asctime", None)  # set on the record by another handler's formatter, if any
    name = event.pop("sg_event", None) or f"{record.name if record else 'logging'}.log"
    event["event"] = name
    event["message"] = text
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

    def render(logger: Any, method: str, event: EventDict) -> ProcessorReturnValue:
        try:
            return renderer(logger, method, dict(event))
        except UnicodeError:
            return renderer(logger, method, printable(event))

    return render


def _dumps_text(obj: Any, **kw: Any) -> str:
    return _dumps(obj, **kw).decode()


def _bytes_writer(stream: BinaryIO) -> Callable[[str], None]:
    def write(line: str) -> None:
        stream.write(line.encode() + b"\n")
        stream.flush()

    return write


def _text_writer(stream: TextIO) -> Callable[[str], None]:
    def write(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return write


class _Lines(logging.Handler):
    """Writes each record as formatted by structlog's ``ProcessorFormatter``.

    Under journald the renderer sends the entry itself and drops the event
    (``DropEvent``), like on structlog's direct path: nothing is written then.
    """

    def __init__(self, write: Callable[[str], None]) -> None:
        super().__init__()
        self._write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except structlog.DropEvent:
            return
        except Exception:  # logging must never take the daemon down
            self.handleError(record)
            return
        self._write(line)


def _route_stdlib_logging(formatter: logging.Formatter, write: Callable[[str], None]) -> None:
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _Lines)]
    handler = _Lines(write)
    handler.setFormatter(formatter)
    root.addHandler(handler)

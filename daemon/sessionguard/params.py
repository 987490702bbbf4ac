"""The building blocks of the protocol's method table: how the server checks each
parameter, and how the client reads one from the command line.

A check takes the JSON value and returns the value the backend gets, or
raises ``ValueError`` saying what was wanted; :func:`sessionguard.protocol.check_params`
turns that into a -32602 error naming the parameter. A conversion takes the
command-line text (an argparse ``type=``).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .naming import validate_sid

Check = Callable[[Any], Any]

#: Upper bound of the ``sync`` timeout a client may ask for, in seconds.
MAX_SYNC_TIMEOUT = 300.0


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def sid(value: Any) -> str:
    """A session id: one safe path component (:func:`~sessionguard.naming.validate_sid`:
    no ``/``, NUL, leading dot, over 255 bytes).

    Whether it names a file of a watch is the watch's own rule
    (:meth:`~sessionguard.naming.Matcher.parts_for`): in a recursive watch
    ``x%2F..%2Fetc`` decodes to a path that leaves it and names no session
    (-32004), while in a flat watch a file may really be called
    ``a%2F..%2Fb.json`` and is named by exactly that id.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return validate_sid(value)


def version(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or "/" in value or "\0" in value or len(value) > 255:
        raise ValueError("must be null or a version id (a hash prefix or a file name)")
    return value


def watch(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value) > 4096:
        raise ValueError("must be null or an absolute directory path")
    return value


def first(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 2**31:
        raise ValueError("must be an integer >= 0")
    return value


def limit(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 < value < 2**31:
        raise ValueError("must be null or an integer > 0")
    return value


_HEX16 = re.compile(r"[0-9a-f]{16}")


def content_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _HEX16.fullmatch(value.lower()):
        raise ValueError("must be null or a content id (16 hex digits)")
    return value.lower()


def unix_time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e11:
        raise ValueError("must be null or a Unix time (seconds)")
    return float(value)


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def run_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value):
        raise ValueError("must be null or a recover run id")
    return value


def timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SYNC_TIMEOUT:
        raise ValueError(f"must be a number of seconds in (0, {MAX_SYNC_TIMEOUT:g}]")
    return float(value)


# -- command-line conversions ------------------------------------------------------

_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """A WHEN as a Unix time: ``90s``, ``30m``, ``2h``, ``1d``, ``1w`` ago, or an ISO
    date/time read in local time (``2026-11-24T10:00``, ``2026-11-24``)."""
    m = _AGO.fullmatch(text.strip())
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use 90s, 30m, 2h, 1d or 2026-11-24T10:00)") from None
    stamp = dt.timestamp()  # a naive datetime is local time
    if not math.isfinite(stamp) or stamp < 0:
        raise ValueError(f"not a time: {text!r}")
    return stamp


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def natural_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_SYNC_TIMEOUT:
        raise ValueError(f"must be in (0, {MAX_SYNC_TIMEOUT:g}]")
    return value

"""Terminal-safe text for ``sessionguardctl``: escaping, display width, tables, sizes, times.

Session ids and message contents come from the session directory, whose
owner may be hostile: printed raw, ``\\x1b[2J`` clears the admin's screen,
an OSC sequence retitles the terminal, a bidi override makes ``evil`` read
as ``live``. Every string from the daemon goes through :func:`safe` before
it reaches the terminal, and columns are padded by display width (a CJK
character takes two cells, a combining mark none), not by ``len``.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

#: Invisible characters that reorder or hide text (Trojan Source): escaped like controls.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Line and paragraph separators: a terminal or pager may break the line there.
_BREAKS = frozenset("\u2028\u2029\u0085")
#: Ordinary line breaks and tabs in a message: one space in a one-line summary.
_SPACES = re.compile(r"[ \t\r\n]+")


def _escaped(ch: str) -> str | None:
    o = ord(ch)
    if o < 0x20 or 0x7F <= o <= 0x9F:
        return f"\\x{o:02x}"
    if ch in _BIDI or ch in _BREAKS or 0xD800 <= o <= 0xDFFF:
        return f"\\u{o:04x}"
    return None


def safe(value: Any) -> str:
    """*value* as text with every control character (C0, DEL, C1), bidi control,
    line separator and lone surrogate written as a visible ``\\xNN``/``\\uNNNN`` escape."""
    text = "-" if value is None else value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escaped(ch) or ch for ch in text)


def width(text: str) -> int:
    """Terminal cells *text* takes: 2 for wide (East Asian W/F), 0 for combining and format marks."""
    if text.isascii():
        return len(text)
    cells = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        cells += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return cells


def clip(text: str, cells: int) -> str:
    """*text* cut to at most *cells* display cells, ``…`` marking a cut."""
    if width(text) <= cells:
        return text
    out, used = [], 0
    for ch in text:
        w = width(ch)
        if used + w > cells - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def pad(text: str, cells: int, right: bool = False) -> str:
    fill = " " * max(cells - width(text), 0)
    return fill + text if right else text + fill


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns padded by display width to their widest cell; columns in *right*
    right-aligned. Every cell is passed through :func:`safe`."""
    cells = [[safe(c) for c in r] for r in rows]
    widths = [width(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], width(c))

    def line(r: Sequence[str]) -> str:
        return "  ".join(pad(c, widths[i], i in right) for i, c in enumerate(r)).rstrip()

    return "\n".join([line(list(headers))] + [line(r) for r in cells])


def human_size(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def to_datetime(value: Any) -> datetime | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    return None


def relative(dt: datetime, now: float | None = None) -> str:
    delta = (time.time() if now is None else now) - dt.timestamp()
    future = delta < 0
    d = round(abs(delta))  # whole seconds: float noise must not turn 3 days into 2
    if d < 10:
        return "just now"
    if d < 60:
        text = f"{d} s"
    elif d < 3600:
        text = f"{d // 60} min"
    elif d < 86400:
        text = f"{d // 3600} h"
    elif d < 2 * 86400:
        return "in 1 day" if future else "1 day ago"
    else:
        text = f"{d // 86400} days"
    return f"in {text}" if future else f"{text} ago"


def when(value: Any) -> str:
    """``"3 min ago (2025-01-05T14:03:11+01:00)"`` for a timestamp, ``-`` for none."""
    dt = to_datetime(value)
    if dt is None:
        return "-" if value is None else safe(value)
    return f"{relative(dt)} ({dt.astimezone().isoformat(timespec='seconds')})"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return safe(seconds)
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def count(value: Any) -> str:
    """A message count; None means the content could not be parsed."""
    return "unparseable" if value is None else safe(value)


def summarize(message: Any, cells: int = 100) -> str:
    """One safe line for a message: ``role: content`` when it has those, else compact JSON."""
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        text = f"{message.get('role', '?')}: {message['content']}"
    else:
        text = orjson.dumps(message).decode()
    return clip(safe(_SPACES.sub(" ", text).strip()), cells)

"""A session's metadata without reading or parsing its messages.

A listing page needs a session's title and dates, not its 1,000 messages, yet
a full parse reads and decodes the whole file (0.1–0.5 MB each, hundreds of
sessions). Servers in the seed's format write every metadata key *before*
``"messages"``, so the metadata is a prefix of the file. :func:`load_metadata`
reads small chunks only until it meets that top-level key, then hands orjson
the object up to there, closed with ``}``: one parse of a few hundred bytes,
in which every value, the duplicate-key rule and the nesting limit are exactly
those of a full ``orjson.loads`` of the file.

It never guesses. It returns ``None`` — and the caller does a full parse —
whenever the prefix cannot vouch for its answer: the document is not an
object, the key is not among its top-level keys before EOF or ``max_bytes``,
a key or value before it is not something orjson accepts (``NaN``,
``Infinity``, lone surrogates, invalid UTF-8, raw control characters, too
deep), or anything else is unexpected.

What a prefix cannot know, by construction:

* **Keys written after the messages.** They are not returned at all; and when
  a key before the messages repeats after them, a full load keeps the *last*
  value (JSON parsers, orjson included, let the last duplicate win), which
  the prefix never sees. A format that writes metadata after the messages
  needs the full load for those keys.
* **Damage after the key.** The messages are never parsed, so a file that is
  truncated or corrupt after ``"messages":`` still yields its metadata here;
  the full load is the one that reports it.

Duplicates *before* the key follow the full load's rule (the last one wins,
at the position of the first). A leading UTF-8 byte order mark is skipped, as
Python's ``json.loads(bytes)`` does (``orjson.loads`` refuses one, so compare
against a full parse of the bytes after the mark).

Only the standard library and orjson are imported: a server embeds this.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

#: Bytes asked of ``read`` first; each further read asks twice as many (up to
#: :data:`_MAX_CHUNK`), so metadata larger than a chunk costs a few reads.
DEFAULT_CHUNK = 4096
_MAX_CHUNK = 1 << 20

_BOM = b"\xef\xbb\xbf"
_WS = rb"[ \t\n\r]*"  # JSON whitespace only
_STR = rb'"[^"\\]*(?:\\.[^"\\]*)*"'

_NEXT = re.compile(_WS + rb"([^ \t\n\r])")  # the next byte that is not whitespace
_KEY = re.compile(_WS + rb"(" + _STR + rb")" + _WS + rb":" + _WS, re.DOTALL)
_STRING = re.compile(_STR, re.DOTALL)
_SCALAR = re.compile(rb"[-+.0-9A-Za-z]+")  # numbers and literals; orjson decides which are valid
_STRUCTURAL = re.compile(rb'["\[\]{}]')
#: A whole member whose value is a string or a scalar, with the comma after it
#: (so the value is known to be complete): most metadata, in one match.
_SIMPLE_MEMBER = re.compile(_WS + rb"(" + _STR + rb")" + _WS + rb":" + _WS + rb"(?:" + _STR + rb"|[-+.0-9A-Za-z]+)"
                            + _WS + rb",", re.DOTALL)


class _Unusable(Exception):
    """The prefix cannot give a trustworthy answer: the caller must parse fully."""


def load_metadata(read: Callable[[int], bytes], key: str = "messages", *, max_bytes: int,
                  chunk_size: int = DEFAULT_CHUNK) -> dict[str, Any] | None:
    """Every top-level key/value written before *key*, or ``None`` (parse fully).

    *read(n)* returns up to *n* further bytes and ``b""`` at end of file (for a
    descriptor: ``functools.partial(os.read, fd)``; for a file object: its
    ``read``). The first read asks for *chunk_size* bytes, which holds the
    metadata of a typical session; at most *max_bytes* are read in all, then
    the answer is ``None``. Syntax that cannot be told from a cut-short buffer
    (``{"a" 1``) is read on to EOF before the answer is ``None``. Errors raised
    by *read* propagate: the full parse would meet them too.
    """
    buf = bytearray()
    want, left = max(1, chunk_size), max_bytes
    while True:
        data = read(min(want, left)) if left > 0 else b""
        buf += data
        left -= len(data)
        want = min(want * 2, _MAX_CHUNK)
        try:
            span = _locate(buf, key)
        except _Unusable:
            return None
        if span is not None:
            return _parse_members(buf, *span)
        if not data:
            return None  # EOF or the byte cap inside the prefix


def _locate(buf: bytearray, key: str) -> tuple[int, int] | None:
    """Where the members before *key* are: the offsets of the ``{`` and of the
    separator after the last of them (the ``{`` itself when there is none).

    ``None`` when the buffer ends before the key is reached (read more);
    raises :class:`_Unusable` when no amount of reading can give an answer.
    """
    if len(buf) < len(_BOM) and _BOM.startswith(buf):
        return None
    first = _NEXT.match(buf, len(_BOM) if buf.startswith(_BOM) else 0)
    if first is None:
        return None
    if first.group(1) != b"{":
        raise _Unusable  # not an object
    brace = last = first.start(1)
    pos = first.end()
    target = key.encode()
    while True:
        simple = _SIMPLE_MEMBER.match(buf, pos)
        if simple is not None:
            if _is_key(simple.group(1), key, target):
                return brace, last
            pos = simple.end()
            last = pos - 1
            continue
        member = _KEY.match(buf, pos)
        if member is None:
            upcoming = _NEXT.match(buf, pos)
            if upcoming is not None and upcoming.group(1) != b'"':
                raise _Unusable  # not a key (`}` too: the object ends without the key)
            return None  # a key cut short by the end of the buffer
        if _is_key(member.group(1), key, target):
            return brace, last
        pos = _value_end(buf, member.end())
        if pos < 0:
            return None
        after = _NEXT.match(buf, pos)
        if after is None:
            return None
        if after.group(1) != b",":
            raise _Unusable  # `}` ends the object without the key, or a stray byte
        last, pos = after.start(1), after.end()


def _is_key(raw: bytes, key: str, target: bytes) -> bool:
    """Whether the JSON string *raw* (quotes included) is *key* (*target* when encoded); escapes
    are decoded by orjson."""
    if b"\\" not in raw:
        return raw[1:-1] == target
    try:
        return bool(orjson.loads(raw) == key)
    except orjson.JSONDecodeError as exc:
        raise _Unusable from exc  # a key the full parse refuses too (a lone surrogate)


def _value_end(buf: bytearray, pos: int) -> int:
    """The end of the value starting at *pos*, or -1 when the buffer ends inside it.

    Only the extent is found here; whether the value is valid is orjson's call
    when the members are parsed.
    """
    if pos >= len(buf):
        return -1
    first = buf[pos]
    if first == ord('"'):
        string = _STRING.match(buf, pos)
        return -1 if string is None else string.end()
    if first in b"[{":
        return _container_end(buf, pos)
    scalar = _SCALAR.match(buf, pos)
    if scalar is None:
        raise _Unusable  # no value here (`,`, `}`, a stray byte)
    return -1 if scalar.end() == len(buf) else scalar.end()  # a number may continue past the buffer


def _container_end(buf: bytearray, pos: int) -> int:
    """The end of the object or array opening at *pos*, or -1 (brackets are checked by orjson later)."""
    depth = 0
    while True:
        found = _STRUCTURAL.search(buf, pos)
        if found is None:
            return -1
        pos = found.start()
        if buf[pos] == ord('"'):
            string = _STRING.match(buf, pos)
            if string is None:
                return -1
            pos = string.end()
            continue
        depth += 1 if buf[pos] in b"[{" else -1
        pos += 1
        if depth == 0:
            return pos


def _parse_members(buf: bytearray, brace: int, last: int) -> dict[str, Any] | None:
    """orjson's parse of the object from *brace* up to *last*, closed with ``}``."""
    try:
        members = orjson.loads(bytes(buf[brace:max(last, brace + 1)]) + b"}")
    except orjson.JSONDecodeError:
        return None
    return members if isinstance(members, dict) else None

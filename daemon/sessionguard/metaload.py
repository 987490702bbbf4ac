"""A session's metadata without reading or parsing its messages.

A listing page needs a session's title and dates, not its 1,000 messages, yet
a full parse reads and decodes the whole file (0.1–0.5 MB each, hundreds of
sessions). Servers in the seed's format write every metadata key *before*
``"messages"``, so the metadata is a prefix of the file. :func:`load_metadata`
reads small chunks only until it meets that top-level key, and parses each
value before it with orjson, so each value equals what a full
``orjson.loads`` gives for it.

It never guesses. It returns ``None`` — and the caller does a full parse —
whenever the prefix cannot vouch for its answer: the document is not an
object, the key is not among its top-level keys before EOF or ``max_bytes``,
a key or value before it is not something orjson accepts (``NaN``,
``Infinity``, lone surrogates, invalid UTF-8, raw control characters), a value
is nested deeper than orjson can write, or anything else is unexpected.

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
#: :data:`_MAX_CHUNK`), so a large metadata value costs a few reads, not many.
DEFAULT_CHUNK = 4096
_MAX_CHUNK = 1 << 20

#: orjson writes at most 254 levels of nesting (and reads 1024 counting the
#: enclosing object). A value deeper than it can write is left to the full
#: parse, so the standalone parse here can never succeed where the full one fails.
_MAX_DEPTH = 254

_BOM = b"\xef\xbb\xbf"
_WS = b" \t\n\r"
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR_END = re.compile(rb"[,}\]\s]")
_STRUCTURAL = re.compile(rb'["\[\]{}]')


class _NeedMore(Exception):
    """The buffer ends inside the token being scanned: read more and scan it again."""


class _Unusable(Exception):
    """The prefix cannot give a trustworthy answer: the caller must parse fully."""


def load_metadata(read: Callable[[int], bytes], key: str = "messages", *, max_bytes: int,
                  chunk_size: int = DEFAULT_CHUNK) -> dict[str, Any] | None:
    """Every top-level key/value written before *key*, or ``None`` (parse fully).

    *read(n)* returns up to *n* further bytes and ``b""`` at end of file (for a
    descriptor: ``functools.partial(os.read, fd)``; for a file object: its
    ``read``). At most *max_bytes* are read, then the answer is ``None``.
    Errors raised by *read* propagate: the full parse would meet them too.
    """
    scanner = _Scanner(read, max_bytes, chunk_size)
    try:
        return scanner.fields_before(key)
    except _Unusable:
        return None


class _Scanner:
    """A position in a growing buffer of the file's first bytes.

    Each token is scanned from its start; when the buffer ends inside it,
    more is read and the token is scanned again (the reads grow
    geometrically, so a long token is rescanned only a few times).
    """

    def __init__(self, read: Callable[[int], bytes], max_bytes: int, chunk_size: int) -> None:
        self._read = read
        self._left = max_bytes
        self._chunk = max(1, chunk_size)
        self.buf = bytearray()
        self.eof = False

    def more(self) -> None:
        """Append the next chunk, or raise :class:`_Unusable` at EOF or the byte cap."""
        if self.eof or self._left <= 0:
            raise _Unusable
        data = self._read(min(self._chunk, self._left))
        if not data:
            self.eof = True
            raise _Unusable
        self._left -= len(data)
        self.buf += data
        self._chunk = min(self._chunk * 2, _MAX_CHUNK)

    def scan(self, scanner: Callable[[int], int], pos: int) -> int:
        """Run *scanner* from *pos* until the buffer holds the whole token; its end."""
        while True:
            try:
                return scanner(pos)
            except _NeedMore:
                self.more()

    def fields_before(self, key: str) -> dict[str, Any]:
        """The top-level members before *key*; raises :class:`_Unusable` if it cannot tell."""
        pos = self.scan(self._document_start, 0)
        if self.buf[pos] != ord("{"):
            raise _Unusable  # not an object
        pos = self.scan(self._skip_ws, pos + 1)
        fields: dict[str, Any] = {}
        while True:
            if self.buf[pos] != ord('"'):
                raise _Unusable  # `}` (key not found) or not a key
            end = self.scan(self._string_end, pos)
            name = _parse(self.buf[pos:end])
            pos = self.scan(self._skip_ws, end)
            if self.buf[pos] != ord(":"):
                raise _Unusable
            if name == key:
                return fields
            start = self.scan(self._skip_ws, pos + 1)
            end = self.scan(self._value_end, start)
            fields[name] = _parse(self.buf[start:end])
            pos = self.scan(self._skip_ws, end)
            if self.buf[pos] != ord(","):
                raise _Unusable  # `}`: the key is not in this document
            pos = self.scan(self._skip_ws, pos + 1)

    # -- token scanners: return the end of the token starting at pos, or raise _NeedMore --

    def _document_start(self, pos: int) -> int:
        if len(self.buf) < len(_BOM) and _BOM.startswith(bytes(self.buf)) and not self.eof:
            raise _NeedMore
        return self._skip_ws(len(_BOM) if self.buf.startswith(_BOM) else pos)

    def _skip_ws(self, pos: int) -> int:
        """The position of the next non-whitespace byte (JSON whitespace only)."""
        while pos < len(self.buf) and self.buf[pos] in _WS:
            pos += 1
        if pos == len(self.buf):
            raise _NeedMore
        return pos

    def _string_end(self, pos: int) -> int:
        match = _STRING.match(self.buf, pos)
        if match is None:
            raise _NeedMore  # unterminated so far (a string cannot fail to match otherwise)
        return match.end()

    def _value_end(self, pos: int) -> int:
        first = self.buf[pos]
        if first == ord('"'):
            return self._string_end(pos)
        if first in b"[{":
            return self._container_end(pos)
        match = _SCALAR_END.search(self.buf, pos)
        if match is None:
            raise _NeedMore  # a number or literal runs to the end of the buffer
        if match.start() == pos:
            raise _Unusable  # no value at all
        return match.start()

    def _container_end(self, pos: int) -> int:
        """The end of the object or array opening at *pos* (brackets are checked by orjson later)."""
        depth = 0
        while True:
            match = _STRUCTURAL.search(self.buf, pos)
            if match is None:
                raise _NeedMore
            pos = match.start()
            char = self.buf[pos]
            if char == ord('"'):
                pos = self._string_end(pos)
                continue
            depth += 1 if char in b"[{" else -1
            if depth > _MAX_DEPTH:
                raise _Unusable
            pos += 1
            if depth == 0:
                return pos


def _parse(data: bytearray) -> Any:
    """One key or value, exactly as orjson parses it; anything it refuses makes the prefix unusable."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _Unusable from exc

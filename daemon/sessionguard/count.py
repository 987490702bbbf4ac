"""How many messages a session file holds, the cheap identity of a message, and the message diff.

A session is a JSON object whose messages live under a top-level key
(default ``messages``) or a JSON pointer (``/data/messages``), or a JSONL
file with one message per non-empty line. Anything that cannot be counted —
invalid or truncated JSON, a non-object, a non-array under the key, a file
over the size cap — is *unparseable*: ``count`` is ``None`` and ``error``
says why. Counting never raises on bad content.

Servers write JSON that orjson refuses but their own readers accept:
Python's ``json.dump`` writes ``NaN``/``Infinity`` by default, ``json.dumps``
and ``JSON.stringify`` write lone-surrogate escapes (``"\\ud800"``), some
editors add a UTF-8 BOM. Such a file is a whole conversation to its server,
so it is counted with the standard library's parser when orjson says no —
only then, since that parser is several times slower.
"""

from __future__ import annotations

import collections
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .naming import ascii_int

#: Files larger than this are not parsed (a 1 GB file must not stall or OOM us).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: A UTF-8 byte-order mark: orjson refuses it, the standard library's parser is given the rest.
BOM = b"\xef\xbb\xbf"
_TOO_DEEP = b"\0too deep to compare"

#: ``(st_dev, st_ino, st_size, st_mtime_ns)``: when none of these changed, the
#: content is taken to be unchanged and is not re-read.
StatKey = tuple[int, int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def key_hash(key: StatKey) -> int:
    """The compact form a :data:`StatKey` is remembered in (one int, not four; Python's
    hash of a tuple of ints is the same in every process)."""
    return hash(key)


def stat_hash(st: os.stat_result) -> int:
    """``key_hash(stat_key(st))`` in one call: a restart asks it of a million files."""
    return hash((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


@dataclass(frozen=True)
class CountSpec:
    """Where the messages are: ``key``, ``pointer`` or ``jsonl``."""

    kind: Literal["key", "pointer", "jsonl"]
    path: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> CountSpec:
        """``"messages"`` → key, ``"/a/b"`` → JSON pointer (RFC 6901), ``"jsonl"``."""
        if not isinstance(spec, str) or not spec:
            raise ValueError("count must be a non-empty string: a key, a JSON pointer or 'jsonl'")
        if spec == "jsonl":
            return cls("jsonl")
        if spec.startswith("/"):
            parts = tuple(p.replace("~1", "/").replace("~0", "~") for p in spec[1:].split("/"))
            return cls("pointer", parts)
        return cls("key", (spec,))

    def __str__(self) -> str:
        if self.kind == "jsonl":
            return "jsonl"
        if self.kind == "key":
            return self.path[0]
        return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in self.path)


@dataclass(frozen=True)
class Parsed:
    """A parsed session: the document, its messages, or why it is unparseable."""

    count: int | None
    error: str | None = None
    doc: Any = None
    messages: Sequence[Any] | None = None
    #: Parsed by the standard library because orjson refused it (NaN, surrogates, a BOM):
    #: message identities then come from the standard library too (see :func:`canonical`).
    lenient: bool = False

    @property
    def ok(self) -> bool:
        return self.count is not None

    def whole(self) -> Parsed:
        """This parse with its document and messages as Python values: itself, but for
        the daemon's ``glance.Glance``, which built neither and parses in full here."""
        return self


def messages_of(doc: Any, spec: CountSpec) -> list[Any] | str:
    """The messages list inside *doc*, or a string saying why there is none.

    A valid object with no messages key counts as zero messages: a
    metadata-only save that dropped the key is a wipe, not noise.
    """
    if not isinstance(doc, dict):
        return f"not a JSON object (a {type(doc).__name__})"
    node: Any = doc
    for part in spec.path:
        if isinstance(node, dict):
            if part not in node:
                return []
            node = node[part]
        elif isinstance(node, list) and (index := ascii_int(part)) is not None and index < len(node):
            node = node[index]
        else:
            return f"{spec} does not resolve"
    if not isinstance(node, list):
        return f"{spec} is not an array (a {type(node).__name__})"
    return node


def loads(data: bytes) -> Any:
    """Parse JSON as a server's own reader would: orjson, else the standard library.

    Raises ``ValueError`` (orjson's message) when neither accepts it.
    """
    return _loads(data)[0]


def _loads(data: bytes) -> tuple[Any, bool]:
    """The document and whether the standard library had to parse it."""
    try:
        return orjson.loads(data), False
    except orjson.JSONDecodeError as exc:
        try:
            text = (data[len(BOM):] if data.startswith(BOM) else data).decode("utf-8")
            return json.loads(text), True
        except (ValueError, RecursionError):
            raise ValueError(str(exc)) from None


def parse(data: bytes, spec: CountSpec) -> Parsed:
    """Parse session bytes; never raises on bad content."""
    if spec.kind == "jsonl":
        lines = [line for line in data.split(b"\n") if line.strip()]
        return Parsed(len(lines), doc=None, messages=lines)
    try:
        doc, lenient = _loads(data)
    except ValueError as exc:
        return Parsed(None, f"invalid JSON: {exc}")
    found = messages_of(doc, spec)
    if isinstance(found, str):
        return Parsed(None, found, doc=doc, lenient=lenient)
    return Parsed(len(found), doc=doc, messages=found, lenient=lenient)


def count_doc(doc: Any, spec: CountSpec) -> int:
    """Messages in an in-memory document (what a library save is about to write)."""
    if spec.kind == "jsonl":
        if not isinstance(doc, list):
            raise TypeError("a jsonl session is saved as a list of messages")
        return len(doc)
    found = messages_of(doc, spec)
    if isinstance(found, str):
        raise TypeError(f"cannot save this document: {found}")
    return len(found)


def canonical(message: Any, *, lenient: bool = False) -> bytes:
    """One message as bytes that two writers of the same message agree on.

    Re-serialised with sorted keys (writers order keys differently). orjson
    writes ``NaN`` and ``Infinity`` as ``null``, so a message from a
    *lenient* parse (the only kind that can hold them) is serialised by the
    standard library, which keeps them apart; so is what orjson cannot
    serialise (lone surrogates, nesting deeper than 254). A JSONL line is
    itself, stripped.
    """
    if isinstance(message, bytes):
        return message.strip()
    try:
        if lenient:
            raise TypeError("lenient")
        return orjson.dumps(message, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        try:
            return json.dumps(message, sort_keys=True).encode()
        except (ValueError, RecursionError):
            return _TOO_DEEP  # nested deeper than Python can walk: all such messages look alike


def message_key(message: Any, *, lenient: bool = False) -> int:
    """A cheap 64-bit identity of one message, stable across processes and restarts:
    the length of its :func:`canonical` bytes in the high 32 bits, their CRC-32 in
    the low.

    Not a cryptographic digest, and it need not be: it tells a continuation
    from another conversation a buggy server wrote (two messages of one length
    agree by chance once in 2**32); it is taken up to three times a write (a
    CRC costs a third of a blake2b call from Python); and a hostile writer
    gains nothing from a collision, since :func:`rules.replaced` looks at two
    messages and rewriting any between them passes anyway. The keys are kept
    in ``pins.cache``: a change here makes each session's first write after
    the upgrade read its pin (:mod:`hint`), never keep a version.
    """
    raw = canonical(message, lenient=lenient)
    return (len(raw) & 0xFFFF_FFFF) << 32 | zlib.crc32(raw)


def decoded_messages(data: bytes, spec: CountSpec) -> list[Any] | str:
    """The messages of session bytes as JSON values (JSONL lines parsed), or why not."""
    if spec.kind == "jsonl":
        out = []
        for i, line in enumerate(line for line in data.split(b"\n") if line.strip()):
            try:
                out.append(loads(line))
            except ValueError as exc:
                return f"message line {i} is invalid JSON: {exc}"
        return out
    parsed = parse(data, spec)
    if not parsed.ok:
        return parsed.error or "unparseable"
    return list(parsed.messages or [])


@dataclass(frozen=True)
class Diff:
    """Messages of a version missing from another list (a multiset difference)."""

    missing: list[tuple[int, Any]]
    added_count: int


def diff(version: list[Any], live: list[Any]) -> Diff:
    """Which messages of *version* are not in *live*, by content (duplicates counted),
    and how many of *live* are not in *version*. Compares :func:`canonical` bytes, not
    keys: an admin's diff has no collision to doubt."""
    have = collections.Counter(canonical(m, lenient=True) for m in live)
    missing = []
    for i, m in enumerate(version):
        key = canonical(m, lenient=True)
        if have[key] > 0:
            have[key] -= 1
        else:
            missing.append((i, m))
    return Diff(missing, sum(have.values()))

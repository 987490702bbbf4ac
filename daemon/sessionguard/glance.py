"""The event path's parse: a session's count and the few messages the rules read,
without building the document.

Each write of a session is parsed once, and the daemon then reads its count and
at most three messages (the first, the one before the last, and the one before
the pin's last: :mod:`rules`). orjson builds a Python object for every message
and string — for a 1,000-message, 450 KB session about two thirds of the
daemon's parse, all of it dropped unread. simdjson validates the whole document
into its own tape and makes a message a Python value only when it is read
(under half of orjson's CPU on such a file, BENCHMARKS.md).

It must never read a session differently than :func:`count.parse`, which is
what the library, the store and recovery use, or the two would count and hash
the same bytes apart. So anything simdjson might read otherwise goes to that
parser: a document it refuses (invalid JSON, and also what orjson or the
standard library accept: an integer beyond 64 bits, ``NaN``, lone surrogates,
a UTF-8 byte-order mark), a duplicated key on the way to the messages
(simdjson's lookup takes the first, Python's parsers the last), a path that
does not end in an array, and JSONL. The store's capture works on
:meth:`Parsed.whole`, which parses a :class:`Glance` in full: a capture
compares whole message lists and the intent keys, and is rare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import simdjson

from .count import BOM, CountSpec, Parsed, parse
from .naming import ascii_int

#: Below this size orjson builds the whole session about as fast as simdjson reads it,
#: and the three messages the rules hash are then ready: a glance, which makes each
#: one a Python value when read, costs more (a session of 5 messages, ~2.5 KB: 34
#: against 24 µs with the check; of 20, ~9 KB: 26 against 31 µs).
GLANCE_MIN_BYTES = 8 * 1024


def parse_for_rules(data: bytes, spec: CountSpec) -> Parsed:
    """The cheapest parse that answers the rules (a count, Identity, replaced): the full
    one for a small session, else a glance. What the daemon parses every write with."""
    return parse(data, spec) if len(data) < GLANCE_MIN_BYTES else glance(data, spec)


def glance(data: bytes, spec: CountSpec) -> Parsed:
    """What :func:`count.parse` would say of *data*, as a :class:`Glance` (no document,
    messages made Python values when read) where that is sure to be the same."""
    if spec.kind == "jsonl" or data.startswith(BOM):
        return parse(data, spec)
    try:
        node: Any = simdjson.Parser().parse(data)  # a parser each: threads and a kept Glance never share one
        for part in spec.path:
            if isinstance(node, simdjson.Object) and part in node and len(set(node)) == len(node):
                node = node[part]
            elif isinstance(node, simdjson.Array) and (index := ascii_int(part)) is not None and index < len(node):
                node = node[index]
            else:
                return parse(data, spec)  # missing, a duplicate key, not a container: parse's words for it
    except (ValueError, RuntimeError):  # refused (UnicodeDecodeError is a ValueError)
        return parse(data, spec)
    if not isinstance(node, simdjson.Array):
        return parse(data, spec)
    return Glance(len(node), messages=_Messages(node), data=data, spec=spec)


@dataclass(frozen=True, kw_only=True)
class Glance(Parsed):
    """A valid session read by :func:`glance`: ``doc`` is None and ``messages`` a
    sequence whose items are built when read. :meth:`whole` is the full parse."""

    data: bytes
    spec: CountSpec

    def whole(self) -> Parsed:
        return parse(self.data, self.spec)


class _Messages(Sequence[Any]):
    """simdjson's array of messages; each read item is a plain Python value, equal
    to what orjson makes of it (so :func:`count.message_key` hashes it alike)."""

    __slots__ = ("_array",)

    def __init__(self, array: simdjson.Array) -> None:
        self._array = array

    def __len__(self) -> int:
        return len(self._array)

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        item: Any = self._array[i]
        if isinstance(item, simdjson.Object):
            return item.as_dict()
        if isinstance(item, simdjson.Array):
            return item.as_list()
        return item

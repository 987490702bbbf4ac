"""The event path's glance reads every session exactly as the full parse does.

The daemon counts and hashes a write of 8 KB or more with :func:`glance.glance`
(:func:`glance.parse_for_rules`); the store, the library and recovery with
:func:`count.parse`. Any difference would make the
two disagree about the same bytes (a replaced conversation missed, or a version
kept for nothing), so every answer is compared with the full parse's.
"""

from __future__ import annotations

import json
import math
import sys

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessionguard.count import CountSpec, Parsed, parse
from sessionguard.glance import GLANCE_MIN_BYTES, Glance, glance, parse_for_rules
from sessionguard.rules import Identity, replaced
from sghelpers import make_session

KEY = CountSpec.parse("messages")
POINTER = CountSpec.parse("/data/0/turns")


def same_reading(data: bytes, spec: CountSpec) -> Parsed:
    """Assert glance and parse agree on *data*; the glance."""
    full, seen = parse(data, spec), glance(data, spec)
    assert (seen.count, seen.error, seen.lenient) == (full.count, full.error, full.lenient)
    assert Identity.of(seen) == Identity.of(full)
    whole = seen.whole()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # == on the nesting both parsers allow (1,023 levels)
    try:
        if full.messages is None:
            assert seen.messages is None
        else:
            assert seen.messages is not None and list(seen.messages) == list(full.messages)
            assert seen.messages[1:-1] == list(full.messages)[1:-1]
        assert (whole.count, whole.doc, whole.lenient) == (full.count, full.doc, full.lenient)
    finally:
        sys.setrecursionlimit(limit)
    return seen


def test_a_session_is_glanced_not_built() -> None:
    data = orjson.dumps(make_session(40), option=orjson.OPT_INDENT_2)
    seen = same_reading(data, KEY)
    assert isinstance(seen, Glance) and seen.doc is None and seen.count == 40
    assert seen.whole().doc == orjson.loads(data)  # what a capture compares: the whole document


@pytest.mark.parametrize(
    "data, spec",
    [
        # duplicate keys: simdjson's lookup takes the first, Python's parsers the last
        (b'{"messages": [1, 2, 3], "messages": []}', KEY),
        (b'{"messages": [], "messages": [1, 2, 3]}', KEY),
        (b'{"data": [{"turns": [1, 2]}], "data": [{"turns": []}]}', POINTER),
        (b'{"data": [{"turns": [1, 2], "turns": [1]}]}', POINTER),
        # what simdjson refuses and orjson or the standard library read
        (b'{"messages": [{"n": 18446744073709551616}, 2]}', KEY),  # orjson: a float
        (b'{"messages": [{"n": -9223372036854775809}]}', KEY),
        (b'{"messages": [{"n": 1e1000}]}', KEY),
        (b'{"messages": [NaN, Infinity, -Infinity]}', KEY),
        (b'{"messages": ["\\ud800", "x"]}', KEY),  # a lone surrogate
        (b'\xef\xbb\xbf{"messages": [1, 2]}', KEY),  # a byte-order mark
        # invalid, or no array where the messages should be
        (b'{"messages": [1, 2', KEY),
        (b"", KEY),
        (b"   ", KEY),
        (b'{"messages": [1]} x', KEY),
        (b"\xff\xfe not utf-8", KEY),
        (b'{"messages": "\xed\xa0\x80"}', KEY),
        (b"[1, 2]", KEY),
        (b'"messages"', KEY),
        (b"null", KEY),
        (b'{"title": "no messages key"}', KEY),
        (b'{"messages": {"a": 1}}', KEY),
        (b'{"messages": null}', KEY),
        (b'{"data": [{"turns": [1, 2]}]}', POINTER),
        (b'{"data": {"0": {"turns": [1, 2]}}}', POINTER),
        (b'{"data": [{"turns": 5}]}', POINTER),
        (b'{"data": []}', POINTER),
        (b'{"data": [{"other": 1}]}', POINTER),
        (b'{"data": [{"turns": [1]}, {"turns": [1, 2]}, {"turns": []}]}', CountSpec.parse("/data/\u00b2/turns")),
        (b'{"data": [{"turns": [1]}, {"turns": [1, 2]}, {"turns": []}]}', CountSpec.parse("/data/\u0661/turns")),
        # the depth both parsers stop at
        (b'{"messages": [' + b"[" * 1022 + b"]" * 1022 + b"]}", KEY),
        (b'{"messages": [' + b"[" * 1023 + b"]" * 1023 + b"]}", KEY),
        (b'{"messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}", KEY),
        # numbers and strings as both read them
        (b'{"messages": [-0, -0.0, 0e0, 1E2, 1e-400, 4.9e-324, 18446744073709551615, 0.30000000000000004]}', KEY),
        (b'{"messages": ["a\\u0000b", "\\ud83d\\ude00", "\\/", "\x7f", "\xc3\xa9"]}', KEY),
        (b'{"messages": [{"b": 1, "a": 2, "b": 3}, {"a": [1, {"c": null}]}]}', KEY),
    ],
)
def test_glance_reads_what_parse_reads(data: bytes, spec: CountSpec) -> None:
    same_reading(data, spec)


def test_the_event_path_glances_only_where_building_costs_more() -> None:
    small, large = (orjson.dumps(make_session(n), option=orjson.OPT_INDENT_2) for n in (5, 40))
    assert len(small) < GLANCE_MIN_BYTES <= len(large)
    assert not isinstance(parse_for_rules(small, KEY), Glance)  # built whole: its messages are ready to hash
    assert isinstance(parse_for_rules(large, KEY), Glance)
    assert parse_for_rules(large, KEY).count == 40


def test_jsonl_is_parsed_as_it_always_was() -> None:
    spec = CountSpec.parse("jsonl")
    seen = same_reading(b'{"a": 1}\n\n{"b": 2}\n', spec)
    assert not isinstance(seen, Glance) and seen.count == 2


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(meta=st.dictionaries(st.text(max_size=8), json_values, max_size=4), messages=st.lists(json_values, max_size=8),
       ascii_only=st.booleans())
def test_any_session_is_read_alike(meta: dict[str, object], messages: list[object], ascii_only: bool) -> None:
    """Serialised as Python's json module does (a server's own writer): integers past
    64 bits, lone surrogates and non-ASCII text as escapes or as UTF-8."""
    def dumps(doc: object) -> bytes:
        return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")

    same_reading(dumps({**meta, "messages": messages}), KEY)
    same_reading(dumps({"data": [{"turns": messages, **meta}]}), POINTER)


@settings(max_examples=100, deadline=None)
@given(messages=st.lists(st.dictionaries(st.sampled_from(["role", "content", "t"]), json_values, max_size=3),
                         min_size=2, max_size=8),
       other=st.lists(st.dictionaries(st.sampled_from(["role", "content", "t"]), json_values, max_size=3),
                      min_size=2, max_size=8))
def test_a_replaced_conversation_is_judged_alike(messages: list[object], other: list[object]) -> None:
    pinned = Identity.of(parse(json.dumps({"messages": messages}).encode("utf-8", "surrogatepass"), KEY))
    assert pinned is not None
    for after in ([*messages, {"content": "next"}], other + other, [*messages[:-1], {"content": "rewritten"}]):
        data = json.dumps({"title": "t", "messages": after}).encode("utf-8", "surrogatepass")
        assert replaced(pinned, glance(data, KEY)) == replaced(pinned, parse(data, KEY))


def test_floats_keep_their_bits() -> None:
    """A message's key is a hash of its re-serialisation: a float read one bit apart would
    change it. Both parsers round correctly; checked on the hard cases."""
    hard = [2.2250738585072011e-308, 1.7976931348623157e308, 5e-324, 0.1 + 0.2, 9007199254740993.0, math.pi]
    data = orjson.dumps({"messages": [{"x": x} for x in hard]})
    seen = same_reading(data, KEY)
    assert seen.messages is not None
    assert [m["x"].hex() for m in seen.messages] == [x.hex() for x in hard]

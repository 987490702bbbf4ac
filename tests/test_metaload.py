"""sessionguard.metaload: the metadata before ``"messages"`` equals a full load's, or the answer is None.

The property test writes random metadata before ``messages`` (and random keys
after it) in many serialization styles — stdlib ``json`` with or without
indent and ``ensure_ascii``, orjson compact and indented, and a hand-made
writer with duplicate keys, arbitrary JSON whitespace between every token and
an optional byte order mark — then reads it back in random chunk sizes and
compares with ``orjson.loads`` of the whole file, cut at ``messages``.

``python tests/test_metaload.py`` prints how many bytes it reads of a
1000-message session (the measurement helper; nothing is asserted on time).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionguard.metaload import DEFAULT_CHUNK, load_metadata

BOM = b"\xef\xbb\xbf"
MAX = 1 << 24

# -- strategies -----------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # lone surrogates: see the None cases
_keys = st.one_of(_text, st.sampled_from(["title", "messages_count", "message", "Messages", 'a"b', "c\\d", "é✓"]))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), _text,
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=12,
)
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": _text}),
                     max_size=5)
_before = st.lists(st.tuples(_keys.filter(lambda k: k != "messages"), _values), max_size=8)
_after = st.dictionaries(st.sampled_from(["tool_calls", "usage", "zz_after"]), _values, max_size=2)


@dataclass
class Doc:
    """A document to write: members before messages (duplicates allowed), the messages, members after."""

    before: list[tuple[str, Any]]
    messages: list[Any]
    after: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**dict(self.before), "messages": self.messages, **self.after}


def _dump_json(doc: Doc, draw: st.DrawFn) -> bytes:
    indent = draw(st.sampled_from([None, 0, 2, 4, "\t"]))
    separators = draw(st.sampled_from([None, (",", ":"), (" , ", " : ")]))
    ascii_only = draw(st.booleans())
    return json.dumps(doc.as_dict(), indent=indent, separators=separators, ensure_ascii=ascii_only).encode()


def _dump_orjson(doc: Doc, draw: st.DrawFn) -> bytes:
    option = draw(st.sampled_from([0, orjson.OPT_INDENT_2]))
    try:
        return orjson.dumps(doc.as_dict(), option=option)
    except TypeError:  # an integer beyond 64 bits, which orjson cannot write
        return _dump_json(doc, draw)


def _dump_by_hand(doc: Doc, draw: st.DrawFn) -> bytes:
    """Token by token, with random JSON whitespace between tokens and duplicates kept as written."""
    ws = st.sampled_from(["", " ", "\n", "\t", "\r\n", "  \n    "])
    ascii_only = draw(st.booleans())
    members = [*doc.before, ("messages", doc.messages), *doc.after.items()]
    out = [draw(ws), "{"]
    for i, (key, value) in enumerate(members):
        out += [draw(ws), json.dumps(key, ensure_ascii=ascii_only), draw(ws), ":", draw(ws),
                json.dumps(value, ensure_ascii=ascii_only), draw(ws)]
        out.append("," if i < len(members) - 1 else "}")
    data = ("".join(out) + draw(ws)).encode()
    return BOM + data if draw(st.booleans()) else data


@st.composite
def written(draw: st.DrawFn) -> bytes:
    doc = Doc(draw(_before), draw(_messages), draw(_after))
    doc.after = {k: v for k, v in doc.after.items() if k not in dict(doc.before)}  # repeats: see test_duplicate_*
    style: Callable[[Doc, st.DrawFn], bytes] = draw(st.sampled_from([_dump_json, _dump_orjson, _dump_by_hand]))
    if style is not _dump_by_hand:
        doc.before = list(dict(doc.before).items())  # a dict cannot hold duplicates
    return style(doc, draw)


def expected(data: bytes) -> dict[str, Any]:
    """A full orjson load of the file (after a BOM), minus everything from ``messages`` on."""
    full = orjson.loads(data.removeprefix(BOM))
    keys = list(full)
    return {k: full[k] for k in keys[: keys.index("messages")]}


class CountingReader:
    """``read(n)`` over bytes that counts what was asked for and what was returned."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)
        self.calls = 0
        self.bytes = 0

    def read(self, n: int) -> bytes:
        self.calls += 1
        chunk = self._file.read(n)
        self.bytes += len(chunk)
        return chunk


def meta(data: bytes, chunk: int = DEFAULT_CHUNK, key: str = "messages") -> dict[str, Any] | None:
    return load_metadata(io.BytesIO(data).read, key, max_bytes=MAX, chunk_size=chunk)


# -- the property ---------------------------------------------------------------

@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=written(), chunk=st.integers(min_value=1, max_value=64))
def test_equals_the_full_load_cut_at_messages(data: bytes, chunk: int) -> None:
    got = meta(data, chunk)
    assert got is not None, data
    want = expected(data)
    assert list(got.items()) == list(want.items())  # same values and the full load's key order


_edits = st.lists(st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.floats(0, 1),
                            st.sampled_from(list(b' \t\n"\\:,{}[]0aeE-+.\xef\xbb\xbf\xff'))), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=written(), edits=_edits, chunk=st.integers(min_value=1, max_value=64))
def test_damaged_documents_never_get_a_wrong_answer(data: bytes, edits: list[tuple[str, float, int]],
                                                    chunk: int) -> None:
    """A few bytes replaced, inserted or deleted: whenever a full load still gives an object with
    ``messages``, the answer is that object's prefix or None, never anything else."""
    damaged = bytearray(data)
    for kind, where, byte in edits:
        at = int(where * len(damaged))
        if kind == "insert":
            damaged[at:at] = bytes([byte])
        elif at < len(damaged):
            damaged[at:at + 1] = bytes([byte]) if kind == "replace" else b""
    got = meta(bytes(damaged), chunk)
    try:
        full = orjson.loads(bytes(damaged).removeprefix(BOM))
    except orjson.JSONDecodeError:
        return  # only the prefix is promised; a document damaged after the key is the full load's to report
    if got is not None:
        assert isinstance(full, dict) and "messages" in full
        if not _repeats_after_messages(bytes(damaged).removeprefix(BOM)):  # the documented limit
            assert list(got.items()) == list(expected(bytes(damaged)).items())


def _repeats_after_messages(data: bytes) -> bool:
    """Whether a top-level key written before ``messages`` is written again after it."""
    objects: list[list[tuple[str, Any]]] = []

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(pairs)
        return dict(pairs)

    json.loads(data, object_pairs_hook=keep)
    keys = [k for k, _ in objects[-1]]  # the top-level object is the last one closed
    cut = keys.index("messages")
    return bool(set(keys[:cut]) & set(keys[cut + 1:]))


# -- the details the property may not hit every run -------------------------------

def test_escapes_whitespace_nesting_and_a_nested_messages_key() -> None:
    data = (BOM + b' \r\n\t{ "a\\"b\\\\" :\n"x\\"]}\\\\" , "nested": {"messages": [1, {"k": "]}"}]},'
            b'"list":[[],{}] ,"n": -1.5e3, "t": true, "messag\\u0065s": [1, 2]}')
    assert meta(data, chunk=1) == {'a"b\\': 'x"]}\\', "nested": {"messages": [1, {"k": "]}"}]},
                                   "list": [[], {}], "n": -1500.0, "t": True}


def test_duplicate_before_messages_keeps_the_last_like_a_full_load() -> None:
    data = b'{"title": "old", "model": "m", "title": "new", "messages": []}'
    got = meta(data)
    assert got == {"title": "new", "model": "m"}
    assert list(got.items()) == list(expected(data).items())


def test_duplicate_after_messages_is_what_a_prefix_cannot_know() -> None:
    """Documented limit: a key repeated after messages wins in a full load, and is never read here."""
    data = b'{"title": "before", "messages": [], "title": "after"}'
    assert meta(data) == {"title": "before"}
    assert orjson.loads(data)["title"] == "after"


def test_other_key_and_damage_after_it() -> None:
    assert meta(b'{"a": 1, "history": [1], "b": 2}', key="history") == {"a": 1}
    # The messages are never parsed: a file truncated inside them still has its metadata.
    assert meta(b'{"a": 1, "messages": [{"role": "us') == {"a": 1}


@pytest.mark.parametrize("data", [
    pytest.param(b'[{"messages": []}]', id="not an object"),
    pytest.param(b'"messages"', id="a string"),
    pytest.param(b"", id="empty file"),
    pytest.param(BOM, id="only a BOM"),
    pytest.param(b"{}", id="empty object"),
    pytest.param(b'{"a": 1, "b": 2}', id="no messages key"),
    pytest.param(b'{"a": 1, "b": {"messages": []}}', id="messages only nested"),
    pytest.param(b'{"a": 1, "b": ', id="EOF before the key"),
    pytest.param(b'{"a": "unterminated', id="EOF in a string"),
    pytest.param(b'{"a": NaN, "messages": []}', id="NaN"),
    pytest.param(b'{"a": Infinity, "messages": []}', id="Infinity"),
    pytest.param(b'{"a": -Infinity, "messages": []}', id="-Infinity"),
    pytest.param(b'{"a": 1e400, "messages": []}', id="overflowing number"),
    pytest.param(b'{"a": "\\ud800", "messages": []}', id="lone surrogate in a value"),
    pytest.param(b'{"\\udc00": 1, "messages": []}', id="lone surrogate in a key"),
    pytest.param(b'{"a": "\xff", "messages": []}', id="invalid UTF-8"),
    pytest.param(b'{"a": "tab\there", "messages": []}', id="raw control character"),
    pytest.param(b'{"a": 1 "messages": []}', id="missing comma"),
    pytest.param(b'{"a": 1,, "messages": []}', id="double comma"),
    pytest.param(b'{"a" 1, "messages": []}', id="missing colon"),
    pytest.param(b'{"a": , "messages": []}', id="missing value"),
    pytest.param(b'{a: 1, "messages": []}', id="unquoted key"),
    pytest.param(b'{"a": [1, 2}, "messages": []}', id="mismatched brackets"),
    pytest.param(b'{"a": 01, "messages": []}', id="leading zero"),
    pytest.param(b'{"a": tru, "messages": []}', id="bad literal"),
    pytest.param(b'{"a":\x0c1, "messages": []}', id="form feed is not JSON whitespace"),
    pytest.param(b'{"messages" 1}', id="key without colon"),
    pytest.param(b'{"a": ' + b"[" * 1024 + b"]" * 1024 + b', "messages": []}', id="deeper than orjson reads"),
    pytest.param(b'{"a": [1, {"b": 2]}, "messages": []}', id="brackets crossed"),
    pytest.param(b'{"a": 1, "b" "messages": []}', id="key without colon before the key"),
    pytest.param(b'{"a": 1, } "messages": []}', id="trailing comma"),
])
def test_none_when_the_prefix_cannot_vouch(data: bytes) -> None:
    assert meta(data) is None
    assert meta(data, chunk=1) is None


def test_depth_is_the_full_loads() -> None:
    """Nesting is judged in place, so the limit is exactly a full load's (1024 levels with the object)."""
    data = b'{"a": ' + b"[" * 1023 + b"]" * 1023 + b', "b": 1, "messages": []}'
    got = meta(data)
    assert got is not None and list(got) == ["a", "b"] and got["b"] == 1
    depth, node = 0, got["a"]
    while node:
        depth, node = depth + 1, node[0]
    assert depth == 1022  # 1023 brackets: the innermost list is empty


def test_max_bytes_bounds_the_read() -> None:
    data = b'{"big": "' + b"x" * 10_000 + b'", "messages": []}'
    reader = CountingReader(data)
    assert load_metadata(reader.read, max_bytes=5000) is None
    assert reader.bytes <= 5000
    assert load_metadata(io.BytesIO(data).read, max_bytes=len(data)) == {"big": "x" * 10_000}


def test_a_read_error_propagates() -> None:
    def failing(n: int) -> bytes:
        raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        load_metadata(failing, max_bytes=MAX)


def test_reads_from_a_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(b'{"title": "t", "messages": []}')
    fd = os.open(path, os.O_RDONLY)
    try:
        assert load_metadata(lambda n: os.read(fd, n), max_bytes=MAX) == {"title": "t"}
    finally:
        os.close(fd)


# -- the measurement helper -----------------------------------------------------

def seed_shaped_session(n: int = 1000) -> bytes:
    """A 1000-message session in the seed's format (indent 2, metadata first), about 400 KB."""
    doc = {
        "session_id": "abc123def456", "title": "Planning the migration", "workspace": "/home/user/project",
        "model": "gpt-5", "created_at": 1764000000.0, "updated_at": 1764003600.0, "pinned": False,
        "active_stream_id": None, "intentional_shrink_generation": None, "clear_generation": None,
        "messages": [{"role": "user" if i % 2 == 0 else "assistant",
                      "content": f"message {i}: " + "lorem ipsum dolor sit amet " * 14} for i in range(n)],
        "tool_calls": [],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False).encode()


def measure_prefix_read(data: bytes, rounds: int = 20) -> dict[str, float]:
    """Bytes and reads metaload takes from *data*, and its time against a full orjson load (reported only)."""
    reader = CountingReader(data)
    assert load_metadata(reader.read, max_bytes=MAX) is not None
    start = time.perf_counter()
    for _ in range(rounds):
        load_metadata(io.BytesIO(data).read, max_bytes=MAX)
    meta_s = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for _ in range(rounds):
        orjson.loads(data)
    full_s = (time.perf_counter() - start) / rounds
    return {"file_bytes": len(data), "bytes_read": reader.bytes, "reads": reader.calls,
            "metaload_ms": meta_s * 1000, "full_orjson_ms": full_s * 1000}


def test_measurement_on_a_1000_message_session(capsys: pytest.CaptureFixture[str]) -> None:
    """Correct on the seed's shape, and only a prefix is read (the numbers are printed, not judged)."""
    data = seed_shaped_session()
    assert meta(data) == expected(data)
    figures = measure_prefix_read(data)
    with capsys.disabled():
        print("\nmetaload:", json.dumps({k: round(v, 3) for k, v in figures.items()}))
    assert figures["bytes_read"] < figures["file_bytes"]


if __name__ == "__main__":
    json.dump(measure_prefix_read(seed_shaped_session()), sys.stdout, indent=2)
    print()

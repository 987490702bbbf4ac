"""Counting messages never crashes on bad content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sessionguard import count, fsutil
from sessionguard.count import CountSpec, parse
from sessionguard.errors import FileTooLarge, UnsafeSessionFile
from sessionguard.rules import classify

KEY = CountSpec.parse("messages")


@pytest.mark.parametrize(
    "data, count",
    [
        (b'{"messages": [1, 2, 3]}', 3),
        (b'{"title": "no messages key"}', 0),
        (b'{"messages": []}', 0),
        (b'{"messages": [1, 2', None),  # truncated
        (b"", None),
        (b"[1, 2]", None),  # a list (like _index.json)
        (b'{"messages": {"a": 1}}', None),
        (b"\xff\xfe not utf-8", None),
        (b"[" * 100000 + b"]" * 100000, None),  # deeply nested
    ],
)
def test_parse(data: bytes, count: int | None) -> None:
    assert parse(data, KEY).count == count


def test_pointer_and_jsonl() -> None:
    p = CountSpec.parse("/data/a~1b/turns")
    assert p.path == ("data", "a/b", "turns") and str(p) == "/data/a~1b/turns"
    assert parse(b'{"data": {"a/b": {"turns": [1, 2]}}}', p).count == 2
    j = CountSpec.parse("jsonl")
    assert parse(b'{"a":1}\n\n{"b":2}\n', j).count == 2
    with pytest.raises(ValueError):
        CountSpec.parse("")


@pytest.mark.parametrize("index", ["²", "\u0663", "\uff11"])  # superscript two, Arabic-Indic three, fullwidth one
def test_a_pointer_indexes_an_array_with_ascii_digits_only(index: str) -> None:
    """RFC 6901 array indexes are ASCII digits. ``str.isdigit`` says yes to "²" (which
    ``int`` then refuses: parse raised) and to other scripts' digits (which ``int`` reads:
    a count from the wrong place). Neither resolves on an array; on an object it is a key."""
    spec = CountSpec.parse(f"/data/{index}/turns")
    listed = parse(b'{"data": [' + b", ".join(b'{"turns": [%d]}' % i for i in range(5)) + b"]}", spec)
    assert listed.count is None and listed.error == f"{spec} does not resolve"
    assert parse(f'{{"data": {{"{index}": {{"turns": [1, 2]}}}}}}'.encode(), spec).count == 2


def test_classify() -> None:
    old = parse(b'{"messages": [1, 2, 3]}', KEY)
    assert classify(old, parse(b'{"messages": []}', KEY)) == "wipe"
    assert classify(old, parse(b'{"messages": [1, 2]}', KEY)) == "truncate"
    assert classify(old, parse(b'{"messages": [9]}', KEY)) == "rewrite"
    assert classify(old, parse(b"{", KEY)) == "unparseable"
    assert classify(old, None) == "deleted"


def test_reads_refuse_fifos_symlinks_and_huge_files(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkfifo(tmp_path / "f.json")
        with pytest.raises(UnsafeSessionFile):
            fsutil.read_regular("f.json", 100, dir_fd=fd)  # returns at once: O_NONBLOCK, never blocks
        (tmp_path / "t").write_bytes(b"x")
        (tmp_path / "l.json").symlink_to(tmp_path / "t")
        with pytest.raises(UnsafeSessionFile):
            fsutil.read_regular("l.json", 100, dir_fd=fd)
        (tmp_path / "big.json").write_bytes(b"x" * 1000)
        with pytest.raises(FileTooLarge):
            fsutil.read_regular("big.json", 999, dir_fd=fd)
        with pytest.raises(ValueError):
            fsutil.read_regular("../t", 100, dir_fd=fd)  # one component, never a path
    finally:
        os.close(fd)


def test_stat_hash_is_the_hash_of_the_stat_key(tmp_path: Path) -> None:
    """Restart hints written with one form are read back with the other."""
    f = tmp_path / "s.json"
    f.write_bytes(b"{}")
    st = os.stat(f)
    assert count.stat_hash(st) == count.key_hash(count.stat_key(st))

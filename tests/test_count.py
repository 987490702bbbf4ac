"""Counting messages never crashes on bad content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sessionguard import fsutil
from sessionguard.count import CountSpec, classify, parse

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


def test_classify() -> None:
    old = parse(b'{"messages": [1, 2, 3]}', KEY)
    assert classify(old, parse(b'{"messages": []}', KEY)) == "wipe"
    assert classify(old, parse(b'{"messages": [1, 2]}', KEY)) == "truncate"
    assert classify(old, parse(b'{"messages": [9]}', KEY)) == "rewrite"
    assert classify(old, parse(b"{", KEY)) == "unparseable"
    assert classify(old, None) == "deleted"


def test_reads_refuse_fifos_symlinks_and_huge_files(tmp_path: Path) -> None:
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    with pytest.raises(fsutil.NotRegularFile):
        fsutil.read_regular(fifo, 100)  # returns at once: O_NONBLOCK, never blocks
    (tmp_path / "t").write_bytes(b"x")
    (tmp_path / "l.json").symlink_to(tmp_path / "t")
    with pytest.raises(OSError):
        fsutil.read_regular(tmp_path / "l.json", 100)
    (tmp_path / "big.json").write_bytes(b"x" * 1000)
    with pytest.raises(fsutil.FileTooLarge):
        fsutil.read_regular(tmp_path / "big.json", 999)

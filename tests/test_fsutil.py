"""fsutil.read_fd: a whole file, read to its end as it is when read, under a cap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sessionguard import fsutil
from sessionguard.errors import FileTooLarge


def _read_after_growth(path: Path, first: bytes, more: bytes, cap: int) -> bytes:
    """Stat the file, let a writer append *more*, then read it with the old stat."""
    path.write_bytes(first)
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        with path.open("ab") as f:
            f.write(more)
        return fsutil.read_fd(fd, st, cap)
    finally:
        os.close(fd)


@pytest.mark.parametrize("grown", [0, 1, 65535, 65536, 65537, 300_000])
def test_a_file_is_read_to_its_end_even_past_the_size_stat_gave(tmp_path: Path, grown: int) -> None:
    first, more = b"a" * 10_000, b"b" * grown
    assert _read_after_growth(tmp_path / "s.json", first, more, 1 << 20) == first + more


def test_an_empty_file_reads_as_empty(tmp_path: Path) -> None:
    assert _read_after_growth(tmp_path / "s.json", b"", b"", 100) == b""


def test_a_file_that_grows_past_the_cap_while_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileTooLarge, match="grew past the cap"):
        _read_after_growth(tmp_path / "s.json", b"a" * 1000, b"b" * 200_000, 100_000)


def test_a_file_cut_short_after_its_stat_is_read_as_it_now_is(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(b"a" * 50_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        os.truncate(path, 20_000)
        assert fsutil.read_fd(fd, st, 1 << 20) == b"a" * 20_000
    finally:
        os.close(fd)

"""A first start's pins: each is written as a file with no name (``O_TMPFILE``) and
linked under the session's id once whole, never over a pin that appeared meanwhile;
where no nameless file can be named (no ``/proc``), the same through a tmp file.

What the pins folder's inotify watch saw tells the two ways apart: a nameless pin
makes one entry (its own name), a tmp file makes a name and moves it."""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sessionguard.store import Store
from test_pins_spare import pins_dir
from test_store import SID, data, open_store

_libc = ctypes.CDLL(None, use_errno=True)
IN_CREATE, IN_MOVED_TO, IN_NONBLOCK = 0x100, 0x80, os.O_NONBLOCK
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len


def created_names(folder: Path, act: Callable[[], None]) -> list[tuple[str, str]]:
    """``(how, name)`` for every name made in *folder* while *act* ran: ``create`` or ``moved``."""
    fd = _libc.inotify_init1(IN_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert _libc.inotify_add_watch(fd, os.fsencode(folder), IN_CREATE | IN_MOVED_TO) >= 0
        act()
        try:
            buf = os.read(fd, 65536)
        except BlockingIOError:
            return []
    finally:
        os.close(fd)
    out, at = [], 0
    while at < len(buf):
        _, mask, _, size = _HEADER.unpack_from(buf, at)
        name = buf[at + _HEADER.size:at + _HEADER.size + size].rstrip(b"\0").decode()
        out.append(("moved" if mask & IN_MOVED_TO else "create", name))
        at += _HEADER.size + size
    return out


def test_a_first_pin_gets_its_name_only_once_it_is_whole(store: Store) -> None:
    got: list[os.stat_result] = []
    seen = created_names(pins_dir(store), lambda: got.append(store.pins.write(SID, data(5), fresh=True)))
    assert seen == [("create", SID)]  # no tmp name made, renamed or left
    pin = pins_dir(store) / SID
    assert pin.read_bytes() == data(5)
    st = os.lstat(pin)
    assert (st.st_ino, st.st_size, st.st_mtime_ns) == (got[0].st_ino, got[0].st_size, got[0].st_mtime_ns)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 1
    assert os.listdir(pins_dir(store)) == [SID]


def test_a_first_pin_never_replaces_a_pin_that_appeared_meanwhile(store: Store) -> None:
    store.pins.write(SID, data(5))
    with pytest.raises(FileExistsError):
        store.pins.write(SID, data(2), fresh=True)
    assert (pins_dir(store) / SID).read_bytes() == data(5)
    assert os.listdir(pins_dir(store)) == [SID]  # the nameless file went with its descriptor


@pytest.mark.parametrize("proc", [
    pytest.param("umount -l /proc", id="no /proc"),
    # a /proc where the descriptor's link is missing: linkat fails after the file was written
    pytest.param("mount -t tmpfs none /proc && mkdir -p /proc/self/fd", id="a /proc that cannot name it"),
])
def test_without_proc_a_first_pin_goes_through_a_tmp_file(sdir: Path, proc: str) -> None:
    """A container with no usable ``/proc``: the nameless file cannot be named, so the
    pin is written as before (a tmp name renamed), whole and alone."""
    store, _ = open_store(sdir)  # made here; the child opens it again
    store.close()
    tests = Path(__file__).parent
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(tests)!r})
        assert not os.path.exists("/proc/self/mounts")
        from pathlib import Path
        from test_store import SID, data, open_store
        store, _ = open_store(Path({str(sdir)!r}))
        store.pins.write(SID, data(5), fresh=True)
        store.pins.write("second", data(3), fresh=True)  # the tmp way from the start
        store.close()
    """)
    # the mount is private to the child's own mount namespace: /proc stays for everyone else
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f'{proc} && exec "$0" -c "$1"', sys.executable, child]
    seen = created_names(pins_dir(store), lambda: subprocess.run(cmd, check=True, timeout=60))
    assert [how for how, _ in seen] == ["create", "moved"] * 2
    assert seen[0][1].startswith(f".{SID}.tmp-sg-") and seen[1] == ("moved", SID)
    assert seen[2][1].startswith(".second.tmp-sg-") and seen[3] == ("moved", "second")
    assert (pins_dir(store) / SID).read_bytes() == data(5)
    assert sorted(os.listdir(pins_dir(store))) == sorted([SID, "second"])

"""Session locks: OFD range locks on one file, across processes and threads."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessionguard.errors import SessionLocked, StoreError
from sessionguard.locks import LOCK_FILE, Locks, session_byte
from sghelpers import HeldElsewhere, lockable_elsewhere

SID = "abc123def456"
#: Two ids whose lock bytes collide (found by a birthday search over "s%x" ids).
TWIN_A, TWIN_B = "s446b2", "s10eea3"


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    """The store directory (its ``lock`` file is made on the first hold)."""
    return tmp_path


def _dir_fd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@pytest.fixture(params=[False, True], ids=["fd-per-hold", "kept-fd"])
def locks(lock_path: Path, request: pytest.FixtureRequest) -> Iterator[Locks]:
    """Both ways a Locks can lock: a descriptor per hold (the daemon) and one kept
    descriptor (an embedded Guard): every test below holds for both."""
    lk = Locks(_dir_fd(lock_path), keep_open=request.param)
    yield lk
    lk.close()
    os.close(lk.store_fd)


def test_session_bytes_are_stable(lock_path: Path, locks: Locks) -> None:
    assert session_byte(SID) == session_byte(SID) >= 1
    with locks.session(SID):
        assert (lock_path / LOCK_FILE).is_file(), "one lock file for every session"
    assert os.listdir(lock_path) == [LOCK_FILE]
    assert session_byte(SID) != session_byte(SID + "x")
    assert session_byte(TWIN_A) == session_byte(TWIN_B)
    assert session_byte("\udcff") >= 1  # a surrogate-escaped name still has a byte


def test_another_process_holding_a_session_excludes_us_until_it_lets_go(lock_path: Path, locks: Locks) -> None:
    with HeldElsewhere(lock_path, SID) as holder:
        for wait in (0, 0.2):
            with pytest.raises(SessionLocked, match="another process"), locks.session(SID, wait=wait):
                pass
        with locks.session("other-session", wait=0):  # one byte each: others go on
            pass
        holder.release()
    with locks.session(SID, wait=30):
        assert not lockable_elsewhere(lock_path, SID)
    assert lockable_elsewhere(lock_path, SID)


def test_a_killed_holder_leaves_no_lock_behind(lock_path: Path, locks: Locks) -> None:
    with HeldElsewhere(lock_path, SID) as holder:
        with pytest.raises(SessionLocked), locks.session(SID, wait=0):
            pass
        holder.kill()
        assert holder.proc.exitcode == -9
        with locks.session(SID, wait=30):
            pass


def test_threads_exclude_each_other_on_one_locks_object_and_on_two(lock_path: Path, locks: Locks) -> None:
    """A read-modify-write under the lock from many threads loses no update; half the threads use a
    second Locks on its own descriptor (a second Store of the same process: only the OFD lock binds them)."""
    second = Locks(_dir_fd(lock_path))
    box = {"n": 0}
    errors: list[BaseException] = []

    def work(lk: Locks) -> None:
        try:
            for _ in range(200):
                with lk.session(SID, wait=60):
                    n = box["n"]
                    time.sleep(0)  # invite a switch between the read and the write
                    box["n"] = n + 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(lk,)) for lk in (locks, second) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    os.close(second.store_fd)
    assert not errors and box["n"] == 6 * 200


def test_a_thread_holding_the_lock_bounds_another_threads_wait(locks: Locks) -> None:
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with locks.session(SID):
            held.set()
            done.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(60)
        with pytest.raises(SessionLocked, match="busy in this process"), locks.session(SID, wait=0.05):
            pass
    finally:
        done.set()
        t.join(60)
    with locks.session(SID, wait=0):
        pass


def test_reentrant_in_one_thread_and_released_only_by_the_outermost(lock_path: Path, locks: Locks) -> None:
    with locks.session(SID):
        with locks.session(SID, wait=0), locks.session(SID):
            pass
        assert not lockable_elsewhere(lock_path, SID)  # the inner exits did not unlock the byte
    assert lockable_elsewhere(lock_path, SID)


def test_two_ids_sharing_a_byte_take_turns(lock_path: Path, locks: Locks) -> None:
    # across processes
    with HeldElsewhere(lock_path, TWIN_A), pytest.raises(SessionLocked), locks.session(TWIN_B, wait=0.05):
        pass
    # across threads of one process: the in-process half is keyed by byte, not by id
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with locks.session(TWIN_A):
            held.set()
            done.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(60)
        with pytest.raises(SessionLocked), locks.session(TWIN_B, wait=0.05):
            pass
    finally:
        done.set()
        t.join(60)
    # one thread holding both: releasing the inner twin must not unlock the outer one
    with locks.session(TWIN_A):
        with locks.session(TWIN_B):
            pass
        assert not lockable_elsewhere(lock_path, TWIN_A)
    assert lockable_elsewhere(lock_path, TWIN_B)


def test_claim_daemon_refuses_a_second_daemon(lock_path: Path, locks: Locks) -> None:
    with HeldElsewhere(lock_path, "daemon") as holder:
        with pytest.raises(StoreError, match="another sessionguardd"):
            locks.claim_daemon()
        with locks.session(SID, wait=0):  # the claim is not a session lock
            pass
        holder.release()
    locks.claim_daemon()
    locks.claim_daemon()  # the same descriptor again: still ours
    assert not lockable_elsewhere(lock_path, "daemon")
    second = Locks(_dir_fd(lock_path))
    try:
        with pytest.raises(StoreError):
            second.claim_daemon()  # a second store object in this process is a second daemon too
    finally:
        os.close(second.store_fd)


def test_a_forked_child_does_not_share_a_kept_descriptor(lock_path: Path) -> None:
    """An OFD lock does not exclude two processes holding one open file: a server that
    makes its Guard and then forks workers must still have them exclude each other.
    The child, forked after the parent opened its kept descriptor, tries the session
    while the parent holds it: it must find it locked."""
    lk = Locks(_dir_fd(lock_path), keep_open=True)
    with lk.session(SID):
        pass  # the kept descriptor is open now, and inherited by the child
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report 0 when it was kept out, 1 when it got in
        code = 2
        try:
            os.close(to_child_w)
            os.read(to_child_r, 1)  # the parent holds the session now
            try:
                with lk.session(SID, wait=0):
                    code = 1
            except SessionLocked:
                code = 0
        finally:
            os._exit(code)
    os.close(to_child_r)
    try:
        with lk.session(SID):
            os.write(to_child_w, b"x")
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(to_child_w)
        lk.close()
        os.close(lk.store_fd)
    assert os.waitstatus_to_exitcode(status) == 0, "the child got a session the parent held"
    assert lockable_elsewhere(lock_path, SID)


def _open_lock_files(lock_path: Path) -> int:
    """How many descriptors of this process are open on the store's lock file."""
    target = os.path.realpath(lock_path / LOCK_FILE)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:
            pass
    return count


def test_a_scan_shares_one_descriptor_and_never_drops_a_hold_when_it_ends(lock_path: Path) -> None:
    """``keeping()`` (a scan) shares one descriptor among its holds, and closes it when it
    ends — but not under a hold still going through it: closing the description
    would release that hold's lock behind its back."""
    lk = Locks(_dir_fd(lock_path))  # the daemon's: a descriptor per hold otherwise
    try:
        keeping = lk.keeping()
        keeping.__enter__()
        for sid in ("s1", "s2", "s3"):
            with lk.session(sid):
                assert _open_lock_files(lock_path) == 1
        hold = lk.session(SID)
        hold.__enter__()
        keeping.__exit__(None, None, None)  # the scan ends while a restore still holds SID
        assert _open_lock_files(lock_path) == 1
        assert not lockable_elsewhere(lock_path, SID), "the hold was released when the scan ended"
        hold.__exit__(None, None, None)
        assert _open_lock_files(lock_path) == 0, "the shared descriptor outlived its last hold"
        assert lockable_elsewhere(lock_path, SID)
        with lk.session(SID):  # back to a descriptor per hold
            assert _open_lock_files(lock_path) == 1
        assert _open_lock_files(lock_path) == 0
    finally:
        lk.close()
        os.close(lk.store_fd)

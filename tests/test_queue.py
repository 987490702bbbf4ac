"""The worker's queue (FIFO, a path already waiting is not queued twice and keeps its place)
and the inotify reader that fills it (in batches)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.observers.inotify_c import CallbackId, InotifyConstants, InotifyEvent, Mask, WatchDescriptor

from sessionguard.watch import BATCH_SECONDS, CoalescingQueue, InotifyReader


def blocked_in_wait(t: threading.Thread) -> None:
    """Return once *t* is inside Condition.wait (a positive marker, no fixed sleep): from then
    on it can only leave by a notify or its timeout."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(t.ident or -1)
        while frame is not None:
            if frame.f_code.co_name == "wait" and frame.f_code.co_filename == threading.__file__:
                return
            frame = frame.f_back
        time.sleep(0.001)
    raise AssertionError(f"{t.name} never started waiting")


def drain(q: CoalescingQueue) -> list[str]:
    out = []
    while (item := q.get(0)) is not None:
        out.append(item)
    return out


def test_fifo_and_coalescing_keeps_the_first_position() -> None:
    q = CoalescingQueue()
    for p in ("/d/a.json", "/d/b.json", "/d/a.json", "/d/c.json", "/d/b.json", "/d/a.json"):
        q.put(p)
    assert len(q) == 3
    assert drain(q) == ["/d/a.json", "/d/b.json", "/d/c.json"]
    assert len(q) == 0


def test_a_path_taken_off_the_queue_can_be_queued_again() -> None:
    q = CoalescingQueue()
    q.put("/d/a.json")
    q.put("/d/b.json")
    assert q.get(0) == "/d/a.json"
    q.put("/d/a.json")  # a new write after the worker took the old one: must be seen again
    assert drain(q) == ["/d/b.json", "/d/a.json"]


def test_get_times_out_empty() -> None:
    q = CoalescingQueue()
    assert q.get(0) is None
    assert q.get(0.05) is None


def test_a_waiting_get_returns_what_another_thread_puts() -> None:
    q = CoalescingQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(3600)), daemon=True)
    t.start()
    blocked_in_wait(t)
    q.put("/d/x.json")
    t.join(30)
    assert not t.is_alive() and got == ["/d/x.json"]


def test_close_wakes_every_waiter_and_later_gets_do_not_wait() -> None:
    q = CoalescingQueue()
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda: results.append(q.get(3600)), daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
        blocked_in_wait(t)  # would wait an hour without close()
    q.close()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and results == [None, None, None]
    done = threading.Thread(target=lambda: results.append(q.get(3600)), daemon=True)
    done.start()
    done.join(30)
    assert not done.is_alive()


def test_items_queued_before_close_are_still_delivered() -> None:
    q = CoalescingQueue()
    q.put("/d/a.json")
    q.close()
    assert q.get(3600) == "/d/a.json" and q.get(3600) is None


def test_many_producers_lose_nothing() -> None:
    q = CoalescingQueue()
    paths = [f"/d/{i}.json" for i in range(200)]

    def produce(offset: int) -> None:
        for i in range(len(paths)):
            q.put(paths[(i + offset) % len(paths)])

    threads = [threading.Thread(target=produce, args=(k * 50,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = drain(q)
    assert sorted(got) == sorted(paths) and len(got) == len(set(got))


class _Names:
    """A watchdog ``WatchCallback`` that records the names it is told of."""

    def __init__(self) -> None:
        self.names: list[bytes] = []
        self.seen = threading.Condition()

    def on_event(self, event: InotifyEvent) -> None:
        with self.seen:
            self.names.append(event.name)
            self.seen.notify_all()

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        pass

    def on_queue_overflow(self) -> None:
        pass

    def wait_for(self, name: bytes) -> None:
        with self.seen:
            assert self.seen.wait_for(lambda: name in self.names, 30), f"{name!r} never came"


class _Recording(InotifyReader):
    """The reader, remembering the names each read brought (one list per read)."""

    def __init__(self, batch_s: float = BATCH_SECONDS, queued: Callable[[], int] | None = None) -> None:
        super().__init__(batch_s, queued)
        self.reads: list[list[bytes]] = []

    def read_events(self, *, event_buffer_size: int = 64 * 1024) -> list[InotifyEvent]:
        events = super().read_events(event_buffer_size=event_buffer_size)
        self.reads.append([e.name for e in events])
        return events


@contextlib.contextmanager
def reading(reader: _Recording, folder: Path, names: _Names) -> Iterator[None]:
    """*reader* running, telling *names* of every file made in *folder*; stopped after."""
    reader.add_callback(os.fsencode(folder), Mask(InotifyConstants.IN_CREATE), names, CallbackId(1))
    reader.start()
    try:
        yield
    finally:
        reader.stop()
        reader.join(30)


def test_the_reader_takes_what_came_during_its_pause_in_one_read(tmp_path: Path) -> None:
    """After a batch the reader pauses, and the next read takes every event of the pause:
    three files made 20 ms apart arrive in one read, where a reader that reads as soon as
    anything is there (watchdog's own loop) takes the first alone."""
    reader, names = _Recording(batch_s=1.0), _Names()
    with reading(reader, tmp_path, names):
        (tmp_path / "a").touch()
        names.wait_for(b"a")  # handled: the reader now pauses for a second
        for name in ("b", "c", "d"):
            (tmp_path / name).touch()
            time.sleep(0.02)
        names.wait_for(b"d")
    assert [b"b", b"c", b"d"] in reader.reads, reader.reads
    assert names.names == [b"a", b"b", b"c", b"d"]


def test_a_steady_stream_wakes_the_reader_at_most_once_per_pause(tmp_path: Path) -> None:
    """The default pause bounds the reader's wake-ups whatever the event rate: files made
    one every millisecond or so for a second are read in at most one read per
    ``BATCH_SECONDS`` (plus the first), where a reader that pauses 2 ms reads hundreds
    of times. (A slow machine makes fewer reads, never more: the bound is the sleep.)"""
    reader, names = _Recording(), _Names()
    with reading(reader, tmp_path, names):
        started = time.monotonic()
        made = 0
        while time.monotonic() - started < 1.0:
            (tmp_path / f"f{made}").touch()
            made += 1
            time.sleep(0.001)
        names.wait_for(f"f{made - 1}".encode())
        seconds = time.monotonic() - started
    assert len(names.names) == made
    assert made > 3 * seconds / BATCH_SECONDS, f"only {made} files made: the stream was not steady enough to tell"
    assert len(reader.reads) <= seconds / BATCH_SECONDS + 2, (len(reader.reads), made, seconds)


def test_a_batch_that_queued_nothing_is_not_followed_by_a_pause(tmp_path: Path) -> None:
    """A writer's tmp file made after a quiet spell queues nothing: the reader reads the next
    event (the rename a write is about) at once, not after its pause. Here a file that
    queues nothing, then three 20 ms apart: the first of them comes in a read of its own
    (no pause after the first file), the next two together (the pause after it)."""
    queued = 0

    class Queueing(_Names):
        def on_event(self, event: InotifyEvent) -> None:
            nonlocal queued
            if event.name != b"tmp":
                queued += 1
            super().on_event(event)

    reader, names = _Recording(batch_s=1.0, queued=lambda: queued), Queueing()
    with reading(reader, tmp_path, names):
        (tmp_path / "tmp").touch()
        names.wait_for(b"tmp")
        for name in ("b", "c", "d"):
            (tmp_path / name).touch()
            time.sleep(0.02)
        names.wait_for(b"d")
    assert reader.reads[-2:] == [[b"b"], [b"c", b"d"]], reader.reads

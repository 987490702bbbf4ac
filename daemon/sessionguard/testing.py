"""Helpers for a server's own test suite: "no save lost messages", and a crash in the middle of a save.

A server that embeds the guard (or runs next to the daemon) wants its tests to
fail when a code path loses messages — as the seed's metadata-only save did
for months — and to exercise its start-up recovery after a crash, without
mocking anything (``structlog.testing`` exists for the same reason).

* :func:`no_unintended_loss` — a context manager (and, with
  ``pytest_plugins = ["sessionguard.testing"]`` in the root ``conftest.py``,
  a pytest fixture of the same name) that raises ``AssertionError`` naming
  the session when a write inside it lost messages without intent.
* :func:`kill_before_rename` / :func:`crash_guard_save` — run a save in a
  child and ``SIGKILL`` it after its temporary file is written, before the
  rename: what a power cut or the OOM killer leaves.

**What** :func:`no_unintended_loss` **sees.** It reads the session directory
and the store from disk when the block starts and when it ends, so writers in
any process count, not only this one:

1. every version kept during the block for a loss (``shrink``,
   ``unparseable``, ``replaced``; ``deleted`` with ``allow_delete=False``) by
   a guard in any process or by the daemon — each save that lost messages
   through the guard or under the daemon's eye, one by one;
2. every session file that changed during the block and now holds fewer
   messages than its last known state — the pin when a guard or the daemon
   moved it during the block and it is not the live file itself, else the
   file as it was when the block began — without a changed intent key: a
   writer that bypassed every guard. Only the final state of such a file is
   seen (a wipe rewritten before the block ends is missed unless the daemon
   watched it: then it is a version, case 1).

A refused save is not a loss (nothing was written), nor is an intended shrink
(``allow_shrink=True`` or a changed intent key), nor a restore. The daemon
works asynchronously: call its ``sync`` before the block ends.

Only the standard library is imported (pytest only inside pytest's own hook).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import fsutil
from .config import DEFAULT_INTENT_KEYS
from .count import DEFAULT_MAX_BYTES, CountSpec, Parsed, parse
from .naming import LOSS_REASONS, Matcher, Version, parse_version_name
from .rules import intent_changed, is_loss
from .store import STORE_DIRNAME

__all__ = ["Crash", "Loss", "LossWatch", "crash_guard_save", "kill_before_rename", "no_unintended_loss"]

#: A file's identity as far as "did it change?" goes.
_Ident = tuple[int, int, int, int]


@dataclass(frozen=True)
class Loss:
    """One unintended loss: the session, its message counts (None: unknown, unparseable or gone), what was seen."""

    sid: str
    before: int | None
    after: int | None
    what: str

    def __str__(self) -> str:
        return f"session {self.sid!r}: {self.what}"


@dataclass(frozen=True)
class _Seen:
    """What the directory and the store held at one moment."""

    live: dict[str, tuple[_Ident, bytes]] = field(default_factory=dict)
    pins: dict[str, _Ident] = field(default_factory=dict)
    versions: frozenset[tuple[str, str]] = frozenset()


class LossWatch:
    """Watches one session directory (and its store) from :meth:`start` to :meth:`check`.

    *store* defaults to ``<directory>/.sessionguard``; *count*, *suffix* and
    *intent_keys* must be what the server's guard uses. With *allow_delete*
    (the default) a deleted session is not a loss: a delete is not a save.
    Every session file is read at the start and at each check (files over
    *max_bytes*, symlinks and other non-regular files are skipped, as the
    guard skips them): it is meant for test directories, not production ones.
    """

    def __init__(self, directory: str | os.PathLike[str], *, store: str | os.PathLike[str] | None = None,
                 count: str = "messages", suffix: str = ".json",
                 intent_keys: Sequence[str] = DEFAULT_INTENT_KEYS, allow_delete: bool = True,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.store = os.path.abspath(os.fspath(store)) if store is not None else \
            os.path.join(self.directory, STORE_DIRNAME)
        self.spec = CountSpec.parse(count)
        self.matcher = Matcher(f"*{suffix}")
        self.intent_keys = tuple(intent_keys)
        self.allow_delete = allow_delete
        self.max_bytes = max_bytes
        self._start: _Seen | None = None

    def start(self) -> LossWatch:
        """Remember the directory and the store as they are now."""
        self._start = self._look()
        return self

    def losses(self) -> list[Loss]:
        """Every unintended loss since :meth:`start`, oldest version first, then files by id."""
        if self._start is None:
            raise RuntimeError("LossWatch.losses() before start()")
        begin, now = self._start, self._look()
        found = [self._from_version(v) for v in self._new_versions(begin, now)]
        for sid in sorted(set(begin.live) | set(now.live)):
            loss = self._from_files(sid, begin, now)
            if loss is not None:
                found.append(loss)
        return found

    def check(self) -> None:
        """Raise ``AssertionError`` naming every session that lost messages without intent."""
        __tracebackhide__ = True
        found = self.losses()
        if found:
            lines = "\n  ".join(str(loss) for loss in found)
            raise AssertionError(f"{len(found)} unintended loss(es) in {self.directory}:\n  {lines}")

    def __enter__(self) -> LossWatch:
        return self.start() if self._start is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:  # an exception already failing the block says more than this check
            self.check()

    # -- judging -----------------------------------------------------------------------

    def _new_versions(self, begin: _Seen, now: _Seen) -> list[Version]:
        fresh = []
        for sid, name in now.versions - begin.versions:
            version = parse_version_name(sid, name, 0)
            if version is None or version.reason not in LOSS_REASONS:
                continue
            if version.reason == "deleted" and self.allow_delete:
                continue
            fresh.append(version)
        return sorted(fresh, key=lambda v: (v.created, v.name))

    @staticmethod
    def _from_version(v: Version) -> Loss:
        held = "unparseable content" if v.count is None else f"{v.count} messages"
        return Loss(v.sid, v.count, None, f"a write lost messages: the {held} it replaced were kept as a "
                                          f"{v.reason!r} version by the {v.source} ({v.name})")

    def _from_files(self, sid: str, begin: _Seen, now: _Seen) -> Loss | None:
        was, is_now = begin.live.get(sid), now.live.get(sid)
        if is_now is None:
            if was is None or self.allow_delete:
                return None
            before = parse(was[1], self.spec).count
            return Loss(sid, before, None, f"{before} → no file: deleted")
        if was is not None and was[0] == is_now[0]:
            return None  # not written during the block
        pin = now.pins.get(sid)
        reference: Parsed | None = None
        than = "the file when the block began"
        if pin is not None and pin[:2] == is_now[0][:2]:
            if was is None or was[0][:2] != is_now[0][:2]:
                return None  # a guard wrote this file (its pin is the file): its losses are versions
            # else rewritten in place, pin and all: only the start of the block is left to compare with
        elif pin is not None and pin != begin.pins.get(sid):
            reference = self._read_pin(sid)
            than = "the last version a guard or the daemon saw"
        if reference is None and was is not None:
            reference = parse(was[1], self.spec)
        if reference is None:
            return None
        live = parse(is_now[1], self.spec)
        if not is_loss(reference.count, live.count) or intent_changed(reference.doc, live.doc, self.intent_keys):
            return None
        return Loss(sid, reference.count, live.count, f"{reference.count} → {live.count} messages, written "
                                                     f"without the guard (compared with {than})")

    # -- reading the disk ----------------------------------------------------------------

    def _look(self) -> _Seen:
        root = fsutil.open_root(self.directory)
        try:
            live = self._sessions(root)
        finally:
            os.close(root)
        try:
            store = fsutil.open_root(self.store)
        except FileNotFoundError:
            return _Seen(live)
        try:
            return _Seen(live, self._pins(store), self._versions(store))
        finally:
            os.close(store)

    def _sessions(self, root: int) -> dict[str, tuple[_Ident, bytes]]:
        out = {}
        for name in os.listdir(root):
            sid, _ = self.matcher.identify((name,))
            if sid is None:
                continue
            try:
                data, st = fsutil.read_regular(name, self.max_bytes, dir_fd=root)
            except OSError:
                continue  # gone meanwhile, not a regular file, too large: the guard never reads it either
            out[sid] = (_ident(st), data)
        return out

    @staticmethod
    def _pins(store: int) -> dict[str, _Ident]:
        out: dict[str, _Ident] = {}
        with _opened("pins", store) as pins:
            for name in os.listdir(pins) if pins is not None else ():
                with contextlib.suppress(FileNotFoundError):  # moved meanwhile
                    st = os.stat(name, dir_fd=pins, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        out[name] = _ident(st)
        return out

    @staticmethod
    def _versions(store: int) -> frozenset[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        with _opened("sessions", store) as sessions:
            if sessions is None:
                return frozenset()
            for sid in os.listdir(sessions):
                with _opened(sid, sessions) as folder:
                    if folder is not None:
                        out.update((sid, name) for name in os.listdir(folder) if name.endswith(".version"))
        return frozenset(out)

    def _read_pin(self, sid: str) -> Parsed | None:
        store = fsutil.open_root(self.store)
        try:
            with _opened("pins", store) as pins, contextlib.suppress(OSError):
                if pins is not None:
                    return parse(fsutil.read_regular(sid, self.max_bytes, dir_fd=pins)[0], self.spec)
        finally:
            os.close(store)
        return None


@contextlib.contextmanager
def _opened(name: str, at: int) -> Iterator[int | None]:
    """The directory *name* in the directory *at* (never through a symlink), or None if there is none."""
    try:
        fd = fsutil.open_dir(name, at=at)
    except OSError:  # missing, a symlink, not a directory
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _ident(st: os.stat_result) -> _Ident:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def no_unintended_loss(directory: str | os.PathLike[str], **options: Any) -> Iterator[LossWatch]:
    """``with no_unintended_loss(session_dir): …`` fails with ``AssertionError`` naming every session
    a write inside the block shrank without intent (see the module's docstring for what is seen).

    *options* are :class:`LossWatch`'s (``store``, ``count``, ``suffix``,
    ``intent_keys``, ``allow_delete``). The block's own exception, if any,
    is raised instead of the check.
    """
    with LossWatch(directory, **options) as watch:
        yield watch


# -- a crash between the write and the rename ---------------------------------------------------

@dataclass(frozen=True)
class Crash:
    """A save killed at its rename: the child's pid and the new files (not directories) it left in the
    target's directory — its temporary file, typically."""

    pid: int
    left: list[str]


def kill_before_rename(save: Callable[[], object], target: str | os.PathLike[str], *,
                       timeout: float = 30.0) -> Crash:
    """Run *save* in a forked child and ``SIGKILL`` it when it is about to rename (or link) a file
    onto *target*: its temporary file is written (and synced, if *save* syncs), the rename never happens.

    That is the window an atomic save exists for; a server's tests use this to
    check that start-up recovery copes with what is left (the old file intact,
    a stray temporary file). The child is a fork: *save* sees a copy of this
    process, but shares its open descriptors and their locks — let *save* open
    what it writes with (``Guard(...)`` inside it, not one made here). The
    child's ``os.rename``, ``os.replace`` and ``os.link`` are where it stops (a
    rename made through the C library directly is not seen). Raises
    ``AssertionError`` if *save* returns, raises or hangs before the rename.
    """
    target = os.path.abspath(os.fspath(target))
    folder, name = os.path.split(target)
    before = _files(folder)
    ready, report = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(ready)
        _child(save, folder, name, report)
    os.close(report)
    try:
        readable, _, _ = select.select([ready], [], [], timeout)
        what = os.read(ready, 4096) if readable else b""
    finally:
        os.close(ready)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if what != b"R":
        raise AssertionError(f"the save never reached the rename onto {target}: "
                             f"{what.decode(errors='replace') or 'no answer within the timeout'}")
    return Crash(pid, sorted(_files(folder) - before))


def _files(folder: str) -> set[str]:
    with os.scandir(folder) as entries:
        return {e.name for e in entries if not e.is_dir(follow_symlinks=False)}


def _child(save: Callable[[], object], folder: str, name: str, report: int) -> None:
    """Stop at the rename onto *folder*/*name*: tell the parent, then wait to be killed."""
    where = os.stat(folder)

    def onto_target(dst: Any, dst_dir_fd: int | None) -> bool:
        path = os.fsdecode(dst)
        if os.path.basename(path) != name:
            return False
        if os.path.isabs(path) or dst_dir_fd is None:
            home = os.stat(os.path.dirname(os.path.abspath(path)))
        else:
            home = os.fstat(dst_dir_fd)
        return (home.st_dev, home.st_ino) == (where.st_dev, where.st_ino)

    def stop_at(real: Callable[..., None]) -> Callable[..., None]:
        def call(src: Any, dst: Any, *args: Any, dst_dir_fd: int | None = None, **kw: Any) -> None:
            if onto_target(dst, dst_dir_fd):
                os.write(report, b"R")
                while True:
                    signal.pause()
            real(src, dst, *args, dst_dir_fd=dst_dir_fd, **kw)
        return call

    try:
        os.rename, os.replace, os.link = stop_at(os.rename), stop_at(os.replace), stop_at(os.link)
        save()
        os.write(report, b"the save returned")
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(report, f"the save raised {type(exc).__name__}: {exc}".encode()[:4000])
    finally:
        os._exit(1)


def crash_guard_save(directory: str | os.PathLike[str], sid: str, data: bytes, *, count: int | None = None,
                     **guard_options: Any) -> Crash:
    """A ``Guard(directory, **guard_options).save_bytes(sid, data, count=count)`` killed at its rename.

    The live file stays as it was and the guard's temporary file (named with
    the dead child's pid) is left in *directory*; the next
    ``recover_on_startup`` removes it. A shrinking save has already kept the
    prior version when it dies. The store is opened (made, if missing) here
    first, as a server's start would, to learn the session's file name.
    """
    from .guard import Guard

    probe = Guard(directory, **guard_options)
    try:
        target = probe.path(sid)
    finally:
        probe.close()

    def save() -> None:
        Guard(directory, **guard_options).save_bytes(sid, data, count=count)

    return kill_before_rename(save, target)


# -- pytest ------------------------------------------------------------------------------------

def pytest_configure(config: Any) -> None:
    """pytest's hook when this module is a plugin (``pytest_plugins = ["sessionguard.testing"]``):
    registers the ``no_unintended_loss`` fixture. pytest is imported only here."""
    import pytest

    watched = pytest.StashKey[list[LossWatch]]()

    class _Fixtures:
        @pytest.fixture
        def no_unintended_loss(self, request: Any) -> Iterator[Callable[..., LossWatch]]:
            """``no_unintended_loss(session_dir, **options)`` starts watching *session_dir*: the test
            fails if a write lost messages without intent by the end of its body; writes made later
            (a server fixture flushing at teardown) fail it at teardown."""
            watches: list[LossWatch] = []
            request.node.stash[watched] = watches

            def watch(directory: str | os.PathLike[str], **options: Any) -> LossWatch:
                started = LossWatch(directory, **options).start()
                watches.append(started)
                return started

            yield watch
            problems = _report(watches)
            if problems:
                pytest.fail(f"at teardown, {problems}", pytrace=False)

        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_call(self, item: Any) -> Iterator[None]:
            __tracebackhide__ = True
            result = yield  # the test body; its own failure propagates unchanged
            problems = _report(item.stash.get(watched, []))
            if problems:
                raise AssertionError(problems)
            return result

    config.pluginmanager.register(_Fixtures(), "sessionguard.testing.fixtures")


def _report(watches: Sequence[LossWatch]) -> str:
    """Every watch's losses as one message ("" if none); each watch restarts from now, so a
    later check reports only what happens after this one."""
    problems = []
    for started in watches:
        problems += [f"{started.directory}: {loss}" for loss in started.losses()]
        started.start()
    if not problems:
        return ""
    return f"{len(problems)} unintended loss(es):\n  " + "\n  ".join(problems)

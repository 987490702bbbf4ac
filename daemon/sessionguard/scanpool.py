"""A first start's new pins, made by worker processes: the part of a scan that scales with cores.

A first start without ``pins.cache`` opens, reads, parses and pins every
session: on a 2-CPU machine ~200 µs of CPU a file, nearly all of it in one
interpreter, and threads were measured no faster (the GIL changes hands at
every system call; BENCHMARKS.md). Once a scan has pinned
:data:`SERIAL_FIRST` sessions itself, it hands the rest of the sessions it
listed without a pin to child processes (``python -m sessionguard.scanpool``),
in batches of names. Each child is given the watch's and the store's checked
descriptors (``pass_fds``: no path is resolved again, nothing is trusted
that the parent did not check) and pins each session with
:func:`~sessionguard.tracker.pin_new`, answering what the daemon is to
remember of it, or None for anything but a plain new pin. The daemon
evaluates those itself, so logs, counters, captures and skips stay in one
process, and a child writes nothing but new pins, exactly as the daemon would.

A child dies with the daemon (``PR_SET_PDEATHSIG``), so a killed start leaves
nobody writing, and ignores the stop signals its process group gets (the
daemon ends the scan and closes its input); a pin is linked under its name
only once whole, so a kill at any point leaves none torn. A child that fails
(killed, out of memory) hands back every name it had not answered, and the
daemon pins those itself.
"""

from __future__ import annotations

import collections
import ctypes
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from .config import WatchConfig
from .store import Store
from .tracker import pin_new
from .watchstate import Tracked, WatchState

#: Sessions a scan pins itself before it starts processes: a child costs ~0.1–0.2 s to
#: start (an interpreter and its imports), a few hundred sessions' work.
SERIAL_FIRST = 1000
#: Names per message to a child, and messages a child may have unanswered.
BATCH = 256
_IN_FLIGHT = 2
#: At most this many processes, whatever the CPUs (the store's directory is shared by all).
MAX_PROCESSES = 4
_PR_SET_PDEATHSIG = 1
#: What systemd gives the daemon alone (a child never notifies, nor takes the socket).
_PARENTS_ONLY = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                           "LISTEN_FDNAMES"})

Item = tuple[tuple[str, ...], str]  # (parts, sid)
#: Told each item's answer: the pin's Tracked, or None (the daemon evaluates it itself).
Answer = Callable[[tuple[str, ...], str, "Tracked | None"], None]


def processes_for(setting: int) -> int:
    """How many processes a scan may start: *setting* (``scan_processes``), where 0
    means one per CPU the daemon may run on, at most :data:`MAX_PROCESSES`, and 1 (or a
    single CPU) means none: the daemon pins every session itself."""
    if setting == 0:
        setting = min(len(os.sched_getaffinity(0)), MAX_PROCESSES)
    return setting if setting > 1 else 0


@dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    stdin: IO[bytes]
    stdout: IO[bytes]
    pending: collections.deque[list[Item]]
    answered: int = 0
    failed: bool = False


class Pool:
    """The processes one scan of one watch pins with; :meth:`submit` names, :meth:`finish`."""

    def __init__(self, children: list[_Child], answer: Answer, log: Any, where: str) -> None:
        self._children = children
        self._answer = answer
        self._log = log
        self._where = where
        self._batch: list[Item] = []

    @classmethod
    def start(cls, ws: WatchState, processes: int, answer: Answer, log: Any) -> Pool | None:
        """*processes* children for *ws*; None (logged) when not one could be started."""
        store = ws.store
        assert store is not None and ws.root_fd is not None
        setup = {"cfg": ws.cfg, "root_fd": ws.root_fd, "root_uid": ws.root_uid, "root_dev": ws.root_dev,
                 "root_ident": ws.root_ident, "pin_method": ws.pin_method, "parent_fd": store.parent_fd,
                 "store_fd": store.fd, "store_name": store.name, "where": store.where, "owner": store.owner,
                 "max_bytes": store.max_bytes, "ppid": os.getpid()}
        env = {k: v for k, v in os.environ.items() if k not in _PARENTS_ONLY}
        children: list[_Child] = []
        for _ in range(processes):
            try:
                # unbuffered (bufsize=0): select() on a child's pipe then sees every answer it wrote
                proc = subprocess.Popen([sys.executable, "-m", "sessionguard.scanpool"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, close_fds=True, bufsize=0,
                                        pass_fds=(ws.root_fd, store.parent_fd, store.fd))
            except OSError as exc:
                log.warning("scan.processes_failed", watch=ws.root, started=len(children), error=str(exc),
                            hint="the scan goes on with the processes started (none: the daemon pins alone)")
                break
            assert proc.stdin is not None and proc.stdout is not None
            child = _Child(proc, proc.stdin, proc.stdout, collections.deque())
            children.append(child)
            try:
                _send(child.stdin, setup)
            except OSError:
                pass  # it died at once: its first batch finds out and says why (scan.process_failed)
        if not children:
            return None
        log.info("scan.processes", watch=ws.root, processes=len(children), pids=[c.proc.pid for c in children])
        return cls(children, answer, log, ws.root)

    @property
    def pids(self) -> list[int]:
        """The children's process ids."""
        return [c.proc.pid for c in self._children]

    @property
    def answered(self) -> dict[int, int]:
        """How many names each child (by pid) has answered so far."""
        return {c.proc.pid: c.answered for c in self._children}

    def submit(self, parts: tuple[str, ...], sid: str) -> None:
        self._batch.append((parts, sid))
        if len(self._batch) >= BATCH:
            self._dispatch()

    def finish(self) -> None:
        """Every name submitted is answered (by a child or, for a failed one, by None);
        the children are gone."""
        if self._batch:
            self._dispatch()
        for child in self._children:
            _close(child.stdin)
            while child.pending:
                self._collect(child)
            if child.proc.wait() != 0 and not child.failed:  # one that died with nothing in hand
                self._failed(child, "ended with nothing unanswered")
            _close(child.stdout)

    def _dispatch(self) -> None:
        batch, self._batch = self._batch, []
        while True:
            live = [c for c in self._children if c.proc.returncode is None]
            if not live:
                for parts, sid in batch:  # every child failed: the daemon does it
                    self._answer(parts, sid, None)
                return
            child = min(live, key=lambda c: len(c.pending))
            if len(child.pending) >= _IN_FLIGHT:  # all busy: take the first answer any gives
                ready, _, _ = select.select([c.stdout for c in live], [], [])
                self._collect(next(c for c in live if c.stdout in ready))
                continue
            try:
                _send(child.stdin, batch)
            except OSError as exc:
                self._failed(child, str(exc))
                continue
            child.pending.append(batch)
            return

    def _collect(self, child: _Child) -> None:
        """The answer to *child*'s oldest batch (blocking), handed on."""
        batch = child.pending[0]
        try:
            answers = _receive(child.stdout)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
            self._failed(child, str(exc) or type(exc).__name__)
            return
        if not isinstance(answers, list) or len(answers) != len(batch):
            self._failed(child, "an answer that does not match its batch")
            return
        child.pending.popleft()
        child.answered += len(batch)
        for (parts, sid), fields in zip(batch, answers, strict=True):
            self._answer(parts, sid, Tracked(*fields) if fields is not None else None)

    def _failed(self, child: _Child, why: str) -> None:
        """*child* is no use: killed, and its unanswered names answered None."""
        child.failed = True
        if child.proc.returncode is None:
            child.proc.kill()
        status = child.proc.wait()
        self._log.warning("scan.process_failed", watch=self._where, pid=child.proc.pid, status=status, why=why,
                          hint="the daemon pins its sessions itself")
        _close(child.stdin)
        _close(child.stdout)
        while child.pending:
            for parts, sid in child.pending.popleft():
                self._answer(parts, sid, None)


def _close(f: IO[bytes]) -> None:
    try:
        f.close()
    except OSError:
        pass  # a dead child's pipe


def _send(f: IO[bytes], obj: Any) -> None:
    """One message: its length, then its pickle (the pipe may take it in parts)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        written = f.write(view)
        if written is None:  # only a non-blocking pipe says so; ours block
            raise BlockingIOError("a scan process's pipe would block")
        view = view[written:]
    f.flush()


def _receive(f: IO[bytes]) -> Any:
    (size,) = struct.unpack(">I", _exactly(f, 4))
    return pickle.loads(_exactly(f, size))


def _exactly(f: IO[bytes], size: int) -> bytes:
    """*size* bytes from *f*, over as many reads as an unbuffered pipe takes."""
    parts: list[bytes] = []
    while size:
        part = f.read(size)
        if not part:
            raise EOFError("the process ended")
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


# -- the child ---------------------------------------------------------------------


def _watch(setup: dict[str, Any]) -> WatchState:
    """The parent's watch, rebuilt on the descriptors it passed (checked by the parent)."""
    cfg: WatchConfig = setup["cfg"]
    ws = WatchState(cfg)
    ws.root_fd, ws.root_uid, ws.root_dev = setup["root_fd"], setup["root_uid"], setup["root_dev"]
    ws.root_ident, ws.pin_method = setup["root_ident"], setup["pin_method"]
    ws.store = Store(setup["parent_fd"], setup["store_name"], setup["store_fd"], where=setup["where"],
                     owner=setup["owner"], max_bytes=setup["max_bytes"], retention=cfg.retention)
    return ws


def child_main() -> int:
    """Pin the batches read from stdin, answer each on stdout; end at the end of stdin."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not land in the answers
    inp = sys.stdin.buffer
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # A stop signals the whole group (systemd's cgroup, a terminal's Ctrl-C): the daemon
    # ends its scan and closes our input; we end with it, answers given, or die with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup = _receive(inp)
    if os.getppid() != setup["ppid"]:
        return 1  # the daemon died before we asked to die with it
    ws = _watch(setup)
    assert ws.store is not None
    with ws.store.locks.keeping():
        while True:
            try:
                batch = _receive(inp)
            except EOFError:
                return 0
            answers: list[tuple[int, int | None, int, int, int] | None] = []
            for parts, sid in batch:
                t = pin_new(ws, parts, sid)
                answers.append(None if t is None else (t.key, t.count, t.first, t.prev, t.pin))
            _send(out, answers)


if __name__ == "__main__":
    sys.exit(child_main())

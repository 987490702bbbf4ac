"""The naive design sessionguard's daemon is compared with: copy on every close/rename.

A watchdog observer on one directory; whenever a ``*.json`` file is closed
after writing, or a file is renamed onto a ``*.json`` name, the whole file is
copied into a backup directory under a new name (and fsynced, as the daemon
fsyncs its pins). No pins, no counting, no deduplication: every version kept.

Protocol (for benchmarks/bench.py): prints ``ready`` once watching; when a
file named ``.naive-sync-<token>`` is created in the watched directory it
prints ``synced <token>`` after every earlier event has been handled (the
observer delivers events of one directory in order, on one thread).

    python benchmarks/naive_watcher.py WATCH_DIR BACKUP_DIR
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys

from watchdog.events import FileClosedEvent, FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer

COOKIE = ".naive-sync-"


class CopyEverything(FileSystemEventHandler):
    def __init__(self, backup: str) -> None:
        self.backup = backup
        self.n = itertools.count()

    def _copy(self, path: str) -> None:
        dst = os.path.join(self.backup, f"{os.path.basename(path)}.{next(self.n):08d}")
        try:
            shutil.copyfile(path, dst)
        except FileNotFoundError:
            return  # replaced again meanwhile; the next event copies the newer file
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def on_any_event(self, event) -> None:  # type: ignore[no-untyped-def]
        if isinstance(event, FileCreatedEvent):
            name = os.path.basename(os.fsdecode(event.src_path))
            if name.startswith(COOKIE):
                print(f"synced {name[len(COOKIE):]}", flush=True)
        elif isinstance(event, FileClosedEvent):
            path = os.fsdecode(event.src_path)
            if path.endswith(".json"):
                self._copy(path)
        elif isinstance(event, FileMovedEvent):
            path = os.fsdecode(event.dest_path)
            if path.endswith(".json"):
                self._copy(path)


def main() -> int:
    watch, backup = sys.argv[1], sys.argv[2]
    os.makedirs(backup, exist_ok=True)
    observer = Observer()
    observer.schedule(CopyEverything(backup), watch, recursive=False,
                      event_filter=[FileCreatedEvent, FileClosedEvent, FileMovedEvent])
    observer.start()
    print("ready", flush=True)
    try:
        for _ in sys.stdin:  # runs until stdin closes
            pass
    finally:
        observer.stop()
        observer.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

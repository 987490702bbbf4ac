"""The daemon's spare pin inodes: which sessions have one, within bounds.

:class:`~.pins.Pins` writes a session's next pin over its spare (the pin before
last) and swaps it in; this keeps the books — names, least recently used first,
count and bytes — so the folder never holds more spares than the bounds allow.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from . import fsutil

SPARE_SUFFIX = "-spare"


class Spares:
    """This process's spare pin inodes (see :mod:`.pins`): which sessions have
    one, least recently used first, at most *limit* of them holding *max_bytes*.

    A name carries the pid, so the tmp sweep leaves it alone while this process lives
    and removes it after. A later daemon that gets the same pid (a container's pid 1)
    finds a killed one's spares under the names it would use, and reuses them."""

    def __init__(self, limit: int = 1024, max_bytes: int = 64 << 20) -> None:
        self.limit, self.max_bytes = limit, max_bytes
        self._mark = f"{fsutil.TMP_MARK}{os.getpid()}{SPARE_SUFFIX}"
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def name(self, sid: str) -> str | None:
        """The spare's name for *sid*; None when it would be too long for a file name."""
        name = f".{sid}{self._mark}"
        return name if len(os.fsencode(name)) <= 255 else None

    def claim(self, sid: str) -> str | None:
        """*sid*'s spare name, marked most recently used (never the one dropped next)."""
        name = self.name(sid)
        if name is None:
            return None
        with self._lock:
            self._sizes[sid] = self._sizes.get(sid, 0)
            self._sizes.move_to_end(sid)
        return name

    def settle(self, sid: str, size: int) -> list[str]:
        """*sid*'s spare now holds *size* bytes; the names of the spares dropped to stay
        within bounds (the caller unlinks them)."""
        with self._lock:
            if sid in self._sizes:
                self._bytes += size - self._sizes[sid]
                self._sizes[sid] = size
            return self._trim()

    def release(self, sid: str) -> None:
        """Forget *sid*'s spare (the caller unlinks it)."""
        with self._lock:
            self._bytes -= self._sizes.pop(sid, 0)

    def clear(self) -> list[str]:
        """Forget every spare; their names, for the caller to unlink."""
        with self._lock:
            sids = list(self._sizes)
            self._sizes.clear()
            self._bytes = 0
        return [name for sid in sids if (name := self.name(sid)) is not None]

    def _trim(self) -> list[str]:
        gone = []
        while len(self._sizes) > 1 and (len(self._sizes) > self.limit or self._bytes > self.max_bytes):
            sid, size = self._sizes.popitem(last=False)
            self._bytes -= size
            name = self.name(sid)
            if name is not None:
                gone.append(name)
        return gone

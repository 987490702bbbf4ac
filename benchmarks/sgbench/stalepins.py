"""Run sessionguardd writing each session's pin at most every 2 s (a benchmark control, never for use).

Used as ``DaemonProc(wrap=[python, this file])``, like :mod:`nocheck`: the rest of
the command line is ``<python> -m sessionguard.daemon ARGS``, and this runs the same
``main(ARGS)`` after replacing ``Pins.write`` by one that, for a session whose pin
it wrote less than :data:`EVERY` seconds ago, writes nothing and answers with the
pin as it is. Everything else — the event, the read, the parse, the rules, the
lock — is the real daemon's. Under 2a's small load (each of 200 sessions written
every ~0.2 s) it writes about one pin in ten: what the writer gains from a daemon
that writes fewer pins. Its pins lag the sessions by up to two seconds, so a loss
in that time would keep an older version: a control, not a design.
"""

from __future__ import annotations

import os
import sys
import time

from sessionguard import daemon
from sessionguard.pins import Pins

EVERY = 2.0

_write = Pins.write
_last: dict[str, float] = {}


def _seldom(self: Pins, sid: str, data: bytes, *, fresh: bool = False, spare: bool = False) -> os.stat_result:
    now = time.monotonic()
    last = _last.get(sid)
    if not fresh and last is not None and now - last < EVERY:
        st = self.stat(sid)
        if st is not None:
            return st
    _last[sid] = now
    return _write(self, sid, data, fresh=fresh, spare=spare)


if __name__ == "__main__":
    assert sys.argv[2:4] == ["-m", "sessionguard.daemon"], sys.argv
    Pins.write = _seldom  # type: ignore[method-assign]
    sys.exit(daemon.main(sys.argv[4:]))

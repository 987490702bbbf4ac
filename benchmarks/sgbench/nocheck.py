"""Run sessionguardd with the content-aware check bypassed (a benchmark control, never for use).

Used as ``DaemonProc(wrap=[python, this file])``: the rest of the command line is
``<python> -m sessionguard.daemon ARGS``, and this runs the same ``main(ARGS)`` in
this process after replacing, in the tracker only, ``Identity.of`` (what a pin's
identity is computed with) by one that hashes nothing and ``replaced`` by one that
says no, and making every remembered pin's identity known (so a pin a scan wrote
without its keys is not read for them at its first write). The daemon's files are
not edited: the difference in CPU per write between this and the real daemon on
the same writer is what the check costs, its one read per session included.
"""

from __future__ import annotations

import sys
from typing import Any

from sessionguard import daemon, tracker, watchstate
from sessionguard.rules import Identity

#: Keys that are not the "never taken" zeros: taken as known, compared by nobody.
_KNOWN = Identity(0, 1, 1)


class _NoIdentity:
    @staticmethod
    def of(parsed: Any) -> Identity:
        return _KNOWN


def _never(pinned: Any, new: Any, first: Any = None) -> bool:
    return False


if __name__ == "__main__":
    assert sys.argv[2:4] == ["-m", "sessionguard.daemon"], sys.argv
    vars(tracker).update(Identity=_NoIdentity, replaced=_never)
    watchstate.Tracked.identity = lambda self: _KNOWN  # type: ignore[method-assign]
    sys.exit(daemon.main(sys.argv[4:]))

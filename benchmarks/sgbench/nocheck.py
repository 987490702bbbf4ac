"""Run sessionguardd with the content-aware check bypassed (a benchmark control, never for use).

Used as ``DaemonProc(wrap=[python, this file])``: the rest of the command line is
``<python> -m sessionguard.daemon ARGS``, and this runs the same ``main(ARGS)`` in
this process after replacing, in the tracker only, ``Identity.of`` (what a pin's
identity is computed with) by one that knows nothing and ``replaced`` by one that
says no. The daemon's files are not edited: the difference in CPU per write
between this and the real daemon on the same writer is what the check costs.
"""

from __future__ import annotations

import sys
from typing import Any

from sessionguard import daemon, tracker


class _NoIdentity:
    @staticmethod
    def of(parsed: Any) -> None:
        return None


def _never(pinned: Any, new: Any) -> bool:
    return False


if __name__ == "__main__":
    assert sys.argv[2:4] == ["-m", "sessionguard.daemon"], sys.argv
    vars(tracker).update(Identity=_NoIdentity, replaced=_never)
    sys.exit(daemon.main(sys.argv[4:]))

"""Run sessionguardd with a defect injected: its first scan raises ``RuntimeError``.

Used as ``DaemonProc(wrap=[python, this file])``: the rest of the command line is
``<python> -m sessionguard.daemon ARGS``, and this runs the same ``main(ARGS)`` in
this process after wrapping ``passes.scan`` (looked up by the supervisor at each
call) so that its first call fails the way a bug would. The daemon's files are
not edited. Later calls scan as usual, so the retry brings the watch up.
"""

from __future__ import annotations

import sys
from typing import Any

from sessionguard import daemon, passes

_scan = passes.scan
_failed_once: list[bool] = []


def _first_fails(*args: Any, **kwargs: Any) -> Any:
    if not _failed_once:
        _failed_once.append(True)
        raise RuntimeError("injected defect: the first scan fails")
    return _scan(*args, **kwargs)


if __name__ == "__main__":
    assert sys.argv[2:4] == ["-m", "sessionguard.daemon"], sys.argv
    passes.scan = _first_fails
    sys.exit(daemon.main(sys.argv[4:]))

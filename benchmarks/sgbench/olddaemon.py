"""Release 0.1.0's daemon, for "no worse than before" in the same run (issue 11).

The tree of commit 84dc4d8 is exported with ``git archive`` into the run's
scratch directory (not ``git worktree add``: an export leaves nothing in the
repository's worktree list if the run is killed) and removed with it. Its
daemon runs from the same virtualenv with ``PYTHONPATH`` pointing at the
export's ``daemon/``, which comes before the editable install on ``sys.path``;
that is checked before it is used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .common import ROOT

RELEASE_0_1_0 = "84dc4d8"


def export(work: Path) -> dict[str, str]:
    """Export release 0.1.0 under *work*; returns the environment that runs its daemon."""
    dest = work / f"sessionguard-{RELEASE_0_1_0}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", RELEASE_0_1_0, "daemon"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    env = {"PYTHONPATH": str(dest / "daemon")}
    where = subprocess.run([sys.executable, "-c", "import sessionguard; print(sessionguard.__file__)"],
                           env=dict(os.environ, **env), capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(dest)):
        raise RuntimeError(f"PYTHONPATH={env['PYTHONPATH']} still imports sessionguard from {where}")
    return env

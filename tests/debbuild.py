"""The .deb under test: built once per test process with packaging/deb/build.sh.

``SESSIONGUARD_DEB=/path/to.deb`` uses a package built before instead (CI's
smoke test builds one; nothing is built twice then). The build needs root (a
private mount namespace) and writes into a temporary DIST, removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "packaging" / "deb" / "build.sh"


@functools.cache
def _build() -> Path:
    dist = Path(tempfile.mkdtemp(prefix="sg-test-dist."))
    atexit.register(shutil.rmtree, dist, True)
    r = subprocess.run([str(BUILD)], env=dict(os.environ, DIST=str(dist)), capture_output=True, text=True,
                       timeout=900, check=False)
    assert r.returncode == 0, f"build.sh failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = Path(r.stdout.strip().splitlines()[-1])
    assert out.is_file() and out.parent == dist, r.stdout
    return out


def built_deb() -> Path:
    """The package: $SESSIONGUARD_DEB, else built now (once); skips the test when not root."""
    given = os.environ.get("SESSIONGUARD_DEB")
    if given:
        return Path(given)
    if os.geteuid() != 0:
        pytest.skip("needs root: build.sh builds the venv in a private mount namespace")
    return _build()

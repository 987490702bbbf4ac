"""tests/system: make the helper module ``nspawn`` importable whatever pytest's
import mode, and share a few fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import nspawn  # noqa: E402

REPO = HERE.parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def nspawn_ok() -> None:
    """Skip (with the reason printed by -ra) when no container can be booted."""
    reason = nspawn.nspawn_skip_reason()
    if reason:
        pytest.skip(f"systemd-nspawn container unavailable: {reason}")

"""Shared fixtures (helpers live in sghelpers.py: conftest modules are not importable by name)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tiny tmpfs (a real full disk); yields a function size -> mountpoint."""
    mounts: list[str] = []

    def mount(size: str = "1m", name: str = "tmpfs") -> Path:
        mp = tmp_path / name
        mp.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mp)], check=True)
        mounts.append(str(mp))
        return mp

    yield mount
    for mp in reversed(mounts):
        subprocess.run(["umount", "-l", mp], check=False)

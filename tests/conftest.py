"""Shared fixtures (helpers live in sghelpers.py: conftest modules are not importable by name)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sessionguard
from chatserver import ChatServer
from daemonproc import DaemonProc
from embedhelpers import GUARDED
from sessionguard.store import Store
from sghelpers import IS_ROOT, rmtree, short_tmpdir, skip_without_account_tools, throwaway_accounts


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


# -- the real daemon over a session directory ------------------------------------

@pytest.fixture
def sdir(tmp_path: Path) -> Path:
    """An empty session directory."""
    d = tmp_path / "sessions"
    d.mkdir()
    return d


@pytest.fixture
def store(sdir: Path) -> Iterator[Store]:
    """A store in the empty session directory, opened as the daemon opens one."""
    from test_store import open_store  # the helper the store's own tests use, and others import

    s, notice = open_store(sdir)
    assert notice is None
    yield s
    s.close()


@pytest.fixture
def guarded(sdir: Path) -> Iterator[ChatServer]:
    """The test chat server (tests/chatserver/) on the guarded storage, not started yet: write the files first."""
    srv = ChatServer(sdir, storage=GUARDED)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def daemons(tmp_path: Path):
    """Start real daemons with ``daemons(*args, wait=True, **kw)`` (kw: DaemonProc's); all are stopped after."""
    started: list[DaemonProc] = []

    def start(*args: str, wait: bool = True, **kw) -> DaemonProc:
        d = DaemonProc(tmp_path, list(args), **kw)
        started.append(d)
        return d.started() if wait else d

    yield start
    for d in started:
        d.stop()


# -- throwaway users for authorisation tests (root only) ---------------------------

def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def accounts():
    """Throwaway groups (read, admin, primary) and users reader/admin/outsider; removed afterwards."""
    if not IS_ROOT:
        pytest.skip("needs root: creates throwaway users and groups")
    skip_without_account_tools()
    tag = secrets.token_hex(3)
    groups = {"read": f"sgr{tag}", "admin": f"sga{tag}", "primary": f"sgp{tag}"}
    users = {"reader": (f"sgu{tag}r", [groups["read"]]), "admin": (f"sgu{tag}a", [groups["admin"]]),
             "outsider": (f"sgu{tag}o", [])}
    with throwaway_accounts(groups.values(), [(name, groups["primary"], extra) for name, extra in users.values()]):
        import pwd

        yield {"groups": groups, "users": {k: pwd.getpwnam(n) for k, (n, _) in users.items()}}


@pytest.fixture
def sessionguard_group():
    """A ``sessionguard`` group on this machine, as a purged .deb leaves it behind (Debian
    packages keep their groups): made for the test if missing and removed after; one that
    was already there is left alone. Yields its gid."""
    if not IS_ROOT or shutil.which("groupadd") is None:
        pytest.skip("needs root and groupadd")
    import grp

    try:
        existing: int | None = grp.getgrnam("sessionguard").gr_gid
    except KeyError:
        existing = None
    if existing is not None:
        yield existing
        return
    _sh("groupadd", "--system", "sessionguard")
    try:
        yield grp.getgrnam("sessionguard").gr_gid
    finally:
        subprocess.run(["groupdel", "sessionguard"], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def public_client(accounts):
    """(argv prefix, env) that runs sessionguardctl as an unprivileged user, or skip."""
    import orjson as _orjson

    shared = short_tmpdir("sgpub")
    os.chmod(shared, 0o755)
    pkg = os.path.dirname(sessionguard.__file__)
    shutil.copytree(pkg, os.path.join(shared, "sessionguard"), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.dirname(_orjson.__file__), os.path.join(shared, "orjson"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for root, dirs, files in os.walk(shared):
        for n in dirs:
            os.chmod(os.path.join(root, n), 0o755)
        for n in files:
            os.chmod(os.path.join(root, n), 0o644)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": shared, "HOME": "/", "PYTHONDONTWRITEBYTECODE": "1",
           "LC_ALL": "C.UTF-8"}
    pw = accounts["users"]["outsider"]
    candidates = [sys.executable]
    system = "/usr/bin/python3"
    if os.path.exists(system):
        candidates.append(system)
    tried = []
    try:
        for py in candidates:
            prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", py]
            probe = subprocess.run([*prefix, "-c", "import sys, sessionguard.ctl; print(sys.version_info[:2])"],
                                   capture_output=True, text=True, env=env, timeout=60)
            if probe.returncode == 0:
                yield py, env
                return
            tried.append(f"{py}: {probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode}")
        pytest.skip("no interpreter an unprivileged user can run sessionguardctl with: " + "; ".join(tried))
    finally:
        rmtree(shared)


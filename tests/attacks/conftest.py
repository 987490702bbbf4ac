"""Fixtures of the attacks: the throwaway cast (once per run) and a world per test."""

from __future__ import annotations

import grp
import pwd
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from attackworld import ATTACKER, Cast, World, as_user, user_env

from sghelpers import IS_ROOT, skip_without_account_tools, throwaway_accounts

#: user -> (primary group, supplementary groups), by role.
_USERS = {
    "srv": ("shared", ()),  # the server's user: owns the session directory (the attacker)
    "srv2": ("shared2", ()),  # a second tenant's server user
    "sgd": ("read", ("shared", "shared2")),  # the packaged daemon's user
    "reader": ("read", ()),  # a read-group member
    "admin": ("admin", ("read",)),  # an admin-group member (also in the socket's group)
}


@pytest.fixture(scope="session")
def cast() -> Iterator[Cast]:
    """Throwaway groups and users for every attack; removed at the end of the run."""
    if not IS_ROOT:
        pytest.skip("needs root: creates throwaway users and runs processes as them")
    skip_without_account_tools()
    tag = secrets.token_hex(3)
    short = {"shared": "s1", "shared2": "s2", "read": "rd", "admin": "ad"}
    groups = {g: f"sg{s}{tag}" for g, s in short.items()}
    users = {u: f"sg{u}{tag}" for u in _USERS}
    accounts = [(users[role], groups[primary], [groups[g] for g in extra]) for role, (primary, extra) in _USERS.items()]
    with throwaway_accounts(groups.values(), accounts):
        the_cast = Cast({r: pwd.getpwnam(n) for r, n in users.items()},
                        {g: grp.getgrnam(n).gr_gid for g, n in groups.items()}, groups)
        probe = subprocess.run([*as_user(the_cast.users["srv"]), sys.executable, "-c",
                                f"import sessionguard.ctl; open({ATTACKER!r}).close()"],
                               capture_output=True, text=True, env=user_env(), timeout=60, check=False)
        if probe.returncode != 0:
            pytest.skip(f"an unprivileged user cannot run {sys.executable} with sessionguard: {probe.stderr[-300:]}")
        yield the_cast


@pytest.fixture
def make_world(cast: Cast) -> Iterator[Callable[[str], World]]:
    """``make_world(layout)``: a fresh world (``root`` or ``packaged``), removed after the test."""
    worlds: list[World] = []

    def make(layout: str) -> World:
        w = World(cast, layout)
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        w.close()

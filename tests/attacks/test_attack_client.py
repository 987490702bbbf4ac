"""Attack 11 of the security review (issue 10): another local user's socket where the client
looks. The server's user serves a spoofed control socket that answers "restored (1000
messages)" and records every byte it receives; an admin runs ``sessionguardctl restore``
with the socket found through ``$XDG_RUNTIME_DIR`` pointing at a directory the attacker
controls, through ``$SESSIONGUARD_SOCKET`` set by a wrapper, and with neither (where release
0.1.0 looked in ``/tmp``). The client refuses before sending anything. The admin's client runs
in a private mount namespace with its own ``/run``, so ``/run/sessionguard.sock`` is absent
whatever this machine runs. Once, not per layout: this is the client, not the daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from attackworld import ATTACKER, World, as_user, user_env

from sghelpers import IS_ROOT

Worlds = Callable[[str], World]


@contextmanager
def spoofed_socket(w: World, path: str) -> Iterator[Path]:
    """The attacker serving *path*; yields the file where it records what it received."""
    log = w.scratch / f"received-{os.path.basename(path)}"
    server = subprocess.Popen([*as_user(w.cast.users["srv"]), sys.executable, "-u", ATTACKER, "serve", path,
                               str(log)], stdout=subprocess.PIPE, text=True, env=user_env())
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield log
    finally:
        server.kill()
        server.wait(30)
        if server.stdout is not None:
            server.stdout.close()
        if os.path.lexists(path):
            os.unlink(path)


def admin_ctl(w: World, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``sessionguardctl`` as the admin, with no ``/run/sessionguard.sock`` (a private ``/run``)."""
    inner = [*as_user(w.cast.users["admin"]), sys.executable, "-m", "sessionguard.ctl", *args]
    script = 'mount -t tmpfs tmpfs /run && exec "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *inner],
                          capture_output=True, text=True, env=dict(user_env(), **env), timeout=120, check=False)


def test_the_client_refuses_a_socket_served_by_another_user(make_world: Worlds) -> None:
    if not IS_ROOT or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare: a private mount namespace with its own /run")
    w = make_world("root")
    xdg = w.scratch / "xdg"
    w.agent()("mkdir", path=str(xdg), mode=0o755)
    admin_uid = w.cast.users["admin"].pw_uid
    tmp_default = f"/tmp/sessionguard-{admin_uid}.sock"  # where release 0.1.0's client looked
    with spoofed_socket(w, f"{xdg}/sessionguard.sock") as via_xdg, \
            spoofed_socket(w, f"{w.scratch}/evil.sock") as via_env, spoofed_socket(w, tmp_default) as via_tmp:
        runs = {
            "XDG_RUNTIME_DIR": admin_ctl(w, {"XDG_RUNTIME_DIR": str(xdg)}, "restore", "victim"),
            "SESSIONGUARD_SOCKET": admin_ctl(w, {"SESSIONGUARD_SOCKET": f"{w.scratch}/evil.sock"}, "restore", "victim"),
            "nothing set": admin_ctl(w, {}, "restore", "victim"),
        }
        received = {"XDG_RUNTIME_DIR": via_xdg, "SESSIONGUARD_SOCKET": via_env, "nothing set": via_tmp}
        got = {k: p.read_bytes() if p.exists() else b"" for k, p in received.items()}

    for how, p in runs.items():
        assert p.returncode == 3, (how, p.stdout, p.stderr)
        assert "restored" not in p.stdout, (how, p.stdout)
    for how in ("XDG_RUNTIME_DIR", "SESSIONGUARD_SOCKET"):
        err = runs[how].stderr
        assert "refusing to talk to" in err and f"uid {w.cast.users['srv'].pw_uid}" in err and "Nothing was sent" in err
        assert got[how] == b"<connection>", f"{how}: the client sent {got[how]!r}"
    assert got["nothing set"] == b"", "the client connected to a socket in /tmp"
    assert "/tmp" not in runs["nothing set"].stderr

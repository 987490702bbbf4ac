"""The stage of every attack: throwaway users, the two deployment layouts, a canary
standing for ``/etc``, the attacker's process and the daemon under attack.

Layouts (SECURITY.md, "Who is involved"):

* ``root``: the daemon runs as root; each session directory belongs to its server's user.
* ``packaged``: the daemon runs as a dedicated user (a stand-in for ``sessionguard``) whose
  primary group is the read group; each session directory belongs to its server's user
  with a shared group the daemon user is in (setgid ``2770``), and the server writes its
  files group-readable and writable (umask ``007``).

The canary belongs to the daemon's user (root, or the daemon user in the packaged layout):
what the daemon may write and the attacker may not. It holds ``/etc``-like files, a
root-only (``0600``) file with a marker inside, a ``0700`` directory with a session-shaped
``0600`` file, and files named like a store's pins and versions. Everything under the
world's base directory except the session directories, the daemon's run directory and the
attacker's scratch directory is witnessed (sghelpers.Witness): created, removed, linked,
rewritten or read shows.

``SG_ATTACKS_DAEMON_PATH`` (a ``daemon/`` directory of another checkout) runs the daemon
from there: how the attacks were shown to succeed against release 0.1.0 (RELIABILITY.md,
"Attacks"). ``SG_ATTACKS_KEEP=1`` leaves every world's directory behind for a post-mortem.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemonproc import DaemonProc
from sghelpers import Witness, rmtree, short_tmpdir

HERE = os.path.dirname(os.path.abspath(__file__))
ATTACKER = os.path.join(HERE, "attacker.py")
LAYOUTS = ("root", "packaged")
#: Another checkout's ``daemon/`` to run the daemon from (an old release), or "".
DAEMON_PATH = os.environ.get("SG_ATTACKS_DAEMON_PATH", "")
#: ``SG_ATTACKS_KEEP=1`` leaves each world's directory (logs, store, canary) for a post-mortem.
KEEP = bool(os.environ.get("SG_ATTACKS_KEEP"))


@dataclass(frozen=True)
class Cast:
    """The throwaway users and groups of the attacks (see conftest.py)."""

    users: dict[str, pwd.struct_passwd]
    gids: dict[str, int]
    group_names: dict[str, str]


class Refused(Exception):
    """The attacker's system call was refused; ``errno`` says how."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply["error"])
        self.errno: int = reply["errno"]


class Agent:
    """A process running ``attacker.py`` as an unprivileged user (``setpriv``)."""

    def __init__(self, user: pwd.struct_passwd) -> None:
        self.user = user
        self.proc = subprocess.Popen(
            [*as_user(user), sys.executable, "-u", ATTACKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=user_env(), cwd="/")

    def send(self, op: str, **kw: Any) -> None:
        """Start *op* (the attacker works while the test goes on); :meth:`reply` collects it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the attacker process died ({self.proc.poll()})"
        out: dict[str, Any] = json.loads(line)
        return out

    def attempt(self, op: str, **kw: Any) -> dict[str, Any]:
        """Do *op* and return the raw answer (``ok``, ``value`` or ``errno``)."""
        self.send(op, **kw)
        return self.reply()

    def __call__(self, op: str, **kw: Any) -> Any:
        """Do *op*; raise :class:`Refused` when the kernel said no."""
        out = self.attempt(op, **kw)
        if not out["ok"]:
            raise Refused(out)
        return out["value"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def as_user(user: pwd.struct_passwd) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]


def user_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass
class World:
    """One attack's directories, users, daemon and attackers; :meth:`close` removes it all."""

    cast: Cast
    layout: str
    base: Path = field(default_factory=lambda: Path(short_tmpdir("sgatk")))
    marker: str = field(default_factory=lambda: f"ROOT-ONLY-MARKER-{secrets.token_hex(8)}")
    tenants: dict[str, Path] = field(default_factory=dict)
    daemons: list[DaemonProc] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        os.chmod(self.base, 0o755)
        self.run = self.base / "run"
        self.run.mkdir(mode=0o755)
        os.chown(self.run, self.daemon_uid, self.daemon_gid)
        self.scratch = self.base / "scratch"  # the attacker's own corner, outside every watch
        self.scratch.mkdir(mode=0o755)
        os.chown(self.scratch, self.cast.users["srv"].pw_uid, self.cast.users["srv"].pw_gid)
        self.canary = self.base / "etc"
        self._make_canary()
        self.witness: Witness | None = None

    # -- who -------------------------------------------------------------------------

    @property
    def packaged(self) -> bool:
        return self.layout == "packaged"

    @property
    def daemon_uid(self) -> int:
        return self.cast.users["sgd"].pw_uid if self.packaged else 0

    @property
    def daemon_gid(self) -> int:
        return self.cast.gids["read"] if self.packaged else 0

    def _make_canary(self) -> None:
        files = {
            "passwd": (0o644, b"root:x:0:0:root:/root:/bin/bash\n"),
            "shadow": (0o600, f"root:{self.marker}:19000:0:99999:7:::\n".encode()),
            "logrotate.d/rsyslog": (0o644, b"/var/log/syslog {\n  daily\n}\n"),
            "pins/victim": (0o600, b'{"messages": ["the daemon\'s own pin"]}'),
            "sessions/victim/20260101T000000.000000Z_5msgs_shrink_daemon_copy_0123456789abcdef.version":
                (0o600, b'{"messages": [1, 2, 3, 4, 5]}'),
            "secret/victim.json": (0o600, json.dumps({"session_id": "victim", "messages": [
                {"role": "user", "content": self.marker}]}).encode()),
        }
        for rel, (mode, data) in files.items():
            p = self.canary / rel
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            p.write_bytes(data)
            os.chmod(p, mode)
        os.chmod(self.canary / "secret", 0o700)
        for dirpath, dirnames, filenames in os.walk(self.canary):
            for name in ["", *dirnames, *filenames]:
                os.chown(os.path.join(dirpath, name), self.daemon_uid, self.daemon_gid)

    def tenant(self, who: str = "srv", *, xfs: bool = False) -> Path:
        """*who*'s session directory (made on first use), owned by that server user; with
        *xfs* on a loop-mounted XFS (reflinks: the daemon's pins are clones)."""
        if who in self.tenants:
            return self.tenants[who]
        user = self.cast.users[who]
        home = self.base / who
        home.mkdir(mode=0o755)
        if xfs:
            img = self.run / f"{who}.xfs"
            subprocess.run(["truncate", "-s", "300M", str(img)], check=True)
            subprocess.run(["mkfs.xfs", "-q", str(img)], check=True)
            subprocess.run(["mount", "-o", "loop", str(img), str(home)], check=True)
            self.mounts.append(home)
            os.chmod(home, 0o755)
        os.chown(home, user.pw_uid, user.pw_gid)
        sdir = home / "sessions"
        sdir.mkdir()
        os.chown(sdir, user.pw_uid, user.pw_gid)  # the group: the shared one, the server's primary
        os.chmod(sdir, 0o2770 if self.packaged else 0o750)
        self.tenants[who] = sdir
        return sdir

    def store(self, who: str = "srv") -> Path:
        return self.tenants[who] / ".sessionguard"

    # -- what must not change ------------------------------------------------------------

    def arm(self) -> None:
        """Witness everything outside the session directories, the run and scratch directories."""
        excluded = ["run", "scratch", *(str(p.relative_to(self.base)) for p in self.tenants.values())]
        self.witness = Witness(self.base, exclude=tuple(excluded))
        self.witness.arm()

    def assert_untouched(self) -> None:
        """Nothing outside the store and the session directories changed since :meth:`arm`."""
        assert self.witness is not None, "arm() first"
        changes = self.witness.changes()
        assert not changes, "outside the store and the session directories:\n  " + "\n  ".join(changes)

    def marker_in(self, *roots: Path) -> list[str]:
        """Files below *roots* (as root, no symlink followed) that hold the root-only marker."""
        hits = []
        for root in roots:
            for dirpath, _, filenames in os.walk(root):
                for name in filenames:
                    p = os.path.join(dirpath, name)
                    if not os.path.islink(p) and self.marker.encode() in Path(p).read_bytes():
                        hits.append(p)
        return hits

    # -- the daemon ---------------------------------------------------------------------

    def config(self, watches: list[str], daemon: str = "") -> Path:
        """A config file (in the run directory: the daemon reads it) with *watches* (TOML bodies)."""
        names = self.cast.group_names
        text = f'[daemon]\nread_group = "{names["read"]}"\nadmin_group = "{names["admin"]}"\n{daemon}\n'
        for body in watches:
            text += f"\n[[watch]]\n{body}\n"
        cfg = self.run / f"sg-{len(self.daemons)}.toml"
        cfg.write_text(text)
        os.chmod(cfg, 0o644)
        return cfg

    def start(self, *watches: str, daemon: str = "", wait: bool = True) -> DaemonProc:
        """The daemon of this layout over *watches* (default: the attacker's directory)."""
        bodies = list(watches) or [f'path = "{self.tenant()}"']
        cfg = self.config(bodies, daemon)
        env = {"PYTHONPATH": DAEMON_PATH} if DAEMON_PATH else {}
        wrap = None
        if self.packaged:
            sgd, gids = self.cast.users["sgd"], self.cast.gids
            wrap = ["setpriv", f"--reuid={sgd.pw_uid}", f"--regid={gids['read']}",
                    f"--groups={gids['shared']},{gids['shared2']}"]
        d = DaemonProc(self.run, ["--config", str(cfg)], env=env, wrap=wrap)
        self.daemons.append(d)
        return d.started() if wait else d

    def ctl(self, who: str, d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
        """``sessionguardctl --json`` as the throwaway user *who* (``reader``, ``admin``)."""
        cmd = [*as_user(self.cast.users[who]), sys.executable, "-m", "sessionguard.ctl", "--socket", d.socket,
               "--json", *args]
        env = dict(user_env(), SESSIONGUARD_DAEMON_USER=self.cast.users["sgd"].pw_name) if self.packaged else user_env()
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)

    def agent(self, who: str = "srv") -> Agent:
        a = Agent(self.cast.users[who])
        self.agents.append(a)
        return a

    def close(self) -> None:
        for a in self.agents:
            a.close()
        for d in self.daemons:
            d.stop()
        for mp in self.mounts:
            subprocess.run(["umount", "-l", str(mp)], check=False)
        if not KEEP:
            rmtree(str(self.base))

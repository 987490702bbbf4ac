"""Boot a real systemd in a throw-away systemd-nspawn container, for system tests.

The host's own PID 1 is not systemd here, so ``systemctl`` and ``systemd-run``
cannot be used directly.  Instead we boot the host's own file system read-only
(``--volatile=yes``: ``/`` is a tmpfs, only ``/usr`` comes from the host) as a
container and drive its systemd with ``nsenter``::

    with booted_systemd(units=[repo / "sessionguard.service"]) as c:
        c.systemctl("start", "sessionguard.service")
        assert c.is_active("sessionguard.service")
        print(c.run(["journalctl", "-u", "sessionguard", "--no-pager"]).stdout)

How the container is started (facts from shared/FIELD-NOTES.md, re-checked here):

* ``unshare --mount --propagation private`` + a tmpfs on ``/run``: nspawn writes
  to ``/run/systemd/nspawn`` and friends; the tmpfs keeps that off the host.
* ``--register=no --keep-unit``: no machined, no new scope -- the host has no
  systemd to talk to.
* ``-b systemd.firstboot=off`` and ``systemd-firstboot.service`` masked: an empty
  ``/etc`` would otherwise make the container ask for a locale on the console.
* nspawn creates ``payload/`` and ``supervisor/`` cgroups below our own cgroup
  and leaves them behind; they are removed on exit when empty.

Only one container boots at a time (a lock file), because the cgroup names
nspawn uses are fixed.

This module depends on nothing but the standard library; it does not import
sessionguard or pytest (tests call :func:`nspawn_skip_reason` and skip).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BootError", "CommandError", "Container", "booted_systemd", "ensure_nspawn", "nspawn_skip_reason"]

PathLike = str | os.PathLike[str]
#: A unit given to :func:`booted_systemd`: a path to a unit file (bound read-only
#: to /etc/systemd/system/<basename>) or ``(name, text)``.
UnitSpec = PathLike | tuple[str, str]

LOCK_PATH = "/tmp/sessionguard-nspawn.lock"
BOOT_TIMEOUT = 60.0
# Units masked in every container: firstboot would block the boot on the
# console; the rest are things the host image may have enabled that only cost
# boot time or fail in a container.
DEFAULT_MASK = (
    "systemd-firstboot.service",
    "console-getty.service",
    "getty@.service",
    "postgresql.service",
    "postgresql@.service",
    "cron.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)


class BootError(RuntimeError):
    """The container did not reach running/degraded; ``log`` holds the console."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}\n--- nspawn console (tail) ---\n{log[-6000:]}")
        self.log = log


# --------------------------------------------------------------------------- #
# availability


def nspawn_skip_reason(install: bool = True) -> str | None:
    """Why a container cannot be booted here, or None if it can.

    With ``install=True`` and root, a missing ``systemd-nspawn`` is installed with
    ``apt-get install systemd-container`` (CI runs as root on a fresh machine).
    """
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, unshare --mount, nsenter)"
    if shutil.which("systemd-nspawn") is None and install:
        ensure_nspawn()
    for tool in ("systemd-nspawn", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not available (apt-get install systemd-container util-linux)"
    for init in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd"):
        if os.access(init, os.X_OK):
            break
    else:
        return "no systemd binary on this host to boot"
    return None


def ensure_nspawn() -> bool:
    """Install systemd-container if nspawn is missing and apt-get is usable."""
    if shutil.which("systemd-nspawn"):
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd-container"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:  # stale package lists on a fresh machine
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        subprocess.run(cmd, env=env, capture_output=True, check=False)
    return shutil.which("systemd-nspawn") is not None


# --------------------------------------------------------------------------- #
# the container


class CommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the captured output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}"


@dataclass
class Container:
    """A booted container: ``pid`` is its PID 1 as seen from the host."""

    pid: int
    nspawn: subprocess.Popen[bytes]
    log_path: Path
    boot_seconds: float = 0.0
    _closed: bool = field(default=False, repr=False)

    # -- running commands -------------------------------------------------- #
    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all namespaces of its PID 1).

        A string is run with ``sh -c``.  ``user`` runs it via ``setpriv`` as
        that user (with the user's groups).  Output is captured as text.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if user is not None:
            # setpriv wants a numeric gid for --regid: look up the primary group inside.
            argv = [
                "sh", "-c", 'exec setpriv --reuid "$0" --regid "$(id -g "$0")" --init-groups -- "$@"',
                user, *argv,
            ]
        full = ["nsenter", "-t", str(self.pid), "-a", "--", *argv]
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        if check and r.returncode != 0:
            raise CommandError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def systemctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p A -p B unit`` as a dict."""
        args = ["show", unit]
        for p in props:
            args += ["-p", p]
        out = self.systemctl(*args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def is_active(self, unit: str) -> bool:
        return bool(self.systemctl("is-active", unit, check=False).stdout.strip() == "active")

    def wait_for(self, unit: str, state: str = "active", timeout: float = 20.0) -> str:
        """Wait until ``systemctl is-active unit`` prints ``state``; return the last answer."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            last = self.systemctl("is-active", unit, check=False).stdout.strip()
            if last == state:
                return last
            time.sleep(0.2)
        raise TimeoutError(f"{unit}: is-active={last!r}, wanted {state!r}\n{self.journal(unit)}")

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        cmd = ["journalctl", "--no-pager", "-n", str(lines), "-o", "short-monotonic"]
        if unit:
            cmd += ["-u", unit]
        return str(self.run(cmd, check=False).stdout)

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- shutting down ----------------------------------------------------- #
    def shutdown(self, timeout: float = 20.0) -> None:
        """poweroff, then SIGTERM/SIGKILL nspawn if it does not exit in time."""
        if self._closed:
            return
        self._closed = True
        if self.nspawn.poll() is None:
            with contextlib.suppress(Exception):
                self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=10)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                # nspawn turns SIGTERM into an orderly container halt.
                _signal_group(self.nspawn, signal.SIGTERM)
                try:
                    self.nspawn.wait(10)
                except subprocess.TimeoutExpired:
                    _signal_group(self.nspawn, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                    self.nspawn.wait(10)


def _signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)


# --------------------------------------------------------------------------- #
# cgroups nspawn leaves behind


def _cgroup_bases() -> list[Path]:
    """Our own cgroup directory in every hierarchy nspawn creates children in."""
    bases = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            mount = Path("/sys/fs/cgroup/systemd")
        elif hid == "0" and controllers == "":
            unified = Path("/sys/fs/cgroup/unified")
            mount = unified if unified.is_dir() else Path("/sys/fs/cgroup")
        else:
            continue
        base = mount / path.lstrip("/")
        if base.is_dir():
            bases.append(base)
    return bases


def _remove_cgroup_tree(top: Path) -> bool:
    """rmdir ``top`` and its sub-cgroups bottom-up if no process is left in them."""
    if not top.is_dir():
        return True
    dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True)
    for d in dirs:
        procs = d / "cgroup.procs"
        with contextlib.suppress(OSError):
            if procs.read_text().strip():
                return False  # still in use: leave it alone
    ok = True
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            ok = False
    return ok


def cleanup_cgroups() -> None:
    for base in _cgroup_bases():
        for name in ("payload", "supervisor"):
            _remove_cgroup_tree(base / name)


# --------------------------------------------------------------------------- #
# booting


def _find_init(nspawn_pid: int, deadline: float) -> int | None:
    """PID (host view) of the container's PID 1: the systemd below nspawn."""
    while time.monotonic() < deadline:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        stack = list(children.get(nspawn_pid, []))
        while stack:
            pid = stack.pop()
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                exe = ""
            if exe.endswith("/systemd/systemd"):
                return pid
            stack.extend(children.get(pid, []))
        time.sleep(0.05)
    return None


@contextlib.contextmanager
def booted_systemd(
    binds: Iterable[tuple[PathLike, str]] = (),
    extra_units: Iterable[UnitSpec] = (),
    *,
    ro_binds: Iterable[tuple[PathLike, str]] = (),
    units: Iterable[UnitSpec] = (),
    mask: Iterable[str] = (),
    enable: Iterable[str] = (),
    timeout: float = BOOT_TIMEOUT,
    kernel_args: Sequence[str] = (),
    volatile: str = "yes",
) -> Iterator[Container]:
    """Boot the host's OS as a volatile container and yield a :class:`Container`.

    binds / ro_binds: bind mounts ``(host_path, container_path)``, read-write / read-only.
    units / extra_units: unit files bound read-only into /etc/systemd/system/, a path or
    ``(name, text)``. mask: extra units to mask (on top of :data:`DEFAULT_MASK`).
    enable: units to ``systemctl enable --now`` once running. timeout: seconds to wait
    for ``is-system-running`` = running|degraded. volatile: nspawn's --volatile= mode:
    "yes" (default) is an empty tmpfs plus the host's /usr; "overlay" the whole host
    tree under a tmpfs overlay (dpkg's database, /etc, /opt writable; writes vanish).

    On exit the container is powered off (killed if it hangs) and the cgroups
    nspawn left are removed.  Raises :class:`BootError` if the boot fails.
    """
    reason = nspawn_skip_reason()
    if reason:
        raise BootError(f"cannot boot a container here: {reason}")

    work = Path(tempfile.mkdtemp(prefix="sg-nspawn-"))
    lock_fd = os.open(LOCK_PATH, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    container: Container | None = None
    try:
        cleanup_cgroups()  # leftovers of a run that was killed
        args = [
            "systemd-nspawn", "-D", "/", f"--volatile={volatile}", "--register=no", "--keep-unit",
            "--console=read-only", "--machine=sg-test",
            *(f"--bind-ro=/dev/null:/etc/systemd/system/{name}" for name in (*DEFAULT_MASK, *mask)),
            *_unit_args(work, [*units, *extra_units]),
            *(f"--bind={Path(host).resolve()}:{inside}" for host, inside in binds),
            *(f"--bind-ro={Path(host).resolve()}:{inside}" for host, inside in ro_binds),
            "-b", "systemd.firstboot=off", *kernel_args,
        ]
        t0 = time.monotonic()
        container = _start(args, work / "console.log", t0 + timeout)
        _wait_running(container, t0 + timeout, timeout)
        container.boot_seconds = time.monotonic() - t0
        for unit in enable:
            container.systemctl("enable", "--now", unit)
        yield container
    finally:
        try:
            if container is not None:
                container.shutdown()
        finally:
            cleanup_cgroups()
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
            shutil.rmtree(work, ignore_errors=True)


def _unit_args(work: Path, specs: list[UnitSpec]) -> list[str]:
    """nspawn arguments binding each unit into /etc/systemd/system, plus a preset disabling them.

    An empty /etc makes systemd apply presets at boot ("enable *" on Debian),
    which would start every bound unit with an [Install] section before the
    test has prepared anything. Exactly those are disabled by preset; tests
    start them (or pass enable=[...]).
    """
    args, preset_lines = [], []
    for spec in specs:
        if isinstance(spec, tuple):
            name, text = spec
            src = work / "units" / name
            src.parent.mkdir(exist_ok=True)
            src.write_text(text)
        else:
            src = Path(spec).resolve()
            name = src.name
        args.append(f"--bind-ro={src}:/etc/systemd/system/{name}")
        preset_lines.append(f"disable {name}\n")
    if preset_lines:
        preset = work / "00-nspawn-harness.preset"
        preset.write_text("".join(preset_lines))
        args.append(f"--bind-ro={preset}:/etc/systemd/system-preset/00-nspawn-harness.preset")
    return args


def _start(args: list[str], log_path: Path, deadline: float) -> Container:
    """Run nspawn in a private mount namespace with its own /run; the container once its init runs."""
    script = "mount -t tmpfs tmpfs /run && exec " + shlex.join(args)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killpg on teardown
        )
    pid = _find_init(proc.pid, deadline)
    if pid is None:
        _kill(proc)
        raise BootError("container init did not start", log_path.read_text(errors="replace"))
    return Container(pid=pid, nspawn=proc, log_path=log_path)


def _wait_running(container: Container, deadline: float, timeout: float) -> None:
    """Until ``systemctl is-system-running`` says running or degraded; BootError otherwise."""
    state = ""
    while time.monotonic() < deadline:
        if container.nspawn.poll() is not None:
            raise BootError(f"systemd-nspawn exited with {container.nspawn.returncode}", container.console())
        r = subprocess.run(
            ["nsenter", "-t", str(container.pid), "-a", "systemctl", "is-system-running"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        state = r.stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.2)
    failed = container.systemctl("--failed", "--no-legend", check=False).stdout
    raise BootError(f"system not running after {timeout:.0f}s (state {state!r}); failed units:\n{failed}",
                    container.console())


def _kill(proc: subprocess.Popen[bytes]) -> None:
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)

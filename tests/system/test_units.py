"""The systemd units and packaging files, checked with systemd's own tools.

* ``systemd-analyze verify --man=no`` on sessionguard.service + sessionguard.socket:
  it only *warns* (exit 0) on unknown keys or bad values, so ANY stderr fails.
* ``systemd-analyze security --offline=yes --threshold=20``: exposure <= 2.0.
* sysusers.d / tmpfiles.d applied to a scratch root; sysctl.d and the default
  TOML parsed.
* In a booted container (tests/system/nspawn.py): the real hardened
  sessionguard.service + socket run a stand-in daemon (a stdlib-only Python
  script at /opt/sessionguard/bin/sessionguardd) that probes what the real
  daemon will need under that sandbox: socket activation with fd name
  "control", sd_notify READY/STATUS/WATCHDOG through PrivateNetwork=yes,
  inotify via ctypes under MemoryDenyWriteExecute=yes, writing/linking in the
  watched directory under ProtectSystem=strict, SO_PEERCRED, SIGHUP reload.

None of this imports the sessionguard package.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import nspawn
import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "sessionguard.service"
SOCKET = REPO / "packaging" / "systemd" / "sessionguard.socket"
SYSUSERS = REPO / "packaging" / "sysusers.d" / "sessionguard.conf"
TMPFILES = REPO / "packaging" / "tmpfiles.d" / "sessionguard.conf"
SYSCTL = REPO / "packaging" / "sysctl.d" / "60-sessionguard-inotify.conf"
TOML = REPO / "packaging" / "sessionguard.toml"
EXEC_START = "/opt/sessionguard/bin/sessionguardd"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def unit_copies(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of both units in one directory, ExecStart= pointing at /bin/true.

    ``systemd-analyze verify`` insists that ExecStart= names an existing
    executable; /opt/sessionguard/bin/sessionguardd exists only once the package
    is installed.  Only the path is rewritten -- the arguments and every other
    line are verified as shipped.  Both units sit in one directory so that the
    service's Requires=sessionguard.socket resolves.
    """
    text = SERVICE.read_text()
    assert f"ExecStart={EXEC_START} " in text
    service = tmp_path / "sessionguard.service"
    service.write_text(text.replace(f"ExecStart={EXEC_START} ", "ExecStart=/bin/true ", 1))
    socket = tmp_path / "sessionguard.socket"
    socket.write_text(SOCKET.read_text())
    return service, socket


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@needs_analyze
def test_verify_units_no_output(tmp_path: Path) -> None:
    service, socket = unit_copies(tmp_path)
    r = analyze("verify", "--man=no", f"./{service.name}", f"./{socket.name}", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", f"rc={r.returncode}\n{r.stderr}"


@needs_analyze
def test_security_exposure_below_2(tmp_path: Path) -> None:
    service, _ = unit_copies(tmp_path)
    r = analyze("security", "--offline=yes", "--threshold=20", f"./{service.name}", cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    print(f"exposure {m.group(1)}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert float(m.group(1)) < 2.0


def test_service_has_required_settings() -> None:
    """The lines the daemon and the docs rely on, stated once more."""
    text = SERVICE.read_text()
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "SyslogIdentifier=sessionguard",
        "User=sessionguard",
        "Group=sessionguard",
        f"ExecStart={EXEC_START} --config /etc/sessionguard/sessionguard.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=sessionguard",
        "RuntimeDirectory=sessionguard",
        "ConfigurationDirectory=sessionguard",
        "ProtectSystem=strict",
        "ReadWritePaths=-/var/lib/hermes/sessions",
        "ProtectHome=yes",
        "PrivateNetwork=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "MemoryDenyWriteExecute=yes",
        "TimeoutStartSec=2min",
        "MemoryHigh=1536M",
        "MemoryMax=2G",
    ]:
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    sock = SOCKET.read_text()
    for line in [
        "ListenStream=/run/sessionguard.sock",
        "SocketMode=0660",
        "FileDescriptorName=control",
        "Service=sessionguard.service",
    ]:
        assert re.search(rf"^{re.escape(line)}$", sock, re.M), line


def test_default_config_parses() -> None:
    cfg = tomllib.loads(TOML.read_text())
    assert cfg["daemon"]["socket"] == "/run/sessionguard.sock"
    assert cfg["daemon"]["read_group"] == "sessionguard"
    assert cfg["daemon"]["admin_group"] == "sessionguard-admin"
    (watch,) = cfg["watch"]
    assert watch["path"] == "/var/lib/hermes/sessions"
    assert set(watch) == {
        "path", "pattern", "exclude", "recursive", "count", "intent_keys", "store", "store_owner",
        "pin", "max_file_bytes", "keep_last", "max_age_days", "max_store_bytes",
    }


def test_sysctl_file() -> None:
    values = {}
    for raw in SYSCTL.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            values[key.strip()] = int(value)
    assert set(values) == {"fs.inotify.max_user_watches", "fs.inotify.max_queued_events"}
    assert values["fs.inotify.max_user_watches"] >= 65536
    assert values["fs.inotify.max_queued_events"] >= 16384


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        (etc / name).touch()
    r = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    passwd = (etc / "passwd").read_text()
    assert re.search(r"^sessionguard:x:\d+:\d+:[^:]*:/var/lib/sessionguard:/usr/sbin/nologin$", passwd, re.M)
    groups = {line.split(":")[0] for line in (etc / "group").read_text().splitlines()}
    assert {"sessionguard", "sessionguard-admin"} <= groups
    r = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(TMPFILES)],
        capture_output=True, text=True, check=False,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (etc / "sessionguard").is_dir()


# --------------------------------------------------------------------------- #
# the hardened unit, running for real


# A stand-in for sessionguardd: stdlib only, runs under the shipped unit's
# sandbox and reports what worked.  Answers one JSON line per connection.
STUB = r'''#!/usr/bin/python3
import ctypes, errno, json, os, signal, socket, sys, threading, time, tomllib

assert sys.argv[1:] == ["--config", "/etc/sessionguard/sessionguard.toml"], sys.argv
cfg = tomllib.load(open(sys.argv[2], "rb"))
watch_dir = cfg["watch"][0]["path"]

def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.send(msg.encode())
    s.close()

probes = {"uid": os.getuid(), "gid": os.getgid()}
# socket activation
assert os.environ.get("LISTEN_PID") == str(os.getpid())
probes["listen_fds"] = int(os.environ["LISTEN_FDS"])
probes["listen_fdnames"] = os.environ.get("LISTEN_FDNAMES")
listener = socket.socket(fileno=3)
# inotify through ctypes under MemoryDenyWriteExecute=yes
libc = ctypes.CDLL(None, use_errno=True)
ifd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
wd = libc.inotify_add_watch(ifd, watch_dir.encode(), 0x00000008 | 0x00000080 | 0x00000100)
probes["inotify"] = ifd >= 0 and wd >= 0
# durable writes in the watched dir (ProtectSystem=strict + ReadWritePaths=)
store = os.path.join(watch_dir, ".sessionguard")
os.makedirs(store, exist_ok=True)
tmp = os.path.join(store, "probe.tmp")
with open(tmp, "w") as f:
    f.write("{}")
    f.flush(); os.fsync(f.fileno())
os.replace(tmp, os.path.join(store, "probe.json"))
if os.path.exists(os.path.join(store, "probe.link")):
    os.unlink(os.path.join(store, "probe.link"))
os.link(os.path.join(store, "probe.json"), os.path.join(store, "probe.link"))
probes["store_mode"] = oct(os.stat(os.path.join(store, "probe.json")).st_mode & 0o777)
# a filtered syscall must fail with EPERM, not kill us (SystemCallErrorNumber=EPERM)
try:
    os.chown(os.path.join(store, "probe.json"), os.getuid(), os.getgid())
    probes["chown"] = "allowed"
except OSError as e:
    probes["chown"] = errno.errorcode[e.errno]
# writing outside ReadWritePaths must fail
try:
    open("/var/lib/not-allowed", "w")
    probes["write_var_lib"] = "allowed"
except OSError as e:
    probes["write_var_lib"] = errno.errorcode[e.errno]
# no IP at all
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probes["af_inet"] = "allowed"
except OSError as e:
    probes["af_inet"] = errno.errorcode[e.errno]
probes["state_dir"] = os.environ.get("STATE_DIRECTORY")
probes["runtime_dir"] = os.environ.get("RUNTIME_DIRECTORY")
probes["watchdog_usec"] = os.environ.get("WATCHDOG_USEC")
probes["hups"] = 0

def on_hup(*_):
    probes["hups"] += 1
    notify("RELOADING=1")
    notify("READY=1")
signal.signal(signal.SIGHUP, on_hup)

def pinger():
    period = int(os.environ["WATCHDOG_USEC"]) / 2e6
    while True:
        notify("WATCHDOG=1")
        time.sleep(period)
threading.Thread(target=pinger, daemon=True).start()

notify("READY=1\nSTATUS=stub watching %s" % watch_dir)
while True:
    conn, _ = listener.accept()
    pid, uid, gid = __import__("struct").unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    answer = dict(probes, peer_uid=uid, peer_gid=gid, peer_proc_visible=os.path.exists(f"/proc/{pid}"))
    conn.sendall(json.dumps(answer).encode() + b"\n")
    conn.close()
'''

CLIENT = r'''
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("/run/sessionguard.sock")
print(s.makefile().readline())
'''


def check_probes(c: nspawn.Container, probes: dict[str, Any]) -> None:
    """What the stand-in daemon found under the shipped sandbox."""
    print(json.dumps(probes, indent=1, sort_keys=True))
    assert probes["listen_fds"] == 1 and probes["listen_fdnames"] == "control"
    assert probes["inotify"] is True
    assert probes["store_mode"] == "0o640"  # UMask=0027
    assert probes["chown"] == "EPERM"
    assert probes["write_var_lib"] in ("EROFS", "EACCES")
    assert probes["af_inet"] in ("EAFNOSUPPORT", "EPERM", "EACCES")
    assert probes["state_dir"] == "/var/lib/sessionguard"
    assert probes["runtime_dir"] == "/run/sessionguard"
    assert probes["peer_uid"] == 0
    assert probes["peer_proc_visible"] is False  # ProtectProc=invisible
    owner = c.run(["stat", "-c", "%U", "/var/lib/hermes/sessions/.sessionguard/probe.json"]).stdout
    assert owner.strip() == "sessionguard"


@pytest.mark.root
@pytest.mark.slow
def test_hardened_service_in_container(nspawn_ok: None, tmp_path: Path) -> None:
    stub = tmp_path / "sessionguardd"
    stub.write_text(STUB)
    stub.chmod(0o755)
    with nspawn.booted_systemd(
        units=[SERVICE, SOCKET],
        ro_binds=[
            (stub, EXEC_START),
            (SYSUSERS, "/etc/sysusers.d/sessionguard.conf"),
            (TMPFILES, "/etc/tmpfiles.d/sessionguard.conf"),
            (TOML, "/etc/sessionguard/sessionguard.toml"),
        ],
    ) as c:
        print(f"container booted in {c.boot_seconds:.1f}s")
        # the harness keeps bound units from being preset-enabled and started at boot
        assert c.systemctl("is-active", "sessionguard.service", check=False).stdout.strip() == "inactive"
        # sysusers.d was applied by the container's boot
        assert c.run(["getent", "passwd", "sessionguard"]).stdout.startswith("sessionguard:")
        assert c.run(["getent", "group", "sessionguard-admin"]).returncode == 0
        # the watched dir as an operator would prepare it (see packaging/README.md)
        c.run("mkdir -p /var/lib/hermes/sessions && chown sessionguard:sessionguard /var/lib/hermes/sessions")
        c.systemctl("start", "sessionguard.socket")
        assert c.run(["stat", "-c", "%a %U %G %F", "/run/sessionguard.sock"]).stdout.split() == [
            "660", "sessionguard", "sessionguard", "socket",
        ]
        c.systemctl("start", "sessionguard.service", timeout=40)
        props = c.show("sessionguard.service", "ActiveState", "SubState", "StatusText", "WatchdogUSec", "NRestarts")
        assert props["ActiveState"] == "active" and props["SubState"] == "running", (
            props, c.journal("sessionguard.service"))
        assert props["StatusText"] == "stub watching /var/lib/hermes/sessions"
        assert props["WatchdogUSec"] == "30s"
        assert props["NRestarts"] == "0"

        check_probes(c, json.loads(c.run(["python3", "-c", CLIENT]).stdout))

        # ExecReload= delivers SIGHUP
        c.systemctl("reload", "sessionguard.service")
        assert json.loads(c.run(["python3", "-c", CLIENT]).stdout)["hups"] == 1

        # a user outside group sessionguard cannot connect; a member can
        c.run("useradd -M -N -g users outsider && useradd -M -N -g users -G sessionguard reader")
        r = c.run(["python3", "-c", CLIENT], user="outsider", check=False)
        assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
        r = c.run(["python3", "-c", CLIENT], user="reader")
        assert json.loads(r.stdout)["peer_uid"] == int(c.run(["id", "-u", "reader"]).stdout)

        # stopping the service keeps the socket (it is not in RuntimeDirectory=)
        c.systemctl("stop", "sessionguard.service")
        assert c.run(["test", "-S", "/run/sessionguard.sock"], check=False).returncode == 0
        assert c.run(["test", "-e", "/run/sessionguard"], check=False).returncode != 0
        # ... and a connection starts the service again (socket activation)
        r = c.run(["python3", "-c", CLIENT], timeout=40)
        assert json.loads(r.stdout)["listen_fdnames"] == "control"
        assert c.is_active("sessionguard.service")
        journal = c.journal("sessionguard.service")
        assert "SIGSYS" not in journal and "code=dumped" not in journal, journal

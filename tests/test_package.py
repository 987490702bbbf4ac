"""The built .deb (packaging/deb/build.sh): contents, ELF files, lintian, man pages, completion, size.

Nothing is installed here: the package is listed and unpacked with dpkg-deb
(installing, smoke-testing and purging it is packaging/deb/smoke-test.sh, run by
CI). The man pages and completion are checked against the commands' own
``--help`` output, an oracle independent of the generator (packaging/gen/docs.py),
so a flag or subcommand added to the code and missing from the docs fails here.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from debbuild import built_deb

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = REPO / "packaging" / "deb" / "lintian-overrides"
CTL = [sys.executable, "-m", "sessionguard.ctl"]
DAEMON = [sys.executable, "-m", "sessionguard.daemon"]
UNWANTED = re.compile(r"(__pycache__|\.pyc$|/activate|Activate\.ps1|/bin/watchmedo|/pip/|/setuptools/|/pkg_resources/"
                      r"|_distutils_hack|/pip-|/setuptools-)")


@pytest.fixture(scope="module")
def deb() -> Path:
    return built_deb()


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkgroot")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
    return root


def listing(deb: Path) -> list[str]:
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True).stdout
    return [line.split(None, 5)[5].split(" -> ")[0].lstrip(".") for line in out.splitlines()]


def test_contents_are_only_what_runs(deb: Path) -> None:
    paths = listing(deb)
    assert not [p for p in paths if UNWANTED.search(p)], [p for p in paths if UNWANTED.search(p)]
    for needed in ("/usr/bin/sessionguardd", "/usr/bin/sessionguardctl", "/opt/sessionguard/bin/sessionguardd",
                   "/opt/sessionguard/lib/python3.11/site-packages/systemd",
                   "/usr/share/man/man8/sessionguardd.8.gz", "/usr/share/man/man1/sessionguardctl.1.gz",
                   "/usr/share/man/man5/sessionguard.toml.5.gz",
                   "/usr/share/bash-completion/completions/sessionguardctl",
                   "/usr/share/zsh/vendor-completions/_sessionguardctl",
                   "/usr/share/doc/sessionguard/copyright", "/usr/share/doc/sessionguard/changelog.gz",
                   "/usr/share/doc/sessionguard/examples/rsyslog.conf",
                   "/usr/share/lintian/overrides/sessionguard", "/lib/systemd/system/sessionguard.service"):
        assert needed in paths, needed
    bins = sorted(p for p in paths if p.startswith("/opt/sessionguard/bin/") and p != "/opt/sessionguard/bin/")
    assert [b.rsplit("/", 1)[1] for b in bins] == ["python", "python3", "python3.11", "sessionguardctl",
                                                    "sessionguardd"]


def test_no_elf_file_has_a_runpath(unpacked: Path) -> None:
    elves = [p for p in unpacked.rglob("*") if p.is_file() and not p.is_symlink()
             and p.open("rb").read(4) == b"\x7fELF"]
    assert elves, "orjson ships an extension module"
    for elf in elves:
        dyn = subprocess.run(["readelf", "-d", str(elf)], check=True, capture_output=True, text=True).stdout
        assert not re.search(r"\((RPATH|RUNPATH)\)", dyn), (elf, dyn)


def test_the_venv_runs_on_debians_python_and_python3_systemd(unpacked: Path) -> None:
    venv = unpacked / "opt" / "sessionguard"
    assert os.readlink(venv / "bin" / "python3.11") == "/usr/bin/python3.11"
    assert os.readlink(venv / "bin" / "python") == "python3.11"
    assert "home = /usr/bin" in (venv / "pyvenv.cfg").read_text()
    link = venv / "lib" / "python3.11" / "site-packages" / "systemd"
    assert os.readlink(link) == "/usr/lib/python3/dist-packages/systemd"
    shebang = (venv / "bin" / "sessionguardctl").read_text().splitlines()[0]
    assert shebang == "#!/opt/sessionguard/bin/python"


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True, text=True).stdout.strip()


def test_depends_name_debians_packages_and_libc(deb: Path) -> None:
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    assert "python3-systemd" in depends and "python3.11" in depends
    assert any(d.startswith("libc6 (>= ") for d in depends), depends
    assert "@localhost" not in field(deb, "Maintainer")


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed (scripts/bootstrap installs it)")
def test_lintian_has_no_errors_or_warnings(deb: Path) -> None:
    r = subprocess.run(["lintian", "--fail-on", "none", str(deb)], capture_output=True, text=True, timeout=600,
                       check=False)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    assert not [line for line in r.stdout.splitlines() if line.startswith(("E:", "W:"))], r.stdout


def test_every_lintian_override_is_justified() -> None:
    comment = False
    for line in OVERRIDES.read_text().splitlines():
        if line.startswith("#"):
            comment = True
        elif line.strip():
            assert comment, f"override without a comment saying why: {line}"
        else:
            comment = False


def help_of(cmd: list[str]) -> str:
    return subprocess.run([*cmd, "--help"], check=True, capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200")).stdout


def options_in(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", help_text.split("\n\n", 1)[1])) - {"-h", "--help"}


def subcommands() -> list[str]:
    """sessionguardctl's subcommands, as its --help lists them under COMMAND."""
    text = help_of(CTL)
    block = text.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^    ([a-z][\w-]*)\s", block, re.M)


def man_text(unpacked: Path, section: str, name: str) -> str:
    page = unpacked / "usr" / "share" / "man" / f"man{section}" / f"{name}.{section}.gz"
    raw = gzip.decompress(page.read_bytes())
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-"], input=raw, capture_output=True, check=False,
                       env=dict(os.environ, MANWIDTH="200", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING=""))
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    return re.sub(r".\x08", "", r.stdout.decode()).replace("‐", "-")


def test_man_pages_cover_every_flag_and_subcommand(unpacked: Path) -> None:
    commands = subcommands()
    assert {"status", "restore", "history"} <= set(commands), commands
    ctl_page = man_text(unpacked, "1", "sessionguardctl")
    assert options_in(help_of(CTL)) <= set(re.findall(r"--?[\w-]+", ctl_page))
    for command in commands:
        assert f"sessionguardctl {command}" in ctl_page, command
        missing = options_in(help_of([*CTL, command])) - set(re.findall(r"--?[\w-]+", ctl_page))
        assert not missing, (command, missing)
    daemon_page = man_text(unpacked, "8", "sessionguardd")
    assert not options_in(help_of(DAEMON)) - set(re.findall(r"--?[\w-]+", daemon_page))
    assert "exit codes" in daemon_page


def test_config_man_page_names_every_key(unpacked: Path) -> None:
    from sessionguard.config import SCHEMA

    page = man_text(unpacked, "5", "sessionguard.toml")
    for key in SCHEMA:
        assert re.search(rf"^\s+{re.escape(key.name)}\b", page, re.M), key.dotted
        assert key.help.split()[0] in page, key.dotted
    assert page.count("needs a restart") == sum(not k.reloadable for k in SCHEMA)


def bash_complete(unpacked: Path, words: list[str]) -> set[str]:
    script = unpacked / "usr" / "share" / "bash-completion" / "completions" / words[0]
    line = " ".join(words)
    probe = (f'source "{script}"; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE="{line}"; '
             f"COMP_POINT=${{#COMP_LINE}}; $(complete -p {words[0]} | sed 's/.*-F \\([^ ]*\\) .*/\\1/'); "
             'printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    return set(r.stdout.split())


def test_bash_completion_offers_every_subcommand_and_flag(unpacked: Path) -> None:
    commands = subcommands()
    assert bash_complete(unpacked, ["sessionguardctl", ""]) >= set(commands)
    for command in commands:
        offered = bash_complete(unpacked, ["sessionguardctl", command, "-"])
        assert options_in(help_of([*CTL, command])) <= offered, (command, offered)
    assert options_in(help_of(DAEMON)) <= bash_complete(unpacked, ["sessionguardd", "-"])


def test_zsh_completion_names_every_subcommand(unpacked: Path) -> None:
    text = (unpacked / "usr" / "share" / "zsh" / "vendor-completions" / "_sessionguardctl").read_text()
    assert text.startswith("#compdef sessionguardctl")
    for command in subcommands():
        assert re.search(rf"\b{command}\b", text), command


def test_readme_states_the_installed_size(deb: Path) -> None:
    mb = int(field(deb, "Installed-Size")) / 1000
    # a third of what it was before the venv lost setuptools and pkg_resources (9.1 MB of
    # the 12.8); the event path's simdjson parser is 0.7 MB of today's
    assert mb < 12.8 / 3, f"{mb:.1f} MB installed"
    stated = re.search(r"installs ([\d.]+) MB \(was 12\.8 MB\)", (REPO / "README.md").read_text())
    assert stated, "README's install section states the installed size next to the old 12.8 MB"
    assert abs(float(stated.group(1)) - mb) <= 0.2, (stated.group(0), mb)

"""Man pages and shell completion, generated from the code at package build time.

    python packaging/gen/docs.py OUTDIR

writes ``OUTDIR/man/{sessionguardd.8, sessionguardctl.1, sessionguard.toml.5}``
and ``OUTDIR/completion/{bash,zsh}/…``. The two command pages and the
completion come from ``daemon.build_parser()`` and ``ctl.build_parser()``
(through argparse-manpage and shtab, which read argparse parsers), the
configuration page from :data:`sessionguard.config.SCHEMA`: whatever flags,
subcommands or keys the code has, the documentation has, with no list kept
by hand. Both tools are build-time only, pinned by hash in
``packaging/deb/build-requirements.lock``.

Dates come from ``SOURCE_DATE_EPOCH`` (the build sets it from the changelog),
so the same tree gives the same bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

from sessionguard import __version__, config, ctl, daemon

MANUAL = "sessionguard"
SEE_ALSO = {
    "sessionguardd": r"\fBsessionguardctl\fR(1), \fBsessionguard.toml\fR(5), \fBsystemd.service\fR(5)",
    "sessionguardctl": r"\fBsessionguardd\fR(8), \fBsessionguard.toml\fR(5)",
}
FILES = r"""
.TP
.I /etc/sessionguard/sessionguard.toml
the configuration, see \fBsessionguard.toml\fR(5)
.TP
.I /run/sessionguard.sock
the system daemon's control socket (\fBsessionguard.socket\fR)
.TP
.I <watched directory>/.sessionguard/
the default store of kept versions; \fIREADME.txt\fR in it says how to restore by hand
"""


def roff(text: str) -> str:
    """*text* safe as roff body text: backslashes, hyphens and leading control characters escaped."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in out.splitlines())


def command_page(parser: argparse.ArgumentParser, section: int, summary: str) -> str:
    """The man page of one command, from its parser; FILES and SEE ALSO added."""
    page = Manpage(parser)
    page.source = f"{MANUAL} {__version__}"
    page.manual = MANUAL
    page.section = section
    page.description = summary
    return str(page).rstrip("\n") + f"\n.SH FILES{FILES}.SH SEE ALSO\n{SEE_ALSO[parser.prog]}\n"


def _date() -> str:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def _key_entry(key: config.Key) -> list[str]:
    notes = [f"Type: {key.constraint()}.", f"Default: {key.default}."]
    if not key.reloadable:
        notes.append("A change needs a restart: SIGHUP (systemctl reload) cannot apply it.")
    return [".TP", f"\\fB{roff(key.name)}\\fR", roff(key.help), ".br", roff(" ".join(notes))]


def config_page() -> str:
    """sessionguard.toml(5), one entry per key of :data:`config.SCHEMA`."""
    lines = [
        f'.TH SESSIONGUARD.TOML 5 "{_date()}" "{MANUAL} {__version__}" "{MANUAL}"',
        ".SH NAME", "sessionguard.toml \\- configuration of sessionguardd",
        ".SH SYNOPSIS", f".I {config.DEFAULT_CONFIG_FILE}",
        ".SH DESCRIPTION",
        roff("A TOML file with one [daemon] table and one [[watch]] table per watched session directory. "
             "sessionguardd reads it at start (--config FILE, else this path when it exists) and again on "
             "SIGHUP; an invalid file is refused with one line per problem, naming the file and the key, "
             "and exit code 2 (on SIGHUP the running configuration is kept). Numbers must be finite "
             "(nan and inf are refused) and paths absolute (or starting with ~). "
             "sessionguardd --check-config prints the effective configuration, every key of every watch, "
             "and warns about a watch directory that is missing or not a directory."),
    ]
    for table, title in (("daemon", "[daemon]"), ("watch", "[[watch]]")):
        lines += [".SH " + title]
        lines += [entry for key in config.SCHEMA if key.table == table for entry in _key_entry(key)]
    lines += [
        ".SH EXAMPLE", ".nf",
        "[daemon]", "log_level = \"info\"", "", "[[watch]]", "path = \"/var/lib/hermes/sessions\"",
        "keep_last = 20", ".fi",
        ".SH SEE ALSO", r"\fBsessionguardd\fR(8), \fBsessionguardctl\fR(1)",
    ]
    return "\n".join(lines) + "\n"


def generate(out: Path) -> list[Path]:
    """Write every page and completion file under *out*; the paths written."""
    files = {
        out / "man" / "sessionguardd.8": command_page(
            daemon.build_parser(), 8, "keep the prior version of chat session files that a write shrinks"),
        out / "man" / "sessionguardctl.1": command_page(
            ctl.build_parser(), 1, "inspect and restore the versions kept by sessionguardd"),
        out / "man" / "sessionguard.toml.5": config_page(),
    }
    for prog, parser in (("sessionguardd", daemon.build_parser()), ("sessionguardctl", ctl.build_parser())):
        files[out / "completion" / "bash" / prog] = shtab.complete(parser, shell="bash")
        files[out / "completion" / "zsh" / f"_{prog}"] = shtab.complete(parser, shell="zsh")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sorted(files)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: docs.py OUTDIR")
    for written in generate(Path(sys.argv[1])):
        print(written)

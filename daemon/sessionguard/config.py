"""Configuration: a TOML file plus command-line flags → one frozen :class:`Config`.

One table, :data:`SCHEMA`, says for every key its type, default, constraints,
help text and whether SIGHUP can apply a change. It drives the validation
below, ``--check-config`` (:func:`check_config`) and the ``sessionguard.toml(5)``
man page, so the three cannot disagree.

Invalid configuration is one :class:`ConfigError` listing *every* problem, one
line each, naming the file and the key; the daemon prints it and exits 2
before starting anything.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, TextIO

from .count import DEFAULT_MAX_BYTES, CountSpec
from .errors import ConfigError
from .paths import default_socket_path
from .pins import zstd_available
from .retention import Retention
from .store import STORE_DIRNAME

__all__ = ["SCHEMA", "Config", "ConfigError", "Key", "WatchConfig", "check_config", "from_args", "load_file",
           "needs_restart", "render", "warnings"]

DEFAULT_CONFIG_FILE = "/etc/sessionguard/sessionguard.toml"
DEFAULT_EXCLUDE = ("_*", ".*", "*.tmp*", "*.bak*")
DEFAULT_INTENT_KEYS = ("intentional_shrink_generation", "clear_generation")
LOG_FORMATS = ("auto", "json", "console", "journal")
LOG_LEVELS = ("debug", "info", "warning", "error")
PIN_METHODS = ("auto", "copy", "link", "zstd")
STORE_OWNERS = ("daemon", "directory")


def default_watch_dir() -> str:
    """hermes-webui's session directory: ``$HERMES_WEBUI_STATE_DIR/sessions``,
    else ``~/.hermes/webui/sessions``."""
    state = os.environ.get("HERMES_WEBUI_STATE_DIR")
    if state:
        return os.path.join(state, "sessions")
    return os.path.join(os.path.expanduser("~"), ".hermes", "webui", "sessions")


@dataclass(frozen=True)
class WatchConfig:
    """One watched session directory and how to treat it."""

    path: str
    pattern: str = "*.json"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    recursive: bool = False
    count: str = "messages"
    intent_keys: tuple[str, ...] = DEFAULT_INTENT_KEYS
    store: str = ""
    store_owner: str = "daemon"
    pin: str = "auto"
    max_file_bytes: int = DEFAULT_MAX_BYTES
    retention: Retention = field(default_factory=Retention)

    @property
    def store_path(self) -> str:
        return self.store or os.path.join(self.path, STORE_DIRNAME)


@dataclass(frozen=True)
class Config:
    """Everything the daemon runs with."""

    watches: tuple[WatchConfig, ...]
    socket: str = field(default_factory=default_socket_path)
    reconcile_interval: float = 30.0
    restore_recent_seconds: float = 60.0
    scan_processes: int = 0
    log_format: str = "auto"
    log_level: str = "info"
    read_group: str = "sessionguard"
    admin_group: str = "sessionguard-admin"
    metrics_textfile: str = ""
    source: str | None = None


# -- the schema ------------------------------------------------------------------

#: Value kinds: what TOML type is accepted and how it is checked.
KINDS = {
    "string": "a string",
    "path": "an absolute path (or ~/…)",
    "choice": "one of the listed strings",
    "bool": "true or false",
    "integer": "an integer",
    "number": "a finite number",
    "strings": "a list of strings",
}


@dataclass(frozen=True)
class Key:
    """One configuration key: everything validation, ``--check-config`` and the man page need."""

    table: str  # "daemon" or "watch"
    name: str
    kind: str  # a key of KINDS
    default: str  # as written in TOML (the man page and the shipped file show it)
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    exclusive: bool = False  # minimum itself is refused
    empty_ok: bool = False  # paths: "" means "not set"
    required: bool = False
    reloadable: bool = True  # False: a SIGHUP cannot apply a change (needs a restart)
    check: Callable[[Any], str | None] | None = None  # extra check: None, or what is wrong

    @property
    def dotted(self) -> str:
        return f"{self.table}.{self.name}"

    def constraint(self) -> str:
        """The constraint in words, for ``--check-config`` errors and the man page."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.minimum is not None:
            return f"{KINDS[self.kind]} {'>' if self.exclusive else '≥'} {self.minimum:g}"
        if self.kind == "path":
            return KINDS["path"] + (', or "" for none' if self.empty_ok else "")
        return KINDS[self.kind]


def _count_problem(value: Any) -> str | None:
    try:
        CountSpec.parse(value)
    except ValueError as exc:
        return str(exc)
    return None


_D, _W = "daemon", "watch"
SCHEMA: tuple[Key, ...] = (
    Key(_D, "socket", "path", '"/run/sessionguard.sock"', "Control socket. Default /run/sessionguard.sock as root, "
        "else $XDG_RUNTIME_DIR/sessionguard.sock. Under systemd the socket comes from sessionguard.socket and "
        "this is only the path named in logs.", reloadable=False),
    Key(_D, "reconcile_interval", "number", "30", "Seconds between stat-only reconciliation passes "
        "(they catch changes inotify did not report).", minimum=0, exclusive=True),
    Key(_D, "restore_recent_seconds", "number", "60", "restore and recover warn when the live session file "
        "was written less than this many seconds ago (the server may still hold the session in memory).",
        minimum=0),
    Key(_D, "scan_processes", "integer", "0", "Processes that pin the sessions a start without pins.cache "
        "finds without a pin, beside the daemon (from the 1,001st on). 0: one per CPU the daemon may run on, "
        "at most 4 (none on one CPU); 1: none, the daemon pins every session itself.", minimum=0,
        reloadable=False),
    Key(_D, "log_format", "choice", '"auto"', "auto: journal under systemd, console on a terminal, "
        "else JSON lines on stdout.", choices=LOG_FORMATS, reloadable=False),
    Key(_D, "log_level", "choice", '"info"', "Lowest level logged.", choices=LOG_LEVELS),
    Key(_D, "read_group", "string", '"sessionguard"', "Members may call the control socket's read methods.",
        reloadable=False),
    Key(_D, "admin_group", "string", '"sessionguard-admin"', "Members may also restore, recover, forget "
        "and prune.", reloadable=False),
    Key(_D, "metrics_textfile", "path", '""', "If set, Prometheus text written atomically to this file after "
        "each reconciliation (node_exporter's textfile collector).", empty_ok=True),
    Key(_W, "path", "path", "(required)", "The session directory.", required=True),
    Key(_W, "pattern", "string", '"*.json"', "Glob of session file names; the id is the name minus the suffix."),
    Key(_W, "exclude", "strings", '["_*", ".*", "*.tmp*", "*.bak*"]', "Globs of names that are never sessions: "
        "the server's own files (_index.json), hidden files and the store, tmp files, backups."),
    Key(_W, "recursive", "bool", "false", "Also watch sub-directories (a file sub/x.json has the id sub%2Fx)."),
    Key(_W, "count", "string", '"messages"', "What is counted: a top-level key, a JSON pointer (/data/messages) "
        'or "jsonl" (lines).', check=_count_problem),
    Key(_W, "intent_keys", "strings", '["intentional_shrink_generation", "clear_generation"]',
        "A shrink whose new file changes one of these top-level values is intended (logged at info)."),
    Key(_W, "store", "path", '""', "Store location; empty: <path>/.sessionguard (same filesystem: reflinks "
        "and hard links work).", empty_ok=True),
    Key(_W, "store_owner", "choice", '"daemon"', "daemon: the store belongs to the daemon's user; directory: "
        "shared with the watched directory's owner (a server embedding the library writes it too).",
        choices=STORE_OWNERS),
    Key(_W, "pin", "choice", '"auto"', "How prior versions are held: auto (reflink, else copy), copy, link "
        "(hard link: only for writers that replace files by rename), zstd (compressed copies: for a filesystem "
        "without reflinks; needs the zstandard package; versions stay plain).",
        choices=PIN_METHODS),
    Key(_W, "max_file_bytes", "integer", "268435456", "Larger files are never read (unparseable; the last good "
        "version is kept).", minimum=0),
    Key(_W, "keep_last", "integer", "10", "The newest N versions of each session are always kept.", minimum=0),
    Key(_W, "max_age_days", "number", "365", "Older versions (beyond keep_last) are dropped.", minimum=0),
    Key(_W, "max_store_bytes", "integer", "0", "Cap on the store's size; 0: no cap. The newest and the "
        "high-water version of a session are never removed.", minimum=0),
)
_BY_TABLE: dict[str, dict[str, Key]] = {t: {k.name: k for k in SCHEMA if k.table == t} for t in (_D, _W)}
_RETENTION_KEYS = ("keep_last", "max_age_days", "max_store_bytes")


# -- validation --------------------------------------------------------------------


def _type_ok(key: Key, value: Any) -> bool:
    if key.kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int in Python, but `keep_last = true` is a mistake
        return False
    if key.kind == "integer":
        return isinstance(value, int)
    if key.kind == "number":
        return isinstance(value, (int, float))
    if key.kind == "strings":
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    return isinstance(value, str)


def _problem(key: Key, value: Any) -> str | None:
    """What is wrong with *value* for *key*, or None."""
    if not _type_ok(key, value):
        return f"must be {key.constraint()}, got {type(value).__name__} {value!r}"
    if key.kind == "number" and not math.isfinite(value):
        return f"must be {key.constraint()}, got {value!r}"
    if key.minimum is not None and (value < key.minimum or (key.exclusive and value == key.minimum)):
        return f"must be {key.constraint()}, got {value!r}"
    if key.choices and value not in key.choices:
        return f"must be {key.constraint()}, got {value!r}"
    if key.kind == "path" and not (key.empty_ok and value == ""):
        if not value:
            return "must not be empty"
        if "\0" in value:
            return "must not contain NUL"
        if not os.path.isabs(os.path.expanduser(value)):
            return f"must be an absolute path, got {value!r} (relative paths would depend on the working directory)"
    if key.table == _W and key.name == "pattern" and not value:
        return "must not be empty"
    return key.check(value) if key.check else None


def _checked(table: str, raw: dict[str, Any], where: str, source: str, errors: list[str], *,
             whole: bool = True) -> dict[str, Any]:
    """The valid entries of *raw*; a line per problem appended to *errors*.

    *whole*: *raw* is a whole table (a file's), so required keys must be in it;
    flags bring single keys.
    """
    keys = _BY_TABLE[table]
    good: dict[str, Any] = {}
    for name, value in raw.items():
        key = keys.get(name)
        if key is None:
            errors.append(f"{source}: {where}{name}: unknown key (allowed: {', '.join(keys)})")
            continue
        problem = _problem(key, value)
        if problem:
            errors.append(f"{source}: {where}{name}: {problem}")
        else:
            good[name] = value
    for key in keys.values():
        if whole and key.required and key.name not in raw:
            errors.append(f"{source}: {where}{key.name}: required")
    return good


def _path(value: str) -> str:
    return os.path.normpath(os.path.expanduser(value)) if value else ""


def _watch(raw: dict[str, Any]) -> WatchConfig:
    """A WatchConfig from entries already checked."""
    kept = {k: raw[k] for k in _RETENTION_KEYS if k in raw}
    if "max_age_days" in kept:
        kept["max_age_days"] = float(kept["max_age_days"])
    plain = {k: v for k, v in raw.items() if k not in _RETENTION_KEYS}
    for key in ("exclude", "intent_keys"):
        if key in plain:
            plain[key] = tuple(plain[key])
    for key in ("path", "store"):
        if key in plain:
            plain[key] = _path(plain[key])
    return WatchConfig(retention=Retention(**kept), **plain)


def _daemon(raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for key in ("socket", "metrics_textfile"):
        if key in out:
            out[key] = _path(out[key])
    for key in ("reconcile_interval", "restore_recent_seconds"):
        if key in out:
            out[key] = float(out[key])
    return out


def _duplicates(watches: Iterable[WatchConfig], source: str) -> list[str]:
    """Watches listed twice, and compressed pins without the package that makes them."""
    seen: set[str] = set()
    errors = []
    for i, w in enumerate(watches):
        if w.path in seen:
            errors.append(f"{source}: watch[{i}].path: {w.path} is listed twice")
        seen.add(w.path)
        if w.pin == "zstd" and not zstd_available():
            errors.append(f"{source}: watch[{i}].pin: zstd needs the zstandard package "
                          "(pip install 'sessionguard[zstd]')")
    return errors


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_file(path: str) -> Config:
    """Parse and validate a TOML config file; every problem in one :class:`ConfigError`."""
    raw = _read_toml(path)
    errors: list[str] = []
    for name in raw:
        if name not in (_D, _W):
            errors.append(f"{path}: {name}: unknown table or key (allowed: [daemon], [[watch]])")
    daemon_raw = raw.get(_D, {})
    if not isinstance(daemon_raw, dict):
        errors.append(f"{path}: daemon: must be a table ([daemon])")
        daemon_raw = {}
    daemon = _checked(_D, daemon_raw, "daemon.", path, errors)
    watches_raw = raw.get(_W, [])
    if not isinstance(watches_raw, list):
        errors.append(f"{path}: watch: must be an array of tables ([[watch]])")
        watches_raw = []
    watches = []
    for i, w in enumerate(watches_raw):
        where = f"watch[{i}]."
        if not isinstance(w, dict):
            errors.append(f"{path}: watch[{i}]: must be a table ([[watch]])")
            continue
        before = len(errors)
        good = _checked(_W, w, where, path, errors)
        if len(errors) == before:
            watches.append(_watch(good))
    errors += _duplicates(watches, path)
    if errors:
        raise ConfigError("\n".join(errors))
    return Config(watches=tuple(watches), source=path, **_daemon(daemon))


def from_args(ns: argparse.Namespace) -> Config:
    """Build the config: the file (``--config``, else the default file when
    present), then the flags on top. ``--watch`` replaces the file's watches.
    Flag values are checked against the same schema as the file's."""
    path = ns.config
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    cfg = load_file(path) if path else Config(watches=())
    errors: list[str] = []
    flags = {"socket": ns.socket, "log_format": ns.log_format, "log_level": ns.log_level,
             "reconcile_interval": ns.reconcile_interval, "scan_processes": ns.scan_processes}
    daemon = _checked(_D, {k: v for k, v in flags.items() if v is not None}, "--", "command line", errors,
                      whole=False)
    dirs = [str(os.path.abspath(os.path.expanduser(p))) for p in ns.watch or []]  # a flag is relative to $PWD
    watches = cfg.watches
    if dirs:
        watches = tuple(WatchConfig(path=os.path.normpath(d)) for d in dirs)
    if ns.pin:
        pin = _checked(_W, {"pin": ns.pin}, "--", "command line", errors, whole=False)
        watches = tuple(replace(w, **pin) for w in watches)
    if not watches:
        watches = (WatchConfig(path=default_watch_dir()),)
    errors += _duplicates(watches, "command line")
    if errors:
        raise ConfigError("\n".join(errors))
    return replace(cfg, watches=watches, **_daemon(daemon))


def needs_restart(old: Config, new: Config) -> list[str]:
    """The keys (``daemon.socket``…) whose change between *old* and *new* a SIGHUP cannot apply."""
    return [k.dotted for k in SCHEMA if k.table == _D and not k.reloadable
            and getattr(old, k.name) != getattr(new, k.name)]


# -- --check-config ------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text) + '"'


def _watch_value(w: WatchConfig, name: str) -> Any:
    if name in _RETENTION_KEYS:
        return getattr(w.retention, name)
    return getattr(w, name)


def render(cfg: Config) -> str:
    """The full effective configuration as TOML (every key of every watch); it loads back to *cfg*."""
    lines = [f"# effective configuration (from {cfg.source or 'defaults and flags'})", "", "[daemon]"]
    lines += [f"{k.name} = {_toml(getattr(cfg, k.name))}" for k in SCHEMA if k.table == _D]
    for w in cfg.watches:
        lines += ["", "[[watch]]"]
        lines += [f"{k.name} = {_toml(_watch_value(w, k.name))}" for k in SCHEMA if k.table == _W]
        if not w.store:
            lines.append(f"# store: {w.store_path}")
    return "\n".join(lines) + "\n"


def warnings(cfg: Config) -> list[str]:
    """Problems that do not stop the daemon: a watch directory missing or not a directory (watched once it is)."""
    out = []
    for i, w in enumerate(cfg.watches):
        try:
            st = os.lstat(w.path)
        except OSError as exc:
            why = exc.strerror or str(exc)
        else:
            if stat.S_ISDIR(st.st_mode):
                continue
            why = "a symbolic link: never followed" if stat.S_ISLNK(st.st_mode) else "not a directory"
        out.append(f"{cfg.source or 'command line'}: watch[{i}].path: {w.path}: {why} "
                   "(the daemon reports it and watches it once it is a directory)")
    return out


def check_config(cfg: Config, out: TextIO, err: TextIO) -> int:
    """``--check-config``: the effective configuration on *out*, warnings on *err*; the exit code (0)."""
    out.write(render(cfg))
    for line in warnings(cfg):
        err.write(f"warning: {line}\n")
    return 0


def schema_fields() -> dict[str, set[str]]:
    """The dataclass fields each schema table lands in (a test checks nothing is left out)."""
    return {_D: {f.name for f in fields(Config)} - {"watches", "source"},
            _W: {f.name for f in fields(WatchConfig)} - {"retention"} | set(_RETENTION_KEYS)}

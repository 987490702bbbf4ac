"""Configuration: a TOML file plus command-line flags → one frozen :class:`Config`.

Invalid configuration is one :class:`ConfigError` naming the file and the
key; the daemon prints it and exits 2 before starting anything.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from .count import DEFAULT_MAX_BYTES, CountSpec
from .errors import ConfigError
from .paths import default_socket_path
from .retention import Retention
from .store import STORE_DIRNAME

PIN_POLICIES = ("auto", "copy", "link")
STORE_OWNERS = ("daemon", "directory")

DEFAULT_CONFIG_FILE = "/etc/sessionguard/sessionguard.toml"
DEFAULT_EXCLUDE = ("_*", ".*", "*.tmp*", "*.bak*")
DEFAULT_INTENT_KEYS = ("intentional_shrink_generation", "clear_generation")
LOG_FORMATS = ("auto", "json", "console", "journal")
LOG_LEVELS = ("debug", "info", "warning", "error")




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
    pin: str = "auto"
    store_owner: str = "daemon"
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
    log_format: str = "auto"
    log_level: str = "info"
    read_group: str = "sessionguard"
    admin_group: str = "sessionguard-admin"
    metrics_textfile: str = ""
    source: str | None = None


_DAEMON_KEYS: dict[str, type | tuple[type, ...]] = {
    "socket": str,
    "reconcile_interval": (int, float),
    "log_format": str,
    "log_level": str,
    "read_group": str,
    "admin_group": str,
    "metrics_textfile": str,
}
_WATCH_KEYS: dict[str, type | tuple[type, ...]] = {
    "path": str,
    "pattern": str,
    "exclude": list,
    "recursive": bool,
    "count": str,
    "intent_keys": list,
    "store": str,
    "pin": str,
    "store_owner": str,
    "max_file_bytes": int,
    "keep_last": int,
    "max_age_days": (int, float),
    "max_store_bytes": int,
}


_TYPE_NAMES: dict[Any, str] = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
                               (int, float): "a number"}


def _check(table: dict[str, Any], allowed: dict[str, Any], where: str, source: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key {where}{key} (allowed: {', '.join(sorted(allowed))})")
        want = allowed[key]
        # bool is an int subclass in Python, but `keep_last = true` is a mistake.
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise ConfigError(f"{source}: {where}{key} must be {_TYPE_NAMES[want]}, got {type(value).__name__}")


def _watch(raw: dict[str, Any], where: str, source: str) -> WatchConfig:
    _check(raw, _WATCH_KEYS, where, source)
    if "path" not in raw or not raw["path"]:
        raise ConfigError(f"{source}: {where}path is required")
    for key in ("exclude", "intent_keys"):
        if key in raw and not all(isinstance(x, str) for x in raw[key]):
            raise ConfigError(f"{source}: {where}{key} must be a list of strings")
    if raw.get("store_owner", "daemon") not in STORE_OWNERS:
        raise ConfigError(f"{source}: {where}store_owner must be one of {', '.join(STORE_OWNERS)}")
    if raw.get("pin", "auto") not in PIN_POLICIES:
        raise ConfigError(f"{source}: {where}pin must be one of {', '.join(PIN_POLICIES)}")
    try:
        CountSpec.parse(raw.get("count", "messages"))
    except ValueError as exc:
        raise ConfigError(f"{source}: {where}count: {exc}") from None
    for key in ("max_file_bytes", "keep_last", "max_age_days", "max_store_bytes"):
        if key in raw and raw[key] < 0:
            raise ConfigError(f"{source}: {where}{key} must not be negative")
    retention = Retention(
        keep_last=raw.get("keep_last", Retention.keep_last),
        max_age_days=float(raw.get("max_age_days", Retention.max_age_days)),
        max_store_bytes=raw.get("max_store_bytes", Retention.max_store_bytes),
    )
    path = os.path.abspath(os.path.expanduser(raw["path"]))
    store = raw.get("store", "")
    return WatchConfig(
        path=path,
        pattern=raw.get("pattern", "*.json"),
        exclude=tuple(raw.get("exclude", DEFAULT_EXCLUDE)),
        recursive=raw.get("recursive", False),
        count=raw.get("count", "messages"),
        intent_keys=tuple(raw.get("intent_keys", DEFAULT_INTENT_KEYS)),
        store=os.path.abspath(os.path.expanduser(store)) if store else "",
        pin=raw.get("pin", "auto"),
        store_owner=raw.get("store_owner", "daemon"),
        max_file_bytes=raw.get("max_file_bytes", DEFAULT_MAX_BYTES),
        retention=retention,
    )


def load_file(path: str) -> Config:
    """Parse and validate a TOML config file."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(raw) - {"daemon", "watch"}
    if unknown:
        raise ConfigError(f"{path}: unknown table or key {sorted(unknown)[0]!r} (allowed: daemon, watch)")
    daemon = raw.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"{path}: daemon must be a table ([daemon])")
    _check(daemon, _DAEMON_KEYS, "daemon.", path)
    watches_raw = raw.get("watch", [])
    if not isinstance(watches_raw, list):
        raise ConfigError(f"{path}: watch must be an array of tables ([[watch]])")
    watches = tuple(_watch(w, f"watch[{i}].", path) for i, w in enumerate(watches_raw))
    cfg = Config(watches=watches, source=path, **{k: v for k, v in daemon.items()})
    return _validated(cfg, path)


def _validated(cfg: Config, source: str) -> Config:
    if cfg.log_format not in LOG_FORMATS:
        raise ConfigError(f"{source}: daemon.log_format must be one of {', '.join(LOG_FORMATS)}")
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"{source}: daemon.log_level must be one of {', '.join(LOG_LEVELS)}")
    if cfg.reconcile_interval <= 0:
        raise ConfigError(f"{source}: daemon.reconcile_interval must be positive")
    seen: set[str] = set()
    for w in cfg.watches:
        if w.path in seen:
            raise ConfigError(f"{source}: watch path {w.path} is listed twice")
        seen.add(w.path)
    return cfg


def from_args(ns: argparse.Namespace) -> Config:
    """Build the config: the file (``--config``, else the default file when
    present), then the flags on top. ``--watch`` replaces the file's watches."""
    path = ns.config
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    cfg = load_file(path) if path else Config(watches=())
    if ns.watch:
        cfg = replace(cfg, watches=tuple(WatchConfig(path=os.path.abspath(os.path.expanduser(p))) for p in ns.watch))
    if ns.pin:
        cfg = replace(cfg, watches=tuple(replace(w, pin=ns.pin) for w in cfg.watches))
    if not cfg.watches:
        cfg = replace(cfg, watches=(WatchConfig(path=default_watch_dir()),))
    overrides = {
        k: v
        for k, v in (
            ("socket", ns.socket),
            ("log_format", ns.log_format),
            ("log_level", ns.log_level),
            ("reconcile_interval", ns.reconcile_interval),
        )
        if v is not None
    }
    return _validated(replace(cfg, **overrides), "command line" if not path else path)

"""The configuration schema: validation, --check-config, restart-only keys, the shipped file."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from sessionguard import config
from sessionguard.config import SCHEMA, ConfigError
from sessionguard.retention import Retention

SHIPPED = Path(__file__).resolve().parent.parent / "packaging" / "sessionguard.toml"
NUMBERS = [k for k in SCHEMA if k.kind == "number"]
PATHS = [k for k in SCHEMA if k.kind == "path"]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sg.toml"
    path.write_text(text)
    return str(path)


def flags(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict(config=None, watch=None, pin=None, socket=None, log_format=None, log_level=None,
                                   reconcile_interval=None, scan_processes=None)
    base.update(kw)
    return argparse.Namespace(**base)


def table_of(key: config.Key, value: str, watch_dir: str = "/srv/s") -> str:
    if key.table == "daemon":
        return f"[daemon]\n{key.name} = {value}\n[[watch]]\npath = \"{watch_dir}\"\n"
    path_line = "" if key.name == "path" else f'path = "{watch_dir}"\n'
    return f"[[watch]]\n{path_line}{key.name} = {value}\n"


def test_shipped_config_parses_to_the_code_defaults() -> None:
    cfg = config.load_file(str(SHIPPED))
    assert len(cfg.watches) == 1
    w = cfg.watches[0]
    defaults = config.WatchConfig(path=w.path)
    assert w == defaults, "every value in the shipped file is the default the code uses"
    assert w.retention == Retention()
    assert cfg == replace(config.Config(watches=cfg.watches, socket="/run/sessionguard.sock"), source=str(SHIPPED))


def test_shipped_config_lists_every_key_with_the_schema_default() -> None:
    raw = tomllib.loads(SHIPPED.read_text())
    (watch,) = raw["watch"]
    for key in SCHEMA:
        table = raw["daemon"] if key.table == "daemon" else watch
        assert key.name in table, f"{key.dotted} missing from packaging/sessionguard.toml"
        if key.name != "path":
            assert table[key.name] == tomllib.loads(f"v = {key.default}")["v"], key.dotted
    assert set(raw["daemon"]) | set(watch) == {k.name for k in SCHEMA}


def test_schema_covers_every_field_of_the_dataclasses() -> None:
    covered = config.schema_fields()
    for table in ("daemon", "watch"):
        assert covered[table] == {k.name for k in SCHEMA if k.table == table}, table


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, """
[daemon]
reconcile_interval = -1
log_level = "loud"
colour = "blue"
[[watch]]
path = "relative/dir"
keep_last = true
pin = "symlink"
[[watch]]
exclude = ["ok", 3]
""")
    with pytest.raises(ConfigError) as info:
        config.load_file(path)
    lines = str(info.value).splitlines()
    print("\n".join(lines))
    expected = ["daemon.reconcile_interval:", "daemon.log_level:", "daemon.colour: unknown key",
                "watch[0].path: must be an absolute path", "watch[0].keep_last:", "watch[0].pin:",
                "watch[1].exclude:", "watch[1].path: required"]
    assert len(lines) == len(expected)
    for line, want in zip(lines, expected, strict=True):
        assert line.startswith(f"{path}: {want}"), (line, want)


@pytest.mark.parametrize("key", NUMBERS, ids=lambda k: k.dotted)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+inf"])
def test_nan_and_inf_are_refused_for_every_number(tmp_path: Path, key: config.Key, value: str) -> None:
    with pytest.raises(ConfigError, match=rf": {key.table}(\[0\])?\.{key.name}: must be a finite number"):
        config.load_file(write(tmp_path, table_of(key, value)))


def test_nan_on_the_command_line_is_refused() -> None:
    with pytest.raises(ConfigError, match="reconcile_interval: must be a finite number"):
        config.from_args(flags(watch=["/srv/s"], reconcile_interval=float("nan")))


@pytest.mark.parametrize("key", PATHS, ids=lambda k: k.dotted)
@pytest.mark.parametrize("value", ['"relative"', '"./x"', '"../x/y"'])
def test_relative_paths_are_refused(tmp_path: Path, key: config.Key, value: str) -> None:
    text = table_of(key, value)
    with pytest.raises(ConfigError, match=rf"\.{key.name}: must be an absolute path"):
        config.load_file(write(tmp_path, text))


def test_relative_socket_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="socket: must be an absolute path"):
        config.from_args(flags(watch=["/srv/s"], socket="sg.sock"))


def test_home_paths_are_expanded_not_relative(tmp_path: Path) -> None:
    cfg = config.load_file(write(tmp_path, '[[watch]]\npath = "~/sessions"\nstore = "~/store"\n'))
    assert cfg.watches[0].path == os.path.expanduser("~/sessions")
    assert cfg.watches[0].store == os.path.expanduser("~/store")


def test_new_keys_and_their_constraints(tmp_path: Path) -> None:
    cfg = config.load_file(write(tmp_path, """
[daemon]
restore_recent_seconds = 0
[[watch]]
path = "/srv/a"
store_owner = "directory"
pin = "copy"
"""))
    assert cfg.restore_recent_seconds == 0.0
    assert (cfg.watches[0].store_owner, cfg.watches[0].pin) == ("directory", "copy")
    assert config.Config(watches=()).restore_recent_seconds == 60.0
    assert config.WatchConfig(path="/x").store_owner == "daemon"
    bad = '[daemon]\nrestore_recent_seconds = -1\n[[watch]]\npath = "/srv/a"\nstore_owner = "server"\n'
    with pytest.raises(ConfigError) as info:
        config.load_file(write(tmp_path, bad))
    assert "daemon.restore_recent_seconds: must be a finite number ≥ 0" in str(info.value)
    assert "watch[0].store_owner: must be one of daemon, directory" in str(info.value)


def test_check_config_prints_every_key_of_every_watch_and_loads_back(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = write(tmp_path, f"""
[daemon]
socket = "{tmp_path}/sg.sock"
log_level = "debug"
[[watch]]
path = "{tmp_path}/a"
exclude = ["x*"]
[[watch]]
path = "{tmp_path}/b"
intent_keys = []
keep_last = 3
""")
    cfg = config.load_file(path)
    out, err = io.StringIO(), io.StringIO()
    assert config.check_config(cfg, out, err) == 0
    assert err.getvalue() == ""
    printed = tomllib.loads(out.getvalue())
    assert len(printed["watch"]) == 2
    for w in printed["watch"]:
        assert set(w) == {k.name for k in SCHEMA if k.table == "watch"}
    assert set(printed["daemon"]) == {k.name for k in SCHEMA if k.table == "daemon"}
    assert printed["watch"][0]["exclude"] == ["x*"] and printed["watch"][0]["intent_keys"] == list(
        config.DEFAULT_INTENT_KEYS)
    assert printed["watch"][1]["intent_keys"] == [] and printed["watch"][1]["keep_last"] == 3
    again = tmp_path / "again.toml"
    again.write_text(out.getvalue())
    assert replace(config.load_file(str(again)), source=path) == cfg


def test_check_config_warns_on_missing_or_non_directory_watch(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    cfg = config.from_args(flags(watch=[str(tmp_path / "missing"), str(tmp_path / "file"), str(tmp_path / "link"),
                                        str(tmp_path)]))
    out, err = io.StringIO(), io.StringIO()
    assert config.check_config(cfg, out, err) == 0
    warned = err.getvalue().splitlines()
    print("\n".join(warned))
    assert len(warned) == 3
    assert warned[0].startswith("warning: command line: watch[0].path: ") and "No such file or directory" in warned[0]
    assert "watch[1].path" in warned[1] and "not a directory" in warned[1]
    assert "watch[2].path" in warned[2] and "symbolic link" in warned[2]


def test_needs_restart_names_the_keys_a_reload_cannot_apply() -> None:
    old = config.Config(watches=(config.WatchConfig(path="/a"),), socket="/run/a.sock")
    assert config.needs_restart(old, old) == []
    new = replace(old, socket="/run/b.sock", log_format="json", read_group="r", admin_group="a", log_level="debug",
                  reconcile_interval=5.0, watches=(config.WatchConfig(path="/b"),))
    assert config.needs_restart(old, new) == ["daemon.socket", "daemon.log_format", "daemon.read_group",
                                              "daemon.admin_group"]


def test_cli_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    """The real sessionguardd: an invalid file is refused with one line per problem."""
    path = write(tmp_path, '[daemon]\nreconcile_interval = nan\n[[watch]]\npath = "rel"\n')
    r = subprocess.run([sys.executable, "-m", "sessionguard.daemon", "--config", path, "--check-config"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert f"{path}: daemon.reconcile_interval: must be a finite number > 0, got nan" in r.stderr
    assert f"{path}: watch[0].path: must be an absolute path" in r.stderr


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\nlog_level = "debug"\n[[watch]]\npath = "/srv/a"\npin = "copy"\n')
    cfg = config.from_args(flags(config=path, pin="link", log_level="error", reconcile_interval=2.5,
                                 socket="/run/x.sock"))
    assert (cfg.watches[0].path, cfg.watches[0].pin) == ("/srv/a", "link")
    assert (cfg.log_level, cfg.reconcile_interval, cfg.socket, cfg.source) == ("error", 2.5, "/run/x.sock", path)
    cfg = config.from_args(flags(config=path, watch=["/srv/b", "/srv/c"], pin="link"))
    assert [(w.path, w.pin) for w in cfg.watches] == [("/srv/b", "link"), ("/srv/c", "link")]


def test_scan_processes_from_the_file_and_the_flag() -> None:
    assert config.from_args(flags(watch=["/srv/s"])).scan_processes == 0
    assert config.from_args(flags(watch=["/srv/s"], scan_processes=3)).scan_processes == 3
    with pytest.raises(ConfigError, match=r"scan_processes: must be an integer ≥ 0, got -1"):
        config.from_args(flags(watch=["/srv/s"], scan_processes=-1))

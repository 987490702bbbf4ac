"""The shipped default configuration is valid and says what the code does."""

from __future__ import annotations

from pathlib import Path

from sessionguard import config
from sessionguard.store import Retention

SHIPPED = Path(__file__).resolve().parent.parent / "packaging" / "sessionguard.toml"


def test_shipped_config_parses_to_the_code_defaults() -> None:
    cfg = config.load_file(str(SHIPPED))
    assert len(cfg.watches) == 1
    w = cfg.watches[0]
    defaults = config.WatchConfig(path=w.path)
    assert w == defaults, "every value in the shipped file is the default the code uses"
    assert w.retention == Retention()
    assert (cfg.reconcile_interval, cfg.log_format, cfg.log_level) == (30, "auto", "info")
    assert (cfg.read_group, cfg.admin_group, cfg.socket) == ("sessionguard", "sessionguard-admin", "/run/sessionguard.sock")

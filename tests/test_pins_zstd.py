"""``pin = "zstd"``: pins kept compressed (a filesystem without reflinks pays a fraction of the
sessions' size, not all of it), versions kept plain (``cp`` restores them)."""

from __future__ import annotations

import os
from pathlib import Path

from daemonproc import eventually
from sessionguard.pins import ZSTD_MAGIC
from sghelpers import make_session, pin_count, server_write, store_versions

SID = "abc123def456"


def test_compressed_pins_keep_plain_versions_and_restore_byte_identical(sdir: Path, daemons) -> None:
    sessions = {f"s{i:011d}": make_session(300 + i, f"s{i:011d}") for i in range(5)}
    for sid, doc in sessions.items():
        server_write(sdir / f"{sid}.json", doc)
    d = daemons("--watch", str(sdir), "--pin", "zstd")
    assert d.wait_event("daemon.started")["watches"][0]["pin"] == "zstd"
    pins = sdir / ".sessionguard" / "pins"
    eventually(lambda: len(os.listdir(pins)) == 5, what="five pins")
    live_bytes = sum((sdir / f"{sid}.json").stat().st_size for sid in sessions)
    pin_bytes = sum((pins / sid).stat().st_size for sid in sessions)
    assert all((pins / sid).read_bytes()[:4] == ZSTD_MAGIC for sid in sessions)
    assert pin_bytes * 4 < live_bytes, f"compressed pins take {pin_bytes} bytes for {live_bytes} of sessions"
    whole = (sdir / f"{'s00000000000'}.json").read_bytes()
    server_write(sdir / "s00000000000.json", make_session(0, "s00000000000"))  # the wipe
    v = eventually(lambda: store_versions(sdir / ".sessionguard", "s00000000000"), what="the kept version")[0]
    assert v.count == 300 and v.path.read_bytes() == whole, "a version is the session, plain, byte for byte"
    assert d.call("restore", {"sid": "s00000000000"})["restored"]["count"] == 300
    assert (sdir / "s00000000000.json").read_bytes() == whole
    server_write(sdir / "s00000000001.json", make_session(500, "s00000000001"))  # grows: re-pinned compressed
    d.sync()
    assert (pins / "s00000000001").read_bytes()[:4] == ZSTD_MAGIC
    assert pin_count(sdir, "s00000000001") == 500
    d.assert_alive()

"""``python -m chatserver --dir SESSION_DIR [--storage MODULE] [--port N]`` (run from ``tests/``).

Prints one JSON line ``{"port": N, "pid": P}`` on stdout once it listens on
127.0.0.1 (port 0, the default, picks a free one), then logs requests on
stderr only. Stops on ``POST /shutdown``, SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import cast

from .app import ChatHTTPServer
from .sessions import Sessions, Storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatserver", description="A test chat server shaped like the seed's.")
    parser.add_argument("--dir", required=True, type=Path, help="session directory (must exist)")
    parser.add_argument("--storage", default="chatserver.storage",
                        help="module with the storage functions (a guarded copy of chatserver.storage)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: not a directory")
    storage = cast(Storage, importlib.import_module(args.storage))
    storage.startup(args.dir.resolve())
    server = ChatHTTPServer(Sessions(storage), args.port)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps({"port": server.server_address[1], "pid": os.getpid()}), flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""sessionguardctl: the admin client of sessionguardd's control socket.

Speaks only the control protocol (JSON-RPC 2.0, one JSON object per line,
see :mod:`sessionguard.control`): human tables by default, ``--json`` for
scripts. Exit codes: 0 ok, 1 not found / refused / failed, 2 usage,
3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from .paths import SOCKET_ENV, SYSTEM_SOCKET, default_socket_path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

NOT_FOUND = -32004
DENIED = -32001

EPILOG = """\
examples:
  sessionguardctl status
  sessionguardctl list --shrunk             sessions that lost messages at least once
  sessionguardctl history abc123            every kept version of session abc123
  sessionguardctl show abc123 --messages    the best version (most messages), with its messages
  sessionguardctl diff abc123 3f2a          messages of version 3f2a… missing from the live file
  sessionguardctl restore abc123 --dry-run  what a restore of the best version would do
  sessionguardctl restore abc123            restore it (the live file is kept first: undoable)
  sessionguardctl --json list | jq .        raw JSON results for scripts

A VERSION is a unique prefix of a version's hash (the ID column of history)
or its full file name; without one, the best version is used: most messages,
then newest. Use --watch DIR when a session id exists in several watched
directories.

exit status: 0 ok, 1 not found / refused / failed, 2 usage, 3 daemon unreachable.
environment: SESSIONGUARD_SOCKET overrides the default socket path.
"""


class Unreachable(Exception):
    """The daemon could not be reached (or did not answer)."""


class RemoteError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


# -- the wire -----------------------------------------------------------------

def call(path: str, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0) -> Any:
    """One JSON-RPC call over the control socket; returns the result or raises."""
    request = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params:
        request["params"] = params
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as exc:
            raise Unreachable(f"cannot connect to {path}: {exc.strerror or exc}") from None
        buf = bytearray()
        try:
            try:
                s.sendall(orjson.dumps(request) + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # a busy server answers and closes at once: read what it said
            while b"\n" not in buf:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise Unreachable(f"{path}: no answer within {timeout:g} s") from None
        except OSError as exc:
            if b"\n" not in buf:
                raise Unreachable(f"{path}: {exc.strerror or exc}") from None
    finally:
        s.close()
    line = bytes(buf).split(b"\n", 1)[0]
    if not line:
        raise Unreachable(f"{path}: the daemon closed the connection without answering")
    try:
        response = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise Unreachable(f"{path}: not a sessionguard control socket (answer is not JSON)") from None
    if not isinstance(response, dict):
        raise Unreachable(f"{path}: unexpected answer")
    if "error" in response:
        err = response["error"] if isinstance(response["error"], dict) else {}
        raise RemoteError(int(err.get("code", -32603)), str(err.get("message", "error")), err.get("data"))
    return response.get("result")


# -- formatting ------------------------------------------------------------------

def human_size(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    return f"{n:.1f} TiB"  # pragma: no cover


def _to_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
    return None


def relative(dt: datetime, now: float | None = None) -> str:
    delta = (time.time() if now is None else now) - dt.timestamp()
    future = delta < 0
    d = round(abs(delta))  # whole seconds: float noise must not turn 3 days into 2
    if d < 10:
        return "just now"
    if d < 60:
        text = f"{int(d)} s"
    elif d < 3600:
        text = f"{int(d // 60)} min"
    elif d < 86400:
        text = f"{int(d // 3600)} h"
    elif d < 2 * 86400:
        return "in 1 day" if future else "1 day ago"
    else:
        text = f"{int(d // 86400)} days"
    return f"in {text}" if future else f"{text} ago"


def when(value: Any) -> str:
    """``"3 min ago (2025-01-05T14:03:11+01:00)"`` for a timestamp, ``-`` for none."""
    dt = _to_datetime(value)
    if dt is None:
        return "-" if value is None else str(value)
    return f"{relative(dt)} ({dt.astimezone().isoformat(timespec='seconds')})"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-" if seconds is None else str(seconds)
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def table(headers: Sequence[str], rows: list[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; columns in *right* right-aligned."""
    cells = [[_cell(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def fmt(r: Sequence[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        return "  ".join(parts).rstrip()

    return "\n".join([fmt(list(headers))] + [fmt(r) for r in cells])


def summarize(message: Any, width: int = 100) -> str:
    """One line for a message: ``role: content`` when it has those, else compact JSON."""
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        text = f"{message.get('role', '?')}: {message['content']}"
    else:
        text = orjson.dumps(message).decode()
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _width() -> int:
    return max(shutil.get_terminal_size((120, 24)).columns - 10, 40)


def _count(v: Any) -> str:
    return "unparseable" if v is None else str(v)


# -- commands -------------------------------------------------------------------

def _out(text: str = "") -> None:
    print(text)


def cmd_status(args: argparse.Namespace, r: dict[str, Any]) -> int:
    watches = r.get("watches")
    rows: list[tuple[str, str]] = [
        ("version", _cell(r.get("version"))),
        ("uptime", duration(r.get("uptime"))),
    ]
    if isinstance(watches, list):
        rows.append(("watches", str(len(watches))))
    else:
        rows.append(("watches", _cell(watches)))
    rows += [
        ("sessions", _cell(r.get("sessions"))),
        ("versions", _cell(r.get("versions"))),
        ("store", human_size(r.get("store_bytes"))),
        ("events", _cell(r.get("events"))),
        ("last reconcile", when(r.get("last_reconcile"))),
        ("last overflow", when(r.get("last_overflow"))),
    ]
    degraded = r.get("degraded") or []
    rows.append(("degraded", "no" if not degraded else "YES"))
    known = {"version", "uptime", "watches", "sessions", "versions", "store_bytes", "events",
             "last_reconcile", "last_overflow", "degraded"}
    for k in sorted(set(r) - known):
        v = r[k]
        rows.append((k.replace("_", " "), v if isinstance(v, str) else orjson.dumps(v).decode()))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        _out(f"{k + ':':<{w + 1}}  {v}")
    if isinstance(watches, list):
        for d in watches:
            _out(f"  watch  {d if isinstance(d, str) else orjson.dumps(d).decode()}")
    for why in degraded:
        _out(f"  degraded: {why}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace, r: dict[str, Any]) -> int:
    sessions = r.get("sessions", [])
    if not sessions:
        _out("no sessions with shrinks" if args.shrunk else "no sessions")
        return EXIT_OK
    rows = [
        (s.get("sid"), _count(s.get("count")) if "count" in s else "-", s.get("high_water"), s.get("versions"),
         when(s.get("last_shrink")) if s.get("last_shrink") else "-", s.get("watch"))
        for s in sessions
    ]
    _out(table(["SID", "COUNT", "HIGH", "VERSIONS", "LAST SHRINK", "WATCH"], rows, right=(1, 2, 3)))
    return EXIT_OK


def cmd_history(args: argparse.Namespace, r: dict[str, Any]) -> int:
    versions = r.get("versions", [])
    if not versions:
        _out(f"session {args.sid} has no kept versions")
        return EXIT_OK
    counted = [v for v in versions if v.get("count") is not None]
    best = max(counted, key=lambda v: (v["count"], v.get("created", ""))) if counted else None
    rows = [
        (("* " if v is best else "  ") + str(v.get("id")), when(v.get("created")), _count(v.get("count")),
         human_size(v.get("size")), v.get("reason"), v.get("source"))
        for v in versions
    ]
    _out(table(["  ID", "CREATED", "MESSAGES", "SIZE", "REASON", "SOURCE"], rows, right=(2, 3)))
    if best is not None:
        _out(f"\n* best version (restored when no VERSION is given): {best['id']}")
    return EXIT_OK


def _version_lines(v: dict[str, Any]) -> list[str]:
    return [
        f"version:  {v.get('id')}",
        f"session:  {v.get('sid')}",
        f"created:  {when(v.get('created'))}",
        f"messages: {_count(v.get('count'))}",
        f"size:     {human_size(v.get('size'))}",
        f"reason:   {v.get('reason')} (by {v.get('source')}, {v.get('method')})",
        f"file:     {v.get('name')}",
    ]


def cmd_show(args: argparse.Namespace, r: dict[str, Any]) -> int:
    for line in _version_lines(r):
        _out(line)
    if args.messages:
        if r.get("messages") is None:
            _out(f"\nmessages cannot be shown: {r.get('messages_error', 'unparseable')}")
            return EXIT_FAILED
        _out("")
        msgs = r["messages"]
        w = len(str(max(len(msgs) - 1, 0)))
        for i, m in enumerate(msgs):
            _out(f"{i:>{w}}  {summarize(m, _width())}")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, r: dict[str, Any]) -> int:
    v = r.get("version", {})
    live = "missing" if not r.get("live_exists") else (
        f"unparseable ({r.get('live_error')})" if r.get("live_count") is None else f"{r['live_count']} messages")
    _out(f"version {v.get('id')}: {r.get('version_count')} messages, created {when(v.get('created'))}")
    _out(f"live file: {live}")
    n = r.get("missing_count", 0)
    if not n:
        _out("every message of the version is in the live file")
        return EXIT_OK
    _out(f"{n} message{'s' if n != 1 else ''} of the version missing from the live file:")
    missing = r.get("missing", [])
    w = len(str(max((m.get("index", 0) for m in missing), default=0)))
    for m in missing:
        _out(f"  {m.get('index'):>{w}}  {summarize(m.get('message'), _width())}")
    return EXIT_OK


def _undo_command(args: argparse.Namespace, version_id: str) -> str:
    parts = ["sessionguardctl"]
    if args.socket_given:
        parts += ["--socket", args.socket]
    if args.watch:
        parts += ["--watch", args.watch]
    parts += ["restore", args.sid, version_id]
    return " ".join(_quote(p) for p in parts)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def cmd_restore(args: argparse.Namespace, r: dict[str, Any]) -> int:
    v = r.get("restored", {})
    before = r.get("live_count_before")
    what = f"version {v.get('id')} ({_count(v.get('count'))} messages, created {when(v.get('created'))})"
    if r.get("unchanged"):
        _out(f"session {args.sid}: the live file is already identical to {what}; nothing to do")
        return EXIT_OK
    if r.get("dry_run"):
        _out(f"would restore session {args.sid} from {what}")
        _out(f"the live file now has {before} messages" if before is not None
             else "the live file is missing or unparseable now")
        _out("the live file would first be kept as a pre-restore version, so this can be undone")
        return EXIT_OK
    _out(f"restored session {args.sid} from {what}")
    pre = r.get("pre_restore")
    if pre:
        _out(f"the previous live file ({_count(pre.get('count'))} messages) was kept as version {pre.get('id')}")
        _out(f"to undo: {_undo_command(args, pre.get('id'))}")
    else:
        _out("there was no live file before: nothing to undo")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace, r: dict[str, Any]) -> int:
    removed = r.get("removed", [])
    n = len(removed) if isinstance(removed, list) else int(removed or 0)
    _out(f"removed {n} version{'s' if n != 1 else ''}, freed {human_size(r.get('bytes_freed', 0))}")
    return EXIT_OK


def cmd_sync(args: argparse.Namespace, r: dict[str, Any]) -> int:
    if r.get("synced"):
        _out("synced: every change made before this call has been processed")
        return EXIT_OK
    _out(f"not synced within {args.sync_timeout:g} s: the daemon is still catching up, or a watch is "
         "polled because inotify refused it (see the watches' \"inotify\" in status)")
    return EXIT_FAILED


def cmd_metrics(args: argparse.Namespace, r: dict[str, Any]) -> int:
    sys.stdout.write(r.get("text", ""))
    return EXIT_OK


# -- command line ---------------------------------------------------------------

def _params(args: argparse.Namespace) -> dict[str, Any]:
    c = args.command
    p: dict[str, Any] = {}
    if c == "list":
        p["shrunk_only"] = args.shrunk
    if c in ("history", "show", "diff", "restore"):
        p["sid"] = args.sid
        if args.watch:
            p["watch"] = args.watch
    if c in ("show", "diff", "restore") and args.version is not None:
        p["version"] = args.version
    if c == "show" and args.messages:
        p["messages"] = True
    if c == "restore" and args.dry_run:
        p["dry_run"] = True
    if c == "sync":
        p["timeout"] = args.sync_timeout
    return p


COMMANDS = {
    "status": cmd_status, "list": cmd_list, "history": cmd_history, "show": cmd_show, "diff": cmd_diff,
    "restore": cmd_restore, "prune": cmd_prune, "sync": cmd_sync, "metrics": cmd_metrics,
}


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Options accepted both before and after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"control socket (default: ${SOCKET_ENV}, else {SYSTEM_SOCKET} as root, "
                             "else $XDG_RUNTIME_DIR/sessionguard.sock)")
    common.add_argument("--watch", metavar="DIR", default=argparse.SUPPRESS,
                        help="the watched directory, for a session id present in several")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the raw JSON result")

    parser = argparse.ArgumentParser(
        prog="sessionguardctl", parents=[common],
        description="Inspect and restore the session versions kept by sessionguardd.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--timeout", metavar="S", type=_positive, default=30.0, dest="rpc_timeout",
                        help="seconds to wait for the daemon's answer (default: 30)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_, description=help_)

    add("status", "the daemon's state: watches, sessions, store size, health")
    p = add("list", "sessions known to the daemon, with message counts and versions")
    p.add_argument("--shrunk", action="store_true", help="only sessions that lost messages at least once")
    p = add("history", "every kept version of a session, oldest first")
    p.add_argument("sid", metavar="SID")
    p = add("show", "one version's details (default: the best version)")
    p.add_argument("sid", metavar="SID")
    p.add_argument("version", metavar="VERSION", nargs="?")
    p.add_argument("--messages", action="store_true", help="also print the version's messages")
    p = add("diff", "messages of a version that are missing from the live file")
    p.add_argument("sid", metavar="SID")
    p.add_argument("version", metavar="VERSION", nargs="?")
    p = add("restore", "put a version back as the live file (the live file is kept first)")
    p.add_argument("sid", metavar="SID")
    p.add_argument("version", metavar="VERSION", nargs="?")
    p.add_argument("--dry-run", action="store_true", help="only say what would be restored")
    add("prune", "apply the retention rules to the store now")
    p = add("sync", "wait until the daemon has processed every change made before this call")
    p.add_argument("--timeout", metavar="S", type=_positive, default=5.0, dest="sync_timeout",
                   help="seconds the daemon may wait (default: 5)")
    add("metrics", "Prometheus metrics text")
    return parser


def _unreachable_hint(path: str, why: str) -> str:
    lines = [f"sessionguardctl: cannot reach sessionguardd: {why}",
             f"  socket: {path}",
             "  is the daemon running?  systemctl status sessionguard"]
    if path == SYSTEM_SOCKET:
        lines.append(f"  permission denied? {path} is for root and members of the sessionguard read/admin "
                     "groups (check `id`; log in again after being added to a group)")
    else:
        lines.append("  permission denied? check the socket's owner, group and mode: ls -l " + path)
    lines.append(f"  another socket?    --socket PATH or ${SOCKET_ENV}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.socket_given = hasattr(args, "socket")
    if not args.socket_given:
        args.socket = os.environ.get(SOCKET_ENV) or default_socket_path()
    args.watch = getattr(args, "watch", None)
    args.json = getattr(args, "json", False)
    timeout = args.rpc_timeout
    if args.command == "sync":
        timeout = max(timeout, args.sync_timeout + 5.0)
    try:
        result = call(args.socket, args.command, _params(args), timeout=timeout)
    except Unreachable as exc:
        print(_unreachable_hint(args.socket, str(exc)), file=sys.stderr)
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        if args.json:
            print(orjson.dumps({"error": {"code": exc.code, "message": exc.message, "data": exc.data}}).decode(),
                  file=sys.stderr)
        else:
            print(f"sessionguardctl: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        if args.command == "sync" and not (isinstance(result, dict) and result.get("synced")):
            return EXIT_FAILED
        return EXIT_OK
    try:
        return COMMANDS[args.command](args, result if isinstance(result, dict) else {})
    except BrokenPipeError:  # `sessionguardctl history x | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

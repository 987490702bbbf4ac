"""sessionguardctl: the admin client of sessionguardd's control socket.

The subcommands and their options are built from the protocol's method
table (:data:`sessionguard.protocol.METHODS`), so the client cannot offer a
parameter the daemon does not take. Human views by default, ``--json`` for
scripts; exit codes in :data:`EPILOG`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from . import __version__, paths
from .ctl_client import Target, Unreachable, call, trusted_uids, unreachable_hint
from .ctl_format import safe
from .ctl_views import EXIT_FAILED, EXIT_UNREACHABLE, VIEWS, exit_code
from .protocol import METHODS, Method, Param, RpcError

EPILOG = f"""\
examples:
  sessionguardctl status                     health, then one block per watched directory
  sessionguardctl list --shrunk              sessions whose latest change lost messages
  sessionguardctl history abc123             every kept version of session abc123
  sessionguardctl diff abc123                what a restore would bring back
  sessionguardctl restore abc123 --dry-run   what a restore would do
  sessionguardctl restore abc123             restore it (the live file is kept first: undoable)
  sessionguardctl recover --since 2h --dry-run   every session lost in the last two hours
  sessionguardctl --json list | jq .         raw JSON results for scripts

A VERSION is a unique prefix of a version's id (the ID column of history) or
its file name; without one, show, diff and restore use the version restore
picks (R in history); --most takes the one with the most messages instead.
WHEN is 90s, 30m, 2h, 1d (ago) or a local date/time like 2026-11-24T10:00.
--watch DIR names the watched directory, for an id present in several, or
to limit status, list, prune and recover to it.

exit status:
  0  ok
  1  failed: not found, refused, or not synced
  2  usage error
  3  the daemon cannot be reached (or the socket is not the daemon's)
  4  status: something is degraded
  5  done, but a restore of that session was undone by a writer since

environment:
  {paths.SOCKET_ENV}        the socket (default: {paths.SYSTEM_SOCKET} when it exists,
                             else $XDG_RUNTIME_DIR/{paths.SOCKET_NAME})
  {paths.DAEMON_USER_ENV}  a user the daemon may run as, besides root, you and {paths.DAEMON_USER}
"""


def _argtype(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type whose error message says what is wrong, not just "invalid"."""
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc) or f"invalid value {text!r}") from None

    parse.__name__ = convert.__name__
    return parse


def _add_param(parser: argparse.ArgumentParser, p: Param) -> None:
    if not p.cli:
        return  # watch: the global --watch
    dest = f"p_{p.name}"
    if not p.cli.startswith("-"):
        if p.required:
            parser.add_argument(dest, metavar=p.cli, help=p.help)
        else:
            parser.add_argument(dest, metavar=p.cli, nargs="?", default=p.default, help=p.help)
    elif p.convert is None:
        parser.add_argument(p.cli, dest=dest, action="store_true", help=p.help)
    else:
        parser.add_argument(p.cli, dest=dest, metavar=p.metavar, type=_argtype(p.convert), default=p.default,
                            help=p.help)


def build_parser() -> argparse.ArgumentParser:
    # Options accepted both before and after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"control socket (default: ${paths.SOCKET_ENV}, else {paths.SYSTEM_SOCKET} when it "
                             f"exists, else $XDG_RUNTIME_DIR/{paths.SOCKET_NAME})")
    common.add_argument("--watch", metavar="DIR", default=argparse.SUPPRESS,
                        help="the watched directory (for status, list, prune, recover and session commands)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the raw JSON result")
    common.add_argument("--daemon-user", metavar="USER", default=argparse.SUPPRESS,
                        help=f"a user the daemon may run as (default: ${paths.DAEMON_USER_ENV}, else "
                             f"{paths.DAEMON_USER}); root and you are always trusted")
    parser = argparse.ArgumentParser(
        prog="sessionguardctl", parents=[common],
        description="Inspect and restore the session versions kept by sessionguardd.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sessionguardctl {__version__}")
    parser.add_argument("--timeout", metavar="S", type=_argtype(_positive), default=30.0, dest="rpc_timeout",
                        help="seconds to wait for the daemon's answer (default: 30)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for method in METHODS.values():
        p = sub.add_parser(method.name, parents=[common], help=method.help, description=method.help)
        for param in method.params:
            _add_param(p, param)
    return parser


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def params_for(method: Method, args: argparse.Namespace) -> dict[str, Any]:
    """The request's params: what differs from the defaults (the daemon fills those in)."""
    out: dict[str, Any] = {}
    for p in method.params:
        if p.name == "watch":
            if args.watch:
                out["watch"] = os.path.abspath(args.watch)
            continue
        value = getattr(args, f"p_{p.name}", p.default)
        if p.required or value != p.default:
            out[p.name] = value
    return out


def target_for(args: argparse.Namespace) -> Target:
    daemon_user = getattr(args, "daemon_user", None) or os.environ.get(paths.DAEMON_USER_ENV) or paths.DAEMON_USER
    if args.socket_given:
        path: str | None = args.socket
        tried = [f"{args.socket} (--socket)"]
    else:
        path, tried = paths.client_socket(os.environ)
    return Target(path, tried, trusted_uids(daemon_user), daemon_user)


def _print_error(args: argparse.Namespace, exc: RpcError) -> None:
    if args.json:
        print(orjson.dumps({"error": {"code": exc.code, "message": exc.message, "data": exc.data}}).decode(),
              file=sys.stderr)
    else:
        print(f"sessionguardctl: {safe(exc.message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.socket_given = hasattr(args, "socket")
    args.socket = getattr(args, "socket", None)
    args.watch = getattr(args, "watch", None)
    args.json = getattr(args, "json", False)
    method = METHODS[args.command]
    if args.watch is not None and not method.takes("watch"):
        parser.error(f"--watch means nothing for {method.name}")
    target = target_for(args)
    timeout = args.rpc_timeout
    if method.name == "sync":
        timeout = max(timeout, args.p_timeout + 5.0)
    try:
        result = call(target, method.name, params_for(method, args), timeout=timeout)
    except Unreachable as exc:
        print(unreachable_hint(target, str(exc)), file=sys.stderr)
        return EXIT_UNREACHABLE
    except RpcError as exc:
        _print_error(args, exc)
        return EXIT_FAILED
    result = result if isinstance(result, dict) else {}
    try:
        if args.json:
            sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
            return exit_code(method.name, args, result)
        return VIEWS[method.name](args, result)
    except BrokenPipeError:  # `sessionguardctl history x | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - replaces stdout until exit
        return exit_code(method.name, args, result)


if __name__ == "__main__":
    sys.exit(main())

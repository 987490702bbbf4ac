"""The HTTP face of the test server: routes, JSON bodies, status codes.

=======  ===========================  =========================  ==============================================
method   path                         body                       answer
=======  ===========================  =========================  ==============================================
GET      /sessions                                               ``{"sessions": [metadata…], "skipped": […]}``
GET      /sessions/<sid>                                         the whole session (loads it fully if needed)
POST     /sessions/<sid>/messages     ``{"role", "content"}``    appends one turn and saves
POST     /sessions/<sid>/rename       ``{"title"}``              saves the cached object as it is
POST     /sessions/<sid>/undo                                    drops the last exchange (intent marker)
POST     /sessions/<sid>/truncate     ``{"keep": n}``            keeps n messages (intent marker)
POST     /sessions/<sid>/clear                                   no messages, title reset (clear marker)
DELETE   /sessions/<sid>                                         unlinks the file
POST     /reload/<sid>                                           drops the session from the cache
GET      /debug/stats                                            cache contents, load and save counters
POST     /shutdown                                               answers, then stops the server
=======  ===========================  =========================  ==============================================

Saving endpoints answer ``{"session_id", "title", "message_count", "saved"}``
(``saved`` is false when the save raised: the server swallowed it). Errors
are ``{"error": "…"}`` with 400 (bad body), 404 (no such session or route),
405, 409 (nothing to undo) or 422 (the file is not a session).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .seedio import SID
from .sessions import Conflict, Sessions

_MAX_BODY = 1 << 20


class BadRequest(Exception):
    """The request body is not what the endpoint takes."""


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{key!r} must be a string")
    return value


def _keep(body: dict[str, Any]) -> int:
    keep = body.get("keep")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise BadRequest("'keep' must be a non-negative integer")
    return keep


Route = tuple[str, re.Pattern[str], Callable[[Sessions, str, dict[str, Any]], Any]]

ROUTES: list[Route] = [
    ("GET", re.compile(r"/sessions/([^/]+)"), lambda s, sid, b: s.get(sid)),
    ("POST", re.compile(r"/sessions/([^/]+)/messages"),
     lambda s, sid, b: s.append(sid, _string(b, "role"), _string(b, "content"))),
    ("POST", re.compile(r"/sessions/([^/]+)/rename"), lambda s, sid, b: s.rename(sid, _string(b, "title"))),
    ("POST", re.compile(r"/sessions/([^/]+)/undo"), lambda s, sid, b: s.undo(sid)),
    ("POST", re.compile(r"/sessions/([^/]+)/truncate"), lambda s, sid, b: s.truncate(sid, _keep(b))),
    ("POST", re.compile(r"/sessions/([^/]+)/clear"), lambda s, sid, b: s.clear(sid)),
    ("DELETE", re.compile(r"/sessions/([^/]+)"), lambda s, sid, b: s.delete(sid)),
    ("POST", re.compile(r"/reload/([^/]+)"), lambda s, sid, b: s.reload(sid)),
]


class Handler(BaseHTTPRequestHandler):
    """One request: route it, run it on the shared :class:`Sessions`, answer JSON."""

    server: ChatHTTPServer

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        try:
            status, answer = self._dispatch(method, self.path.split("?", 1)[0])
        except BadRequest as exc:
            status, answer = 400, {"error": str(exc)}
        except FileNotFoundError:
            status, answer = 404, {"error": "no such session"}
        except Conflict as exc:
            status, answer = 409, {"error": str(exc)}
        except (ValueError, TypeError, OSError) as exc:
            status, answer = 422, {"error": f"{type(exc).__name__}: {exc}"}
        self._answer(status, answer)
        if (method, self.path) == ("POST", "/shutdown"):
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    def _dispatch(self, method: str, path: str) -> tuple[int, Any]:
        sessions = self.server.sessions
        if path == "/sessions" and method == "GET":
            rows, skipped = sessions.listing()
            return 200, {"sessions": rows, "skipped": skipped}
        if path == "/debug/stats" and method == "GET":
            return 200, sessions.stats()
        if path == "/shutdown" and method == "POST":
            return 200, {"stopping": True}
        allowed = False
        for verb, pattern, action in ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if verb != method:
                allowed = True
                continue
            sid = match.group(1)
            if not SID.fullmatch(sid):
                return 404, {"error": f"not a session id: {sid!r}"}
            return 200, action(sessions, sid, self._body())
        return (405, {"error": "method not allowed"}) if allowed else (404, {"error": "no such route"})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise BadRequest("body too large")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    def _answer(self, status: int, answer: Any) -> None:
        data = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ChatHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the shared session cache."""

    daemon_threads = True

    def __init__(self, sessions: Sessions, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.sessions = sessions

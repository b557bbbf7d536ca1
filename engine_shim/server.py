"""The shim's HTTP endpoint: ``GET /v1/kv/stats``, ``GET /healthz``, optional completions.

Engine-agnostic and torch-free: it serves whatever snapshot the source published last, on
its own threads, so a slow or numerous set of stats clients never holds up the engine loop.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from kvstats.http import HTTPServer, Request, Response
from kvstats.snapshot import Snapshot

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20


class HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ShimApp:
    """What the server needs from an engine: its latest snapshots and whether it is alive."""

    snapshots: Callable[[], list[Snapshot]]
    healthy: Callable[[], bool]
    # POST /v1/completions: decoded JSON body in, JSON response out; raises HTTPError.
    completions: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    bearer_token: str | None = None
    # GET /kv_event_sources, as vLLM serves it: where the engine publishes its KV events.
    kv_event_sources: Callable[[], dict[str, Any]] | None = None


def body_limit(method: str, path: str) -> int:
    return MAX_BODY_BYTES if (method, path) == ("POST", "/v1/completions") else 0


def _send(status: int, body: Any, close: bool = False) -> Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    return Response(status, data, "application/json", close=close)


def _error(status: int, message: str, close: bool = False) -> Response:
    return _send(status, {"error": {"code": status, "message": message}}, close)


class _Routes:
    """The shim's few routes: reads on GET/HEAD, the demo's completions on POST."""

    def __init__(self, app: ShimApp) -> None:
        self.app = app

    def authorised(self, request: Request) -> bool:
        if self.app.bearer_token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.app.bearer_token}".encode())

    def handle(self, request: Request) -> Response:
        path = request.path
        if request.method in ("GET", "HEAD"):
            return self.read(request)
        completions = self.app.completions is not None
        if request.method == "POST" and path == "/v1/completions" and completions:
            return self.complete(request)
        if path in SERVED_PATHS:
            return _error(405, f"{request.method} {path} is not served", close=True)
        return _error(404, f"no such path: {path}", close=True)

    def read(self, request: Request) -> Response:
        app, path = self.app, request.path
        if path == "/healthz":
            ok = app.healthy()
            return _send(200 if ok else 503, {"status": "ok" if ok else "engine loop not running"})
        if path == "/v1/kv/stats":
            if not self.authorised(request):
                return _error(401, "missing or wrong bearer token")
            snaps = app.snapshots()
            body: Any = snaps[0].to_json() if len(snaps) == 1 else [s.to_json() for s in snaps]
            return _send(200, body)
        if path == "/kv_event_sources" and app.kv_event_sources is not None:
            return _send(200, app.kv_event_sources())
        return _error(404, f"no such path: {path}")

    def complete(self, request: Request) -> Response:
        assert self.app.completions is not None
        if not self.authorised(request):
            return _error(401, "missing or wrong bearer token")
        if not {"content-length", "transfer-encoding"} & request.headers.keys():
            return _error(411, "Content-Length is required", close=True)
        try:
            return _send(200, self.app.completions(_json_object(request.body)))
        except HTTPError as exc:
            return _error(exc.status, exc.message)


def _handler(app: ShimApp) -> Callable[[Request], Response]:
    return _Routes(app).handle


SERVED_PATHS = ("/healthz", "/v1/kv/stats", "/kv_event_sources", "/v1/completions")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HTTPError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    return body


class ShimServer:
    """The shim's HTTP server; ``port=0`` picks a free one (see ``.port``)."""

    def __init__(self, app: ShimApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.httpd = HTTPServer(
            _handler(app),
            host,
            port,
            name="shim-http",
            server_header="kvcache-shim",
            body_limit=body_limit,
            # Reads serve the snapshot the engine published last: quick, on the loop. The
            # completions of the demo run generation: on the workers.
            placement=lambda request: "inline" if request.method in ("GET", "HEAD") else "pool",
        )

    @property
    def port(self) -> int:
        return self.httpd.port

    @property
    def host(self) -> str:
        return self.httpd.host

    def start(self) -> None:
        self.httpd.start()

    def stop(self) -> None:
        self.httpd.stop()

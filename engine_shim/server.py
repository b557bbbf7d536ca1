"""The shim's HTTP endpoint: ``GET /v1/kv/stats``, ``GET /healthz``, optional completions.

Engine-agnostic and torch-free: it serves whatever snapshot the source published last, on
its own threads, so a slow or numerous set of stats clients never holds up the engine loop.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from kvstats.http import QuietThreadingHTTPServer, refuse_body
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


def _handler(app: ShimApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kvcache-shim"
        protocol_version = "HTTP/1.1"
        timeout = 30  # a client that stops talking mid-request is dropped
        # Headers and body are two writes: without TCP_NODELAY, Nagle + delayed ACK add 40 ms.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: HTTPStatus, body: Any) -> None:
            data = json.dumps(body, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: HTTPStatus, message: str) -> None:
            self._send(status, {"error": {"code": status.value, "message": message}})

        def _authorised(self) -> bool:
            if app.bearer_token is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {app.bearer_token}".encode()):
                return True
            self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
            return False

        def do_GET(self) -> None:
            if refuse_body(self):
                return
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok = app.healthy()
                self._send(
                    HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                    {"status": "ok" if ok else "engine loop not running"},
                )
            elif path == "/v1/kv/stats":
                if not self._authorised():
                    return
                snaps = app.snapshots()
                body: Any = snaps[0].to_json() if len(snaps) == 1 else [s.to_json() for s in snaps]
                self._send(HTTPStatus.OK, body)
            elif path == "/kv_event_sources" and app.kv_event_sources is not None:
                self._send(HTTPStatus.OK, app.kv_event_sources())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such path: {path}")

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path != "/v1/completions" or app.completions is None:
                self._error(
                    HTTPStatus.METHOD_NOT_ALLOWED
                    if path == "/v1/kv/stats"
                    else HTTPStatus.NOT_FOUND,
                    f"POST {path} is not served",
                )
                self.close_connection = True
                return
            if not self._authorised():
                return
            try:
                body = self._read_json()
                self._send(HTTPStatus.OK, app.completions(body))
            except HTTPError as exc:
                self._error(exc.status, exc.message)

        def _read_json(self) -> dict[str, Any]:
            length_header = self.headers.get("Content-Length")
            if length_header is None:
                self.close_connection = True
                raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            try:
                length = int(length_header)
            except ValueError:
                self.close_connection = True
                raise HTTPError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
            if length < 0 or length > MAX_BODY_BYTES:
                self.close_connection = True
                raise HTTPError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body must be at most {MAX_BODY_BYTES} bytes",
                )
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise HTTPError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise HTTPError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
            return body

        def do_PUT(self) -> None:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")
            self.close_connection = True

        do_DELETE = do_PATCH = do_PUT

    return Handler


class ShimServer:
    """A threaded HTTP server; ``port=0`` picks a free one (see ``.port``)."""

    def __init__(self, app: ShimApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self.httpd = QuietThreadingHTTPServer((host, port), _handler(app))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="shim-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

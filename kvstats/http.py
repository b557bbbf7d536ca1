"""The threaded HTTP server both the shim's stats endpoint and the exporter's /metrics use."""

from __future__ import annotations

import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


def refuse_body(handler: BaseHTTPRequestHandler) -> bool:
    """A GET or HEAD that carries a body: answer 400 and close, rather than read the body as
    the next request on the connection. True when refused."""
    if handler.headers.get("Transfer-Encoding") is None and handler.headers.get(
        "Content-Length", "0"
    ).strip() in ("", "0"):
        return False
    data = b"a GET or HEAD request must not have a body\n"
    handler.close_connection = True
    handler.send_response(HTTPStatus.BAD_REQUEST)
    handler.send_header("Content-Type", "text/plain")
    handler.send_header("Content-Length", str(len(data)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(data)
    return True


class QuietThreadingHTTPServer(ThreadingHTTPServer):
    """Threads per connection; a client hanging up mid-response logs at debug, no traceback."""

    daemon_threads = True
    # The kernel's accept queue: 5 (socketserver's default) turned away hundreds of clients of a
    # burst (HA Prometheus pairs, dashboards, federation) for seconds.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response is routine, not a traceback on stderr.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

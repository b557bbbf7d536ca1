"""One answer to every GET, from its own process: ``python -m devtools.static_server TYPE``
reads the body from stdin, prints the port it bound (127.0.0.1, port 0) and serves until
killed. For benchmarks and tests where the server must not share the measured process's
interpreter lock (a canned server in a thread would)."""

from __future__ import annotations

import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def spawn(body: bytes, content_type: str) -> tuple[subprocess.Popen[bytes], int]:
    """The server process serving ``body``, and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.static_server", content_type],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(body)
    proc.stdin.close()
    return proc, int(proc.stdout.readline())


def main() -> None:
    content_type = sys.argv[1] if len(sys.argv) > 1 else "application/octet-stream"
    body = sys.stdin.buffer.read()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

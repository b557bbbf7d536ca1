"""Small real servers for tests: canned HTTP answers and a reference engine process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from devtools.ports import wait_listening

Responder = Callable[[BaseHTTPRequestHandler], None]


class QuietThreadingHTTPServer(ThreadingHTTPServer):
    """The stdlib's threaded server for canned engine answers: a client hanging up is quiet."""

    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class CannedServer:
    """An HTTP server whose answer to GET is whatever ``respond`` does (swappable live)."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests += 1
                outer.respond(self)

        self.httpd = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def body(content: bytes, status: int = 200, content_type: str = "application/json") -> Responder:
    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(content)))
        h.end_headers()
        h.wfile.write(content)

    return respond


class EngineProcess:
    """``kvcache-shim reference`` as a real process: binds port 0, keeps that port on restart."""

    def __init__(self, port: int | None = None, *args: str) -> None:
        self.port = port or 0
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine_shim.cli",
                "reference",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--kv-memory",
                "2MiB",
                "--max-model-len",
                "512",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        (self.port,) = wait_listening(self.proc, timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, "engine process exited"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "engine did not come up"
            time.sleep(0.1)

    def complete(self, prompt: str, max_tokens: int = 4) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/v1/completions",
            json={"prompt": prompt, "max_tokens": max_tokens},
            timeout=30,
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/v1/kv/stats", timeout=5).json()
        return result

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> int | None:
        """Terminate gracefully; the exit code (None if it was not running)."""
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - start

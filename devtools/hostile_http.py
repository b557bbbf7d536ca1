"""Hostile HTTP clients for the front's tests and benchmark: raw exchanges read by their
framing, slowloris connections, and a normal client's latencies beside them."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from devtools.ports import wait_listening


def exchange(port: int, data: bytes, quiet: float = 1.0) -> tuple[list[int], bool]:
    """Send ``data``; the statuses of every response that comes back, and whether the server
    closed the connection (False: it stayed open ``quiet`` seconds after the last byte)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        closed = False
        sock.settimeout(quiet)
        try:
            while chunk := sock.recv(65536):
                received += chunk
            closed = True
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    return responses(received), closed


def responses(data: bytes) -> list[int]:
    """Statuses of the HTTP/1.x responses in ``data``, read by their framing (a body that
    mentions HTTP/1.1 is not a response); 0 for bytes that are not a response (an HTML page
    without a status line, a truncated head)."""
    statuses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not sep or not lines[0].startswith(b"HTTP/1."):
            statuses.append(0)
            break
        statuses.append(int(lines[0].split()[1]))
        length = next(
            (
                int(v)
                for k, _, v in (ln.partition(b":") for ln in lines[1:])
                if k.lower() == b"content-length"
            ),
            0,
        )
        data = rest[length:]
    return statuses


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class SlowClients:
    """``count`` connections that send a request head a header line at a time, never ending
    it (slowloris), reconnecting when the server closes them."""

    def __init__(self, port: int, count: int, line: bytes = b"X-Slow: 1\r\n") -> None:
        self.port, self.count, self.line = port, count, line
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _open(self) -> socket.socket | None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect_ex(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            return None
        self.opened += 1
        return sock

    def _run(self) -> None:
        socks: list[socket.socket] = []
        started: set[socket.socket] = set()
        try:
            while not self._stop.is_set():
                while len(socks) < self.count and not self._stop.is_set():
                    sock = self._open()
                    if sock is not None:
                        socks.append(sock)
                for sock in list(socks):
                    try:
                        if sock not in started:
                            sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                            started.add(sock)
                        else:
                            sock.send(self.line)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:  # closed by the server: replaced on the next round
                        socks.remove(sock)
                        started.discard(sock)
                        sock.close()
                self._stop.wait(1.0)
        finally:
            for sock in socks:
                sock.close()


def scrape_latencies(port: int, path: str, seconds: float) -> list[float]:
    """A normal client, a new connection per request, every 50 ms: each answer's latency, inf
    where none came (or not a 200). http.client: an httpx client costs ~40 ms to create."""
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
        finally:
            conn.close()
        latencies.append(time.monotonic() - start if ok else float("inf"))
        time.sleep(0.05)
    return latencies


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass(frozen=True)
class Served:
    name: str
    port: int
    pid: int
    scrape: str  # the path a normal client reads
    paths: tuple[str, ...]  # every endpoint


@contextlib.contextmanager
def both_servers(
    tree: Path,
    workdir: Path,
    descriptors: int | None = None,
    exporter_config: dict[str, object] | None = None,
) -> Iterator[list[Served]]:
    """The shim (a reference engine) and an exporter polling it, as the processes users start,
    from the source tree ``tree`` (a checkout of another commit, for before/after figures);
    ``descriptors``: their descriptor limit, soft and hard (a container's default is 1,024);
    ``exporter_config``: keys added to the exporter's configuration (e.g. a web config)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}

    def limit() -> None:
        if descriptors is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))

    quiet = {
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "cwd": tree,
        "env": env,
        "preexec_fn": limit,
    }
    engine = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine_shim.cli",
            "reference",
            "--listen",
            "127.0.0.1:0",
            "--kv-memory",
            "2MiB",
            "--max-model-len",
            "512",
        ],
        **quiet,  # type: ignore[call-overload]
    )
    exporter: subprocess.Popen[bytes] | None = None
    try:
        (engine_port,) = wait_listening(engine, timeout=60)
        config = workdir / "exporter.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": "127.0.0.1:0",
                    "poll_interval": "1s",
                    "nvml": "off",
                    "targets": [
                        {"name": "ref", "kind": "shim", "url": f"http://127.0.0.1:{engine_port}"}
                    ],
                    **(exporter_config or {}),
                }
            )
        )
        exporter = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter.cli",
                "--config",
                str(config),
                "--web.enable-lifecycle",
            ],
            **quiet,  # type: ignore[call-overload]
        )
        (port,) = wait_listening(exporter, timeout=60)
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{port}/healthz"):
            assert time.monotonic() < deadline, "the exporter did not become ready"
            time.sleep(0.2)
        yield [
            Served(
                "exporter",
                port,
                exporter.pid,
                "/metrics",
                ("/metrics", "/healthz", "/", "/-/reload", "/nowhere"),
            ),
            Served(
                "shim",
                engine_port,
                engine.pid,
                "/v1/kv/stats",
                ("/v1/kv/stats", "/healthz", "/kv_event_sources", "/v1/completions", "/nowhere"),
            ),
        ]
    finally:
        for proc in (exporter, engine):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

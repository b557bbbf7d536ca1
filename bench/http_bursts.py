"""Bursts of clients and floods of bad passwords against both HTTP servers.

    .venv/bin/python bench/http_bursts.py

(a) 500 clients connect at once (a barrier releases them together), each sends one GET on a
new connection: the exporter's ``/metrics`` (16 targets) and a shim's ``/v1/kv/stats``, each
with the accept queue of socketserver's default (5) and of ours (1024), side by side. Printed:
how many were answered within 10 s, and latency p50 / p99 / max.
(b) ``/metrics`` behind basic auth (bcrypt cost 10): the latency of a valid, cached scrape
every 100 ms, alone and while 32 clients send wrong passwords as fast as they can; and the
time an unknown user and a wrong password take (equal, or user names leak).
"""

from __future__ import annotations

import base64
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bcrypt
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.snapshots import canned_snapshot
from engine_shim.server import ShimApp, ShimServer
from exporter.app import Exporter
from exporter.config import load_config, parse_config
from kvstats.http import QuietThreadingHTTPServer
from kvstats.snapshot import parse_snapshot

SNAPSHOT = canned_snapshot()
CLIENTS = 500


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def burst(port: int, path: str, clients: int = CLIENTS) -> tuple[int, list[float]]:
    barrier = threading.Barrier(clients)
    times: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status == 200:
                with lock:
                    times.append(time.perf_counter() - started)
        except OSError:
            pass

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(times), times


def report(label: str, answered: int, times: list[float]) -> None:
    if not times:
        print(f"{label}: 0/{CLIENTS} answered")
        return
    print(
        f"{label}: {answered}/{CLIENTS} answered; p50 {1000 * percentile(times, 0.5):.0f} ms,"
        f" p99 {1000 * percentile(times, 0.99):.0f} ms, max {1000 * max(times):.0f} ms"
    )


def with_backlog(
    size: int, start: Callable[[], tuple[int, Callable[[], None]]]
) -> tuple[int, Callable[[], None]]:
    saved = QuietThreadingHTTPServer.request_queue_size
    QuietThreadingHTTPServer.request_queue_size = size
    try:
        return start()
    finally:
        QuietThreadingHTTPServer.request_queue_size = saved


def serve_snapshot(instance_id: str) -> ShimServer:
    data = json.loads(json.dumps(SNAPSHOT))
    data["engine"]["instance_id"] = instance_id
    snapshot = parse_snapshot(data)
    server = ShimServer(ShimApp(snapshots=lambda: [snapshot], healthy=lambda: True))
    server.start()
    return server


def bursts() -> None:
    snapshot = parse_snapshot(SNAPSHOT)
    engines = [serve_snapshot(f"engine-{i}") for i in range(16)]
    targets = [
        {"name": f"t{i}", "kind": "shim", "url": f"http://127.0.0.1:{engine.port}"}
        for i, engine in enumerate(engines)
    ]

    def exporter() -> tuple[int, Callable[[], None]]:
        exp = Exporter(
            parse_config(
                {"listen": "127.0.0.1:0", "nvml": "off", "poll_interval": "1s", "targets": targets}
            )
        )
        exp.start()
        time.sleep(1.5)
        return exp.port, exp.stop

    def shim() -> tuple[int, Callable[[], None]]:
        server = ShimServer(ShimApp(snapshots=lambda: [snapshot], healthy=lambda: True))
        server.start()
        return server.port, server.stop

    print(f"(a) {CLIENTS} clients at once, one GET each on a new connection")
    for name, start, path in (
        ("exporter /metrics", exporter, "/metrics"),
        ("shim /v1/kv/stats", shim, "/v1/kv/stats"),
    ):
        for backlog in (5, 1024):
            port, stop = with_backlog(backlog, start)
            try:
                report(f"  {name}, accept queue {backlog:>4}", *burst(port, path))
            finally:
                stop()
    for engine in engines:
        engine.stop()


def auth_flood() -> None:
    password = b"correct horse battery staple"
    digest = bcrypt.hashpw(password, bcrypt.gensalt(10)).decode()
    shim = serve_snapshot("auth")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "web.yml").write_text(
            yaml.safe_dump({"basic_auth_users": {"prometheus": digest}})
        )
        (Path(tmp) / "exporter.yaml").write_text(
            json.dumps(
                {
                    "listen": "127.0.0.1:0",
                    "nvml": "off",
                    "web_config_file": "web.yml",
                    "targets": [
                        {"name": "a", "kind": "shim", "url": f"http://127.0.0.1:{shim.port}"}
                    ],
                }
            )
        )
        exp = Exporter(load_config(Path(tmp) / "exporter.yaml"))
        exp.start()

    def get(user: bytes, pw: bytes) -> tuple[int, float]:
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", exp.port, timeout=30)
        auth = base64.b64encode(user + b":" + pw).decode()
        conn.request("GET", "/metrics", headers={"Authorization": f"Basic {auth}"})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status, time.perf_counter() - started

    def valid_scrapes(seconds: float) -> list[float]:
        times = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            status, took = get(b"prometheus", password)
            assert status == 200
            times.append(took)
            time.sleep(0.1)
        return times

    try:
        get(b"prometheus", password)  # the success is cached from here on
        alone = valid_scrapes(5)
        stop = threading.Event()
        wrong = [0]

        def flood() -> None:
            while not stop.is_set():
                get(b"prometheus", b"guess")
                wrong[0] += 1

        flooders = [threading.Thread(target=flood) for _ in range(32)]
        for thread in flooders:
            thread.start()
        flooded = valid_scrapes(10)
        stop.set()
        for thread in flooders:
            thread.join()
        unknown = [get(b"nobody", b"guess")[1] for _ in range(20)]
        wrong_pw = [get(b"prometheus", b"guess")[1] for _ in range(20)]
    finally:
        exp.stop()
        shim.stop()
    print("(b) basic auth, bcrypt cost 10")
    print(
        f"  valid cached scrape alone: p50 {1000 * statistics.median(alone):.1f} ms,"
        f" p99 {1000 * percentile(alone, 0.99):.1f} ms ({len(alone)} scrapes)"
    )
    print(
        f"  valid cached scrape during a flood of {wrong[0]} wrong passwords from 32 clients:"
        f" p50 {1000 * statistics.median(flooded):.1f} ms,"
        f" p99 {1000 * percentile(flooded, 0.99):.1f} ms"
        f" ({len(flooded)} scrapes)"
    )
    print(
        f"  refusal time, median: unknown user {1000 * statistics.median(unknown):.1f} ms,"
        f" wrong password {1000 * statistics.median(wrong_pw):.1f} ms"
        f" (ratio {statistics.median(wrong_pw) / statistics.median(unknown):.2f})"
    )


if __name__ == "__main__":
    bursts()
    auth_flood()

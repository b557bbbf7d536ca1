"""Bursts of clients and floods of bad passwords against both HTTP servers, each run as the
process users start (``devtools/hostile_http.py``).

    .venv/bin/python bench/http_bursts.py              # this checkout
    .venv/bin/python bench/http_bursts.py --tree DIR   # the servers of another checkout

(a) 500 clients connect at once (a barrier releases them together), each sends one GET on a
new connection: the exporter's ``/metrics`` (one reference engine polled) and the shim's
``/v1/kv/stats``. Printed: how many were answered within 10 s, and latency p50 / p99 / max.
(b) ``/metrics`` behind basic auth (bcrypt cost 10): the latency of a valid, cached scrape
every 100 ms, alone and while 32 clients send wrong passwords as fast as they can; and the
time an unknown user and a wrong password take (equal, or user names leak).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import bcrypt
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.hostile_http import both_servers  # noqa: E402

CLIENTS = 500
PASSWORD = b"correct horse battery staple"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        conn.close()


def burst(port: int, path: str) -> list[float]:
    barrier = threading.Barrier(CLIENTS)
    times: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        try:
            status, took = get(port, path)
        except OSError:
            return
        if status == 200:
            with lock:
                times.append(took)

    threads = [threading.Thread(target=one) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times


def report(label: str, times: list[float]) -> None:
    if not times:
        print(f"{label}: 0/{CLIENTS} answered")
        return
    print(
        f"{label}: {len(times)}/{CLIENTS} answered; p50 {1000 * percentile(times, 0.5):.0f} ms,"
        f" p99 {1000 * percentile(times, 0.99):.0f} ms, max {1000 * max(times):.0f} ms"
    )


def bursts(tree: Path) -> None:
    print(f"(a) {CLIENTS} clients at once, one GET each on a new connection")
    with tempfile.TemporaryDirectory() as tmp, both_servers(tree, Path(tmp)) as servers:
        for served in servers:
            report(f"  {served.name} {served.scrape}", burst(served.port, served.scrape))


def auth_flood(tree: Path) -> None:
    digest = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(10)).decode()
    with tempfile.TemporaryDirectory() as tmp:
        web = Path(tmp) / "web.yml"
        web.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": digest}}))
        extra: dict[str, object] = {"web_config_file": str(web)}
        with both_servers(tree, Path(tmp), exporter_config=extra) as servers:
            port = servers[0].port

            def as_user(user: bytes, password: bytes) -> tuple[int, float]:
                auth = base64.b64encode(user + b":" + password).decode()
                return get(port, "/metrics", {"Authorization": f"Basic {auth}"})

            def valid_scrapes(seconds: float) -> list[float]:
                times = []
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    status, took = as_user(b"prometheus", PASSWORD)
                    assert status == 200, status
                    times.append(took)
                    time.sleep(0.1)
                return times

            as_user(b"prometheus", PASSWORD)  # the success is cached from here on
            alone = valid_scrapes(5)
            stop = threading.Event()
            wrong = [0]

            def flood() -> None:
                while not stop.is_set():
                    as_user(b"prometheus", b"guess")
                    wrong[0] += 1

            flooders = [threading.Thread(target=flood) for _ in range(32)]
            for thread in flooders:
                thread.start()
            flooded = valid_scrapes(10)
            stop.set()
            for thread in flooders:
                thread.join()
            unknown = [as_user(b"nobody", b"guess")[1] for _ in range(20)]
            wrong_pw = [as_user(b"prometheus", b"guess")[1] for _ in range(20)]
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", type=Path, default=ROOT)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    bursts(args.tree)
    auth_flood(args.tree)

"""Exporter benchmarks (run: ``.venv/bin/python bench/exporter.py``), floors side by side.

(a) ``GET /metrics`` with 64 and 256 targets that all change every second (1 s polls),
    scraped at random moments, against prometheus_client's own ``start_http_server`` holding
    the same series (goal: p50 <= 0.1x the floor; <= 20 ms at 256 targets);
(b) exporter CPU and RSS while polling 64 targets every 1 s, in its own process, scraped every
    15 s (goal <= 1.5 % of one core) and every 1 s (goal <= 2 %); RSS < 60 MB;
(c) freshness with 64 targets: time from a change in one engine to the change at
    ``/metrics`` (goal: worst case <= poll interval + 50 ms).

Targets are canned ``kvcache.stats`` snapshots (one engine identity per target) served from
another process; the exporter and the floor each run in their own process (as users run
them), so the exporter's own costs are what is measured. ``--tree DIR`` runs another
checkout's exporter (before/after figures on one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT  # whose exporter runs (--tree: another checkout's, for before/after figures)
sys.path.insert(0, str(ROOT))

from devtools.ports import wait_listening  # noqa: E402
from devtools.snapshots import canned_snapshot as valid  # noqa: E402

TARGET_SERVER = textwrap.dedent("""
    import json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    template = sys.stdin.buffer.read()
    bodies = {}
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_GET(self):
            # One engine per path (its own instance id), as a fleet of engines would be.
            body = bodies.get(self.path)
            if body is None:
                body = bodies[self.path] = template.replace(b"@path@", self.path.encode())
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    class S(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024
    s = S(("127.0.0.1", 0), H)
    print(s.server_address[1], flush=True)
    s.serve_forever()
""")


def snapshot_body() -> bytes:
    data = valid("@path@")
    data["storage_tier"] = {"capacity_tokens": 10**6, "used_tokens": 12345}
    return json.dumps(data).encode()


def start_target_server() -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TARGET_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(snapshot_body())
    proc.stdin.close()
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def targets_config(base_url: str, n: int, interval: float) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "poll_interval": interval,
        "timeout": min(1.0, interval),
        "nvml": "off",
        "targets": [
            {"name": f"engine-{i:03d}", "kind": "shim", "url": f"{base_url}/t/{i}"}
            for i in range(n)
        ],
    }


FLOOR_SERVER = textwrap.dedent("""
    # prometheus_client's start_http_server over plain Gauges holding the same series: the
    # library's floor, in its own process as the exporter is in its own.
    import sys
    from prometheus_client import CollectorRegistry, Gauge, start_http_server
    from prometheus_client.parser import text_string_to_metric_families
    registry = CollectorRegistry(auto_describe=False)
    gauges = {}
    for family in text_string_to_metric_families(sys.stdin.read()):
        for s in family.samples:
            names = sorted(s.labels)
            if s.name not in gauges:
                gauges[s.name] = Gauge(
                    s.name, family.documentation or s.name, names, registry=registry
                )
            gauge = gauges[s.name]
            (gauge.labels(**s.labels) if names else gauge).set(s.value)
    server, thread = start_http_server(0, "127.0.0.1", registry=registry)
    print(server.server_address[1], flush=True)
    thread.join()
""")


def start_floor_server(text: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOR_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(text.encode())
    proc.stdin.close()
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/metrics"


def start_exporter(config: dict[str, Any], tmp: str) -> tuple[subprocess.Popen[bytes], int]:
    """The exporter as users run it (``TREE``'s code, in its own process); its port."""
    path = Path(tmp) / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=TREE,
        env={**os.environ, "PYTHONPATH": str(TREE)},
    )
    (port,) = wait_listening(proc, timeout=60)
    wait_healthy(f"http://127.0.0.1:{port}/healthz")
    return proc, port


def timed(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_latency(base_url: str, sizes: list[int], repeats: int) -> None:
    print(
        "(a) GET /metrics while every target changes every second (1 s polls), at random"
        " moments, vs prometheus_client's start_http_server holding the same series"
        " (each server in its own process)"
    )
    rng = random.Random(1)
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            exporter, port = start_exporter(targets_config(base_url, n, 1.0), tmp)
            floor_server: subprocess.Popen[bytes] | None = None
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                with httpx.Client() as client:
                    time.sleep(2)  # past start-up
                    text = client.get(url).text
                    series = sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))
                    floor_server, floor_url = start_floor_server(text)
                    floor, ours = [], []
                    for _ in range(repeats):  # interleaved, so both see the same machine
                        time.sleep(rng.uniform(0, 0.05))
                        floor += timed(lambda: client.get(floor_url), 1)  # noqa: B023
                        time.sleep(rng.uniform(0, 0.05))
                        ours += timed(lambda: client.get(url), 1)  # noqa: B023
            finally:
                for proc in (exporter, floor_server):
                    if proc is not None:
                        proc.terminate()
                        proc.wait(15)
        f, o = statistics.median(floor), statistics.median(ours)
        print(
            f"    {n:>3} targets, {series:>5} series: start_http_server p50 {f * 1e3:6.2f} ms;"
            f" ours p50 {o * 1e3:6.2f} ms, p99 {percentile(ours, 0.99) * 1e3:6.2f} ms"
            f" (ratio {o / f:.3f}x; goal <= 0.1x, and <= 20 ms at 256 targets)"
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_healthy(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not become healthy"
        time.sleep(0.1)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_steady(base_url: str, n: int, seconds: float, scrape_every: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_exporter(targets_config(base_url, n, 1.0), tmp)
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            time.sleep(2)  # past start-up
            cpu0, t0 = proc_cpu_seconds(proc.pid), time.monotonic()
            rss = []
            while time.monotonic() - t0 < seconds:
                time.sleep(scrape_every)
                httpx.get(url)  # a Prometheus scrape
                rss.append(proc_rss_mb(proc.pid))
            cpu = (proc_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
            polls = sum(
                s.value
                for f in text_string_to_metric_families(httpx.get(url).text)
                if f.name == "kvcache_exporter_polls"
                for s in f.samples
                if s.name.endswith("_total")
            )
        finally:
            proc.terminate()
            proc.wait()
    goal = "1.5%" if scrape_every >= 15 else "2%"
    print(
        f"(b) {n} targets polled every 1 s for {seconds:.0f} s, scraped every"
        f" {scrape_every:.0f} s: CPU {100 * cpu:.2f}% of one core (goal <= {goal});"
        f" RSS {rss[0]:.1f} -> {rss[-1]:.1f} MB, max {max(rss):.1f} MB (goal < 60 MB);"
        f" {polls:.0f} polls in all"
    )


class _Mutable:
    """A target whose used tokens the benchmark changes at a chosen instant."""

    def __init__(self) -> None:
        self.used = 160
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = valid()
                data["pools"][0]["used_slots"] = outer.used
                data["pools"][0]["available_slots"] = 1600 - 800 - outer.used
                payload = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def bench_freshness(changes: int, interval: float, targets: int, base_url: str) -> None:
    target = _Mutable()
    url = f"http://127.0.0.1:{target.httpd.server_address[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "listen": "127.0.0.1:0",
            "poll_interval": interval,
            "nvml": "off",
            "targets": [{"name": "f", "kind": "shim", "url": url}]
            + targets_config(base_url, targets - 1, interval)["targets"],
        }
        proc, port = start_exporter(config, tmp)
        delays = []
        try:
            metrics = f"http://127.0.0.1:{port}/metrics"
            with httpx.Client() as client:
                for k in range(changes):
                    time.sleep(
                        interval * (0.13 + 0.71 * ((k * 7) % 10) / 10)
                    )  # spread over the cycle
                    target.used = 160 + 16 * (k + 1)
                    needle = f'state="used"}} {float(target.used)}'
                    changed = time.monotonic()
                    while needle not in client.get(metrics).text:
                        time.sleep(0.002)
                    delays.append(time.monotonic() - changed)
        finally:
            proc.terminate()
            proc.wait()
            target.httpd.shutdown()
    print(
        f"(c) freshness, {targets} targets, over {changes} changes at poll interval"
        f" {interval:.1f} s: median"
        f" {statistics.median(delays) * 1e3:.0f} ms, max {max(delays) * 1e3:.0f} ms"
        f" (target <= {(interval + 0.05) * 1e3:.0f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the exporter of this checkout")
    args = parser.parse_args()
    global TREE
    TREE = args.tree.resolve()
    server, base_url = start_target_server()
    try:
        bench_latency(base_url, [int(s) for s in args.sizes.split(",")], args.repeats)
        bench_steady(base_url, 64, args.steady_seconds, scrape_every=15.0)
        bench_steady(base_url, 64, args.steady_seconds, scrape_every=1.0)
        bench_freshness(args.changes, 1.0, targets=64, base_url=base_url)
    finally:
        server.terminate()


if __name__ == "__main__":
    main()

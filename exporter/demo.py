"""``kvcache-exporter demo``: the reference engine and the exporter together on this machine.

The engine runs as its own process (it needs torch; the exporter must not import it), with a
workload; the exporter polls it, and once the first scrape has data the demo prints where to
look and a live view until interrupted.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx

from .app import Exporter
from .config import Config, Target
from .watch import LiveView, parse_exposition


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_engine(port: int, workload: str, extra: list[str]) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "engine_shim.cli",
        "reference",
        "--listen",
        f"127.0.0.1:{port}",
        "--workload",
        workload,
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, engine: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if engine.poll() is not None:
            raise RuntimeError(
                f"the reference engine exited (code {engine.returncode}) before {what}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def run_demo(
    listen: tuple[str, int],
    workload: str,
    interval: float,
    duration: float | None,
    engine_args: list[str],
) -> int:
    engine_port = free_port()
    engine = start_engine(engine_port, workload, engine_args)
    config = Config(
        listen_host=listen[0],
        listen_port=listen[1],
        poll_interval=interval,
        timeout=min(1.0, interval),
        max_response_bytes=4 << 20,
        max_series_per_target=2000,
        max_backoff=30.0,
        eta_window=max(60.0, 6 * interval),
        nvml="auto",
        targets=(
            Target(
                name="reference",
                kind="shim",
                url=f"http://127.0.0.1:{engine_port}/v1/kv/stats",
                timeout=min(1.0, interval),
            ),
        ),
        source="demo",
    )
    exporter = Exporter(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:

        def engine_up() -> bool:
            try:
                return (
                    httpx.get(f"http://127.0.0.1:{engine_port}/healthz", timeout=1).status_code
                    == 200
                )
            except httpx.HTTPError:
                return False

        def has_data() -> bool:
            engines, _ = parse_exposition(exporter.exposition.render().decode())
            return bool(engines)

        # The engine first: an exporter started before it would warn that its target is down,
        # which is only the expected start-up order.
        print("starting the reference engine (torch) ...", flush=True)
        wait_until(engine_up, 120, "the engine to answer", engine)
        exporter.start()
        shown_host = "127.0.0.1" if listen[0] in ("0.0.0.0", "") else listen[0]
        metrics_url = f"http://{shown_host}:{exporter.port}/metrics"
        wait_until(has_data, 30, "the first scrape with data", engine)
        print(
            f"\nkvcache-exporter demo: reference engine with the '{workload}' workload\n"
            f"  engine stats    http://127.0.0.1:{engine_port}/v1/kv/stats\n"
            f"  completions     http://127.0.0.1:{engine_port}/v1/completions\n"
            f"  exporter        {metrics_url}\n"
            f"  live view       kvcache-exporter watch --url {metrics_url}\n"
            f"Ctrl-C to stop.\n",
            flush=True,
        )
        view = LiveView(lambda line: print(line, flush=True))
        deadline = None if duration is None else time.monotonic() + duration
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            view.show(exporter.exposition.render().decode(), empty="(waiting for data)")
            stop.wait(max(interval, 2.0))
        return 0
    except RuntimeError as exc:
        print(f"kvcache-exporter demo: {exc}", file=sys.stderr)
        return 1
    finally:
        exporter.stop()
        engine.terminate()
        try:
            engine.wait(timeout=15)
        except subprocess.TimeoutExpired:
            engine.kill()

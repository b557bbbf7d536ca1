"""``kvcache-exporter demo``: the reference engine and the exporter together on this machine.

The engine runs as its own process (it needs torch; the exporter must not import it), with a
workload; the exporter polls it, and once the first scrape has data the demo prints where to
look and a live view until interrupted.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import httpx

from .app import Exporter
from .config import Config, Target
from .watch import LiveView, parse_exposition

# The engine's start-up line names the port it bound (it is started on port 0).
ENGINE_ADDRESS = re.compile(r"stats at http://127\.0\.0\.1:(\d+)/v1/kv/stats")


def start_engine(workload: str, extra: list[str]) -> tuple[subprocess.Popen[str], Future[int]]:
    """The engine on a port it binds itself; the port comes from its start-up line."""
    cmd = [
        sys.executable,
        "-m",
        "engine_shim.cli",
        "reference",
        "--listen",
        "127.0.0.1:0",
        "--workload",
        workload,
        *extra,
    ]
    engine = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    port: Future[int] = Future()

    def read_stdout() -> None:  # drained to the end, so the engine never blocks on the pipe
        assert engine.stdout is not None
        for line in engine.stdout:
            found = ENGINE_ADDRESS.search(line)
            if found and not port.done():
                port.set_result(int(found.group(1)))

    threading.Thread(target=read_stdout, daemon=True).start()
    return engine, port


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, engine: subprocess.Popen[str]
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


def demo_config(listen: tuple[str, int], interval: float, engine_port: int) -> Config:
    return Config(
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


def run_demo(
    listen: tuple[str, int],
    workload: str,
    interval: float,
    duration: float | None,
    engine_args: list[str],
) -> int:
    engine, bound = start_engine(workload, engine_args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    exporter: Exporter | None = None
    try:
        # The engine first: an exporter started before it would warn that its target is down,
        # which is only the expected start-up order.
        print("starting the reference engine (torch) ...", flush=True)
        wait_until(bound.done, 120, "the engine to listen", engine)
        engine_port = bound.result()

        def engine_up() -> bool:
            try:
                return (
                    httpx.get(f"http://127.0.0.1:{engine_port}/healthz", timeout=1).status_code
                    == 200
                )
            except httpx.HTTPError:
                return False

        wait_until(engine_up, 120, "the engine to answer", engine)
        exporter = Exporter(demo_config(listen, interval, engine_port))

        def has_data() -> bool:
            assert exporter is not None
            engines, _ = parse_exposition(exporter.exposition.render().decode())
            return bool(engines)

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
        if exporter is not None:
            exporter.stop()
        engine.terminate()
        try:
            engine.wait(timeout=15)
        except subprocess.TimeoutExpired:
            engine.kill()

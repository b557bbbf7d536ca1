"""The shim's cost inside a live vLLM engine: the same workload with and without the scheduler.

Run in the live vLLM environment (``scripts/test`` builds it)::

    .venv-vllm-live/bin/python bench/vllm_live_overhead.py

Two servers of the same tiny model start side by side on the CPU build of vLLM: one plain, one
with ``--scheduler-cls engine_shim.adapters.vllm.KVCacheShimScheduler`` whose stats endpoint is
polled at 10 Hz during the runs (as an exporter at a fast interval would). The same seeded
workload then runs on each in turn, alternating which goes first, for several pairs; each run's
throughput is output tokens per second, and the figure is the median of the per-pair ratios
plain / shim time (1.00 = no cost). Only one server works at a time; the idle one waits on its
input queue.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.tiny_models import make_model
from devtools.vllm_server import SHIM_SCHEDULER, VllmServer


def workload(server: VllmServer, seed: int, requests: int, prompt: int, output: int) -> float:
    """Seconds to serve ``requests`` (8 at a time) of ``prompt`` random tokens + ``output``."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 509) for _ in range(prompt)] for _ in range(requests)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: server.complete(p, output), prompts))
    return time.perf_counter() - started


def poll_stats(url: str, stop: threading.Event) -> None:
    with httpx.Client() as client:
        while not stop.wait(0.1):
            client.get(f"{url}/v1/kv/stats").raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--output", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "llama", "llama")
        plain = VllmServer(model, Path(tmp) / "plain", scheduler=None)
        shimmed = VllmServer(model, Path(tmp) / "shim", scheduler=SHIM_SCHEDULER)
        for server in (plain, shimmed):
            server.start()
        stop = threading.Event()
        try:
            for server in (plain, shimmed):
                server.wait_ready()
            poller = threading.Thread(target=poll_stats, args=(shimmed.shim_url, stop))
            poller.start()
            for server in (plain, shimmed):  # warm-up: first requests pay one-off costs
                workload(server, 0, 8, args.prompt, args.output)
            ratios: list[float] = []
            times: dict[str, list[float]] = {"plain": [], "shim": []}
            for pair in range(args.pairs):
                order = [("plain", plain), ("shim", shimmed)]
                if pair % 2:
                    order.reverse()
                took = {
                    name: workload(server, 100 + pair, args.requests, args.prompt, args.output)
                    for name, server in order
                }
                for name, seconds in took.items():
                    times[name].append(seconds)
                ratios.append(took["shim"] / took["plain"])
                print(
                    f"pair {pair}: plain {took['plain']:.2f} s, shim {took['shim']:.2f} s,"
                    f" ratio {ratios[-1]:.3f}",
                    flush=True,
                )
        finally:
            stop.set()
            for server in (plain, shimmed):
                server.stop()

    tokens = args.requests * args.output
    q = statistics.quantiles(ratios, n=4)
    plain_tps = tokens / statistics.median(times["plain"])
    shim_tps = tokens / statistics.median(times["shim"])
    print(f"\nthroughput, output tokens/s (median): plain {plain_tps:.0f}, shim {shim_tps:.0f}")
    print(
        f"shim / plain time per run: median {statistics.median(ratios):.3f}"
        f" (IQR {q[0]:.3f}-{q[2]:.3f}, {len(ratios)} pairs); goal <= 1.01"
    )


if __name__ == "__main__":
    main()

"""Reference engine benchmarks (run: ``.venv/bin/python bench/reference_engine.py``).

1. Iteration time with the stats endpoint polled at 10 Hz versus not polled, measured in
   alternating phases in one run (target ratio <= 1.02).
2. Cost of one snapshot (build + JSON) at 1k, 100k and 1M blocks, next to the O(N) brute-force
   evictable scan it replaces (target: flat).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch

from engine_shim.reference import EngineConfig, ModelShape, ReferenceEngine
from engine_shim.server import ShimApp, ShimServer


def steady_engine() -> ReferenceEngine:
    config = EngineConfig(kv_memory_bytes=64 * 2**20, max_model_len=4096, iteration_time=0.0)
    engine = ReferenceEngine(config)
    engine.start()
    return engine


def keep_busy(engine: ReferenceEngine, stop: threading.Event, concurrency: int = 16) -> None:
    """Keep ``concurrency`` long decodes running so every iteration does the same work."""
    active = [
        engine.submit([(i * 31 + j) % 4000 for j in range(512)], 3000) for i in range(concurrency)
    ]
    while not stop.wait(0.05):
        for k, request in enumerate(active):
            if request.done.is_set():
                active[k] = engine.submit([(k * 31 + j) % 4000 for j in range(512)], 3000)


def measure_phase(engine: ReferenceEngine, seconds: float) -> float:
    """Mean seconds per iteration over a phase."""
    start_iter, start = engine.iterations, time.perf_counter()
    time.sleep(seconds)
    return (time.perf_counter() - start) / max(1, engine.iterations - start_iter)


POLLER = """
import sys, time, httpx
url, hz = sys.argv[1], float(sys.argv[2])
with httpx.Client() as client:
    client.get(url).raise_for_status()
    print("ready", flush=True)
    n = 0
    while True:
        time.sleep(1 / hz)
        client.get(url).raise_for_status()
        n += 1
"""


class Poller:
    """A stats client in its own process, as the exporter is: it never shares the engine's GIL.

    Paused and resumed with SIGSTOP/SIGCONT, so adjacent phases differ only in the polling.
    """

    def __init__(self, url: str, hz: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", POLLER, url, str(hz)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.pause()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait()


def bench_polling(pairs: int, seconds: float) -> None:
    # One intra-op thread: on a 2-core machine torch's thread pool would otherwise fight
    # the poller process for cores, and the ratio would measure the OS scheduler.
    torch.set_num_threads(1)
    engine = steady_engine()
    server = ShimServer(ShimApp(snapshots=lambda: [engine.snapshot()], healthy=engine.alive))
    server.start()
    stop_busy = threading.Event()
    threading.Thread(target=keep_busy, args=(engine, stop_busy), daemon=True).start()
    time.sleep(2.0)  # warm up: all decodes admitted
    poller = Poller(f"http://127.0.0.1:{server.port}/v1/kv/stats", 10.0)
    ratios, quiet_all, polled_all = [], [], []

    def polled_phase() -> float:
        poller.resume()
        try:
            return measure_phase(engine, seconds)
        finally:
            poller.pause()

    for k in range(pairs):
        # Alternate the order (ABBA) so the drift of the workload cancels out.
        if k % 2 == 0:
            quiet, polled = measure_phase(engine, seconds), polled_phase()
        else:
            polled, quiet = polled_phase(), measure_phase(engine, seconds)
        quiet_all.append(quiet)
        polled_all.append(polled)
        ratios.append(polled / quiet)
    poller.stop()
    stop_busy.set()
    server.stop()
    engine.stop()
    print(
        f"1. iteration time, stats endpoint polled at 10 Hz (from another process) vs not;"
        f" 16 running decodes, {pairs} adjacent pairs of {seconds} s phases"
    )
    print(f"   not polled: median {statistics.median(quiet_all) * 1e3:.3f} ms/iteration")
    print(f"   polled:     median {statistics.median(polled_all) * 1e3:.3f} ms/iteration")
    q1, q3 = statistics.quantiles(ratios, n=4)[0], statistics.quantiles(ratios, n=4)[2]
    print(
        f"   ratio polled/not: median {statistics.median(ratios):.3f}"
        f" (interquartile {q1:.3f}-{q3:.3f})  (target <= 1.02)"
    )


def populated_engine(num_blocks: int) -> ReferenceEngine:
    """A pool of ``num_blocks`` with half of it cached and unpinned (evictable)."""
    shape = ModelShape(num_layers=1, num_kv_heads=1, head_dim=1, dtype="float16", vocab_size=4096)
    bs = 16
    config = EngineConfig(
        shape=shape,
        block_size=bs,
        kv_memory_bytes=num_blocks * bs * shape.bytes_per_token(1),
        iteration_time=0.0,
    )
    engine = ReferenceEngine(config)
    cache, parent = engine.cache, engine.cache.root
    for i in range(num_blocks // 2):
        block = cache.allocate()
        assert block is not None
        node = cache.insert(parent, (i % 4096, i // 4096, *([0] * (bs - 2))), block)
        assert node is not None
        cache.unpin(node)
        parent = node if i % 64 else cache.root  # chains of 64 blocks
    engine._publish()
    return engine


def bench_snapshot_cost(sizes: list[int], repeats: int) -> None:
    print("2. cost of one snapshot (build + to_json + json.dumps) vs pool size")
    for size in sizes:
        engine = populated_engine(size)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            snap = engine._build_snapshot()
            json.dumps(snap.to_json())
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        brute, stack = 0, list(engine.cache.root.children.values())
        while stack:  # every cached block, walked from the root: the unpinned ones
            node = stack.pop()
            brute += node.ref == 0
            stack.extend(node.children.values())
        scan = time.perf_counter() - start
        assert brute == engine.cache.evictable_blocks
        print(
            f"   {size:>9,} blocks: snapshot median {statistics.median(times) * 1e6:7.1f} us,"
            f" p99 {sorted(times)[int(len(times) * 0.99)] * 1e6:7.1f} us;"
            f" brute-force evictable scan {scan * 1e3:9.1f} ms"
        )
        del engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    bench_polling(args.pairs, args.seconds)
    bench_snapshot_cost([int(s) for s in args.sizes.split(",")], args.repeats)


if __name__ == "__main__":
    main()

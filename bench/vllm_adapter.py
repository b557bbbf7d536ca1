"""The vLLM adapter's cost per scheduler step on vLLM's real KVCacheManager.

Run in the vLLM environment: ``.venv-vllm/bin/python bench/vllm_adapter.py``.

A step is what the scheduler asks of the KV cache manager in a decode-heavy batch: every
running request grows by one token (a new block every 16), a few finish (their blocks become
evictable prefix cache) and are replaced by new requests that hit a shared prefix. The same
seeded steps run with the plain manager and with the adapter attached, side by side: the
tracked blocks' setters, the lookup and stats wrappers, and what the scheduler subclass adds to
each step (its lock around schedule and update_from_output, the high-water marks, the clock,
the iteration count). A snapshot is built per stats read, not per step: its cost is timed on
its own (``snapshot``), and amortised over a 1 s poll it is the per-read figure / steps per
second. Run once per vLLM release (``PYTHONPATH=.venv-vllm/matrix/0.32.0``) to compare them.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from devtools.vllm_pool import MAX_LEN, Driver, new_manager
from engine_shim.adapters.vllm import BlockPoolTracker, EngineFacts, LiveView, brute_force_evictable


def run(
    num_blocks: int, tracked: bool, steps: int, batch: int, seed: int, reuse: bool = True
) -> tuple[float, float, float]:
    """(CPU seconds per step, an O(N) scan's seconds, a snapshot read's seconds)."""
    m, config = new_manager(num_blocks)
    facts = EngineFacts(model="bench", max_model_len=MAX_LEN)
    tracker = BlockPoolTracker(m, config, facts, reuse_distances=reuse) if tracked else None
    driver = Driver(m, tracker)  # type: ignore[arg-type]
    view = None if tracker is None else LiveView(tracker, lambda: (len(driver.running), 0))
    rng = random.Random(seed)
    shared = [rng.randrange(30000) for _ in range(512)]

    def new_request() -> None:
        driver.admit(shared + [rng.randrange(30000) for _ in range(rng.randint(16, 256))])

    for _ in range(batch):
        new_request()
    gc.collect()
    gc.disable()  # as vLLM's engine core does after start-up (it freezes the heap)
    start = time.process_time()  # this process's CPU: another process's load is not counted
    for _ in range(steps):
        for request in list(driver.running.values()):
            if request.num_tokens >= MAX_LEN - 2 or rng.random() < 0.02:
                driver.free(request)
                new_request()
            elif not driver.decode(request, rng.randrange(30000)):
                driver.free(request)
        if view is not None:  # what KVCacheShimScheduler adds around the two calls of a step
            with view.lock:  # schedule()
                view.steps_in_flight += 1
                view.tracker.note_step()
                view.touched()
            with view.lock:  # update_from_output()
                view.steps_in_flight -= 1
                view.tracker.iterations += 1
                view.tracker.note_step()
                view.touched()
    per_step = (time.process_time() - start) / steps
    gc.enable()
    scan = read = 0.0
    if tracker is not None and view is not None:
        t0 = time.perf_counter()
        assert brute_force_evictable(m.block_pool) == tracker.evictable_blocks
        scan = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(200):
            view.snapshot()
        read = (time.perf_counter() - t0) / 200
    return per_step, scan, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    from vllm import __version__ as vllm_version

    print(
        f"vLLM {vllm_version}: the adapter's CPU per scheduler step, {args.steps} steps per run;"
        f" {args.reps} alternating triples on the same seeded steps (plain, adapter, adapter"
        " with KVCACHE_SHIM_REUSE_DISTANCE=off); medians of the paired differences"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            plain, shim, bare, reads, scans = [], [], [], [], []
            for rep in range(args.reps):
                p, _, _ = run(size, False, args.steps, batch, seed=rep)
                s, scan, read = run(size, True, args.steps, batch, seed=rep)
                b, _, _ = run(size, True, args.steps, batch, seed=rep, reuse=False)
                plain.append(p)
                shim.append(s - p)
                bare.append(b - p)
                reads.append(read)
                scans.append(scan)
            q = statistics.quantiles(shim, n=4) if len(shim) > 1 else [shim[0]] * 3
            print(
                f"  {batch:>3} running, {size:>9,} blocks: plain vLLM"
                f" {statistics.median(plain) * 1e6:7.1f} us/step; adapter"
                f" {statistics.median(shim) * 1e6:+6.1f} us (IQR {q[0] * 1e6:+.1f} to"
                f" {q[2] * 1e6:+.1f}), with reuse distances off"
                f" {statistics.median(bare) * 1e6:+6.1f} us; a snapshot read"
                f" {statistics.median(reads) * 1e6:5.1f} us; an O(N) scan"
                f" {statistics.median(scans) * 1e3:6.1f} ms"
            )


if __name__ == "__main__":
    main()

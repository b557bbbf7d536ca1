"""The vLLM adapter's cost per scheduler step on vLLM's real KVCacheManager.

Run in the vLLM environment: ``.venv-vllm/bin/python bench/vllm_adapter.py``.

A step is what the scheduler asks of the KV cache manager in a decode-heavy batch: every
running request grows by one token (a new block every 16), a few finish (their blocks become
evictable prefix cache) and are replaced by new requests that hit a shared prefix. The same
seeded steps run with the plain manager and with the adapter attached (block tracking plus
one snapshot per step), side by side, at 10k, 100k and 1M blocks.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from devtools.vllm_pool import MAX_LEN, Driver, new_manager
from engine_shim.adapters.vllm import BlockPoolTracker, EngineFacts, brute_force_evictable


def run(
    num_blocks: int, tracked: bool, steps: int, batch: int, seed: int, reuse: bool = True
) -> tuple[list[float], float]:
    m, config = new_manager(num_blocks)
    facts = EngineFacts(model="bench", max_model_len=MAX_LEN)
    tracker = BlockPoolTracker(m, config, facts, reuse_distances=reuse) if tracked else None
    driver = Driver(m, tracker)  # type: ignore[arg-type]
    rng = random.Random(seed)
    shared = [rng.randrange(30000) for _ in range(512)]

    def new_request() -> None:
        driver.admit(shared + [rng.randrange(30000) for _ in range(rng.randint(16, 256))])

    for _ in range(batch):
        new_request()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for request in list(driver.running.values()):
            if request.num_tokens >= MAX_LEN - 2 or rng.random() < 0.02:
                driver.free(request)
                new_request()
            elif not driver.decode(request, rng.randrange(30000)):
                driver.free(request)
        if tracker is not None:
            tracker.iterations += 1
            tracker.snapshot(len(driver.running), 0)
        times.append(time.perf_counter() - start)
    scan = 0.0
    if tracker is not None:
        t0 = time.perf_counter()
        assert brute_force_evictable(m.block_pool) == tracker.evictable_blocks
        scan = time.perf_counter() - t0
    return times, scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(
        f"adapter cost per scheduler step ({args.batch} running requests, {args.steps} steps,"
        f" medians; ratio = with adapter / plain vLLM)"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        ratios, plain_all, shim_all, bare_all = [], [], [], []
        for rep in range(3):  # alternate the three runs on the same seeded steps
            plain, _ = run(size, False, args.steps, args.batch, seed=rep)
            shim, scan = run(size, True, args.steps, args.batch, seed=rep)
            bare, _ = run(size, True, args.steps, args.batch, seed=rep, reuse=False)
            plain_all += plain
            shim_all += shim
            bare_all += bare
            ratios.append(statistics.median(shim) / statistics.median(plain))
        p, s = statistics.median(plain_all), statistics.median(shim_all)
        b = statistics.median(bare_all)
        print(
            f"  {size:>9,} blocks: plain {p * 1e6:7.1f} us/step,"
            f" with adapter {s * 1e6:7.1f} us/step"
            f" (+{(s - p) * 1e6:5.1f} us, ratio {statistics.median(ratios):.3f}; of which"
            f" reuse distances +{(s - b) * 1e6:5.1f} us: KVCACHE_SHIM_REUSE_DISTANCE=off"
            f" {b * 1e6:7.1f} us/step); an O(N) scan instead would cost {scan * 1e3:7.1f} ms/step"
        )


if __name__ == "__main__":
    main()

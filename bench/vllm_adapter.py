"""The vLLM adapter's cost per scheduler step on vLLM's real KVCacheManager.

Run in the vLLM environment: ``.venv-vllm/bin/python bench/vllm_adapter.py``.

A step is what the scheduler asks of the KV cache manager in a decode-heavy batch: every
running request grows by one token (a new block every 16), a few finish (their blocks become
evictable prefix cache) and are replaced by new requests that hit a shared prefix; the stats
logger takes vLLM's prefix-cache stats. The same seeded steps run with the plain manager and
with the shim attached, side by side: its counting, its stats wrapper, and what the scheduler
subclass adds to each step (its lock around schedule and update_from_output, the high-water
mark, the clock, the iteration count). Timings on a shared host wander; the Python bytecodes
each lane runs, counted by tracing the same steps, do not. A snapshot is built per stats
read, not per step: its cost is timed on its own (``snapshot``), and amortised over a 1 s poll
it is the per-read figure / steps per second. Run once per vLLM release
(``PYTHONPATH=.venv-vllm/matrix/0.32.0``) to compare them. ``vllm_adapter_instructions.py``
counts the same steps' machine instructions under valgrind (C work included, no noise).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from devtools.vllm_oracle import brute_force_evictable
from devtools.vllm_pool import MAX_LEN, Driver, new_manager
from engine_shim.adapters.vllm import BlockPoolTracker, EngineFacts, LiveView


class Lane:
    """One pool driven by the seeded workload: plain vLLM, or with the adapter attached."""

    def __init__(
        self, num_blocks: int, batch: int, seed: int, tracked: bool, reuse: bool = True
    ) -> None:
        self.manager, config = new_manager(num_blocks)
        facts = EngineFacts(model="bench", max_model_len=MAX_LEN)
        self.tracker = (
            BlockPoolTracker(self.manager, config, facts, reuse_distances=reuse)
            if tracked
            else None
        )
        self.driver = Driver(self.manager, self.tracker)  # type: ignore[arg-type]
        driver = self.driver
        self.view = (
            None
            if self.tracker is None
            else LiveView(self.tracker, lambda: (len(driver.running), 0))
        )
        self.rng = random.Random(seed)
        self.shared = [self.rng.randrange(30000) for _ in range(512)]
        for _ in range(batch):
            self.new_request()
        self.times: list[float] = []

    def new_request(self) -> None:
        rng = self.rng
        self.driver.admit(self.shared + [rng.randrange(30000) for _ in range(rng.randint(16, 256))])

    def step(self) -> None:
        """One scheduler step, timed: every running request decodes a token, about 2 % finish
        and are replaced; then what KVCacheShimScheduler adds around its two calls."""
        driver, rng, view = self.driver, self.rng, self.view
        start = time.perf_counter()
        for request in list(driver.running.values()):
            if request.num_tokens >= MAX_LEN - 2 or rng.random() < 0.02:
                driver.free(request)
                self.new_request()
            elif not driver.decode(request, rng.randrange(30000)):
                driver.free(request)
        driver.take_stats()  # the scheduler's make_stats, every step (log_stats is on)
        if view is not None:
            with view.lock:  # schedule()
                view.steps_in_flight += 1
                view.tracker.note_step()
                view.touched()
            with view.lock:  # update_from_output()
                view.steps_in_flight -= 1
                view.tracker.iterations += 1
                view.touched()
        self.times.append(time.perf_counter() - start)


def bytecodes_per_step(lane: Lane, steps: int = 10) -> float:
    """Python bytecodes a lane's steps run, counted by tracing: the noise-free side of the
    cost (the same seeded steps on every lane; C work and cache effects are not in it)."""
    executed = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal executed
        frame.f_trace_opcodes = True
        executed += event == "opcode"
        return trace

    sys.settrace(trace)
    try:
        for _ in range(steps):
            lane.step()
    finally:
        sys.settrace(None)
    return executed / steps


def lockstep(plain: Lane, other: Lane, steps: int) -> list[float]:
    """Both lanes' steps, which goes first alternating; the other's extra time per step."""
    gc.collect()
    gc.disable()  # as vLLM's engine core does after start-up (it freezes the heap)
    for i in range(steps):
        for lane in (plain, other) if i % 2 else (other, plain):
            lane.step()
    gc.enable()
    return [t - p for t, p in zip(other.times, plain.times, strict=True)]


def floor(num_blocks: int, steps: int, batch: int, seed: int) -> tuple[float, float]:
    """Plain vLLM against plain vLLM, built and run as a pair is: what this method reads
    where there is nothing to find (the host's noise, and the second lane's place in memory)."""
    diffs = lockstep(
        Lane(num_blocks, batch, seed, tracked=False),
        Lane(num_blocks, batch, seed, tracked=False),
        steps,
    )
    return statistics.mean(diffs), statistics.median(diffs)


def paired(num_blocks: int, steps: int, batch: int, seed: int, curve: bool) -> dict[str, Any]:
    """Plain vLLM and the shim in lockstep on the same seeded steps (each lane's state stays
    identical), which one goes first alternating every step, so that drift and other load fall
    on both alike; per-step paired differences. One pair at a time: a third lane beside them
    (the curve's, with its own memory traffic) would add its noise to the other two."""
    plain = Lane(num_blocks, batch, seed, tracked=False)
    shim = Lane(num_blocks, batch, seed, tracked=True, reuse=curve)
    diffs = lockstep(plain, shim, steps)
    assert shim.tracker is not None
    assert brute_force_evictable(shim.manager.block_pool) == shim.tracker.evictable_blocks
    # Still in lockstep: the same next steps, traced (plain's count, and the shim's extra).
    plain_ops = bytecodes_per_step(plain)
    return {
        "plain": statistics.mean(plain.times),
        "diff": (statistics.mean(diffs), statistics.median(diffs)),
        "ops": (plain_ops, bytecodes_per_step(shim) - plain_ops),
        "shim": shim,
    }


def run(num_blocks: int, steps: int, batch: int, seed: int) -> dict[str, Any]:
    """The shim as it starts by default (counts only) against plain vLLM, then the shim with
    the what-if curve against plain vLLM; then what a stats read, an O(N) scan and the
    iteration log would cost on the curve's pool."""
    counts = paired(num_blocks, steps, batch, seed, curve=False)
    curve = paired(num_blocks, steps, batch, seed, curve=True)
    result: dict[str, Any] = {
        "plain": statistics.mean((counts["plain"], curve["plain"])),
        "counts": counts["diff"],
        "shim": curve["diff"],
        "ops": {
            "plain": counts["ops"][0],
            "counts": counts["ops"][1],
            "shim": curve["ops"][1],
        },
    }
    shim: Lane = curve["shim"]
    assert shim.tracker is not None and shim.view is not None
    t0 = time.perf_counter()
    brute_force_evictable(shim.manager.block_pool)
    result["scan"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(200):
        shim.view.snapshot()
    result["read"] = (time.perf_counter() - t0) / 200
    # KVCACHE_SHIM_LOG_ITERATIONS=1: one line per step through a stream handler, as vLLM's.
    logger = logging.getLogger("bench.kv_steps")
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        t0 = time.perf_counter()
        for _ in range(1000):
            logger.info(shim.tracker.step_line(batch, 0))
        result["log_line"] = (time.perf_counter() - t0) / 1000
        logger.removeHandler(handler)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--floor", action="store_true", help="also plain vLLM against plain vLLM, per seed"
    )
    args = parser.parse_args()
    from vllm import __version__ as vllm_version

    print(
        f"vLLM {vllm_version}: the shim's cost per scheduler step, as it starts by default"
        f" (counts only) and with the what-if curve (KVCACHE_SHIM_REUSE_DISTANCE=on), each in"
        f" lockstep with plain vLLM on the same seeded steps ({args.steps} steps x {args.reps}"
        f" seeds); mean (median) of the per-step differences"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            runs = [run(size, args.steps, batch, seed) for seed in range(args.reps)]
            if args.floor:
                floors = [floor(size, args.steps, batch, seed) for seed in range(args.reps)]
                print(
                    f"  {batch:>3} running, {size:>9,} blocks: plain vLLM against plain vLLM"
                    f" {statistics.mean(m for m, _ in floors) * 1e6:+6.1f}"
                    f" ({statistics.mean(m for _, m in floors) * 1e6:+.1f}) us; per-seed means:"
                    f" {', '.join(f'{m * 1e6:+.0f}' for m, _ in floors)} us"
                )
            shim = [r["shim"] for r in runs]
            counts = [r["counts"] for r in runs]

            def ops(lane: str, runs: list[dict[str, Any]] = runs) -> float:
                return float(statistics.mean(r["ops"][lane] for r in runs))

            print(
                f"  {batch:>3} running, {size:>9,} blocks: plain vLLM"
                f" {statistics.mean(r['plain'] for r in runs) * 1e6:7.1f} us/step; shim"
                f" {statistics.mean(m for m, _ in counts) * 1e6:+6.1f}"
                f" ({statistics.mean(m for _, m in counts) * 1e6:+.1f}) us, with the curve"
                f" {statistics.mean(m for m, _ in shim) * 1e6:+6.1f}"
                f" ({statistics.mean(m for _, m in shim) * 1e6:+.1f}) us; per-seed means: shim"
                f" {', '.join(f'{m * 1e6:+.0f}' for m, _ in counts)}, with the curve"
                f" {', '.join(f'{m * 1e6:+.0f}' for m, _ in shim)} us; Python bytecodes per step:"
                f" plain vLLM {ops('plain'):,.0f}, shim {ops('counts'):+,.0f},"
                f" with the curve {ops('shim'):+,.0f}; a snapshot read"
                f" {statistics.median(r['read'] for r in runs) * 1e6:4.1f} us, the iteration log"
                f" {statistics.median(r['log_line'] for r in runs) * 1e6:4.1f} us per step, an"
                f" O(N) scan {statistics.median(r['scan'] for r in runs) * 1e3:5.1f} ms"
            )


if __name__ == "__main__":
    main()

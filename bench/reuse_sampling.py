"""The reuse-distance tracker's sampling where a few prefixes carry most lookups.

    .venv/bin/python bench/reuse_sampling.py [--traces 6] [--requests 1500]

Each trace (``devtools.reuse_traces.hot_prefix_trace``: four long system prompts carry most
lookups, the rest unique tails and continued conversations, up to four requests running) is
told, event for event, to trackers side by side: full tracking (the truth), and at 1/4 and 1/8
the stratified sample (blocks looked up twice tracked in full) and spatial sampling alone
(SHARDS, what the tracker did before). Printed per rate: the worst and mean absolute error of
the curve over every bound and every trace, and the time inside each tracker per request (the
events precomputed, so the key hashing is not counted). Goal (issue 25): within 0.02 of full
tracking at every size at 1/4 and 1/8.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.reuse_traces import block_keys, curve_errors, hot_prefix_trace
from engine_shim.reuse_distance import ReuseDistanceTracker

BLOCK = 16
POOL_TOKENS = 8192
Event = tuple[str, tuple[Any, ...]]  # a tracker method's name and its arguments


def events(prompts: list[list[int]], running_at_most: int = 4) -> list[Event]:
    """The calls an engine makes, precomputed (as ``replay_concurrently`` makes them)."""
    import random

    rng = random.Random(len(prompts))
    out: list[Event] = []
    running: list[list[bytes]] = []
    pinned = 0
    for prompt in prompts:
        keys = block_keys(prompt, BLOCK)
        newly_held = [k for k in keys if not any(k in other for other in running)]
        out.append(("lookup", (keys, len(prompt), pinned)))
        out.append(("pinned_all", (newly_held,)))
        running.append(keys)
        pinned += len(keys) * BLOCK
        while running and (len(running) > running_at_most or rng.random() < 0.4):
            done = running.pop(rng.randrange(len(running)))
            pinned -= len(done) * BLOCK
            idle: list[Hashable] = [
                k for k in reversed(done) if not any(k in other for other in running)
            ]
            out.append(("released_all", (idle,)))
    return out


def timed(tracker: ReuseDistanceTracker, calls: list[Event]) -> float:
    bound = [(getattr(tracker, name), args) for name, args in calls]
    start = time.perf_counter()
    for method, args in bound:
        method(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=6)
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    kinds = {"stratified": None, "spatial alone": 0}  # hot capacity: default, none
    errors: dict[tuple[float, str], list[float]] = {}
    worst: dict[tuple[float, str], list[float]] = {}
    seconds: dict[tuple[float, str], float] = {}
    full_seconds = 0.0
    for seed in range(args.traces):
        calls = events(hot_prefix_trace(seed, args.requests, BLOCK))
        exact = ReuseDistanceTracker(BLOCK, POOL_TOKENS, max_tracked=10**9)
        full_seconds += timed(exact, calls)
        for rate in (1 / 4, 1 / 8):
            for kind, hot_capacity in kinds.items():
                t = ReuseDistanceTracker(
                    BLOCK, POOL_TOKENS, max_tracked=10**9, hot_capacity=hot_capacity
                )
                t.sample_at_most(rate)
                seconds[rate, kind] = seconds.get((rate, kind), 0.0) + timed(t, calls)
                e = [abs(x) for x in curve_errors(exact, t)]
                errors.setdefault((rate, kind), []).extend(e)
                worst.setdefault((rate, kind), []).append(max(e))
    requests = args.traces * args.requests
    print(f"{args.traces} traces x {args.requests} requests, pool {POOL_TOKENS} tokens")
    print(f"full tracking: {full_seconds / requests * 1e6:.1f} us per request")
    for (rate, kind), errs in errors.items():
        print(
            f"1/{1 / rate:g} {kind:<14} worst {max(worst[rate, kind]):.4f}"
            f" (traces: {', '.join(f'{w:.3f}' for w in worst[rate, kind])})"
            f"  mean {statistics.fmean(errs):.4f}"
            f"  {seconds[rate, kind] / requests * 1e6:.1f} us per request"
        )


if __name__ == "__main__":
    main()

"""Lookup traces for the reuse-distance tracker's own tests and benchmarks: a workload where a
few prefixes carry most lookups, and a replay of it with several requests running at once."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from engine_shim.reuse_distance import ReuseDistanceTracker


def hot_prefix_trace(seed: int, n: int, block_size: int) -> list[list[int]]:
    """A few long system prompts carry most lookups (55/25/12/8 %), each request with a
    unique tail; a fifth continue an earlier request (its whole prompt, then more)."""
    rng = random.Random(seed)
    systems = [
        [rng.randrange(10**6) for _ in range(block_size * rng.randrange(24, 64))] for _ in range(4)
    ]
    out: list[list[int]] = []
    for _ in range(n):
        if out and rng.random() < 0.2:
            head = rng.choice(out[-30:])
        else:
            head = rng.choices(systems, (55, 25, 12, 8))[0]
        out.append(head + [rng.randrange(10**6) for _ in range(rng.randrange(4, 80))])
    return out


def block_keys(prompt: Sequence[int], block_size: int) -> list[bytes]:
    """Chain keys of a prompt's cacheable full blocks (the last token is always computed)."""
    cacheable = (len(prompt) - 1) // block_size
    return [
        hashlib.blake2b(
            repr(tuple(prompt[: (i + 1) * block_size])).encode(), digest_size=16
        ).digest()
        for i in range(cacheable)
    ]


def replay_concurrently(
    trackers: Sequence[ReuseDistanceTracker],
    prompts: list[list[int]],
    block_size: int,
    seed: int,
    running_at_most: int = 4,
) -> None:
    """Lookups, pins and leaf-first releases, as the engines tell them, with up to
    ``running_at_most`` requests running at once (their blocks pinned during lookups)."""
    rng = random.Random(seed)
    running: list[list[bytes]] = []
    pinned_tokens = 0
    for prompt in prompts:
        keys = block_keys(prompt, block_size)
        for t in trackers:
            t.lookup(keys, len(prompt), pinned_tokens)
            t.pinned_all([k for k in keys if not any(k in other for other in running)])
        running.append(keys)
        pinned_tokens += len(keys) * block_size
        while running and (len(running) > running_at_most or rng.random() < 0.4):
            done = running.pop(rng.randrange(len(running)))
            pinned_tokens -= len(done) * block_size
            idle = [k for k in reversed(done) if not any(k in other for other in running)]
            for t in trackers:
                t.released_all(idle)


def curve_errors(exact: ReuseDistanceTracker, sampled: ReuseDistanceTracker) -> list[float]:
    """Sampled minus exact hit ratio at every bound (shares of the looked-up tokens)."""
    e, s = exact.histogram(), sampled.histogram()
    return [
        (b - a) / e.query_tokens
        for a, b in zip(e.cumulative_tokens, s.cumulative_tokens, strict=True)
    ]

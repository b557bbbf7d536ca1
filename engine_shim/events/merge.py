"""What a whole KV event stream adds to an engine's snapshot: resident prefix slots per tier
and, where the engine cannot tell evictable blocks apart (vLLM's ``/metrics``), bounds on them.

With C the cached device blocks (the stream's resident count), U the blocks pinned by running
requests (vLLM's usage gauge) and N - 1 the usable blocks: every cached block in use is one of
the U, and every evictable block is cached and free, so

    max(0, C - U) <= evictable <= min(C, N - 1 - U).

Where partial-block caching (vLLM's hybrid models in align mode) lets a block carry a second,
shorter entry, C is only known to lie in [full entries, all entries]: the lower bound takes
the fewest, the upper the most, and both still hold (``tests/vllm`` checks them against vLLM's
own pool at every step). The exact count stays the shim's.
"""

from __future__ import annotations

import dataclasses

from kvstats.snapshot import Pool, Snapshot

from .stream import StreamReport


def evictable_bounds(
    cached_blocks: int, pool: Pool, cached_at_most: int | None = None
) -> tuple[int, int] | None:
    """(lower, upper) evictable slots of ``pool`` given its cached blocks (at least
    ``cached_blocks``, at most ``cached_at_most``, where partial entries leave it open); None
    where the two disagree (more cached blocks than the pool has: a stream that does not
    describe this pool, and no bound is better than a wrong one)."""
    used_blocks = pool.used_slots // pool.block_size
    free_blocks = (pool.capacity_slots - pool.used_slots) // pool.block_size
    most = cached_blocks if cached_at_most is None else cached_at_most
    lower = max(0, cached_blocks - used_blocks)
    upper = min(most, free_blocks)
    if lower > upper:
        return None
    return lower * pool.block_size, upper * pool.block_size


def with_stream(snapshot: Snapshot, report: StreamReport | None) -> Snapshot:
    """``snapshot`` with what ``report`` proves; unchanged unless the stream is whole. The
    producer's own resident counts (the shim's, exact) win over the stream's."""
    if report is None or not report.whole:
        return snapshot
    resident = {**report.resident_slots, **snapshot.prefix_resident_slots}
    pools = snapshot.pools
    fewest, most = report.cached_blocks.get("device", (0, 0))
    bounds = None
    if len(pools) == 1 and pools[0].evictable_slots is None:
        # One pool that cannot split its free space (a bridge): every group's blocks are its.
        bounds = evictable_bounds(fewest, pools[0], most)
    if bounds is not None:
        lower, upper = bounds
        pools = (
            dataclasses.replace(pools[0], evictable_slots_lower=lower, evictable_slots_upper=upper),
        )
    return dataclasses.replace(snapshot, pools=pools, prefix_resident_slots=resident)

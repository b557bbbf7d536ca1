"""A test-only scheduler: the shim's, plus a brute-force count of vLLM's pool at every step.

Loaded by the live engine with ``--scheduler-cls tests.vllm_live.checking.CheckingScheduler``.
After every scheduler call that can change the pool it writes one JSON line to
``KVCACHE_CHECK_LOG``: what the shim's endpoint would serve at that instant, and the truth
counted here from vLLM's own block fields (independently of the adapter's code).
"""

from __future__ import annotations

import json
import os
from typing import Any

from devtools.vllm_oracle import brute_force_evictable_tokens
from engine_shim.adapters.vllm import KVCacheShimScheduler
from engine_shim.events.merge import evictable_bounds
from kvstats.snapshot import Pool


def bridge_pool(pool: Pool, usage: float) -> Pool:
    """The pool as the /metrics bridge sees it: capacity, and used from vLLM's usage gauge."""
    used = round(usage * pool.capacity_slots / pool.block_size) * pool.block_size
    return Pool(pool.name, pool.block_size, pool.capacity_slots, used, None, None)


def pool_truth(block_pool: Any) -> tuple[int, int, int]:
    """(used, evictable, available) blocks by vLLM's definitions, counted one block at a time.

    used: referenced by a request (``ref_cnt > 0``); evictable: unreferenced but still holding a
    cached prefix (it has a block hash); available: the rest. Block 0, the null block, is never
    capacity.
    """
    used = evictable = available = 0
    for block in block_pool.blocks:
        if block.is_null:
            continue
        if block.ref_cnt > 0:
            used += 1
        elif block.block_hash is not None:
            evictable += 1
        else:
            available += 1
    return used, evictable, available


def cached_blocks(block_pool: Any) -> int:
    """Blocks holding a prefix-cache entry (a block hash), in use or not: what vLLM's KV events
    say is stored and not yet removed."""
    return sum(1 for b in block_pool.blocks if not b.is_null and b.block_hash is not None)


def evictable_by_group(block_pool: Any, group_kinds: list[str]) -> dict[str, int]:
    """Evictable blocks per KV cache group kind: vLLM appends the group id to each block's hash
    (``BlockHashWithGroupId``: the hash, then 4 bytes big-endian)."""
    counts = dict.fromkeys(group_kinds, 0)
    for block in block_pool.blocks:
        if not block.is_null and block.ref_cnt == 0 and block.block_hash is not None:
            counts[group_kinds[int.from_bytes(bytes(block.block_hash)[-4:], "big")]] += 1
    return counts


class CheckingScheduler(KVCacheShimScheduler):  # type: ignore[misc,valid-type]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_log = open(os.environ["KVCACHE_CHECK_LOG"], "a", buffering=1)  # noqa: SIM115
        self._group_kinds = [
            type(g.kv_cache_spec).__name__ for g in self.kv_cache_config.kv_cache_groups
        ]
        self._check("init")

    def _check(self, where: str) -> None:
        snap = self._kvcache_view.snapshot()
        pool = snap.pools[0]
        bs = pool.block_size
        manager = self.kv_cache_manager
        cached = cached_blocks(manager.block_pool)
        bounds = evictable_bounds(cached, bridge_pool(pool, manager.usage))
        line = {
            "where": where,
            "served": [
                pool.used_slots // bs,
                pool.evictable_slots // bs,
                pool.available_slots // bs,
            ],
            "truth": list(pool_truth(manager.block_pool)),
            "evictable_by_group": evictable_by_group(manager.block_pool, self._group_kinds),
            "vllm_usage": manager.usage,
            "preemptions": snap.counters.preemptions,
            "tokens": [
                pool.evictable_prefix_tokens,
                brute_force_evictable_tokens(
                    manager.block_pool, self.kvcache_tracker.cached_tokens
                ),
            ],
            "status": None if snap.status is None else snap.status.state,
            "counting": self.kvcache_tracker.counting,
            "curve": snap.reuse_distance is not None,
            # The shim's resident slots, and the bounds a bridge with a whole event stream
            # would publish at this step (from the true cached count and vLLM's usage).
            "cached": [snap.prefix_resident_slots.get("device", 0) // bs, cached],
            "bounds": None if bounds is None else [b // bs for b in bounds],
        }
        self._check_log.write(json.dumps(line) + "\n")

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        output = super().schedule(*args, **kwargs)
        self._check("schedule")
        return output

    def update_from_output(self, *args: Any, **kwargs: Any) -> Any:
        result = super().update_from_output(*args, **kwargs)
        self._check("update_from_output")
        return result

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> Any:
        result = super().reset_prefix_cache(*args, **kwargs)
        self._check("reset_prefix_cache")
        return result

    def finish_requests(self, *args: Any, **kwargs: Any) -> Any:
        result = super().finish_requests(*args, **kwargs)
        self._check("finish_requests")
        return result

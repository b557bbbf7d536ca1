"""vLLM's own definitions of a pool's evictable blocks, counted one block at a time: the oracle
the adapter's O(1) counts are checked against (tests, benchmarks, the live checking
scheduler). Not product code: nothing in the shim scans the pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def brute_force_evictable(block_pool: Any) -> int:
    """Blocks no request references that still hold a cached prefix (a block hash)."""
    return sum(
        1
        for b in block_pool.blocks
        if b.ref_cnt == 0 and not b.is_null and b.block_hash is not None
    )


def brute_force_evictable_tokens(block_pool: Any, cached_tokens: Callable[..., int]) -> int:
    """Prefix tokens in those blocks."""
    return sum(
        cached_tokens(b.block_hash, getattr(b, "block_hash_num_tokens", None))
        for b in block_pool.blocks
        if b.ref_cnt == 0 and not b.is_null and b.block_hash is not None
    )

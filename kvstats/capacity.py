"""Group-aware KV capacity: how many max-length requests a pool really holds.

``blocks x block_size / max_model_len`` is wrong for hybrid models: a request holds blocks in
every KV group at once, and a sliding-window group holds only the window. These functions
follow vLLM 0.33 (``vllm/v1/core/kv_cache_utils.py``) exactly, and extend it to engines whose
groups live in separate pools (SGLang, the reference engine) by taking the tightest pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def full_attention_blocks(max_model_len: int, block_size: int) -> int:
    return cdiv(max_model_len, block_size)


def sliding_window_blocks(
    max_model_len: int, block_size: int, sliding_window: int, max_in_flight_tokens: int
) -> int:
    """vLLM's SlidingWindowSpec footprint: the window, the tokens in flight, one spare block."""
    tokens = min(sliding_window - 1 + max_in_flight_tokens, max_model_len)
    return cdiv(tokens, block_size) + 1


@dataclass(frozen=True, slots=True)
class GroupFootprint:
    pool: str
    blocks_per_request: int


def max_concurrency(
    pool_blocks: Mapping[str, int], groups: Iterable[GroupFootprint]
) -> float | None:
    """Requests of max_model_len that fit: per pool ``num_blocks / sum(blocks_per_request)``.

    With one shared pool this is vLLM's formula verbatim (``num_blocks`` includes vLLM's null
    block, as vLLM's does). With separate pools the tightest pool bounds the engine.
    """
    per_pool: dict[str, int] = {}
    for group in groups:
        per_pool[group.pool] = per_pool.get(group.pool, 0) + group.blocks_per_request
    ratios = [
        pool_blocks[pool] / footprint
        for pool, footprint in per_pool.items()
        if footprint > 0 and pool in pool_blocks
    ]
    return min(ratios) if ratios else None


def kv_cache_size_tokens(concurrency: float, max_model_len: int) -> int:
    """vLLM's ``kv_cache_size_tokens``: concurrency at max_model_len, in tokens (not slots)."""
    return int(concurrency * max_model_len)

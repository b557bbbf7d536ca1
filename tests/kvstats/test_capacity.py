"""Group-aware max concurrency, checked against vLLM 0.33's worked examples."""

from __future__ import annotations

import pytest

from kvstats.capacity import (
    GroupFootprint,
    full_attention_blocks,
    kv_cache_size_tokens,
    max_concurrency,
    sliding_window_blocks,
)


def test_single_full_group_matches_vllm() -> None:
    # vLLM: N = 28,493 blocks (null block included), L = 32,768, bs = 16.
    per_req = full_attention_blocks(32768, 16)
    assert per_req == 2048
    conc = max_concurrency({"full": 28493}, [GroupFootprint("full", per_req)])
    assert conc is not None
    assert conc == pytest.approx(13.91259765625, abs=1e-12)
    assert kv_cache_size_tokens(conc, 32768) == 455_888  # == N x bs for one full group


@pytest.mark.parametrize(
    ("max_model_len", "full_blocks", "swa_blocks", "concurrency", "size_tokens"),
    [(4096, 256, 257, 194.93, 798_440), (32768, 2048, 521, 38.93, 1_275_515)],
)
def test_sliding_window_hybrid_matches_vllm_table(
    max_model_len: int, full_blocks: int, swa_blocks: int, concurrency: float, size_tokens: int
) -> None:
    # Full + SWA sharing one pool of N = 100,000 blocks; W = 128, bs = 16, in flight 8192.
    assert full_attention_blocks(max_model_len, 16) == full_blocks
    assert sliding_window_blocks(max_model_len, 16, 128, 8192) == swa_blocks
    groups = [GroupFootprint("shared", full_blocks), GroupFootprint("shared", swa_blocks)]
    conc = max_concurrency({"shared": 100_000}, groups)
    assert conc is not None
    assert conc == pytest.approx(concurrency, abs=0.005)
    assert kv_cache_size_tokens(conc, max_model_len) == size_tokens
    # The naive figure every dashboard computes is wrong exactly by the SWA footprint:
    naive = 100_000 * 16 / max_model_len
    assert naive / conc == pytest.approx((full_blocks + swa_blocks) / full_blocks)


def test_separate_pools_are_bounded_by_the_tightest() -> None:
    # 1000 full blocks at 256 per request (3.906), 100 SWA blocks at 9 per request (11.1).
    groups = [GroupFootprint("full", 256), GroupFootprint("swa", 9)]
    assert max_concurrency({"full": 1000, "swa": 100}, groups) == pytest.approx(1000 / 256)
    assert max_concurrency({"full": 1000, "swa": 20}, groups) == pytest.approx(20 / 9)


def test_no_footprint_means_unknown() -> None:
    assert max_concurrency({"full": 10}, []) is None


def test_sliding_window_footprint_by_hand() -> None:
    # vLLM: cdiv(sliding_window - 1 + max_num_batched_tokens, block_size) + 1.
    # 128 - 1 + 2 = 129 tokens -> 9 blocks (+1 spare) = 10; 128 tokens would make 8 + 1.
    assert sliding_window_blocks(4096, 16, 128, 2) == 10
    # Capped by max_model_len: 100 tokens -> 7 blocks + 1.
    assert sliding_window_blocks(100, 16, 128, 2048) == 8


def test_groups_without_a_pool_or_a_footprint_are_left_out() -> None:
    one_block = [GroupFootprint("full", 1)]
    assert max_concurrency({"full": 10}, one_block) == 10.0  # one block per request counts
    # A group on a pool the engine did not report: no figure for it, not an error.
    assert max_concurrency({"full": 10}, [*one_block, GroupFootprint("gone", 4)]) == 10.0
    # A group that needs nothing bounds nothing.
    assert max_concurrency({"full": 10, "x": 1}, [*one_block, GroupFootprint("x", 0)]) == 10.0
    assert max_concurrency({"x": 1}, [GroupFootprint("x", 0)]) is None

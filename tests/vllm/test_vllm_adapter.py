"""The vLLM adapter on vLLM's real block pool (runs in .venv-vllm; see scripts/test).

A real ``KVCacheManager`` is driven the way vLLM's scheduler drives it, with real
``Request`` objects: admission with prefix lookup, prefill, decode growth, frees, and
eviction under pressure. After every operation the adapter's O(1) counts must equal a
brute-force count over the pool's blocks.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.vllm_pool import (
    BLOCK,
    MAX_LEN,
    PAGE_BYTES_PER_TOKEN,
    Driver,
    kv_config,
    manager,
)
from engine_shim.adapters.vllm import (
    BlockPoolTracker,
    LiveView,
    kv_allocation_bytes,
    reuse_distances_enabled,
)


def test_the_blind_spot_vllm_leaves() -> None:
    """100 tokens allocated and freed: vLLM says 0 % while 6 blocks (96 tokens) sit evictable."""
    m, tracker = manager(64)
    d = Driver(m, tracker)
    request = d.admit(list(range(100)))
    assert request is not None
    d.free(request)
    assert m.usage == 0.0
    snap = tracker.snapshot(0, 0)
    full = snap.pools[0]
    assert full.used_slots == 0 and full.evictable_slots == 96
    assert full.capacity_slots == 63 * BLOCK  # the null block is not capacity
    assert full.bytes_per_slot == PAGE_BYTES_PER_TOKEN  # one layer in the group
    d.check()
    again = d.admit(list(range(100)))  # a prefix hit makes those blocks pinned again
    assert again is not None
    assert tracker.prefix_hit_tokens == 96 and tracker.prefix_query_tokens == 200
    d.check()


ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "decode", "decode", "decode", "free", "readmit"]),
        st.integers(0, 3),
        st.integers(1, 300),
        st.integers(0, 2**31),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, sliding=st.sampled_from([None, 64]))
def test_counts_equal_a_brute_force_count_after_every_step(
    ops: list[Any], sliding: int | None
) -> None:
    m, tracker = manager(48, sliding)  # small: eviction under pressure is routine
    d = Driver(m, tracker)
    prefixes = [[(p * 1000 + i) % 30000 for i in range(200)] for p in range(4)]
    for op, prefix, length, seed in ops:
        rng = random.Random(seed)
        if op == "admit":
            prompt = prefixes[prefix][: length // 2] + [
                rng.randrange(30000) for _ in range(length // 2 + 1)
            ]
            d.admit(prompt[: MAX_LEN - 64])
        elif op == "decode" and d.running:
            request = rng.choice(list(d.running.values()))
            if request.num_tokens >= MAX_LEN - 1:
                d.free(request)
            elif not d.decode(request, rng.randrange(30000)):
                d.preempt(request)  # out of room: the scheduler preempts it
        elif op == "readmit" and d.preempted:
            d.readmit(rng.choice(list(d.preempted.values())))
        elif op == "free" and d.running:
            d.free(rng.choice(list(d.running.values())))
        d.check()
    for request in list(d.running.values()):
        d.free(request)
        d.check()
    assert tracker.counts()[0] == 0


def test_reuse_distances_off_leaves_out_the_curve_and_nothing_else() -> None:
    """KVCACHE_SHIM_REUSE_DISTANCE=off: no reuse section, the same counts as with it on."""
    counts = {}
    for on in (True, False):
        m, tracker = manager(32, reuse_distances=on)
        d = Driver(m, tracker)
        for i in range(12):
            r = d.admit(list(range(64)) + [i * 1000 + j for j in range(40)])
            assert r is not None
            d.check()
            d.free(r)
            d.check()
        snap = tracker.snapshot(0, 0)
        assert (snap.reuse_distance is not None) is on
        assert isinstance(type(m.block_pool.blocks[1]).ref_cnt, property)  # still counted
        counts[on] = (
            tracker.counts(),
            snap.counters.prefix_query_tokens,
            snap.counters.prefix_hit_tokens,
        )
    assert counts[True] == counts[False]
    assert (
        reuse_distances_enabled({})
        and reuse_distances_enabled({"KVCACHE_SHIM_REUSE_DISTANCE": " OFF "}) is False
    )
    with pytest.raises(ValueError, match="KVCACHE_SHIM_REUSE_DISTANCE must be 'on' or 'off'"):
        reuse_distances_enabled({"KVCACHE_SHIM_REUSE_DISTANCE": "0"})


def test_a_preempted_request_readmitted_is_not_a_new_prefix_query() -> None:
    """vLLM puts re-admissions in its preempted_* fields; counting them inflates the hit ratio."""
    m, tracker = manager(16)  # 15 usable blocks
    d = Driver(m, tracker)
    a = d.admit(list(range(100)))  # 7 blocks
    b = d.admit(list(range(1000, 1100)))  # 7 blocks
    assert a is not None and b is not None
    d.check()
    token = 0
    while d.decode(b, 5000 + token):  # b grows until the pool is full
        token += 1
    d.preempt(b)  # as vLLM does: the newest running request goes
    d.check()
    assert b.num_preemptions == 1 and tracker.prefix_query_tokens == 200
    d.free(a)
    assert d.readmit(b)  # its own blocks are still cached: a hit, but not a new query
    d.check()
    assert tracker.prefix_query_tokens == 200 and tracker.prefix_hit_tokens == 0
    stats = m.prefix_cache_stats
    assert stats is not None and stats.preempted_requests == 1
    assert stats.preempted_queries == b.num_tokens and stats.preempted_hits > 0


def test_eviction_under_pressure_is_counted() -> None:
    m, tracker = manager(32)
    d = Driver(m, tracker)
    for i in range(20):  # each request leaves ~6 cached blocks; the pool holds 31
        r = d.admit([i * 1000 + j for j in range(100)])
        assert r is not None
        d.free(r)
        d.check()
    used, evictable, available = tracker.counts()
    assert used == 0 and evictable + available == 31 and evictable >= 25


def test_prefix_cache_reset_is_seen() -> None:
    m, tracker = manager(64)
    d = Driver(m, tracker)
    r = d.admit(list(range(200)))
    assert r is not None
    d.free(r)
    assert tracker.evictable_blocks == 12
    assert m.reset_prefix_cache()
    assert tracker.evictable_blocks == 0
    d.check()


def test_large_pool() -> None:
    m, tracker = manager(100_000)
    d = Driver(m, tracker)
    requests = [d.admit([(i * 7919 + j) % 30000 for j in range(900)]) for i in range(64)]
    for r in requests[::2]:
        assert r is not None
        d.free(r)
    d.check()
    assert tracker.evictable_blocks == 32 * (900 // BLOCK)


def test_hybrid_pool_bytes_count_the_shared_allocation_once() -> None:
    """vLLM's planner overlays the groups on one allocation: each tensor's size is all of it.

    Summing them (as the shim once did) doubled a hybrid model's pool bytes.
    """
    config = kv_config(48, sliding_window=64)
    sizes = [t.size for t in config.kv_cache_tensors]
    assert sizes == [48 * BLOCK * PAGE_BYTES_PER_TOKEN] * 2  # two placements, one allocation
    assert kv_allocation_bytes(config) == 48 * BLOCK * PAGE_BYTES_PER_TOKEN
    _, tracker = manager(48, sliding_window=64)
    full = tracker.snapshot(0, 0).pools[0]
    # One slot is one token of one group's layer: the same bytes as the full-attention case.
    assert full.bytes_per_slot == PAGE_BYTES_PER_TOKEN
    assert full.bytes_per_slot * 48 * BLOCK == kv_allocation_bytes(config)


def test_token_capacity_is_vllms_figure_not_slots() -> None:
    """Hybrid: vLLM's kv_cache_size_tokens = int(max_concurrency x max_model_len), not slots."""
    _, tracker = manager(48, sliding_window=64)
    snap = tracker.snapshot(0, 0)
    # Full group: cdiv(1024, 16) = 64 blocks; SWA group (vLLM's formula, max_model_len bound).
    per_request = sum(g.blocks_per_request for g in snap.groups)
    assert snap.max_concurrency == 48 / per_request
    assert snap.capacity_tokens == int(48 / per_request * MAX_LEN)
    assert snap.capacity_tokens < snap.pools[0].capacity_slots


def test_idle_engine_reads_fresh_and_a_step_in_flight_ages() -> None:
    """Staleness must mean a hung engine: idle -> time is now; mid-step -> the step's start."""
    _, tracker = manager(64)
    view = LiveView(tracker, lambda: (0, 0))
    idle = view.snapshot()
    assert abs(idle.time - time.time()) < 0.5
    with view.lock:
        view.steps_in_flight = 1
        view.state_time = time.time() - 120  # a step began two minutes ago and never returned
    stuck = view.snapshot()
    assert time.time() - stuck.time >= 120
    with view.lock:
        view.steps_in_flight = 0
    assert abs(view.snapshot().time - time.time()) < 0.5


def test_scheduler_class_is_a_vllm_async_scheduler() -> None:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from engine_shim.adapters.vllm import KVCacheShimScheduler

    assert issubclass(KVCacheShimScheduler, AsyncScheduler)
    for hook in ("update_from_output", "_preempt_request", "shutdown", "get_request_counts"):
        assert callable(getattr(AsyncScheduler, hook)), (
            f"vLLM renamed {hook}: the adapter must follow"
        )


def test_reuse_distances_predict_vllms_own_pool_at_every_size() -> None:
    """One request at a time: the 1x run's curve equals the hits vLLM's real block pool gets
    at each size (its free queue evicts the least recently freed block, tail first)."""
    rng = random.Random(5)
    shared = [[rng.randrange(30000) for _ in range(rng.choice((48, 96, 160)))] for _ in range(8)]
    prompts = [
        shared[min(int(rng.expovariate(0.5)), 7)]
        + [rng.randrange(30000) for _ in range(rng.randrange(1, 40))]
        for _ in range(300)
    ]

    def run(num_blocks: int) -> tuple[BlockPoolTracker, int]:
        m, tracker = manager(num_blocks)
        d = Driver(m, tracker)
        for prompt in prompts:
            request = d.admit(prompt, max_tokens=1)
            assert request is not None
            d.free(request)
        d.check()
        return tracker, tracker.prefix_hit_tokens

    base, _ = run(64 + 1)  # 64 usable blocks; one more for vLLM's null block
    hist = base.snapshot(0, 0).reuse_distance
    assert hist is not None and hist.query_tokens == sum(map(len, prompts))
    assert hist.sampling_rate == 1.0
    checked = 0
    for bound, cumulative in zip(hist.bounds_tokens, hist.cumulative_tokens, strict=True):
        if bound % BLOCK or not 256 <= bound <= 512 * BLOCK:
            continue  # whole blocks, and room for the longest prompt (200 tokens)
        _, hits = run(bound // BLOCK + 1)
        assert cumulative == hits, f"{bound} tokens"
        checked += 1
    assert checked >= 6

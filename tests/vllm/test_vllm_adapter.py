"""The vLLM adapter on vLLM's real block pool (runs in .venv-vllm; see scripts/test).

A real ``KVCacheManager`` is driven the way vLLM's scheduler drives it, with real
``Request`` objects: admission with prefix lookup, prefill, decode growth, frees, and
eviction under pressure. After every operation the adapter's O(1) counts must equal a
brute-force count over the pool's blocks.
"""

from __future__ import annotations

import ast
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm.sampling_params import SamplingParams
from vllm.v1.request import Request

from devtools.vllm_pool import (
    BLOCK,
    HASHER,
    HYBRID_BLOCK,
    HYBRID_HASHER,
    MAX_LEN,
    PAGE_BYTES_PER_TOKEN,
    Driver,
    kv_config,
    manager,
    new_manager,
    partial_caching_manager,
)
from engine_shim.adapters.vllm import (
    BlockPoolTracker,
    EngineFacts,
    LiveCapacity,
    LiveView,
    PublicPoolView,
    UnsupportedVllm,
    block_layout,
    iteration_log_enabled,
    kv_allocation_bytes,
    reuse_distances_enabled,
)
from engine_shim.adapters.vllm.blocks import FreeQueueCounter
from kvstats.snapshot import ProducerStatus
from kvstats.validate import parse_snapshot


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
        st.sampled_from(
            ["admit", "admit", "decode", "decode", "decode", "free", "readmit", "stats"]
        ),
        st.integers(0, 3),
        st.integers(1, 300),
        st.integers(0, 2**31),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, sliding=st.sampled_from([None, 64]), curve=st.booleans())
def test_counts_equal_a_brute_force_count_after_every_step(
    ops: list[Any], sliding: int | None, curve: bool
) -> None:
    """With the curve (the general hooks) and without (the counts fused into vLLM's hash
    writers): small, so eviction under pressure is routine; KV events on: vLLM's own agree."""
    m, tracker = manager(48, sliding, reuse_distances=curve, kv_events=True)
    assert tracker.counting == ("hooks" if curve else "fused")
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
        elif op == "stats":
            d.take_stats()
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
        # Still counted: by the general hooks with the curve, by the fused writers and queue
        # methods without it.
        assert "set_block_hash" in vars(type(m.block_pool.blocks[1]))
        queue = m.block_pool.free_block_queue
        assert "append_n" in (vars(queue) if on else vars(type(queue)))
        assert tracker.counting == ("hooks" if on else "fused")
        counts[on] = (
            tracker.counts(),
            snap.counters.prefix_query_tokens,
            snap.counters.prefix_hit_tokens,
        )
    assert counts[True] == counts[False]
    assert reuse_distances_enabled({}) is False  # asked for: it costs per step
    assert reuse_distances_enabled({"KVCACHE_SHIM_REUSE_DISTANCE": " ON "})
    assert reuse_distances_enabled({"KVCACHE_SHIM_REUSE_DISTANCE": " OFF "}) is False
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
    m, tracker = manager(32, kv_events=True)
    d = Driver(m, tracker)
    for i in range(20):  # each request leaves ~6 cached blocks; the pool holds 31
        r = d.admit([i * 1000 + j for j in range(100)])
        assert r is not None
        d.free(r)
        d.check()
    used, evictable, available = tracker.counts()
    assert used == 0 and evictable + available == 31 and evictable >= 25
    assert d.stream.report().cached_blocks["device"] == (tracker.cached_blocks,) * 2
    assert tracker.cached_blocks >= 25


def test_prefix_cache_reset_is_seen() -> None:
    m, tracker = manager(64, kv_events=True)
    d = Driver(m, tracker)
    r = d.admit(list(range(200)))
    assert r is not None
    d.free(r)
    assert tracker.evictable_blocks == 12
    assert m.reset_prefix_cache()
    assert tracker.evictable_blocks == 0
    d.check()


def test_after_a_prefix_cache_reset_the_counter_asks_vllms_new_lookup_map() -> None:
    """vLLM 0.31-0.33 replace the pool's lookup map on a reset: a block cached again under a
    key the old map still held is the first of its key, not a duplicate (keyed by its id)."""
    m, tracker = manager(64)
    d = Driver(m, tracker)
    prompt = list(range(200))
    r = d.admit(prompt)
    assert r is not None
    d.free(r)
    counter = tracker._counts
    assert isinstance(counter, FreeQueueCounter)  # the curve is on: the general hooks
    keys = [bytes(h) + (0).to_bytes(4, "big") for h in r.block_hashes[:12]]
    assert all(counter._first_block(k) is not None for k in keys)
    assert m.reset_prefix_cache()
    assert all(counter._first_block(k) is None for k in keys)
    again = d.admit(prompt)
    assert again is not None
    assert not counter.duplicates
    assert all(counter._first_block(k) is not None for k in keys)
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


@pytest.mark.parametrize("whole_prompts_repeat", [False, True])
def test_reuse_distances_predict_vllms_own_pool_at_every_size(whole_prompts_repeat: bool) -> None:
    """One request at a time: the 1x run's curve equals the hits vLLM's real block pool gets
    at each size (its free queue evicts the least recently freed block, tail first). With
    whole prompts repeating, a whole number of blocks long, vLLM never looks up the block
    that holds the prompt's last token (it must compute that token): nor does the curve.

    Computed again, that block is a duplicate of the cached one (vLLM does not deduplicate)
    while the cached one is still resident: a block of its own in the recency order. That
    keeps the curve exact up to the pool it was measured on (there, or in a smaller pool, the
    duplicates the model counts are the ones that exist); a larger pool keeps older copies
    alive too, which the measuring pool had already evicted, so above 1x the curve may read
    a little high (here at most 1 %)."""
    rng = random.Random(5)
    shared = [[rng.randrange(30000) for _ in range(rng.choice((48, 96, 160)))] for _ in range(8)]
    prompts = [
        shared[min(int(rng.expovariate(0.5)), 7)]
        + [rng.randrange(30000) for _ in range(0 if whole_prompts_repeat else rng.randrange(1, 40))]
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

    pool_blocks = 64
    base, _ = run(pool_blocks + 1)  # one more for vLLM's null block
    hist = base.snapshot(0, 0).reuse_distance
    assert hist is not None and hist.query_tokens == sum(map(len, prompts))
    assert hist.sampling_rate == 1.0
    checked = 0
    for bound, cumulative in zip(hist.bounds_tokens, hist.cumulative_tokens, strict=True):
        if bound % BLOCK or not 256 <= bound <= 512 * BLOCK:
            continue  # whole blocks, and room for the longest prompt (200 tokens)
        _, hits = run(bound // BLOCK + 1)
        if whole_prompts_repeat and bound > pool_blocks * BLOCK:
            assert hits <= cumulative <= 1.01 * hits, f"{bound} tokens"
        else:
            assert cumulative == hits, f"{bound} tokens"
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize(("rate", "per_step"), [(1 / 4, 0), (1 / 8, 0), (1 / 4, 4), (1 / 8, 6)])
def test_a_sampled_curve_tracks_hot_prefixes_in_full(rate: float, per_step: int) -> None:
    """Sampled at 1/4 or 1/8, the adapter's curve stays within 0.02 of its full tracking at
    every size where a few system prompts carry most lookups: the blocks looked up twice are
    tracked in full, found in vLLM's lookup map and followed through its free queue. Without
    them (spatial sampling alone) the same events read far off; the pool's counts stay exact.
    With a scheduler admitting ``per_step`` requests a step, only one of them looks for hot
    blocks: the curve holds as well."""
    rng = random.Random(7)
    systems = [[rng.randrange(30000) for _ in range(BLOCK * rng.randrange(6, 20))] for _ in "abc"]
    prompts = [
        rng.choices(systems, (60, 30, 10))[0]
        + [rng.randrange(30000) for _ in range(rng.randrange(1, 5 * BLOCK))]
        for _ in range(500)
    ]

    def curve(sample: float, hot: bool) -> tuple[list[int], int]:
        m, tracker = manager(81)
        assert tracker.reuse is not None
        tracker.reuse.sample_at_most(sample)
        if not hot:
            tracker.reuse.hot_capacity = 0
        d = Driver(m, tracker)
        running = []
        for i, prompt in enumerate(prompts):
            request = d.admit(prompt, max_tokens=1)
            assert request is not None
            if per_step and i % per_step == per_step - 1:
                tracker.note_step()  # what the scheduler does at the end of schedule()
            running.append(request)
            if len(running) > 2 or i % 3:
                d.free(running.pop(0))
            if i % 50 == 0:
                d.check()
        for request in running:
            d.free(request)
        d.check()
        hist = tracker.snapshot(0, 0).reuse_distance
        assert hist is not None and hist.sampling_rate == sample
        assert (tracker.reuse.hot > 0) == (hot and sample < 1)
        if hot and sample < 1 and per_step:  # admissions that looked for hot blocks: all of
            # the first step (no step seen yet), then one a step
            steps = -(-(len(prompts) - per_step) // per_step)
            assert tracker.reuse._lookups == per_step + steps
        return list(hist.cumulative_tokens), hist.query_tokens

    full, queries = curve(1.0, hot=True)
    stratified, _ = curve(rate, hot=True)
    spatial, _ = curve(rate, hot=False)
    worst = max(abs(a - b) for a, b in zip(full, stratified, strict=True)) / queries
    worst_spatial = max(abs(a - b) for a, b in zip(full, spatial, strict=True)) / queries
    print(f"1/{1 / rate:g}: stratified worst {worst:.4f}, spatial alone {worst_spatial:.4f}")
    assert worst < 0.02
    assert worst_spatial > 3 * worst


def test_a_block_made_hot_while_vllm_holds_it_counts_as_held() -> None:
    """The second lookup of a prompt makes its blocks hot after vLLM pinned them: the adapter
    finds them in vLLM's lookup map and says they are held, so a third request would hit them
    at any size; released, they are idle blocks of their own in the recency order."""
    m, tracker = manager(81)
    reuse = tracker.reuse
    assert reuse is not None
    reuse.sample_at_most(1 / 1024)
    d = Driver(m, tracker)
    prompt = list(range(10 * BLOCK + 3))
    first = d.admit(prompt, max_tokens=1)
    assert first is not None
    d.free(first)
    second = d.admit(prompt, max_tokens=1)
    assert second is not None
    keys = [bytes(h) + (0).to_bytes(4, "big") for h in second.block_hashes[:10]]
    assert reuse.hot == 10
    assert reuse.distances(keys, 0) == [float(BLOCK)] * 10
    d.free(second)
    after = reuse.distances(keys, 0)
    assert all(BLOCK <= x < float("inf") for x in after) and after == sorted(after)
    d.check()


# ----------------------------------------------------------------- releases and degradation


def test_partial_cached_blocks_count_only_the_tokens_they_hold() -> None:
    """vLLM caches a prompt's tail as a partial entry ending inside a block (hybrid Mamba
    models in align mode): its slots are evictable, but only its cached tokens are reusable."""
    m, tracker = partial_caching_manager(64, kv_events=True)
    d = Driver(m, tracker, hasher=HYBRID_HASHER)
    request = d.admit(list(range(100)), max_tokens=4)  # 100 tokens: a hash unit every 16
    assert request is not None
    d.free(request)
    d.check()
    # Block 1 holds tokens 0-63 (full), block 2 the tail up to the last whole hash unit
    # below the prompt's last token: 96 - 64 = 32 tokens in 64 slots.
    assert tracker.evictable_blocks == 2
    assert tracker.evictable_tokens == HYBRID_BLOCK + 32
    pool = tracker.snapshot(0, 0).pools[0]
    assert pool.evictable_slots == 2 * HYBRID_BLOCK and pool.evictable_prefix_tokens == 96
    again = d.admit([*range(64), *range(500, 540)], max_tokens=4)
    assert again is not None
    d.check()  # equal to the brute-force count whether or not vLLM reused those blocks


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops)
def test_partial_caching_counts_equal_a_brute_force_count(ops: list[Any]) -> None:
    m, tracker = partial_caching_manager(24, kv_events=True)
    d = Driver(m, tracker, hasher=HYBRID_HASHER)
    prefixes = [[(p * 1000 + i) % 30000 for i in range(300)] for p in range(4)]
    for op, prefix, length, seed in ops:
        rng = random.Random(seed)
        if op in ("admit", "readmit"):
            d.admit(prefixes[prefix][: length // 2 + rng.randrange(1, 40)][: MAX_LEN - 64])
        elif op == "decode" and d.running:
            request = rng.choice(list(d.running.values()))
            if request.num_tokens >= MAX_LEN - 1 or not d.decode(request, rng.randrange(30000)):
                d.free(request)
        elif op == "free" and d.running:
            d.free(rng.choice(list(d.running.values())))
        elif op == "stats":
            d.take_stats()
        d.check()


def test_peaks_hold_a_burst_between_two_reads() -> None:
    """A 15 s scrape misses what happens between polls; the high-water mark does not."""
    m, tracker = manager(64)
    d = Driver(m, tracker)
    tracker.snapshot(0, 0)
    burst = [d.admit([i * 1000 + j for j in range(160)]) for i in range(4)]  # 10 blocks each
    tracker.note_step()  # the scheduler calls it at the end of each schedule()
    for request in burst:  # update_from_output: finished requests free their blocks
        assert request is not None
        d.free(request)
    pool = tracker.snapshot(0, 0).pools[0]
    assert pool.used_slots == 0 and pool.peak_used_slots == 40 * BLOCK
    assert pool.peak_physical_slots == 40 * BLOCK  # still cached: physical stays at its peak
    assert pool.evictable_slots == 40 * BLOCK
    after = tracker.snapshot(0, 0).pools[0]  # a read starts a new period
    assert after.peak_used_slots == 0 and after.peak_physical_slots == 40 * BLOCK


def test_capacity_is_vllms_own_and_unknown_while_the_cache_warms_up() -> None:
    """0.34's extensible KV cache sets kv_cache_size_tokens after warm-up: until then the
    snapshot says warming_up with no capacity, never 0 or the reserved size."""
    _, tracker = manager(64)
    cache = SimpleNamespace(
        enable_extensible_kv_cache=True, kv_cache_size_tokens=None, kv_cache_max_concurrency=None
    )
    tracker.capacity = LiveCapacity(cache, MAX_LEN)
    warming = parse_snapshot(tracker.snapshot(0, 0).to_json())
    assert warming.status == ProducerStatus("warming_up", warming.status.reason)  # type: ignore[union-attr]
    assert warming.capacity_tokens is None and warming.max_concurrency is None
    assert warming.pools[0].capacity_slots == 63 * BLOCK  # the pool itself is known
    cache.kv_cache_max_concurrency, cache.kv_cache_size_tokens = 0.75, 768
    ready = parse_snapshot(tracker.snapshot(0, 0).to_json())
    assert ready.status == ProducerStatus()
    assert (ready.capacity_tokens, ready.max_concurrency) == (768, 0.75)
    # Not extensible and not set (an engine core that computed nothing): the formula stays.
    tracker.capacity = LiveCapacity(SimpleNamespace(), MAX_LEN)
    assert tracker.snapshot(0, 0).capacity_tokens == tracker.capacity_tokens


def test_block_layout_of_this_release() -> None:
    from vllm import __version__
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    layout = block_layout(KVCacheBlock)
    renamed = tuple(int(p) for p in __version__.split(".")[:2]) >= (0, 34)
    assert layout.hash_field == ("block_hash" if renamed else "_block_hash")
    assert layout.tokens_field == f"{layout.hash_field}_num_tokens"


def test_an_unknown_block_layout_names_what_is_missing() -> None:
    @dataclass(slots=True)
    class FutureBlock:  # a release that renamed the hash field again
        block_id: int
        ref_cnt: int = 0
        cache_key: bytes | None = None
        is_null: bool = False

    with pytest.raises(UnsupportedVllm, match=r"no slot _block_hash or block_hash.*cache_key"):
        block_layout(FutureBlock)


def test_a_vllm_without_a_hooked_method_still_serves_and_says_unsupported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hooked attribute removed from a real vLLM class: the scheduler class still builds
    (vLLM starts), the shim logs one ERROR with the version and what is missing, and serves
    a snapshot that says unsupported with only what vLLM's public pool API keeps exact."""
    from vllm import __version__
    from vllm.v1.core.sched.scheduler import Scheduler

    from engine_shim.adapters.vllm.scheduler import _scheduler_class, attach_tracker

    monkeypatch.delattr(Scheduler, "_preempt_request")
    cls = _scheduler_class()  # must not raise: raising here stops vLLM
    assert getattr(cls, "kvcache_missing_hooks", None) == ("_preempt_request",)
    assert "_preempt_request" not in cls.__dict__
    m, config = new_manager(64)
    scheduler = SimpleNamespace(
        kv_cache_manager=m,
        kv_cache_config=config,
        vllm_config=SimpleNamespace(
            model_config=SimpleNamespace(
                served_model_name=["tiny"], model="tiny", max_model_len=MAX_LEN
            ),
            cache_config=SimpleNamespace(
                block_size=BLOCK, kv_cache_size_tokens=1008, kv_cache_max_concurrency=0.984
            ),
            parallel_config=SimpleNamespace(data_parallel_rank=0),
            device_config=SimpleNamespace(device_type="cpu"),
        ),
    )
    with caplog.at_level(logging.ERROR, logger="vllm"):
        view = attach_tracker(scheduler, list(getattr(cls, "kvcache_missing_hooks", ())), True)
    assert isinstance(view, PublicPoolView)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"vLLM {__version__}" in errors[0]
    assert "_preempt_request" in errors[0] and "keeps serving" in errors[0]
    # vLLM's pool is untouched (no tracked blocks) and keeps working.
    assert type(m.block_pool.blocks[1]).__name__ == "KVCacheBlock"
    request = Request(
        "a", list(range(100)), SamplingParams(max_tokens=4), None, block_hasher=HASHER
    )
    blocks, hits, _ = m.get_computed_blocks(request)
    assert m.allocate_slots(request, request.num_tokens - hits, hits, blocks) is not None
    view.note_step()
    snap = parse_snapshot(view.snapshot(1, 0).to_json())
    assert snap.status is not None and snap.status.state == "unsupported"
    assert "_preempt_request" in (snap.status.reason or "")
    full = snap.pools[0]
    pinned = sum(1 for b in m.block_pool.blocks if b.ref_cnt > 0 and not b.is_null)
    assert full.used_slots == pinned * BLOCK == 7 * BLOCK
    assert full.evictable_slots is None and full.available_slots is None
    assert full.peak_used_slots == 7 * BLOCK and full.peak_physical_slots is None
    assert (snap.capacity_tokens, snap.max_concurrency) == (1008, 0.984)  # vLLM's own


def test_a_missing_manager_method_leaves_vllm_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    m, config = new_manager(32)
    monkeypatch.delattr(KVCacheManager, "record_prefix_cache_stats")
    with pytest.raises(UnsupportedVllm, match=r"KVCacheManager\.record_prefix_cache_stats"):
        BlockPoolTracker(m, config, EngineFacts(model="tiny", max_model_len=MAX_LEN))
    assert type(m.block_pool.blocks[1]).__name__ == "KVCacheBlock"
    assert "get_computed_blocks" not in vars(m)  # not wrapped either


def test_the_iteration_line_is_the_counts_without_a_scan() -> None:
    m, tracker = manager(64)
    d = Driver(m, tracker)
    request = d.admit(list(range(100)))
    assert request is not None
    tracker.iterations = 3
    line = tracker.step_line(1, 2)
    used, evictable, available = tracker.counts()
    assert line == (
        f"kv step 3: used {used} blocks ({used * BLOCK} slots), evictable {evictable}"
        f" ({tracker.evictable_tokens} tokens), free {available} ({available * BLOCK} slots),"
        " running 1, waiting 2"
    )
    assert iteration_log_enabled({"KVCACHE_SHIM_LOG_ITERATIONS": "1"})
    assert not iteration_log_enabled({})
    with pytest.raises(ValueError, match="KVCACHE_SHIM_LOG_ITERATIONS must be"):
        iteration_log_enabled({"KVCACHE_SHIM_LOG_ITERATIONS": "yes please"})


def test_a_free_queue_with_a_new_mutator_is_refused_not_miscounted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The counts are kept where blocks enter and leave vLLM's free queue: a release whose
    queue gains a way to move blocks that the shim does not wrap must degrade, not drift."""
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    m, config = new_manager(32)
    monkeypatch.setattr(FreeKVCacheBlockQueue, "remove_n", lambda self, blocks: None, raising=False)
    with pytest.raises(UnsupportedVllm, match=r"unknown \['remove_n'\]"):
        BlockPoolTracker(m, config, EngineFacts(model="tiny", max_model_len=MAX_LEN))
    assert type(m.block_pool.blocks[1]).__name__ == "KVCacheBlock"
    assert not vars(m.block_pool.free_block_queue).keys() & {"append_n", "popleft_n", "remove"}


def test_the_allocators_hot_path_is_vllms_own() -> None:
    """ref_cnt changes on every allocation, touch and free, and vLLM reads the hash and null
    flag in its hot loops: every slot stays vLLM's own C-level slot."""
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    m, tracker = manager(32)
    tracked = type(m.block_pool.blocks[1])
    assert tracked is not KVCacheBlock
    for name in ("ref_cnt", "is_null", tracker.layout.hash_field, "prev_free_block"):
        assert getattr(tracked, name) is getattr(KVCacheBlock, name), name


HASH_FIELDS = {"_block_hash", "block_hash", "_block_hash_num_tokens", "block_hash_num_tokens"}


def written(target: ast.expr) -> list[ast.Attribute]:
    """Hash fields an assignment target writes (``a.x = ``, ``a.x, b.y = ``), not ones it
    only reads (``d[a.x] = ``)."""
    if isinstance(target, ast.Attribute):
        return [target] if target.attr in HASH_FIELDS else []
    if isinstance(target, ast.Tuple | ast.List):
        return [a for element in target.elts for a in written(element)]
    if isinstance(target, ast.Starred):
        return written(target.value)
    return []


def scan_writes(node: ast.AST, where: str, path: str, out: list[tuple[str, str, int]]) -> None:
    """Append (file, function, line) of each hash-field write under ``node``."""
    for child in ast.iter_child_nodes(node):
        inner = where
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            inner = child.name
        targets: list[ast.expr] = []
        if isinstance(child, ast.Assign):
            targets = child.targets
        elif isinstance(child, ast.AugAssign | ast.AnnAssign):
            targets = [child.target]
        out += [(path, inner, a.lineno) for t in targets for a in written(t)]
        scan_writes(child, inner, path, out)


def hash_writes(root: Path) -> list[tuple[str, str, int]]:
    """(file, function, line) of every assignment to a block's hash field under ``root``."""
    writes: list[tuple[str, str, int]] = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_bytes()
        if b"block_hash" in source:  # only these files can name the fields
            scan_writes(
                ast.parse(source, str(path)), "<module>", str(path.relative_to(root)), writes
            )
    return writes


def test_the_hash_write_scan_finds_writes_and_ignores_reads(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(
        "class B:\n"
        "    def set_block_hash(self, h):\n"
        "        self._block_hash = h\n"
        "def elsewhere(b, d):\n"
        "    d[b.block_hash] = 1\n"  # a read
        "    b.block_hash_num_tokens += 1\n"
        "    x, b.block_hash = 1, None\n"
    )
    assert hash_writes(tmp_path) == [
        ("a.py", "set_block_hash", 3),
        ("a.py", "elsewhere", 6),
        ("a.py", "elsewhere", 7),
    ]


def test_only_the_two_hash_writers_write_a_blocks_hash() -> None:
    """The counts follow set_block_hash / reset_hash: this release's whole source is read for
    any other write to a block's hash or its prefix length (a new one must fail here, in CI,
    before a user's counts drift)."""
    import vllm

    from engine_shim.adapters.vllm.blocks import HASH_WRITERS

    writes = hash_writes(Path(vllm.__file__).parent)
    allowed = {("v1/core/kv_cache_utils.py", name) for name in HASH_WRITERS}
    strays = sorted(w for w in writes if (w[0], w[1]) not in allowed)
    assert writes and not strays, f"other writes to a block's hash: {strays[:10]}"


@pytest.mark.parametrize("curve", [True, False])
def test_blocks_of_another_pool_freed_through_this_one_are_not_counted_here(curve: bool) -> None:
    """Deferred frees may carry blocks of several pools (0.34: each block holds a weak
    reference to its own): vLLM hands them to their own pool, and this pool's counts stay
    its own, each pool counted once (by the general hooks, and fused)."""
    from vllm.v1.core.block_pool import BlockPool

    m, tracker = manager(32, reuse_distances=curve)
    d = Driver(m, tracker)
    request = d.admit(list(range(64)))
    assert request is not None
    d.free(request)
    before = tracker.counts(), tracker.evictable_tokens
    other = BlockPool(16, True, BLOCK)
    foreign = other.get_new_blocks(3)
    m.block_pool.free_blocks(foreign)  # vLLM forwards them to `other`
    assert other.get_num_free_blocks() == 15  # back in their own pool (16 minus its null block)
    assert (tracker.counts(), tracker.evictable_tokens) == before
    d.check()


def test_a_failure_of_the_shims_own_step_work_is_said_in_every_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """vLLM's step goes on; the numbers the failed work keeps (iterations, peaks) may be behind,
    so the snapshot stops saying ok, and the log says it once."""
    from engine_shim.adapters.vllm.scheduler import _bookkeeping_failed

    _, tracker = manager(32)
    scheduler = SimpleNamespace(kvcache_tracker=tracker)
    with caplog.at_level(logging.ERROR, logger="vllm"):
        _bookkeeping_failed(scheduler, RuntimeError("boom"))
        _bookkeeping_failed(scheduler, RuntimeError("again"))
    assert [r.getMessage() for r in caplog.records].count(
        "kvcache shim: per-step bookkeeping failed (RuntimeError('boom')); vLLM keeps serving"
    ) == 1 and len(caplog.records) == 1
    for _ in range(2):
        status = parse_snapshot(tracker.snapshot(0, 0).to_json()).status
        assert status is not None and status.state == "unsupported"
        assert "RuntimeError('boom')" in (status.reason or "")


def test_the_shim_says_where_vllms_kv_events_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the shim serves at /kv_event_sources, from vLLM's own publisher of this release."""
    from types import SimpleNamespace

    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")  # the node IP tcp://*:0 binds

    from vllm.config import KVEventsConfig
    from vllm.distributed.kv_events import EventPublisherFactory

    from engine_shim.adapters.vllm.scheduler import kv_event_sources
    from engine_shim.events.discovery import discover_sources

    config = KVEventsConfig(
        enable_kv_cache_events=True,
        publisher="zmq",
        endpoint="tcp://*:0",
        replay_endpoint="tcp://*:0",
        topic="kv",
    )
    publisher = EventPublisherFactory.create(config, data_parallel_rank=0)
    try:
        said = kv_event_sources(SimpleNamespace(kv_event_publisher=publisher), 0)
        (source,) = discover_sources("shim", json.dumps(said).encode(), "10.1.2.3")
        assert source.topic == "kv" and source.dp_rank == 0
        assert source.endpoint.startswith("tcp://") and not source.endpoint.endswith(":0")
        assert source.replay_endpoint is not None and source.replay_endpoint != source.endpoint
    finally:
        publisher.shutdown()
    off = EventPublisherFactory.create(KVEventsConfig(), data_parallel_rank=0)
    assert kv_event_sources(SimpleNamespace(kv_event_publisher=off), 0) == {}
    assert kv_event_sources(SimpleNamespace(), 0) == {}  # a scheduler without one says nothing

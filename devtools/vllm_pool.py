"""vLLM's real KVCacheManager driven the way its scheduler drives it, without a model.

Shared by tests/vllm (the adapter's exactness) and bench/vllm_adapter.py (its cost). Runs in the
vLLM environment (.venv-vllm).
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import torch
from vllm.config import DeviceConfig, VllmConfig
from vllm.distributed.kv_events import KVEventBatch
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from vllm.v1.request import Request, RequestStatus

try:  # vLLM 0.33+ moved the planner out of kv_cache_utils
    from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups
except ImportError:
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups

from devtools.vllm_oracle import brute_force_evictable, brute_force_evictable_tokens
from engine_shim.adapters.vllm import BlockPoolTracker, EngineFacts
from engine_shim.events.merge import evictable_bounds
from engine_shim.events.stream import EventStreamState
from kvstats.snapshot import Pool
from kvstats.validate import parse_snapshot

BLOCK = 16
MAX_LEN = 1024
init_none_hash(sha256)
HASHER = get_request_block_hasher(BLOCK, sha256)
# What the engine core resolves before planning the KV cache: device and layout.
PLANNER_CONFIG = VllmConfig(device_config=DeviceConfig(device="cpu"))
PLANNER_CONFIG.cache_config.kv_cache_layout = "LBHNC"
PAGE_BYTES_PER_TOKEN = 2 * 2 * 64 * 2  # K and V, 2 heads x 64 x fp16, one layer


def kv_config(num_blocks: int, sliding_window: int | None = None) -> KVCacheConfig:
    """The KV cache config vLLM's own planner makes for these groups and this many blocks.

    As in a real engine, every ``KVCacheTensor`` describes a placement in one shared
    allocation (groups overlay it), so each tensor's ``size`` is the whole allocation.
    """
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float16)
    groups = [KVCacheGroupSpec(["layers.0"], full)]
    if sliding_window is not None:
        swa = SlidingWindowSpec(
            block_size=BLOCK,
            num_kv_heads=2,
            head_size=64,
            dtype=torch.float16,
            sliding_window=sliding_window,
        )
        groups.append(KVCacheGroupSpec(["layers.1"], swa))
    config = get_kv_cache_config_from_groups(
        PLANNER_CONFIG, groups, num_blocks * full.page_size_bytes
    )
    assert config.num_blocks == num_blocks
    return config


def new_manager(
    num_blocks: int, sliding_window: int | None = None, kv_events: bool = False
) -> tuple[KVCacheManager, KVCacheConfig]:
    """A real KVCacheManager over a hand-made config, as vLLM's scheduler builds it (with
    ``kv_events``, as ``--kv-events-config`` sets it up: the Driver checks the events)."""
    config = kv_config(num_blocks, sliding_window)
    m = KVCacheManager(
        config,
        max_model_len=MAX_LEN,
        scheduler_block_size=BLOCK,
        hash_block_size=BLOCK,
        enable_caching=True,
        log_stats=True,
        enable_kv_cache_events=kv_events,
    )
    return m, config


def manager(
    num_blocks: int,
    sliding_window: int | None = None,
    reuse_distances: bool = True,
    kv_events: bool = False,
) -> tuple[KVCacheManager, BlockPoolTracker]:
    m, config = new_manager(num_blocks, sliding_window, kv_events)
    facts = EngineFacts(model="tiny", max_model_len=MAX_LEN)
    return m, BlockPoolTracker(m, config, facts, reuse_distances=reuse_distances)


# A hybrid attention + Mamba model in "align" mode hashes prompts in finer units than its
# cache blocks: vLLM then caches a prompt's tail as a *partial* entry that ends inside a block.
HYBRID_BLOCK = 64
HYBRID_HASH_BLOCK = 16
HYBRID_HASHER = get_request_block_hasher(HYBRID_HASH_BLOCK, sha256)


def partial_caching_manager(
    num_blocks: int, reuse_distances: bool = True, kv_events: bool = False
) -> tuple[KVCacheManager, BlockPoolTracker]:
    """A real manager of full-attention + Mamba (align) groups: partial-block caching on."""
    full = FullAttentionSpec(
        block_size=HYBRID_BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float16
    )
    mamba = MambaSpec(
        block_size=HYBRID_BLOCK,
        shapes=((full.page_size_bytes // 2,),),
        dtypes=(torch.float16,),
        mamba_cache_mode="align",
        page_size_padded=full.page_size_bytes,
    )
    groups = [KVCacheGroupSpec(["layers.0"], full), KVCacheGroupSpec(["layers.1"], mamba)]
    config = get_kv_cache_config_from_groups(
        PLANNER_CONFIG, groups, num_blocks * full.page_size_bytes
    )
    m = KVCacheManager(
        config,
        max_model_len=MAX_LEN,
        scheduler_block_size=HYBRID_BLOCK,
        hash_block_size=HYBRID_HASH_BLOCK,
        enable_caching=True,
        log_stats=True,
        enable_kv_cache_events=kv_events,
    )
    facts = EngineFacts(model="tiny-hybrid", max_model_len=MAX_LEN)
    return m, BlockPoolTracker(m, config, facts, reuse_distances=reuse_distances)


class Driver:
    """Does what vLLM's scheduler does with a KVCacheManager, minus the model."""

    def __init__(self, m: KVCacheManager, tracker: BlockPoolTracker, hasher: Any = HASHER) -> None:
        self.m, self.tracker, self.hasher = m, tracker, hasher
        self.running: dict[str, Request] = {}
        self.preempted: dict[str, Request] = {}
        self.ids = 0
        # What a user would count by hand: prompt tokens and hits of *first* admissions only
        # (a re-admitted preempted request is vLLM's "preempted" bucket, not a new query).
        self.first_queries = 0
        self.first_hits = 0
        self.taken = (0, 0)  # vLLM's prefix-cache stats handed out by take_stats
        # With KV events on: vLLM's own events, encoded as its publisher does, read by the
        # exporter's stream bookkeeping, one batch per check.
        self.stream = EventStreamState()
        self.batches = 0

    def check_events(self) -> None:
        """The blocks vLLM's events say are cached are the ones its pool holds with a hash, and
        the shim's count of them."""
        batch = KVEventBatch(ts=0.0, events=self.m.take_events())
        self.stream.take(self.batches, msgspec.msgpack.encode(batch), 0.0)
        self.batches += 1
        report = self.stream.report()
        assert report.whole, report.why_not_whole
        assert sum(report.errors.values()) == 0, report.errors
        pool = self.m.block_pool
        hashed = sum(1 for b in pool.blocks if b.block_hash is not None and not b.is_null)
        assert self.tracker.cached_blocks == hashed
        fewest, most = report.cached_blocks.get("device", (0, 0))
        if self.hasher is HASHER:  # one entry per block: exact
            assert fewest == most == hashed, (fewest, most, hashed)
        else:  # partial entries (hybrid, align mode) may share a block with a full one
            assert fewest <= hashed <= most, (fewest, most, hashed)
        # The bounds a bridge publishes from this stream and vLLM's usage gauge hold the truth.
        usable, block = pool.num_gpu_blocks - 1, self.tracker.block_size
        used = round(self.m.usage * usable)
        bridge = Pool("full", block, usable * block, used * block, None, None)
        bounds = evictable_bounds(fewest, bridge, most)
        assert bounds is not None
        evictable = brute_force_evictable(pool) * block
        assert bounds[0] <= evictable <= bounds[1], (bounds, evictable)

    def check(self) -> None:
        pool = self.m.block_pool
        used, evictable, available = self.tracker.counts()
        assert evictable == brute_force_evictable(pool)
        assert self.tracker.evictable_tokens == brute_force_evictable_tokens(
            pool, self.tracker.cached_tokens
        )
        block = self.tracker.block_size
        assert self.tracker.evictable_tokens <= evictable * block
        usable = pool.num_gpu_blocks - 1
        pinned = sum(1 for b in pool.blocks if b.ref_cnt > 0 and not b.is_null)
        assert used == pinned
        assert used + evictable + available == usable
        # vLLM's own figure only sees the pinned blocks.
        assert self.m.usage == pytest.approx(used / usable)
        snap = parse_snapshot(self.tracker.snapshot(len(self.running), 0).to_json())
        assert snap.prefix_resident_slots == {"device": self.tracker.cached_blocks * block}
        if self.m.enable_kv_cache_events:
            self.check_events()
        assert snap.pools[0].evictable_slots == evictable * block
        assert snap.pools[0].evictable_prefix_tokens == self.tracker.evictable_tokens
        peak = snap.pools[0].peak_used_slots
        assert peak is not None and used * block <= peak <= snap.pools[0].capacity_slots
        assert self.tracker.prefix_totals() == (self.first_queries, self.first_hits)
        assert snap.counters.prefix_query_tokens == self.first_queries
        assert snap.counters.prefix_hit_tokens == {"device": self.first_hits}
        # vLLM's own statistics agree: re-admissions land in its preempted_* fields.
        stats = self.m.prefix_cache_stats
        assert stats is not None
        assert (self.taken[0] + stats.queries, self.taken[1] + stats.hits) == (
            self.first_queries,
            self.first_hits,
        )

    def take_stats(self) -> None:
        """What the scheduler's ``make_stats`` does once per step: take vLLM's prefix-cache
        stats for the stats loggers (vLLM starts a new object)."""
        stats = self.m.make_prefix_cache_stats()
        assert stats is not None
        self.taken = (self.taken[0] + stats.queries, self.taken[1] + stats.hits)

    def admit(self, prompt: list[int], max_tokens: int = 64) -> Request | None:
        self.ids += 1
        request = Request(
            f"r{self.ids}",
            prompt,
            SamplingParams(max_tokens=max_tokens),
            None,
            block_hasher=self.hasher,
        )
        return request if self._schedule(request) else None

    def _schedule(self, request: Request) -> bool:
        """Lookup, allocation and stats as the scheduler's waiting-queue pass does them."""
        blocks, hits, _ = self.m.get_computed_blocks(request)
        new_tokens = request.num_tokens - hits
        if self.m.allocate_slots(request, new_tokens, hits, blocks) is None:
            return False  # no room: the scheduler would leave it waiting
        self.m.record_prefix_cache_stats(request, hits)
        if request.num_preemptions == 0:
            self.first_queries += request.num_tokens
            self.first_hits += hits
        request.num_computed_tokens = request.num_tokens
        request.status = RequestStatus.RUNNING
        self.running[request.request_id] = request
        self.preempted.pop(request.request_id, None)
        return True

    def preempt(self, request: Request) -> None:
        """What ``Scheduler._preempt_request`` does to the request and its blocks."""
        self.m.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        del self.running[request.request_id]
        self.preempted[request.request_id] = request

    def readmit(self, request: Request) -> bool:
        """A preempted request back from the waiting queue: looked up again (all its tokens)."""
        return self._schedule(request)

    def decode(self, request: Request, token: int) -> bool:
        request.append_output_token_ids(token)
        if self.m.allocate_slots(request, 1) is None:
            return False
        request.num_computed_tokens = request.num_tokens
        return True

    def free(self, request: Request) -> None:
        self.m.free(request)
        del self.running[request.request_id]

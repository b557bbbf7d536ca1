"""The snapshot of a live vLLM block pool: exact where the shim recognises vLLM's internals
(``BlockPoolTracker``), and only what vLLM's public pool API still tells where it does not
(``PublicPoolView``). Both are read under the scheduler's lock (see ``scheduler.LiveView``).
"""

from __future__ import annotations

import operator
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice, repeat
from typing import Any

from kvstats.capacity import GroupFootprint, cdiv, kv_cache_size_tokens, max_concurrency
from kvstats.snapshot import (
    Counters,
    EngineIdentity,
    KVGroup,
    Pool,
    ProducerStatus,
    Requests,
    Snapshot,
)

from ...reuse_distance import Observation, ReuseDistanceTracker
from .blocks import (
    FreeQueueCounter,
    UnsupportedVllm,
    block_layout,
    cached_tokens_function,
    tracked_block_class,
)
from .fused import FusedCounts, install_fused, why_not_fused

# Public block-pool API, the same in every release since the V1 engine: what a degraded view
# reads, and what the tracker needs besides the blocks' own fields.
POOL_API = ("blocks", "get_num_free_blocks", "num_gpu_blocks")
MANAGER_HOOKS = ("record_prefix_cache_stats", "get_computed_blocks")


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What the snapshot needs besides the pool: fixed for the engine's lifetime."""

    model: str
    max_model_len: int
    dp_rank: int = 0
    block_size: int | None = None  # default: the smallest group block size
    groups: tuple[KVGroup, ...] = ()  # default: derived from the KV cache config
    max_concurrency: float | None = None  # default: vLLM's formula over the groups
    capacity_tokens: int | None = None  # default: int(max_concurrency x max_model_len)
    bytes_per_slot: int | None = None  # default: KV allocation bytes / token slots
    device: str | None = None
    gpu_uuid: str | None = None
    version: str = "unknown"


def kv_allocation_bytes(kv_cache_config: Any) -> int:
    """Bytes of one worker's device KV allocation.

    Since vLLM 0.32 every ``KVCacheTensor`` (one per group and spec) describes a placement in
    *one* backing allocation of ``size`` bytes that the groups overlay (``offset``,
    ``layer_stride``): summing their sizes counts the allocation once per group. Older layouts
    (no strides) gave each tensor its own allocation, which do add up.
    """
    device = [t for t in kv_cache_config.kv_cache_tensors if not getattr(t, "host_resident", False)]
    if not device:
        return 0
    if all(hasattr(t, "layer_stride") for t in device):
        return max(int(t.size) for t in device)
    return sum(int(t.size) for t in device)


class LiveCapacity:
    """vLLM's own capacity figures, read when a snapshot is built.

    Under 0.34's extensible KV cache (the default on CUDA and ROCm) ``kv_cache_size_tokens``
    and ``kv_cache_max_concurrency`` are set only after warm-up: until then they are unknown
    (``warming_up``), never the reserved size and never 0."""

    def __init__(self, cache_config: Any, max_model_len: int) -> None:
        self.cache_config = cache_config
        self.max_model_len = max_model_len

    def read(self) -> tuple[float | None, int | None] | None:
        """(max concurrency, token capacity) as vLLM set them; ``None`` while warming up."""
        concurrency = getattr(self.cache_config, "kv_cache_max_concurrency", None)
        if concurrency is None:
            if getattr(self.cache_config, "enable_extensible_kv_cache", False):
                return None
            return (None, None)
        tokens = getattr(self.cache_config, "kv_cache_size_tokens", None)
        if tokens is None:
            tokens = kv_cache_size_tokens(float(concurrency), self.max_model_len)
        return float(concurrency), int(tokens)


class _Base:
    """What both views share: identity, request counters, peaks, and the snapshot's frame."""

    def __init__(self, pool: Any, facts: EngineFacts, block_size: int) -> None:
        self.pool = pool
        self.facts = facts
        self.block_size = block_size
        self.instance_id = uuid.uuid4().hex
        # Counted per admission, or what vLLM's stats handed out (``prefix_totals`` is the total).
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.preemptions = 0
        self.iterations = 0
        self._sequence = 0
        self.capacity: LiveCapacity | None = None
        self.problem: str | None = None  # the shim's own failure, said in every snapshot
        self.scheduler_calls = 0  # note_step's count: which admissions share a step
        used = self._used_blocks()
        self._peak_used = used
        self._peak_physical = used

    def _used_blocks(self) -> int:
        return int(self.pool.num_gpu_blocks) - 1 - int(self.pool.get_num_free_blocks())

    def prefix_totals(self) -> tuple[int, int]:
        """(query tokens, hit tokens) of first admissions since start."""
        return self.prefix_query_tokens, self.prefix_hit_tokens

    def _physical_blocks(self, used: int) -> int | None:
        """Used + evictable blocks, where the view knows evictable."""
        return None

    def note_step(self) -> None:
        """The high-water marks, at the end of each ``schedule()``: every allocation happens
        there (O(1), one pool read). It also counts scheduler steps."""
        self.scheduler_calls += 1
        used = self._used_blocks()
        if used > self._peak_used:
            self._peak_used = used
        physical = self._physical_blocks(used)
        if physical is not None and physical > self._peak_physical:
            self._peak_physical = physical

    def _take_peaks(self, used: int, physical: int | None) -> tuple[int, int | None]:
        """Peaks since the previous read (never below now); the next period starts now."""
        peak_used = max(self._peak_used, used)
        peak_physical = None if physical is None else max(self._peak_physical, physical)
        self._peak_used = used
        self._peak_physical = physical if physical is not None else used
        return peak_used, peak_physical

    def _frame(
        self,
        pool: Pool,
        running: int,
        waiting: int,
        at: float | None,
        concurrency: float | None,
        capacity_tokens: int | None,
        status: ProducerStatus,
        groups: tuple[KVGroup, ...],
        reuse: Any = None,
        resident: dict[str, int] | None = None,
    ) -> Snapshot:
        if self.problem is not None and status.state == "ok":
            status = ProducerStatus("unsupported", self.problem)
        if self.capacity is not None:
            live = self.capacity.read()
            if live is None:
                concurrency = capacity_tokens = None
                if status.state == "ok":
                    status = ProducerStatus(
                        "warming_up", "vLLM sizes its extensible KV cache after warm-up"
                    )
            elif live[0] is not None:
                concurrency, capacity_tokens = live
        self._sequence += 1
        queries, hits = self.prefix_totals()
        return Snapshot(
            engine=EngineIdentity(
                kind="vllm",
                version=self.facts.version,
                model=self.facts.model,
                dp_rank=self.facts.dp_rank,
                instance_id=self.instance_id,
            ),
            time=time.time() if at is None else at,
            sequence=self._sequence,
            max_model_len=self.facts.max_model_len,
            pools=(pool,),
            groups=groups,
            max_concurrency=concurrency,
            capacity_tokens=capacity_tokens,
            requests=Requests(running=running, waiting=waiting),
            counters=Counters(
                prefix_query_tokens=queries,
                prefix_hit_tokens={"device": hits},
                preemptions=self.preemptions,
                iterations=self.iterations,
            ),
            reuse_distance=reuse,
            status=status,
            prefix_resident_slots=resident or {},
        )


class BlockPoolTracker(_Base):
    """Counts of a live vLLM KVCacheManager's block pool, maintained incrementally.

    Everything is checked before anything is changed: ``UnsupportedVllm`` leaves vLLM's pool
    and manager exactly as they were."""

    def __init__(
        self,
        kv_cache_manager: Any,
        kv_cache_config: Any,
        facts: EngineFacts,
        reuse_distances: bool = True,
    ) -> None:
        pool = kv_cache_manager.block_pool
        missing = [
            f"BlockPool.{a}" for a in (*POOL_API, "free_block_queue") if not hasattr(pool, a)
        ]
        missing += [
            f"KVCacheManager.{h}" for h in MANAGER_HOOKS if not hasattr(kv_cache_manager, h)
        ]
        if missing:
            raise UnsupportedVllm(f"no {', '.join(missing)}")
        block_class = type(pool.blocks[0])
        self.layout = block_layout(block_class)
        specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]
        super().__init__(pool, facts, facts.block_size or min(int(s.block_size) for s in specs))
        self.manager = kv_cache_manager
        self.num_blocks = int(kv_cache_config.num_blocks)
        self.groups = facts.groups or tuple(
            KVGroup(
                name=f"group{i}",
                kind=group_kind(spec),
                pool="full",
                blocks_per_request=cdiv(facts.max_model_len, int(spec.block_size)),
                sliding_window=getattr(spec, "sliding_window", None),
            )
            for i, spec in enumerate(specs)
        )
        self.max_concurrency = facts.max_concurrency or max_concurrency(
            {"full": self.num_blocks},
            [GroupFootprint("full", g.blocks_per_request) for g in self.groups],
        )
        self.capacity_tokens = facts.capacity_tokens or (
            kv_cache_size_tokens(self.max_concurrency, facts.max_model_len)
            if self.max_concurrency is not None
            else None
        )
        allocation = kv_allocation_bytes(kv_cache_config)
        self.bytes_per_slot = facts.bytes_per_slot or (
            allocation // (self.num_blocks * self.block_size) if allocation else None
        )
        usable_tokens = (self.num_blocks - 1) * self.block_size
        # The what-if curve (KVCACHE_SHIM_REUSE_DISTANCE=off leaves it out, and its cost).
        self.reuse = (
            ReuseDistanceTracker(self.block_size, max(usable_tokens, self.block_size))
            if reuse_distances
            else None
        )
        self.cached_tokens = cached_tokens_function(
            {i: int(s.block_size) for i, s in enumerate(specs)}, self.block_size
        )
        # Every check (block slots, queue methods) passes before anything of vLLM's changes.
        # Partial entries need a group whose block size differs from the pool's hash block
        # size; groups of several sizes need each block's own: then tokens are kept per block.
        sizes = {int(s.block_size) for s in specs}
        hash_block = getattr(pool, "hash_block_size", None)
        per_block_tokens = len(sizes) > 1 or sizes != {hash_block}
        # Without the curve and partial entries, the counts live in vLLM's own hash writers
        # where its code is one the shim was tested with (see ``fused``).
        self.counting = "hooks"
        if self.reuse is None and not per_block_tokens and why_not_fused(pool) is None:
            self._counts: FreeQueueCounter | FusedCounts = install_fused(
                pool, self.layout, self.block_size
            )
            self.counting = "fused"
        else:
            self._counts = self._install_hooks(pool, block_class, per_block_tokens)
        # Lookups' distances from get_computed_blocks until the stats record the admission.
        self._lookups: dict[str, Observation] = {}
        # The scheduler call whose admission last looked for hot blocks: one admission per
        # step does (every one where no scheduler drives steps: no call counted).
        self._promoted_at = -1
        self._vllms_prefix_stats = False  # counted from vLLM's PrefixCacheStats
        self._wrap_prefix_stats()
        if self.reuse is not None:
            self._wrap_lookups(self.reuse)

    def _install_hooks(
        self, pool: Any, block_class: type, per_block_tokens: bool
    ) -> FreeQueueCounter:
        """The general counting: hooks on the free queue and the block's hash writers."""
        counts = FreeQueueCounter(
            pool,
            self.layout,
            self.cached_tokens,
            self.block_size,
            self.reuse,
            per_block_tokens=per_block_tokens,
        )
        tracked = tracked_block_class(block_class, self.layout, counts)
        for block in pool.blocks:
            block.__class__ = tracked
        counts.hook(pool.free_block_queue)
        return counts

    def _wrap_lookups(self, reuse: ReuseDistanceTracker) -> None:
        """Reuse distances of a new request's prompt blocks, taken before the lookup pins them.

        The keys are the first KV group's (vLLM stores ``block hash + group id``); on hybrid
        models the other groups' blocks still count in the recency order (they take slots)."""
        original: Callable[..., Any] = self.manager.get_computed_blocks
        suffix = (0).to_bytes(4, "big")
        counts = self._counts

        def lookup(request: Any, *args: Any, **kwargs: Any) -> Any:
            if counts.recency is not None:
                try:
                    self._observe(request, reuse, suffix)
                except Exception as exc:  # the curve stops; vLLM's lookup still runs
                    counts.stop_recency(exc)
            return original(request, *args, **kwargs)

        self.manager.get_computed_blocks = lookup

    def _observe(self, request: Any, reuse: ReuseDistanceTracker, suffix: bytes) -> None:
        hashes = getattr(request, "block_hashes", None)
        if getattr(request, "num_preemptions", 0) > 0 or not isinstance(hashes, list):
            return
        # vLLM never looks up the block holding the prompt's last token.
        cacheable = min(len(hashes), (int(request.num_tokens) - 1) // self.block_size)
        # Every key: the tracker buckets the tracked ones and, at admission, makes the keys
        # an earlier lookup had too hot. Built at C speed (hash + group id, as vLLM's map).
        keys = list(map(operator.add, islice(hashes, cacheable), repeat(suffix)))
        if len(self._lookups) > 4096:  # requests aborted while waiting
            self._lookups.clear()
        used = self._used_blocks()
        self._lookups[request.request_id] = reuse.observe(keys, used * self.block_size)

    def _wrap_prefix_stats(self) -> None:
        """Count prefix queries/hits where the scheduler records them, whatever log_stats says;
        without the curve, from vLLM's own stats where it keeps them (no call per admission)."""
        if self.reuse is None and self._read_vllms_prefix_stats():
            return
        original: Callable[[Any, int], None] = self.manager.record_prefix_cache_stats
        lookup_enabled = getattr(self.manager, "prefix_cache_lookup_enabled", lambda r: True)

        lookups = self._lookups

        def record(request: Any, num_hits: int) -> None:
            looked_up = (
                lookups.pop(str(getattr(request, "request_id", "")), None) if lookups else None
            )
            if getattr(request, "num_preemptions", 0) <= 0 and lookup_enabled(request):
                self.prefix_query_tokens += int(request.num_tokens)
                self.prefix_hit_tokens += int(num_hits)
                if looked_up is not None and self._counts.recency is not None:
                    calls = self.scheduler_calls
                    promote = calls == 0 or self._promoted_at != calls
                    self._promoted_at = calls
                    try:
                        self._counts.recency.record(
                            int(request.num_tokens), looked_up, promote=promote
                        )
                    except Exception as exc:  # the curve stops; vLLM's bookkeeping goes on
                        self._counts.stop_recency(exc)
            original(request, num_hits)

        self.manager.record_prefix_cache_stats = record

    def _read_vllms_prefix_stats(self) -> bool:
        """With log_stats on, vLLM records every admission's query and hit tokens (preempted
        ones apart, as here) in ``prefix_cache_stats``, which ``make_prefix_cache_stats`` hands
        to the stats logger and replaces once per step: the totals are what it handed out
        plus what the current object holds. False where this vLLM keeps no such stats."""
        manager = self.manager
        stats = getattr(manager, "prefix_cache_stats", None)
        original = getattr(manager, "make_prefix_cache_stats", None)
        if not (
            getattr(manager, "log_stats", False)
            and callable(original)
            and isinstance(getattr(stats, "queries", None), int)
            and isinstance(getattr(stats, "hits", None), int)
        ):
            return False

        def make_prefix_cache_stats() -> Any:
            taken = original()
            if taken is not None:
                self.prefix_query_tokens += taken.queries
                self.prefix_hit_tokens += taken.hits
            return taken

        manager.make_prefix_cache_stats = make_prefix_cache_stats
        self._vllms_prefix_stats = True
        return True

    def prefix_totals(self) -> tuple[int, int]:
        if not self._vllms_prefix_stats:
            return self.prefix_query_tokens, self.prefix_hit_tokens
        current = self.manager.prefix_cache_stats
        return (
            self.prefix_query_tokens + int(current.queries),
            self.prefix_hit_tokens + int(current.hits),
        )

    @property
    def evictable_blocks(self) -> int:
        return self._counts.blocks

    @property
    def evictable_tokens(self) -> int:
        return self._counts.tokens

    @property
    def cached_blocks(self) -> int:
        """Blocks holding a prefix-cache entry, in use or evictable (what KV events count)."""
        return self._counts.hashed

    def _physical_blocks(self, used: int) -> int:
        return used + self._counts.step_evictable()

    def counts(self) -> tuple[int, int, int]:
        """(used, evictable, available) blocks, the null block excluded. O(1)."""
        usable = self.pool.num_gpu_blocks - 1
        free = self.pool.get_num_free_blocks()
        evictable = self._counts.blocks
        return usable - free, evictable, free - evictable

    def snapshot(self, running: int, waiting: int, at: float | None = None) -> Snapshot:
        """The pool now; ``at`` is when this state was last known current (default: now)."""
        used, evictable, available = self.counts()
        bs = self.block_size
        peak_used, peak_physical = self._take_peaks(used, used + evictable)
        failure = self._counts.failure
        pool = Pool(
            name="full",
            block_size=bs,
            capacity_slots=(used + evictable + available) * bs,
            used_slots=used * bs,
            evictable_slots=evictable * bs,
            available_slots=available * bs,
            bytes_per_slot=self.bytes_per_slot,
            device=self.facts.device,
            gpu_uuid=self.facts.gpu_uuid,
            evictable_prefix_tokens=self._counts.tokens,
            peak_used_slots=peak_used * bs,
            peak_physical_slots=(peak_physical or 0) * bs,
        )
        reuse = self._counts.recency
        return self._frame(
            pool,
            running,
            waiting,
            at,
            self.max_concurrency,
            self.capacity_tokens,
            ProducerStatus() if failure is None else ProducerStatus("unsupported", failure),
            self.groups,
            None if reuse is None else reuse.histogram(),
            {"device": self.cached_blocks * bs},
        )

    def step_line(self, running: int, waiting: int) -> str:
        """The iteration-level KV log line: from the running counts, no scan."""
        used, evictable, available = self.counts()
        bs = self.block_size
        return (
            f"kv step {self.iterations}: used {used} blocks ({used * bs} slots), evictable"
            f" {evictable} ({self._counts.tokens} tokens), free {available} ({available * bs}"
            f" slots), running {running}, waiting {waiting}"
        )


class PublicPoolView(_Base):
    """What vLLM's public pool API still tells on a release the shim does not recognise:
    used and free blocks, exact; evictable and available left out (``null``), as the bridge
    does; the snapshot says ``unsupported`` and why."""

    def __init__(self, pool: Any, facts: EngineFacts, reason: str) -> None:
        missing = [a for a in POOL_API if not hasattr(pool, a)]
        if missing:
            raise UnsupportedVllm(f"BlockPool has no {', '.join(missing)}")
        super().__init__(pool, facts, facts.block_size or 16)
        self.reason = reason[:1000]

    def snapshot(self, running: int, waiting: int, at: float | None = None) -> Snapshot:
        usable = int(self.pool.num_gpu_blocks) - 1
        used = self._used_blocks()
        peak_used, _ = self._take_peaks(used, None)
        bs = self.block_size
        pool = Pool(
            name="full",
            block_size=bs,
            capacity_slots=usable * bs,
            used_slots=used * bs,
            evictable_slots=None,
            available_slots=None,
            bytes_per_slot=self.facts.bytes_per_slot,
            device=self.facts.device,
            gpu_uuid=self.facts.gpu_uuid,
            peak_used_slots=peak_used * bs,
        )
        return self._frame(
            pool,
            running,
            waiting,
            at,
            self.facts.max_concurrency,
            self.facts.capacity_tokens,
            ProducerStatus("unsupported", self.reason),
            self.facts.groups,
        )

    def step_line(self, running: int, waiting: int) -> str:
        used = self._used_blocks()
        free = int(self.pool.get_num_free_blocks())
        return (
            f"kv step {self.iterations}: used {used} blocks ({used * self.block_size} slots),"
            f" free {free} (evictable unknown: unsupported vLLM), running {running}, waiting"
            f" {waiting}"
        )


def group_kind(spec: Any) -> str:
    name = type(spec).__name__
    if "SlidingWindow" in name:
        return "sliding_window"
    if "Mamba" in name:
        return "mamba"
    if "FullAttention" in name or "MLAAttention" in name:
        return "full_attention"
    return "other"

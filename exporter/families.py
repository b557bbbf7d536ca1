"""Every metric family the exporter publishes, declared once: name, type, help, labels.

Grouped by concern and listed in exposition order. The renderer, the per-target series
estimate, the metric table in docs/exporter.md (a test checks it) and the tests' list of names
all read these declarations: adding a metric is one entry here and one line where its value is
known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine_shim.events.stream import STREAM_ERRORS
from kvstats.snapshot import HIT_TIERS, RESIDENT_TIERS, STATUS_STATES

from .errors import ERROR_REASONS

ENGINE = ("engine", "dp_rank", "model")
POOL = (*ENGINE, "pool")
GPU = ("gpu", "uuid")
TARGET = ("engine",)


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # as in client_python: counters without _total
    type: Literal["gauge", "counter", "histogram"]
    help: str
    labels: tuple[str, ...]
    # Series per owner (pool, engine, target, GPU) at most: the values its last label takes.
    fanout: int = 1
    # The name in the text format (``_total`` for counters); set from the above.
    exposed: str = ""

    def __post_init__(self) -> None:
        exposed = f"{self.name}_total" if self.type == "counter" else self.name
        object.__setattr__(self, "exposed", exposed)

    def header(self) -> str:
        """``# HELP`` and ``# TYPE`` lines, escaped as prometheus_client escapes them."""
        text = self.help.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {self.exposed} {text}\n# TYPE {self.exposed} {self.type}\n"


def _gauge(name: str, help: str, labels: tuple[str, ...], fanout: int = 1) -> Family:
    return Family(name, "gauge", help, labels, fanout)


def _counter(name: str, help: str, labels: tuple[str, ...], fanout: int = 1) -> Family:
    return Family(name, "counter", help, labels, fanout)


# One series per pool of each engine (DP rank).
POOL_FAMILIES = (
    _gauge(
        "kvcache_pool_capacity_slots",
        "Token slots in the KV pool (blocks x block size). On hybrid models sharing one pool a"
        " token takes a slot per KV group: kvcache_capacity_tokens is the token capacity.",
        POOL,
    ),
    _gauge(
        "kvcache_pool_slots",
        "KV pool token slots by state: used (pinned by running requests), evictable (cached,"
        " unreferenced, reclaimable), available (empty). The three sum to capacity; evictable"
        " and available are absent where the engine cannot tell them apart.",
        (*POOL, "state"),
        fanout=3,
    ),
    _gauge(
        "kvcache_physical_usage_ratio",
        "(used + evictable) / capacity: physical occupancy incl. prefix cache.",
        POOL,
    ),
    _gauge(
        "kvcache_active_usage_ratio", "used / capacity: share pinned by running requests.", POOL
    ),
    _gauge("kvcache_evictable_ratio", "evictable / capacity: reclaimable prefix cache.", POOL),
    _gauge("kvcache_block_size_tokens", "Tokens per KV block (page).", POOL),
    _gauge("kvcache_pool_bytes", "Physical bytes of the KV pool.", POOL),
    _gauge(
        "kvcache_pool_evictable_prefix_tokens",
        "Prefix-cache tokens the evictable blocks hold: fewer than the evictable slots where a"
        " cached block is only partly filled (vLLM's partial-block caching).",
        POOL,
    ),
    _gauge(
        "kvcache_pool_peak_slots",
        "Highest used (state=used) and used + evictable (state=physical) slots at any scheduler"
        " step since the exporter's previous poll: bursts between polls and scrapes.",
        (*POOL, "state"),
        fanout=2,
    ),
    _gauge(
        "kvcache_pool_evictable_slots_bound",
        "Bounds on the evictable slots where the exact count is unknown (vLLM without the"
        " shim, with its KV events): bound=lower and bound=upper. Never the exact count: that"
        " is kvcache_pool_slots{state=evictable}, from the shim.",
        (*POOL, "bound"),
        fanout=2,
    ),
)

# One series per engine (DP rank).
ENGINE_FAMILIES = (
    _gauge(
        "kvcache_max_concurrency",
        "Group-aware number of max_model_len requests the KV pools hold.",
        ENGINE,
    ),
    _gauge(
        "kvcache_concurrency_headroom",
        "More max_model_len requests that fit now in available + evictable KV.",
        ENGINE,
    ),
    _gauge("kvcache_max_model_len_tokens", "Longest request the engine accepts.", ENGINE),
    _gauge(
        "kvcache_capacity_tokens",
        "Tokens the engine's KV cache holds, as the engine states it (vLLM:"
        " kv_cache_size_tokens = max concurrency x max_model_len, group-aware).",
        ENGINE,
    ),
    _gauge("kvcache_requests", "Requests by state.", (*ENGINE, "state"), fanout=2),
    _gauge(
        "kvcache_exhaustion_eta_seconds",
        "Forecast seconds until used tokens reach capacity at the recent growth rate;"
        " absent when used is not growing.",
        ENGINE,
    ),
    _gauge(
        "kvcache_snapshot_timestamp_seconds",
        "When the engine published the snapshot last polled (Unix time).",
        ENGINE,
    ),
    _gauge(
        "kvcache_tier_capacity_tokens",
        "Capacity of a lower cache tier.",
        (*ENGINE, "tier"),
        fanout=2,
    ),
    _gauge("kvcache_tier_used_tokens", "Tokens held in a lower cache tier.", (*ENGINE, "tier"), 2),
    _gauge(
        "kvcache_engine_info",
        "Engine identity; value 1.",
        (*ENGINE, "engine_kind", "engine_version"),
    ),
    _gauge(
        "kvcache_prefix_resident_slots",
        "Slots holding prefix-cache blocks (referenced or not), by tier (device, host, storage,"
        " external): from the vLLM shim, or from a KV event stream while it is whole.",
        (*ENGINE, "tier"),
        fanout=len(RESIDENT_TIERS),
    ),
    _gauge(
        "kvcache_shim_status",
        "What the producer says of its numbers, 1 for the current state: ok, warming_up (KV"
        " cache not sized yet: capacity unknown, not 0), unsupported (an engine release the shim"
        " does not recognise: only what is still exact is published).",
        (*ENGINE, "state"),
        fanout=len(STATUS_STATES),
    ),
)

COUNTER_FAMILIES = (
    _counter("kvcache_prefix_query_tokens", "Prompt tokens looked up in the prefix cache.", ENGINE),
    _counter(
        "kvcache_prefix_hit_tokens",
        "Prompt tokens served from cache, by tier (device, host, storage, p2p, external).",
        (*ENGINE, "tier"),
        fanout=len(HIT_TIERS),
    ),
    _counter(
        "kvcache_evicted_tokens", "Device KV slots freed by evicting cached prefixes.", ENGINE
    ),
    _counter("kvcache_preemptions", "Requests preempted for lack of KV.", ENGINE),
    _counter("kvcache_iterations", "Engine scheduler iterations.", ENGINE),
)

# Engines that publish reuse distances (the shim's reference engine and vLLM adapter): the
# histogram's series are one per bucket bound, so they are counted per engine below.
REUSE_MARKS = ("pool", "pool_host", "pool_host_storage", "top")
REUSE_FAMILIES = (
    Family(
        "kvcache_prefix_reuse_distance_tokens",
        "histogram",
        "Prompt tokens looked up in the prefix cache, by reuse distance: the KV (tokens) an LRU"
        " cache needs to still hold them. rate(bucket{le=C}) / rate(count) is the hit ratio a"
        " pool of C tokens would have had; cold misses are only in +Inf. Sampled (SHARDS);"
        " resets when the engine restarts.",
        ENGINE,
    ),
    _gauge(
        "kvcache_prefix_reuse_bucket_info",
        "Which bucket bound of kvcache_prefix_reuse_distance_tokens (bound = its le) is this"
        " engine's pool size (mark=pool), pool + host tier (pool_host), pool + host + storage"
        " (pool_host_storage), or the largest (top); value 1.",
        (*ENGINE, "bound", "mark"),
        fanout=len(REUSE_MARKS),
    ),
    _gauge(
        "kvcache_prefix_reuse_sampling_ratio",
        "Share of cache blocks whose reuse distances are tracked (spatial sampling).",
        ENGINE,
    ),
)

# One series per GPU (NVML), joined to engines by UUID.
GPU_FAMILIES = (
    _gauge("kvcache_gpu_memory_bytes", "GPU memory by state, from NVML.", (*GPU, "state"), 2),
    _gauge("kvcache_gpu_memory_total_bytes", "GPU memory in total, from NVML.", GPU),
    _gauge("kvcache_gpu_utilization_ratio", "GPU utilisation (0-1) over NVML's last sample.", GPU),
    _gauge(
        "kvcache_gpu_non_kv_memory_bytes",
        "GPU memory used by anything but the KV pools on it (weights, activations, other"
        " processes, fragmentation): NVML used minus the pools' bytes.",
        GPU,
    ),
    _gauge(
        "kvcache_gpu_engine_info",
        "Which engine's KV pools live on which GPU; value 1.",
        (*GPU, *ENGINE),
    ),
)

# The exporter's view of each target.
TARGET_FAMILIES = (
    _gauge("kvcache_exporter_target_up", "1 when the last poll of the target succeeded.", TARGET),
    _counter("kvcache_exporter_polls", "Polls of the target.", TARGET),
    _counter(
        "kvcache_exporter_poll_errors",
        "Failed polls by reason (unsupported_engine: answered, but by an engine release the"
        " shim does not recognise; the target stays up with what is still exact).",
        (*TARGET, "reason"),
        len(ERROR_REASONS),
    ),
    _gauge(
        "kvcache_exporter_last_success_timestamp_seconds",
        "When the target was last polled successfully (Unix time).",
        TARGET,
    ),
    _counter(
        "kvcache_exporter_engine_restarts",
        "Engine restarts seen (new instance id or counters going back).",
        TARGET,
    ),
    Family(
        "kvcache_exporter_poll_duration_seconds",
        "histogram",
        "Time to poll and parse a target.",
        TARGET,
        fanout=14,
    ),
    _counter(
        "kvcache_exporter_render_errors",
        "Renders of /metrics that left a target's series out (they could not be written).",
        TARGET,
    ),
    _counter(
        "kvcache_events_discovery_errors",
        "Failed asks of the engine where its KV event streams are (events: discover): an"
        " engine without --kv-events-config, unreachable, or an answer that names none.",
        TARGET,
    ),
)

# One series per KV event stream (a target's DP rank, see exporter/event_streams.py).
STREAM = (*TARGET, "dp_rank")
EVENT_FAMILIES = (
    _counter("kvcache_events_batches", "KV event batches received (live and replayed).", STREAM),
    _counter("kvcache_events", "KV events received (BlockStored, BlockRemoved, ...).", STREAM),
    _counter(
        "kvcache_events_batches_lost",
        "KV event batches missed (sequence gaps the replay socket could not fill).",
        STREAM,
    ),
    _counter("kvcache_events_replayed_batches", "KV event batches recovered by replay.", STREAM),
    _counter(
        "kvcache_events_errors",
        "KV event frames, batches or events not applied, by reason.",
        (*STREAM, "reason"),
        fanout=len(STREAM_ERRORS),
    ),
    _gauge(
        "kvcache_events_last_batch_age_seconds",
        "Seconds since the stream's last batch (or since subscribing, if none came), at the"
        " last poll: a silent stream on a busy engine is broken.",
        STREAM,
    ),
    _gauge(
        "kvcache_events_resident_whole",
        "1 while every batch since a known-empty cache was applied, so resident counts are"
        " exact; 0 after a loss until AllBlocksCleared or an engine restart.",
        STREAM,
    ),
)

# The exporter as a whole.
EXPORTER_FAMILIES = (
    _gauge("kvcache_exporter_nvml_up", "1 when NVML is in use.", ()),
    _counter("kvcache_exporter_nvml_errors", "NVML errors by GPU and error.", ("gpu", "reason")),
    _gauge(
        "kvcache_exporter_build_info", "Exporter build; value 1.", ("version", "python_version")
    ),
    _counter(
        "kvcache_exporter_config_reloads",
        "Configuration reloads (SIGHUP, POST /-/reload) by result.",
        ("result",),
        fanout=2,
    ),
    _gauge(
        "kvcache_exporter_config_last_reload_successful",
        "1 when the last reload succeeded (or none was tried): 0 means a bad file is waiting.",
        (),
    ),
    _gauge(
        "kvcache_exporter_config_last_reload_success_timestamp_seconds",
        "When the configuration was last loaded successfully (Unix time).",
        (),
    ),
)

ENGINE_SCOPED = POOL_FAMILIES + ENGINE_FAMILIES + COUNTER_FAMILIES + REUSE_FAMILIES
ALL = ENGINE_SCOPED + GPU_FAMILIES + TARGET_FAMILIES + EVENT_FAMILIES + EXPORTER_FAMILIES
BY_NAME = {family.name: family for family in ALL}
assert len(BY_NAME) == len(ALL), "a metric family is declared twice"


def series_estimate(
    pools_per_engine: list[int], reuse_bounds: list[int] | None = None, streams: int = 0
) -> int:
    """An upper bound on one target's series: its engines' (one count of pools per engine, and
    the reuse histogram's bucket bounds of those that publish one), its event streams' and its
    own series."""
    per_pool = sum(f.fanout for f in POOL_FAMILIES)
    per_engine = sum(f.fanout for f in ENGINE_FAMILIES + COUNTER_FAMILIES)
    per_target = sum(f.fanout for f in TARGET_FAMILIES)
    per_target += streams * sum(f.fanout for f in EVENT_FAMILIES)
    # Per bound one bucket; then +Inf, _count and _sum, the marks and the sampling ratio.
    reuse = sum(bounds + 3 + len(REUSE_MARKS) + 1 for bounds in reuse_bounds or [])
    return per_target + reuse + sum(per_engine + per_pool * pools for pools in pools_per_engine)

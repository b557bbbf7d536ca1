"""Every metric family the exporter publishes, declared once: name, type, help, labels, and
for the engine's families the function that reads their values from an engine's view.

Grouped by concern and listed in exposition order. The renderer, the per-target series
estimate, the metric table in docs/exporter.md (a test checks it) and the tests' list of names
all read these declarations: adding an engine metric is one entry here, its value function
beside it (in the spirit of kube-state-metrics' family generators).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from engine_shim.events.stream import STREAM_ERRORS
from kvstats.reuse import reuse_marks
from kvstats.snapshot import HIT_TIERS, RESIDENT_TIERS, STATUS_STATES, Pool, Tier

from .derive import CounterKey
from .errors import ERROR_REASONS
from .textformat import format_value

if TYPE_CHECKING:  # state.py imports the pollers, which import this module
    from engine_shim.events.stream import StreamReport

    from .derive import PoolRatios
    from .state import EngineView, TargetReport

ENGINE = ("engine", "dp_rank", "model")
POOL = (*ENGINE, "pool")
GPU = ("gpu", "uuid")
TARGET = ("engine",)


# A family's series for one owner: the values of its labels past the owner's, and the value
# (a histogram's is the whole ReuseDistances).
Values = list[tuple[tuple[str, ...], Any]]


class PoolState(NamedTuple):
    """What a pool family reads: the pool, and its ratios."""

    pool: Pool
    ratios: PoolRatios


class TargetState(NamedTuple):
    """What a target family reads: the poller's report, whether it is up, render errors."""

    report: TargetReport
    up: bool
    render_errors: int


class StreamState(NamedTuple):
    """What an event-stream family reads: the target's report and one DP rank's stream."""

    report: TargetReport
    stream: StreamReport


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # as in client_python: counters without _total
    type: Literal["gauge", "counter", "histogram"]
    help: str
    labels: tuple[str, ...]
    # Series per owner (pool, engine, target, GPU) at most: the values its last label takes.
    fanout: int = 1
    # Engine families, the function that reads their series from one owner (a PoolState, or
    # an EngineView): ``value`` for a family of one series (None: absent), ``values`` for one
    # with labels of its own past the owner's (each series' label values and value).
    value: Callable[[Any], Any] | None = None
    values: Callable[[Any], Values] | None = None
    # The name in the text format (``_total`` for counters); set from the above.
    exposed: str = ""

    def __post_init__(self) -> None:
        exposed = f"{self.name}_total" if self.type == "counter" else self.name
        object.__setattr__(self, "exposed", exposed)

    def header(self) -> str:
        """``# HELP`` and ``# TYPE`` lines, escaped as prometheus_client escapes them."""
        text = self.help.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {self.exposed} {text}\n# TYPE {self.exposed} {self.type}\n"


def _declare(kind: Literal["gauge", "counter"]) -> Callable[..., Family]:
    def declare(
        name: str,
        help: str,
        labels: tuple[str, ...],
        fanout: int = 1,
        value: Callable[[Any], Any] | None = None,
        values: Callable[[Any], Values] | None = None,
    ) -> Family:
        return Family(name, kind, help, labels, fanout, value, values)

    return declare


_gauge = _declare("gauge")
_counter = _declare("counter")


def _by(label_values: tuple[str, ...], values: tuple[float | None, ...]) -> Values:
    """One series per label value, all or none (a state the engine cannot tell leaves out
    the family's states together)."""
    if any(v is None for v in values):
        return []
    return [((label,), v) for label, v in zip(label_values, values, strict=True)]


# ----------------------------------------------------------------- pool value functions


def _pool_slots(p: PoolState) -> Values:
    pool = p.pool
    return [
        (("used",), pool.used_slots),
        *_by(("evictable", "available"), (pool.evictable_slots, pool.available_slots)),
    ]


def _pool_bytes(p: PoolState) -> int | None:
    per_slot = p.pool.bytes_per_slot
    return None if per_slot is None else per_slot * p.pool.capacity_slots


def _peaks(p: PoolState) -> Values:
    peaks = ((("used",), p.pool.peak_used_slots), (("physical",), p.pool.peak_physical_slots))
    return [(label, value) for label, value in peaks if value is not None]


# --------------------------------------------------------------- engine value functions


def _tiers(v: EngineView) -> list[tuple[str, Tier]]:
    tiers = (("host", v.snapshot.host_tier), ("storage", v.snapshot.storage_tier))
    return [(name, tier) for name, tier in tiers if tier is not None]


def _requests(v: EngineView) -> Values:
    r = v.snapshot.requests
    return [] if r is None else [(("running",), r.running), (("waiting",), r.waiting)]


def _status(v: EngineView) -> Values:
    status = v.snapshot.status  # producers that say nothing (bridges, older shims) get none
    if status is None:
        return []
    return [((state,), 1 if state == status.state else 0) for state in STATUS_STATES]


def _resident(v: EngineView) -> Values:
    slots = v.snapshot.prefix_resident_slots
    return [((tier,), slots[tier]) for tier in RESIDENT_TIERS if tier in slots]


def _counter_of(field: str) -> Callable[[EngineView], int | None]:
    key = CounterKey(field)
    return lambda v: v.counters.get(key)


def _hits(v: EngineView) -> Values:
    return [((key.tier,), value) for key, value in v.counters.items() if key.tier is not None]


def _reuse_marks(v: EngineView) -> Values:
    return [((format_value(bound), mark), 1) for bound, mark in reuse_marks(v.snapshot)]


def _reuse_rate(v: EngineView) -> float | None:
    reuse = v.snapshot.reuse_distance
    return None if reuse is None else reuse.sampling_rate


# One series per pool of each engine (DP rank).
POOL_FAMILIES = (
    _gauge(
        "kvcache_pool_capacity_slots",
        "Token slots in the KV pool (blocks x block size). On hybrid models sharing one pool a"
        " token takes a slot per KV group: kvcache_capacity_tokens is the token capacity.",
        POOL,
        value=attrgetter("pool.capacity_slots"),
    ),
    _gauge(
        "kvcache_pool_slots",
        "KV pool token slots by state: used (pinned by running requests), evictable (cached,"
        " unreferenced, reclaimable), available (empty). The three sum to capacity; evictable"
        " and available are absent where the engine cannot tell them apart.",
        (*POOL, "state"),
        fanout=3,
        values=_pool_slots,
    ),
    _gauge(
        "kvcache_physical_usage_ratio",
        "(used + evictable) / capacity: physical occupancy incl. prefix cache.",
        POOL,
        value=lambda p: p.ratios.physical if p.ratios.evictable is not None else None,
    ),
    _gauge(
        "kvcache_active_usage_ratio",
        "used / capacity: share pinned by running requests.",
        POOL,
        value=attrgetter("ratios.active"),
    ),
    _gauge(
        "kvcache_evictable_ratio",
        "evictable / capacity: reclaimable prefix cache.",
        POOL,
        value=lambda p: p.ratios.evictable if p.ratios.physical is not None else None,
    ),
    _gauge(
        "kvcache_block_size_tokens",
        "Tokens per KV block (page).",
        POOL,
        value=attrgetter("pool.block_size"),
    ),
    _gauge(
        "kvcache_pool_bytes",
        "Physical bytes of the KV pool.",
        POOL,
        value=_pool_bytes,
    ),
    _gauge(
        "kvcache_pool_evictable_prefix_tokens",
        "Prefix-cache tokens the evictable blocks hold: fewer than the evictable slots where a"
        " cached block is only partly filled (vLLM's partial-block caching).",
        POOL,
        value=attrgetter("pool.evictable_prefix_tokens"),
    ),
    _gauge(
        "kvcache_pool_peak_slots",
        "Highest used (state=used) and used + evictable (state=physical) slots at any scheduler"
        " step since the exporter's previous poll: bursts between polls and scrapes.",
        (*POOL, "state"),
        fanout=2,
        values=_peaks,
    ),
    _gauge(
        "kvcache_pool_evictable_slots_bound",
        "Bounds on the evictable slots where the exact count is unknown (vLLM without the"
        " shim, with its KV events): bound=lower and bound=upper. Never the exact count: that"
        " is kvcache_pool_slots{state=evictable}, from the shim.",
        (*POOL, "bound"),
        fanout=2,
        values=lambda p: _by(
            ("lower", "upper"), (p.pool.evictable_slots_lower, p.pool.evictable_slots_upper)
        ),
    ),
)

# One series per engine (DP rank).
ENGINE_FAMILIES = (
    _gauge(
        "kvcache_max_concurrency",
        "Group-aware number of max_model_len requests the KV pools hold.",
        ENGINE,
        value=attrgetter("max_concurrency"),
    ),
    _gauge(
        "kvcache_concurrency_headroom",
        "More max_model_len requests that fit now in available + evictable KV.",
        ENGINE,
        value=attrgetter("headroom"),
    ),
    _gauge(
        "kvcache_max_model_len_tokens",
        "Longest request the engine accepts.",
        ENGINE,
        value=attrgetter("snapshot.max_model_len"),
    ),
    _gauge(
        "kvcache_capacity_tokens",
        "Tokens the engine's KV cache holds, as the engine states it (vLLM:"
        " kv_cache_size_tokens = max concurrency x max_model_len, group-aware).",
        ENGINE,
        value=attrgetter("capacity_tokens"),
    ),
    _gauge(
        "kvcache_requests",
        "Requests by state.",
        (*ENGINE, "state"),
        fanout=2,
        values=_requests,
    ),
    _gauge(
        "kvcache_exhaustion_eta_seconds",
        "Forecast seconds until used tokens reach capacity at the recent growth rate;"
        " absent when used is not growing.",
        ENGINE,
        value=attrgetter("eta_seconds"),
    ),
    _gauge(
        "kvcache_snapshot_timestamp_seconds",
        "When the engine published the snapshot last polled (Unix time).",
        ENGINE,
        value=attrgetter("snapshot.time"),
    ),
    _gauge(
        "kvcache_tier_capacity_tokens",
        "Capacity of a lower cache tier.",
        (*ENGINE, "tier"),
        fanout=2,
        values=lambda v: [((n,), t.capacity_tokens) for n, t in _tiers(v)],
    ),
    _gauge(
        "kvcache_tier_used_tokens",
        "Tokens held in a lower cache tier.",
        (*ENGINE, "tier"),
        2,
        values=lambda v: [((n,), t.used_tokens) for n, t in _tiers(v)],
    ),
    _gauge(
        "kvcache_engine_info",
        "Engine identity; value 1.",
        (*ENGINE, "engine_kind", "engine_version"),
        values=lambda v: [((v.snapshot.engine.kind, v.snapshot.engine.version), 1)],
    ),
    _gauge(
        "kvcache_prefix_resident_slots",
        "Slots holding prefix-cache blocks (referenced or not), by tier (device, host, storage,"
        " external): from the vLLM shim, or from a KV event stream while it is whole.",
        (*ENGINE, "tier"),
        fanout=len(RESIDENT_TIERS),
        values=_resident,
    ),
    _gauge(
        "kvcache_shim_status",
        "What the producer says of its numbers, 1 for the current state: ok, warming_up (KV"
        " cache not sized yet: capacity unknown, not 0), unsupported (an engine release the shim"
        " does not recognise: only what is still exact is published).",
        (*ENGINE, "state"),
        fanout=len(STATUS_STATES),
        values=_status,
    ),
)

COUNTER_FAMILIES = (
    _counter(
        "kvcache_prefix_query_tokens",
        "Prompt tokens looked up in the prefix cache.",
        ENGINE,
        value=_counter_of("prefix_query_tokens"),
    ),
    _counter(
        "kvcache_prefix_hit_tokens",
        "Prompt tokens served from cache, by tier (device, host, storage, p2p, external).",
        (*ENGINE, "tier"),
        fanout=len(HIT_TIERS),
        values=_hits,
    ),
    _counter(
        "kvcache_evicted_tokens",
        "Device KV slots freed by evicting cached prefixes.",
        ENGINE,
        value=_counter_of("evicted_tokens"),
    ),
    _counter(
        "kvcache_preemptions",
        "Requests preempted for lack of KV.",
        ENGINE,
        value=_counter_of("preemptions"),
    ),
    _counter(
        "kvcache_iterations",
        "Engine scheduler iterations.",
        ENGINE,
        value=_counter_of("iterations"),
    ),
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
        value=attrgetter("snapshot.reuse_distance"),
    ),
    _gauge(
        "kvcache_prefix_reuse_bucket_info",
        "Which bucket bound of kvcache_prefix_reuse_distance_tokens (bound = its le) is this"
        " engine's pool size (mark=pool), pool + host tier (pool_host), pool + host + storage"
        " (pool_host_storage), or the largest (top); value 1.",
        (*ENGINE, "bound", "mark"),
        fanout=len(REUSE_MARKS),
        values=_reuse_marks,
    ),
    _gauge(
        "kvcache_prefix_reuse_sampling_ratio",
        "Share of cache blocks whose reuse distances are tracked (spatial sampling).",
        ENGINE,
        value=_reuse_rate,
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

# --------------------------------------------------------- target and stream value functions


def _discovery_errors(t: TargetState) -> int | None:
    events = t.report.target.events
    return t.report.discovery_errors if events is not None and events.discover else None


def _batch_age(s: StreamState) -> float | None:
    last, read_at = s.stream.last_batch_time, s.report.read_at
    return None if last is None or read_at is None else max(0.0, read_at - last)


# The exporter's view of each target.
TARGET_FAMILIES = (
    _gauge(
        "kvcache_exporter_target_up",
        "1 when the last poll of the target succeeded.",
        TARGET,
        value=lambda t: 1 if t.up else 0,
    ),
    _counter(
        "kvcache_exporter_polls",
        "Polls of the target.",
        TARGET,
        value=attrgetter("report.polls"),
    ),
    _counter(
        "kvcache_exporter_poll_errors",
        "Failed polls by reason (unsupported_engine: answered, but by an engine release the"
        " shim does not recognise; the target stays up with what is still exact).",
        (*TARGET, "reason"),
        len(ERROR_REASONS),
        values=lambda t: [((r,), n) for r, n in t.report.errors.items()],
    ),
    _gauge(
        "kvcache_exporter_last_success_timestamp_seconds",
        "When the target was last polled successfully (Unix time).",
        TARGET,
        value=attrgetter("report.last_success"),
    ),
    _counter(
        "kvcache_exporter_engine_restarts",
        "Engine restarts seen (new instance id or counters going back).",
        TARGET,
        value=attrgetter("report.restarts"),
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
        value=attrgetter("render_errors"),
    ),
    _counter(
        "kvcache_events_discovery_errors",
        "Failed asks of the engine where its KV event streams are (events: discover): an"
        " engine without --kv-events-config, unreachable, or an answer that names none.",
        TARGET,
        value=_discovery_errors,
    ),
)

# One series per KV event stream (a target's DP rank, see exporter/event_streams.py).
STREAM = (*TARGET, "dp_rank")
EVENT_FAMILIES = (
    _counter(
        "kvcache_events_batches",
        "KV event batches received (live and replayed).",
        STREAM,
        value=attrgetter("stream.batches"),
    ),
    _counter(
        "kvcache_events",
        "KV events received (BlockStored, BlockRemoved, ...).",
        STREAM,
        value=attrgetter("stream.events"),
    ),
    _counter(
        "kvcache_events_batches_lost",
        "KV event batches missed (sequence gaps the replay socket could not fill).",
        STREAM,
        value=attrgetter("stream.lost_batches"),
    ),
    _counter(
        "kvcache_events_replayed_batches",
        "KV event batches recovered by replay.",
        STREAM,
        value=attrgetter("stream.replayed_batches"),
    ),
    _counter(
        "kvcache_events_errors",
        "KV event frames, batches or events not applied, by reason.",
        (*STREAM, "reason"),
        fanout=len(STREAM_ERRORS),
        values=lambda s: [((r,), n) for r, n in s.stream.errors.items()],
    ),
    _gauge(
        "kvcache_events_last_batch_age_seconds",
        "Seconds since the stream's last batch (or since subscribing, if none came), at the"
        " last poll: a silent stream on a busy engine is broken.",
        STREAM,
        value=_batch_age,
    ),
    _gauge(
        "kvcache_events_resident_whole",
        "1 while every batch since a known-empty cache was applied, so resident counts are"
        " exact; 0 after a loss until AllBlocksCleared or an engine restart.",
        STREAM,
        value=lambda s: 1 if s.stream.whole else 0,
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

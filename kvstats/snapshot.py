"""The KV stats snapshot, schema ``kvcache.stats/v2``: what a shim or bridge tells the exporter.

The types only: ``kvstats.validate`` parses and checks the wire form, ``kvstats.reuse`` reads
the what-if curve. Pure data, no I/O and no torch, because both the engine side and the
exporter import it. Unknown values are ``None`` (serialised as ``null``) and never guessed:
a vLLM bridge cannot see evictable blocks, so it says ``null`` instead of ``0``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .reuse import curve_at, working_set

SCHEMA_VERSION = "kvcache.stats/v2"
# v1 named pool slot counts ``*_tokens`` and had no engine-level token capacity; it is still
# read (a vLLM running an older shim keeps working), with ``capacity_tokens`` unknown.
LEGACY_SCHEMA_V1 = "kvcache.stats/v1"

# Where prefix-hit tokens came from: this engine's device pool, its host-DRAM tier, its storage
# tier, another instance over a KV connector (vLLM's ``p2p``: NIXL, Mooncake, ...), or a KV
# connector that does not say (vLLM's ``external_unspecified``: LMCache, ...).
HIT_TIERS: tuple[str, ...] = ("device", "host", "storage", "p2p", "external")
# Where resident prefix-cache blocks live (KV events' media: vLLM GPU / CPU / STORAGE, SGLang
# GPU / CPU_PINNED / DISK / EXTERNAL).
RESIDENT_TIERS: tuple[str, ...] = ("device", "host", "storage", "external")
GROUP_KINDS: tuple[str, ...] = ("full_attention", "sliding_window", "mamba", "other")
MAX_NAME_LEN = 256
# The largest integer a Prometheus sample (a float64) holds exactly; larger counts are refused
# rather than rounded, overflowed or, past 1.8e308, impossible to render at all.
MAX_COUNT = 2**53
# Lone surrogates (JSON allows "\ud800"; UTF-8 cannot encode it): replaced, so that every
# string an engine reports can become a label value.
_UNSAFE_TEXT = re.compile("[\ud800-\udfff]")


def clean_text(value: str) -> str:
    """Valid UTF-8: each lone surrogate becomes U+FFFD."""
    return _UNSAFE_TEXT.sub("\ufffd", value)


class SnapshotError(ValueError):
    """A snapshot that does not follow the schema; ``path`` names the offending field."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class EngineIdentity:
    kind: str  # one of kvstats.kinds.engine_kinds(), checked by parse_snapshot
    version: str
    model: str
    dp_rank: int
    # Changes whenever the engine restarts, so consumers can tell a reset from a decrease.
    instance_id: str


@dataclass(frozen=True, slots=True)
class Pool:
    """One physical pool of KV slots. ``used + evictable + available == capacity``.

    Counts are token *slots*: blocks x block size. A slot holds one token of one KV group's
    layers, so on a hybrid model whose groups share one pool (vLLM) a token of a request takes
    a slot in every group it is in: slots are not the engine's token capacity (that is
    ``Snapshot.capacity_tokens``). When ``evictable_slots`` is unknown, ``available_slots`` is
    unknown too (the engine cannot split its free space), and ``capacity - used`` is what
    could be reclaimed.
    """

    name: str
    block_size: int
    capacity_slots: int
    used_slots: int
    evictable_slots: int | None
    available_slots: int | None
    bytes_per_slot: int | None = None
    device: str | None = None
    gpu_uuid: str | None = None
    # Prefix-cache tokens the evictable blocks hold. Below ``evictable_slots`` where a cached
    # block is only partly filled (vLLM's partial-block prefix caching); unknown: ``None``.
    evictable_prefix_tokens: int | None = None
    # The highest used and physical (used + evictable) slots at any scheduler step since the
    # previous stats read: a burst between two polls still shows. ``None`` where not tracked.
    peak_used_slots: int | None = None
    peak_physical_slots: int | None = None
    # Where the exact evictable count is unknown but bounded (vLLM's KV events with its
    # usage gauge): evictable_slots_lower <= evictable <= evictable_slots_upper. ``None`` where
    # evictable is known exactly, or not even bounded.
    evictable_slots_lower: int | None = None
    evictable_slots_upper: int | None = None

    @property
    def free_slots(self) -> int:
        """Slots not pinned by a running request: available plus evictable."""
        return self.capacity_slots - self.used_slots


@dataclass(frozen=True, slots=True)
class KVGroup:
    """A KV cache group (vLLM's term): layers that share an attention type and a pool."""

    name: str
    kind: str
    pool: str
    # Blocks one request of max_model_len tokens holds in this group (vLLM's footprint).
    blocks_per_request: int
    sliding_window: int | None = None


@dataclass(frozen=True, slots=True)
class Requests:
    running: int
    waiting: int


@dataclass(frozen=True, slots=True)
class Counters:
    """Monotonic since ``instance_id`` started; ``None`` where the engine does not count."""

    prefix_query_tokens: int | None = None
    # Hit tokens by tier; a tier the engine does not have is absent, not zero.
    prefix_hit_tokens: Mapping[str, int] = field(default_factory=dict)
    evicted_tokens: int | None = None
    preemptions: int | None = None
    iterations: int | None = None


@dataclass(frozen=True, slots=True)
class Tier:
    """A cache tier below the device pool (host DRAM, storage)."""

    capacity_tokens: int
    used_tokens: int


# What a producer says about its own numbers: ``ok``; ``warming_up`` (the engine has not sized
# its KV cache yet: capacity and max concurrency are unknown, not 0); ``unsupported`` (the shim
# does not recognise this engine release and publishes only what is still exact).
STATUS_STATES: tuple[str, ...] = ("ok", "warming_up", "unsupported")
MAX_REASON_LEN = 1024


@dataclass(frozen=True, slots=True)
class ProducerStatus:
    state: str = "ok"
    reason: str | None = None


REUSE_SECTION_VERSION = 1
MAX_REUSE_BUCKETS = 64


@dataclass(frozen=True, slots=True)
class ReuseDistances:
    """Looked-up prefix tokens by reuse distance: the hit ratio at every cache size.

    ``cumulative_tokens[i]`` of the ``query_tokens`` looked up had a distance of at most
    ``bounds_tokens[i]``, i.e. would have hit in a pool of that many tokens (see
    ``engine_shim/reuse_distance.py`` for the model). Estimates from a sample of blocks
    (``sampling_rate``); ``query_tokens`` is exact. Counters since ``instance_id`` started.
    Optional and versioned on its own, so bridges and older shims simply lack it.
    """

    sampling_rate: float
    bounds_tokens: tuple[int, ...]
    cumulative_tokens: tuple[int, ...]
    query_tokens: int
    distance_sum_tokens: int
    version: int = REUSE_SECTION_VERSION

    def hit_ratio_at(self, size_tokens: float) -> float | None:
        """The hit ratio of a pool of ``size_tokens`` (the largest bound not above it)."""
        return curve_at(self.bounds_tokens, self.cumulative_tokens, self.query_tokens, size_tokens)

    def working_set_tokens(self, fraction: float = 0.9) -> float | None:
        """The size reaching ``fraction`` of the hits at the largest bound (as the recording
        rule computes it with histogram_quantile)."""
        return working_set(self.bounds_tokens, self.cumulative_tokens, fraction)


@dataclass(frozen=True, slots=True)
class Snapshot:
    engine: EngineIdentity
    time: float
    sequence: int
    max_model_len: int | None
    pools: tuple[Pool, ...]
    groups: tuple[KVGroup, ...]
    max_concurrency: float | None
    requests: Requests | None
    counters: Counters
    host_tier: Tier | None = None
    storage_tier: Tier | None = None
    # Tokens the engine holds, in the engine's own terms: vLLM's ``kv_cache_size_tokens``
    # (max_concurrency x max_model_len, group-aware), SGLang's ``max_total_num_tokens``.
    capacity_tokens: int | None = None
    reuse_distance: ReuseDistances | None = None
    # Absent in older snapshots and from bridges: read as ``ok``.
    status: ProducerStatus | None = None
    # Slots holding prefix-cache blocks (referenced by a request or not), by tier; a tier not
    # known exactly is absent. From the vLLM shim (device) or a whole KV event stream.
    prefix_resident_slots: Mapping[str, int] = field(default_factory=dict)
    schema: str = SCHEMA_VERSION

    def pool(self, name: str) -> Pool | None:
        return next((p for p in self.pools if p.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """The wire form: plain JSON types, ``None`` for unknowns, key order stable."""
        wire: dict[str, Any] = _to_json(self)
        return wire


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value

"""The KV stats snapshot, schema ``kvcache.stats/v1``: what a shim or bridge tells the exporter.

Pure data and pure parsing, no I/O and no torch, because both the engine side and the
exporter import it. Unknown values are ``None`` (serialised as ``null``) and never guessed:
a vLLM bridge cannot see evictable blocks, so it says ``null`` instead of ``0``.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .kinds import engine_kinds

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


def reuse_marks(snap: Snapshot) -> list[tuple[int, str]]:
    """Bucket bounds of ``snap.reuse_distance`` that are this engine's sizes: the pool
    (``pool``), with its host tier (``pool_host``) and storage below it (``pool_host_storage``),
    and the largest bound (``top``). PromQL cannot read a number out of ``le``, so the exporter
    publishes these for rules to join on; the CLI marks the same rows."""
    reuse = snap.reuse_distance
    if reuse is None:
        return []
    sizes: list[tuple[int, str]] = [(reuse.bounds_tokens[-1], "top")]
    full = snap.pool("full")
    if full is not None:
        pool = full.capacity_slots
        sizes.append((pool, "pool"))
        if snap.host_tier is not None:
            pool += snap.host_tier.capacity_tokens
            sizes.append((pool, "pool_host"))
            if snap.storage_tier is not None:
                sizes.append((pool + snap.storage_tier.capacity_tokens, "pool_host_storage"))
    bounds = set(reuse.bounds_tokens)
    return sorted((size, mark) for size, mark in sizes if size in bounds)


def curve_at(
    bounds: Sequence[float], cumulative: Sequence[float], total: float, size: float
) -> float | None:
    """A cumulative reuse histogram read at ``size``: the largest bound not above it."""
    if total <= 0:
        return None
    i = bisect.bisect_right(bounds, size)
    return 0.0 if i == 0 else cumulative[i - 1] / total


def size_for_hit_ratio(
    bounds: Sequence[float], cumulative: Sequence[float], total: float, target: float
) -> float | None:
    """The KV size (tokens) at which the curve reaches hit ratio ``target``, interpolated
    linearly inside its bucket (Prometheus' histogram_quantile over every lookup, cold misses
    in +Inf); None when no size up to the largest bound reaches it."""
    if total <= 0 or not bounds:
        return None
    rank = target * total
    i = bisect.bisect_left(cumulative, rank)
    if i == len(bounds):
        return None
    lower, below = (0.0, 0.0) if i == 0 else (float(bounds[i - 1]), float(cumulative[i - 1]))
    inside = cumulative[i] - below
    if inside <= 0:
        return float(bounds[i])
    return lower + (bounds[i] - lower) * (rank - below) / inside


def working_set(
    bounds: Sequence[float], cumulative: Sequence[float], fraction: float
) -> float | None:
    """Where the cumulative counts reach ``fraction`` of the last one, interpolated linearly
    inside the bucket (Prometheus' histogram_quantile with the last bucket as +Inf)."""
    if not bounds or cumulative[-1] <= 0:
        return None
    rank = fraction * cumulative[-1]
    i = bisect.bisect_left(cumulative, rank)
    if i >= len(bounds) - 1:
        return float(bounds[-2]) if len(bounds) > 1 else float(bounds[-1])
    lower, below = (0.0, 0.0) if i == 0 else (float(bounds[i - 1]), float(cumulative[i - 1]))
    inside = cumulative[i] - below
    if inside <= 0:
        return float(bounds[i])
    return lower + (bounds[i] - lower) * (rank - below) / inside


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


# --------------------------------------------------------------------------------- parsing


class _Reader:
    """Typed field access over one JSON object, with error paths like ``pools[1].used_slots``."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise SnapshotError(path or "$", f"expected an object, got {_type_name(data)}")
        self.data: dict[str, Any] = data
        self.path = path

    def _sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.data:
            if required:
                raise SnapshotError(self._sub(key), "missing")
            return None
        return self.data[key]

    def string(self, key: str, required: bool = True) -> str | None:
        value = self._get(key, required)
        if value is None:
            if required:
                raise SnapshotError(self._sub(key), "must not be null")
            return None
        if not isinstance(value, str):
            raise SnapshotError(self._sub(key), f"expected a string, got {_type_name(value)}")
        if len(value) > MAX_NAME_LEN:
            raise SnapshotError(self._sub(key), f"longer than {MAX_NAME_LEN} characters")
        return clean_text(value)

    def req_string(self, key: str) -> str:
        value = self.string(key)
        assert value is not None
        return value

    def count(self, key: str, required: bool = True) -> int | None:
        """A non-negative integer; JSON floats with an integral value are accepted."""
        value = self.data.get(key)
        if type(value) is int and 0 <= value <= MAX_COUNT:
            return value  # the common case, without the checks below that it would pass
        value = self._get(key, required)
        if value is None:
            if required:
                raise SnapshotError(self._sub(key), "must not be null")
            return None
        return _as_count(value, self._sub(key))

    def req_count(self, key: str) -> int:
        value = self.count(key)
        assert value is not None
        return value

    def number(self, key: str, required: bool = True) -> float | None:
        value = self._get(key, required)
        if value is None:
            if required:
                raise SnapshotError(self._sub(key), "must not be null")
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SnapshotError(self._sub(key), f"expected a number, got {_type_name(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SnapshotError(self._sub(key), "must be finite")
        _check_range(value, self._sub(key))
        return float(value)

    def obj(self, key: str, required: bool = True) -> _Reader | None:
        value = self._get(key, required)
        if value is None:
            if required:
                raise SnapshotError(self._sub(key), "must not be null")
            return None
        return _Reader(value, self._sub(key))

    def array(self, key: str) -> list[Any]:
        value = self._get(key, True)
        if not isinstance(value, list):
            raise SnapshotError(self._sub(key), f"expected an array, got {_type_name(value)}")
        return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_range(value: int | float, path: str) -> None:
    # Compared, never formatted: str() of a 5,000-digit integer raises.
    if value < 0:
        shown = value if value >= -MAX_COUNT else "a huge negative number"
        raise SnapshotError(path, f"must not be negative, got {shown}")
    if value > MAX_COUNT:
        raise SnapshotError(path, "exceeds 2^53, the largest integer a metric sample holds exactly")


def _as_count(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SnapshotError(path, f"expected an integer, got {_type_name(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SnapshotError(path, "must be finite")
        _check_range(value, path)
        if not value.is_integer():
            raise SnapshotError(path, f"expected an integer, got {value}")
        value = int(value)
    _check_range(value, path)
    return int(value)


_V1_POOL_KEYS = {
    f"{what}_tokens": f"{what}_slots" for what in ("capacity", "used", "evictable", "available")
} | {"bytes_per_token": "bytes_per_slot"}


def _upgrade_v1_pool(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    return {_V1_POOL_KEYS.get(k, k): v for k, v in data.items()}


def _parse_pool(data: Any, path: str) -> Pool:
    r = _Reader(data, path)
    pool = Pool(
        name=r.req_string("name"),
        block_size=r.req_count("block_size"),
        capacity_slots=r.req_count("capacity_slots"),
        used_slots=r.req_count("used_slots"),
        evictable_slots=r.count("evictable_slots", required=False),
        available_slots=r.count("available_slots", required=False),
        bytes_per_slot=r.count("bytes_per_slot", required=False),
        device=r.string("device", required=False),
        gpu_uuid=r.string("gpu_uuid", required=False),
        evictable_prefix_tokens=r.count("evictable_prefix_tokens", required=False),
        peak_used_slots=r.count("peak_used_slots", required=False),
        peak_physical_slots=r.count("peak_physical_slots", required=False),
        evictable_slots_lower=r.count("evictable_slots_lower", required=False),
        evictable_slots_upper=r.count("evictable_slots_upper", required=False),
    )
    if pool.block_size == 0:
        raise SnapshotError(f"{path}.block_size", "must be positive")
    if pool.used_slots > pool.capacity_slots:
        raise SnapshotError(
            f"{path}.used_slots",
            f"{pool.used_slots} exceeds capacity_slots {pool.capacity_slots}",
        )
    if (pool.evictable_slots is None) != (pool.available_slots is None):
        raise SnapshotError(
            path, "evictable_slots and available_slots must be both known or both null"
        )
    if pool.evictable_slots is not None and pool.available_slots is not None:
        total = pool.used_slots + pool.evictable_slots + pool.available_slots
        if total != pool.capacity_slots:
            raise SnapshotError(
                path,
                f"used + evictable + available = {pool.used_slots} + {pool.evictable_slots}"
                f" + {pool.available_slots} = {total}, not capacity_slots"
                f" {pool.capacity_slots}",
            )
    if pool.evictable_prefix_tokens is not None and (
        pool.evictable_slots is None or pool.evictable_prefix_tokens > pool.evictable_slots
    ):
        raise SnapshotError(
            f"{path}.evictable_prefix_tokens", "needs evictable_slots and must not exceed them"
        )
    if pool.peak_physical_slots is not None and pool.available_slots is None:
        raise SnapshotError(f"{path}.peak_physical_slots", "needs available_slots")
    lower, upper = pool.evictable_slots_lower, pool.evictable_slots_upper
    if (lower is None) != (upper is None):
        raise SnapshotError(
            path, "evictable_slots_lower and _upper must be both known or both null"
        )
    if lower is not None and upper is not None:
        if pool.evictable_slots is not None:
            raise SnapshotError(path, "evictable bounds are for an unknown evictable_slots")
        if not lower <= upper <= pool.capacity_slots - pool.used_slots:
            raise SnapshotError(
                path, f"evictable bounds {lower}..{upper} must rise and fit in capacity - used"
            )
    physical_now = pool.capacity_slots - (pool.available_slots or 0)
    for key, peak, now in (
        ("peak_used_slots", pool.peak_used_slots, pool.used_slots),
        ("peak_physical_slots", pool.peak_physical_slots, physical_now),
    ):
        if peak is not None and not now <= peak <= pool.capacity_slots:
            raise SnapshotError(
                f"{path}.{key}", f"{peak} must be between the current {now} and capacity_slots"
            )
    return pool


def _parse_group(data: Any, path: str, pool_names: set[str]) -> KVGroup:
    r = _Reader(data, path)
    group = KVGroup(
        name=r.req_string("name"),
        kind=r.req_string("kind"),
        pool=r.req_string("pool"),
        blocks_per_request=r.req_count("blocks_per_request"),
        sliding_window=r.count("sliding_window", required=False),
    )
    if group.kind not in GROUP_KINDS:
        raise SnapshotError(f"{path}.kind", f"must be one of {', '.join(GROUP_KINDS)}")
    if group.pool not in pool_names:
        raise SnapshotError(f"{path}.pool", f"names no pool in pools: {group.pool!r}")
    return group


def _parse_tiered(r: _Reader | None, tiers: tuple[str, ...]) -> dict[str, int]:
    """An object of counts by tier; an absent tier is unknown."""
    found: dict[str, int] = {}
    if r is not None:
        for tier, value in r.data.items():
            if tier not in tiers:
                raise SnapshotError(f"{r.path}.{tier}", f"tier must be one of {', '.join(tiers)}")
            found[tier] = _as_count(value, f"{r.path}.{tier}")
    return found


def _parse_counters(r: _Reader) -> Counters:
    hits = _parse_tiered(r.obj("prefix_hit_tokens", required=False), HIT_TIERS)
    return Counters(
        prefix_query_tokens=r.count("prefix_query_tokens", required=False),
        prefix_hit_tokens=hits,
        evicted_tokens=r.count("evicted_tokens", required=False),
        preemptions=r.count("preemptions", required=False),
        iterations=r.count("iterations", required=False),
    )


def _parse_tier(r: _Reader | None) -> Tier | None:
    if r is None:
        return None
    tier = Tier(
        capacity_tokens=r.req_count("capacity_tokens"), used_tokens=r.req_count("used_tokens")
    )
    if tier.used_tokens > tier.capacity_tokens:
        raise SnapshotError(f"{r.path}.used_tokens", "exceeds capacity_tokens")
    return tier


def _parse_status(r: _Reader | None) -> ProducerStatus | None:
    if r is None:
        return None
    state = r.req_string("state")
    if state not in STATUS_STATES:
        raise SnapshotError(f"{r.path}.state", f"must be one of {', '.join(STATUS_STATES)}")
    reason = r.data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise SnapshotError(f"{r.path}.reason", f"expected a string, got {_type_name(reason)}")
    return ProducerStatus(state, None if reason is None else clean_text(reason[:MAX_REASON_LEN]))


def _parse_reuse(r: _Reader | None) -> ReuseDistances | None:
    """The optional reuse-distance section; one of a newer version is skipped, not refused."""
    if r is None or r.data.get("version") != REUSE_SECTION_VERSION:
        return None
    rate = r.number("sampling_rate")
    assert rate is not None
    if not 0 < rate <= 1:
        raise SnapshotError(f"{r.path}.sampling_rate", f"must be in (0, 1], got {rate}")
    bounds = [
        _as_count(b, f"{r.path}.bounds_tokens[{i}]") for i, b in enumerate(r.array("bounds_tokens"))
    ]
    cumulative = [
        _as_count(c, f"{r.path}.cumulative_tokens[{i}]")
        for i, c in enumerate(r.array("cumulative_tokens"))
    ]
    if not 0 < len(bounds) <= MAX_REUSE_BUCKETS or len(cumulative) != len(bounds):
        raise SnapshotError(
            f"{r.path}.bounds_tokens",
            f"1 to {MAX_REUSE_BUCKETS} bounds, one cumulative count each",
        )
    if bounds[0] == 0 or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise SnapshotError(f"{r.path}.bounds_tokens", "must be positive and increasing")
    if any(a > b for a, b in itertools.pairwise(cumulative)):
        raise SnapshotError(f"{r.path}.cumulative_tokens", "must not decrease")
    queries = r.req_count("query_tokens")
    if cumulative[-1] > queries:
        raise SnapshotError(f"{r.path}.cumulative_tokens", "exceeds query_tokens")
    return ReuseDistances(
        sampling_rate=rate,
        bounds_tokens=tuple(bounds),
        cumulative_tokens=tuple(cumulative),
        query_tokens=queries,
        distance_sum_tokens=r.req_count("distance_sum_tokens"),
    )


def parse_snapshot(data: Any) -> Snapshot:
    """Validate decoded JSON into a Snapshot, or raise SnapshotError naming the field."""
    root = _Reader(data, "")
    schema = root.req_string("schema")
    if schema not in (SCHEMA_VERSION, LEGACY_SCHEMA_V1):
        raise SnapshotError("schema", f"unsupported schema {schema!r}, expected {SCHEMA_VERSION!r}")
    legacy = schema == LEGACY_SCHEMA_V1

    ident = root.obj("engine")
    assert ident is not None
    kind = ident.req_string("kind")
    if kind not in engine_kinds():
        raise SnapshotError("engine.kind", f"must be one of {', '.join(engine_kinds())}")
    engine = EngineIdentity(
        kind=kind,
        version=ident.req_string("version"),
        model=ident.req_string("model"),
        dp_rank=ident.req_count("dp_rank"),
        instance_id=ident.req_string("instance_id"),
    )

    pools = tuple(
        _parse_pool(_upgrade_v1_pool(p) if legacy else p, f"pools[{i}]")
        for i, p in enumerate(root.array("pools"))
    )
    if not pools:
        raise SnapshotError("pools", "at least one pool is required")
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise SnapshotError("pools", f"duplicate pool names: {names}")
    groups = tuple(
        _parse_group(g, f"groups[{i}]", set(names)) for i, g in enumerate(root.array("groups"))
    )

    requests_reader = root.obj("requests", required=False)
    requests = (
        None
        if requests_reader is None
        else Requests(
            running=requests_reader.req_count("running"),
            waiting=requests_reader.req_count("waiting"),
        )
    )
    counters_reader = root.obj("counters")
    assert counters_reader is not None
    time_value = root.number("time")
    assert time_value is not None
    return Snapshot(
        engine=engine,
        time=time_value,
        sequence=root.req_count("sequence"),
        max_model_len=root.count("max_model_len", required=False),
        pools=pools,
        groups=groups,
        max_concurrency=root.number("max_concurrency", required=False),
        requests=requests,
        counters=_parse_counters(counters_reader),
        host_tier=_parse_tier(root.obj("host_tier", required=False)),
        storage_tier=_parse_tier(root.obj("storage_tier", required=False)),
        capacity_tokens=None if legacy else root.count("capacity_tokens", required=False),
        reuse_distance=None if legacy else _parse_reuse(root.obj("reuse_distance", required=False)),
        status=_parse_status(root.obj("status", required=False)),
        prefix_resident_slots=_parse_tiered(
            root.obj("prefix_resident_slots", required=False), RESIDENT_TIERS
        ),
    )

"""The one validator of ``kvcache.stats`` snapshots: the wire form (JSON) to ``Snapshot``, or a
``SnapshotError`` naming the field and the problem. v1 snapshots (older shims) are upgraded."""

from __future__ import annotations

import itertools
import math
from typing import Any

from .kinds import engine_kinds
from .snapshot import (
    GROUP_KINDS,
    HIT_TIERS,
    LEGACY_SCHEMA_V1,
    MAX_COUNT,
    MAX_NAME_LEN,
    MAX_REASON_LEN,
    MAX_REUSE_BUCKETS,
    RESIDENT_TIERS,
    REUSE_SECTION_VERSION,
    SCHEMA_VERSION,
    STATUS_STATES,
    Counters,
    EngineIdentity,
    KVGroup,
    Pool,
    ProducerStatus,
    Requests,
    ReuseDistances,
    Snapshot,
    SnapshotError,
    Tier,
    clean_text,
)


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
    _check_slots(pool, path)
    _check_evictable_detail(pool, path)
    _check_peaks(pool, path)
    return pool


def _check_slots(pool: Pool, path: str) -> None:
    """used + evictable + available = capacity, where the engine tells them apart."""
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


def _check_evictable_detail(pool: Pool, path: str) -> None:
    """Prefix tokens within the evictable slots; bounds only where the exact count is unknown."""
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


def _check_peaks(pool: Pool, path: str) -> None:
    """Each peak between its current value and the capacity."""
    physical_now = pool.capacity_slots - (pool.available_slots or 0)
    for key, peak, now in (
        ("peak_used_slots", pool.peak_used_slots, pool.used_slots),
        ("peak_physical_slots", pool.peak_physical_slots, physical_now),
    ):
        if peak is not None and not now <= peak <= pool.capacity_slots:
            raise SnapshotError(
                f"{path}.{key}", f"{peak} must be between the current {now} and capacity_slots"
            )


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
    known = engine_kinds()
    if kind not in known:
        raise SnapshotError("engine.kind", f"must be one of {', '.join(known)}")
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

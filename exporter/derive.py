"""The exporter's arithmetic, as pure functions over snapshots (tested without any I/O).

- ratios per pool: physical (used + evictable), active (used), evictable — each over capacity;
- group-aware max concurrency and headroom (max-length requests that still fit);
- exhaustion ETA: least-squares growth of used tokens over a recent window;
- restart detection and counter continuity, so exported counters never go backwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engine_shim.capacity import GroupFootprint, cdiv, kv_cache_size_tokens, max_concurrency
from engine_shim.snapshot import Pool, Snapshot


@dataclass(frozen=True, slots=True)
class PoolRatios:
    active: float
    physical: float | None  # None when the engine cannot see evictable tokens
    evictable: float | None


def pool_ratios(pool: Pool) -> PoolRatios:
    cap = pool.capacity_slots
    if cap == 0:
        return PoolRatios(
            0.0,
            None if pool.evictable_slots is None else 0.0,
            None if pool.evictable_slots is None else 0.0,
        )
    if pool.evictable_slots is None:
        return PoolRatios(pool.used_slots / cap, None, None)
    return PoolRatios(
        active=pool.used_slots / cap,
        physical=(pool.used_slots + pool.evictable_slots) / cap,
        evictable=pool.evictable_slots / cap,
    )


def _footprints(snapshot: Snapshot) -> list[GroupFootprint]:
    if snapshot.groups:
        return [GroupFootprint(g.pool, g.blocks_per_request) for g in snapshot.groups]
    # No group information (some bridges): one full-attention group over the first pool.
    if snapshot.max_model_len and snapshot.pools:
        pool = snapshot.pools[0]
        return [GroupFootprint(pool.name, cdiv(snapshot.max_model_len, pool.block_size))]
    return []


def engine_max_concurrency(snapshot: Snapshot) -> float | None:
    """The engine's own figure when it reports one, else the group-aware formula."""
    if snapshot.max_concurrency is not None:
        return snapshot.max_concurrency
    blocks = {p.name: p.capacity_slots // p.block_size for p in snapshot.pools}
    return max_concurrency(blocks, _footprints(snapshot))


def engine_capacity_tokens(snapshot: Snapshot, concurrency: float | None) -> int | None:
    """The engine's own token capacity; for engines that do not state one (older shims), vLLM's
    definition: max concurrency x max_model_len."""
    if snapshot.capacity_tokens is not None:
        return snapshot.capacity_tokens
    if concurrency is None or snapshot.max_model_len is None:
        return None
    return kv_cache_size_tokens(concurrency, snapshot.max_model_len)


def concurrency_headroom(snapshot: Snapshot) -> int | None:
    """More max-length requests that fit now in available + evictable blocks, group-aware."""
    free_blocks = {p.name: p.free_slots // p.block_size for p in snapshot.pools}
    fits = max_concurrency(free_blocks, _footprints(snapshot))
    return None if fits is None else math.floor(fits)


# ------------------------------------------------------------------------ exhaustion ETA


def exhaustion_eta(samples: Sequence[tuple[float, float]], capacity: float) -> float | None:
    """Seconds until ``used`` reaches ``capacity`` at the least-squares slope of the samples.

    ``samples`` are (time, used) pairs over a recent window. None when there are too few
    samples or used is not growing (the metric is then absent, never a made-up number).
    """
    if len(samples) < 3:
        return None
    n = len(samples)
    t0 = samples[0][0]
    mean_t = sum(t - t0 for t, _ in samples) / n
    mean_u = sum(u for _, u in samples) / n
    var = sum((t - t0 - mean_t) ** 2 for t, _ in samples)
    if var <= 0:
        return None
    slope = sum((t - t0 - mean_t) * (u - mean_u) for t, u in samples) / var
    if slope <= 0:
        return None
    remaining = capacity - samples[-1][1]
    return max(0.0, remaining / slope)


# ------------------------------------------------------------ restarts and counter continuity


def counter_values(snapshot: Snapshot) -> dict[str, int]:
    """The snapshot's monotonic counters, flattened; unknown counters are left out."""
    c = snapshot.counters
    values = {f"prefix_hit_tokens:{tier}": v for tier, v in c.prefix_hit_tokens.items()}
    for name in ("prefix_query_tokens", "evicted_tokens", "preemptions", "iterations"):
        value = getattr(c, name)
        if value is not None:
            values[name] = value
    return values


def is_restart(previous: Snapshot, current: Snapshot) -> bool:
    """A new instance id, a sequence going backwards, or any counter going backwards."""
    if previous.engine.instance_id != current.engine.instance_id:
        return True
    if current.sequence < previous.sequence:
        return True
    before, now = counter_values(previous), counter_values(current)
    return any(now[k] < v for k, v in before.items() if k in now)


@dataclass(slots=True)
class CounterContinuity:
    """Keeps exported counters monotonic across engine restarts (for the exporter's lifetime).

    Each restart adds the previous instance's last values to a base, the way Prometheus'
    ``rate()`` would have to guess; here nothing is guessed and nothing goes backwards.
    """

    base: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)

    def update(self, raw: Mapping[str, int], restarted: bool) -> dict[str, int]:
        if restarted:
            for key, value in self.last.items():
                self.base[key] = self.base.get(key, 0) + value
            self.last = {}
        self.last.update(raw)
        return {key: self.base.get(key, 0) + value for key, value in raw.items()}

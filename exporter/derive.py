"""The exporter's arithmetic, as pure functions over snapshots (tested without any I/O).

- ratios per pool: physical (used + evictable), active (used), evictable — each over capacity;
- group-aware max concurrency and headroom (max-length requests that still fit);
- exhaustion ETA: least-squares growth of used tokens over a recent window;
- restart detection and counter continuity, so exported counters never go backwards.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from kvstats.capacity import GroupFootprint, cdiv, kv_cache_size_tokens, max_concurrency
from kvstats.snapshot import Pool, Snapshot

K = TypeVar("K", bound=Hashable)


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


MIN_ETA_SAMPLES = 5
# The growth must be this many standard errors above zero: a flat, noisy or oscillating pool
# then gives no forecast instead of one that jumps between a minute and hours.
MIN_TREND_T = 3.0


def exhaustion_eta(
    samples: Sequence[tuple[float, float]], capacity: float, window: float | None = None
) -> float | None:
    """Seconds until ``used`` reaches ``capacity`` on the recent trend, or None.

    ``samples`` are (time, used) pairs over the last ``window`` seconds. The trend is a
    least-squares line; the forecast is published only when at least ``MIN_ETA_SAMPLES`` cover
    half the window and the slope is at least ``MIN_TREND_T`` standard errors above zero. The
    forecast runs from the fitted value now (not the last, noisy sample) to capacity.
    """
    n = len(samples)
    if n < MIN_ETA_SAMPLES:
        return None
    t0 = samples[0][0]
    span = samples[-1][0] - t0
    if window is not None and span < window / 2:
        return None
    mean_t = sum(t - t0 for t, _ in samples) / n
    mean_u = sum(u for _, u in samples) / n
    var = sum((t - t0 - mean_t) ** 2 for t, _ in samples)
    if var <= 0:
        return None
    slope = sum((t - t0 - mean_t) * (u - mean_u) for t, u in samples) / var
    if slope <= 0:
        return None
    intercept = mean_u - slope * mean_t
    residual = sum((u - (intercept + slope * (t - t0))) ** 2 for t, u in samples)
    stderr = math.sqrt(residual / (n - 2) / var)
    if stderr > 0 and slope / stderr < MIN_TREND_T:
        return None
    fitted_now = intercept + slope * span
    return max(0.0, (capacity - fitted_now) / slope)


# ------------------------------------------------------------ restarts and counter continuity


class CounterKey(NamedTuple):
    """A counter of the snapshot: its field name, and the tier for prefix hits."""

    name: str
    tier: str | None = None


COUNTER_FIELDS = ("prefix_query_tokens", "evicted_tokens", "preemptions", "iterations")


def counter_values(snapshot: Snapshot) -> dict[CounterKey, int]:
    """The snapshot's monotonic counters, flattened; unknown counters are left out."""
    c = snapshot.counters
    values = {CounterKey("prefix_hit_tokens", tier): v for tier, v in c.prefix_hit_tokens.items()}
    for name in COUNTER_FIELDS:
        value = getattr(c, name)
        if value is not None:
            values[CounterKey(name)] = value
    return values


def has_identity(snapshot: Snapshot) -> bool:
    """Whether the engine says who it is (an instance id; shims also number their snapshots)."""
    return snapshot.engine.instance_id not in ("", "unknown")


def is_restart(previous: Snapshot, current: Snapshot) -> bool:
    """A new engine instance: a new instance id, or its snapshot sequence going backwards.

    A counter that goes back while the instance stays the same is that counter's reset, not a
    restart (``CounterContinuity`` handles it as Prometheus would). Only an engine that gives no
    identity (some bridges) has nothing else to go on: every counter going back at once."""
    if has_identity(previous) or has_identity(current):
        if previous.engine.instance_id != current.engine.instance_id:
            return True
        return current.sequence < previous.sequence
    before, now = counter_values(previous), counter_values(current)
    shared = [k for k in before if k in now]
    return bool(shared) and all(now[k] < before[k] for k in shared)


@dataclass(slots=True)
class CounterContinuity(Generic[K]):
    """Keeps exported counters monotonic across engine restarts and counter resets.

    On a restart every counter starts again: each one's last value is added to its base. A
    single counter going back without a restart is a reset of that counter alone, as Prometheus'
    ``rate()`` treats it: only its last value is added to its base, the others are untouched.
    """

    base: dict[K, int] = field(default_factory=dict)
    last: dict[K, int] = field(default_factory=dict)

    def update(self, raw: Mapping[K, int], restarted: bool) -> dict[K, int]:
        if restarted:
            for key, value in self.last.items():
                self.base[key] = self.base.get(key, 0) + value
            self.last = {}
        for key, value in raw.items():
            previous = self.last.get(key)
            if previous is not None and value < previous:
                self.base[key] = self.base.get(key, 0) + previous
        self.last.update(raw)
        return {key: self.base.get(key, 0) + value for key, value in raw.items()}

"""The exporter's arithmetic, as pure functions over snapshots (tested without any I/O).

- ratios per pool: physical (used + evictable), active (used), evictable — each over capacity;
- group-aware max concurrency and headroom (max-length requests that still fit);
- exhaustion ETA: least-squares growth of used tokens over a recent window;
- restart detection and counter continuity, so exported counters never go backwards.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from kvstats.capacity import GroupFootprint, cdiv, kv_cache_size_tokens, max_concurrency
from kvstats.snapshot import Counters, Pool, Snapshot

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


def warming_up(snapshot: Snapshot) -> bool:
    """The engine has not sized its KV cache yet (vLLM 0.34's extensible cache before warm-up):
    its pool is a reservation, so nothing is derived from it; capacity is unknown, not 0."""
    return snapshot.status is not None and snapshot.status.state == "warming_up"


def engine_max_concurrency(snapshot: Snapshot) -> float | None:
    """The engine's own figure when it reports one, else the group-aware formula."""
    if snapshot.max_concurrency is not None:
        return snapshot.max_concurrency
    if warming_up(snapshot):
        return None
    blocks = {p.name: p.capacity_slots // p.block_size for p in snapshot.pools}
    return max_concurrency(blocks, _footprints(snapshot))


def engine_capacity_tokens(snapshot: Snapshot, concurrency: float | None) -> int | None:
    """The engine's own token capacity; for engines that do not state one (older shims), vLLM's
    definition: max concurrency x max_model_len."""
    if snapshot.capacity_tokens is not None:
        return snapshot.capacity_tokens
    if concurrency is None or snapshot.max_model_len is None or warming_up(snapshot):
        return None
    return kv_cache_size_tokens(concurrency, snapshot.max_model_len)


def concurrency_headroom(snapshot: Snapshot) -> int | None:
    """More max-length requests that fit now in available + evictable blocks, group-aware."""
    if warming_up(snapshot):
        return None
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

    This is the two-pass reference; ``UsageTrend`` keeps the same fit with running sums.
    """
    n = len(samples)
    if n < MIN_ETA_SAMPLES:
        return None
    mean_t = sum(t for t, _ in samples) / n
    mean_u = sum(u for _, u in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (u - mean_u) for t, u in samples)
    ss_u = sum((u - mean_u) ** 2 for _, u in samples)
    span = samples[-1][0] - samples[0][0]
    return _forecast(
        _Fit(n, span, var, cov, ss_u, samples[-1][0] - mean_t, mean_u), capacity, window
    )


@dataclass(frozen=True, slots=True)
class _Fit:
    """A window's least-squares statistics (deviations from the means)."""

    n: int
    span: float  # last time - first time
    var_t: float  # sum of (t - mean t)^2
    cov: float  # sum of (t - mean t)(u - mean u)
    ss_u: float  # sum of (u - mean u)^2
    last_t_from_mean: float  # last time - mean t
    mean_u: float


def _forecast(fit: _Fit, capacity: float, window: float | None) -> float | None:
    if fit.n < MIN_ETA_SAMPLES or (window is not None and fit.span < window / 2):
        return None
    if fit.var_t <= 0:
        return None
    slope = fit.cov / fit.var_t
    if slope <= 0:
        return None
    residual = max(0.0, fit.ss_u - slope * fit.cov)
    stderr = math.sqrt(residual / (fit.n - 2) / fit.var_t)
    if stderr > 0 and slope / stderr < MIN_TREND_T:
        return None
    fitted_now = fit.mean_u + slope * fit.last_t_from_mean
    return max(0.0, (capacity - fitted_now) / slope)


class UsageTrend:
    """A pool's (time, used) samples over the last ``window`` seconds with running sums, so a
    poll costs the same whatever the window holds (``exhaustion_eta`` is the reference it is
    tested against).

    The sums are exact: integers, with times in nanoseconds from an anchor sample and used
    slots as the integers they are. Adding and removing samples therefore never builds up
    rounding, and a flat pool has a slope of exactly zero (running float sums would leave a
    residue there that reads as a trend). The anchor moves once per window (one pass over the
    samples, O(1) per poll amortised) so the integers stay small.
    """

    __slots__ = ("_anchor", "_rebase_at", "_sums", "samples", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()
        self._anchor: tuple[float, int] = (0.0, 0)
        self._sums = [0] * 5  # x, y, xx, xy, yy: x = t - anchor t in ns, y = used - anchor used
        self._rebase_at = -math.inf

    def add(self, t: float, used: int) -> None:
        self.samples.append((t, used))
        self._accumulate(t, used, 1)
        while self.samples[0][0] < t - self.window:
            old_t, old_used = self.samples.popleft()
            self._accumulate(old_t, old_used, -1)
        if t >= self._rebase_at:
            self._anchor = (t, used)
            self._sums = [0] * 5
            for sample_t, sample_used in self.samples:
                self._accumulate(sample_t, sample_used, 1)
            self._rebase_at = t + self.window

    def _x(self, t: float) -> int:
        return round((t - self._anchor[0]) * 1e9)

    def _accumulate(self, t: float, used: int, sign: int) -> None:
        x, y = self._x(t), used - self._anchor[1]
        sums = self._sums
        sums[0] += sign * x
        sums[1] += sign * y
        sums[2] += sign * x * x
        sums[3] += sign * x * y
        sums[4] += sign * y * y

    def eta(self, capacity: float) -> float | None:
        """``exhaustion_eta`` over the samples in the window."""
        n = len(self.samples)
        if n < MIN_ETA_SAMPLES:
            return None
        sx, sy, sxx, sxy, syy = self._sums
        last_t = self.samples[-1][0]
        # n times the centred sums, exactly; divided once each (int / int rounds correctly).
        fit = _Fit(
            n=n,
            span=last_t - self.samples[0][0],
            var_t=(n * sxx - sx * sx) / n / 1e18,
            cov=(n * sxy - sx * sy) / n / 1e9,
            ss_u=(n * syy - sy * sy) / n,
            last_t_from_mean=(n * self._x(last_t) - sx) / n / 1e9,
            mean_u=self._anchor[1] + sy / n,
        )
        return _forecast(fit, capacity, self.window)


# ------------------------------------------------------------ restarts and counter continuity


class CounterKey(NamedTuple):
    """A counter of the snapshot: its field name, and the tier for prefix hits."""

    name: str
    tier: str | None = None


# The snapshot's plain counters (prefix hits, by tier, are the one mapping): a counter added to
# ``Counters`` is carried here without a list to keep in step (its family reads it by name).
COUNTER_FIELDS = tuple(
    f.name for f in dataclasses.fields(Counters) if f.name != "prefix_hit_tokens"
)


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

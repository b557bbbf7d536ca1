"""The what-if curve read from a reuse-distance histogram: the hit ratio at a size, the size
for a hit ratio, the working set, and which bounds are this engine's sizes. Pure arithmetic."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .snapshot import Snapshot


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


def _in_bucket(bounds: Sequence[float], cumulative: Sequence[float], i: int, rank: float) -> float:
    """Where ``rank`` falls inside bucket ``i``, linearly (as histogram_quantile does)."""
    lower, below = (0.0, 0.0) if i == 0 else (float(bounds[i - 1]), float(cumulative[i - 1]))
    inside = cumulative[i] - below
    if inside <= 0:
        return float(bounds[i])
    return lower + (bounds[i] - lower) * (rank - below) / inside


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
    return None if i == len(bounds) else _in_bucket(bounds, cumulative, i, rank)


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
    return _in_bucket(bounds, cumulative, i, rank)

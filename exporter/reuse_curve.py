"""``kvcache-exporter reuse-curve``: the what-if hit-ratio curve of one engine, as a table.

From a shim (its ``/v1/kv/stats``: since the engine started) or from Prometheus (the
exporter's histogram over a window, summed over the replicas and DP ranks that match).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from kvstats.reuse import curve_at, reuse_marks, size_for_hit_ratio, working_set
from kvstats.snapshot import Pool, SnapshotError
from kvstats.units import format_bytes
from kvstats.validate import parse_snapshot

MARK_NAMES = {
    "pool": "the pool",
    "pool_host": "pool + host tier",
    "pool_host_storage": "pool + host + storage",
    "top": "64x the pool",
}


class CurveError(Exception):
    """Nothing to show: no such engine, no reuse distances, an unreachable source."""


@dataclass(frozen=True)
class Curve:
    title: str
    bounds: Sequence[float]
    cumulative: Sequence[float]
    total: float
    marks: Mapping[str, float]  # mark -> bound
    sampling_rate: float | None = None
    bytes_per_token: float | None = None  # of the pool's KV; None where the engine does not say

    def at(self, size: float) -> float | None:
        return curve_at(self.bounds, self.cumulative, self.total, size)


# Hit ratios people ask the KV size for, and the sizes (multiples of the pool, on the
# histogram's half-octave bounds) compared as GPU KV against a host tier.
TARGET_HIT_RATIOS = (0.5, 0.75, 0.9)
MORE_KV_MULTIPLES = (2**0.5, 2.0, 4.0, 8.0)


def _kv(tokens: float, bytes_per_token: float | None) -> str:
    text = f"{tokens:,.0f} tokens"
    return text if bytes_per_token is None else f"{text}, {format_bytes(tokens * bytes_per_token)}"


def format_answers(curve: Curve, targets: Sequence[float] = TARGET_HIT_RATIOS) -> list[str]:
    """What the curve says to the questions people ask: the ceiling, the KV a hit ratio needs,
    and more GPU KV against a host tier of the same size. In the LRU model a host tier of H
    tokens below the pool behaves as a pool H larger, so both give the same hit ratio; the
    difference is where the hits are served: GPU KV serves them all on the device, the host
    tier serves the extra ones by copying KV back over PCIe."""
    pool, top = curve.marks.get("pool"), curve.bounds[-1] if curve.bounds else None
    now = curve.at(pool) if pool else None
    ceiling = curve.at(top) if top else None
    if ceiling is None or now is None or pool is None or top is None:
        return []
    bpt = curve.bytes_per_token
    lines = [
        f"  hit ratio with this pool ({_kv(pool, bpt)}): {now:.1%}",
        f"  with unlimited KV (the ceiling, read at {top / pool:.0f}x the pool): at least"
        f" {ceiling:.1%}; the other {1 - ceiling:.1%} are first-time prompts (or older)",
    ]
    for target in targets:
        size = size_for_hit_ratio(curve.bounds, curve.cumulative, curve.total, target)
        if size is None:
            lines.append(
                f"  for a hit ratio of {target:.0%}: not reachable (the ceiling is {ceiling:.1%})"
            )
        else:
            lines.append(
                f"  for a hit ratio of {target:.0%}: {_kv(size, bpt)} ({size / pool:.2f}x the pool)"
            )
    lines.append(f"  {'more KV':>36}  {'as GPU KV':>10}  {'as a host tier':>24}")
    for multiple in MORE_KV_MULTIPLES:
        # The bound nearest the multiple (bounds are rounded to whole tokens), if there is one.
        size = min(curve.bounds, key=lambda bound: abs(bound - pool * multiple))
        ratio = curve.at(size)
        if ratio is None or abs(size / (pool * multiple) - 1) > 0.01:
            continue
        more = size - pool
        lines.append(
            f"  {'+' + _kv(more, bpt):>36}  {ratio:>10.1%}  "
            f"{f'{now:.1%} + {ratio - now:.1%} from host':>24}"
        )
    return lines


def format_curve(curve: Curve, fraction: float = 0.9) -> list[str]:
    pool = curve.marks.get("pool")
    sampling = "" if curve.sampling_rate is None else f", sampling {curve.sampling_rate:.3g}"
    lines = [f"{curve.title}: {curve.total:,.0f} prompt tokens looked up{sampling}"]
    if curve.total <= 0:
        return [*lines, "  no lookups yet"]
    lines.append(f"  {'KV cache size':>22}  {'x pool':>7}  {'hit ratio':>9}")
    by_bound = {bound: mark for mark, bound in curve.marks.items()}
    for bound, count in zip(curve.bounds, curve.cumulative, strict=True):
        multiple = f"{bound / pool:7.2f}" if pool else f"{'':>7}"
        mark = by_bound.get(bound)
        note = f"  <- {MARK_NAMES.get(mark, mark)}" if mark else ""
        lines.append(
            f"  {bound:>15,.0f} tokens  {multiple}  {100 * count / curve.total:8.1f}%{note}"
        )
    size = working_set(curve.bounds, curve.cumulative, fraction)
    if size is not None:
        ratio = f" ({size / pool:.2f}x the pool)" if pool else ""
        lines.append(
            f"  working set ({fraction:.0%} of the hits at the largest size): {size:,.0f} tokens"
            f"{ratio}"
        )
    return lines + format_answers(curve)


def curves_from_shim(url: str, timeout: float = 10.0) -> list[Curve]:
    """Every DP rank's curve from a shim's stats endpoint (since each engine started)."""
    if not url.rstrip("/").endswith("/v1/kv/stats"):
        url = url.rstrip("/") + "/v1/kv/stats"
    try:
        body = httpx.get(url, timeout=timeout).raise_for_status().json()
    except (httpx.HTTPError, ValueError) as exc:
        raise CurveError(f"cannot read {url}: {exc}") from None
    out = []
    for data in body if isinstance(body, list) else [body]:
        try:
            snap = parse_snapshot(data)
        except SnapshotError as exc:
            raise CurveError(f"{url}: {exc}") from None
        hist = snap.reuse_distance
        if hist is None:
            continue
        out.append(
            Curve(
                title=f"{snap.engine.kind}/{snap.engine.dp_rank} {snap.engine.model}",
                bounds=[float(b) for b in hist.bounds_tokens],
                cumulative=[float(c) for c in hist.cumulative_tokens],
                total=float(hist.query_tokens),
                marks={mark: float(bound) for bound, mark in reuse_marks(snap)},
                sampling_rate=hist.sampling_rate,
                bytes_per_token=_bytes_per_token(snap.pool("full")),
            )
        )
    if not out:
        raise CurveError(f"{url} publishes no reuse distances (a bridge, or an older shim)")
    return out


def _bytes_per_token(pool: Pool | None) -> float | None:
    return None if pool is None or pool.bytes_per_slot is None else float(pool.bytes_per_slot)


def curve_from_prometheus(base: str, engine: str, window: str, timeout: float = 30.0) -> Curve:
    """One engine name's curve over ``window``, summed over its replicas and DP ranks."""
    sel = f'engine="{engine}"'
    h = "kvcache_prefix_reuse_distance_tokens"

    def query(expr: str) -> list[dict[str, object]]:
        try:
            r = httpx.get(
                f"{base.rstrip('/')}/api/v1/query", params={"query": expr}, timeout=timeout
            )
            r.raise_for_status()
            result: list[dict[str, object]] = r.json()["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise CurveError(f"cannot query {base}: {exc}") from None
        return result

    def value(series: dict[str, object]) -> float:
        return float(series["value"][1])  # type: ignore[index]

    def label(series: dict[str, object], name: str) -> str:
        return str(series["metric"][name])  # type: ignore[index]

    buckets = query(f'sum by (le) (increase({h}_bucket{{{sel}, le!="+Inf"}}[{window}]))')
    if not buckets:
        raise CurveError(f"no {h} series for {sel} in the last {window}")
    totals = query(f"sum(increase({h}_count{{{sel}}}[{window}]))")
    points = sorted((float(label(b, "le")), value(b)) for b in buckets)
    marks = {
        label(m, "mark"): float(label(m, "bound"))
        for m in query(f"max by (bound, mark) (kvcache_prefix_reuse_bucket_info{{{sel}}})")
    }
    full = f'{sel}, pool="full"'
    per_token = query(
        f"max(kvcache_pool_bytes{{{full}}} / kvcache_pool_capacity_slots{{{full}}} > 0)"
    )
    return Curve(
        title=f"{engine} (Prometheus, last {window})",
        bounds=[b for b, _ in points],
        cumulative=[c for _, c in points],
        total=value(totals[0]) if totals else 0.0,
        marks=marks,
        bytes_per_token=value(per_token[0]) if per_token else None,
    )

"""``kvcache-exporter reuse-curve``: the what-if hit-ratio curve of one engine, as a table.

From a shim (its ``/v1/kv/stats``: since the engine started) or from Prometheus (the
exporter's histogram over a window, summed over the replicas and DP ranks that match).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from kvstats.snapshot import SnapshotError, parse_snapshot, reuse_marks, working_set

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
    return lines


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
            )
        )
    if not out:
        raise CurveError(f"{url} publishes no reuse distances (a bridge, or an older shim)")
    return out


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
    return Curve(
        title=f"{engine} (Prometheus, last {window})",
        bounds=[b for b, _ in points],
        cumulative=[c for _, c in points],
        total=value(totals[0]) if totals else 0.0,
        marks=marks,
    )

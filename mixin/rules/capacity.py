"""Capacity: the pool filling, its forecast, headroom and preemptions."""

from __future__ import annotations

from ..config import MixinConfig
from .common import WHO, Rule, alert


def alerts(c: MixinConfig) -> list[Rule]:
    full = f'pool="{c.pool}"'
    return [
        # Page: the pool keeps filling with pinned requests and the engine is already
        # preempting. Where the shim publishes the per-step peak, that is the usage (a burst
        # between two scrapes counts); elsewhere the usage sampled at the scrape.
        # max_over_time: preemption frees its victim's blocks, so usage oscillates
        # below and above the line while the engine is out of KV; a plain threshold never holds.
        alert(
            c,
            "KVCacheExhausted",
            "max_over_time(\n  (\n"
            f'    kvcache_pool_peak_slots{{state="used", {full}}}\n'
            f"      / ignoring (state)\n    kvcache_pool_capacity_slots{{{full}}}\n"
            f"  or\n    kvcache_active_usage_ratio{{{full}}}\n  )[5m:]\n) > {c.exhausted_usage}\n"
            "  and ignoring (pool)\nengine:kvcache_preemptions:rate5m > 0\n",
            c.exhausted_for,
            "critical",
            "KV cache exhausted and requests are being preempted.",
            f"{WHO} has had up to {{{{ $value | humanizePercentage }}}} of its KV pool pinned by"
            " running requests and is preempting them: latency is degrading now.",
        ),
        # Page before it happens: at the recent growth, used reaches capacity within the horizon.
        alert(
            c,
            "KVCacheExhaustionForecast",
            "(\n"
            f'  predict_linear(kvcache_pool_slots{{state="used", {full}}}[{c.forecast_lookback}],'
            f" {c.forecast_horizon_seconds})\n"
            f"    > ignoring (state) min_over_time(kvcache_pool_capacity_slots{{{full}}}"
            f"[{c.forecast_lookback}])\n)\n"
            "  and ignoring (state)\n"
            f"(kvcache_active_usage_ratio{{{full}}} > {c.forecast_min_usage})\n",
            c.forecast_for,
            "critical",
            f"KV cache forecast to run out within {c.forecast_horizon_seconds // 60} minutes.",
            f"{WHO}: at the growth of the last {c.forecast_lookback}, pinned KV tokens reach"
            f" capacity within {c.forecast_horizon_seconds // 60} minutes (forecast"
            " {{ $value | humanize }} tokens).",
        ),
        alert(
            c,
            "KVCacheActiveUsageHigh",
            f"kvcache_active_usage_ratio{{{full}}} > {c.active_usage_high}",
            c.active_usage_high_for,
            "warning",
            f"KV cache active usage above {c.active_usage_high:.0%} for {c.active_usage_high_for}.",
            f"{WHO} pool {{{{ $labels.pool }}}}: {{{{ $value | humanizePercentage }}}} pinned by"
            " running requests.",
        ),
        alert(
            c,
            "KVCacheNoHeadroom",
            "kvcache_concurrency_headroom == 0\n"
            '  and ignoring (state)\nkvcache_requests{state="waiting"} > 0\n',
            c.no_headroom_for,
            "warning",
            "No room for another max-length request while requests wait.",
            f"{WHO} cannot fit one more max_model_len request, even evicting its prefix cache,"
            " and has requests waiting.",
        ),
        alert(
            c,
            "KVCachePreemptions",
            f"engine:kvcache_preemptions:rate5m > {c.preemptions_per_second}",
            c.preemptions_for,
            "warning",
            "Requests are being preempted for lack of KV cache.",
            f'{WHO} preempts {{{{ printf "%.2f" $value }}}} requests/s (5 min average).',
        ),
    ]

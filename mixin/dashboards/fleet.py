"""KV cache — fleet overview: every engine at once, top-k and per-model rows."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    Row,
)

from ..config import MixinConfig
from .panels import (
    Scope,
    base,
    query,
    stat,
    table,
    table_query,
    thresholds,
    timeseries,
    usage_thresholds,
    variables,
)


def fleet_overview(c: MixinConfig) -> Dashboard:
    scope = Scope.of(c)
    sel, legend, k = scope.engine, scope.legend, c.fleet_top_k
    full = f'pool="{c.pool}"'
    model_sel = f'{scope.fleet}, model=~"$model"'
    d = variables(
        base(
            "kvcache-fleet",
            "KV cache — fleet overview",
            "KV cache of every LLM engine: usage, capacity, headroom, prefix reuse and pressure."
            f" Time series show the {k} engines most at risk; tables rank them all.",
        ),
        c,
        True,
    )
    d = d.with_row(Row("Health"))
    d = d.with_panel(
        stat(
            "Engines",
            "Engines (DP ranks) reporting, per the recording rule model:kvcache_engines:count.",
            "none",
            query(f"sum(model:kvcache_engines:count{{{model_sel}}})", "engines"),
            thresholds((None, "blue")),
            width=4,
        )
    )
    d = d.with_panel(
        stat(
            "Targets down",
            "Engines the exporter cannot read (kvcache_exporter_target_up = 0). Anything above 0: their KV cache "
            "is unwatched. KVCacheTargetDown names them; the engine detail's poll errors say why.",
            "none",
            query(f"count(kvcache_exporter_target_up{{{scope.target}}} == 0) or vector(0)", "down"),
            thresholds((None, "green"), (1, "red")),
            width=5,
        )
    )
    d = d.with_panel(
        stat(
            "Lowest headroom",
            "The fewest additional max_model_len requests any selected engine can still admit, counting its "
            "evictable prefix cache as free. 0 means long requests queue; see KVCacheNoHeadroom.",
            "none",
            query(f"min(kvcache_concurrency_headroom{{{sel}}})", "headroom"),
            thresholds((None, "red"), (1, "orange"), (4, "green")),
            width=5,
        )
    )
    d = d.with_panel(
        stat(
            "Highest active usage",
            f"The largest share of a KV pool pinned by running requests, over the selected engines. Above "
            f"{c.active_usage_high:.0%} sustained is a capacity warning; with preemptions it pages (KVCacheExhausted).",
            "percentunit",
            query(f"max(kvcache_active_usage_ratio{{{sel}, {full}}})", "active"),
            usage_thresholds(c),
            width=5,
        )
    )
    d = d.with_panel(
        stat(
            "Preemptions / s",
            "Requests preempted for lack of KV, per second, summed over the selected engines (5 minute rate). "
            f"Sustained > {c.preemptions_per_second}/s on one engine is KVCachePreemptions.",
            "reqps",
            query(f"sum(engine:kvcache_preemptions:rate5m{{{sel}}})", "preemptions"),
            thresholds(
                (None, "green"),
                (c.preemptions_per_second / 5, "orange"),
                (c.preemptions_per_second, "red"),
            ),
            width=5,
        )
    )
    d = d.with_panel(
        table(
            f"Engines most at risk (top {k * 2} by active usage)",
            "Every selected engine ranked by active usage of its full-attention pool, with the replica that "
            "runs it. Click through to the engine detail dashboard with the same variables.",
            "percentunit",
            table_query(f"topk({k * 2}, kvcache_active_usage_ratio{{{sel}, {full}}})"),
            usage_thresholds(c),
        )
    )

    d = d.with_row(Row("Usage"))
    d = d.with_panel(
        timeseries(
            "Usage by model",
            "Per deployment and model, summed over its engines (ratios of sums, never averages of ratios), from "
            "recording rules. Physical counts only engines that can see evictable tokens.",
            "percentunit",
            query(
                f"model:kvcache_active_usage:ratio{{{model_sel}}}",
                "active {{model}} " + "/".join(f"{{{{{label}}}}}" for label in c.fleet_labels),
            ),
            query(
                f"model:kvcache_physical_usage:ratio{{{model_sel}}}",
                "physical {{model}} " + "/".join(f"{{{{{label}}}}}" for label in c.fleet_labels),
            ),
            limits=usage_thresholds(c),
        )
    )
    d = d.with_panel(
        timeseries(
            f"Active usage, top {k} engines",
            "Active = pinned by running requests / capacity. Near 100 % the engine preempts. Physical usage "
            "(active + evictable prefix cache) near 100 % is normal with prefix caching: see the engine detail.",
            "percentunit",
            query(f"topk({k}, kvcache_active_usage_ratio{{{sel}, {full}}})", legend),
            limits=usage_thresholds(c),
        )
    )
    d = d.with_panel(
        timeseries(
            f"Exhaustion ETA, {k} soonest",
            "Time until pinned tokens reach capacity at the recent growth rate, from the exporter's forecast; "
            "infinite (∞) for engines whose usage is not growing. Under "
            f"{c.forecast_horizon_seconds // 60} minutes with high usage pages (KVCacheExhaustionForecast).",
            "s",
            query(f"bottomk({k}, engine:kvcache_exhaustion_eta_seconds:or_inf{{{sel}}})", legend),
            limits=thresholds(
                (None, "red"),
                (c.forecast_horizon_seconds, "orange"),
                (4 * c.forecast_horizon_seconds, "green"),
            ),
        )
    )
    d = d.with_panel(
        timeseries(
            f"Evictable fraction, top {k}",
            "Share of each pool holding cached prefixes that no request uses: reclaimable on demand. High is "
            "good for reuse; a fast drop together with a falling hit ratio means thrash (KVCacheEvictionThrash).",
            "percentunit",
            query(f"topk({k}, kvcache_evictable_ratio{{{sel}}})", legend + " {{pool}}"),
        )
    )

    d = d.with_row(Row("Capacity"))
    d = d.with_panel(
        timeseries(
            "Max concurrency vs running, by model",
            "Group-aware number of max_model_len requests the pools hold (vLLM's formula: hybrid models are not "
            "blocks x block_size / max_model_len) against requests running now, summed per deployment and model. "
            "Running well above max concurrency is fine for short requests; long ones will preempt.",
            "none",
            query(f"model:kvcache_max_concurrency:sum{{{model_sel}}}", "max {{model}}"),
            query(f"model:kvcache_requests_running:sum{{{model_sel}}}", "running {{model}}"),
        )
    )
    d = d.with_panel(
        timeseries(
            f"Headroom, {k} lowest",
            "More max_model_len requests that fit now in available + evictable blocks, group-aware. At 0 with "
            "requests waiting, long requests queue (KVCacheNoHeadroom).",
            "none",
            query(f"bottomk({k}, kvcache_concurrency_headroom{{{sel}}})", legend),
            limits=thresholds((None, "red"), (1, "green")),
        )
    )

    d = d.with_row(Row("Reuse and pressure"))
    d = d.with_panel(
        timeseries(
            f"Prefix hit ratio, {k} lowest",
            "Share of prompt tokens served from cache over 5 minutes (all tiers), lowest first. A sharp drop "
            "raises time-to-first-token (KVCachePrefixHitRatioCollapse); the engine detail splits it by tier.",
            "percentunit",
            query(f"bottomk({k}, engine:kvcache_prefix_hit_ratio:rate5m{{{sel}}})", legend),
        )
    )
    d = d.with_panel(
        timeseries(
            f"Preemption and eviction rates, top {k}",
            "Preemptions/s (requests recomputed for lack of KV) and evicted tokens/s (prefix cache reclaimed). "
            "Evictions alone are normal; with a falling hit ratio they are thrash; preemptions mean too little KV.",
            "short",
            query(
                f"topk({k}, engine:kvcache_preemptions:rate5m{{{sel}}})",
                "preemptions/s " + legend,
            ),
            query(
                f"topk({k}, engine:kvcache_evicted_tokens:rate5m{{{sel}}})",
                "evicted tok/s " + legend,
            ),
        )
    )
    return d

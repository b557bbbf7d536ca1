"""Grafana dashboards as code (Grafana's foundation SDK). Regenerate with:

    .venv/bin/python dashboards/build.py

The JSON next to this file is generated and committed; a test fails if it is stale. Every
panel says what it shows and what to do when it looks bad; queries use a ``datasource``
variable, so the dashboards import into any Grafana with a Prometheus data source.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

HERE = Path(__file__).resolve().parent
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'model=~"$model", engine=~"$engine"'
ENGINE_LEGEND = "{{engine}}/{{dp_rank}} {{model}}"


def query(expr: str, legend: str = ENGINE_LEGEND) -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).datasource(DS)


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(v, c) for v, c in steps])
    )


USAGE_THRESHOLDS = thresholds((None, "green"), (0.9, "orange"), (0.95, "red"))


def timeseries(
    title: str,
    description: str,
    unit: str,
    *queries: Dataquery,
    width: int = 12,
    stacked: bool = False,
    limits: ThresholdsConfig | None = None,
) -> Timeseries:
    panel = (
        Timeseries()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DS)
        .span(width)
        .height(8)
        .line_width(1)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
        )
    )
    if stacked:
        panel = panel.stacking(
            common_builders.StackingConfig().mode(common.StackingMode.NORMAL)
        ).fill_opacity(60)
    if limits is not None:
        panel = panel.thresholds(limits).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.DASHED)
        )
    for i, q in enumerate(queries):
        panel = panel.with_target(q.ref_id(chr(ord("A") + i)))
    return panel


def stat(
    title: str, description: str, unit: str, q: Dataquery, limits: ThresholdsConfig, width: int = 6
) -> Stat:
    return (
        Stat()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DS)
        .span(width)
        .height(5)
        .thresholds(limits)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .with_target(q.ref_id("A"))
    )


def variables(dashboard: Dashboard, engine_multi: bool) -> Dashboard:
    return (
        dashboard.with_variable(
            DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            QueryVariable("model")
            .label("Model")
            .datasource(DS)
            .query("label_values(kvcache_engine_info, model)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_variable(
            QueryVariable("engine")
            .label("Engine")
            .datasource(DS)
            .query("label_values(kvcache_exporter_target_up, engine)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(engine_multi)
            .include_all(engine_multi)
            .all_value(".*")
        )
    )


def base(uid: str, title: str, description: str) -> Dashboard:
    return (
        Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["kvcache", "llm-serving"])
        .editable()
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
    )


def fleet_overview() -> Dashboard:
    d = variables(
        base(
            "kvcache-fleet",
            "KV cache — fleet overview",
            "KV cache of every LLM engine: usage, capacity, headroom, prefix reuse and pressure.",
        ),
        True,
    )
    d = d.with_row(Row("Health"))
    d = d.with_panel(
        stat(
            "Targets down",
            "Engines the exporter cannot read (kvcache_exporter_target_up = 0). Anything above 0: their KV cache "
            "is unwatched. See the engine detail dashboard's poll errors, and the KVCacheTargetDown runbook.",
            "none",
            query('sum(1 - kvcache_exporter_target_up{engine=~"$engine"})', "down"),
            thresholds((None, "green"), (1, "red")),
        )
    )
    d = d.with_panel(
        stat(
            "Lowest headroom",
            "The fewest additional max_model_len requests any selected engine can still admit, counting its "
            "evictable prefix cache as free. 0 means long requests queue; see KVCacheNoHeadroom.",
            "none",
            query(f"min(kvcache_concurrency_headroom{{{SEL}}})", "headroom"),
            thresholds((None, "red"), (1, "orange"), (4, "green")),
        )
    )
    d = d.with_panel(
        stat(
            "Highest active usage",
            "The largest share of a KV pool pinned by running requests, over the selected engines. Above 90 % "
            "sustained is a capacity warning; with preemptions it pages (KVCacheExhausted).",
            "percentunit",
            query(f'max(kvcache_active_usage_ratio{{{SEL}, pool="full"}})', "active"),
            USAGE_THRESHOLDS,
        )
    )
    d = d.with_panel(
        stat(
            "Preemptions / s",
            "Requests preempted for lack of KV, per second, summed over the selected engines (5 minute rate). "
            "Sustained > 0.05/s is KVCachePreemptions.",
            "reqps",
            query(f"sum(engine:kvcache_preemptions:rate5m{{{SEL}}})", "preemptions"),
            thresholds((None, "green"), (0.01, "orange"), (0.05, "red")),
        )
    )

    d = d.with_row(Row("Usage"))
    d = d.with_panel(
        timeseries(
            "Active vs physical usage",
            "Active = pinned by running requests / capacity; physical = active + evictable prefix cache. Physical "
            "near 100 % is normal with prefix caching (a warm cache). Watch active: near 100 % the engine preempts. "
            "vLLM targets read through its /metrics bridge have no physical line (evictable is unknown there).",
            "percentunit",
            query(f'kvcache_active_usage_ratio{{{SEL}, pool="full"}}', "active " + ENGINE_LEGEND),
            query(
                f'kvcache_physical_usage_ratio{{{SEL}, pool="full"}}', "physical " + ENGINE_LEGEND
            ),
            limits=USAGE_THRESHOLDS,
        )
    )
    d = d.with_panel(
        timeseries(
            "Evictable fraction",
            "Share of each pool holding cached prefixes that no request uses: reclaimable on demand. High is "
            "good for reuse; a fast drop together with a falling hit ratio means thrash (KVCacheEvictionThrash).",
            "percentunit",
            query(f"kvcache_evictable_ratio{{{SEL}}}", ENGINE_LEGEND + " {{pool}}"),
        )
    )
    d = d.with_panel(
        timeseries(
            "Usage by model",
            "Per model, summed over its engines (ratios of sums, never averages of ratios). Physical counts only "
            "engines that can see evictable tokens.",
            "percentunit",
            query('model:kvcache_active_usage:ratio{model=~"$model"}', "active {{model}}"),
            query('model:kvcache_physical_usage:ratio{model=~"$model"}', "physical {{model}}"),
            limits=USAGE_THRESHOLDS,
        )
    )
    d = d.with_panel(
        timeseries(
            "Exhaustion ETA",
            "Time until pinned tokens reach capacity at the recent growth rate, from the exporter's forecast. "
            "Infinite (∞) when usage is not growing. Under 30 minutes with high usage pages (KVCacheExhaustionForecast).",
            "s",
            query(
                f"kvcache_exhaustion_eta_seconds{{{SEL}}} or (kvcache_max_model_len_tokens{{{SEL}}} * 0 + Inf)"
            ),
            limits=thresholds((None, "red"), (1800, "orange"), (7200, "green")),
        )
    )

    d = d.with_row(Row("Capacity"))
    d = d.with_panel(
        timeseries(
            "Max concurrency vs running",
            "Group-aware number of max_model_len requests the pools hold (vLLM's formula: hybrid models are not "
            "blocks x block_size / max_model_len) against requests running now. Running well above max "
            "concurrency is fine for short requests; long ones will preempt.",
            "none",
            query(f"kvcache_max_concurrency{{{SEL}}}", "max " + ENGINE_LEGEND),
            query(f'kvcache_requests{{{SEL}, state="running"}}', "running " + ENGINE_LEGEND),
        )
    )
    d = d.with_panel(
        timeseries(
            "Headroom",
            "More max_model_len requests that fit now in available + evictable blocks, group-aware. At 0 with "
            "requests waiting, long requests queue (KVCacheNoHeadroom).",
            "none",
            query(f"kvcache_concurrency_headroom{{{SEL}}}"),
            limits=thresholds((None, "red"), (1, "green")),
        )
    )

    d = d.with_row(Row("Reuse and pressure"))
    d = d.with_panel(
        timeseries(
            "Prefix hit ratio by tier",
            "Share of prompt tokens served from cache over 5 minutes, by tier: device (GPU), host (CPU DRAM), "
            "storage. A sharp drop raises time-to-first-token (KVCachePrefixHitRatioCollapse).",
            "percentunit",
            query(
                f"engine_tier:kvcache_prefix_hit_ratio:rate5m{{{SEL}}}", ENGINE_LEGEND + " {{tier}}"
            ),
            stacked=True,
        )
    )
    d = d.with_panel(
        timeseries(
            "Preemption and eviction rates",
            "Preemptions/s (requests recomputed for lack of KV) and evicted tokens/s (prefix cache reclaimed). "
            "Evictions alone are normal; with a falling hit ratio they are thrash; preemptions mean too little KV.",
            "short",
            query(f"engine:kvcache_preemptions:rate5m{{{SEL}}}", "preemptions/s " + ENGINE_LEGEND),
            query(
                f"engine:kvcache_evicted_tokens:rate5m{{{SEL}}}", "evicted tok/s " + ENGINE_LEGEND
            ),
        )
    )
    return d


def engine_detail() -> Dashboard:
    d = variables(
        base(
            "kvcache-engine",
            "KV cache — engine detail",
            "One engine's KV pools, requests, tiers, GPU memory and the exporter's view of it.",
        ),
        False,
    )
    d = d.with_row(Row("Pools"))
    d = d.with_panel(
        timeseries(
            "Pool breakdown",
            "Token slots (blocks x block size) of each pool by state, stacked: used (pinned by running requests), evictable (cached, "
            "unreferenced), available (empty). They sum to capacity. A pool of mostly evictable slots is a warm "
            "cache; a pool of used slots is one burst away from preemption. Hybrid models show one stack per pool.",
            "short",
            query(f"kvcache_pool_slots{{{SEL}}}", "{{pool}} {{state}}"),
            width=24,
            stacked=True,
        )
    )
    d = d.with_panel(
        timeseries(
            "Active vs physical usage by pool",
            "Active = used / capacity; physical = (used + evictable) / capacity, per pool. Act on active.",
            "percentunit",
            query(f"kvcache_active_usage_ratio{{{SEL}}}", "active {{pool}}"),
            query(f"kvcache_physical_usage_ratio{{{SEL}}}", "physical {{pool}}"),
            limits=USAGE_THRESHOLDS,
        )
    )
    d = d.with_panel(
        stat(
            "Token capacity",
            "Tokens the KV cache holds, as the engine states it (vLLM's kv_cache_size_tokens: max concurrency x "
            "max_model_len). On hybrid models this is less than the pool's slots, since a token takes a slot in "
            "every KV group. If it dropped after a restart, memory settings changed: check max concurrency.",
            "short",
            query(f"kvcache_capacity_tokens{{{SEL}}}", "tokens"),
            thresholds((None, "blue")),
            width=24,
        )
    )
    d = d.with_panel(
        timeseries(
            "Requests",
            "Requests running (holding KV) and waiting for admission. Waiting that grows while usage is high "
            "means the engine is KV-bound: see headroom.",
            "none",
            query(f"kvcache_requests{{{SEL}}}", "{{state}}"),
        )
    )
    d = d.with_panel(
        timeseries(
            "Max concurrency and headroom",
            "Group-aware max_model_len requests the pools hold, and how many more fit now. Headroom 0 with "
            "requests waiting: long requests queue.",
            "none",
            query(f"kvcache_max_concurrency{{{SEL}}}", "max concurrency"),
            query(f"kvcache_concurrency_headroom{{{SEL}}}", "headroom"),
        )
    )
    d = d.with_panel(
        timeseries(
            "Preemptions and evictions",
            "Preemptions/s and evicted tokens/s over 5 minutes. Preemptions mean too little KV for the batch; "
            "evictions with a falling hit ratio mean the working set no longer fits.",
            "short",
            query(f"engine:kvcache_preemptions:rate5m{{{SEL}}}", "preemptions/s"),
            query(f"engine:kvcache_evicted_tokens:rate5m{{{SEL}}}", "evicted tok/s"),
        )
    )

    d = d.with_row(Row("Prefix cache and tiers"))
    d = d.with_panel(
        timeseries(
            "Prefix hits by tier",
            "Prompt tokens/s served from the device cache, host DRAM and storage, against tokens looked up. A "
            "growing host or storage share means the device pool is too small for the working set.",
            "short",
            query(
                f"sum by (tier) (rate(kvcache_prefix_hit_tokens_total{{{SEL}}}[$__rate_interval]))",
                "hit {{tier}}",
            ),
            query(
                f"sum(rate(kvcache_prefix_query_tokens_total{{{SEL}}}[$__rate_interval]))",
                "queried",
            ),
            stacked=False,
        )
    )
    d = d.with_panel(
        timeseries(
            "Host and storage tier usage",
            "Share of each lower tier (HiCache L2 host DRAM, L3 storage) in use. A full host tier drops backups; "
            "grow it if host hits are valuable.",
            "percentunit",
            query(
                f"kvcache_tier_used_tokens{{{SEL}}} / kvcache_tier_capacity_tokens{{{SEL}}}",
                "{{tier}}",
            ),
        )
    )

    d = d.with_row(Row("GPU memory"))
    d = d.with_panel(
        timeseries(
            "GPU memory: KV pool vs the rest",
            "On the engine's GPUs (joined by UUID): bytes of the KV pools, everything else in use (weights, "
            "activations, CUDA graphs, other processes) and free memory, from NVML. KV is pre-allocated, so "
            "growth in 'other' is what runs a GPU out of memory (KVCacheGPUMemoryNearFull).",
            "bytes",
            query(f"sum(kvcache_pool_bytes{{{SEL}}})", "KV pools"),
            query(
                f"kvcache_gpu_non_kv_memory_bytes * on (gpu, uuid) group_left () "
                f"(max by (gpu, uuid) (kvcache_gpu_engine_info{{{SEL}}}))",
                "other in use, GPU {{gpu}}",
            ),
            query(
                f'kvcache_gpu_memory_bytes{{state="free"}} * on (gpu, uuid) group_left () '
                f"(max by (gpu, uuid) (kvcache_gpu_engine_info{{{SEL}}}))",
                "free, GPU {{gpu}}",
            ),
            stacked=True,
        )
    )

    d = d.with_row(Row("Exporter"))
    d = d.with_panel(
        timeseries(
            "Exporter: poll duration (p99)",
            "99th percentile time to poll and parse this engine's stats. Near the target timeout, polls start "
            "failing with reason=timeout.",
            "s",
            query(
                "histogram_quantile(0.99, sum by (le, engine) "
                '(rate(kvcache_exporter_poll_duration_seconds_bucket{engine=~"$engine"}[$__rate_interval])))',
                "{{engine}}",
            ),
            width=8,
        )
    )
    d = d.with_panel(
        timeseries(
            "Exporter: poll errors by reason",
            "Failed polls/s by reason: connect, timeout, http_status, too_large, invalid_body, invalid_snapshot, "
            "too_many_series, internal. Any sustained rate makes the engine's series disappear (KVCacheTargetDown).",
            "short",
            query(
                'sum by (reason) (rate(kvcache_exporter_poll_errors_total{engine=~"$engine"}'
                "[$__rate_interval]))",
                "{{reason}}",
            ),
            width=8,
        )
    )
    d = d.with_panel(
        timeseries(
            "Snapshot age",
            "Seconds since the engine published the data last polled. Engines publish every iteration: more "
            "than a minute means a stuck scheduler loop (KVCacheStaleData).",
            "s",
            query(f"time() - kvcache_snapshot_timestamp_seconds{{{SEL}}}"),
            width=8,
            limits=thresholds((None, "green"), (60, "red")),
        )
    )
    return d


DASHBOARDS = {"kvcache-fleet.json": fleet_overview, "kvcache-engine.json": engine_detail}


def render(build: object) -> str:
    dashboard = build().build()  # type: ignore[operator]
    return (
        json.dumps(
            json.loads(JSONEncoder(sort_keys=True, indent=2).encode(dashboard)),
            indent=2,
            sort_keys=True,
            ensure_ascii=False,
        )
        + "\n"
    )


def main() -> int:
    for name, build in DASHBOARDS.items():
        (HERE / name).write_text(render(build))
        print(f"wrote dashboards/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

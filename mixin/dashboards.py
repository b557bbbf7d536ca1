"""Grafana dashboards as code (Grafana's foundation SDK), from the mixin's configuration.

``python -m mixin build`` writes ``dashboards/*.json`` (committed; a test fails if stale). Every
panel says what it shows and what to do when it looks bad; queries use a ``datasource``
variable, so the dashboards import into any Grafana with a Prometheus data source. Variables
for the deployment (cluster, namespace), the replica, model, engine and DP rank narrow every
query; legends name the replica, so two replicas of one engine never look alike. Fleet panels
show the top-k engines and fleet rows come from recording rules, so they stay fast at 1,000
engines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

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
from grafana_foundation_sdk.builders.table import Panel as Table
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, prometheus
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

from .config import MixinConfig

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
# The Grafana release the compose stack pins, and the dashboard schema version of its published
# schema (@grafana/schema of that version; CI checks both dashboards against it).
GRAFANA_VERSION = "11.3.1"
SCHEMA_VERSION = 39


@dataclass(frozen=True)
class Scope:
    """Selectors and legends for a config: ``engine`` for per-engine series, ``target`` for
    the exporter's per-target series (no model or DP rank), ``fleet`` for fleet-level rules."""

    fleet: str
    target: str
    engine: str
    legend: str
    target_legend: str

    @classmethod
    def of(cls, c: MixinConfig) -> Scope:
        fleet = ", ".join(f'{label}=~"${label}"' for label in c.fleet_labels)
        target = f'{fleet}, {c.replica_label}=~"${c.replica_label}", engine=~"$engine"'
        engine = f'{target}, model=~"$model", dp_rank=~"$dp_rank"'
        where = "/".join(f"{{{{{label}}}}}" for label in (*c.fleet_labels, c.replica_label))
        return cls(
            fleet,
            target,
            engine,
            f"{where} {{{{engine}}}}/{{{{dp_rank}}}}",
            f"{where} {{{{engine}}}}",
        )


def query(expr: str, legend: str) -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).datasource(DS)


def table_query(expr: str) -> Dataquery:
    return (
        Dataquery()
        .expr(expr)
        .instant()
        .format(prometheus.PromQueryFormat.TABLE)
        .legend_format("__auto")
        .datasource(DS)
    )


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(v, c) for v, c in steps])
    )


def usage_thresholds(c: MixinConfig) -> ThresholdsConfig:
    return thresholds((None, "green"), (c.active_usage_high, "orange"), (c.exhausted_usage, "red"))


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
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
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
        .show_percent_change(False)
        .percent_change_color_mode(common.PercentChangeColorMode.STANDARD)
        .wide_layout(True)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .with_target(q.ref_id("A"))
    )


def table(title: str, description: str, unit: str, q: Dataquery, limits: ThresholdsConfig) -> Table:
    return (
        Table()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DS)
        .span(24)
        .height(8)
        .thresholds(limits)
        .show_header(True)
        .frame_index(0)
        .cell_height(common.TableCellHeight.SM)
        .with_target(q.ref_id("A"))
    )


def variables(dashboard: Dashboard, c: MixinConfig, multi: bool) -> Dashboard:
    """Data source, then each fleet label, the replica, engine, model and DP rank: each one
    narrowed by the ones before it."""
    dashboard = dashboard.with_variable(
        DatasourceVariable("datasource").label("Data source").type("prometheus")
    )
    chosen: list[str] = []
    steps = [
        *(
            (label, label.capitalize(), "kvcache_exporter_target_up", True)
            for label in c.fleet_labels
        ),
        (c.replica_label, "Replica", "kvcache_exporter_target_up", multi),
        ("engine", "Engine", "kvcache_exporter_target_up", multi),
        ("model", "Model", "kvcache_engine_info", True),
        ("dp_rank", "DP rank", "kvcache_engine_info", True),
    ]
    for name, label, metric, many in steps:
        selector = ", ".join(chosen)
        dashboard = dashboard.with_variable(
            QueryVariable(name)
            .label(label)
            .datasource(DS)
            .query(f"label_values({metric}{{{selector}}}, {name})")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(many)
            .include_all(True)
            .all_value(".*")
        )
        chosen.append(f'{name}=~"${name}"')
    return dashboard


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


def engine_detail(c: MixinConfig) -> Dashboard:
    scope = Scope.of(c)
    sel, tsel = scope.engine, scope.target
    d = variables(
        base(
            "kvcache-engine",
            "KV cache — engine detail",
            "One engine's KV pools, requests, tiers, GPU memory and the exporter's view of it.",
        ),
        c,
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
            query(f"kvcache_pool_slots{{{sel}}}", "{{pool}} {{state}}"),
            width=24,
            stacked=True,
        )
    )
    d = d.with_panel(
        timeseries(
            "Active vs physical usage by pool",
            "Active = used / capacity; physical = (used + evictable) / capacity, per pool. Act on active.",
            "percentunit",
            query(f"kvcache_active_usage_ratio{{{sel}}}", "active {{pool}}"),
            query(f"kvcache_physical_usage_ratio{{{sel}}}", "physical {{pool}}"),
            limits=usage_thresholds(c),
        )
    )
    d = d.with_panel(
        timeseries(
            "Peak usage between polls by pool",
            "The highest used and physical (used + evictable) share of each pool at any scheduler step since the "
            "exporter's previous poll (vLLM shim): a burst that filled the pool and drained before a scrape shows "
            "here, not in the current usage. A peak near 1 with a low current usage is a pool that runs out in bursts.",
            "percentunit",
            query(
                f"kvcache_pool_peak_slots{{{sel}}}\n  / ignoring (state) group_left\nkvcache_pool_capacity_slots{{{sel}}}",
                "peak {{state}} {{pool}}",
            ),
            limits=usage_thresholds(c),
        )
    )
    d = d.with_panel(
        stat(
            "Token capacity",
            "Tokens the KV cache holds, as the engine states it (vLLM's kv_cache_size_tokens: max concurrency x "
            "max_model_len). On hybrid models this is less than the pool's slots, since a token takes a slot in "
            "every KV group. If it dropped after a restart, memory settings changed: check max concurrency.",
            "short",
            query(f"kvcache_capacity_tokens{{{sel}}}", "tokens"),
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
            query(f"kvcache_requests{{{sel}}}", "{{state}}"),
        )
    )
    d = d.with_panel(
        timeseries(
            "Max concurrency and headroom",
            "Group-aware max_model_len requests the pools hold, and how many more fit now. Headroom 0 with "
            "requests waiting: long requests queue.",
            "none",
            query(f"kvcache_max_concurrency{{{sel}}}", "max concurrency"),
            query(f"kvcache_concurrency_headroom{{{sel}}}", "headroom"),
        )
    )
    d = d.with_panel(
        timeseries(
            "Preemptions and evictions",
            "Preemptions/s and evicted tokens/s over 5 minutes. Preemptions mean too little KV for the batch; "
            "evictions with a falling hit ratio mean the working set no longer fits.",
            "short",
            query(f"engine:kvcache_preemptions:rate5m{{{sel}}}", "preemptions/s"),
            query(f"engine:kvcache_evicted_tokens:rate5m{{{sel}}}", "evicted tok/s"),
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
                f"sum by (tier) (rate(kvcache_prefix_hit_tokens_total{{{sel}}}[$__rate_interval]))",
                "hit {{tier}}",
            ),
            query(
                f"sum(rate(kvcache_prefix_query_tokens_total{{{sel}}}[$__rate_interval]))",
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
                f"kvcache_tier_used_tokens{{{sel}}} / kvcache_tier_capacity_tokens{{{sel}}}",
                "{{tier}}",
            ),
        )
    )

    d = d.with_panel(
        timeseries(
            "Prefix-resident slots by tier",
            "Slots holding prefix-cache blocks (in use or evictable) on each tier: from the vLLM shim, or from the "
            "engine's KV events while the stream is whole (vLLM and SGLang without a plug-in; host, storage and "
            "external are offloading connectors and HiCache tiers). Absent while a stream is not whole.",
            "short",
            query(f"kvcache_prefix_resident_slots{{{sel}}}", "{{tier}}"),
            stacked=True,
        )
    )
    d = d.with_panel(
        timeseries(
            "Evictable slots: exact, or bounds",
            "The exact evictable count where the engine or the shim knows it; for vLLM without the shim, the "
            "lower and upper bounds its KV events and usage gauge prove (never the exact count).",
            "short",
            query(
                f"kvcache_pool_evictable_slots_bound{{{sel}}}\n  or\n"
                f'label_replace(kvcache_pool_slots{{state="evictable", {sel}}}, "bound", "exact", "", "")',
                "{{bound}} {{pool}}",
            ),
        )
    )

    d = what_if_panels(d, c, sel)

    d = d.with_row(Row("GPU memory"))
    d = d.with_panel(
        timeseries(
            "GPU memory: KV pool vs the rest",
            "On the engine's GPUs (joined by UUID): bytes of the KV pools, everything else in use (weights, "
            "activations, CUDA graphs, other processes) and free memory, from NVML. KV is pre-allocated, so "
            "growth in 'other' is what runs a GPU out of memory (KVCacheGPUMemoryNearFull).",
            "bytes",
            query(f"sum(kvcache_pool_bytes{{{sel}}})", "KV pools"),
            query(
                f"kvcache_gpu_non_kv_memory_bytes * on (gpu, uuid) group_left () "
                f"(max by (gpu, uuid) (kvcache_gpu_engine_info{{{sel}}}))",
                "other in use, GPU {{gpu}}",
            ),
            query(
                f'kvcache_gpu_memory_bytes{{state="free"}} * on (gpu, uuid) group_left () '
                f"(max by (gpu, uuid) (kvcache_gpu_engine_info{{{sel}}}))",
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
                "histogram_quantile(0.99, rate(kvcache_exporter_poll_duration_seconds_bucket"
                f"{{{tsel}}}[$__rate_interval]))",
                scope.target_legend,
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
                f"sum by (reason) (rate(kvcache_exporter_poll_errors_total{{{tsel}}}"
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
            query(f"time() - kvcache_snapshot_timestamp_seconds{{{sel}}}", scope.legend),
            width=8,
            limits=thresholds((None, "green"), (c.stale_after_seconds, "red")),
        )
    )
    ssel = f'{tsel}, dp_rank=~"$dp_rank"'
    d = d.with_panel(
        timeseries(
            "KV event streams: batches, losses, replays, errors",
            "Per DP rank of engines whose KV events the exporter reads: batches/s received, batches/s lost (sequence "
            "gaps the replay socket could not fill: KVCacheEventStreamLost), replayed and refused by reason.",
            "short",
            query(
                f"rate(kvcache_events_batches_total{{{ssel}}}[$__rate_interval])",
                "batches {{dp_rank}}",
            ),
            query(
                f"rate(kvcache_events_batches_lost_total{{{ssel}}}[$__rate_interval])",
                "lost {{dp_rank}}",
            ),
            query(
                f"rate(kvcache_events_replayed_batches_total{{{ssel}}}[$__rate_interval])",
                "replayed {{dp_rank}}",
            ),
            query(
                f"sum by (dp_rank, reason) (rate(kvcache_events_errors_total{{{ssel}}}[$__rate_interval]))",
                "{{reason}} {{dp_rank}}",
            ),
        )
    )
    d = d.with_panel(
        timeseries(
            "KV event streams: last batch age and wholeness",
            "Seconds since each stream's last batch (a busy engine sends one with every block it fills: "
            "KVCacheEventStreamSilent), and whether its resident counts are whole (1) or unknown after a loss (0).",
            "s",
            query(f"kvcache_events_last_batch_age_seconds{{{ssel}}}", "age {{dp_rank}}"),
            query(f"kvcache_events_resident_whole{{{ssel}}}", "whole {{dp_rank}}"),
            limits=thresholds((None, "green"), (c.event_stream_silent_seconds, "red")),
        )
    )
    return d


def what_if_panels(d: Dashboard, c: MixinConfig, sel: str) -> Dashboard:
    """The prefix cache's hit ratio at other KV sizes, from the reuse-distance histogram."""
    reuse = "kvcache_prefix_reuse_distance_tokens"
    w = c.working_set_lookback
    curve = (
        Table()
        .title("Hit ratio vs KV cache size")
        .unit("short")
        .description(
            "What the prefix hit ratio would have been over the dashboard's time range with a KV cache of each "
            "size (tokens), from the reuse distances of the lookups (reference engine and vLLM shim; see "
            "docs/reuse-distance.md). The rows marked pool, pool_host (+ host tier) and top (64x the pool) are "
            "this engine's; sizes above the pool are what more KV memory would buy."
        )
        .datasource(DS)
        .span(12)
        .height(10)
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
        .with_target(
            table_query(
                f'sum by (le) (rate({reuse}_bucket{{{sel}, le!="+Inf"}}[$__range]))\n'
                f"  / ignoring (le) group_left ()\nsum(rate({reuse}_count{{{sel}}}[$__range]))"
            ).ref_id("A")
        )
        .with_target(
            table_query(
                "max by (le, mark) (label_replace(kvcache_prefix_reuse_bucket_info"
                f'{{{sel}}}, "le", "$1", "bound", "(.+)"))'
            ).ref_id("B")
        )
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            DataTransformerConfig(
                id_val="convertFieldType",
                options={"conversions": [{"targetField": "le", "destinationType": "number"}]},
            )
        )
        .with_transformation(
            DataTransformerConfig(id_val="sortBy", options={"sort": [{"field": "le"}]})
        )
        .with_transformation(
            DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "Value #B": True},
                    "renameByName": {
                        "le": "KV cache size (tokens)",
                        "Value #A": "hit ratio",
                        "mark": "this engine",
                    },
                },
            )
        )
        .override_by_name(
            "hit ratio",
            [
                DynamicConfigValue(id_val="unit", value="percentunit"),
                DynamicConfigValue(id_val="min", value=0),
                DynamicConfigValue(id_val="max", value=1),
                DynamicConfigValue(
                    id_val="custom.cellOptions", value={"type": "gauge", "mode": "basic"}
                ),
            ],
        )
    )
    d = d.with_panel(curve)
    d = d.with_panel(
        timeseries(
            f"Predicted hit ratio at this pool, pool + host, 64x ({w})",
            f"The curve read at this engine's sizes over the last {w}, beside the measured hit ratio (all tiers). "
            "A wide gap between pool and 64x is hit ratio that more KV memory would buy "
            "(KVCachePrefixWorkingSetOutgrowsPool).",
            "percentunit",
            query(
                f"engine_mark:kvcache_prefix_hit_ratio_at_size:rate{w}{{{sel}}}",
                "predicted at {{mark}}",
            ),
            query(f"engine:kvcache_prefix_hit_ratio:rate1h{{{sel}}}", "measured"),
            width=6,
        )
    )
    d = d.with_panel(
        timeseries(
            "Working set vs pool",
            f"The KV size (tokens) that reaches {c.working_set_fraction:.0%} of the hit ratio a cache 64x the pool "
            f"would have, over the last {w}, and the pool's size. Above the pool: the working set does not fit.",
            "short",
            query(f"engine:kvcache_prefix_working_set_tokens:rate{w}{{{sel}}}", "working set"),
            query(f'kvcache_pool_capacity_slots{{{sel}, pool="{c.pool}"}}', "pool"),
            width=6,
        )
    )
    targets = ", ".join(f"{t:.0%}" for t in c.what_if_target_hit_ratios)
    d = d.with_panel(
        timeseries(
            "KV needed for a hit ratio",
            f"The KV size (tokens) at which the hit ratio would reach {targets}, over the last {w}, beside "
            "the pool (read from the curve as histogram_quantile does). A target above the ceiling (the hit "
            "ratio at 64x the pool: the rest are first-time prompts) has no line. A host tier of the same "
            "size would reach the same hit ratio, serving the extra hits from host memory.",
            "short",
            query(
                f"engine:kvcache_prefix_kv_for_hit_ratio_tokens:rate{w}{{{sel}}}",
                "hit ratio {{target_hit_ratio}}",
            ),
            query(f'kvcache_pool_capacity_slots{{{sel}, pool="{c.pool}"}}', "pool"),
            width=12,
        )
    )
    return d


DASHBOARDS: dict[str, Callable[[MixinConfig], Dashboard]] = {
    "kvcache-fleet.json": fleet_overview,
    "kvcache-engine.json": engine_detail,
}


def render(build: Callable[[MixinConfig], Dashboard], c: MixinConfig) -> str:
    dashboard = build(c).build()
    dashboard.schema_version = SCHEMA_VERSION
    data = json.loads(JSONEncoder(sort_keys=True, indent=2).encode(dashboard))
    for variable in data["templating"]["list"]:
        # The SDK writes an interval variable's fields on every variable; Grafana's published
        # schema has them nowhere (its VariableModel refuses the keys).
        if variable["type"] != "interval":
            for key in ("auto", "auto_count", "auto_min"):
                variable.pop(key, None)
    return (
        json.dumps(
            data,
            indent=2,
            sort_keys=True,
            ensure_ascii=False,
        )
        + "\n"
    )

"""KV cache — engine detail: one engine (or a few), every pool, tier and the what-if curve."""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    Row,
)
from grafana_foundation_sdk.builders.table import Panel as Table
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DataTransformerConfig,
    DynamicConfigValue,
)

from ..config import MixinConfig
from .panels import (
    DS,
    Scope,
    base,
    query,
    stat,
    table_query,
    thresholds,
    timeseries,
    usage_thresholds,
    variables,
)


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
            "size (tokens), from the reuse distances of the lookups (reference engine, and vLLM shim with "
            "KVCACHE_SHIM_REUSE_DISTANCE=on; see docs/reuse-distance.md). The rows marked pool, pool_host (+ host tier) and top (64x the pool) are "
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

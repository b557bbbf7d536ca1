"""Prometheus families built fresh from the latest poll results (the metric contract).

A custom collector, not long-lived Gauge objects: a target that went down or an engine that
lost a pool simply has no series in the next render, so nothing stale is ever exported.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .nvml import GpuReading
from .state import EngineView, TargetReport

log = logging.getLogger(__name__)

ENGINE = ["engine", "dp_rank", "model"]
POOL = [*ENGINE, "pool"]
GPU = ["gpu", "uuid"]


class ReloadCounts(Protocol):
    successes: int
    failures: int
    last_ok: bool
    last_success: float


@dataclass(frozen=True, slots=True)
class ExporterView:
    """Everything one render needs, taken at one instant."""

    targets: Sequence[TargetReport]
    gpus: Sequence[GpuReading]
    nvml_errors: dict[tuple[str, str], int]
    nvml_enabled: bool
    # engine name -> GPU UUIDs from the config, for snapshots that carry none.
    gpu_map: dict[str, tuple[str, ...]]
    reloads: ReloadCounts | None = None


def _gauge(name: str, doc: str, labels: list[str], unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels, unit=unit)


def check_renderable(family: Metric) -> None:
    """Raise if a sample cannot be written as text format: a value beyond float range, a label
    that is not valid UTF-8 (a lone surrogate). The parsers refuse both; this is the last line."""
    for sample in family.samples:
        float(sample.value)
        for value in sample.labels.values():
            value.encode("utf-8")


EngineRows = list[tuple[TargetReport, int, EngineView]]


class KVCacheCollector(Collector):
    def __init__(self, view: Callable[[], ExporterView]) -> None:
        self._view = view
        # Renders in which a target's series could not be written, by target: that target's
        # series are left out (and its up is 0), never the whole scrape.
        self.render_errors: dict[str, int] = {}

    def describe(self) -> Iterable[Metric]:
        return []  # collect() must not run at registration

    def _engine_metrics(self, engines: EngineRows) -> list[Metric]:
        return [
            *self._pool_families(engines),
            *self._engine_families(engines),
            *self._counter_families(engines),
        ]

    def collect(self) -> Iterator[Metric]:
        view = self._view()
        families = self._engine_metrics([])
        by_name = {family.name: family for family in families}
        rendered: EngineRows = []
        failed: set[str] = set()
        for target in view.targets:
            engines = [(target, rank, e) for rank, e in sorted(target.engines.items())]
            if not engines:
                continue
            try:
                built = self._engine_metrics(engines)
                for family in built:
                    check_renderable(family)
            except Exception as exc:
                name = target.target.name
                failed.add(name)
                self.render_errors[name] = self.render_errors.get(name, 0) + 1
                if self.render_errors[name] == 1:
                    log.error("target %s: its series cannot be rendered, left out: %r", name, exc)
                continue
            for family in built:
                by_name[family.name].samples.extend(family.samples)
            rendered.extend(engines)
        yield from families
        yield from self._gpu_families(view, rendered)
        yield from self._self_families(view, failed)

    # ------------------------------------------------------------------- per pool

    def _pool_families(self, engines: EngineRows) -> Iterator[Metric]:
        capacity = _gauge(
            "kvcache_pool_capacity_slots",
            "Token slots in the KV pool (blocks x block size). On hybrid models sharing one pool a"
            " token takes a slot per KV group: kvcache_capacity_tokens is the token capacity.",
            POOL,
        )
        tokens = _gauge(
            "kvcache_pool_slots",
            "KV pool token slots by state: used (pinned by running requests), evictable (cached,"
            " unreferenced, reclaimable), available (empty). The three sum to capacity; evictable"
            " and available are absent where the engine cannot tell them apart.",
            [*POOL, "state"],
        )
        physical = _gauge(
            "kvcache_physical_usage_ratio",
            "(used + evictable) / capacity: physical occupancy incl. prefix cache.",
            POOL,
        )
        active = _gauge(
            "kvcache_active_usage_ratio", "used / capacity: share pinned by running requests.", POOL
        )
        evictable = _gauge(
            "kvcache_evictable_ratio", "evictable / capacity: reclaimable prefix cache.", POOL
        )
        block = _gauge("kvcache_block_size_tokens", "Tokens per KV block (page).", POOL)
        pool_bytes = _gauge("kvcache_pool_bytes", "Physical bytes of the KV pool.", POOL)
        for target, rank, view in engines:
            for pool in view.snapshot.pools:
                labels = [target.target.name, str(rank), view.model, pool.name]
                ratios = view.ratios[pool.name]
                capacity.add_metric(labels, pool.capacity_slots)
                block.add_metric(labels, pool.block_size)
                tokens.add_metric([*labels, "used"], pool.used_slots)
                active.add_metric(labels, ratios.active)
                if pool.evictable_slots is not None and pool.available_slots is not None:
                    tokens.add_metric([*labels, "evictable"], pool.evictable_slots)
                    tokens.add_metric([*labels, "available"], pool.available_slots)
                if ratios.physical is not None and ratios.evictable is not None:
                    physical.add_metric(labels, ratios.physical)
                    evictable.add_metric(labels, ratios.evictable)
                if pool.bytes_per_slot is not None:
                    pool_bytes.add_metric(labels, pool.bytes_per_slot * pool.capacity_slots)
        yield from (capacity, tokens, physical, active, evictable, block, pool_bytes)

    # ----------------------------------------------------------------- per engine

    def _engine_families(self, engines: EngineRows) -> Iterator[Metric]:
        max_conc = _gauge(
            "kvcache_max_concurrency",
            "Group-aware number of max_model_len requests the KV pools hold.",
            ENGINE,
        )
        headroom = _gauge(
            "kvcache_concurrency_headroom",
            "More max_model_len requests that fit now in available + evictable KV.",
            ENGINE,
        )
        max_len = _gauge(
            "kvcache_max_model_len_tokens", "Longest request the engine accepts.", ENGINE
        )
        capacity_tokens = _gauge(
            "kvcache_capacity_tokens",
            "Tokens the engine's KV cache holds, as the engine states it (vLLM:"
            " kv_cache_size_tokens = max concurrency x max_model_len, group-aware).",
            ENGINE,
        )
        requests = _gauge("kvcache_requests", "Requests by state.", [*ENGINE, "state"])
        eta = _gauge(
            "kvcache_exhaustion_eta_seconds",
            "Forecast seconds until used tokens reach capacity at the recent growth rate;"
            " absent when used is not growing.",
            ENGINE,
        )
        snap_time = _gauge(
            "kvcache_snapshot_timestamp_seconds",
            "When the engine published the snapshot last polled (Unix time).",
            ENGINE,
        )
        tier_cap = _gauge(
            "kvcache_tier_capacity_tokens", "Capacity of a lower cache tier.", [*ENGINE, "tier"]
        )
        tier_used = _gauge(
            "kvcache_tier_used_tokens", "Tokens held in a lower cache tier.", [*ENGINE, "tier"]
        )
        info = _gauge(
            "kvcache_engine_info",
            "Engine identity; value 1.",
            [*ENGINE, "engine_kind", "engine_version"],
        )
        for target, rank, view in engines:
            labels = [target.target.name, str(rank), view.model]
            snap = view.snapshot
            if view.max_concurrency is not None:
                max_conc.add_metric(labels, view.max_concurrency)
            if view.headroom is not None:
                headroom.add_metric(labels, view.headroom)
            if snap.max_model_len is not None:
                max_len.add_metric(labels, snap.max_model_len)
            if view.capacity_tokens is not None:
                capacity_tokens.add_metric(labels, view.capacity_tokens)
            if snap.requests is not None:
                requests.add_metric([*labels, "running"], snap.requests.running)
                requests.add_metric([*labels, "waiting"], snap.requests.waiting)
            if view.eta_seconds is not None:
                eta.add_metric(labels, view.eta_seconds)
            snap_time.add_metric(labels, snap.time)
            for tier_name, tier in (("host", snap.host_tier), ("storage", snap.storage_tier)):
                if tier is not None:
                    tier_cap.add_metric([*labels, tier_name], tier.capacity_tokens)
                    tier_used.add_metric([*labels, tier_name], tier.used_tokens)
            info.add_metric([*labels, snap.engine.kind, snap.engine.version], 1)
        yield from (
            max_conc,
            headroom,
            max_len,
            capacity_tokens,
            requests,
            eta,
            snap_time,
            tier_cap,
            tier_used,
            info,
        )

    def _counter_families(self, engines: EngineRows) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "kvcache_prefix_query_tokens",
            "Prompt tokens looked up in the prefix cache.",
            labels=ENGINE,
        )
        hits = CounterMetricFamily(
            "kvcache_prefix_hit_tokens",
            "Prompt tokens served from cache, by tier (device, host, storage, p2p, external).",
            labels=[*ENGINE, "tier"],
        )
        evicted = CounterMetricFamily(
            "kvcache_evicted_tokens",
            "Device KV slots freed by evicting cached prefixes.",
            labels=ENGINE,
        )
        preempt = CounterMetricFamily(
            "kvcache_preemptions", "Requests preempted for lack of KV.", labels=ENGINE
        )
        iterations = CounterMetricFamily(
            "kvcache_iterations", "Engine scheduler iterations.", labels=ENGINE
        )
        simple = {
            "prefix_query_tokens": queries,
            "evicted_tokens": evicted,
            "preemptions": preempt,
            "iterations": iterations,
        }
        for target, rank, view in engines:
            labels = [target.target.name, str(rank), view.model]
            for key, value in view.counters.items():
                if key.startswith("prefix_hit_tokens:"):
                    hits.add_metric([*labels, key.split(":", 1)[1]], value)
                else:
                    simple[key].add_metric(labels, value)
        yield from (queries, hits, evicted, preempt, iterations)

    # ----------------------------------------------------------------------- GPUs

    def _gpu_families(self, view: ExporterView, engines: EngineRows) -> Iterator[Metric]:
        if not view.nvml_enabled:
            return
        memory = _gauge(
            "kvcache_gpu_memory_bytes", "GPU memory by state, from NVML.", [*GPU, "state"]
        )
        total = _gauge("kvcache_gpu_memory_total_bytes", "GPU memory in total, from NVML.", GPU)
        util = _gauge(
            "kvcache_gpu_utilization_ratio", "GPU utilisation (0-1) over NVML's last sample.", GPU
        )
        non_kv = _gauge(
            "kvcache_gpu_non_kv_memory_bytes",
            "GPU memory used by anything but the KV pools on it (weights, activations, other"
            " processes, fragmentation): NVML used minus the pools' bytes.",
            GPU,
        )
        link = _gauge(
            "kvcache_gpu_engine_info",
            "Which engine's KV pools live on which GPU; value 1.",
            [*GPU, *ENGINE],
        )
        pool_bytes_by_uuid: dict[str, int] = {}
        engines_by_uuid: dict[str, set[tuple[str, str, str]]] = {}
        for target, rank, engine_view in engines:
            mapped = view.gpu_map.get(target.target.name, ())
            for pool in engine_view.snapshot.pools:
                uuids = [pool.gpu_uuid] if pool.gpu_uuid else list(mapped)
                for uuid in uuids:
                    engines_by_uuid.setdefault(uuid, set()).add(
                        (target.target.name, str(rank), engine_view.model)
                    )
                    if pool.bytes_per_slot is not None and len(uuids) == 1:
                        pool_bytes_by_uuid[uuid] = pool_bytes_by_uuid.get(uuid, 0) + (
                            pool.bytes_per_slot * pool.capacity_slots
                        )
        for gpu in view.gpus:
            labels = [str(gpu.index), gpu.uuid]
            memory.add_metric([*labels, "used"], gpu.memory_used)
            memory.add_metric([*labels, "free"], gpu.memory_free)
            total.add_metric(labels, gpu.memory_total)
            if gpu.utilization is not None:
                util.add_metric(labels, gpu.utilization)
            if gpu.uuid in pool_bytes_by_uuid:
                non_kv.add_metric(labels, max(0, gpu.memory_used - pool_bytes_by_uuid[gpu.uuid]))
            for engine_labels in sorted(engines_by_uuid.get(gpu.uuid, ())):
                link.add_metric([*labels, *engine_labels], 1)
        yield from (memory, total, util, non_kv, link)

    # -------------------------------------------------------------- self-metrics

    def _self_families(self, view: ExporterView, unrendered: set[str]) -> Iterator[Metric]:
        up = _gauge(
            "kvcache_exporter_target_up",
            "1 when the last poll of the target succeeded.",
            ["engine"],
        )
        polls = CounterMetricFamily(
            "kvcache_exporter_polls", "Polls of the target.", labels=["engine"]
        )
        errors = CounterMetricFamily(
            "kvcache_exporter_poll_errors", "Failed polls by reason.", labels=["engine", "reason"]
        )
        last = _gauge(
            "kvcache_exporter_last_success_timestamp_seconds",
            "When the target was last polled successfully (Unix time).",
            ["engine"],
        )
        restarts = CounterMetricFamily(
            "kvcache_exporter_engine_restarts",
            "Engine restarts seen (new instance id or counters going back).",
            labels=["engine"],
        )
        duration = HistogramMetricFamily(
            "kvcache_exporter_poll_duration_seconds",
            "Time to poll and parse a target.",
            labels=["engine"],
        )
        render_errors = CounterMetricFamily(
            "kvcache_exporter_render_errors",
            "Renders of /metrics that left a target's series out (they could not be written).",
            labels=["engine"],
        )
        for state in view.targets:
            name = [state.target.name]
            up.add_metric(name, 1 if state.up and state.target.name not in unrendered else 0)
            render_errors.add_metric(name, self.render_errors.get(state.target.name, 0))
            polls.add_metric(name, state.polls)
            for reason, count in state.errors.items():
                errors.add_metric([*name, reason], count)
            if state.last_success is not None:
                last.add_metric(name, state.last_success)
            restarts.add_metric(name, state.restarts)
            duration.add_metric(name, state.durations.cumulative(), state.durations.total)
        nvml_up = _gauge("kvcache_exporter_nvml_up", "1 when NVML is in use.", [])
        nvml_up.add_metric([], 1 if view.nvml_enabled else 0)
        nvml_errors = CounterMetricFamily(
            "kvcache_exporter_nvml_errors",
            "NVML errors by GPU and error.",
            labels=["gpu", "reason"],
        )
        for (gpu, reason), count in sorted(view.nvml_errors.items()):
            nvml_errors.add_metric([gpu, reason], count)
        build = _gauge(
            "kvcache_exporter_build_info", "Exporter build; value 1.", ["version", "python_version"]
        )
        build.add_metric([__version__, platform.python_version()], 1)
        reloads = CounterMetricFamily(
            "kvcache_exporter_config_reloads",
            "Configuration reloads (SIGHUP, POST /-/reload) by result.",
            labels=["result"],
        )
        reload_ok = _gauge(
            "kvcache_exporter_config_last_reload_successful",
            "1 when the last reload succeeded (or none was tried): 0 means a bad file is waiting.",
            [],
        )
        reload_time = _gauge(
            "kvcache_exporter_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (Unix time).",
            [],
        )
        if view.reloads is not None:
            reloads.add_metric(["success"], view.reloads.successes)
            reloads.add_metric(["failure"], view.reloads.failures)
            reload_ok.add_metric([], 1 if view.reloads.last_ok else 0)
            reload_time.add_metric([], view.reloads.last_success)
        yield from (
            up,
            polls,
            errors,
            last,
            restarts,
            duration,
            render_errors,
            nvml_up,
            nvml_errors,
            build,
            reloads,
            reload_ok,
            reload_time,
        )

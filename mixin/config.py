"""The monitoring mixin's one configuration: selectors, identity, thresholds, durations, URLs.

Everything in ``alerts/`` and ``dashboards/`` (and the Kubernetes bundle's PrometheusRule and
dashboard ConfigMaps) is generated from a ``MixinConfig``: change a threshold here, or in a small
override file (``python -m mixin build --config mine.yaml``), never in the generated YAML/JSON.
node-mixin's ``config.libsonnet`` and kubernetes-mixin's ``runbookURLPattern`` are the models.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class MixinConfig:
    # Selects the exporter's own scrape job. Under the Prometheus operator a PodMonitor's job is
    # "<namespace>/<name>"; docker-compose names it "kvcache-exporter": this matches both.
    exporter_selector: str = 'job=~"(.+/)?kvcache-exporter"'
    # Labels that name a deployment above the replica (kept by fleet-level aggregates, grouped
    # on by Alertmanager). Per-replica rules keep every label: they aggregate *without*.
    fleet_labels: tuple[str, ...] = ("cluster", "namespace")
    # The label that tells replicas apart in dashboards (legends, the replica variable). The
    # Kubernetes bundle sets ``instance`` to the pod's name, so one label serves both stacks.
    replica_label: str = "instance"
    # "%s" becomes the alert's name, lower-cased (the runbook's anchor).
    runbook_url_pattern: str = (
        "https://github.com/kvcache-exporter/kvcache-exporter/blob/main/docs/runbooks.md#%s"
    )
    # The pool whose usage pages (vLLM's and the reference engine's full-attention pool).
    pool: str = "full"
    rule_interval: str = "30s"
    # Fleet panels show this many engines (top-k), so they stay readable and fast at 1,000.
    fleet_top_k: int = 10
    # dcgm-exporter's framebuffer series (MiB), joined to engines by GPU UUID.
    dcgm_selector: str = ""

    exhausted_usage: float = 0.95
    exhausted_for: str = "5m"
    forecast_lookback: str = "15m"
    forecast_horizon_seconds: int = 1800
    forecast_min_usage: float = 0.6
    forecast_for: str = "10m"
    active_usage_high: float = 0.90
    active_usage_high_for: str = "15m"
    no_headroom_for: str = "10m"
    preemptions_per_second: float = 0.05
    preemptions_for: str = "10m"
    thrash_evicted_pool_fraction: float = 0.01
    thrash_hit_ratio_drop: float = 0.75
    thrash_for: str = "15m"
    collapse_hit_ratio_drop: float = 0.5
    collapse_min_hourly_hit_ratio: float = 0.2
    collapse_min_query_tokens_per_second: float = 100
    collapse_for: str = "15m"
    target_down_for: str = "3m"
    unsupported_engine_for: str = "5m"
    exporter_absent_for: str = "5m"
    # How long an exporter that was scraped in a cluster may be gone before that cluster pages.
    exporter_lost_lookback: str = "1h"
    stale_after_seconds: int = 60
    stale_for: str = "5m"
    gpu_memory_full: float = 0.98
    gpu_memory_full_for: str = "10m"
    # The prefix cache's working set: the KV size that reaches this share of the hit ratio a
    # cache 64x the pool would have (from the reuse-distance histogram, over the lookback).
    working_set_fraction: float = 0.9
    working_set_lookback: str = "1h"
    # Page-worthy only when a pool that held the working set would hit this much more often,
    # with real traffic, for this long.
    working_set_min_gain: float = 0.1
    # The hit ratios whose KV size the rules record (over the working set's lookback).
    what_if_target_hit_ratios: tuple[float, ...] = (0.5, 0.75, 0.9)
    working_set_min_query_tokens_per_second: float = 100
    working_set_for: str = "1h"
    # KV event streams (vLLM / SGLang --kv-events-config): a lost batch leaves the resident
    # counts unknown; a stream silent this long while its engine runs requests is broken.
    event_stream_lost_lookback: str = "10m"
    event_stream_lost_for: str = "0m"
    event_stream_silent_seconds: int = 120
    event_stream_silent_for: str = "5m"

    def runbook_url(self, alert: str) -> str:
        return self.runbook_url_pattern.replace("%s", alert.lower())

    def fleet_by(self, *more: str) -> str:
        return ", ".join((*self.fleet_labels, *more))


class MixinConfigError(ValueError):
    pass


_ACCEPTED: dict[type, tuple[type, ...]] = {str: (str,), int: (int,), float: (int, float)}
_NAMES = {str: "a string", int: "an integer", float: "a number"}


def load_config(path: Path | None) -> MixinConfig:
    """The defaults, with a YAML file's overrides (unknown keys and wrong types refused)."""
    if path is None:
        return MixinConfig()
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise MixinConfigError(f"{path}: expected a mapping of settings")
    return override(MixinConfig(), data, str(path))


def _is_ratio(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1


def override(config: MixinConfig, data: dict[str, Any], source: str = "overrides") -> MixinConfig:
    fields = {f.name for f in dataclasses.fields(MixinConfig)}
    changes: dict[str, Any] = {}
    for key, given in data.items():
        value: Any = given
        if key not in fields:
            raise MixinConfigError(f"{source}: unknown setting {key!r}")
        default = getattr(config, key)
        if isinstance(default, tuple) and default and isinstance(default[0], float):
            if not isinstance(value, list) or not value or not all(_is_ratio(v) for v in value):
                raise MixinConfigError(f"{source}: {key} must be a list of ratios in (0, 1)")
            value = tuple(float(v) for v in value)
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise MixinConfigError(f"{source}: {key} must be a list of label names")
            value = tuple(value)
        elif isinstance(value, bool) or not isinstance(value, _ACCEPTED[type(default)]):
            raise MixinConfigError(f"{source}: {key} must be {_NAMES[type(default)]}")
        elif isinstance(default, float) and isinstance(value, int | float):
            value = float(value)
        changes[key] = value
    result = dataclasses.replace(config, **changes)
    validate(result, source)
    return result


def validate(config: MixinConfig, source: str = "config") -> None:
    durations = [
        f.name
        for f in dataclasses.fields(config)
        if f.name.endswith(("_for", "_lookback")) or f.name == "rule_interval"
    ]
    for name in durations:
        value = getattr(config, name)
        if not DURATION.match(value):
            raise MixinConfigError(f"{source}: {name}: {value!r} is not a duration")
    for label in (*config.fleet_labels, config.replica_label):
        if not LABEL.match(label):
            raise MixinConfigError(f"{source}: {label!r} is not a label name")
    if "%s" not in config.runbook_url_pattern or not config.runbook_url_pattern.startswith(
        ("https://", "http://")
    ):
        raise MixinConfigError(f"{source}: runbook_url_pattern must be an absolute URL with %s")

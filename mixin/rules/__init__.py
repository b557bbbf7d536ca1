"""Recording rules and alerts, generated from a ``MixinConfig``.

Identity is never dropped: per-engine rules aggregate *without* the labels that must go (a tier,
a pool state) instead of *by* a fixed list, so every label the user's Prometheus attaches to a
scrape target (``cluster``, ``namespace``, ``pod``, ``instance``, ``job``) stays on what is
recorded and on what fires. Two replicas that share an engine name are two series, never one.
Fleet aggregates keep ``fleet_labels`` (cluster, namespace) and the model.

One module per area, as ``alerts/tests/*.test.yml`` tests them; ``AREAS`` is the order of the
alerts in the generated file.
"""

from __future__ import annotations

from typing import Any

from ..config import MixinConfig
from . import capacity, events, exporter, gpu, prefix, reuse
from .common import HEADER, Rule
from .gpu import gpu_join_rules
from .recording import recording_rules

__all__ = ["AREAS", "HEADER", "Rule", "alerts", "recording_rules", "rule_groups"]

AREAS = (capacity, prefix, reuse, exporter, events, gpu)


def alerts(c: MixinConfig) -> list[Rule]:
    return [rule for area in AREAS for rule in area.alerts(c)]


def rule_groups(c: MixinConfig) -> dict[str, Any]:
    return {
        "groups": [
            {"name": "kvcache.rules", "interval": c.rule_interval, "rules": recording_rules(c)},
            {"name": "kvcache.gpu", "interval": c.rule_interval, "rules": gpu_join_rules(c)},
            {"name": "kvcache.alerts", "rules": alerts(c)},
        ]
    }

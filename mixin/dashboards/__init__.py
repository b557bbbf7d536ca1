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

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from ..config import MixinConfig
from .engine import engine_detail
from .fleet import fleet_overview
from .panels import GRAFANA_VERSION, SCHEMA_VERSION

__all__ = ["DASHBOARDS", "GRAFANA_VERSION", "SCHEMA_VERSION", "render"]

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

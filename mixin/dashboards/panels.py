"""The building blocks both dashboards share: the data source, scopes (selectors and
legends), queries, thresholds, panels and variables."""

from __future__ import annotations

from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.table import Panel as Table
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.models import common, prometheus
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

from ..config import MixinConfig

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

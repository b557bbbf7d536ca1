"""Dashboards as TypeScript, typed by Grafana's own published schema (``@grafana/schema`` of the
Grafana version the stack pins), for ``tsc`` to check.

Each panel becomes an object literal typed as ``Panel`` with its plugin's own ``Options`` and
``FieldConfig`` (timeseries, stat, table); the dashboard, its variables, rows and thresholds as
the schema's ``Dashboard``. Object literals get TypeScript's excess-property check, so unknown
keys, missing required options, wrong types and values outside an enum all fail.

What it cannot check: Prometheus query fields (the 11.3 package publishes no Prometheus query
type; queries are parsed by promtool and run on a real Prometheus instead), and anything Grafana
only decides at load time (migrations, datasource existence).
"""

from __future__ import annotations

import json
from typing import Any

BASE = "@grafana/schema/dist/esm"
PANEL_TYPES = {
    "timeseries": ("timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen", True),
    "stat": ("stat/panelcfg/x/StatPanelCfg_types.gen", False),
    "table": ("table/panelcfg/x/TablePanelCfg_types.gen", True),
}
IMPORTS = [
    f'import type {{ Dashboard, FieldConfigSource, Panel, RowPanel }} from "{BASE}/raw/dashboard'
    '/x/dashboard_types.gen";',
    f'import type {{ DataQuery }} from "{BASE}/common/common.gen";',
    *(
        f'import type * as {name} from "{BASE}/raw/composable/{path}";'
        for name, (path, _) in PANEL_TYPES.items()
    ),
]
PRELUDE = (
    "\n".join(IMPORTS)
    + """
// TypeScript's string enums are nominal, JSON holds their values: Lit<T> is T with every string
// enum replaced by the union of its values.
type Lit<T> = T extends string
  ? `${T}`
  : T extends readonly (infer E)[]
    ? Lit<E>[]
    : T extends object
      ? { [K in keyof T]: Lit<T[K]> }
      : T;
type Query = DataQuery & Record<string, unknown>;
type Typed<O, F> = Omit<Panel, "options" | "fieldConfig" | "targets"> & {
  options: O;
  fieldConfig: Omit<FieldConfigSource, "defaults"> & {
    defaults: Omit<FieldConfigSource["defaults"], "custom"> & { custom?: F };
  };
  targets: Query[];
};
type Row = Omit<RowPanel, "panels"> & { panels: unknown[] };
"""
)


class UnknownPanelType(ValueError):
    pass


def dashboard_typescript(dashboard: dict[str, Any]) -> str:
    lines = [PRELUDE]
    names = []
    for i, panel in enumerate(dashboard["panels"]):
        kind = panel["type"]
        if kind == "row":
            typed = "Lit<Row>"
        elif kind in PANEL_TYPES:
            custom = f"{kind}.FieldConfig" if PANEL_TYPES[kind][1] else "Record<string, unknown>"
            typed = f"Lit<Typed<{kind}.Options, {custom}>>"
        else:
            raise UnknownPanelType(f"no published schema checked for panel type {kind!r}")
        lines.append(f"const panel{i}: {typed} = {json.dumps(panel, indent=2)};")
        names.append(f"panel{i}")
    rest = {k: v for k, v in dashboard.items() if k != "panels"}
    lines.append(
        'export const dashboard: Lit<Omit<Dashboard, "panels">> & { panels: unknown[] } = '
        f"{{ ...{json.dumps(rest, indent=2)}, panels: [{', '.join(names)}] }};"
    )
    return "\n".join(lines) + "\n"

"""What each dashboard panel selects, on a real Prometheus: the fleet of the golden exposition
(a shim engine with a full and a sliding-window pool, a vLLM and an SGLang bridge engine, two
models, one target down) with a second DP rank and a second exporter, backfilled as TSDB blocks
with the recording rules backfilled over it (``promtool tsdb create-blocks-from``).

The oracle for a selection (variables set to concrete values) is the same panel with every
variable at "All" on a copy of the fleet that holds only the selected engines' series (a series
without the selected label is kept: GPU readings, the exporter's own). The copy lives in the
same TSDB under its own ``cluster``, so one server answers both; results are compared without
``cluster``. A panel that drops a filter shows the other engines' series (or sums them in), and
the two differ. Filters on the pool (``pool="full"``) are checked against hand-written values.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devtools.ports import wait_listening
from kvstats.reuse import size_for_hit_ratio
from tests.helpers import wait_for
from tests.mixin.test_dashboards_and_rules import DASHBOARDS, RULES, panels, tool

GOLDEN = Path(__file__).parents[1] / "testdata" / "exposition" / "fleet.golden.prom"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
VICTORIA_METRICS, VMALERT = shutil.which("victoria-metrics"), shutil.which("vmalert")
STEP = 30  # seconds between samples
SPAN = 75 * 60  # the rules' longest window (1 h) and some
VARIABLES = ("cluster", "namespace", "instance", "engine", "model", "dp_rank")
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
# Concrete selections, each where one variable alone decides (the others at "All").
SELECTIONS: dict[str, dict[str, str]] = {
    "model": {"model": LLAMA},
    "dp_rank": {"dp_rank": "1"},
    "engine": {"engine": "sglang"},
    "instance": {"instance": "exporter-b:9400"},
    "one_engine_rank": {"engine": "ref", "model": "reference-tiny", "dp_rank": "1"},
}
# Model-level recorded series (``model:...``) carry only these labels: a panel that reads them
# honours these variables and shows every engine of the model whatever engine or rank is chosen.
MODEL_LEVEL = frozenset({"cluster", "namespace", "model"})
RECORDED = re.compile(r"(?<![\w:])([a-z_]+:kvcache_[a-z0-9_]+:[a-z0-9_]+)")
# Panels with no data in this fleet (no DCGM exporter beside it), said here so a panel that
# loses its data by mistake fails instead.
EMPTY_IN_THIS_FLEET: set[str] = set()


@dataclass(frozen=True)
class Series:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float
    cumulative: bool

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


def fleet() -> list[Series]:
    """The golden fleet with exporter labels, the reference engine again as DP rank 1, and a
    DCGM exporter's memory readings."""
    out = []
    text = GOLDEN.read_text()
    for family in text_string_to_metric_families(text):
        cumulative = family.type in ("counter", "histogram", "summary")
        for sample in family.samples:
            labels = dict(sample.labels)
            engine = labels.get("engine")
            instance = "exporter-a:9400" if engine in (None, "ref") else "exporter-b:9400"
            labels |= {"cluster": "east", "namespace": "llm", "job": "kvcache-exporter"}
            labels["instance"] = instance
            copies = [labels]
            if engine == "ref" and labels.get("dp_rank") == "0":
                copies.append({**labels, "dp_rank": "1"})
            for copy in copies:
                out.append(
                    Series(sample.name, tuple(sorted(copy.items())), sample.value, cumulative)
                )
    # NVIDIA's DCGM exporter beside it, on the reference engine's GPU (MiB, as DCGM reports).
    dcgm = {
        "cluster": "east",
        "namespace": "llm",
        "job": "dcgm-exporter",
        "instance": "dcgm:9400",
        "gpu": "0",
        "UUID": "GPU-aaaaaaaa-0000-0000-0000-000000000000",
    }
    for name, mib in (("DCGM_FI_DEV_FB_USED", 40960.0), ("DCGM_FI_DEV_FB_FREE", 40960.0)):
        out.append(Series(name, tuple(sorted(dcgm.items())), mib, False))
    return out


def selected(series: Series, selection: dict[str, str]) -> bool:
    return all(series.label(k) in (None, v) for k, v in selection.items())


Selection = frozenset[tuple[str, str]]


def oracle_selections() -> dict[Selection, str]:
    """Each selection, and its model-level part, with the cluster its copy of the fleet gets."""
    wanted: set[Selection] = set()
    for selection in SELECTIONS.values():
        wanted.add(frozenset(selection.items()))
        wanted.add(frozenset((k, v) for k, v in selection.items() if k in MODEL_LEVEL))
    wanted.discard(frozenset())
    return {selection: f"oracle-{i}" for i, selection in enumerate(sorted(wanted, key=sorted))}


ORACLES = oracle_selections()


def oracle_cluster(expr: str, selection: dict[str, str]) -> str:
    """Where the panel's answer for ``selection`` is the panel with every variable at All."""
    recorded = RECORDED.findall(expr)
    model_level = bool(recorded) and all(r.startswith("model:") for r in recorded)
    scope = {(k, v) for k, v in selection.items() if not model_level or k in MODEL_LEVEL}
    return ORACLES[frozenset(scope)] if scope else "east"


def samples(series: list[Series], end: int, millis: bool = False) -> list[str]:
    """Gauges constant; counters and histograms rising linearly to their value at ``end``; a
    sample every STEP seconds, timestamped in seconds (OpenMetrics) or milliseconds."""
    start = end - SPAN
    lines = []
    for s in sorted(series, key=lambda s: (s.name, s.labels)):
        labels = ",".join(f'{k}="{json.dumps(v)[1:-1]}"' for k, v in s.labels)
        for t in range(start, end + 1, STEP):
            value = s.value * (t - start) / SPAN if s.cumulative else s.value
            lines.append(f"{s.name}{{{labels}}} {value!r} {t * 1000 if millis else t}")
    return lines


def openmetrics(series: list[Series], end: int) -> str:
    return "\n".join([*samples(series, end), "# EOF"]) + "\n"


def relabel(labels: tuple[tuple[str, str], ...], cluster: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, cluster if k == "cluster" else v) for k, v in labels)


class QueryAPI:
    """The Prometheus HTTP query API, as Prometheus and VictoriaMetrics both serve it."""

    url = ""

    def query(self, expr: str, at: int) -> dict[tuple[tuple[str, str], ...], float]:
        answer = httpx.get(
            f"{self.url}/api/v1/query", params={"query": expr, "time": at}, timeout=30
        ).json()
        assert answer["status"] == "success", (expr, answer)
        result = answer["data"]["result"]
        if answer["data"]["resultType"] == "scalar":
            return {(): float(result[1])}
        return {
            tuple(sorted((k, v) for k, v in r["metric"].items() if k != "cluster")): float(
                r["value"][1]
            )
            for r in result
        }


class Server(QueryAPI):
    """A server process on a port the kernel picks (read back from /proc, no race)."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir, self.name = workdir, name
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        log = (self.workdir / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=log)
        (port,) = wait_listening(self.process, timeout=60)
        self.url = f"http://127.0.0.1:{port}"
        wait_for(self.ready, 60, f"{self.name} ready")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None


class Prometheus(Server):
    def __init__(self, data: Path, workdir: Path) -> None:
        super().__init__(workdir, "prometheus")
        self.data = data

    def command(self) -> list[str]:
        config = self.workdir / "prometheus.yml"
        config.write_text("global: {evaluation_interval: 1h}\n")
        return [
            tool(PROMETHEUS, "prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.data}",
            "--storage.tsdb.retention.time=30d",
            "--web.listen-address=127.0.0.1:0",
        ]


class VictoriaMetrics(Server):
    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, "victoria-metrics")

    def command(self) -> list[str]:
        return [
            tool(VICTORIA_METRICS, "victoria-metrics"),
            f"-storageDataPath={self.workdir / 'vm-data'}",
            "-retentionPeriod=100y",
            "-httpListenAddr=127.0.0.1:0",
            "-search.disableCache",
            "-search.latencyOffset=0s",
        ]

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="module")
def fleet_data() -> tuple[list[Series], int]:
    """The fleet and one copy per selection; the time its samples end."""
    end = int(time.time()) // 3600 * 3600 - 3600  # well in the past: blocks, not the head
    everything = fleet()
    for selection, cluster in ORACLES.items():
        everything += [
            Series(s.name, relabel(s.labels, cluster), s.value, s.cumulative)
            for s in fleet()
            if selected(s, dict(selection))
        ]
    return everything, end


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, fleet_data: tuple[list[Series], int]
) -> Iterator[tuple[Prometheus, int]]:
    """A real Prometheus over the fleet data, raw and recorded series."""
    work = tmp_path_factory.mktemp("dashboard-selection")
    everything, end = fleet_data
    source = work / "fleet.om"
    source.write_text(openmetrics(everything, end))
    data = work / "data"
    promtool = tool(PROMTOOL, "promtool")
    subprocess.run(
        [promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
        check=True,
        capture_output=True,
    )
    server = Prometheus(data, work)
    server.start()
    try:
        recorded = work / "recorded"
        result = subprocess.run(
            [
                promtool,
                "tsdb",
                "create-blocks-from",
                "rules",
                f"--start={end - SPAN + 3600}",
                f"--end={end}",
                f"--url={server.url}",
                f"--output-dir={recorded}",
                "--eval-interval=30s",
                str(RULES),
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        server.stop()
        for block in recorded.iterdir():
            if block.is_dir():
                shutil.move(str(block), data / block.name)
        server.start()
        yield server, end - 60
    finally:
        server.stop()


def panel_queries() -> list[tuple[str, int, str]]:
    out = []
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            for i, target in enumerate(panel.get("targets", [])):
                out.append((f"{path.stem}: {panel['title']}", i, target["expr"]))
    return out


def with_variables(expr: str, values: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", "2m").replace("$__interval", "30s")
    expr = expr.replace("$__range", "5m")
    for name in sorted(VARIABLES, key=len, reverse=True):
        # A value as Grafana sends it (regex-escaped, in a PromQL string); "All" is ".*".
        value = re.escape(values[name]).replace("\\", "\\\\") if name in values else ".*"
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr.replace("$1", ""), expr
    return expr


QUERIES = panel_queries()


@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_every_panel_shows_exactly_the_selected_engines(
    prometheus: tuple[Prometheus, int], selection: str
) -> None:
    server, at = prometheus
    wrong = []
    for where, i, expr in QUERIES:
        chosen = SELECTIONS[selection]
        shown = server.query(with_variables(expr, {"cluster": "east", **chosen}), at)
        oracle = server.query(with_variables(expr, {"cluster": oracle_cluster(expr, chosen)}), at)
        if not same(shown, oracle):
            wrong.append(f"{where} [{i}]:\n  shown  {shown}\n  oracle {oracle}")
    assert not wrong, "\n".join(wrong)


def test_every_panel_has_data_for_the_whole_fleet(prometheus: tuple[Prometheus, int]) -> None:
    server, at = prometheus
    empty = {
        where
        for where, _, expr in QUERIES
        if not server.query(with_variables(expr, {"cluster": "east"}), at)
    }
    assert empty == EMPTY_IN_THIS_FLEET


# What the full-attention pool panels show for the reference engine, whose sliding-window pool
# is fuller (0.1075) than its full pool (0.1008): the golden file's figures.
REF_FULL_ACTIVE = 0.10075228371843095
REF_SELECTION = {"cluster": "east", **SELECTIONS["one_engine_rank"]}
REF_LABELS = {
    "dp_rank": "1",
    "engine": "ref",
    "instance": "exporter-a:9400",
    "job": "kvcache-exporter",
    "model": "reference-tiny",
    "namespace": "llm",
}


FULL_POOL_PANELS = [
    ("kvcache-fleet: Highest active usage", {(): REF_FULL_ACTIVE}),
    (
        "kvcache-fleet: Engines most at risk (top 20 by active usage)",
        {tuple(sorted({**REF_LABELS, "pool": "full"}.items())): REF_FULL_ACTIVE},
    ),
    (
        "kvcache-fleet: Active usage, top 10 engines",
        {tuple(sorted({**REF_LABELS, "pool": "full"}.items())): REF_FULL_ACTIVE},
    ),
]


@pytest.mark.parametrize(("panel", "expected"), FULL_POOL_PANELS)
def test_full_pool_panels_show_the_full_pool(
    prometheus: tuple[Prometheus, int], panel: str, expected: dict[Any, float]
) -> None:
    server, at = prometheus
    [expr] = [e for where, _, e in QUERIES if where == panel]
    shown = server.query(with_variables(expr, REF_SELECTION), at)
    shown = {
        tuple((k, v) for k, v in labels if k != "__name__"): value
        for labels, value in shown.items()
    }
    assert same(shown, expected), shown


def test_every_full_pool_filter_is_checked_above() -> None:
    """A new panel that filters on the pool joins the table above (or the working-set check)."""
    checked = {panel for panel, _ in FULL_POOL_PANELS} | set(SIZE_PANELS)
    assert {where for where, _, expr in QUERIES if 'pool="full"' in expr} == checked


SIZE_PANELS = ("kvcache-engine: Working set vs pool", "kvcache-engine: KV needed for a hit ratio")


@pytest.mark.parametrize("panel", SIZE_PANELS)
def test_the_size_panels_compare_with_the_full_pools_capacity(
    prometheus: tuple[Prometheus, int], panel: str
) -> None:
    server, at = prometheus
    [expr] = [e for where, _, e in QUERIES if where == panel and "capacity" in e]
    shown = server.query(with_variables(expr, REF_SELECTION), at)
    assert [dict(labels).get("pool") for labels in shown] == ["full"]
    assert list(shown.values()) == [29776.0]


def test_the_kv_needed_panel_reads_the_curve_as_the_cli_does(
    prometheus: tuple[Prometheus, int],
) -> None:
    """The reference engine's golden curve reaches 60 % at 64x the pool: 50 % has a size (the
    CLI's, interpolated the same way), 75 % and 90 % none (not the largest bound)."""
    server, at = prometheus
    [expr] = [
        e
        for where, _, e in QUERIES
        if where == "kvcache-engine: KV needed for a hit ratio" and "capacity" not in e
    ]
    shown = server.query(with_variables(expr, REF_SELECTION), at)
    assert {dict(labels)["target_hit_ratio"] for labels in shown} == {"0.5"}
    curve = {
        float(s.label("le") or "nan"): s.value
        for s in fleet()
        if s.name == "kvcache_prefix_reuse_distance_tokens_bucket"
        and s.label("engine") == "ref"
        and s.label("dp_rank") == "1"
    }
    total = curve.pop(math.inf)
    bounds = sorted(curve)
    expected = size_for_hit_ratio(bounds, [curve[b] for b in bounds], total, 0.5)
    assert expected is not None
    assert list(shown.values()) == [pytest.approx(expected, rel=1e-9)]


def same(a: dict[Any, float], b: dict[Any, float]) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or math.isclose(a[k], b[k], rel_tol=1e-9) for k in a
    )


# ------------------------------------------------ a second PromQL engine: VictoriaMetrics


def iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@pytest.fixture(scope="module")
def victoria_metrics(
    tmp_path_factory: pytest.TempPathFactory, fleet_data: tuple[list[Series], int]
) -> Iterator[tuple[VictoriaMetrics, int]]:
    """VictoriaMetrics fed the same samples, the recording rules replayed by vmalert over
    the same span and steps as promtool backfilled them for Prometheus."""
    work = tmp_path_factory.mktemp("victoria-metrics")
    everything, end = fleet_data
    server = VictoriaMetrics(work)
    server.start()
    try:
        body = "\n".join(samples(everything, end, millis=True)) + "\n"
        imported = httpx.post(f"{server.url}/api/v1/import/prometheus", content=body, timeout=120)
        assert imported.status_code == 204, imported.text
        httpx.get(f"{server.url}/internal/force_flush", timeout=60).raise_for_status()
        replay = subprocess.run(
            [
                tool(VMALERT, "vmalert"),
                f"-rule={RULES}",
                f"-datasource.url={server.url}",
                f"-remoteWrite.url={server.url}",
                f"-replay.timeFrom={iso(end - SPAN + 3600)}",
                f"-replay.timeTo={iso(end)}",
                "-replay.rulesDelay=0s",
                "-replay.disableProgressBar",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr[-3000:]
        httpx.get(f"{server.url}/internal/force_flush", timeout=60).raise_for_status()
        yield server, end - 60
    finally:
        server.stop()


def test_victoriametrics_answers_every_rule_and_panel_as_prometheus_does(
    prometheus: tuple[Prometheus, int], victoria_metrics: tuple[VictoriaMetrics, int]
) -> None:
    """Every rule's expression, every recorded series (promtool's backfill against vmalert's
    replay) and every panel's queries (all engines, and each selection) give the same series
    and values on both engines."""
    reference, at = prometheus
    second, _ = victoria_metrics
    rules = yaml.safe_load(RULES.read_text())["groups"]
    checks = [
        (f"rule {r.get('alert') or r['record']}", r["expr"]) for g in rules for r in g["rules"]
    ]
    checks += [
        (f"recorded {r['record']}", r["record"]) for g in rules for r in g["rules"] if "record" in r
    ]
    for selection in ({}, *SELECTIONS.values()):
        checks += [
            (f"{where} [{i}] {selection}", with_variables(expr, {"cluster": "east", **selection}))
            for where, i, expr in QUERIES
        ]
    differ = []
    for where, expr in checks:
        a, b = reference.query(expr, at), second.query(expr, at)
        if not same(a, b):
            differ.append(f"{where}:\n  prometheus        {a}\n  victoria-metrics  {b}")
    assert not differ, f"{len(differ)} of {len(checks)} differ:\n" + "\n".join(differ)
    # Equal, and not by being empty: every recorded series and every panel at All has data
    # (an alert that does not fire is empty on both, as it should be).
    must_have_data = [c for c in checks if c[0].startswith("recorded") or c[0].endswith(" {}")]
    empty = [where for where, expr in must_have_data if not second.query(expr, at)]
    assert not empty and len(must_have_data) > 60, (empty, len(must_have_data))

"""Dashboards, rules and routing: the real promtool and amtool, against a real scrape."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter.app import Exporter
from exporter.config import parse_config
from mixin import dashboards as mixin_dashboards
from mixin.build import outputs
from mixin.config import MixinConfig
from tests.fake_pynvml import FakeDevice, FakeNvml
from tests.helpers import EngineProcess, wait_for

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "alerts" / "kvcache-rules.yml"
RULE_TESTS = sorted((ROOT / "alerts" / "tests").glob("*.test.yml"))
ALERTMANAGER = ROOT / "alerts" / "alertmanager.yml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
# Grafana's variables, replaced by what Grafana would send, so promtool can parse the query.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "5m",
    **{f"${v}": ".*" for v in ("cluster", "namespace", "instance", "model", "engine", "dp_rank")},
}
METRIC = re.compile(r"(?<![\w:])(kvcache_[a-z0-9_]+)")
RECORDED = re.compile(r"(?<![\w:])([a-z_]+:kvcache_[a-z0-9_]+:[a-z0-9_]+)")


def tool(name: str | None, what: str) -> str:
    assert name, f"{what} is missing: scripts/test installs it (Debian's prometheus packages)"
    return name


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        for panel in panels(d):
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
        for var in d["templating"]["list"]:
            if var["type"] == "query":
                inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"])
                assert inner, var["query"]
                out.append((f"{path.name}: variable {var['name']}", inner.group(1)))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [
        (f"rule {r.get('alert') or r.get('record')}", r["expr"])
        for group in rules["groups"]
        for r in group["rules"]
    ]


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    # ($1 is label_replace's capture group, not a variable.)
    assert not re.search(r"\$[A-Za-z_{]", expr), f"an unknown Grafana variable in: {expr}"
    return expr


# ------------------------------------------------------------------------- dashboards


def test_regenerating_the_monitoring_content_changes_nothing() -> None:
    """Rules, routing, dashboards and their Kubernetes copies are the mixin's output."""
    for relative, text in outputs(MixinConfig()).items():
        assert (ROOT / relative).read_text() == text, (
            f"{relative} is stale: run .venv/bin/python -m mixin build"
        )
    assert {p.name for p in DASHBOARDS} == set(mixin_dashboards.DASHBOARDS)


def test_dashboards_are_importable_and_every_panel_explains_itself() -> None:
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        names = [v["name"] for v in d["templating"]["list"]]
        assert names == [
            "datasource",
            "cluster",
            "namespace",
            "instance",
            "engine",
            "model",
            "dp_rank",
        ], path.name
        assert d["templating"]["list"][0]["query"] == "prometheus"
        for panel in panels(d):
            if panel["type"] == "row":
                continue
            assert len(panel.get("description", "")) > 60, (
                f"{path.name}: {panel['title']} needs a description"
            )
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), panel["title"]
    titles = {p["title"] for path in DASHBOARDS for p in panels(json.loads(path.read_text()))}
    for needed in (
        "Engines",
        "Engines most at risk (top 20 by active usage)",
        "Usage by model",
        "Active usage, top 10 engines",
        "Evictable fraction, top 10",
        "Max concurrency vs running, by model",
        "Headroom, 10 lowest",
        "Exhaustion ETA, 10 soonest",
        "Prefix hit ratio, 10 lowest",
        "Preemption and eviction rates, top 10",
        "Targets down",
        "Active vs physical usage by pool",
        "Pool breakdown",
        "Requests",
        "Prefix hits by tier",
        "Host and storage tier usage",
        "GPU memory: KV pool vs the rest",
        "Exporter: poll errors by reason",
        "Exporter: poll duration (p99)",
    ):
        assert needed in titles


# ------------------------------------------------------------------------ expressions


@pytest.fixture(scope="module")
def emitted_families() -> set[str]:
    """Metric names a real exporter declares (# TYPE lines list families even without samples)."""
    engine = EngineProcess(None, "--host-tier", "1MiB")
    engine.start()
    nvml = FakeNvml([FakeDevice(uuid="GPU-a", used=2**30)])
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "poll_interval": 0.3,
            "timeout": 0.25,
            "nvml": "on",
            "targets": [{"name": "ref", "kind": "shim", "url": engine.url}],
        }
    )
    exporter = Exporter(config, nvml_module=nvml)  # type: ignore[arg-type]
    exporter.start()
    try:
        wait_for(exporter.healthy, 10, "first poll")
        text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
    finally:
        exporter.stop()
        engine.stop()
    families = {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }
    names = set()
    for name, kind in families.items():
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {n for n in names if n.startswith("kvcache_")}


def test_every_expression_parses_and_names_only_real_metrics(
    emitted_families: set[str], tmp_path: Path
) -> None:
    exprs = dashboard_exprs() + rule_exprs()
    assert len(exprs) > 40
    recorded = {
        r["record"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    named: set[str] = set()
    for where, expr in exprs:
        for metric in METRIC.findall(expr):
            assert metric in emitted_families, f"{where}: {metric} is not emitted by the exporter"
            named.add(metric)
        for rule in RECORDED.findall(expr):
            assert rule in recorded, f"{where}: recording rule {rule} does not exist"
    # Parse every expression with Prometheus' own parser: as recording rules for promtool.
    check = {
        "groups": [
            {
                "name": "parse",
                "rules": [
                    {"record": f"parse:check_{i}:expr", "expr": substitute(expr)}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(check))
    result = subprocess.run(
        [tool(PROMTOOL, "promtool"), "check", "rules", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The dashboards and rules use the contract's core metrics.
    for core in (
        "kvcache_pool_slots",
        "kvcache_active_usage_ratio",
        "kvcache_physical_usage_ratio",
        "kvcache_max_concurrency",
        "kvcache_concurrency_headroom",
        "kvcache_exhaustion_eta_seconds",
        "kvcache_prefix_hit_tokens_total",
        "kvcache_exporter_target_up",
        "kvcache_gpu_memory_bytes",
    ):
        assert core in named, core


# ----------------------------------------------------------------------- rules, routing


def test_promtool_check_rules_is_clean() -> None:
    result = subprocess.run(
        [tool(PROMTOOL, "promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "WARNING" not in result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    assert {p.name for p in RULE_TESTS} >= {
        "capacity.test.yml",
        "prefix.test.yml",
        "exporter.test.yml",
        "gpu.test.yml",
        "fleet.test.yml",
        "reuse.test.yml",
    }
    result = subprocess.run(
        [tool(PROMTOOL, "promtool"), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_tested_documented_and_well_formed() -> None:
    alerts = [
        r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    ]
    assert len(alerts) >= 10
    tested = [t for path in RULE_TESTS for t in yaml.safe_load(path.read_text())["tests"]]
    cases: dict[str, list[bool]] = {}
    clusters: dict[str, set[str]] = {}  # the clusters each alert's series came from in its tests
    fired_with: dict[str, list[dict[str, str]]] = {}
    for test in tested:
        series_clusters = {
            m.group(1)
            for series in test["input_series"]
            if (m := re.search(r'cluster="([^"]+)"', series["series"]))
        }
        for case in test.get("alert_rule_test", []):
            name = case["alertname"]
            cases.setdefault(name, []).append(bool(case["exp_alerts"]))
            clusters.setdefault(name, set()).update(series_clusters)
            fired_with.setdefault(name, []).extend(a["exp_labels"] for a in case["exp_alerts"])
    runbook = RUNBOOKS.read_text()
    for alert in alerts:
        name = alert["alert"]
        assert re.fullmatch(r"KVCache[A-Z][A-Za-z]+", name), name
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        annotations = alert["annotations"]
        assert annotations["summary"].endswith("."), name
        assert "{{ $labels." in annotations["description"] or name == "KVCacheExporterAbsent", name
        assert annotations["runbook_url"] == MixinConfig().runbook_url(name)
        assert annotations["runbook_url"].startswith("https://")
        assert f"\n## {name}\n" in runbook, f"{name} has no runbook section"
        assert True in cases.get(name, []), f"{name} has no promtool case where it fires"
        # A quiet case: before `for:` has passed, or a situation that must not page (and
        # exp_alerts lists every alert expected, so any other series firing fails the test).
        assert False in cases[name], f"{name} has no promtool case where it stays quiet"
        # Fleets: tested with two clusters, and what fires names the cluster it came from.
        assert len(clusters[name]) >= 2, f"{name} is not tested with two clusters"
        assert any("cluster" in labels for labels in fired_with[name]), name


def test_every_recording_rule_has_an_exact_value_test() -> None:
    recorded = [
        r["record"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    ]
    tested: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("promql_expr_test", []):
                assert case["exp_samples"], f"{path.name}: {case['expr']} expects nothing"
                tested.update(RECORDED.findall(case["expr"]))
    assert set(recorded) <= tested, f"no promql_expr_test: {sorted(set(recorded) - tested)}"


def test_alertmanager_config_is_clean_and_routes_by_severity() -> None:
    result = subprocess.run(
        [tool(AMTOOL, "amtool"), "check-config", str(ALERTMANAGER)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(ALERTMANAGER.read_text())
    routes = {r["matchers"][0]: r["receiver"] for r in config["route"]["routes"]}
    assert routes == {'severity="critical"': "pager", 'severity="warning"': "chat"}
    assert config["route"]["group_by"] == ["alertname", "cluster", "namespace", "model", "engine"]
    inhibit = config["inhibit_rules"][0]
    # One replica's critical alert silences that replica's warnings, never another's.
    assert inhibit["source_matchers"] == ['severity="critical"'] and inhibit["equal"] == [
        "cluster",
        "namespace",
        "instance",
        "model",
        "engine",
    ]
    text = ALERTMANAGER.read_text()
    assert "credentials_file:" in text and "api_url_file:" in text
    assert not re.search(
        r"(?i)(api_url|credentials|routing_key|password|token):\s*['\"]?[A-Za-z0-9]", text
    )


def test_routing_with_amtool(tmp_path: Path) -> None:
    amtool = tool(AMTOOL, "amtool")
    for labels, receiver in (
        (["alertname=KVCacheExhausted", "severity=critical"], "pager"),
        (["alertname=KVCachePreemptions", "severity=warning"], "chat"),
    ):
        result = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and result.stdout.strip() == receiver, (
            result.stdout + result.stderr
        )

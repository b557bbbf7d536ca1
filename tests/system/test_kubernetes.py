"""The Kubernetes bundle, offline: every overlay builds with kustomize (kubectl's), every object
validates against the Kubernetes API schema of a named version (kubernetes-validate, strict:
unknown fields fail) or the Prometheus operator's CRD schemas (@kubernetes-models), the
sidecar's config passes the exporter's own validator, and the PrometheusRule's rules pass the
project's promtool tests. What no schema says is checked here too: ports, probes, selectors.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from exporter.config import parse_config
from exporter.webconfig import load_web_config

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (BUNDLE / "overlays").iterdir())
KUBERNETES_VERSION = "1.31.0"
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
NODE = ROOT / "tests" / "node"


def build(overlay: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: scripts/test installs it"
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def validate_crds(objects: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    assert (NODE / "node_modules" / "@kubernetes-models").is_dir(), (
        "tests/node is not installed: scripts/test runs `npm ci --prefix tests/node`"
    )
    return subprocess.run(
        ["node", str(NODE / "validate-crds.mjs")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        cwd=NODE,
        timeout=120,
    )


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_overlays_exist() -> None:
    assert OVERLAYS == ["servicemonitor", "sglang", "vllm"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_every_object_validates(overlay: str) -> None:
    objects = build(BUNDLE / "overlays" / overlay)
    kinds = sorted(o["kind"] for o in objects)
    monitor = "ServiceMonitor" if overlay == "servicemonitor" else "PodMonitor"
    assert kinds == sorted(
        ["ConfigMap"] * 3 + ["Deployment", "PrometheusRule", "Secret", "Service", monitor]
    )
    for o in objects:
        assert o["metadata"].get("namespace") == "llm", o["metadata"]["name"]
        if o["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
    result = validate_crds([o for o in objects if o["kind"] in CRD_KINDS])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("valid: ") == 2, result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_is_wired_as_documented(overlay: str, tmp_path: Path) -> None:
    objects = build(BUNDLE / "overlays" / overlay)
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"engine", "kvcache-exporter"}
    # Port names are unique in the pod, and what the probes and monitors name exists.
    ports = [p for c in containers.values() for p in c.get("ports", [])]
    names = [p["name"] for p in ports]
    assert len(names) == len(set(names)), names
    exporter = containers["kvcache-exporter"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert exporter[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    security = exporter["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert exporter["resources"]["limits"]["memory"] and exporter["resources"]["requests"]["cpu"]
    # The monitor selects these pods (directly or through the Service) on the metrics port.
    labels = pod["metadata"]["labels"]
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {"name": "metrics", "port": 8322, "targetPort": "metrics"} in service["spec"]["ports"]
    (monitor,) = by_kind(objects, "PodMonitor") + by_kind(objects, "ServiceMonitor")
    selected = monitor["spec"]["selector"]["matchLabels"]
    target = service["metadata"]["labels"] if monitor["kind"] == "ServiceMonitor" else labels
    assert selected.items() <= target.items()
    endpoints = monitor["spec"].get("podMetricsEndpoints") or monitor["spec"]["endpoints"]
    assert [e["port"] for e in endpoints] == ["metrics"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance"} in (
        endpoints[0]["relabelings"]
    )
    # The sidecar's config is one the exporter accepts, and it reads the engine in the pod.
    mounts = {m["name"]: m["mountPath"] for m in exporter["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_map = next(
        o
        for o in by_kind(objects, "ConfigMap")
        if o["metadata"]["name"] == volumes["exporter-config"]["configMap"]["name"]
    )
    secret = next(
        o
        for o in by_kind(objects, "Secret")
        if o["metadata"]["name"] == volumes["exporter-web"]["secret"]["secretName"]
    )
    assert exporter["args"] == ["--config", f"{mounts['exporter-config']}/exporter.yaml"]
    raw = yaml.safe_load(config_map["data"]["exporter.yaml"])
    assert raw["web_config_file"] == f"{mounts['exporter-web']}/web-config.yml"
    web = tmp_path / "web-config.yml"
    web.write_bytes(base64.b64decode(secret["data"]["web-config.yml"]))
    load_web_config(str(web))
    config = parse_config({**raw, "web_config_file": str(web)})
    assert int(config.listen_port) == 8322
    (target,) = config.targets
    url = urlsplit(target.url)
    assert url.hostname == "127.0.0.1"
    engine = containers["engine"]
    env = {e["name"]: e.get("value") for e in engine.get("env", [])}
    if target.kind == "shim":
        assert env["KVCACHE_SHIM_LISTEN"] == f"127.0.0.1:{url.port}"
        assert "--scheduler-cls=engine_shim.adapters.vllm.KVCacheShimScheduler" in engine["args"]
        shim_mount = next(m for m in engine["volumeMounts"] if m["name"] == "kvcache-shim")
        assert env["PYTHONPATH"] == shim_mount["mountPath"]
        (init,) = pod["spec"]["initContainers"]
        assert init["command"][-1] == "/shim/" and "engine_shim" in " ".join(init["command"])
    else:
        assert target.kind == "sglang" and "--enable-metrics" in engine["args"]
        assert f"--port={url.port}" in engine["args"]
        assert "KVCACHE_SHIM_LISTEN" not in env and not pod["spec"].get("initContainers")


def test_the_prometheusrule_passes_the_promtool_tests(tmp_path: Path) -> None:
    objects = build(BUNDLE / "overlays" / "vllm")
    (rule,) = by_kind(objects, "PrometheusRule")
    (tmp_path / "kvcache-rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    tests = tmp_path / "tests"
    tests.mkdir()
    for path in (ROOT / "alerts" / "tests").glob("*.test.yml"):
        shutil.copy(path, tests)
    promtool = shutil.which("promtool")
    assert promtool
    result = subprocess.run(
        [promtool, "test", "rules", *sorted(str(p) for p in tests.glob("*.yml"))],
        capture_output=True,
        text=True,
        cwd=tests,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(list(tests.glob("*.yml")))


def test_the_dashboards_configmaps_carry_the_dashboards() -> None:
    objects = build(BUNDLE / "overlays" / "vllm")
    dashboards = [
        o for o in by_kind(objects, "ConfigMap") if "grafana_dashboard" in o["metadata"]["labels"]
    ]
    assert len(dashboards) == 2
    for config_map in dashboards:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = config_map["data"].items()
        assert text == (ROOT / "dashboards" / name).read_text()


def test_the_schema_checks_can_fail() -> None:
    objects = build(BUNDLE / "overlays" / "vllm")
    (monitor,) = by_kind(objects, "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = 15  # a number, not a duration
    result = validate_crds([monitor])
    assert result.returncode == 1 and "invalid: PodMonitor" in result.stdout, result.stdout
    (deployment,) = by_kind(objects, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][1]["readOnlyRootFS"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)

"""docker-compose.yml and its GPU override, validated by Debian's docker-compose (no engine)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose_config(*files: str) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    assert binary, (
        "docker-compose is missing: scripts/test installs Debian's docker-compose package"
    )
    args = [binary, "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(ROOT / f)]
    result = subprocess.run(
        [*args, "config"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_compose_validates_with_pinned_images_health_checks_and_few_ports() -> None:
    config = compose_config("docker-compose.yml")
    services = config["services"]
    assert set(services) == {"engine", "exporter", "prometheus", "alertmanager", "grafana"}
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image})"
    # Only the user-facing UIs are published, and only on loopback.
    published = {
        name: [p["published"] if isinstance(p, dict) else p for p in s.get("ports", [])]
        for name, s in services.items()
        if s.get("ports")
    }
    assert set(published) == {"prometheus", "alertmanager", "grafana"}
    for ports in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"].values():
        for port in ports.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port
    assert set(config["volumes"]) == {
        "engine-kv",
        "prometheus-data",
        "alertmanager-data",
        "grafana-data",
    }
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE" in grafana
    assert services["exporter"]["depends_on"]["engine"]["condition"] == "service_healthy"


def installed_version(command: str) -> str:
    binary = shutil.which(command)
    assert binary, f"{command} is missing: scripts/test installs Debian's prometheus packages"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"version (\d+\.\d+\.\d+)", out.stdout + out.stderr)
    assert found, out.stdout + out.stderr
    return found.group(1)


def test_the_stack_pins_the_prometheus_and_alertmanager_ci_tests_with() -> None:
    """Rules, routing and every dashboard query are checked on the installed releases: the
    stack users start must run those, not newer ones nobody tested here."""
    services = compose_config("docker-compose.yml")["services"]
    assert services["prometheus"]["image"] == f"prom/prometheus:v{installed_version('prometheus')}"
    assert services["alertmanager"]["image"] == (
        f"prom/alertmanager:v{installed_version('prometheus-alertmanager')}"
    )


def test_every_mounted_file_exists_and_the_stack_uses_the_repos_configs() -> None:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = [
        v.split(":")[0]
        for s in raw["services"].values()
        for v in s.get("volumes", [])
        if v.startswith("./")
    ]
    for mount in mounts:
        if mount == "./deploy/secrets":
            continue  # created by the user from the examples (deploy/secrets/README.md)
        assert (ROOT / mount).exists(), mount
    assert "./alerts/kvcache-rules.yml" in mounts and "./alerts/alertmanager.yml" in mounts
    assert "./dashboards" in mounts and "./deploy/exporter/exporter.yaml" in mounts
    for dockerfile in ("docker/exporter.Dockerfile", "docker/engine.Dockerfile"):
        assert (ROOT / dockerfile).exists()
    exporter_image = (ROOT / "docker/exporter.Dockerfile").read_text()
    assert not re.search(r"pip install[^\n]*torch", exporter_image)
    assert "[engine]" not in exporter_image  # the sidecar image never gets the engine extra


def test_gpu_override_gives_the_engine_a_gpu_and_the_exporter_nvml() -> None:
    config = compose_config("docker-compose.yml", "docker-compose.gpu.yml")
    engine, exporter = config["services"]["engine"], config["services"]["exporter"]
    (gpu,) = engine["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    assert "cuda" in engine["command"]
    (nvml,) = exporter["deploy"]["resources"]["reservations"]["devices"]
    assert nvml["capabilities"] == ["utility"]
    assert exporter["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    mounted = [v for v in exporter["volumes"] if v.endswith("/etc/kvcache/exporter.yaml:ro")]
    assert mounted and "exporter.gpu.yaml" in mounted[0]
    assert yaml.safe_load((ROOT / "deploy/exporter/exporter.gpu.yaml").read_text())["nvml"] == "on"

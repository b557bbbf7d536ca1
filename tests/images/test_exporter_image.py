"""The exporter image as users run it: built from docker/exporter.Dockerfile with buildah, run
with podman the way a hardened Kubernetes pod runs it (read-only root, a 1,024-descriptor limit,
the config mounted read-only), scraped over the network, stopped by SIGTERM.

Needs root and Debian's buildah, podman and debootstrap (scripts/test installs them and runs
this folder on its own, after the main suite); the main suite never collects it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devtools import images
from devtools.ports import listening_ports
from tests.helpers import EngineProcess, wait_for

ROOT = images.ROOT
TAG = f"localhost/kvcache-exporter/exporter:test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    missing = images.missing_tools()
    assert not missing, f"scripts/test installs these: {missing}"
    images.build("docker/exporter.Dockerfile", TAG, images.base_image())
    try:
        yield TAG
    finally:
        images.remove_image(TAG)  # vfs keeps a full copy per layer: give the disk back


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineProcess]:
    engine = EngineProcess()
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


class Running:
    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port

    def metrics(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10)

    def exec(self, *command: str) -> tuple[int, str]:
        done = images.podman("exec", self.name, *command, check=False)
        return done.returncode, done.stdout + done.stderr


@contextlib.contextmanager
def exporter_container(image: str, engine: EngineProcess, config_dir: Path) -> Iterator[Running]:
    """The image run as a hardened pod runs it, polling ``engine`` on the host's network."""
    config_dir.chmod(0o755)  # read by the image's own non-root user
    config = config_dir / "exporter.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": "127.0.0.1:0",
                "poll_interval": "1s",
                "nvml": "off",
                "targets": [{"name": "ref", "kind": "shim", "url": engine.url}],
            }
        )
    )
    config.chmod(0o644)
    name = f"kvcache-exporter-test-{uuid.uuid4().hex[:8]}"
    images.podman(
        "run", "--detach", "--name", name, "--network", "host", "--cgroupns", "host",
        "--read-only", *images.ULIMITS, "--volume", f"{config_dir}:/etc/kvcache:ro", image,
    )  # fmt: skip
    try:
        pid = int(images.podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())
        ports: set[int] = set()

        def listening() -> bool:
            ports.update(listening_ports(pid))
            if not ports and not listening_ports(pid) and not Path(f"/proc/{pid}").exists():
                logs = images.podman("logs", name, check=False)
                raise AssertionError(f"the container exited:\n{logs.stdout}{logs.stderr}")
            return bool(ports)

        wait_for(listening, 60, "the containerised exporter to listen")
        (port,) = ports
        yield Running(name, port)
    finally:
        images.podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture(scope="module")
def container(
    image: str, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    with exporter_container(image, engine, tmp_path_factory.mktemp("kvcache-config")) as running:
        yield running


def test_the_image_serves_the_engines_numbers(container: Running, engine: EngineProcess) -> None:
    engine.complete("a prompt long enough to hold a few blocks of the KV cache", max_tokens=8)
    (pool,) = engine.stats()["pools"]  # idle now: these numbers hold until the next request
    expected = {
        ("kvcache_pool_capacity_slots", ""): float(pool["capacity_slots"]),
        ("kvcache_pool_slots", "evictable"): float(pool["evictable_slots"]),
        ("kvcache_pool_slots", "available"): float(pool["available_slots"]),
        ("kvcache_exporter_target_up", ""): 1.0,
    }
    assert expected[("kvcache_pool_slots", "evictable")] > 0  # the prompt's blocks, cached

    def exported() -> dict[tuple[str, str], float]:
        response = container.metrics()
        if response.status_code != 200:
            return {}
        return {
            (sample.name, sample.labels.get("state", "")): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
            if sample.labels.get("engine") == "ref" and sample.labels.get("pool", "full") == "full"
        }

    wait_for(
        lambda: all(exported().get(key) == value for key, value in expected.items()),
        30,
        f"the containerised exporter to publish {expected}",
    )


def test_the_image_runs_as_its_own_user_on_a_read_only_root(container: Running) -> None:
    code, user = container.exec("id", "-un")
    assert code == 0 and user.strip() == "kvcache"
    code, uid = container.exec("id", "-u")
    assert code == 0 and int(uid) != 0
    code, output = container.exec("sh", "-c", "echo x > /opt/kvcache-exporter/written")
    assert code != 0 and "Read-only file system" in output


def test_the_image_has_no_torch(container: Running) -> None:
    code, output = container.exec(
        "python", "-c", "import importlib.util; print(importlib.util.find_spec('torch'))"
    )
    assert code == 0 and output.strip() == "None"


def test_sigterm_stops_the_image_promptly_and_cleanly(
    image: str, engine: EngineProcess, tmp_path: Path
) -> None:
    """Python as PID 1 ignores SIGTERM unless it handles it; a pod would then wait out its
    whole grace period and be killed."""
    with exporter_container(image, engine, tmp_path) as running:
        started = time.monotonic()
        images.podman("stop", "--time", "20", running.name, timeout=60)
        stopped_after = time.monotonic() - started
        exit_code = images.podman("inspect", "--format", "{{.State.ExitCode}}", running.name)
    assert stopped_after < 10, f"SIGTERM was not handled: stopped after {stopped_after:.1f} s"
    assert exit_code.stdout.strip() == "0"


def test_the_kubernetes_init_container_copies_an_importable_shim(
    image: str, tmp_path: Path
) -> None:
    """deploy/kubernetes puts the shim into the stock vLLM image by running this image's copy
    command as an init container (non-root, read-only root, an emptyDir at /shim)."""
    manifest = yaml.safe_load((ROOT / "deploy/kubernetes/base/engine-deployment.yaml").read_text())
    (init,) = manifest["spec"]["template"]["spec"]["initContainers"]
    context = init["securityContext"]
    shim = tmp_path / "shim"
    shim.mkdir(mode=0o777)
    shim.chmod(0o777)  # an emptyDir is world-writable
    (mount,) = init["volumeMounts"]
    images.podman(
        "run", "--rm", "--network", "none", "--cgroupns", "host", "--read-only",
        *images.ULIMITS, "--cap-drop", "ALL",
        "--user", f"{context['runAsUser']}:{context['runAsGroup']}",
        "--volume", f"{shim}:{mount['mountPath']}", "--entrypoint", init["command"][0],
        image, *init["command"][1:],
    )  # fmt: skip
    imported = subprocess.run(
        [sys.executable, "-c", "import engine_shim.adapters.vllm, engine_shim.server, kvstats; "
         "print(engine_shim.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(shim)}, check=False,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == str(shim / "engine_shim/__init__.py")

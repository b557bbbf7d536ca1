"""Configuration reload: SIGHUP (always) and POST /-/reload (with --web.enable-lifecycle), as
Prometheus exporters do. A bad file is refused and the running configuration stays."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devtools.ports import wait_listening
from tests.builders import valid
from tests.helpers import CannedServer, body, wait_for

ROOT = Path(__file__).resolve().parents[2]


def engine(instance: str) -> CannedServer:
    data = valid()
    data["engine"]["instance_id"] = instance
    return CannedServer(body(json.dumps(data).encode()))


@pytest.fixture
def engines() -> Iterator[tuple[CannedServer, CannedServer]]:
    a, b = engine("a"), engine("b")
    yield a, b
    a.close()
    b.close()


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def value(port: int, name: str, **labels: str) -> float | None:
    return metrics(port).get((name, tuple(sorted(labels.items()))))


def write(path: Path, targets: list[dict[str, Any]], **extra: Any) -> None:
    # Port 0: the exporter binds a free port itself; the test reads it back (wait_listening).
    config = {"listen": "127.0.0.1:0", "poll_interval": "200ms", "nvml": "off"}
    path.write_text(yaml.safe_dump({**config, "targets": targets, **extra}))


def start(config: Path, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "--config", str(config), *flags],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM, as an orchestrator stops it; killed if it does not end. Its stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return stderr.decode() if stderr else ""


def up(port: int, name: str) -> bool:
    try:
        return value(port, "kvcache_exporter_target_up", engine=name) == 1
    except httpx.HTTPError:
        return False


def test_sighup_applies_a_good_file_and_keeps_running_on_a_bad_one(
    engines: tuple[CannedServer, CannedServer], tmp_path: Path
) -> None:
    a, b = engines
    config = tmp_path / "exporter.yaml"
    write(config, [{"name": "a", "kind": "shim", "url": a.url}])
    proc = start(config)
    (port,) = wait_listening(proc)
    try:
        wait_for(lambda: up(port, "a"), 20, "target a up")
        polls_before = value(port, "kvcache_exporter_polls_total", engine="a") or 0
        write(
            config,
            [
                {"name": "a", "kind": "shim", "url": a.url},
                {"name": "b", "kind": "shim", "url": b.url},
            ],
        )
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: up(port, "b"), 10, "target b after SIGHUP")
        # Target a was kept as it was: its counters carried on, they did not start again.
        assert (value(port, "kvcache_exporter_polls_total", engine="a") or 0) >= polls_before
        assert value(port, "kvcache_exporter_config_reloads_total", result="success") == 1
        assert value(port, "kvcache_exporter_config_last_reload_successful") == 1

        config.write_text("targets: [oops\n")  # a broken file: refused, nothing changes
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: value(port, "kvcache_exporter_config_reloads_total", result="failure") == 1,
            10,
            "the failed reload counted",
        )
        assert value(port, "kvcache_exporter_config_last_reload_successful") == 0
        assert up(port, "a") and up(port, "b")
        assert proc.poll() is None

        config.write_bytes(b"targets:\n  - name: caf\xe9\n")  # one byte that is not UTF-8
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: value(port, "kvcache_exporter_config_reloads_total", result="failure") == 2,
            10,
            "the second failed reload counted",
        )
        assert up(port, "a") and up(port, "b")
        assert proc.poll() is None
    finally:
        log = stop(proc)
    assert "configuration reloaded: 2 targets (added: b; removed: none)" in log
    assert "reload failed, the running configuration stays" in log and "invalid YAML" in log
    assert "line 2, column 14: not UTF-8 text" in log and "Traceback" not in log
    assert proc.returncode == 0


def test_post_reload_only_with_lifecycle(
    engines: tuple[CannedServer, CannedServer], tmp_path: Path
) -> None:
    a, b = engines
    config = tmp_path / "exporter.yaml"
    write(config, [{"name": "a", "kind": "shim", "url": a.url}])
    plain = start(config)
    (port,) = wait_listening(plain)
    try:
        wait_for(lambda: up(port, "a"), 20, "up")
        assert httpx.post(f"http://127.0.0.1:{port}/-/reload").status_code == 404
    finally:
        stop(plain)
    lifecycle = start(config, "--web.enable-lifecycle")
    (port,) = wait_listening(lifecycle)
    try:
        wait_for(lambda: up(port, "a"), 20, "up")
        write(config, [{"name": "b", "kind": "shim", "url": b.url}])
        reply = httpx.post(f"http://127.0.0.1:{port}/-/reload", timeout=10)
        assert (reply.status_code, reply.text) == (200, "reloaded\n")
        wait_for(lambda: up(port, "b"), 10, "b")
        assert value(port, "kvcache_exporter_target_up", engine="a") is None  # removed
        write(config, [{"name": "b", "kind": "tgi", "url": b.url}])
        reply = httpx.post(f"http://127.0.0.1:{port}/-/reload", timeout=10)
        assert reply.status_code == 500 and "targets[0].kind: must be one of" in reply.text
        assert up(port, "b")
    finally:
        stop(lifecycle)

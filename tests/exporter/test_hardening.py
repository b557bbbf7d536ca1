"""A hostile or broken part must cost only itself: render, poll loop, GPU library, shutdown.

Each test reaches past the parsers (which refuse the bad input in the first place) to the
layer behind them, so that the last line of defence is tested on its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import exporter.state
from devtools.ports import wait_listening
from exporter.app import Exporter
from exporter.exposition import ExporterView, Exposition
from exporter.state import TargetState
from kvstats.validate import parse_snapshot
from tests.builders import valid
from tests.exporter.test_exporter_behaviour import get, snapshot_json, start
from tests.fake_pynvml import FakeDevice, FakeNvml
from tests.helpers import CannedServer, body, wait_for
from tests.test_fuzz import TARGET

ROOT = Path(__file__).resolve().parents[2]


def counted(exp: Exporter, name: str, **labels: str) -> float:
    found = get(exp, name, **labels)
    return found[0] if found else 0.0


def report(name: str, **engine_changes: object) -> exporter.state.TargetReport:
    state = TargetState(dataclasses.replace(TARGET, name=name), eta_window=60)
    data = valid()
    data["engine"]["instance_id"] = name
    state.record_success([parse_snapshot(data)], now=1e9, duration=0.01)
    for rank, view in state.engines.items():  # what a parser bug could let through
        for attr, value in engine_changes.items():
            object.__setattr__(view, attr, value)
        state.engines[rank] = view
    return state.report()


def test_one_unrenderable_target_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    reports = [
        report("good"),
        report("surrogate", model="evil\ud800"),
        report("overflow", capacity_tokens=10**400),
    ]
    exposition = Exposition(ExporterView(reports, [], {}, False, {}), process_metrics=False)
    for again in reports:  # a second poll of each: still left out, counted again
        exposition.update(again)
    text = exposition.render().decode()

    samples = [
        (s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
    ]
    engines = {ls["engine"] for n, ls, _ in samples if n == "kvcache_pool_slots"}
    assert engines == {"good"}
    up = {ls["engine"]: v for n, ls, v in samples if n == "kvcache_exporter_target_up"}
    assert up == {"good": 1.0, "surrogate": 0.0, "overflow": 0.0}
    errors = {
        ls["engine"]: v for n, ls, v in samples if n == "kvcache_exporter_render_errors_total"
    }
    assert errors == {"good": 0.0, "surrogate": 2.0, "overflow": 2.0}
    said = [r for r in caplog.records if "cannot be rendered" in r.getMessage()]
    assert len(said) == 2  # once per target, not once per render


def test_an_exception_while_deriving_is_counted_and_the_loop_goes_on(
    servers: list[CannedServer], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = CannedServer(body(snapshot_json()))
    servers.append(server)
    exp = start([("a", server.url)])
    try:
        wait_for(lambda: get(exp, "kvcache_exporter_target_up", engine="a") == [1], 5, "up")
        real = exporter.state.pool_ratios  # type: ignore[attr-defined]  # patched below

        def broken(pool: object) -> object:
            raise OverflowError("int too large to convert to float")

        monkeypatch.setattr(exporter.state, "pool_ratios", broken)
        wait_for(
            lambda: (
                (
                    get(exp, "kvcache_exporter_poll_errors_total", engine="a", reason="internal")
                    or [0]
                )[0]
                >= 3
            ),
            5,
            "internal failures counted",
        )
        assert get(exp, "kvcache_exporter_target_up", engine="a") == [0]
        assert not get(exp, "kvcache_pool_slots", engine="a")  # no stale numbers left standing
        assert httpx.get(f"http://127.0.0.1:{exp.port}/healthz").status_code == 200
        said = [
            r
            for r in caplog.records
            if "internal" in r.getMessage() and "target a" in r.getMessage()
        ]
        assert len(said) == 1 and said[0].exc_info is not None  # one line, with the traceback
        monkeypatch.setattr(exporter.state, "pool_ratios", real)
        wait_for(lambda: get(exp, "kvcache_exporter_target_up", engine="a") == [1], 5, "back up")
    finally:
        exp.stop()


def test_healthz_reports_a_polling_task_that_ended(servers: list[CannedServer]) -> None:
    server = CannedServer(body(snapshot_json()))
    servers.append(server)
    exp = start([("a", server.url), ("b", server.url.replace("127.0.0.1", "localhost"))])
    try:
        url = f"http://127.0.0.1:{exp.port}/healthz"
        wait_for(lambda: httpx.get(url).status_code == 200, 5, "healthy")
        loop = exp.poller._loop
        assert loop is not None
        loop.call_soon_threadsafe(exp.poller._tasks[0].cancel)
        wait_for(lambda: httpx.get(url).status_code == 503, 5, "unhealthy")
    finally:
        exp.stop()


def test_a_hung_gpu_library_is_counted_and_its_series_go(servers: list[CannedServer]) -> None:
    server = CannedServer(body(snapshot_json()))
    servers.append(server)
    device = FakeDevice(uuid="GPU-a", used=2**30)
    exp = start([("a", server.url)], FakeNvml([device]))
    try:
        wait_for(lambda: get(exp, "kvcache_gpu_memory_total_bytes") == [80 * 2**30], 5, "GPU")
        device.hung = True
        wait_for(lambda: not get(exp, "kvcache_gpu_memory_total_bytes"), 5, "GPU series to go")
        wait_for(
            lambda: (
                (
                    get(exp, "kvcache_exporter_nvml_errors_total", gpu="all", reason="NvmlTimeout")
                    or [0]
                )[0]
                >= 2
            ),
            5,
            "the hang counted, poll after poll",
        )
        assert get(exp, "kvcache_pool_slots", engine="a", state="used") == [160]  # KV goes on
        started = time.monotonic()
    finally:
        exp.stop()
    assert time.monotonic() - started < 5, "stop() waited for the hung NVML call"
    device.hung = False


def test_sigterm_ends_the_exporter_within_5_s_while_nvml_hangs(tmp_path: Path) -> None:
    config = {
        "listen": "127.0.0.1:0",
        "poll_interval": "500ms",
        "timeout": "300ms",
        "nvml": "on",
        "targets": [{"name": "a", "kind": "shim", "url": "http://127.0.0.1:9"}],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "KVCACHE_EXPORTER_PYNVML": "tests.fake_nvml_module",
        "FAKE_NVML_DEVICES": json.dumps([{"uuid": "GPU-a", "hung": True}]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "--config", str(tmp_path / "c.yaml")],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
    )
    (port,) = wait_listening(proc, timeout=30)
    url = f"http://127.0.0.1:{port}/metrics"

    def hang_counted() -> bool:
        try:
            return "NvmlTimeout" in httpx.get(url, timeout=2).text
        except httpx.HTTPError:
            return False  # still starting

    try:
        wait_for(hang_counted, 10, "the hang counted")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = proc.wait(timeout=10)
        took = time.monotonic() - started
    finally:
        proc.kill()  # whatever happened above, no exporter outlives the test
        proc.wait()
    assert took < 5
    assert code == 0, proc.stderr.read().decode() if proc.stderr else ""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize(("path", "status"), [("/metrics", 405), ("/healthz", 405), ("/x", 404)])
def test_other_methods_are_405_on_served_paths_and_404_elsewhere(
    method: str, path: str, status: int
) -> None:
    exporter = start([("t", "http://127.0.0.1:9")])
    try:
        response = httpx.request(method, f"http://127.0.0.1:{exporter.port}{path}", content=b"x")
        assert response.status_code == status
        if status == 405:
            assert response.headers["Allow"] == "GET, HEAD"
        assert response.headers.get("Connection") == "close"
    finally:
        exporter.stop()


def test_a_request_hidden_in_a_refused_body_is_never_answered() -> None:
    """A refused POST's body is not read: the connection closes instead of parsing it as a
    second request (request desync)."""
    from tests.exporter.test_exporter_security import raw_exchange, smuggling

    exporter = start([("t", "http://127.0.0.1:9")])
    try:
        hidden = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        received = raw_exchange(exporter.port, smuggling(b"POST /metrics", hidden))
        assert received.startswith(b"HTTP/1.0 405") or received.startswith(b"HTTP/1.1 405")
        assert received.count(b"HTTP/1.") == 1, received[:300]
    finally:
        exporter.stop()

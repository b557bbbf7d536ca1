"""The shim's HTTP endpoint on a real socket: stats, health, completions and bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from engine_shim.reference import EngineConfig, ReferenceEngine
from engine_shim.reference.api import completions
from engine_shim.server import ShimApp, ShimServer
from kvstats.validate import parse_snapshot
from tests.helpers import EngineProcess, wait_for


@pytest.fixture
def shim() -> Iterator[tuple[str, ReferenceEngine]]:
    engine = ReferenceEngine(
        EngineConfig(kv_memory_bytes=2**20, max_model_len=256, iteration_time=0.0)
    )
    engine.start()
    server = ShimServer(
        ShimApp(
            snapshots=lambda: [engine.snapshot()],
            healthy=engine.alive,
            completions=lambda body: completions(engine, body),
        )
    )
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", engine
    finally:
        server.stop()
        engine.stop()


def test_stats_is_a_valid_snapshot_and_health_is_ok(shim: tuple[str, ReferenceEngine]) -> None:
    url, engine = shim
    snap = parse_snapshot(httpx.get(f"{url}/v1/kv/stats").json())
    assert snap.engine.kind == "reference"
    assert snap.engine.instance_id == engine.instance_id
    assert snap.pool("full") is not None
    health = httpx.get(f"{url}/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_completion_reports_cached_tokens_by_tier(shim: tuple[str, ReferenceEngine]) -> None:
    url, _ = shim
    prompt = " ".join(f"word{i}" for i in range(60))
    body = {"prompt": prompt, "max_tokens": 5, "return_cached_tokens_details": True}
    first = httpx.post(f"{url}/v1/completions", json=body).json()
    second = httpx.post(f"{url}/v1/completions", json=body).json()
    assert first["usage"]["prompt_tokens"] == 60
    assert first["usage"]["completion_tokens"] == 5
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 48  # 3 full blocks of 16
    assert second["cached_tokens_details"] == {"device": 48, "host": 0, "storage": 0}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert len(second["choices"][0]["text"].split()) == 5
    plain = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
    assert "cached_tokens_details" not in plain


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"prompt": "a b", "max_tokens": -1}).encode(), 400, "at least 1"),
        (json.dumps({"prompt": "a b", "max_tokens": "3"}).encode(), 400, "must be an integer"),
        (json.dumps({"prompt": " ".join(["w"] * 300)}).encode(), 400, "exceeds max_model_len"),
        (json.dumps({"prompt": ""}).encode(), 400, "must not be empty"),
        (json.dumps({"prompt": 5}).encode(), 400, "prompt must be"),
        (json.dumps({"prompt": "x", "return_cached_tokens_details": 1}).encode(), 400, "boolean"),
        (b"\xff\xfe", 400, "not valid JSON"),
    ],
)
def test_bad_completions_get_4xx_and_the_engine_keeps_serving(
    shim: tuple[str, ReferenceEngine], content: bytes, status: int, message: str
) -> None:
    url, _ = shim
    response = httpx.post(
        f"{url}/v1/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "still alive", "max_tokens": 2})
    assert ok.status_code == 200


def test_oversized_and_unframed_bodies_are_refused(shim: tuple[str, ReferenceEngine]) -> None:
    url, _ = shim
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
        )
        assert b" 413 " in sock.recv(4096)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 411 " in sock.recv(4096)


def test_stats_path_is_get_only(shim: tuple[str, ReferenceEngine]) -> None:
    url, _ = shim
    assert httpx.post(f"{url}/v1/kv/stats", content=b"{}").status_code == 405
    assert httpx.put(f"{url}/v1/kv/stats").status_code == 405
    assert httpx.get(f"{url}/nope").status_code == 404


def test_bearer_token_protects_stats() -> None:
    engine = ReferenceEngine(EngineConfig(kv_memory_bytes=2**20))
    server = ShimServer(
        ShimApp(snapshots=lambda: [engine.snapshot()], healthy=lambda: True, bearer_token="s3cret")
    )
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/v1/kv/stats"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        server.stop()


def test_health_reports_a_dead_engine_loop() -> None:
    engine = ReferenceEngine(EngineConfig(kv_memory_bytes=2**20))
    server = ShimServer(ShimApp(snapshots=lambda: [engine.snapshot()], healthy=engine.alive))
    server.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 503
    finally:
        server.stop()


def test_cli_serves_the_reference_engine() -> None:
    engine = EngineProcess(None, "--workload", "chat")
    engine.start()  # waits until /healthz answers
    try:
        wait_for(
            lambda: bool(parse_snapshot(engine.stats()).counters.iterations),
            60,
            "the shim to serve a busy snapshot",
        )
        assert parse_snapshot(engine.stats()).pool("full") is not None
    finally:
        assert engine.stop() == 0  # a clean exit on SIGTERM


def test_cli_rejects_bad_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine_shim.cli", "reference", "--dtype", "int3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "dtype must be one of" in result.stderr

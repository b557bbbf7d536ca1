"""The live engine under pressure: a small pool, preemptions, and the whole monitoring chain.

Counts served over HTTP while requests are preempted must each be a state the pool was really in
(the in-engine brute force logs every one); then the exporter (its own process and venv, as
deployed) polls the engine through the shim and the /metrics bridge, a real Prometheus scrapes
it with the project's rules, ``KVCacheExhausted`` fires and ``KVCacheStaleData`` stays quiet on
the idle engine afterwards.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devtools.ports import wait_listening
from devtools.vllm_server import ROOT, VllmServer
from tests.timescale import compress_minutes

from .test_live_vllm import (
    MODELS,
    assert_every_step_counted_exactly,
    samples,
    shim,
    unique_tokens,
    wait_idle,
)

POOL_BLOCKS = 48  # 47 usable: 8 requests of 1,200 tokens need 80 in the full-attention group
PROMPT, OUTPUT, REQUESTS = 600, 600, 8
EXPORTER_PYTHON = ROOT / ".venv" / "bin" / "python"


@pytest.fixture(scope="module", params=MODELS)
def pressure_server(
    request: pytest.FixtureRequest, models: dict[str, Path], workdir: Path
) -> Iterator[VllmServer]:
    small_pool = ("--num-gpu-blocks-override", str(POOL_BLOCKS))
    server = VllmServer(
        models[request.param], workdir / f"pressure-{request.param}", extra_args=small_pool
    )
    with server.running():
        yield server


def wave(server: VllmServer, seed: int) -> None:
    prompts = [unique_tokens(seed * 100 + i, PROMPT) for i in range(REQUESTS)]
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        list(pool.map(lambda p: server.complete(p, OUTPUT), prompts))


def test_under_pressure_every_served_count_is_a_real_pool_state(
    pressure_server: VllmServer,
) -> None:
    server = pressure_server
    served: list[tuple[int, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pool = shim(server).pools[0]
            assert pool.evictable_slots is not None and pool.available_slots is not None
            counts = (pool.used_slots, pool.evictable_slots, pool.available_slots)
            assert sum(counts) == pool.capacity_slots == (POOL_BLOCKS - 1) * pool.block_size
            used, evictable, available = (c // pool.block_size for c in counts)
            served.append((used, evictable, available))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        wave(server, seed=1)
    finally:
        stop.set()
        sampler.join(timeout=10)
    snap = wait_idle(server)
    text = server.metrics()

    checks = assert_every_step_counted_exactly(server)
    states = {tuple(c["truth"]) for c in checks}
    assert len(served) >= 50
    strays = [s for s in served if s not in states]
    assert not strays, f"served counts the pool was never in: {strays[:5]}"
    assert max(s[0] for s in served) >= 0.9 * (POOL_BLOCKS - 1), "the pool never filled"
    c = snap.counters
    assert c.preemptions == samples(text, "vllm:num_preemptions_total") > 0
    assert c.prefix_query_tokens == samples(text, "vllm:prefix_cache_queries_total")
    assert c.prefix_hit_tokens["device"] == samples(text, "vllm:prefix_cache_hits_total")
    assert c.iterations == samples(text, "vllm:iteration_tokens_total_count")


class Chain:
    """The exporter (from the project's own venv) and Debian's Prometheus with our rules."""

    def __init__(
        self, server: VllmServer, tmp: Path, targets: list[dict[str, Any]] | None = None
    ) -> None:
        self.tmp = tmp
        self.exporter_port = self.prom_port = 0  # each bound by its process, read back
        config = {
            "listen": "127.0.0.1:0",
            "poll_interval": "1s",
            "timeout": "800ms",
            "nvml": "off",
            "targets": targets
            or [
                {"name": "live-shim", "kind": "shim", "url": server.shim_url},
                {"name": "live-bridge", "kind": "vllm", "url": server.url},
            ],
        }
        (tmp / "exporter.yaml").write_text(yaml.safe_dump(config))
        rules = compress_minutes((ROOT / "alerts/kvcache-rules.yml").read_text())
        # Staleness at the test's scale: 5 s instead of a minute (an idle engine's snapshot was
        # once 198 s old; now it must stay fresh however long the engine is quiet).
        rules = rules.replace(
            "time() - kvcache_snapshot_timestamp_seconds > 60",
            "time() - kvcache_snapshot_timestamp_seconds > 5",
        )
        assert "> 5\n" in rules
        (tmp / "rules.yml").write_text(rules)
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, cmd: list[str]) -> int:
        """Start ``name`` on port 0; the port it bound."""
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        try:
            (port,) = wait_listening(proc, timeout=60)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None
        return port

    def start_exporter(self) -> None:
        assert EXPORTER_PYTHON.exists(), "the project's .venv is missing: run scripts/test"
        self.exporter_port = self.spawn(
            "exporter",
            [
                str(EXPORTER_PYTHON),
                "-m",
                "exporter.cli",
                "--config",
                str(self.tmp / "exporter.yaml"),
            ],
        )

    def start(self) -> None:
        prometheus = shutil.which("prometheus")
        assert prometheus, "prometheus is missing: scripts/test installs Debian's package"
        self.start_exporter()
        prom = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(self.tmp / "rules.yml")],
            "scrape_configs": [
                {
                    "job_name": "kvcache-exporter",
                    "static_configs": [{"targets": [f"127.0.0.1:{self.exporter_port}"]}],
                }
            ],
        }
        (self.tmp / "prometheus.yml").write_text(yaml.safe_dump(prom))
        self.prom_port = self.spawn(
            "prometheus",
            [
                prometheus,
                f"--config.file={self.tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.tmp / 'tsdb'}",
                "--web.listen-address=127.0.0.1:0",
            ],
        )

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"http://127.0.0.1:{self.prom_port}/api/v1/{path}", params=params, timeout=5)
        r.raise_for_status()
        return r.json()["data"]

    def wait(self, check: Any, timeout: float, what: str) -> float:
        start = time.monotonic()
        while True:
            for proc in self.procs:
                assert proc.poll() is None, f"{proc.args!r} exited: {self.logs()}"
            try:
                if check():
                    return time.monotonic() - start
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # Prometheus starting (503, not JSON yet)
            assert time.monotonic() - start < timeout, f"timed out: {what}\n{self.logs()}"
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.tmp.glob("*.log")
        )

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]


def test_the_whole_chain_pages_on_pressure_and_not_on_a_quiet_engine(
    pressure_server: VllmServer, tmp_path: Path
) -> None:
    server = pressure_server
    chain = Chain(server, tmp_path)
    chain.start()
    try:
        chain.wait(
            lambda: (
                all(t["health"] == "up" for t in chain.api("targets")["activeTargets"])
                and len(chain.api("query", query="kvcache_exporter_target_up == 1")["result"]) == 2
            ),
            90,
            "both targets up in Prometheus",
        )
        # Both engine paths publish vLLM's own token capacity for this engine.
        capacity = chain.api("query", query="kvcache_capacity_tokens")["result"]
        assert {r["metric"]["engine"] for r in capacity} == {"live-shim", "live-bridge"}
        assert len({r["value"][1] for r in capacity}) == 1
        # Pressure until the critical alert fires for the shim's engine.
        stop = threading.Event()

        def pressure() -> None:
            seed = 10
            while not stop.is_set():
                wave(server, seed)
                seed += 1

        thread = threading.Thread(target=pressure, daemon=True)
        thread.start()
        try:
            chain.wait(
                lambda: any(
                    a["state"] == "firing" and a["labels"]["engine"] == "live-shim"
                    for a in chain.alerts("KVCacheExhausted")
                ),
                240,
                "KVCacheExhausted firing for the live engine",
            )
        finally:
            stop.set()
            thread.join(timeout=300)
        wait_idle(server)
        # A quiet engine for three times the (compressed) staleness threshold plus its for:.
        time.sleep(20)
        stale = chain.alerts("KVCacheStaleData")
        assert not stale, f"KVCacheStaleData on an idle engine: {stale}"
        ages = chain.api("query", query="time() - kvcache_snapshot_timestamp_seconds")["result"]
        assert ages and all(float(r["value"][1]) < 3 for r in ages), ages
    finally:
        chain.stop()

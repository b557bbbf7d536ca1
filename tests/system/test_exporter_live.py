"""The exporter against a real reference engine process, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import gzip
import math
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter
from exporter.config import parse_config
from kvstats.validate import parse_snapshot
from tests.fake_pynvml import FakeDevice, FakeNvml
from tests.helpers import EngineProcess, wait_for

INTERVAL = 0.5
PROMTOOL = shutil.which("promtool")


def scrape(exporter: Exporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    matches = [
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    ]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} series"
    return float(matches[0])


def has(samples: dict, name: str, **labels: str) -> bool:  # type: ignore[type-arg]
    return any(
        n == name and all(dict(ls).get(k) == x for k, x in labels.items()) for (n, ls) in samples
    )


@pytest.fixture
def engine() -> Iterator[EngineProcess]:
    proc = EngineProcess(None, "--host-tier", "1MiB", "--iteration-time", "0")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def make_exporter(url: str, nvml: FakeNvml | None = None, **extra: object) -> Exporter:
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "poll_interval": INTERVAL,
            "timeout": 0.4,
            "nvml": "on" if nvml else "off",
            "targets": [{"name": "ref", "kind": "shim", "url": url}],
            **extra,
        }
    )
    exporter = Exporter(config, nvml_module=nvml)  # type: ignore[arg-type]
    exporter.start()
    return exporter


def test_every_contract_metric_matches_the_engines_own_snapshot(engine: EngineProcess) -> None:
    for i in range(6):  # some cached prefixes, some evictable, some hits
        engine.complete(" ".join(f"w{j}" for j in range(40 + i)), 8)
        engine.complete(" ".join(f"w{j}" for j in range(40 + i)), 8)
    uuid = "GPU-00000000-1111-2222-3333-444444444444"
    nvml = FakeNvml([FakeDevice(uuid=uuid, used=30 * 2**30, utilization=55)])
    exporter = make_exporter(engine.url, nvml, gpus={"ref": uuid})
    try:
        wait_for(exporter.healthy, 10, "first poll")
        pair: list[Any] = []

        def same_snapshot() -> bool:
            """The engine's report and a scrape of the exporter that carries that very report."""
            report = engine.stats()
            samples = scrape(exporter)
            pair[:] = [parse_snapshot(report), samples]
            stamp = value(samples, "kvcache_snapshot_timestamp_seconds", engine="ref", dp_rank="0")
            return bool(stamp == report["time"])

        wait_for(same_snapshot, 10, "a scrape carrying the engine's current report")
        truth, samples = pair
        e = {"engine": "ref", "dp_rank": "0", "model": "reference-tiny"}
        full = truth.pool("full")
        assert (
            full is not None
            and full.evictable_slots is not None
            and full.available_slots is not None
        )
        p = {**e, "pool": "full"}
        assert value(samples, "kvcache_pool_capacity_slots", **p) == full.capacity_slots
        assert value(samples, "kvcache_pool_slots", **p, state="used") == full.used_slots
        assert (
            value(samples, "kvcache_pool_slots", **p, state="evictable") == full.evictable_slots > 0
        )
        assert value(samples, "kvcache_pool_slots", **p, state="available") == full.available_slots
        cap = full.capacity_slots
        assert (
            value(samples, "kvcache_physical_usage_ratio", **p)
            == (full.used_slots + full.evictable_slots) / cap
        )
        assert value(samples, "kvcache_active_usage_ratio", **p) == full.used_slots / cap
        assert value(samples, "kvcache_evictable_ratio", **p) == full.evictable_slots / cap
        assert (
            value(samples, "kvcache_pool_bytes", **p) == cap * 1024
        )  # 4 layers x 2 x 2 heads x 32 x fp16
        assert value(samples, "kvcache_block_size_tokens", **p) == 16
        assert truth.max_concurrency is not None
        assert value(samples, "kvcache_max_concurrency", **e) == truth.max_concurrency == cap / 512
        # Idle: nothing pinned, so every max-length request's blocks are free: floor(cap/512).
        assert value(samples, "kvcache_concurrency_headroom", **e) == math.floor(
            (cap - full.used_slots) / 512
        )
        assert value(samples, "kvcache_max_model_len_tokens", **e) == 512
        assert truth.requests is not None
        assert value(samples, "kvcache_requests", **e, state="running") == truth.requests.running
        assert value(samples, "kvcache_requests", **e, state="waiting") == truth.requests.waiting
        c = truth.counters
        assert value(samples, "kvcache_prefix_query_tokens_total", **e) == c.prefix_query_tokens
        assert (
            value(samples, "kvcache_prefix_hit_tokens_total", **e, tier="device")
            == c.prefix_hit_tokens["device"]
            > 0
        )
        assert (
            value(samples, "kvcache_prefix_hit_tokens_total", **e, tier="host")
            == c.prefix_hit_tokens["host"]
        )
        assert not has(
            samples, "kvcache_prefix_hit_tokens_total", tier="storage"
        )  # no storage tier: absent
        assert value(samples, "kvcache_evicted_tokens_total", **e) == c.evicted_tokens
        assert value(samples, "kvcache_preemptions_total", **e) == c.preemptions
        assert value(samples, "kvcache_iterations_total", **e) == c.iterations
        assert truth.host_tier is not None
        assert (
            value(samples, "kvcache_tier_capacity_tokens", **e, tier="host")
            == truth.host_tier.capacity_tokens
        )
        assert (
            value(samples, "kvcache_tier_used_tokens", **e, tier="host")
            == truth.host_tier.used_tokens
        )
        assert (
            value(
                samples, "kvcache_engine_info", **e, engine_kind="reference", engine_version="0.1.0"
            )
            == 1
        )
        assert not has(samples, "kvcache_exhaustion_eta_seconds")  # idle: not growing, so absent
        assert value(samples, "kvcache_exporter_target_up", engine="ref") == 1
        assert (
            value(samples, "kvcache_exporter_poll_errors_total", engine="ref", reason="connect")
            == 0
        )
        assert value(samples, "kvcache_exporter_build_info", version="0.1.0") == 1
        # NVML, joined to the engine through the configured GPU mapping.
        g = {"gpu": "0", "uuid": uuid}
        assert value(samples, "kvcache_gpu_memory_bytes", **g, state="used") == 30 * 2**30
        assert value(samples, "kvcache_gpu_memory_bytes", **g, state="free") == 50 * 2**30
        assert value(samples, "kvcache_gpu_utilization_ratio", **g) == 0.55
        assert value(samples, "kvcache_gpu_non_kv_memory_bytes", **g) == 30 * 2**30 - cap * 1024
        assert value(samples, "kvcache_gpu_engine_info", **g, **e) == 1
    finally:
        exporter.stop()


def test_killed_engine_vanishes_and_restart_keeps_counters_monotonic(engine: EngineProcess) -> None:
    engine.complete("a b c d e f g h i j k l m n o p q r s t", 8)
    exporter = make_exporter(engine.url)
    e = {"engine": "ref", "dp_rank": "0"}
    try:
        wait_for(lambda: has(scrape(exporter), "kvcache_iterations_total"), 10, "data")
        before = scrape(exporter)
        queries_before = value(before, "kvcache_prefix_query_tokens_total", **e)
        iterations_before = value(before, "kvcache_iterations_total", **e)

        engine.kill()
        gone = wait_for(
            lambda: not has(scrape(exporter), "kvcache_pool_slots"), 5, "series to vanish"
        )
        assert gone <= 2 * INTERVAL + 0.1, f"series vanished after {gone:.2f} s"
        down = scrape(exporter)
        assert value(down, "kvcache_exporter_target_up", engine="ref") == 0
        assert (
            value(down, "kvcache_exporter_poll_errors_total", engine="ref", reason="connect") >= 1
        )
        assert not has(down, "kvcache_prefix_query_tokens_total")  # no stale values served

        engine.start()
        polls_when_back = value(scrape(exporter), "kvcache_exporter_polls_total", engine="ref")
        wait_for(lambda: has(scrape(exporter), "kvcache_pool_slots"), 10, "data to return")
        # Data returns on the first poll after the engine is back (one poll may have been in
        # flight, and failed, while it came up). Backoff may have spaced the polls out.
        polls_with_data = value(scrape(exporter), "kvcache_exporter_polls_total", engine="ref")
        assert polls_with_data - polls_when_back <= 2
        engine.complete("z y x w v u t s r q p o n m l k j i h g", 8)
        wait_for(
            lambda: (
                value(scrape(exporter), "kvcache_prefix_query_tokens_total", **e) > queries_before
            ),
            5,
            "new queries",
        )
        after = scrape(exporter)
        # The new engine counts from 0; the exporter continues from where it was.
        assert value(after, "kvcache_prefix_query_tokens_total", **e) == queries_before + 20
        assert value(after, "kvcache_iterations_total", **e) >= iterations_before
        assert value(after, "kvcache_exporter_engine_restarts_total", engine="ref") == 1
        assert value(after, "kvcache_exporter_target_up", engine="ref") == 1
    finally:
        exporter.stop()


def test_promtool_check_metrics_finds_nothing(engine: EngineProcess) -> None:
    assert PROMTOOL, "promtool is missing: scripts/test installs it (Debian's prometheus package)"
    engine.complete("one two three four five six seven eight nine ten eleven twelve thirteen", 4)
    nvml = FakeNvml([FakeDevice(uuid="GPU-a", used=2**30), FakeDevice(uuid="GPU-b", used=2**31)])
    exporter = make_exporter(engine.url, nvml, gpus={"ref": "GPU-a"})
    try:
        wait_for(exporter.healthy, 10, "first poll")
        text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
        assert "kvcache_gpu_memory_bytes" in text and "kvcache_pool_slots" in text
        result = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "" and result.stderr.strip() == "", (
            result.stdout + result.stderr
        )
    finally:
        exporter.stop()


def test_gzip_scrape_is_the_same_exposition(engine: EngineProcess) -> None:
    exporter = make_exporter(engine.url)
    try:
        wait_for(exporter.healthy, 10, "first poll")
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        raw = httpx.get(url, headers={"Accept-Encoding": "gzip"})  # httpx decodes gzip itself
        assert raw.headers["Content-Encoding"] == "gzip"
        with httpx.Client() as client:
            stream = client.build_request("GET", url, headers={"Accept-Encoding": "gzip"})
            response = client.send(stream, stream=True)
            body = gzip.decompress(b"".join(response.iter_raw()))
            response.close()
        plain = httpx.get(url, headers={"Accept-Encoding": "identity"}).text
        strip = lambda t: [ln for ln in t.splitlines() if not ln.startswith("process_")]  # noqa: E731
        assert strip(body.decode()) == strip(plain)
        assert httpx.get(f"http://127.0.0.1:{exporter.port}/").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{exporter.port}/healthz").text == "ok\n"
    finally:
        exporter.stop()


def test_exporter_process_never_imports_torch(engine: EngineProcess) -> None:
    script = textwrap.dedent(f"""
        import sys, time, pkgutil, importlib
        import exporter
        for m in pkgutil.walk_packages(exporter.__path__, "exporter."):
            importlib.import_module(m.name)
        from exporter.app import Exporter
        from exporter.config import parse_config
        config = parse_config({{"listen": "127.0.0.1:0", "poll_interval": 0.2, "timeout": 0.2,
                               "nvml": "auto",
                               "targets": [{{"name": "ref", "kind": "shim", "url": "{engine.url}"}},
                                           {{"name": "v", "kind": "vllm", "url": "http://127.0.0.1:1"}}]}})
        e = Exporter(config); e.start()
        import httpx
        deadline = time.monotonic() + 30
        while "kvcache_pool_slots" not in httpx.get(f"http://127.0.0.1:{{e.port}}/metrics").text:
            assert time.monotonic() < deadline, "no pool metrics within 30 s"
            time.sleep(0.1)
        e.stop()
        print("torch" in sys.modules)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"

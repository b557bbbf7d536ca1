"""The fault matrix: misbehaving targets on loopback, all polled by one exporter at once.

Every fault must be counted under its reason, make only its own target's series vanish
(target_up 0, nothing stale served), and never slow down or stop a healthy target polled
beside it.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine_shim.reference import EngineConfig, ReferenceEngine
from engine_shim.reference.workload import Workload
from engine_shim.server import ShimApp, ShimServer
from exporter.app import Exporter
from exporter.config import parse_config
from kvstats.validate import parse_snapshot
from tests.builders import valid
from tests.conftest import FIXTURES
from tests.helpers import CannedServer, body, wait_for

# Every faulty target answers from this process (one GIL with the exporter), all on the same
# poll tick: on a loaded machine (two suites at once) a 404 took longer than a 0.3 s deadline
# and was counted, correctly, as a timeout. The deadline is 0.9 s: the hanging and trickling
# targets still time out, and a slow answer on a busy machine is still its own fault.
INTERVAL = 1.0
TIMEOUT = 0.9


def trickle(handler: BaseHTTPRequestHandler) -> None:
    """Valid headers, then a byte every 0.2 s: each read is quick, the whole answer is not."""
    payload = json.dumps(valid()).encode()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    try:
        for byte in payload:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.2)
    except OSError:
        pass


def json_with(**changes: Any) -> bytes:
    data = valid()
    for path, value in changes.items():
        target: Any = data
        *head, last = path.split("__")
        for key in head:
            target = target[int(key)] if key.isdigit() else target[key]
        target[last] = value
    return json.dumps(data).encode()  # allow_nan: Python writes NaN, as a buggy engine might


class SilentListener:
    """Accepts connections and never answers (a hung process with its socket open)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


FAULTS: dict[str, tuple[Any, str]] = {
    "notfound": (body(b"no", status=404, content_type="text/plain"), "http_status"),
    "error500": (body(b"boom", status=500, content_type="text/plain"), "http_status"),
    "truncated": (body(json.dumps(valid()).encode()[:-40]), "invalid_body"),
    "garbage": (body(b"\x00\xff not json"), "invalid_body"),
    "schema_v9": (body(json_with(schema="kvcache.stats/v9")), "invalid_snapshot"),
    "nan": (body(json_with(pools__0__used_slots=math.nan)), "invalid_snapshot"),
    "negative": (
        body(json_with(pools__0__evictable_slots=-16, pools__0__available_slots=656)),
        "invalid_snapshot",
    ),
    "inconsistent": (body(json_with(pools__0__used_slots=176)), "invalid_snapshot"),
    "trickle": (trickle, "timeout"),
    # Numbers a JSON parser accepts but no metric sample can hold (once rendering broke every
    # target's scrape), and input built to exhaust the parser itself.
    "huge_tier": (body(json_with(host_tier__capacity_tokens=10**400)), "invalid_snapshot"),
    "huge_counter": (body(json_with(counters__preemptions=2**64)), "invalid_snapshot"),
    "digits_5000": (
        body(
            json.dumps(valid()).replace('"preemptions": 1', '"preemptions": ' + "7" * 5000).encode()
        ),
        "invalid_body",
    ),
    "nested": (body(b"[" * 100_000 + b"]" * 100_000), "invalid_body"),
}
# Strings no label can hold as they are (a lone surrogate is legal JSON, not UTF-8): the target
# stays up and its labels carry U+FFFD instead.
SANITISED = {
    "surrogates": body(
        json_with(
            engine__instance_id="another-engine",
            engine__version="v\ud800",
            pools__0__name="full\udfff",
            groups__0__pool="full\udfff",
            pools__0__gpu_uuid="GPU-\ud83d",
        )
    ),
}


VLLM_TEXT = (FIXTURES / "vllm-0.33.0-dp1.prom").read_bytes()
SGLANG_TEXT = (FIXTURES / "sglang-0.5.23-hicache.prom").read_bytes()
# Bridge targets (kind, answer, reason): the engines' own /metrics, misbehaving.
BRIDGE_FAULTS: dict[str, tuple[str, Any, str]] = {
    "vllm_garbage": (
        "vllm",
        body(b"vllm:kv_cache_usage_perc{engine=", content_type="text/plain"),
        "invalid_snapshot",
    ),
    "vllm_truncated": (
        "vllm",
        body(
            VLLM_TEXT[: VLLM_TEXT.index(b"vllm:cache_config_info{") + 60], content_type="text/plain"
        ),
        "invalid_snapshot",
    ),
    "sglang_not_sglang": ("sglang", body(VLLM_TEXT, content_type="text/plain"), "invalid_snapshot"),
    "sglang_503": (
        "sglang",
        body(SGLANG_TEXT, status=503, content_type="text/plain"),
        "http_status",
    ),
    "vllm_binary": (
        "vllm",
        body(b"\xff\xfe\x00garbage", content_type="text/plain"),
        "invalid_body",
    ),
}


@pytest.fixture
def matrix() -> Iterator[tuple[Exporter, dict[str, str]]]:
    servers = {name: CannedServer(respond) for name, (respond, _) in FAULTS.items()}
    servers.update({name: CannedServer(respond) for name, respond in SANITISED.items()})
    bridges = {name: CannedServer(respond) for name, (_, respond, _) in BRIDGE_FAULTS.items()}
    good = CannedServer(body(json.dumps(valid()).encode()))
    silent = SilentListener()
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()  # nothing listens there now: connection refused
    urls = {name: s.url for name, s in servers.items()}
    urls.update(
        good=good.url,
        hang=silent.url,
        refused=f"http://127.0.0.1:{refused_port}",
        dns="http://no-such-host.invalid:8321",
    )
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "poll_interval": INTERVAL,
            "timeout": TIMEOUT,
            "nvml": "off",
            "targets": [{"name": n, "kind": "shim", "url": u} for n, u in urls.items()]
            + [{"name": n, "kind": BRIDGE_FAULTS[n][0], "url": s.url} for n, s in bridges.items()],
        }
    )
    exporter = Exporter(config)
    exporter.start()
    try:
        yield exporter, urls
    finally:
        exporter.stop()
        for s in [*servers.values(), *bridges.values()]:
            s.close()
        good.close()
        silent.close()


def scrape(exporter: Exporter) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5).text
    return [
        (s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
    ]


def value(
    samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str
) -> float | None:
    found = [
        v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items())
    ]
    return found[0] if found else None


def test_every_fault_is_counted_by_reason_and_isolated(
    matrix: tuple[Exporter, dict[str, str]],
) -> None:
    exporter, _ = matrix
    expected = {name: reason for name, (_, reason) in FAULTS.items()}
    expected.update(hang="timeout", refused="connect", dns="connect")
    expected.update({name: reason for name, (_, _, reason) in BRIDGE_FAULTS.items()})

    def all_counted() -> bool:
        samples = scrape(exporter)
        return all(
            (value(samples, "kvcache_exporter_poll_errors_total", engine=n, reason=r) or 0) >= 2
            for n, r in expected.items()
        )

    wait_for(all_counted, 20, "every fault counted twice")
    samples = scrape(exporter)
    for name, reason in expected.items():
        assert value(samples, "kvcache_exporter_target_up", engine=name) == 0, name
        assert value(samples, "kvcache_pool_slots", engine=name, state="used") is None, (
            f"{name} served data"
        )
        others = {
            ls["reason"]
            for n, ls, v in samples
            if n == "kvcache_exporter_poll_errors_total" and ls["engine"] == name and v > 0
        }
        assert others == {reason}, f"{name}: counted as {others}, expected {reason}"
    # Strings no label could hold are cleaned, not fatal: that target is up, its labels carry
    # U+FFFD, and the scrape (parsed above, every target in it) is valid text.
    assert value(samples, "kvcache_exporter_target_up", engine="surrogates") == 1
    info = [
        ls for n, ls, _ in samples if n == "kvcache_engine_info" and ls["engine"] == "surrogates"
    ]
    assert [ls["engine_version"] for ls in info] == ["v\ufffd"]
    pools = {
        ls["pool"]
        for n, ls, _ in samples
        if n == "kvcache_pool_slots" and ls["engine"] == "surrogates"
    }
    assert pools == {"full\ufffd"}
    # The healthy target beside them was polled on schedule, up, with fresh data.
    assert value(samples, "kvcache_exporter_target_up", engine="good") == 1
    assert value(samples, "kvcache_pool_slots", engine="good", state="used") == 160
    polls_before = value(samples, "kvcache_exporter_polls_total", engine="good") or 0
    time.sleep(10 * INTERVAL)
    polls_after = value(scrape(exporter), "kvcache_exporter_polls_total", engine="good") or 0
    assert polls_after - polls_before >= 8, "the healthy target was slowed down by the faulty ones"
    # Hanging and trickling targets cost one timeout each, not a stuck poller.
    assert value(samples, "kvcache_exporter_poll_duration_seconds_count", engine="hang")


def test_a_flapping_target_never_serves_stale_values() -> None:
    up = threading.Event()
    up.set()
    counter = {"queries": 1000}

    def flapping(handler: BaseHTTPRequestHandler) -> None:
        if up.is_set():
            counter["queries"] += 10
            data = valid()
            data["counters"]["prefix_query_tokens"] = counter["queries"]
            body(json.dumps(data).encode())(handler)
        else:
            body(b"down", status=503, content_type="text/plain")(handler)

    server = CannedServer(flapping)
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "poll_interval": 0.2,
            "timeout": 0.15,
            "nvml": "off",
            "targets": [{"name": "flap", "kind": "shim", "url": server.url}],
        }
    )
    exporter = Exporter(config)
    exporter.start()
    seen: list[float] = []
    try:
        for _ in range(4):
            up.set()
            wait_for(
                lambda: value(scrape(exporter), "kvcache_exporter_target_up", engine="flap") == 1,
                5,
                "up",
            )
            queries = value(scrape(exporter), "kvcache_prefix_query_tokens_total", engine="flap")
            assert queries is not None
            seen.append(queries)
            up.clear()
            wait_for(
                lambda: value(scrape(exporter), "kvcache_exporter_target_up", engine="flap") == 0,
                5,
                "down",
            )
            assert (
                value(scrape(exporter), "kvcache_prefix_query_tokens_total", engine="flap") is None
            )
    finally:
        exporter.stop()
        server.close()
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # monotonic, and fresh each time


CLIENTS = """
import concurrent.futures, json, sys, httpx
url = sys.argv[1]
def client(_):
    out = []
    with httpx.Client() as c:
        for _ in range(25):
            r = c.get(url, timeout=10)
            out.append((r.status_code, r.json()["sequence"]))
    return out
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    results = [x for chunk in pool.map(client, range(32)) for x in chunk]
print(json.dumps(results))
"""


def test_many_stats_clients_during_heavy_engine_load() -> None:
    """32 concurrent clients (in their own process, as real ones are) x 25 stats requests while a
    burst workload keeps the pool preempting: every answer is a valid snapshot, the loop runs on."""
    import subprocess
    import sys

    engine = ReferenceEngine(
        EngineConfig(kv_memory_bytes=2 * 2**20, max_model_len=512, iteration_time=0.0)
    )
    engine.start()
    server = ShimServer(ShimApp(snapshots=lambda: [engine.snapshot()], healthy=engine.alive))
    server.start()
    workload = Workload(engine, "burst", seed=5, pause=0.0)
    workload.start()
    try:
        wait_for(lambda: bool(engine.snapshot().counters.preemptions), 60, "the burst to preempt")
        iterations_before = engine.iterations
        result = subprocess.run(
            [sys.executable, "-c", CLIENTS, f"http://127.0.0.1:{server.port}/v1/kv/stats"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        answers = json.loads(result.stdout)
        assert len(answers) == 32 * 25 and all(status == 200 for status, _ in answers)
        assert engine.iterations > iterations_before + 20, (
            "the engine loop stalled under stats load"
        )
        parse_snapshot(engine.snapshot().to_json())
    finally:
        workload.stop()
        server.stop()
        engine.stop()

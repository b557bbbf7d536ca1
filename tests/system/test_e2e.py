"""End to end: engine -> exporter -> real Prometheus -> real Alertmanager -> webhook pager.

Started as local processes with the *same* configuration files as docker-compose.yml, rewritten
for loopback ports, a scratch directory and compressed time (1 s scrapes and evaluations;
alert ``for:`` minutes become seconds; Alertmanager groups after 1 s). The engine gets a small
pool so pressure comes fast. NVML is the one fake: this machine has no GPU.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devtools.ports import wait_listening
from mixin.config import MixinConfig
from tests.mixin.test_dashboards_and_rules import dashboard_exprs, substitute
from tests.timescale import compress_minutes

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
GPU_UUID = "GPU-e2e00000-0000-0000-0000-000000000000"


@dataclass
class Webhook:
    """The pager and the chat: records every notification Alertmanager delivers."""

    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    auth: list[str] = field(default_factory=list)

    def start(self) -> int:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.received.setdefault(self.path, []).append(body)
                hook.auth.append(self.headers.get("Authorization", ""))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return int(self.httpd.server_address[1])

    def alerts(self, path: str, name: str, status: str = "firing") -> list[dict[str, Any]]:
        return [
            a
            for n in self.received.get(path, [])
            for a in n["alerts"]
            if a["labels"]["alertname"] == name and a["status"] == status
        ]


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.ports: dict[str, int] = {}  # each bound by its process (port 0), read back
        self.webhook = Webhook()

    def spawn(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str] | None = None,
        sockets: int = 1,
        port_in_log: str | None = None,
    ) -> None:
        """Start ``name`` listening on port 0; its port is in ``ports`` once it listens (the
        one ``port_in_log`` finds in its output where it binds ``sockets`` of them)."""
        self.logs[name] = self.tmp / f"{name}.log"
        log = self.logs[name].open("wb")
        self.procs[name] = proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        try:
            ports = wait_listening(proc, count=sockets, timeout=120)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        if port_in_log is None:
            (self.ports[name],) = ports
            return
        deadline = time.monotonic() + 60
        while not (found := re.search(port_in_log, self.logs[name].read_text(errors="replace"))):
            assert time.monotonic() < deadline, f"{name} never logged its port\n{self.log_tail()}"
            time.sleep(0.1)
        self.ports[name] = int(found.group(1))
        assert self.ports[name] in ports

    def spawn_server(self, name: str, binary: str, *flags: str) -> None:
        """Prometheus or Alertmanager with ``<name>.yml`` from the scratch dir, on port 0."""
        self.spawn(
            name,
            [
                shutil.which(binary) or binary,
                f"--config.file={self.tmp / f'{name}.yml'}",
                "--web.listen-address=127.0.0.1:0",
                *flags,
            ],
        )

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {n}\n{p.read_text()[-1500:]}" for n, p in self.logs.items() if p.exists()
        )

    def engine_command(self) -> list[str]:
        """The compose engine's command, on loopback, a scratch dir and a small pool."""
        cmd = list(COMPOSE["services"]["engine"]["command"])
        assert cmd[:2] == ["kvcache-shim", "reference"]
        values = {
            "--listen": "127.0.0.1:0",
            "--storage-dir": str(self.tmp / "kv"),
            "--kv-memory": "4MiB",
            "--host-tier": "4MiB",
            "--kv-events": "tcp://127.0.0.1:0",
            "--kv-events-replay": "tcp://127.0.0.1:0",
        }
        for i, arg in enumerate(cmd):
            if arg in values:
                cmd[i + 1] = values[arg]
        return [sys.executable, "-m", "engine_shim.cli", *cmd[1:], "--max-model-len", "1024"]

    def start(self) -> None:
        hook_port = self.webhook.start()
        hook = f"http://127.0.0.1:{hook_port}"
        # The shim's HTTP port, and the engine's two KV event sockets (found by the exporter at
        # the shim's /kv_event_sources).
        self.spawn(
            "engine", self.engine_command(), sockets=3, port_in_log=r"stats at http://[^ ]+:(\d+)/"
        )

        exporter = yaml.safe_load((ROOT / "deploy/exporter/exporter.yaml").read_text())
        exporter.update(
            listen="127.0.0.1:0",
            poll_interval="1s",
            timeout="800ms",
            nvml="on",
            gpus={"reference": [GPU_UUID]},
        )
        exporter["targets"][0]["url"] = f"http://127.0.0.1:{self.ports['engine']}"
        (self.tmp / "exporter.yaml").write_text(yaml.safe_dump(exporter))
        devices = [{"uuid": GPU_UUID, "used": 30 * 2**30, "utilization": 40}]
        self.spawn(
            "exporter",
            [sys.executable, "-m", "exporter.cli", "--config", str(self.tmp / "exporter.yaml")],
            {
                "KVCACHE_EXPORTER_PYNVML": "tests.fake_nvml_module",
                "FAKE_NVML_DEVICES": json.dumps(devices),
            },
        )

        am = yaml.safe_load((ROOT / "alerts/alertmanager.yml").read_text())
        am["route"].update(group_wait="1s", group_interval="2s", repeat_interval="1m")
        (self.tmp / "pager_token").write_text("e2e-token\n")
        (self.tmp / "chat_webhook_url").write_text(f"{hook}/chat\n")
        for receiver in am["receivers"]:
            for hook_config in receiver.get("webhook_configs", []):
                hook_config["url"] = f"{hook}/pager"
                hook_config["http_config"]["authorization"]["credentials_file"] = str(
                    self.tmp / "pager_token"
                )
            for slack in receiver.get("slack_configs", []):
                slack["api_url_file"] = str(self.tmp / "chat_webhook_url")
        (self.tmp / "alertmanager.yml").write_text(yaml.safe_dump(am))
        self.spawn_server(
            "alertmanager",
            "prometheus-alertmanager",
            f"--storage.path={self.tmp / 'am'}",
            "--cluster.listen-address=",
        )

        rules = self.tmp / "kvcache-rules.yml"
        rules.write_text(compress_minutes((ROOT / "alerts/kvcache-rules.yml").read_text()))
        prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
        prom["global"].update(
            scrape_interval="1s", scrape_timeout="900ms", evaluation_interval="1s"
        )
        prom["rule_files"] = [str(rules)]
        prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
            f"127.0.0.1:{self.ports['alertmanager']}"
        ]
        prom["scrape_configs"][0]["static_configs"][0]["targets"] = [
            f"127.0.0.1:{self.ports['exporter']}"
        ]
        (self.tmp / "prometheus.yml").write_text(yaml.safe_dump(prom))
        self.spawn_server("prometheus", "prometheus", f"--storage.tsdb.path={self.tmp / 'tsdb'}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.webhook.httpd.shutdown()

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        r = httpx.get(
            f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/query",
            params=params,
            timeout=5,
        )
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> float:
        start = time.monotonic()
        while True:
            for name, proc in self.procs.items():
                if name != "engine" and proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode})\n{self.log_tail()}")
            try:
                if check():
                    return time.monotonic() - start
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # not ready yet: refused, 503 while starting, a non-JSON or partial answer
            if time.monotonic() - start > timeout:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self.log_tail()}"
                )
            time.sleep(0.5)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    for binary in ("prometheus", "prometheus-alertmanager"):
        assert shutil.which(binary), f"{binary} is missing: scripts/test installs Debian's packages"
    s = Stack(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.stop()


class EngineRecorder:
    """The engine's own reports, fetched back to back and kept by snapshot time.

    The engine publishes a snapshot per iteration (~100-200 a second here); fetched back to
    back, nearly every one is seen, so the one behind a Prometheus sample can be looked up
    exactly by its timestamp.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.by_time: dict[float, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    report = client.get(f"{self.url}/v1/kv/stats").json()
                    self.by_time[float(report["time"])] = report

    def __enter__(self) -> EngineRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def expected_panel_values(report: dict[str, Any]) -> dict[tuple[str, tuple[str, ...]], float]:
    """What the engine dashboard's main panels must show for this report.

    Written from the definitions in the metric table (docs/exporter.md), not from the
    exporter's code: physical = (used + evictable) / capacity, active = used / capacity,
    headroom = max-length requests that fit in the free (available + evictable) blocks.
    """
    want: dict[tuple[str, tuple[str, ...]], float] = {}
    for pool in report["pools"]:
        used, evictable = pool["used_slots"], pool["evictable_slots"]
        available, capacity = pool["available_slots"], pool["capacity_slots"]
        for state, slots in (("used", used), ("evictable", evictable), ("available", available)):
            want["Pool breakdown", (pool["name"], state)] = slots
        want["Active vs physical usage by pool", ("active", pool["name"])] = used / capacity
        want["Active vs physical usage by pool", ("physical", pool["name"])] = (
            used + evictable
        ) / capacity
    (full,) = report["pools"]  # the compose engine: one full-attention pool
    per_request = -(-report["max_model_len"] // full["block_size"])
    free_blocks = (full["available_slots"] + full["evictable_slots"]) // full["block_size"]
    want["Max concurrency and headroom", ("headroom",)] = free_blocks // per_request
    want["Max concurrency and headroom", ("max",)] = report["max_concurrency"]
    want["Token capacity", ()] = report["capacity_tokens"]
    for state in ("running", "waiting"):
        want["Requests", (state,)] = report["requests"][state]
    for tier in ("host_tier", "storage_tier"):
        t = report[tier]
        want["Host and storage tier usage", (tier.split("_")[0],)] = (
            t["used_tokens"] / t["capacity_tokens"]
        )
    counters = report["counters"]
    want["prefix queries", ()] = counters["prefix_query_tokens"]
    for tier, hits in counters["prefix_hit_tokens"].items():
        want["prefix hits", (tier,)] = hits
    want["evicted", ()] = counters["evicted_tokens"]
    want["preemptions", ()] = counters["preemptions"]
    reuse = report["reuse_distance"]  # the what-if curve's lookups, and its bucket at the pool
    want["reuse lookups", ()] = reuse["query_tokens"]
    at_pool = reuse["bounds_tokens"].index(full["capacity_slots"])
    want["reuse hits at the pool size", ()] = reuse["cumulative_tokens"][at_pool]
    return want


def key_of(title: str, expr: str, labels: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """A Prometheus series as a key of ``expected_panel_values``."""
    if title == "Pool breakdown":
        return title, (labels["pool"], labels["state"])
    if title == "Active vs physical usage by pool":
        return title, ("active" if "active" in expr else "physical", labels["pool"])
    if title == "Max concurrency and headroom":
        return title, ("headroom" if "headroom" in expr else "max",)
    if title == "Requests":
        return title, (labels["state"],)
    if title == "Host and storage tier usage":
        return title, (labels["tier"],)
    if title == "prefix hits":
        return title, (labels["tier"],)
    return title, ()


# The engine dashboard's gauges as they are drawn, and the counters behind its rate panels.
PANELS_WITH_VALUES = (
    "Pool breakdown",
    "Active vs physical usage by pool",
    "Token capacity",
    "Requests",
    "Max concurrency and headroom",
    "Host and storage tier usage",
)
COUNTERS = {
    "prefix queries": 'kvcache_prefix_query_tokens_total{engine="reference"}',
    "prefix hits": 'kvcache_prefix_hit_tokens_total{engine="reference"}',
    "evicted": 'kvcache_evicted_tokens_total{engine="reference"}',
    "preemptions": 'kvcache_preemptions_total{engine="reference"}',
    "reuse lookups": 'kvcache_prefix_reuse_distance_tokens_count{engine="reference"}',
    "reuse hits at the pool size": 'kvcache_prefix_reuse_distance_tokens_bucket{engine="reference"}'
    ' and ignoring (bound, mark) label_replace(kvcache_prefix_reuse_bucket_info{mark="pool"},'
    ' "le", "$1", "bound", "(.+)")',
}


def prometheus_matches_the_engine(stack: Stack, recorder: EngineRecorder) -> int:
    """Compare, at one evaluation time, the panels with the engine report behind that scrape.

    Returns how many values matched; raises on any mismatch. Returns 0 when the report behind
    the sample was not recorded (the caller tries another moment).
    """
    at = time.time()
    query = lambda expr: stack.query(expr, at)  # noqa: E731 - one evaluation time for all
    (stamp,) = query('kvcache_snapshot_timestamp_seconds{engine="reference"}')
    report = recorder.by_time.get(float(stamp["value"][1]))
    if report is None:
        return 0
    want = expected_panel_values(report)
    got: dict[tuple[str, tuple[str, ...]], float] = {}
    panels = [
        (where.split(": ", 1)[1], expr)
        for where, expr in dashboard_exprs()
        if where.startswith("kvcache-engine.json: ")
        and where.split(": ", 1)[1] in PANELS_WITH_VALUES
    ]
    assert len(panels) == 8, panels
    for title, expr in [*panels, *COUNTERS.items()]:
        for series in query(substitute(expr)):
            got[key_of(title, expr, series["metric"])] = float(series["value"][1])
    assert set(got) == set(want), (sorted(set(got) ^ set(want)), report)
    wrong = {k: (got[k], v) for k, v in want.items() if got[k] != pytest.approx(v, rel=1e-12)}
    assert not wrong, f"Prometheus vs the engine's own report: {wrong}"
    return len(want)


def burst(port: int, stop: threading.Event) -> None:
    """Waves of long requests that need more KV than the small pool has."""
    rng = random.Random(7)

    def one() -> None:
        prompt = " ".join(f"w{rng.randrange(100000)}" for _ in range(300))
        with contextlib.suppress(httpx.HTTPError):  # the engine is stopped at the end
            httpx.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={"prompt": prompt, "max_tokens": 600},
                timeout=120,
            )

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        while not stop.is_set():
            list(pool.map(lambda _: one(), range(12)))


def test_the_whole_chain_delivers_dashboards_and_pages(stack: Stack) -> None:
    started = time.monotonic()
    timings: dict[str, float] = {}
    timings["target up"] = stack.wait(
        lambda: any(
            t["health"] == "up"
            for t in httpx.get(f"http://127.0.0.1:{stack.ports['prometheus']}/api/v1/targets")
            .raise_for_status()
            .json()["data"]["activeTargets"]
        ),
        90,
        "Prometheus to scrape the exporter",
    )
    # The agentic workload runs: every dashboard query must return data (rates need a few samples).
    exprs = dashboard_exprs()
    assert len(exprs) >= 30

    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [where for where, expr in exprs if not stack.query(substitute(expr))]
        return not empty

    try:
        timings["every dashboard query has data"] = stack.wait(
            all_have_data, 90, "every dashboard query"
        )
    except AssertionError as exc:
        raise AssertionError(f"no data from: {empty}") from exc
    empty = [where for where, expr in exprs if not stack.query(substitute(expr))]
    assert not empty, empty
    assert stack.query(f'kvcache_gpu_engine_info{{uuid="{GPU_UUID}", engine="reference"}}')

    # Values, not presence: the main panels equal the engine's own report behind each sample.
    matched: list[int] = []
    with EngineRecorder(f"http://127.0.0.1:{stack.ports['engine']}") as recorder:

        def three_matched() -> bool:
            count = prometheus_matches_the_engine(stack, recorder)
            if count:
                matched.append(count)
            return len(matched) >= 3

        timings["panels equal the engine's report 3 times"] = stack.wait(
            three_matched, 60, "three samples whose engine report was recorded"
        )
    assert matched == [20, 20, 20], matched  # 3 pool states, 2 ratios, 15 more

    # Pressure: the critical KV alert fires in Prometheus and reaches the pager.
    stop = threading.Event()
    thread = threading.Thread(target=burst, args=(stack.ports["engine"], stop), daemon=True)
    thread.start()
    try:
        timings["KVCacheExhausted at the pager"] = stack.wait(
            lambda: bool(stack.webhook.alerts("/pager", "KVCacheExhausted")),
            150,
            "KVCacheExhausted at the pager",
        )
    finally:
        stop.set()
    (alert,) = stack.webhook.alerts("/pager", "KVCacheExhausted")[:1]
    # The scrape target's identity (job, instance) stays on what fires.
    assert alert["labels"] == {
        "alertname": "KVCacheExhausted",
        "severity": "critical",
        "engine": "reference",
        "dp_rank": "0",
        "model": "reference-tiny",
        "pool": "full",
        "job": "kvcache-exporter",
        "instance": f"127.0.0.1:{stack.ports['exporter']}",
    }
    assert alert["annotations"]["summary"] == "KV cache exhausted and requests are being preempted."
    assert alert["annotations"]["description"].startswith(
        "reference (DP rank 0, reference-tiny) has "
    )
    assert alert["annotations"]["runbook_url"] == MixinConfig().runbook_url("KVCacheExhausted")
    assert "Bearer e2e-token" in stack.webhook.auth  # the pager's token came from its file

    # The engine stops: the target-down page arrives.
    stack.procs["engine"].kill()
    timings["KVCacheTargetDown at the pager"] = stack.wait(
        lambda: bool(stack.webhook.alerts("/pager", "KVCacheTargetDown")),
        60,
        "KVCacheTargetDown at the pager",
    )
    (down,) = stack.webhook.alerts("/pager", "KVCacheTargetDown")[:1]
    assert down["labels"]["engine"] == "reference" and down["labels"]["severity"] == "critical"
    assert down["labels"]["job"] == "kvcache-exporter"
    delivered = {
        a["labels"]["alertname"]
        for notes in stack.webhook.received.values()
        for n in notes
        for a in n["alerts"]
    }
    print(
        f"\ne2e: {time.monotonic() - started:.0f} s in all; "
        + "; ".join(f"{k} after {v:.0f} s" for k, v in timings.items())
    )
    print(
        "e2e: delivered: "
        + ", ".join(
            f"{path}: {sorted({a['labels']['alertname'] for n in notes for a in n['alerts']})}"
            for path, notes in stack.webhook.received.items()
        )
    )
    assert "KVCacheExhausted" in delivered and "KVCacheTargetDown" in delivered

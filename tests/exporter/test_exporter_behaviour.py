"""Exporter behaviour on canned targets: NVML modes, faults, isolation, labels, watch, demo."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter
from exporter.config import parse_config
from exporter.nvml import NvmlReader, NvmlUnavailable
from exporter.state import sanitize_label
from exporter.watch import format_engine_line, parse_exposition
from tests.builders import valid
from tests.fake_pynvml import FakeDevice, FakeNvml
from tests.helpers import CannedServer, body, wait_for

GPU = "GPU-aaaaaaaa-0000-0000-0000-000000000000"


def snapshot_json(**changes: Any) -> bytes:
    data = valid()
    data["pools"][0]["gpu_uuid"] = GPU
    data.update(changes)
    return json.dumps(data).encode()


def serve(servers: list[CannedServer], respond: Any) -> CannedServer:
    server = CannedServer(respond)
    servers.append(server)
    return server


def start(targets: list[tuple[str, str]], nvml: FakeNvml | None = None, **extra: Any) -> Exporter:
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "poll_interval": 0.3,
            "timeout": 0.25,
            "nvml": extra.pop("nvml_mode", "on" if nvml else "off"),
            "targets": [{"name": n, "kind": "shim", "url": u} for n, u in targets],
            **extra,
        }
    )
    exporter = Exporter(config, nvml_module=nvml)  # type: ignore[arg-type]
    exporter.start()
    return exporter


def samples(exporter: Exporter) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
    return [
        (s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
    ]


def get(exporter: Exporter, name: str, **labels: str) -> list[float]:
    return [
        v
        for n, ls, v in samples(exporter)
        if n == name and all(ls.get(k) == x for k, x in labels.items())
    ]


# ------------------------------------------------------------------------------- NVML


def test_nvml_auto_without_a_driver_is_off_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    reader = NvmlReader(FakeNvml(driver=False))  # type: ignore[arg-type]
    with caplog.at_level("INFO"):
        assert reader.start("auto") is False
    assert "NVML not available" in caplog.text and "NVML Shared Library Not Found" in caplog.text
    assert reader.read() == []


def test_nvml_on_without_a_driver_refuses_to_start() -> None:
    with pytest.raises(NvmlUnavailable, match="nvml: on, but NVML cannot start"):
        NvmlReader(FakeNvml(driver=False)).start("on")  # type: ignore[arg-type]


def test_nvml_off_never_touches_the_library() -> None:
    nvml = FakeNvml([FakeDevice(uuid=GPU)])
    assert NvmlReader(nvml).start("off") is False  # type: ignore[arg-type]
    assert not nvml.initialised


def test_gpu_lost_mid_run_is_counted_not_fatal(servers: list[CannedServer]) -> None:
    shim = serve(servers, body(snapshot_json()))
    devices = [FakeDevice(uuid=GPU, used=10 * 2**30), FakeDevice(uuid="GPU-b", used=2**30)]
    exporter = start([("a", shim.url)], FakeNvml(devices))
    try:
        wait_for(lambda: len(get(exporter, "kvcache_gpu_memory_total_bytes")) == 2, 5, "two GPUs")
        # Joined by the UUID the shim reports: 1600 tokens x 1024 B of KV on GPU 0.
        assert get(exporter, "kvcache_gpu_non_kv_memory_bytes", uuid=GPU) == [
            10 * 2**30 - 1600 * 1024
        ]
        assert get(exporter, "kvcache_gpu_engine_info", uuid=GPU, engine="a") == [1]
        devices[0].lost = True
        wait_for(
            lambda: len(get(exporter, "kvcache_gpu_memory_total_bytes")) == 1,
            5,
            "GPU 0 to drop out",
        )
        assert (
            get(
                exporter,
                "kvcache_exporter_nvml_errors_total",
                gpu="0",
                reason="NVMLError_GpuIsLost",
            )[0]
            >= 1
        )
        assert get(exporter, "kvcache_pool_slots", engine="a", state="used") == [
            160
        ]  # KV metrics carry on
        assert get(exporter, "kvcache_gpu_memory_total_bytes", uuid="GPU-b") == [80 * 2**30]
    finally:
        exporter.stop()


# ------------------------------------------------------------------------------ faults


def hang(handler: BaseHTTPRequestHandler) -> None:
    time.sleep(3)


def test_a_hanging_target_does_not_delay_the_others(servers: list[CannedServer]) -> None:
    good = serve(servers, body(snapshot_json()))
    slow = serve(servers, hang)
    exporter = start([("good", good.url), ("slow", slow.url)])
    try:
        time.sleep(2.0)
        polls = get(exporter, "kvcache_exporter_polls_total", engine="good")[0]
        assert polls >= 5, f"the good target was polled only {polls} times in 2 s at 0.3 s"
        assert get(exporter, "kvcache_exporter_target_up", engine="slow") == [0]
        assert (
            get(exporter, "kvcache_exporter_poll_errors_total", engine="slow", reason="timeout")[0]
            >= 1
        )
        assert get(exporter, "kvcache_exporter_target_up", engine="good") == [1]
    finally:
        exporter.stop()


def big_body(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")  # no Content-Length to refuse up front
    handler.end_headers()
    chunk = b"x" * 65536
    try:
        for _ in range(1600):  # 100 MiB if anyone read it all
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except (BrokenPipeError, ConnectionResetError):
        pass


@pytest.mark.parametrize(
    ("respond", "reason"),
    [
        (body(b"{not json"), "invalid_body"),
        (body(json.dumps({"schema": "kvcache.stats/v2"}).encode()), "invalid_snapshot"),
        (body(snapshot_json(), status=500), "http_status"),
        (big_body, "too_large"),
        (body(b"x" * 4096, content_type="text/plain"), "too_large"),
    ],
)
def test_bad_answers_are_counted_by_reason_and_serve_nothing(
    servers: list[CannedServer], respond: Any, reason: str
) -> None:
    server = serve(servers, respond)
    exporter = start([("bad", server.url)], max_response_bytes="2KiB")
    try:
        wait_for(
            lambda: (
                bool(
                    get(exporter, "kvcache_exporter_poll_errors_total", engine="bad", reason=reason)
                )
                and get(
                    exporter, "kvcache_exporter_poll_errors_total", engine="bad", reason=reason
                )[0]
                >= 1
            ),
            5,
            f"a {reason} error",
        )
        assert get(exporter, "kvcache_exporter_target_up", engine="bad") == [0]
        assert not get(exporter, "kvcache_pool_slots", engine="bad")
    finally:
        exporter.stop()


def test_lying_engine_is_capped_and_label_values_sanitised(servers: list[CannedServer]) -> None:
    many_pools = valid()
    pool = many_pools["pools"][0]
    many_pools["pools"] = [dict(copy.deepcopy(pool), name=f"p{i}") for i in range(300)]
    many_pools["groups"] = []
    liar = serve(servers, body(json.dumps(many_pools).encode()))
    odd = valid()
    odd["engine"]["model"] = "evil\nmodel\x00" + "m" * 200
    weird = serve(servers, body(json.dumps(odd).encode()))
    exporter = start([("liar", liar.url), ("weird", weird.url)])
    try:
        wait_for(
            lambda: get(exporter, "kvcache_exporter_target_up", engine="weird") == [1],
            5,
            "weird up",
        )
        assert (
            get(
                exporter,
                "kvcache_exporter_poll_errors_total",
                engine="liar",
                reason="too_many_series",
            )[0]
            >= 1
        )
        models = {ls["model"] for n, ls, _ in samples(exporter) if n == "kvcache_pool_slots"}
        assert models == {sanitize_label(odd["engine"]["model"])}
        (model,) = models
        assert len(model) == 128 and "\n" not in model and "\x00" not in model
    finally:
        exporter.stop()


def test_two_targets_reaching_one_engine_are_caught_not_merged(
    servers: list[CannedServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Two engines told the same shim port: one binds it, and both targets read the same engine.

    The second target must not publish the first engine's numbers under its own name: it is
    down with ``duplicate_instance``, said once in the log; a distinct engine stays up."""
    shared = serve(servers, body(snapshot_json()))
    other = serve(servers, body(snapshot_json(engine={**valid()["engine"], "instance_id": "zz"})))
    exporter = start([("a", shared.url), ("b", shared.url), ("c", other.url)])
    try:

        def duplicates(name: str) -> float:
            found = get(
                exporter,
                "kvcache_exporter_poll_errors_total",
                engine=name,
                reason="duplicate_instance",
            )
            return found[0] if found else 0.0

        wait_for(lambda: max(duplicates("a"), duplicates("b")) >= 2, 5, "the duplicate counted")
        # Whichever answered first keeps the engine; the other is down, every poll.
        kept, refused = ("a", "b") if duplicates("b") else ("b", "a")
        assert duplicates(kept) == 0
        assert get(exporter, "kvcache_exporter_target_up", engine=kept) == [1]
        assert get(exporter, "kvcache_exporter_target_up", engine=refused) == [0]
        assert get(exporter, "kvcache_exporter_target_up", engine="c") == [1]
        assert not get(exporter, "kvcache_pool_slots", engine=refused)
        said = [r.getMessage() for r in caplog.records if "same engine as target" in r.getMessage()]
        assert said == [
            f"target {refused}: duplicate_instance: reports the same engine as target {kept}"
            " (instance abc, DP rank 0): give every engine its own shim address"
        ]
    finally:
        exporter.stop()


def test_sanitize_label() -> None:
    assert sanitize_label("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert sanitize_label("a\tb\u200bc") == "a_b_c"
    assert sanitize_label("   ") == "unknown"
    assert sanitize_label("x" * 500).endswith("...") and len(sanitize_label("x" * 500)) == 128


def test_dp_ranks_become_separate_series(servers: list[CannedServer]) -> None:
    ranks = []
    for rank in range(2):
        snap = valid()
        snap["engine"]["dp_rank"] = rank
        snap["pools"][0]["used_slots"] = 160 * (rank + 1)
        snap["pools"][0]["available_slots"] = 1600 - 800 - 160 * (rank + 1)
        ranks.append(snap)
    server = serve(servers, body(json.dumps(ranks).encode()))
    exporter = start([("dp", server.url)])
    try:
        wait_for(
            lambda: len(get(exporter, "kvcache_pool_slots", engine="dp", state="used")) == 2,
            5,
            "two ranks",
        )
        assert get(exporter, "kvcache_pool_slots", engine="dp", dp_rank="1", state="used") == [320]
        assert get(exporter, "kvcache_active_usage_ratio", engine="dp", dp_rank="0") == [0.1]
    finally:
        exporter.stop()


# --------------------------------------------------------------------------- views


def test_watch_line_is_the_operators_view() -> None:
    text = """
kvcache_pool_capacity_slots{engine="a",dp_rank="0",model="m",pool="full"} 82448
kvcache_pool_slots{engine="a",dp_rank="0",model="m",pool="full",state="used"} 1896
kvcache_pool_slots{engine="a",dp_rank="0",model="m",pool="full",state="evictable"} 57551
kvcache_physical_usage_ratio{engine="a",dp_rank="0",model="m",pool="full"} 0.721
kvcache_active_usage_ratio{engine="a",dp_rank="0",model="m",pool="full"} 0.023
kvcache_evictable_ratio{engine="a",dp_rank="0",model="m",pool="full"} 0.698
kvcache_max_concurrency{engine="a",dp_rank="0",model="m"} 13.91
kvcache_capacity_tokens{engine="a",dp_rank="0",model="m"} 82432
kvcache_concurrency_headroom{engine="a",dp_rank="0",model="m"} 9
kvcache_requests{engine="a",dp_rank="0",model="m",state="running"} 3
kvcache_requests{engine="a",dp_rank="0",model="m",state="waiting"} 0
kvcache_prefix_query_tokens_total{engine="a",dp_rank="0",model="m"} 1000
kvcache_prefix_hit_tokens_total{engine="a",dp_rank="0",model="m",tier="device"} 610
kvcache_prefix_hit_tokens_total{engine="a",dp_rank="0",model="m",tier="host"} 70
kvcache_prefix_hit_tokens_total{engine="a",dp_rank="0",model="m",tier="storage"} 10
kvcache_prefix_hit_tokens_total{engine="a",dp_rank="0",model="m",tier="p2p"} 20
kvcache_exporter_target_up{engine="a"} 1
kvcache_exporter_target_up{engine="b"} 0
"""
    engines, up = parse_exposition(text)
    (key,) = engines
    line = format_engine_line(key, engines[key], None)
    assert line == (
        "a/0 m  phys 72.1% (active 2.3%, evictable 69.8%) 59447/82448 slots | cap 82432 tok"
        " | max conc 13.9 | headroom 9 | run 3 wait 0 | hit dev 61% host 7% sto 1% p2p 2%"
    )
    assert up == {"a": 1.0, "b": 0.0}


def test_watch_says_when_an_engine_is_warming_up_unsupported_or_bursting() -> None:
    text = """
kvcache_pool_capacity_slots{engine="a",dp_rank="0",model="m",pool="full"} 1000
kvcache_pool_slots{engine="a",dp_rank="0",model="m",pool="full",state="used"} 100
kvcache_active_usage_ratio{engine="a",dp_rank="0",model="m",pool="full"} 0.1
kvcache_pool_peak_slots{engine="a",dp_rank="0",model="m",pool="full",state="used"} 950
kvcache_shim_status{engine="a",dp_rank="0",model="m",state="ok"} 0
kvcache_shim_status{engine="a",dp_rank="0",model="m",state="warming_up"} 0
kvcache_shim_status{engine="a",dp_rank="0",model="m",state="unsupported"} 1
kvcache_shim_status{engine="b",dp_rank="0",model="m",state="warming_up"} 1
"""
    engines, _ = parse_exposition(text)
    lines = {key[0]: format_engine_line(key, engines[key], None) for key in engines}
    assert lines["a"] == (
        "a/0 m  active 10.0% (evictable unknown) 100/1000 slots peak 95.0%"
        " | UNSUPPORTED engine release (exact counts only: see the exporter log)"
    )
    assert lines["b"] == "b/0 m  WARMING UP (capacity not sized yet)"


def test_demo_runs_and_prints_live_numbers() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter.cli",
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "4",
            "--interval",
            "0.5",
            "--",
            "--kv-memory",
            "4MiB",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    # The expected start-up order (engine first) is not a warning a newcomer should see.
    assert "ConnectError" not in result.stderr and "WARNING" not in result.stderr, result.stderr
    out = result.stdout
    assert "kvcache-exporter demo: reference engine with the 'agentic' workload" in out
    assert "/metrics" in out and "/v1/kv/stats" in out
    live = [ln for ln in out.splitlines() if "reference/0 reference-tiny" in ln]
    assert live and "phys " in live[-1] and "max conc " in live[-1] and "headroom " in live[-1]


def test_an_unsupported_shim_stays_up_with_what_is_exact_and_is_counted(
    servers: list[CannedServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A shim on a vLLM it does not recognise: used slots and capacity published, evictable
    and available absent (not 0), the poll counted as unsupported_engine, the reason logged
    once; a warming-up engine shows its state and no capacity rather than 0."""
    pool = {"name": "full", "block_size": 16, "capacity_slots": 1600, "used_slots": 160}
    pool |= {"evictable_slots": None, "available_slots": None, "peak_used_slots": 480}
    answers = iter(
        [
            snapshot_json(
                status={"state": "warming_up", "reason": "sized after warm-up"},
                capacity_tokens=None,
                max_concurrency=None,
            )
        ]
    )

    def respond(handler: BaseHTTPRequestHandler) -> None:
        reason = "vLLM 9.0.0 is not supported by kvcache shim 0.1.0: no slot _block_hash"
        unsupported = snapshot_json(pools=[pool], status={"state": "unsupported", "reason": reason})
        body(next(answers, unsupported))(handler)

    server = serve(servers, respond)
    with caplog.at_level("WARNING", logger="exporter"):
        exporter = start([("odd", server.url)])
        try:
            wait_for(
                lambda: (
                    get(exporter, "kvcache_shim_status", engine="odd", state="unsupported") == [1]
                ),
                5,
                "the unsupported state",
            )
            wait_for(
                lambda: (
                    get(exporter, "kvcache_exporter_poll_errors_total", engine="odd", reason=UNSUP)[
                        0
                    ]
                    >= 2
                ),
                5,
                "two unsupported polls",
            )
            assert get(exporter, "kvcache_exporter_target_up", engine="odd") == [1]
            assert get(exporter, "kvcache_pool_slots", engine="odd", state="used") == [160]
            assert not get(exporter, "kvcache_pool_slots", engine="odd", state="evictable")
            assert not get(exporter, "kvcache_physical_usage_ratio", engine="odd")
            assert get(exporter, "kvcache_pool_peak_slots", engine="odd", state="used") == [480]
            assert not get(exporter, "kvcache_pool_peak_slots", engine="odd", state="physical")
            assert get(exporter, "kvcache_shim_status", engine="odd", state="ok") == [0]
        finally:
            exporter.stop()
    said = [r.getMessage() for r in caplog.records if "unsupported_engine" in r.getMessage()]
    assert len(said) == 1 and "no slot _block_hash" in said[0]


def test_a_warming_up_engine_has_no_capacity_rather_than_zero(
    servers: list[CannedServer],
) -> None:
    warming = snapshot_json(
        status={"state": "warming_up", "reason": "sized after warm-up"},
        capacity_tokens=None,
        max_concurrency=None,
    )
    server = serve(servers, body(warming))
    exporter = start([("warm", server.url)])
    try:
        wait_for(
            lambda: get(exporter, "kvcache_shim_status", engine="warm", state="warming_up") == [1],
            5,
            "the warming-up state",
        )
        assert not get(exporter, "kvcache_capacity_tokens", engine="warm")
        assert not get(exporter, "kvcache_max_concurrency", engine="warm")
        assert not get(exporter, "kvcache_concurrency_headroom", engine="warm")
        assert get(exporter, "kvcache_exporter_poll_errors_total", engine="warm", reason=UNSUP) == [
            0
        ]
        assert get(exporter, "kvcache_pool_capacity_slots", engine="warm") == [1600]
    finally:
        exporter.stop()


UNSUP = "unsupported_engine"

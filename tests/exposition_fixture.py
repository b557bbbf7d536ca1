"""A deterministic fleet for exposition tests and benchmarks: every family has samples.

Targets: a reference engine (full + swa pools, host and storage tiers, all hit tiers), a vLLM
bridge scrape (the fixture), an SGLang bridge scrape with DP ranks, a target that is down, and
NVML readings joined to one engine. Times are fixed, so the exposition is byte-for-byte stable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from engine_shim.bridges import convert
from engine_shim.reuse_distance import bucket_bounds
from exporter.config import parse_config
from exporter.exposition import ExporterView
from exporter.nvml import GpuReading
from exporter.state import ReloadStats, TargetState
from kvstats.validate import parse_snapshot

FIXTURES = Path(__file__).parent / "fixtures"
NOW = 1_800_000_000.0
GPU_UUID = "GPU-aaaaaaaa-0000-0000-0000-000000000000"


def reference_snapshot(instance: str, used: int, sequence: int) -> dict[str, Any]:
    return {
        "schema": "kvcache.stats/v2",
        "engine": {
            "kind": "reference",
            "version": "0.1.0",
            "model": "reference-tiny",
            "dp_rank": 0,
            "instance_id": instance,
        },
        "time": NOW - 0.25,
        "sequence": sequence,
        "max_model_len": 4096,
        "capacity_tokens": 11720,
        "pools": [
            {
                "name": "full",
                "block_size": 16,
                "capacity_slots": 29776,
                "used_slots": used,
                "evictable_slots": 20000,
                "available_slots": 29776 - used - 20000,
                "bytes_per_slot": 512,
                "device": "cuda:0",
                "gpu_uuid": GPU_UUID,
                "evictable_prefix_tokens": 19_990,
                "peak_used_slots": used + 160,
                "peak_physical_slots": used + 20000 + 160,
            },
            {
                "name": "swa",
                "block_size": 16,
                "capacity_slots": 2976,
                "used_slots": 320,
                "evictable_slots": 0,
                "available_slots": 2656,
                "bytes_per_slot": 512,
                "device": "cuda:0",
                "gpu_uuid": GPU_UUID,
            },
        ],
        "groups": [
            {"name": "full", "kind": "full_attention", "pool": "full", "blocks_per_request": 256},
            {
                "name": "swa",
                "kind": "sliding_window",
                "pool": "swa",
                "blocks_per_request": 65,
                "sliding_window": 1024,
            },
        ],
        "max_concurrency": 186 / 65,
        "requests": {"running": 3, "waiting": 1},
        "counters": {
            "prefix_query_tokens": 100_000,
            "prefix_hit_tokens": {
                "device": 60_000,
                "host": 7_000,
                "storage": 1_000,
                "p2p": 50,
                "external": 25,
            },
            "evicted_tokens": 4_096,
            "preemptions": 3,
            "iterations": 12_345,
        },
        "host_tier": {"capacity_tokens": 65536, "used_tokens": 4096},
        "storage_tier": {"capacity_tokens": 1_048_576, "used_tokens": 8192},
        "reuse_distance": reuse_section(),
        "status": {"state": "ok", "reason": None},
        "prefix_resident_slots": {"device": 20_480},
    }


def event_batch(events: list[dict[str, Any]]) -> bytes:
    """One KV event batch as vLLM publishes it (tagged maps)."""
    return msgspec.msgpack.encode([NOW - 1, events, 0])


def feed_vllm_stream(state: TargetState) -> None:
    """The vLLM target's event stream: 40 device blocks and 8 host blocks stored, 4 removed,
    a batch lost and replayed, one event of a type from the future."""
    stream = state.streams[0]
    stream.started_at = NOW - 100
    stored = {"type": "BlockStored", "block_size": 16, "group_idx": 0}
    stream.take(
        0, event_batch([{**stored, "block_hashes": list(range(40)), "medium": "GPU"}]), NOW - 30
    )
    stream.take(
        1,
        event_batch([{**stored, "block_hashes": list(range(8)), "medium": "CPU"}]),
        NOW - 20,
        replayed=True,
    )
    stream.take(
        2,
        event_batch(
            [
                {"type": "BlockRemoved", "block_hashes": [0, 1, 2, 3], "medium": "GPU"},
                {"type": "Future"},
            ]
        ),
        NOW - 5,
    )
    stream.settle(2)


def reuse_section() -> dict[str, Any]:
    """The reference engine's bounds for this pool and its tiers, with made-up counts."""
    bounds = bucket_bounds(29776, [29776 + 65536, 29776 + 65536 + 1_048_576])
    return {
        "sampling_rate": 0.25,
        "bounds_tokens": list(bounds),
        "cumulative_tokens": [min(60_000, 3_000 * (i + 1)) for i in range(len(bounds))],
        "query_tokens": 100_000,
        "distance_sum_tokens": 987_654_321,
        "version": 1,
    }


def fleet_states(copies: int = 1) -> list[TargetState]:
    """The fixture fleet; ``copies`` > 1 repeats the reference engine (for benchmarks)."""
    targets = [
        {"name": f"ref{i}" if i else "ref", "kind": "shim", "url": f"http://127.0.0.1:{9000 + i}"}
        for i in range(copies)
    ] + [
        {
            "name": "vllm",
            "kind": "vllm",
            "url": "http://127.0.0.1:8000",
            "events": {
                "endpoint": "tcp://127.0.0.1:5557",
                "replay_endpoint": "tcp://127.0.0.1:5558",
            },
        },
        # Its KV event streams asked for and not found yet (an SGLang without the flag).
        {
            "name": "sglang",
            "kind": "sglang",
            "url": "http://127.0.0.1:30000",
            "events": {"discover": True},
        },
        {"name": "down", "kind": "shim", "url": "http://127.0.0.1:1"},
    ]
    config = parse_config({"targets": targets, "eta_window": "60s"})
    states = [TargetState(t, config.eta_window) for t in config.targets]
    for i, state in enumerate(states[:copies]):
        for step in range(6):  # a growing pool: the forecast is published
            snap = parse_snapshot(reference_snapshot(f"ref-{i}", 1000 + 400 * step, step + 1))
            state.record_success([snap], now=NOW - 50 + 10 * step, duration=0.002 * (step + 1))
    vllm_text = (FIXTURES / "vllm-0.33.0-dp1.prom").read_text()
    feed_vllm_stream(states[copies])
    states[copies].read_streams(now=NOW)
    states[copies].record_success(convert("vllm", vllm_text, NOW).snapshots, NOW, 0.004)
    sglang_text = (FIXTURES / "sglang-0.5.23-hicache.prom").read_text()
    states[copies + 1].record_success(convert("sglang", sglang_text, NOW).snapshots, NOW, 0.006)
    states[copies + 1].discovery_errors = 3
    down = states[copies + 2]
    down.record_failure("connect", 0.001)
    down.record_failure("timeout", 0.8)
    return states


def fleet_view(states: list[TargetState] | None = None) -> ExporterView:
    states = states if states is not None else fleet_states()
    gpus = [
        GpuReading(0, GPU_UUID, "NVIDIA H100", 40 * 2**30, 40 * 2**30, 80 * 2**30, 0.5),
        GpuReading(1, "GPU-b", "NVIDIA H100", 2**30, 79 * 2**30, 80 * 2**30, None),
    ]
    return ExporterView(
        [s.report() for s in states],
        gpus,
        {("1", "NVMLError_NotSupported"): 2},
        True,
        {},
        ReloadStats(successes=2, failures=1, last_ok=False, last_success=NOW - 100),
    )

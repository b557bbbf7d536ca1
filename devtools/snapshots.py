"""A canned ``kvcache.stats/v2`` snapshot: one full-attention pool, every field set."""

from __future__ import annotations

from typing import Any

from kvstats.snapshot import SCHEMA_VERSION


def canned_snapshot(instance_id: str = "abc") -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "engine": {
            "kind": "reference",
            "version": "0.1.0",
            "model": "tiny",
            "dp_rank": 0,
            "instance_id": instance_id,
        },
        "time": 1_700_000_000.5,
        "sequence": 7,
        "max_model_len": 4096,
        "capacity_tokens": 1600,
        "pools": [
            {
                "name": "full",
                "block_size": 16,
                "capacity_slots": 1600,
                "used_slots": 160,
                "evictable_slots": 800,
                "available_slots": 640,
                "bytes_per_slot": 1024,
                "device": "cuda:0",
                "gpu_uuid": "GPU-1234",
            }
        ],
        "groups": [
            {"name": "full", "kind": "full_attention", "pool": "full", "blocks_per_request": 256}
        ],
        "max_concurrency": 0.390625,
        "requests": {"running": 2, "waiting": 1},
        "counters": {
            "prefix_query_tokens": 1000,
            "prefix_hit_tokens": {"device": 600, "host": 50, "storage": 10},
            "evicted_tokens": 32,
            "preemptions": 1,
            "iterations": 99,
        },
        "host_tier": {"capacity_tokens": 4096, "used_tokens": 128},
        "storage_tier": None,
        "reuse_distance": {
            "sampling_rate": 0.5,
            "bounds_tokens": [400, 800, 1600, 3200, 5696, 102400],
            "cumulative_tokens": [100, 300, 550, 600, 650, 700],
            "query_tokens": 1000,
            "distance_sum_tokens": 560000,
            "version": 1,
        },
    }

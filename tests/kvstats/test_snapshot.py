"""The kvcache.stats snapshot: round trip, the v1 reader and precise rejection of bad input."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from kvstats.snapshot import SCHEMA_VERSION, SnapshotError
from kvstats.validate import parse_snapshot
from tests.builders import valid


def test_round_trip_is_exact() -> None:
    snap = parse_snapshot(valid())
    assert snap.pool("full") is not None
    assert snap.pool("full").free_slots == 1440  # type: ignore[union-attr]
    again = parse_snapshot(json.loads(json.dumps(snap.to_json())))
    assert again == snap
    wire = snap.to_json()
    expected = valid()
    expected["groups"][0]["sliding_window"] = None
    for pool in expected["pools"]:  # optional fields a v2 producer may leave out
        pool.update(
            evictable_prefix_tokens=None,
            peak_used_slots=None,
            peak_physical_slots=None,
            evictable_slots_lower=None,
            evictable_slots_upper=None,
        )
    expected["status"] = None
    expected["prefix_resident_slots"] = {}
    assert wire == expected


def test_v1_snapshots_from_older_shims_are_still_read() -> None:
    """A vLLM running last release's shim keeps being watched: v1 pool fields were *_tokens."""
    old = valid()
    old["schema"] = "kvcache.stats/v1"
    del old["capacity_tokens"]
    old["pools"] = [
        {
            "name": "full",
            "block_size": 16,
            "capacity_tokens": 1600,
            "used_tokens": 160,
            "evictable_tokens": 800,
            "available_tokens": 640,
            "bytes_per_token": 1024,
        }
    ]
    snap = parse_snapshot(old)
    full = snap.pools[0]
    assert (full.capacity_slots, full.used_slots, full.evictable_slots) == (1600, 160, 800)
    assert (full.available_slots, full.bytes_per_slot) == (640, 1024)
    assert snap.capacity_tokens is None  # v1 never stated it; the exporter derives it
    assert snap.host_tier is not None and snap.host_tier.capacity_tokens == 4096
    old["pools"][0]["used_tokens"] = 161  # v1 pools are checked like v2 pools
    with pytest.raises(SnapshotError, match="not capacity_slots"):
        parse_snapshot(old)


def test_unknown_evictable_is_allowed_when_available_is_unknown_too() -> None:
    data = valid()
    data["pools"][0]["evictable_slots"] = None
    data["pools"][0]["available_slots"] = None
    assert parse_snapshot(data).pools[0].evictable_slots is None


def mutate(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(valid())
    target: Any = data
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if value is DELETE:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return data


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "where", "message"),
    [
        ("schema", "kvcache.stats/v9", "schema", "unsupported schema"),
        ("schema", DELETE, "schema", "missing"),
        ("engine.kind", "tgi", "engine.kind", "must be one of"),
        ("engine.model", 3, "engine.model", "expected a string"),
        ("engine.instance_id", DELETE, "engine.instance_id", "missing"),
        ("engine.dp_rank", -1, "engine.dp_rank", "must not be negative"),
        ("sequence", 1.5, "sequence", "expected an integer"),
        ("sequence", True, "sequence", "expected an integer"),
        ("time", math.nan, "time", "must be finite"),
        ("time", "now", "time", "expected a number"),
        ("max_concurrency", math.inf, "max_concurrency", "must be finite"),
        ("pools", [], "pools", "at least one pool"),
        ("pools", {}, "pools", "expected an array"),
        ("pools.0.used_slots", -16, "pools[0].used_slots", "must not be negative"),
        ("pools.0.used_slots", math.nan, "pools[0].used_slots", "must be finite"),
        ("pools.0.used_slots", "160", "pools[0].used_slots", "expected an integer"),
        ("pools.0.used_slots", 176, "pools[0]", "not capacity_slots 1600"),
        ("pools.0.used_slots", 1700, "pools[0].used_slots", "exceeds capacity_slots"),
        ("pools.0.evictable_slots", None, "pools[0]", "both known or both null"),
        ("pools.0.block_size", 0, "pools[0].block_size", "must be positive"),
        ("pools.0.capacity_slots", DELETE, "pools[0].capacity_slots", "missing"),
        ("groups.0.pool", "swa", "groups[0].pool", "names no pool"),
        ("groups.0.kind", "linear", "groups[0].kind", "must be one of"),
        ("counters.prefix_hit_tokens.disk", 3, "counters.prefix_hit_tokens.disk", "tier must be"),
        ("counters.preemptions", -1, "counters.preemptions", "must not be negative"),
        ("counters", None, "counters", "must not be null"),
        ("requests.waiting", None, "requests.waiting", "must not be null"),
        ("host_tier.used_tokens", 5000, "host_tier.used_tokens", "exceeds capacity_tokens"),
        ("pools.0.evictable_prefix_tokens", 801, "pools[0].evictable_prefix_tokens", "exceed"),
        ("pools.0.evictable_prefix_tokens", -1, "pools[0].evictable_prefix_tokens", "negative"),
        ("pools.0.peak_used_slots", 100, "pools[0].peak_used_slots", "between the current 160"),
        ("pools.0.peak_used_slots", 1601, "pools[0].peak_used_slots", "and capacity_slots"),
        ("pools.0.peak_physical_slots", 900, "pools[0].peak_physical_slots", "current 960"),
        ("status", {"state": "broken"}, "status.state", "must be one of"),
        ("status", {"reason": "why"}, "status.state", "missing"),
        ("status", {"state": "ok", "reason": 3}, "status.reason", "expected a string"),
        ("status", "unsupported", "status", "expected an object"),
    ],
)
def test_rejects_with_a_precise_error(path: str, value: Any, where: str, message: str) -> None:
    with pytest.raises(SnapshotError) as info:
        parse_snapshot(mutate(path, value))
    assert info.value.path == where
    assert message in info.value.problem


def test_optional_v2_fields_are_read_and_bounded() -> None:
    data = valid()
    data["pools"][0].update(
        evictable_prefix_tokens=700, peak_used_slots=400, peak_physical_slots=1200
    )
    data["status"] = {"state": "unsupported", "reason": "x" * 5000 + "\ud800"}
    snap = parse_snapshot(data)
    full = snap.pools[0]
    assert (full.evictable_prefix_tokens, full.peak_used_slots, full.peak_physical_slots) == (
        700,
        400,
        1200,
    )
    assert snap.status is not None and snap.status.state == "unsupported"
    assert snap.status.reason == "x" * 1024  # bounded; and valid UTF-8 whatever was sent
    del data["pools"][0]["evictable_slots"], data["pools"][0]["available_slots"]
    data["pools"][0].pop("evictable_prefix_tokens")
    with pytest.raises(SnapshotError, match="peak_physical_slots: needs available_slots"):
        parse_snapshot(data)


@pytest.mark.parametrize("data", [None, [], "x", 3, {"schema": SCHEMA_VERSION}])
def test_rejects_non_snapshots(data: Any) -> None:
    with pytest.raises(SnapshotError):
        parse_snapshot(data)


def test_duplicate_pool_names_are_rejected() -> None:
    data = valid()
    data["pools"].append(copy.deepcopy(data["pools"][0]))
    with pytest.raises(SnapshotError, match="duplicate pool names"):
        parse_snapshot(data)


def test_overlong_strings_are_rejected() -> None:
    with pytest.raises(SnapshotError, match="longer than"):
        parse_snapshot(mutate("engine.model", "m" * 10_000))

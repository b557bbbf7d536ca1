"""Builders the tests share: a valid wire snapshot and a typed one, one place to change them."""

from __future__ import annotations

from typing import Any

from devtools.snapshots import canned_snapshot
from kvstats.snapshot import Counters, EngineIdentity, KVGroup, Pool, Requests, Snapshot


def valid() -> dict[str, Any]:
    """A valid wire snapshot with every field set (the benchmarks' canned one)."""
    return canned_snapshot()


def snap(
    used: int = 160,
    evictable: int | None = 800,
    capacity: int = 1600,
    instance: str = "a",
    sequence: int = 1,
    queries: int = 100,
    hits: int = 50,
    groups: tuple[KVGroup, ...] = (),
    max_model_len: int | None = 64,
    pools: tuple[Pool, ...] | None = None,
) -> Snapshot:
    available = None if evictable is None else capacity - used - evictable
    return Snapshot(
        engine=EngineIdentity("reference", "1", "m", 0, instance),
        time=1.0,
        sequence=sequence,
        max_model_len=max_model_len,
        pools=pools or (Pool("full", 16, capacity, used, evictable, available),),
        groups=groups,
        max_concurrency=None,
        requests=Requests(1, 0),
        counters=Counters(
            prefix_query_tokens=queries, prefix_hit_tokens={"device": hits}, preemptions=2
        ),
    )

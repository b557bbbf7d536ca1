"""The exporter's arithmetic, by hand: ratios, headroom, exhaustion ETA, restarts, continuity."""

from __future__ import annotations

import dataclasses

import pytest

from engine_shim.snapshot import Counters, EngineIdentity, KVGroup, Pool, Requests, Snapshot
from exporter.derive import (
    CounterContinuity,
    concurrency_headroom,
    counter_values,
    engine_max_concurrency,
    exhaustion_eta,
    is_restart,
    pool_ratios,
)


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


def test_pool_ratios_by_hand() -> None:
    r = pool_ratios(snap().pools[0])
    assert (r.active, r.physical, r.evictable) == (0.1, 0.6, 0.5)
    unknown = pool_ratios(snap(evictable=None).pools[0])
    assert unknown.active == 0.1 and unknown.physical is None and unknown.evictable is None


def test_max_concurrency_and_headroom_are_group_aware() -> None:
    # 100 blocks; per request 4 full + 2 swa blocks (shared pool): 100/6 = 16.67 at most.
    groups = (
        KVGroup("full", "full_attention", "full", 4),
        KVGroup("swa", "sliding_window", "full", 2, 32),
    )
    s = snap(groups=groups)
    assert engine_max_concurrency(s) == pytest.approx(100 / 6)
    # Free = capacity - used = 1440 tokens = 90 blocks -> 15 requests fit.
    assert concurrency_headroom(s) == 15
    # Without groups: one full-attention group of cdiv(64, 16) = 4 blocks.
    assert engine_max_concurrency(snap()) == 25
    assert concurrency_headroom(snap()) == 22
    # Unknown evictable still gives headroom: available + evictable is capacity - used.
    assert concurrency_headroom(snap(evictable=None)) == 22
    assert concurrency_headroom(snap(max_model_len=None)) is None


def test_headroom_with_separate_pools_takes_the_tightest() -> None:
    pools = (Pool("full", 16, 1600, 0, 0, 1600), Pool("swa", 16, 320, 160, 0, 160))
    groups = (
        KVGroup("full", "full_attention", "full", 4),
        KVGroup("swa", "sliding_window", "swa", 2, 32),
    )
    s = snap(pools=pools, groups=groups)
    assert engine_max_concurrency(s) == pytest.approx(10.0)  # swa: 20 blocks / 2
    assert concurrency_headroom(s) == 5  # swa: 10 free blocks / 2


def test_exhaustion_eta() -> None:
    # used grows 10 tokens/s; 1000 left at the last sample -> 100 s.
    growing = [(t, 500.0 + 10 * t) for t in range(0, 50, 5)]
    assert exhaustion_eta(growing, capacity=1000 + growing[-1][1]) == pytest.approx(100.0)
    assert exhaustion_eta([(0, 5.0), (1, 5.0), (2, 5.0)], 100) is None  # flat
    assert exhaustion_eta([(0, 9.0), (1, 5.0), (2, 1.0)], 100) is None  # shrinking
    assert exhaustion_eta([(0, 1.0), (1, 2.0)], 100) is None  # too few samples
    assert exhaustion_eta([(0, 90.0), (1, 100.0), (2, 110.0)], 100) == 0.0  # already full


def test_restart_detection() -> None:
    before = snap()
    assert not is_restart(before, snap(sequence=2, queries=120))
    assert is_restart(before, snap(instance="b", sequence=2))
    assert is_restart(before, snap(sequence=0))
    assert is_restart(before, snap(sequence=2, queries=10))  # a counter went backwards
    # Bridges have no instance id or sequence: counters alone tell.
    bridged = dataclasses.replace(before, sequence=0)
    assert is_restart(bridged, dataclasses.replace(snap(queries=5), sequence=0))


def test_counters_stay_monotonic_across_restarts() -> None:
    c = CounterContinuity()
    assert c.update({"q": 100, "h": 10}, restarted=False) == {"q": 100, "h": 10}
    assert c.update({"q": 150, "h": 12}, restarted=False) == {"q": 150, "h": 12}
    assert c.update({"q": 5, "h": 0}, restarted=True) == {"q": 155, "h": 12}
    assert c.update({"q": 30, "h": 4}, restarted=False) == {"q": 180, "h": 16}
    assert c.update({"q": 1, "h": 1}, restarted=True) == {"q": 181, "h": 17}


def test_counter_values_flatten_and_skip_unknowns() -> None:
    assert counter_values(snap()) == {
        "prefix_hit_tokens:device": 50,
        "prefix_query_tokens": 100,
        "preemptions": 2,
    }

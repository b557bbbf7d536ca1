"""A bridge for an engine that does not exist ("toy"), as a new bridge module would look:
``FAMILIES`` and ``convert(text, now)``. Registered only by tests/kvstats/test_kinds.py."""

from __future__ import annotations

from engine_shim.bridges._samples import BridgeError, BridgeResult, Samples, as_count
from kvstats.snapshot import Counters, EngineIdentity, Pool, Snapshot

FAMILIES = frozenset({"toy_kv_capacity_tokens", "toy_kv_used_tokens"})


def convert(text: str, now: float) -> BridgeResult:
    samples = Samples(text, FAMILIES)
    total = as_count(samples.one("toy_kv_capacity_tokens"))
    busy = as_count(samples.one("toy_kv_used_tokens"))
    if total is None or busy is None or not 0 <= busy <= total:
        raise BridgeError(
            "toy_kv_capacity_tokens and toy_kv_used_tokens must be 0 <= used <= capacity"
        )
    snapshot = Snapshot(
        engine=EngineIdentity("toy", "0.1", "toy-model", 0, "toy-instance"),
        time=now,
        sequence=1,
        max_model_len=None,
        pools=(Pool("full", 16, total, busy, None, None),),
        groups=(),
        max_concurrency=None,
        requests=None,
        counters=Counters(),
    )
    return BridgeResult([snapshot], ["evictable tokens (the toy engine does not say)"])

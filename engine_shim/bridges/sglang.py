"""SGLang ``/metrics`` -> snapshots, one per ``dp_rank``.

SGLang >= 0.5.11 exports the raw pool counts (``kv_used/evictable/available_tokens``), which sum
exactly to ``max_total_num_tokens``. Capacity constants are emitted by every TP rank and live
stats by TP rank 0: read one rank (the lowest ``tp_rank`` and ``pp_rank``), never the sum.
Older releases only have ``num_used_tokens``: evictable is then unknown, and reported so.
"""

from __future__ import annotations

from kvstats.snapshot import Counters, EngineIdentity, Pool, Requests, Snapshot, Tier

from ._samples import (
    BridgeError,
    BridgeResult,
    LabelFilter,
    Labels,
    Samples,
    as_count,
    is_number,
    per_rank,
    pick_lowest,
)

SCHEDULER_PROBE = "sglang:max_total_num_tokens"
# The metric families this bridge reads; only these are parsed out of a scrape.
FAMILIES = frozenset(
    {
        SCHEDULER_PROBE,
        "sglang:max_total_num_tokens_swa",
        "sglang:page_size",
        *(
            f"sglang:{pool}{state}_tokens"
            for pool in ("kv_", "swa_", "mamba_")
            for state in ("used", "evictable", "available")
        ),
        "sglang:num_used_tokens",
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:prefill_effective_tokens",
        "sglang:cached_tokens",
        "sglang:evicted_tokens",
        "sglang:num_retracted_requests",
        "sglang:hicache_host_total_tokens",
        "sglang:hicache_host_used_tokens",
    }
)
TIERS = {"device_hit": "device", "host_hit": "host", "storage_hit": "storage"}


def _rank_filter(dp: str, tp: str | None, pp: str | None) -> LabelFilter:
    def where(labels: Labels) -> bool:
        return (
            labels.get("dp_rank", "0") == dp
            and (tp is None or labels.get("tp_rank", tp) == tp)
            and (pp is None or labels.get("pp_rank", pp) == pp)
            and labels.get("priority", "") == ""  # with priority scheduling, "" is the total
        )

    return where


def convert(text: str, now: float) -> BridgeResult:
    samples = Samples(text, FAMILIES)
    probes = samples.all(SCHEDULER_PROBE)
    if not probes:
        raise BridgeError(
            f"{SCHEDULER_PROBE} is missing: metrics are off (--enable-metrics),"
            " or this is not SGLang"
        )
    dp_ranks = {s.labels.get("dp_rank", "0") for s in probes}

    def build(dp: str, missing: list[str]) -> Snapshot | None:
        of_rank = [s.labels for s in probes if s.labels.get("dp_rank", "0") == dp]
        tp = pick_lowest(labels.get("tp_rank", "0") for labels in of_rank)
        pp = pick_lowest(labels.get("pp_rank", "0") for labels in of_rank)
        return _rank_snapshot(samples, dp, tp, pp, len(dp_ranks), now, missing)

    return per_rank(dp_ranks, build, "data-parallel rank")


def _pool(
    samples: Samples,
    where: LabelFilter,
    prefix: str,
    name: str,
    capacity: int | None,
    block_size: int,
    tag: str,
    missing: list[str],
) -> Pool | None:
    used = as_count(samples.one(f"sglang:{prefix}used_tokens", where))
    evictable = as_count(samples.one(f"sglang:{prefix}evictable_tokens", where))
    available = as_count(samples.one(f"sglang:{prefix}available_tokens", where))
    if used is None or evictable is None or available is None:
        return None
    total = used + evictable + available
    if capacity is None:
        capacity = total
    if total != capacity:
        missing.append(
            f"{tag}: {name} pool counts used {used} + evictable {evictable} + available {available}"
            f" = {total} do not sum to its capacity {capacity}; pool left out"
        )
        return None
    return Pool(
        name=name,
        block_size=block_size,
        capacity_slots=capacity,
        used_slots=used,
        evictable_slots=evictable,
        available_slots=available,
    )


def _full_pool(
    samples: Samples, where: LabelFilter, capacity: int, page: int, tag: str, missing: list[str]
) -> Pool | None:
    """The device pool: its three counts (SGLang >= 0.5.11), else used tokens alone."""
    full = _pool(samples, where, "kv_", "full", capacity, page, tag, missing)
    if full is not None:
        return full
    used = as_count(samples.one("sglang:num_used_tokens", where))
    if used is None or used > capacity:
        missing.append(f"{tag}: neither kv_*_tokens (SGLang >= 0.5.11) nor num_used_tokens")
        return None
    missing.append(f"{tag}: evictable tokens (SGLang < 0.5.11 exports no kv_evictable_tokens)")
    return Pool(
        name="full",
        block_size=page,
        capacity_slots=capacity,
        used_slots=used,
        evictable_slots=None,
        available_slots=None,
    )


def _prefix_counts(
    samples: Samples, where: LabelFilter, n_dp: int, tag: str, missing: list[str]
) -> tuple[int | None, dict[str, int]]:
    """Prefix query tokens and hit tokens by tier. Per-rank prefill counters first (scheduler
    collector); the tokenizer's cached_tokens_total has no dp_rank, so it is only usable with a
    single DP rank."""
    modes = samples.all("sglang:prefill_effective_tokens_total", where)
    if modes:
        by_mode = {s.labels.get("mode", ""): as_count(s.value) or 0 for s in modes}
        return sum(by_mode.values()), {tier: by_mode.get(mode, 0) for mode, tier in TIERS.items()}
    if n_dp != 1:
        missing.append(f"{tag}: prefix hits (no per-rank prefill_effective_tokens_total)")
        return None, {}
    hits: dict[str, int] = {}
    for s in samples.all("sglang:cached_tokens_total"):
        source = s.labels.get("cache_source", "")
        tier = "storage" if source.startswith("storage") else source
        if tier in ("device", "host", "storage") and (value := as_count(s.value)) is not None:
            hits[tier] = hits.get(tier, 0) + value
    missing.append(f"{tag}: prefix query tokens (no prefill_effective_tokens_total)")
    return None, hits


def _rank_snapshot(
    samples: Samples,
    dp: str,
    tp: str | None,
    pp: str | None,
    n_dp: int,
    now: float,
    missing: list[str],
) -> Snapshot | None:
    tag = f"dp {dp}"
    where = _rank_filter(dp, tp, pp)
    capacity = as_count(samples.one(SCHEDULER_PROBE, where))
    page = as_count(samples.one("sglang:page_size", where)) or 1
    if capacity is None or capacity == 0:
        missing.append(f"{tag}: no valid {SCHEDULER_PROBE}")
        return None
    full = _full_pool(samples, where, capacity, page, tag, missing)
    if full is None:
        return None
    pools = [full]
    swa_capacity = as_count(samples.one("sglang:max_total_num_tokens_swa", where))
    if swa_capacity:
        swa = _pool(samples, where, "swa_", "swa", swa_capacity, page, tag, missing)
        if swa is not None:
            pools.append(swa)
    mamba = _pool(samples, where, "mamba_", "mamba", None, 1, tag, missing)
    if mamba is not None and mamba.capacity_slots > 0:
        pools.append(mamba)

    running = as_count(samples.one("sglang:num_running_reqs", where))
    waiting = as_count(samples.one("sglang:num_queue_reqs", where))
    model = next(
        (
            s.labels["model_name"]
            for s in samples.all(SCHEDULER_PROBE, where)
            if "model_name" in s.labels
        ),
        "unknown",
    )

    queries, hits = _prefix_counts(samples, where, n_dp, tag, missing)

    evicted = as_count(samples.total("sglang:evicted_tokens_total", where))
    preemptions = as_count(samples.total("sglang:num_retracted_requests_total", where))
    if preemptions is None:
        missing.append(f"{tag}: retractions (num_retracted_requests_total)")
    host_total = as_count(samples.one("sglang:hicache_host_total_tokens", where))
    host_used = as_count(samples.one("sglang:hicache_host_used_tokens", where))
    host = (
        Tier(host_total, host_used)
        if host_total and host_used is not None and host_used <= host_total
        else None
    )

    return Snapshot(
        engine=EngineIdentity(
            kind="sglang",
            version="unknown",
            model=model,
            dp_rank=int(dp) if is_number(dp) else 0,
            instance_id="unknown",
        ),
        time=now,
        sequence=0,
        max_model_len=None,
        pools=tuple(pools),
        groups=(),
        max_concurrency=None,
        capacity_tokens=capacity,  # SGLang's max_total_num_tokens: its own token figure
        requests=None if running is None or waiting is None else Requests(running, waiting),
        counters=Counters(
            prefix_query_tokens=queries,
            prefix_hit_tokens=hits,
            evicted_tokens=evicted,
            preemptions=preemptions,
        ),
        host_tier=host,
        storage_tier=None,
    )

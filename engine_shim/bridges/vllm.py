"""vLLM (V1 engine, 0.9+) ``/metrics`` -> snapshots, one per engine (data-parallel rank).

What a scrape can tell (see docs/engines.md): pinned blocks = ``kv_cache_usage_perc`` x usable
blocks, where usable = ``num_gpu_blocks`` / number of engine series (the API server stamps the
DP-summed total on every series) - 1 (the null block). Free and evictable blocks are not
separable from outside the engine core: evictable is reported unknown, never 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from kvstats.snapshot import Counters, EngineIdentity, KVGroup, Pool, Requests, Snapshot

from ._samples import (
    BridgeError,
    BridgeResult,
    LabelFilter,
    Samples,
    as_count,
    is_number,
    labels_match,
    per_rank,
)

# prompt_tokens_cached_by_source sources -> the snapshot's hit tiers (every source vLLM has).
TIER_OF_SOURCE = {
    "device": "device",
    "host": "host",
    "disk": "storage",
    "p2p": "p2p",
    "external_unspecified": "external",
}


# The metric families this bridge reads; only these are parsed out of a scrape (whatever else
# the engine exports, histograms included, costs a line scan and nothing more).
FAMILIES = frozenset(
    {
        "vllm:cache_config_info",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_cached_by_source",
        "vllm:prefix_cache_hits",
        "vllm:prefix_cache_queries",
        "vllm:external_prefix_cache_queries",
        "vllm:num_preemptions",
    }
)


def _config_value(labels: dict[str, str], name: str) -> str | None:
    value = labels.get(name)
    return None if value in (None, "None", "") else value


def _float_or_none(text: str | None) -> float | None:
    """A label's number; anything unparsable is unknown (labels are free text)."""
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _bytes_per_slot(config: dict[str, str], num_blocks: int, block_size: int) -> int | None:
    """From ``kv_cache_memory_bytes`` (0.32+, per worker): vLLM allocates
    ``budget // bytes_per_block`` blocks, so ``budget // slots`` is the per-slot size exactly.
    Unknown when ``num_gpu_blocks_override`` decoupled the block count from the budget."""
    budget = _config_value(config, "kv_cache_memory_bytes")
    if budget is None or not is_number(budget) or _config_value(config, "num_gpu_blocks_override"):
        return None
    return int(budget) // (num_blocks * block_size) or None


def _instance_id(samples: Samples, engine: str) -> str:
    """Process start from ``_created`` series (single-process mode); they change on restart."""
    created = [
        s.value
        for name, found in samples.by_name.items()
        if name.startswith("vllm:") and name.endswith("_created")
        for s in found
        if s.labels.get("engine") == engine and math.isfinite(s.value)
    ]
    return f"vllm-created-{min(created):.3f}" if created else "unknown"


def convert(text: str, now: float) -> BridgeResult:
    samples = Samples(text, FAMILIES)
    config_series = samples.all("vllm:cache_config_info")
    if not config_series:
        raise BridgeError(
            "vllm:cache_config_info is missing: the engine is not ready, or this is not vLLM"
        )
    engines = [s.labels.get("engine", "0") for s in config_series]

    def build(engine: str, missing: list[str]) -> Snapshot | None:
        config = next(s.labels for s in config_series if s.labels.get("engine", "0") == engine)
        return _engine_snapshot(samples, engine, config, len(set(engines)), now, missing)

    return per_rank(engines, build, "engine")


class _Capacity(NamedTuple):
    concurrency: float | None
    tokens: int | None
    max_model_len: int | None
    groups: tuple[KVGroup, ...]


def _capacity(config: dict[str, str], num_blocks: int, tag: str, missing: list[str]) -> _Capacity:
    """What vLLM's cache_config_info says of the capacity, group-aware where it can."""
    concurrency = _float_or_none(_config_value(config, "kv_cache_max_concurrency"))
    if concurrency is not None and (not math.isfinite(concurrency) or concurrency <= 0):
        concurrency = None
    size_text = _config_value(config, "kv_cache_size_tokens")
    tokens = int(size_text) if size_text is not None and is_number(size_text) else None
    if tokens is None:
        missing.append(f"{tag}: kv_cache_size_tokens (older vLLM): token capacity unknown")
    if concurrency is None:
        missing.append(f"{tag}: kv_cache_max_concurrency (older vLLM)")
        return _Capacity(None, tokens, None, ())
    # vLLM: max_concurrency = num_blocks / sum(blocks per request over groups), so the
    # group-aware footprint is recoverable even for hybrid models.
    footprint = round(num_blocks / concurrency)
    groups = (KVGroup(name="all", kind="other", pool="full", blocks_per_request=footprint),)
    max_model_len = None
    if tokens is not None:
        candidate = round(tokens / concurrency)
        if int(concurrency * candidate) == tokens:
            max_model_len = candidate
    return _Capacity(concurrency, tokens, max_model_len, groups)


def _hit_tokens(
    samples: Samples, where: LabelFilter, tag: str, missing: list[str]
) -> dict[str, int]:
    """Cached prompt tokens by tier: by source where vLLM says, else all on the device."""
    hits: dict[str, int] = {}
    by_source = samples.all("vllm:prompt_tokens_cached_by_source_total", where)
    if not by_source:
        device = as_count(samples.total("vllm:prefix_cache_hits_total", where))
        return {} if device is None else {"device": device}
    for sample in by_source:
        source = sample.labels.get("source", "")
        tier = TIER_OF_SOURCE.get(source)
        value = as_count(sample.value)
        if tier is not None and value is not None:
            hits[tier] = hits.get(tier, 0) + value
        elif value:
            missing.append(f"{tag}: {value} cached tokens from source {source!r} have no tier")
    return hits


def _engine_snapshot(
    samples: Samples,
    engine: str,
    config: dict[str, str],
    n_engines: int,
    now: float,
    missing: list[str],
) -> Snapshot | None:
    where = labels_match(engine=engine)
    tag = f"engine {engine}"
    total_blocks = _config_value(config, "num_gpu_blocks")
    block_size = _config_value(config, "block_size")
    if (
        total_blocks is None
        or block_size is None
        or not is_number(total_blocks)
        or not is_number(block_size)
    ):
        missing.append(f"{tag}: cache_config_info has no num_gpu_blocks/block_size")
        return None
    num_blocks = int(total_blocks) // n_engines  # summed over DP engines; includes the null block
    bs = int(block_size)
    usage = samples.one("vllm:kv_cache_usage_perc", where)
    if usage is None or not 0 <= usage <= 1 or num_blocks < 2 or bs < 1:
        missing.append(f"{tag}: no valid vllm:kv_cache_usage_perc")
        return None
    usable = num_blocks - 1
    used_blocks = round(usage * usable)
    missing.append(f"{tag}: evictable tokens (vLLM does not export them; use the in-process shim)")

    capacity = _capacity(config, num_blocks, tag, missing)

    bytes_per_slot = _bytes_per_slot(config, num_blocks, bs)
    if bytes_per_slot is None:
        missing.append(f"{tag}: pool bytes (kv_cache_memory_bytes not exported, or overridden)")

    running = as_count(samples.one("vllm:num_requests_running", where))
    waiting = as_count(samples.one("vllm:num_requests_waiting", where))
    model = next(
        (
            s.labels["model_name"]
            for s in samples.all("vllm:kv_cache_usage_perc", where)
            if "model_name" in s.labels
        ),
        "unknown",
    )

    hits = _hit_tokens(samples, where, tag, missing)
    queries = as_count(samples.total("vllm:prefix_cache_queries_total", where))
    external = as_count(samples.total("vllm:external_prefix_cache_queries_total", where))
    if queries is not None and external:
        queries += external
    preemptions = as_count(samples.total("vllm:num_preemptions_total", where))
    for name, value in (("prefix cache queries", queries), ("preemptions", preemptions)):
        if value is None:
            missing.append(f"{tag}: {name}")

    return Snapshot(
        engine=EngineIdentity(
            kind="vllm",
            version="unknown",
            model=model,
            dp_rank=int(engine) if is_number(engine) else 0,
            instance_id=_instance_id(samples, engine),
        ),
        time=now,
        sequence=0,
        max_model_len=capacity.max_model_len,
        pools=(
            Pool(
                name="full",
                block_size=bs,
                capacity_slots=usable * bs,
                used_slots=used_blocks * bs,
                evictable_slots=None,
                available_slots=None,
                bytes_per_slot=bytes_per_slot,
            ),
        ),
        groups=capacity.groups,
        max_concurrency=capacity.concurrency,
        capacity_tokens=capacity.tokens,
        requests=None if running is None or waiting is None else Requests(running, waiting),
        counters=Counters(
            prefix_query_tokens=queries, prefix_hit_tokens=hits, preemptions=preemptions
        ),
    )

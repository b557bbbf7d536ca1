"""Render ``docs/snapshot-schema.md`` from the snapshot dataclasses.

``python -m kvstats.schema_doc > docs/snapshot-schema.md``; a test fails when the committed
page differs, or when a field has no description here.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

from . import snapshot as s
from .kinds import engine_kinds

DESCRIPTIONS: dict[str, str] = {
    "Snapshot.engine": "who produced the snapshot",
    "Snapshot.time": "Unix time (seconds) at which the engine published it",
    "Snapshot.sequence": "increases by one per published snapshot of this instance",
    "Snapshot.max_model_len": "longest request (prompt + output) the engine accepts, in tokens",
    "Snapshot.pools": "one entry per physical KV pool (`full`; `swa`, `mamba` where separate)",
    "Snapshot.groups": "KV cache groups and their per-request footprint at max_model_len",
    "Snapshot.max_concurrency": "group-aware requests of max_model_len that fit in the pools",
    "Snapshot.requests": "requests running and waiting",
    "Snapshot.counters": "monotonic counters since `engine.instance_id` started",
    "Snapshot.host_tier": "host-DRAM tier (HiCache L2), null when the engine has none",
    "Snapshot.storage_tier": "storage tier (HiCache L3), null when the engine has none",
    "Snapshot.capacity_tokens": (
        "tokens the engine holds, as the engine itself states it (vLLM: `kv_cache_size_tokens`"
        " = max_concurrency x max_model_len; SGLang: `max_total_num_tokens`); null if unknown"
    ),
    "Snapshot.schema": f"`{s.SCHEMA_VERSION}` (`{s.LEGACY_SCHEMA_V1}` is still read)",
    "EngineIdentity.kind": f"one of {', '.join(f'`{k}`' for k in engine_kinds())}",
    "EngineIdentity.version": "engine (or shim) version",
    "EngineIdentity.model": "served model name",
    "EngineIdentity.dp_rank": "data-parallel rank; one snapshot per rank",
    "EngineIdentity.instance_id": "changes on every engine restart: counters restart with it",
    "Pool.name": "`full`, `swa`, `mamba`, ...",
    "Pool.block_size": "tokens per block (page)",
    "Pool.capacity_slots": (
        "token slots in the pool (blocks x block size); on a hybrid model sharing one pool, a"
        " token takes a slot in every group, so this is not the token capacity"
    ),
    "Pool.used_slots": "slots pinned by running requests",
    "Pool.evictable_slots": "cached slots no request references (reclaimable); null if unknown",
    "Pool.available_slots": "empty slots; null exactly when evictable is null",
    "Pool.bytes_per_slot": "bytes of K/V per token slot: pool bytes / capacity_slots",
    "Pool.device": "`cpu`, `cuda:0`, ...",
    "Pool.gpu_uuid": "NVML UUID of the GPU that holds the pool (joins to NVML metrics)",
    "Pool.evictable_prefix_tokens": (
        "prefix-cache tokens the evictable blocks hold: below evictable_slots where a cached"
        " block is partly filled (vLLM's partial-block caching); null if unknown"
    ),
    "Pool.peak_used_slots": (
        "highest used_slots at any scheduler step since the previous stats read; null if not"
        " tracked"
    ),
    "Pool.peak_physical_slots": (
        "highest used + evictable slots at any scheduler step since the previous stats read;"
        " null if not tracked"
    ),
    "Pool.evictable_slots_lower": (
        "where evictable_slots is null but bounded (vLLM's KV events with its usage gauge): the"
        " fewest evictable slots there can be; null otherwise"
    ),
    "Pool.evictable_slots_upper": (
        "the most evictable slots there can be; null with the lower bound"
    ),
    "Snapshot.status": "what the producer says of its own numbers; absent means `ok`",
    "Snapshot.prefix_resident_slots": (
        f"object: slots holding prefix-cache blocks, referenced or not, by tier"
        f" ({', '.join(f'`{t}`' for t in s.RESIDENT_TIERS)}); a tier not known exactly is absent"
        " (the vLLM shim: device; a whole KV event stream: every tier it carries)"
    ),
    "ProducerStatus.state": (
        f"one of {', '.join(f'`{k}`' for k in s.STATUS_STATES)}: `warming_up` = the engine has"
        " not sized its KV cache yet (capacity and max concurrency null, not 0); `unsupported`"
        " = the shim does not recognise this engine release and publishes only what is exact"
    ),
    "ProducerStatus.reason": "why, in words (at most 1,024 characters)",
    "KVGroup.name": "group name",
    "KVGroup.kind": f"one of {', '.join(f'`{k}`' for k in s.GROUP_KINDS)}",
    "KVGroup.pool": "name of the pool the group's blocks come from",
    "KVGroup.blocks_per_request": "blocks one max_model_len request holds in this group",
    "KVGroup.sliding_window": "window in tokens for sliding-window groups",
    "Requests.running": "requests holding KV and being computed",
    "Requests.waiting": "requests queued for admission (including preempted ones)",
    "Counters.prefix_query_tokens": "prompt tokens looked up in the prefix cache",
    "Counters.prefix_hit_tokens": (
        f"object: hit tokens by tier ({', '.join(f'`{t}`' for t in s.HIT_TIERS)}); "
        "a tier the engine lacks is absent"
    ),
    "Counters.evicted_tokens": "device slots freed by evicting cached prefixes",
    "Counters.preemptions": "running requests preempted for lack of KV",
    "Counters.iterations": "scheduler iterations (engine steps)",
    "Tier.capacity_tokens": "tokens the tier can hold",
    "Tier.used_tokens": "tokens it holds",
    "Snapshot.reuse_distance": (
        "optional: looked-up prompt tokens by reuse distance (the what-if hit-ratio curve);"
        " absent from bridges and older shims"
    ),
    "ReuseDistances.sampling_rate": "share of blocks tracked, in (0, 1] (spatial sampling)",
    "ReuseDistances.bounds_tokens": (
        "bucket upper bounds in tokens, increasing, 1 to 64 of them (the reference engine and"
        " the vLLM shim: the pool x 2^(k/2) from 1/16x to 64x, plus pool + each lower tier)"
    ),
    "ReuseDistances.cumulative_tokens": (
        "looked-up tokens whose distance is at most each bound (would have hit in a pool that"
        " size); non-decreasing, at most query_tokens"
    ),
    "ReuseDistances.query_tokens": "every looked-up prompt token (the +Inf bucket), exact",
    "ReuseDistances.distance_sum_tokens": "sum of distance x tokens over reused tokens",
    "ReuseDistances.version": (
        "1; a section of another version is skipped by this parser (the rest of the snapshot"
        " is still read)"
    ),
}

CLASSES = [
    s.Snapshot,
    s.EngineIdentity,
    s.Pool,
    s.KVGroup,
    s.Requests,
    s.Counters,
    s.Tier,
    s.ReuseDistances,
    s.ProducerStatus,
]


def _type_text(tp: object) -> str:
    text = str(tp).replace("typing.", "").replace("kvstats.snapshot.", "")
    text = text.replace("<class '", "").replace("'>", "")
    return text.replace("collections.abc.", "").replace("|", "\\|")  # inside a table


def render() -> str:
    lines = [
        f"# KV stats snapshot, schema `{s.SCHEMA_VERSION}`",
        "",
        "What a shim or bridge serves at `GET /v1/kv/stats` (one object, or an array with one",
        "object per data-parallel rank) and the exporter polls. Generated from",
        "`kvstats/snapshot.py` by `python -m kvstats.schema_doc`; do not edit by hand.",
        "",
        "Rules the parser enforces (`kvstats.validate.parse_snapshot`):",
        "",
        "- counts are non-negative integers; numbers are finite (no NaN or infinity); both are",
        "  at most 2^53, the largest integer a metric sample holds exactly;",
        "- strings are at most 256 characters; lone surrogates (which UTF-8 cannot encode) are",
        "  replaced with U+FFFD, so that every string can become a label value;",
        "- every pool has `used + evictable + available == capacity`, or both evictable and",
        "  available are null (the engine cannot split its free space);",
        "- `used <= capacity`; pool names are unique; each group names an existing pool;",
        "- unknown values are `null` (or an absent hit tier), never a guessed 0.",
        "",
        "Slots and tokens: a pool counts token *slots* (blocks x block size). A token of a",
        "request takes a slot in every KV group it belongs to, so on a hybrid model whose",
        "groups share one pool (vLLM: sliding-window + full attention) slots exceed the tokens",
        "the engine can hold. `capacity_tokens` is that token figure, as the engine states it.",
        "Ratios (usage, evictable share) are the same in slots and in blocks.",
        "",
        f"Changes from `{s.LEGACY_SCHEMA_V1}`: the pool fields `capacity_tokens`, `used_tokens`,",
        "`evictable_tokens`, `available_tokens`, `bytes_per_token` are now `capacity_slots`,",
        "`used_slots`, `evictable_slots`, `available_slots`, `bytes_per_slot` (same values);",
        "`capacity_tokens` is new at the top level; hit tiers `p2p` and `external` are new.",
        f"`{s.LEGACY_SCHEMA_V1}` snapshots are still read, with `capacity_tokens` null.",
        "",
    ]
    for cls in CLASSES:
        hints = typing.get_type_hints(cls)
        lines += [f"## {cls.__name__}", ""]
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(cls.__name__ + "("):
            lines += [doc, ""]
        lines += ["| field | type | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            meaning = DESCRIPTIONS[f"{cls.__name__}.{f.name}"]
            lines.append(f"| `{f.name}` | `{_type_text(hints[f.name])}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")

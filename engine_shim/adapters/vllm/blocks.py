"""vLLM's ``KVCacheBlock`` as each release lays it out, and a subclass that keeps counts.

A block is evictable exactly when ``ref_cnt == 0``, it has a hash, and it is not the null block.
The tracked subclass swaps the state slots for properties whose setters keep a running count of
evictable blocks and of the prefix tokens they hold, so every path that changes a block
(allocate, touch, free, evict, reset, copy-on-write, partial -> full promotion) is counted
without scanning the pool. Getters stay the slots' own C-level ``__get__``: reads cost what
they did.

Layouts: vLLM 0.31-0.33 keep the hash in ``_block_hash`` (``block_hash`` is a read-only
property) and its prefix length in ``_block_hash_num_tokens``; 0.34 made both plain fields,
``block_hash`` and ``block_hash_num_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...reuse_distance import HASH_SPACE, SCRAMBLE, ReuseDistanceTracker

MASK = HASH_SPACE - 1


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is not shaped as this adapter expects (the message says how)."""


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Where a release's ``KVCacheBlock`` keeps the state that decides evictability."""

    hash_field: str  # ``_block_hash`` (0.31-0.33) or ``block_hash`` (0.34)
    tokens_field: str | None  # the hash's prefix length; ``None`` before partial caching


def _slot(base: type, name: str) -> Any:
    """The member descriptor of a ``__slots__`` field, or ``None``."""
    descriptor = base.__dict__.get(name)
    return descriptor if type(descriptor).__name__ == "member_descriptor" else None


def block_layout(base: type) -> BlockLayout:
    """Find the slots of this vLLM's block; ``UnsupportedVllm`` names what is missing."""
    missing = [name for name in ("ref_cnt", "is_null") if _slot(base, name) is None]
    hash_field = next((n for n in ("_block_hash", "block_hash") if _slot(base, n)), None)
    if hash_field is None:
        missing.append("_block_hash or block_hash")
    if missing or hash_field is None:
        raise UnsupportedVllm(
            f"{base.__qualname__} has no slot {', '.join(missing)} (fields now:"
            f" {', '.join(sorted(getattr(base, '__slots__', ())))})"
        )
    tokens_field = next(
        (n for n in (f"{hash_field}_num_tokens",) if _slot(base, n) is not None), None
    )
    return BlockLayout(hash_field, tokens_field)


class PoolCounts:
    """Running counts the tracked blocks keep, and the reuse tracker they feed."""

    __slots__ = ("blocks", "failure", "recency", "tokens")

    def __init__(self, recency: ReuseDistanceTracker | None) -> None:
        self.blocks = 0  # evictable blocks
        self.tokens = 0  # prefix tokens those blocks hold
        self.recency = recency
        self.failure: str | None = None  # why the reuse tracker was switched off


def cached_tokens_function(
    block_sizes: Mapping[int, int], default: int
) -> Callable[[Any, int | None], int]:
    """Tokens a cached block holds, from its key (block hash + 4-byte group id) and the prefix
    length its hash covers: a full block holds its group's block size, a partial entry (vLLM's
    partial-block caching) only the part of the prefix that falls in its block."""
    sizes = {g: s for g, s in block_sizes.items() if s != default}

    def cached_tokens(key: Any, prefix_tokens: int | None) -> int:
        size = sizes.get(int.from_bytes(key[-4:], "big"), default) if sizes else default
        if prefix_tokens is None:
            return size
        return prefix_tokens - (prefix_tokens - 1) // size * size

    return cached_tokens


def tracked_block_class(
    base: type, layout: BlockLayout, counts: PoolCounts, cached_tokens: Callable[..., int]
) -> type:
    """A subclass of vLLM's KVCacheBlock whose state setters maintain ``counts`` and tell
    ``counts.recency`` when a cached block becomes held or idle (its key: vLLM's block hash
    with group id, as stored on the block)."""
    ref_slot, null_slot = base.__dict__["ref_cnt"], base.__dict__["is_null"]
    hash_slot = base.__dict__[layout.hash_field]
    ref_get, ref_set = ref_slot.__get__, ref_slot.__set__
    hash_get, hash_set = hash_slot.__get__, hash_slot.__set__
    null_get, null_set = null_slot.__get__, null_slot.__set__
    if layout.tokens_field is not None:
        tokens_slot = base.__dict__[layout.tokens_field]
        tokens_get, tokens_set = tokens_slot.__get__, tokens_slot.__set__
    else:

        def tokens_get(block: Any) -> None:
            return None

        tokens_set = None

    def recency_failed(exc: BaseException) -> None:
        # Monitoring never takes serving down: the curve stops, the counts go on.
        counts.recency = None
        counts.failure = f"reuse-distance tracking stopped: {exc!r}"[:300]

    # Hot path of vLLM's allocator: only a 0 <-> non-0 ref_cnt change, or a hash appearing or
    # going, can change evictability, and only then are the other fields read.
    def set_ref(self: Any, value: int) -> None:
        old = ref_get(self)
        ref_set(self, value)
        if (old == 0) is not (value == 0) and not null_get(self):
            key = hash_get(self)
            if key is not None:
                if value == 0:
                    counts.blocks += 1
                    counts.tokens += cached_tokens(key, tokens_get(self))
                else:
                    counts.blocks -= 1
                    counts.tokens -= cached_tokens(key, tokens_get(self))
            recency = counts.recency
            if recency is not None:
                # vLLM's free queue is one LRU of every free block, cached or empty: an
                # empty block takes part under its id, a cached one under its hash. The
                # sampling test is inlined: most blocks are not sampled, and this is hot.
                if key is None:
                    key = self.block_id
                    sampled = (key * SCRAMBLE) & MASK < recency.threshold
                else:
                    sampled = int.from_bytes(key[:4], "little") < recency.threshold
                if sampled:
                    try:
                        (recency.released_sampled if value == 0 else recency.pinned_sampled)(key)
                    except Exception as exc:
                        recency_failed(exc)

    def set_hash(self: Any, value: Any) -> None:
        old = hash_get(self)
        hash_set(self, value)
        if (old is None) is not (value is None) and not null_get(self):
            if ref_get(self) == 0:
                if old is None:
                    counts.blocks += 1
                    counts.tokens += cached_tokens(value, tokens_get(self))
                else:
                    counts.blocks -= 1
                    counts.tokens -= cached_tokens(old, tokens_get(self))
            elif value is not None and counts.recency is not None:
                recency = counts.recency
                # Held while its writer filled it, cached from now on: known by its hash.
                try:
                    if (self.block_id * SCRAMBLE) & MASK < recency.threshold:
                        recency.forget(self.block_id)
                    if int.from_bytes(value[:4], "little") < recency.threshold:
                        recency.pinned_sampled(value)
                except Exception as exc:
                    recency_failed(exc)

    def set_tokens(self: Any, value: int | None) -> None:
        # vLLM sets the hash, then its prefix length (and clears them in that order too).
        old = tokens_get(self)
        tokens_set(self, value)
        if old != value and ref_get(self) == 0 and not null_get(self):
            key = hash_get(self)
            if key is not None:
                counts.tokens += cached_tokens(key, value) - cached_tokens(key, old)

    def set_null(self: Any, value: bool) -> None:
        key = hash_get(self)
        was = ref_get(self) == 0 and key is not None and not null_get(self)
        null_set(self, value)
        now = ref_get(self) == 0 and key is not None and not value
        if was is not now:
            sign = 1 if now else -1
            counts.blocks += sign
            counts.tokens += sign * cached_tokens(key, tokens_get(self))

    members: dict[str, Any] = {
        "__slots__": (),
        "ref_cnt": property(ref_get, set_ref),
        layout.hash_field: property(hash_get, set_hash),
        "is_null": property(null_get, set_null),
    }
    if layout.tokens_field is not None:
        members[layout.tokens_field] = property(tokens_get, set_tokens)
    return type(f"Tracked{base.__name__}", (base,), members)


def brute_force_evictable(block_pool: Any) -> int:
    """vLLM's own definition, O(N): for tests and start-up."""
    return sum(
        1
        for b in block_pool.blocks
        if b.ref_cnt == 0 and not b.is_null and b.block_hash is not None
    )


def brute_force_evictable_tokens(block_pool: Any, cached_tokens: Callable[..., int]) -> int:
    """Prefix tokens in evictable blocks, O(N): for tests and start-up."""
    return sum(
        cached_tokens(b.block_hash, getattr(b, "block_hash_num_tokens", None))
        for b in block_pool.blocks
        if b.ref_cnt == 0 and not b.is_null and b.block_hash is not None
    )

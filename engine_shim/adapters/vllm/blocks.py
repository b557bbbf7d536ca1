"""vLLM's ``KVCacheBlock`` as each release lays it out, and counts kept at its free queue.

A block is evictable exactly when ``ref_cnt == 0``, it has a hash, and it is not the null block;
equivalently (vLLM keeps every unreferenced non-null block in its free queue), when it is a
cached block in the free queue. The counts follow the queue: blocks enter it (``append``,
``append_n``, ``prepend_n``) and leave it (``popleft``, ``popleft_n``, ``remove``) a request at
a time, and each call is counted over its blocks at C speed. The one other change that matters,
a hash (and its prefix length) appearing or going, goes through ``KVCacheBlock.set_block_hash``
and ``reset_hash``, the only code that writes them in every supported release (the tests read
each release's source for any other write). Every slot stays vLLM's own: reads and ``ref_cnt``
writes on the allocator's hot path cost what they did.

Layouts: vLLM 0.31-0.33 keep the hash in ``_block_hash`` (``block_hash`` is a read-only
property) and its prefix length in ``_block_hash_num_tokens``; 0.34 made both plain fields,
``block_hash`` and ``block_hash_num_tokens``. The free queue is the same in all four.
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


# vLLM's free queue, the same in 0.31-0.34: what moves blocks in and out, and what only reads.
QUEUE_MUTATORS = ("popleft", "popleft_n", "remove", "append", "append_n", "prepend_n")
QUEUE_READERS = ("get_all_free_blocks", "iter_blocks_after")
BLOCK_SLOTS = ("block_id", "prev_free_block")


def check_free_queue(queue_class: type) -> None:
    """Counting at the queue is exact only if these are all the ways blocks move: a release
    with a new mutator is refused (``UnsupportedVllm``) rather than counted wrong."""
    methods = {n for n in dir(queue_class) if not n.startswith("_")}
    methods = {n for n in methods if callable(getattr(queue_class, n))}
    missing = sorted(set(QUEUE_MUTATORS) - methods)
    unknown = sorted(methods - set(QUEUE_MUTATORS) - set(QUEUE_READERS))
    if missing or unknown:
        raise UnsupportedVllm(
            f"{queue_class.__qualname__}: methods missing {missing or 'none'}, unknown"
            f" {unknown or 'none'}"
        )


class FreeQueueCounter:
    """Evictable = cached (hashed), non-null blocks in vLLM's free queue, counted where blocks
    enter and leave the queue: once per call, over the call's blocks at C speed (``map``,
    ``list.count``, set intersections), not once per block in Python. A block's hash changes
    through ``set_block_hash`` / ``reset_hash``, which adjust the counts only for a block in the
    queue at the time (``reset_prefix_cache``, an eviction of a free block by a connector).

    The same calls feed the reuse tracker: a block entering the queue becomes idle, one taken
    by ``remove`` (a prefix hit) is held under its hash, one popped for allocation is held under
    its id (its old content, if any, stays in the recency order: that is what eviction means
    for a stack distance). Only sampled blocks reach Python: the ids whose current key is
    sampled are kept in a set and intersected with each call's ids.
    """

    # Slots: the hooks read these on every call, amid the allocator's own memory traffic.
    __slots__ = (
        "blocks",
        "by_id",
        "cached_tokens",
        "duplicates",
        "extra",
        "failure",
        "hash_get",
        "hashed",
        "id_get",
        "null_get",
        "per_block_tokens",
        "pool",
        "prev_get",
        "recency",
        "sampled",
        "size",
        "threshold",
        "tokens",
        "tokens_get",
    )

    def __init__(
        self,
        pool: Any,
        layout: BlockLayout,
        cached_tokens: Callable[[Any, int | None], int],
        block_size: int,
        recency: ReuseDistanceTracker | None,
        per_block_tokens: bool = True,
    ) -> None:
        base = type(pool.blocks[0])
        missing = [n for n in BLOCK_SLOTS if _slot(base, n) is None]
        missing += [f"{n}()" for n in HASH_WRITERS if not callable(getattr(base, n, None))]
        if missing:
            raise UnsupportedVllm(f"{base.__qualname__} has no {', '.join(missing)}")
        check_free_queue(type(pool.free_block_queue))
        self.pool = pool
        self.cached_tokens = cached_tokens
        self.size = block_size
        self.recency = recency
        self.failure: str | None = None  # why the reuse tracker was switched off
        self.hash_get = base.__dict__[layout.hash_field].__get__
        self.id_get = base.__dict__["block_id"].__get__
        self.prev_get = base.__dict__["prev_free_block"].__get__
        self.null_get = base.__dict__["is_null"].__get__
        self.tokens_get: Callable[[Any], int | None] = (
            base.__dict__[layout.tokens_field].__get__
            if layout.tokens_field is not None
            else (lambda block: None)
        )
        # Block id -> (its cached tokens - block_size), for the few blocks where it is not 0:
        # partial entries, or a group whose block size is not the pool's. Where neither can
        # happen (every group's block size is the pool's hash block size), it stays empty and
        # a block's prefix length is not even watched.
        self.extra: dict[int, int] = {}
        self.per_block_tokens = per_block_tokens
        self.sampled: set[int] = set()  # ids of blocks whose current key is sampled
        self.by_id: set[int] = set()  # ids sampled as ids (how a popped block is keyed)
        # Cached blocks whose hash another block held first: vLLM does not deduplicate (a
        # whole prompt's last block, computed again; two requests filling the same prefix in
        # one step), and its lookup finds the first. Each is a block of its own in the
        # recency order, so it stays keyed by its id: under the hash, two blocks would count
        # as one and every distance behind them would read short. Only those the reuse
        # tracker follows (by id, or under a sampled or hot hash) are marked: for any other,
        # nothing is keyed at all.
        self.duplicates: set[int] = set()
        if recency is not None:
            lookup_map = getattr(pool, "cached_block_hash_to_block", None)
            if callable(getattr(lookup_map, "get_one_block", None)):
                recency.on_promote, recency.on_demote = self.promoted, self.demoted
            else:  # a hot key's block cannot be found: keep to the sampled blocks
                recency.hot_capacity = 0
        self.threshold = -1
        self.blocks = self.tokens = 0
        # Blocks with a hash (prefix-cache resident, in use or evictable): what vLLM's KV
        # events count as stored and not removed, so the two can be checked against each other.
        self.hashed = 0
        for block in pool.blocks:
            if self.hash_get(block) is not None and not self.null_get(block):
                self.hashed += 1
            self.refresh(block)
            counted, tokens = self.contribution(block)
            self.blocks += counted
            self.tokens += tokens

    # ---------------------------------------------------------------- one block (rare)

    def contribution(self, block: Any) -> tuple[int, int]:
        if self.prev_get(block) is None or self.null_get(block):
            return 0, 0
        if self.hash_get(block) is None:
            return 0, 0
        return 1, self.size + self.extra.get(self.id_get(block), 0)

    def refresh(self, block: Any) -> None:
        """Recompute what is kept per block after its hash or prefix length changed."""
        block_id, key = self.id_get(block), self.hash_get(block)
        self.extra.pop(block_id, None)
        if key is None:
            self.duplicates.discard(block_id)
        else:
            extra = self.cached_tokens(key, self.tokens_get(block)) - self.size
            if extra:
                self.extra[block_id] = extra
        if self.recency is not None:
            self.sync_threshold()
            if self.recency.tracks(self.recency_key(block_id, key)):
                self.sampled.add(block_id)
            else:
                self.sampled.discard(block_id)

    def sync_threshold(self) -> None:
        """The tracker only ever lowers its threshold (fewer blocks tracked): the sampled sets
        shrink by filtering, never by scanning the pool."""
        recency = self.recency
        assert recency is not None
        threshold = recency.threshold
        if threshold == self.threshold:
            return
        blocks, hash_get = self.pool.blocks, self.hash_get
        if threshold > self.threshold >= 0 or self.threshold < 0:  # first use: build
            self.by_id = {i for i in range(len(blocks)) if (i * SCRAMBLE) & MASK < threshold}
            candidates: Any = range(len(blocks))
        else:
            self.by_id = {i for i in self.by_id if (i * SCRAMBLE) & MASK < threshold}
            candidates = self.sampled
        self.threshold = threshold
        sampled = set()
        tracks = recency.tracks
        for i in candidates:
            if tracks(self.recency_key(i, hash_get(blocks[i]))):
                sampled.add(i)
        self.sampled = sampled

    def promoted(self, key: Any) -> bool:
        """The tracker made ``key`` hot: its block (the one vLLM's lookup finds) is tracked
        from now on. Whether vLLM holds it now (outside the free queue)."""
        block = self._cached_block(key)
        if block is None:
            return False
        self.sampled.add(self.id_get(block))
        return self.prev_get(block) is None and not self.null_get(block)

    def demoted(self, key: Any) -> None:
        """``key`` is not hot any more (and not sampled): its block is not tracked."""
        block = self._cached_block(key)
        if block is not None:
            self.sampled.discard(self.id_get(block))

    def _cached_block(self, key: Any) -> Any:
        """The block vLLM's lookup map holds under ``key`` and that is known by it, or None."""
        block = self._first_block(key)
        if block is None or self.hash_get(block) != key or self.id_get(block) in self.duplicates:
            return None
        return block

    def _first_block(self, key: Any) -> Any:
        """The block vLLM's lookup finds for ``key`` (None too where the map cannot say). The
        pool's map of now: vLLM 0.31-0.33 replace it on ``reset_prefix_cache``."""
        lookup_map = getattr(self.pool, "cached_block_hash_to_block", None)
        get_one_block = getattr(lookup_map, "get_one_block", None)
        return None if get_one_block is None else get_one_block(key)

    def recency_key(self, block_id: int, key: Any) -> Any:
        """What the reuse tracker knows a block by: its hash, or its id when it has none
        or another block holds that hash in vLLM's lookup map."""
        return block_id if key is None or block_id in self.duplicates else key

    def is_duplicate(self, block: Any, key: Any) -> bool:
        """Whether vLLM's lookup map already holds ``key`` for another block (asked as a
        block gets its hash: vLLM sets the hash before inserting the block in the map)."""
        first = self._first_block(key)  # a map without get_one_block: keyed by hash, always
        return first is not None and first is not block

    def changed(self, block: Any, before: tuple[int, int]) -> None:
        after = self.contribution(block)
        self.blocks += after[0] - before[0]
        self.tokens += after[1] - before[1]

    def hash_changed(self, block: Any, old: Any, before: tuple[int, int]) -> None:
        """The slow path of a hash change (block in the queue, or per-block tokens kept)."""
        self.refresh(block)
        self.changed(block, before)
        if self.prev_get(block) is None:
            self.held_block_rekeyed(block, old, self.hash_get(block))

    def held_block_rekeyed(self, block: Any, old: Any, new: Any) -> None:
        """A block outside the queue got its hash (filled and cached: held under the hash from
        now on) or lost it (evicted, about to be reused: known by its id again)."""
        recency = self.recency
        if recency is None or (old is None) is (new is None):
            return
        try:
            threshold = recency.threshold
            if threshold != self.threshold:
                self.sync_threshold()
            block_id = self.id_get(block)
            if new is None:
                self.duplicates.discard(block_id)
                sampled = block_id in self.by_id
            elif self.is_duplicate(block, new):
                self.duplicates.add(block_id)  # held under its id still
                sampled = block_id in self.by_id
            else:
                if block_id in self.by_id:
                    recency.forget(block_id)
                sampled = recency.tracks(new)
                if sampled:
                    recency.pinned_sampled(new)
            if sampled:
                self.sampled.add(block_id)
            else:
                self.sampled.discard(block_id)
        except Exception as exc:
            self.stop_recency(exc)

    def step_evictable(self) -> int:
        """Evictable blocks at the end of a scheduler step (as ``FusedCounts``)."""
        return self.blocks

    def stop_recency(self, exc: BaseException) -> None:
        """Monitoring never takes serving down: the curve stops, the counts go on."""
        self.recency = None
        self.failure = f"reuse-distance tracking stopped: {exc!r}"[:300]

    # ------------------------------------------------------------ queue calls (hot path)

    def _tokens(self, ids: list[int] | None, blocks: list[Any], cached: int) -> int:
        tokens = cached * self.size
        extra = self.extra
        if extra:
            if ids is None:
                ids = list(map(self.id_get, blocks))
            tokens += sum(map(extra.__getitem__, extra.keys() & ids))
        return tokens

    def moved(self, blocks: list[Any], entered: bool, allocated: bool = False) -> None:
        """Blocks that entered the queue (idle from now on) or left it (held: by a prefix hit,
        under their hash; ``allocated``, under their id)."""
        hashes = list(map(self.hash_get, blocks))
        cached = len(hashes) - hashes.count(None)
        ids = None
        if cached:
            ids = list(map(self.id_get, blocks)) if self.extra else None
            tokens = self._tokens(ids, blocks, cached)
            self.blocks += cached if entered else -cached
            self.tokens += tokens if entered else -tokens
        if self.recency is not None:
            self._recency(blocks, hashes, ids, idle=entered, by_id=allocated)

    def _recency(
        self, blocks: list[Any], hashes: list[Any], ids: list[int] | None, idle: bool, by_id: bool
    ) -> None:
        recency = self.recency
        assert recency is not None
        try:
            if recency.threshold != self.threshold:
                self.sync_threshold()
            if ids is None:
                ids = list(map(self.id_get, blocks))
            # A block popped for allocation is held under its id, whatever it held before.
            hit = (self.by_id if by_id else self.sampled).intersection(ids)
            if not hit:
                return
            order = sorted(map(ids.index, hit))
            if by_id:
                keys = [ids[k] for k in order]
            else:
                key_of, duplicates = self.recency_key, self.duplicates
                keys = (
                    [key_of(ids[k], hashes[k]) for k in order]
                    if duplicates
                    else [ids[k] if hashes[k] is None else hashes[k] for k in order]
                )
            (recency.released_all if idle else recency.pinned_all)(keys)
        except Exception as exc:
            self.stop_recency(exc)

    def hook(self, queue: Any) -> None:
        """Wrap the queue's mutators on this instance (vLLM's pool holds one queue).

        While no block keeps extra tokens, a call is counted inline (a step's few hundred
        blocks cost a few dozen of these calls): the number of hashed blocks among those that
        moved, at C speed; the reuse tracker hears of it only where the call moved a block it
        follows. Otherwise (and for the rarer calls) ``moved`` does it all."""
        _hook_leaving(self, queue)
        _hook_entering(self, queue)


def _hook_leaving(counter: FreeQueueCounter, queue: Any) -> None:
    """``popleft_n``, ``popleft`` and ``remove``: blocks allocated, or taken by a prefix hit."""
    popleft_n, popleft, remove = queue.popleft_n, queue.popleft, queue.remove
    moved, hash_get, id_get = counter.moved, counter.hash_get, counter.id_get
    extra, size = counter.extra, counter.size

    def counted_popleft_n(n: int) -> list[Any]:
        blocks: list[Any] = popleft_n(n)
        if n != 1 or extra:
            moved(blocks, False, allocated=True)
            return blocks
        # A decode step's new block: the common call.
        if hash_get(blocks[0]) is not None:
            counter.blocks -= 1
            counter.tokens -= size
        if counter.recency is not None and id_get(blocks[0]) in counter.by_id:
            counter._recency(blocks, [None], None, idle=False, by_id=True)
        return blocks

    def counted_popleft() -> Any:
        block = popleft()
        moved([block], False, allocated=True)
        return block

    def counted_remove(block: Any) -> None:
        remove(block)
        if extra or counter.recency is not None:
            moved([block], False)
        elif hash_get(block) is not None:
            counter.blocks -= 1
            counter.tokens -= size

    queue.popleft_n, queue.popleft = counted_popleft_n, counted_popleft
    queue.remove = counted_remove


def _hook_entering(counter: FreeQueueCounter, queue: Any) -> None:
    """``append``, ``append_n`` and ``prepend_n``: blocks freed (idle from now on)."""
    append, append_n, prepend_n = queue.append, queue.append_n, queue.prepend_n
    moved, hash_get, id_get = counter.moved, counter.hash_get, counter.id_get
    extra, size = counter.extra, counter.size

    def entered(blocks: list[Any]) -> None:
        if extra:
            moved(blocks, True)
            return
        hashes = list(map(hash_get, blocks))
        cached = len(hashes) - hashes.count(None)
        if cached:
            counter.blocks += cached
            counter.tokens += cached * size
        recency = counter.recency
        if recency is not None and not (
            recency.threshold == counter.threshold
            and counter.sampled.isdisjoint(map(id_get, blocks))
        ):
            counter._recency(blocks, hashes, None, idle=True, by_id=False)

    def counted_append(block: Any) -> None:
        append(block)
        entered([block])

    def counted_append_n(blocks: list[Any]) -> None:
        append_n(blocks)
        entered(blocks)

    def counted_prepend_n(blocks: list[Any]) -> None:
        prepend_n(blocks)
        entered(blocks)

    queue.append, queue.append_n, queue.prepend_n = (
        counted_append,
        counted_append_n,
        counted_prepend_n,
    )


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


# The only code that writes a block's hash and its prefix length, in every supported release
# (tests/vllm checks each release's source for any other write).
HASH_WRITERS = ("set_block_hash", "reset_hash")


def tracked_block_class(base: type, layout: BlockLayout, counter: FreeQueueCounter) -> type:
    """A subclass of vLLM's KVCacheBlock whose ``set_block_hash`` / ``reset_hash`` run vLLM's
    own and then keep ``counter`` right for a block in the free queue, and tell the reuse
    tracker when a held block gets its hash or an evicted one loses it. Every slot stays
    vLLM's own C-level slot: reads and ``ref_cnt`` writes on the allocator's hot path cost
    what they did.

    vLLM hashes every block it fills and clears it on every eviction, so both have a fast
    path: a block outside the free queue (held, or just popped for reuse) changes no count,
    and one that the reuse tracker does not follow (most) costs it no call."""
    return type(
        f"Tracked{base.__name__}",
        (base,),
        {
            "__slots__": (),
            "set_block_hash": _counted_set_block_hash(base, counter),
            "reset_hash": _counted_reset_hash(base, counter),
        },
    )


def _counted_set_block_hash(base: type, counter: FreeQueueCounter) -> Callable[..., None]:
    set_original = base.set_block_hash  # type: ignore[attr-defined]
    hash_get, id_get, prev_get = counter.hash_get, counter.id_get, counter.prev_get
    contribution, hash_changed = counter.contribution, counter.hash_changed
    rekeyed, slow = counter.held_block_rekeyed, counter.per_block_tokens

    def general(block: Any, block_hash: Any, num_tokens: int | None) -> None:
        """A block in the queue, one that had a hash already, or tokens kept per block."""
        old = hash_get(block)
        counter.hashed += old is None
        before = contribution(block)
        set_original(block, block_hash, num_tokens)
        hash_changed(block, old, before)

    def set_block_hash(self: Any, block_hash: Any, num_tokens: int | None = None) -> None:
        if slow or prev_get(self) is not None or hash_get(self) is not None:
            general(self, block_hash, num_tokens)
            return
        # A held block filled and cached: no count changes but the number with a hash.
        counter.hashed += 1
        set_original(self, block_hash, num_tokens)
        recency = counter.recency
        if recency is None:
            return
        # Most blocks are nothing to the reuse tracker: not keyed by their id so far, nor
        # tracked under the new hash (sampled: sample_hash inlined; or hot). Then it costs no
        # call (a duplicate that nothing tracks needs no mark: vLLM's lookup finds the first).
        below = recency.threshold_key
        if (
            below is None
            or recency.threshold != counter.threshold
            or type(block_hash) is not bytes
            or len(block_hash) < 4
            or block_hash < below
            or block_hash in recency.hot_blocks
            or id_get(self) in counter.by_id
        ):
            rekeyed(self, None, block_hash)

    return set_block_hash


def _counted_reset_hash(base: type, counter: FreeQueueCounter) -> Callable[..., None]:
    reset_original = base.reset_hash  # type: ignore[attr-defined]
    hash_get, id_get, prev_get = counter.hash_get, counter.id_get, counter.prev_get
    contribution, hash_changed = counter.contribution, counter.hash_changed
    rekeyed, slow = counter.held_block_rekeyed, counter.per_block_tokens

    def reset_hash(self: Any) -> None:
        old = hash_get(self)
        if old is not None:
            counter.hashed -= 1
        if slow or prev_get(self) is not None:
            before = contribution(self)
            reset_original(self)
            hash_changed(self, old, before)
            return
        reset_original(self)
        if old is not None and counter.recency is not None:
            block_id = id_get(self)
            if block_id in counter.sampled or block_id in counter.by_id or counter.duplicates:
                rekeyed(self, old, None)

    return reset_hash

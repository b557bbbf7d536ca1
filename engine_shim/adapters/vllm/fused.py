"""Counts kept inside vLLM's own hash writers, on the releases whose code the shim knows.

Where the what-if curve is off and every cached block holds ``block_size`` tokens, the shim
needs only three counts: cached blocks (with a hash), and among them the evictable ones (in the
free queue), in blocks and tokens. Wrapping every queue call and hash write for them costs a
Python call per event, about a hundred per scheduler step at 256 running requests. Here instead:

- ``set_block_hash`` and ``reset_hash`` are replaced by versions that do what vLLM's do (the
  same two slot writes, the same assertion) and count as they go: no extra call at all;
- so are the queue's ``append``, ``append_n``, ``prepend_n`` (blocks freed) and ``remove`` (a
  prefix hit on an evictable block): vLLM's own steps, counting in the loop they already run;
- ``popleft`` / ``popleft_n`` are left alone: ``BlockPool.get_new_blocks`` resets the hash of
  every cached block it pops before it hands it out, so a popped block leaves the evictable
  count at that reset (outside the queue and not yet referenced).

The counts live in closure cells shared by those functions (an update is four bytecodes, and
allocates nothing: the cells hold the changes since the last scheduler step, small ints, folded
into the totals once per step); ``FusedCounts`` reads them. The free queue is rebuilt as an
instance of the counting subclass, not swapped in place (see ``rebuilt``).

This rests on vLLM's code as it is, so it is used only where the source of every function it
replaces or relies on is one the shim was tested with (``KNOWN_SOURCES``, one digest per
release, kept right by ``tests/vllm``); anywhere else the general hooks of ``blocks`` count.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...reuse_distance import ReuseDistanceTracker
from .blocks import BlockLayout, UnsupportedVllm, _slot, check_free_queue

# What the fused counting replaces (the hash writers, the queue's ways in and ``remove``) or
# relies on (the pops, and get_new_blocks resetting each cached block it pops, through the two
# below it); KNOWN_SOURCES: their source digests in every release it was tested with
# (tests/vllm fails on a release of the matrix that is missing there).
RELIED = (
    "KVCacheBlock.set_block_hash",
    "KVCacheBlock.reset_hash",
    "FreeKVCacheBlockQueue.append",
    "FreeKVCacheBlockQueue.append_n",
    "FreeKVCacheBlockQueue.prepend_n",
    "FreeKVCacheBlockQueue.remove",
    "BlockPool.get_new_blocks",
    "BlockPool._maybe_evict_cached_block",
    "BlockPool._remove_cached_block_hashes",
    "FreeKVCacheBlockQueue.popleft",
    "FreeKVCacheBlockQueue.popleft_n",
)
KNOWN_SOURCES: dict[str, frozenset[str]] = {
    "KVCacheBlock.set_block_hash": frozenset(
        {
            "bb42263f1b7b62f8",  # 0.31-0.33
            "5317befa01987392",  # 0.34
        }
    ),
    "KVCacheBlock.reset_hash": frozenset(
        {
            "bac31600f877c9da",  # 0.31-0.33
            "b90d86b78bc02ac7",  # 0.34
        }
    ),
    "FreeKVCacheBlockQueue.append": frozenset(
        {
            "7f256002198ba59d",  # 0.31
            "7a46f17dcdecd553",  # 0.32-0.34
        }
    ),
    "FreeKVCacheBlockQueue.append_n": frozenset(
        {
            "34c1b0ec54d00e1c",  # 0.31
            "fb88868a3bd25a6c",  # 0.32-0.34
        }
    ),
    "FreeKVCacheBlockQueue.prepend_n": frozenset(
        {
            "3391a508dc76f4dc",  # 0.31-0.34
        }
    ),
    "FreeKVCacheBlockQueue.remove": frozenset(
        {
            "e74d1f462c59aadf",  # 0.31
            "cb8c016b705b4e5b",  # 0.32-0.34
        }
    ),
    "BlockPool.get_new_blocks": frozenset(
        {
            "f6dfc85203ff3980",  # 0.31-0.33
            "dda5e76fd5115ce9",  # 0.34
        }
    ),
    "BlockPool._maybe_evict_cached_block": frozenset(
        {
            "81d8abc237039d21",  # 0.31-0.34
        }
    ),
    "BlockPool._remove_cached_block_hashes": frozenset(
        {
            "7e21052d7dfc42a2",  # 0.31-0.33
            "505c2527b89903f6",  # 0.34
        }
    ),
    "FreeKVCacheBlockQueue.popleft": frozenset(
        {
            "03d636d19b7386be",  # 0.31
            "66125c578972c933",  # 0.32-0.34
        }
    ),
    "FreeKVCacheBlockQueue.popleft_n": frozenset(
        {
            "53e891e560e91429",  # 0.31
            "1c00d0f52e37d16c",  # 0.32-0.34
        }
    ),
}


def source_digest(function: Any) -> str | None:
    """A short digest of a function's source, ``None`` where Python cannot read it."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    text = "\n".join(line.rstrip() for line in inspect.cleandoc(source).splitlines())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def relied_on(pool: Any) -> dict[str, Any]:
    """The functions of ``RELIED``, as this pool's classes have them (``None`` where gone)."""
    owners = {
        "KVCacheBlock": type(pool.blocks[0]),
        "BlockPool": type(pool),
        "FreeKVCacheBlockQueue": type(pool.free_block_queue),
    }
    return {name: getattr(owners[name.split(".")[0]], name.split(".")[1], None) for name in RELIED}


def why_not_fused(pool: Any) -> str | None:
    """``None`` where the fused counting is exact on this pool's vLLM; otherwise why not."""
    unknown = [
        name
        for name, function in relied_on(pool).items()
        if function is None or source_digest(function) not in KNOWN_SOURCES.get(name, ())
    ]
    return f"code not seen in a tested release: {', '.join(unknown)}" if unknown else None


class FusedCounts:
    """Cached blocks in the free queue (``blocks``: evictable) and outside it (``held``), as
    the fused methods keep them: each event changes one of them (a hash written or reset) or
    moves blocks between the two (the queue). Every cached block holds ``size`` tokens here
    (no partial entries)."""

    __slots__ = ("_fold", "_read", "failure", "recency", "size")
    recency: ReuseDistanceTracker | None

    def __init__(
        self, read: Callable[[], tuple[int, int]], fold: Callable[[], None], block_size: int
    ) -> None:
        self._read = read
        self._fold = fold
        self.size = block_size
        self.recency = None  # the what-if curve needs the general hooks
        self.failure: str | None = None

    @property
    def blocks(self) -> int:
        return self._read()[0]

    @property
    def held(self) -> int:
        return self._read()[1]

    @property
    def hashed(self) -> int:
        """Blocks with a hash, in use or evictable (what vLLM's KV events count as stored)."""
        evictable, held = self._read()
        return evictable + held

    @property
    def tokens(self) -> int:
        return self._read()[0] * self.size

    def step_evictable(self) -> int:
        """Evictable blocks at the end of a scheduler step. Called only on the engine core's
        thread, the one that runs vLLM's writers, and under the shim's lock: the changes fold
        into the totals here, where no write can fall between and no reader sees it half done."""
        self._fold()
        return self._read()[0]

    def stop_recency(self, exc: BaseException) -> None:
        """There is no curve here to stop."""


# vLLM's own steps (``KVCacheBlock`` and ``FreeKVCacheBlockQueue``, Apache-2.0; the same in
# 0.31-0.34 but for style and the hash's field names), each counting as it goes.
_METHODS = '''
def make(total_evictable, total_held):
    # The counts: totals plus changes since the last fold, kept near {bias}. CPython keeps the
    # ints -5..256 preallocated; a count in the thousands would allocate a new int (and free
    # the old one) at every update, which would cost more than the rest of the counting.
    evictable = held = {bias}
    def set_block_hash(self, block_hash, num_tokens=None):
        nonlocal evictable, held
        assert self.{hash} is None and self.{tokens} is None, (
            "The block already has a hash. This should not happen."
        )
        self.{hash} = block_hash
        self.{tokens} = num_tokens
        if self.prev_free_block is None:
            held += 1
        else:  # a block in the free queue (vLLM never hashes one; counted all the same)
            evictable += 1

    def reset_hash(self):
        """Reset the block hash when the block is evicted."""
        nonlocal evictable, held
        if self.{hash} is not None:
            # Referenced: held. Otherwise in the queue (vLLM keeps each block there at
            # ref_cnt 0), or just popped from it by get_new_blocks (still counted as
            # evictable: the pop is not hooked).
            if self.ref_cnt:
                held -= 1
            else:
                evictable -= 1
        self.{hash} = None
        self.{tokens} = None

    def append(self, block):
        nonlocal evictable, held
        tail = self.fake_free_list_tail
        last_block = tail.prev_free_block
        if last_block is None:
            raise RuntimeError(
                "prev_free_block of fake_free_list_tail should always exist"
            )
        last_block.next_free_block = block
        block.prev_free_block = last_block
        block.next_free_block = tail
        tail.prev_free_block = block
        self.num_free_blocks += 1
        if block.{hash} is not None:
            evictable += 1
            held -= 1

    def append_n(self, blocks):
        nonlocal evictable, held
        if not blocks:
            return
        tail = self.fake_free_list_tail
        last_block = tail.prev_free_block
        assert last_block is not None, (
            "prev_free_block of fake_free_list_tail should always exist"
        )
        cached = 0
        for block in blocks:
            block.prev_free_block = last_block
            last_block.next_free_block = block
            last_block = block
            if block.{hash} is not None:
                cached += 1
        last_block.next_free_block = tail
        tail.prev_free_block = last_block
        self.num_free_blocks += len(blocks)
        evictable += cached
        held -= cached

    def prepend_n(self, blocks):
        nonlocal evictable, held
        if len(blocks) == 0:
            return
        first_block = self.fake_free_list_head.next_free_block
        assert first_block is not None, (
            "next_free_block of fake_free_list_head should always exist"
        )
        prev_block = self.fake_free_list_head
        cached = 0
        for block in blocks:
            block.prev_free_block = prev_block
            prev_block.next_free_block = block
            prev_block = block
            if block.{hash} is not None:
                cached += 1
        prev_block.next_free_block = first_block
        first_block.prev_free_block = prev_block
        self.num_free_blocks += len(blocks)
        evictable += cached
        held -= cached

    def remove(self, block):
        nonlocal evictable, held
        prev_block = block.prev_free_block
        next_block = block.next_free_block
        if prev_block is None or next_block is None:
            raise RuntimeError(f"remove() called on an invalid block: {{block}}")
        prev_block.next_free_block = next_block
        next_block.prev_free_block = prev_block
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1
        if block.{hash} is not None:
            evictable -= 1
            held += 1

    def read():
        return total_evictable + evictable - {bias}, total_held + held - {bias}

    def fold():
        nonlocal evictable, held, total_evictable, total_held
        total_evictable += evictable - {bias}
        total_held += held - {bias}
        evictable = held = {bias}

    return read, fold, (set_block_hash, reset_hash), (append, append_n, prepend_n, remove)
'''
# Where the changes start (within CPython's small ints, with room both ways for a step's).
_BIAS = 128


@dataclass(frozen=True)
class FusedMethods:
    """What ``fused_methods`` makes: the counts, and the functions that keep them."""

    counts: FusedCounts
    block: dict[str, Callable[..., None]]  # set_block_hash, reset_hash
    queue: dict[str, Callable[..., None]]  # append, append_n, prepend_n, remove


def fused_methods(
    layout: BlockLayout, block_size: int, evictable: int = 0, held: int = 0
) -> FusedMethods:
    """The fused methods for this block layout, their counts starting at these values. The
    template is formatted with the layout's field names (each slot then read and written by
    name, as vLLM's own code does)."""
    fields = {"hash": layout.hash_field, "tokens": layout.tokens_field or ""}
    if not all(field.isidentifier() for field in fields.values()):
        raise ValueError(f"fused methods need the hash and prefix-length fields: {fields}")
    namespace: dict[str, Any] = {}
    exec(_METHODS.format(bias=_BIAS, **fields), namespace)
    read, fold, writers, queue = namespace["make"](evictable, held)
    return FusedMethods(
        FusedCounts(read, fold, block_size),
        dict(zip(("set_block_hash", "reset_hash"), writers, strict=True)),
        dict(zip(("append", "append_n", "prepend_n", "remove"), queue, strict=True)),
    )


def initial_counts(pool: Any, layout: BlockLayout) -> tuple[int, int]:
    """(evictable, held) cached blocks of a pool now: one pass, at attach time."""
    hash_get = type(pool.blocks[0]).__dict__[layout.hash_field].__get__
    evictable = held = 0
    for block in pool.blocks:
        if block.is_null or hash_get(block) is None:
            continue
        if block.prev_free_block is None:
            held += 1
        else:
            evictable += 1
    return evictable, held


def install_fused(pool: Any, layout: BlockLayout, block_size: int) -> FusedCounts:
    """Count this pool with the fused methods (the caller checked ``why_not_fused``). Every
    check passes before anything of vLLM's changes."""
    block_class = type(pool.blocks[0])
    queue = pool.free_block_queue
    check_free_queue(type(queue))
    if _slot(block_class, "prev_free_block") is None:
        raise UnsupportedVllm(f"{block_class.__qualname__} has no slot prev_free_block")
    fused = fused_methods(layout, block_size, *initial_counts(pool, layout))
    counted = type(
        f"Counted{block_class.__name__}", (block_class,), {"__slots__": (), **fused.block}
    )
    counted_queue = type(f"Counted{type(queue).__name__}", (type(queue),), fused.queue)
    ends = [queue.fake_free_list_head, queue.fake_free_list_tail]
    for block in (*pool.blocks, *(end for end in ends if type(end) is block_class)):
        block.__class__ = counted  # the list's ends too: every node of one class
    pool.free_block_queue = rebuilt(queue, counted_queue)
    return fused.counts


def rebuilt(instance: Any, cls: type) -> Any:
    """``instance``'s attributes on a new instance of ``cls``, set in the same order.

    CPython lays an instance's attributes out by its class: one whose ``__class__`` is
    swapped afterwards misses the interpreter's attribute caches on every access (a dict
    lookup each, about twice the cost). Slotted objects (the blocks) have no such layout."""
    if not hasattr(instance, "__dict__"):
        instance.__class__ = cls
        return instance
    copy: Any = object.__new__(cls)
    for name, value in vars(instance).items():
        setattr(copy, name, value)
    return copy

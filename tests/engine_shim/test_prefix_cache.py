"""The reference prefix cache's eviction order, against an oracle written here from the
definition (not the cache's own bookkeeping): eviction takes the unpinned cached block that was
released longest ago and has no cached children; a parent orphaned by that eviction was released
no later than its child, so it goes next. Pinned blocks and blocks with children are never taken.
"""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from engine_shim.reference import ModelShape
from engine_shim.reference.pool import BlockPool
from engine_shim.reference.prefix_cache import ROOT_HASH, Node, PrefixCache, block_hash

BS = 2


def cached_nodes(pc: PrefixCache) -> list[Node]:
    """Every cached block, walked from the root (the test's own walk, not the cache's)."""
    out, stack = [], list(pc.root.children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def cache(blocks: int) -> PrefixCache:
    shape = ModelShape(num_layers=1, num_kv_heads=1, head_dim=2, vocab_size=64)
    return PrefixCache(BlockPool("full", shape, 1, blocks, BS, torch.device("cpu")))


class Oracle:
    """Release times and the tree, kept by the test as requests use the cache."""

    def __init__(self, pc: PrefixCache) -> None:
        self.pc = pc
        self.clock = 0
        self.released: dict[Node, int] = {}

    def write(self, tokens: list[int]) -> list[Node]:
        """A request computes ``tokens``: reuses the cached prefix, caches the rest, pins all."""
        path = self.pc.match(tokens)
        for node in path:
            self.pc.pin(node)
        parent = path[-1] if path else self.pc.root
        for start in range(len(path) * BS, len(tokens) - BS + 1, BS):
            block = self.pc.allocate()
            assert block is not None, "pool exhausted"
            inserted = self.pc.insert(parent, tuple(tokens[start : start + BS]), block)
            assert inserted is not None
            path.append(inserted)
            parent = inserted
        return path

    def release(self, path: list[Node]) -> None:
        for node in reversed(path):  # leaf first, as the engines free a request's blocks
            self.clock += 1
            self.pc.unpin(node)
            if node.ref == 0:
                self.released[node] = self.clock

    def expected_victim(self) -> Node | None:
        candidates = [n for n in cached_nodes(self.pc) if n.ref == 0 and not n.children]
        if not candidates:
            return None
        # Oldest release first; a parent released at the same time or before its child wins.
        return min(candidates, key=lambda n: (self.released[n], -depth(n)))


def depth(node: Node) -> int:
    d = 0
    while node.parent is not None:
        node, d = node.parent, d + 1
    return d


def test_least_recently_released_goes_first_and_orphans_follow() -> None:
    pc = cache(16)
    oracle = Oracle(pc)
    a = oracle.write([1, 1, 2, 2, 3, 3])  # three blocks: A1 -> A2 -> A3
    oracle.release(a)
    b = oracle.write([7, 7, 8, 8])  # B1 -> B2, released after A
    oracle.release(b)
    c = oracle.write([1, 1, 2, 2, 9, 9])  # reuses A1, A2; C3 beside A3
    oracle.release(c)
    order = [pc.evict_one() for _ in range(7)]
    # A3 was released first and is a leaf; then B2, B1 (B released before C), then C3, then
    # A2 and A1 (reused by C: released last), then nothing is left.
    assert order == [a[2].block, b[1].block, b[0].block, c[2].block, a[1].block, a[0].block, None]


def test_pinned_blocks_and_parents_are_never_taken() -> None:
    pc = cache(8)
    oracle = Oracle(pc)
    held = oracle.write([1, 1, 2, 2])  # still running: pinned
    done = oracle.write([1, 1, 2, 2, 5, 5])  # shares both blocks, adds one
    oracle.release(done)
    assert pc.evict_one() == done[2].block  # its own block; the shared ones are pinned
    assert pc.evict_one() is None
    oracle.release(held)
    assert [pc.evict_one() for _ in range(3)] == [held[1].block, held[0].block, None]


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_evicts_in_the_oracles_order(seed: int) -> None:
    rng = random.Random(seed)
    pc = cache(24)
    oracle = Oracle(pc)
    prefixes = [[rng.randrange(4) for _ in range(2 * BS)] for _ in range(3)]
    running: list[list[Node]] = []
    for _ in range(300):
        if running and (rng.random() < 0.5 or len(running) > 3):
            oracle.release(running.pop(rng.randrange(len(running))))
            continue
        tokens = rng.choice(prefixes) + [rng.randrange(6) for _ in range(BS * rng.randint(0, 3))]
        needed = len(tokens) // BS - len(pc.match(tokens))
        # Evict ahead, one block at a time, checking each choice against the oracle.
        while pc.pool.num_free_blocks < needed:
            expected = oracle.expected_victim()
            if expected is None:
                break
            assert pc.evict_one() == expected.block
            del oracle.released[expected]
        if pc.pool.num_free_blocks >= needed:
            running.append(oracle.write(tokens))
        assert pc.evictable_blocks == sum(1 for n in cached_nodes(pc) if n.ref == 0)


def test_block_hashes_chain_and_are_stable_across_processes() -> None:
    one = block_hash(ROOT_HASH, (1, 2))
    assert one == bytes.fromhex(block_hash(ROOT_HASH, (1, 2)).hex()) and len(one) == 16
    # blake2b-128 of the parent's hash keyed into 4-byte little-endian token ids: a fixed value
    # (storage-tier files are named by it, so it must never change between releases).
    expected = hashlib.blake2b(ROOT_HASH, digest_size=16)
    expected.update((1).to_bytes(4, "little") + (2).to_bytes(4, "little"))
    assert one == expected.digest()
    assert block_hash(one, (1, 2)) != one  # the same tokens under another parent
    assert block_hash(ROOT_HASH, (2, 1)) != one
    assert block_hash(ROOT_HASH, (70000, 1)) != block_hash(ROOT_HASH, (70000 % 65536, 1))


def test_allocation_evicts_only_when_the_free_list_is_empty_and_counts_it() -> None:
    pc = cache(2)
    evicted: list[Node] = []
    pc.on_evict = evicted.append
    oracle = Oracle(pc)
    a = oracle.write([1, 1, 2, 2])  # both blocks
    oracle.release(a)
    assert pc.pool.num_free_blocks == 0 and pc.evictable_blocks == 2
    block = pc.allocate()  # no free block: the LRU one is evicted and handed out
    assert block == a[1].block and evicted == [a[1]] and pc.evicted_blocks == 1
    assert pc.evictable_blocks == 1
    assert pc.match([1, 1, 2, 2]) == [a[0]]  # the evicted block is no longer found
    assert pc.match([1, 1, 2]) == [a[0]]  # a partial block is never matched
    assert pc.match([1]) == []


def test_unpin_of_an_unpinned_block_is_a_bug_caught_at_once() -> None:
    pc = cache(4)
    (node,) = Oracle(pc).write([1, 1])
    pc.unpin(node)
    with pytest.raises(AssertionError, match=r"^unpin of an unpinned node$"):
        pc.unpin(node)


def test_a_hot_prefix_pinned_a_million_times_keeps_the_heap_small() -> None:
    pc = cache(8)
    oracle = Oracle(pc)
    hot = oracle.write([1, 1, 2, 2])
    oracle.release(hot)
    cold = oracle.write([5, 5])
    oracle.release(cold)
    for _ in range(5000):  # pinned and released again and again, never evicted
        for node in hot:
            pc.pin(node)
        oracle.release(hot)
    assert len(pc._heap) <= 2 * pc.evictable_blocks + 64
    # Still least recently released first: the cold block, then the hot leaf, then its parent.
    assert [pc.evict_one() for _ in range(4)] == [cold[0].block, hot[1].block, hot[0].block, None]
    assert pc.evicted_blocks == 3


def test_token_ids_up_to_2_32_hash_and_chain() -> None:
    """Vocabularies reach 2^31 and beyond; a hash must take any uint32 token id."""
    top = block_hash(ROOT_HASH, (2**32 - 1, 2**31))
    expected = hashlib.blake2b(ROOT_HASH, digest_size=16)
    expected.update((2**32 - 1).to_bytes(4, "little") + (2**31).to_bytes(4, "little"))
    assert top == expected.digest()


def test_inserted_blocks_keep_their_block_id_and_chained_hash() -> None:
    evicted: list[Node] = []
    pc = PrefixCache(cache(4).pool, on_evict=evicted.append)
    first = pc.insert(pc.root, tuple(range(BS)), 3)
    assert first is not None
    second = pc.insert(first, tuple(range(BS, 2 * BS)), 1)
    assert second is not None
    assert (first.block, second.block) == (3, 1)
    assert first.hash == block_hash(ROOT_HASH, tuple(range(BS)))
    assert second.hash == block_hash(first.hash, tuple(range(BS, 2 * BS)))
    pc.unpin(second)
    assert pc.evict_one() == 1 and evicted == [second]  # the hook given at construction


def test_recency_hooks_get_each_blocks_hash_when_it_becomes_held_or_idle() -> None:
    """What the reuse-distance tracker is told: inserts and 0 -> 1 pins as held, -> 0 as idle;
    a path's transitions in one call, in the order given (only the nodes that changed)."""
    pc = cache(8)
    events: list[tuple[str, list[bytes]]] = []
    pc.on_held = lambda h: events.append(("held", h))
    pc.on_idle = lambda h: events.append(("idle", h))
    node = pc.insert(pc.root, tuple(range(BS)), 0)
    assert node is not None
    pc.pin(node)  # already held by its writer: no event
    pc.unpin(node)
    pc.unpin(node)  # now idle
    pc.pin(node)  # held again
    assert events == [("held", [node.hash]), ("idle", [node.hash]), ("held", [node.hash])]

    events.clear()
    child = pc.insert(node, tuple(range(BS, 2 * BS)), 1, announce=False)
    leaf = pc.insert(child, tuple(range(2 * BS, 3 * BS)), 2, announce=False) if child else None
    assert child is not None and leaf is not None and events == []
    pc.announce_held([child, leaf])
    pc.unpin_all([leaf, child, node])  # leaf first, as a request releases
    pc.pin_all([node, child])  # the root of the path idle -> held; both pinned once
    pc.pin_all([node])  # already held: nothing to tell
    assert events == [
        ("held", [child.hash, leaf.hash]),
        ("idle", [leaf.hash, child.hash, node.hash]),
        ("held", [node.hash, child.hash]),
    ]
    assert (node.ref, child.ref, leaf.ref) == (2, 1, 0) and pc.evictable_blocks == 1

    events.clear()
    pc.announce_held([])  # nothing new: nothing to tell
    pc.pin_all([])
    pc.unpin_all([])
    assert events == []
    with pytest.raises(AssertionError, match="unpin of an unpinned node"):
        pc.unpin_all([child, leaf])  # the child is released, then the leaf is a misuse
    assert events == [("idle", [child.hash])] and pc.evictable_blocks == 2

    quiet = cache(4)  # no one watching: the same calls, no hooks to call
    first = quiet.insert(quiet.root, tuple(range(BS)), 0, announce=False)
    assert first is not None
    quiet.announce_held([first])
    quiet.unpin_all([first])
    quiet.pin_all([first])
    assert first.ref == 1 and quiet.evictable_blocks == 0

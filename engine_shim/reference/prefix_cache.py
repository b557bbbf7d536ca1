"""A radix tree over full blocks of token ids, with ref-counts and LRU eviction.

Eviction takes the unpinned leaf released longest ago (SGLang's radix cache: a heap by last
access); a parent left childless by an eviction joins the heap at its own release time, so it
goes next only if nothing else has been idle longer. ``tests/engine_shim/test_prefix_cache.py``
checks the order against an oracle written from that definition.

Each node is one full block of the pool (SGLang's radix cache with page-sized edges; vLLM's
prefix cache with hash chains). A request pins every node on its path, so a node with
``ref == 0`` has only unpinned descendants: those nodes are exactly the evictable tokens, and
their count is kept incrementally, O(1) to read.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .pool import BlockPool

ROOT_HASH = b"\x00" * 16


def block_hash(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """Stable across processes (unlike ``hash()``): storage-tier files are named by it."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))  # 4-byte little-endian token ids
    return h.digest()


@dataclass(eq=False, slots=True)
class Node:
    key: tuple[int, ...]
    block: int
    hash: bytes
    parent: Node | None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    ref: int = 0
    released: int = 0  # the cache's clock when the last pin was dropped


# Called with (node) just before an evicted node's block returns to the free list; and, for
# whoever watches recency (the reuse-distance tracker), with the hashes of the nodes that
# became held or idle, in order: one call per request's path, not one per node, since these
# run for every block a request pins or releases.
EvictHook = Callable[[Node], None]
HashesHook = Callable[[list[bytes]], None]


class PrefixCache:
    def __init__(self, pool: BlockPool, on_evict: EvictHook | None = None) -> None:
        self.pool = pool
        self.root = Node(key=(), block=-1, hash=ROOT_HASH, parent=None, ref=1)
        self.on_evict = on_evict
        self.on_held: HashesHook | None = None  # ref 0 -> 1, and newly inserted nodes
        self.on_idle: HashesHook | None = None  # ref 1 -> 0
        # KV events: a block entering the cache, and one leaving it (evicted).
        self.on_stored: EvictHook | None = None
        self.on_removed: EvictHook | None = None
        self.evictable_blocks = 0
        self.evicted_blocks = 0
        # Unpinned leaves by release time (oldest first): the only nodes eviction may take.
        # Entries go stale when a node is pinned again, gains a child or is released again;
        # they are skipped when popped and swept when they outnumber the live ones.
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, Node]] = []  # (released, tie-breaker, node)
        self._tie = itertools.count()

    # ----------------------------------------------------------------- lookups and pinning

    def match(self, tokens: list[int]) -> list[Node]:
        """Longest cached path of full blocks that prefixes ``tokens`` (does not pin)."""
        bs = self.pool.block_size
        node, path = self.root, []
        for start in range(0, len(tokens) - bs + 1, bs):
            child = node.children.get(tuple(tokens[start : start + bs]))
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def pin(self, node: Node) -> None:
        self.pin_all((node,))

    def pin_all(self, nodes: Iterable[Node]) -> None:
        held = []
        for node in nodes:
            if node.ref == 0:
                self.evictable_blocks -= 1
                held.append(node.hash)
            node.ref += 1
        if held and self.on_held is not None:
            self.on_held(held)

    def unpin(self, node: Node) -> None:
        self.unpin_all((node,))

    def unpin_all(self, nodes: Iterable[Node]) -> None:
        """Drop one pin of each node, in the order given (a request's path: leaf first)."""
        idle = []
        try:
            for node in nodes:
                if node.ref <= 0:
                    raise AssertionError("unpin of an unpinned node")
                node.ref -= 1
                if node.ref == 0:
                    self.evictable_blocks += 1
                    node.released = next(self._clock)
                    idle.append(node.hash)
                    if not node.children:
                        self._push(node)
        finally:  # the nodes released before a misuse are idle all the same
            if idle and self.on_idle is not None:
                self.on_idle(idle)

    def _push(self, node: Node) -> None:
        heapq.heappush(self._heap, (node.released, next(self._tie), node))
        if len(self._heap) > 2 * self.evictable_blocks + 64:
            self._heap = [e for e in self._heap if self._live(e)]
            heapq.heapify(self._heap)

    @staticmethod
    def _live(entry: tuple[int, int, Node]) -> bool:
        released, _, node = entry
        return (
            node.ref == 0
            and not node.children
            and node.released == released
            and node.parent is not None  # evicted nodes lose their parent
        )

    def insert(
        self,
        parent: Node,
        key: tuple[int, ...],
        block: int,
        digest: bytes | None = None,
        announce: bool = True,
    ) -> Node | None:
        """Cache a freshly filled block under ``parent``, pinned once by its writer.

        Returns None when an identical block is already cached (two requests computed the
        same prefix concurrently); the caller keeps its copy private and frees it later.
        ``announce=False``: the caller tells ``announce_held`` of its new nodes together.
        """
        if key in parent.children:
            return None
        if digest is None:  # callers that hashed the chain already pass it
            digest = block_hash(parent.hash, key)
        node = Node(key=key, block=block, hash=digest, parent=parent, ref=1)
        parent.children[key] = node  # the parent is no longer a leaf: its entry goes stale
        if self.on_stored is not None:
            self.on_stored(node)
        if announce and self.on_held is not None:
            self.on_held([digest])
        return node

    def announce_held(self, nodes: list[Node]) -> None:
        """Newly inserted nodes (``insert(..., announce=False)``) are held by their writers."""
        if nodes and self.on_held is not None:
            self.on_held([node.hash for node in nodes])

    # ----------------------------------------------------------------------- eviction

    def evict_one(self) -> int | None:
        """Evict the least recently used unpinned leaf; returns its freed block id."""
        while self._heap:
            entry = heapq.heappop(self._heap)
            if self._live(entry):
                break
        else:
            return None
        node = entry[2]
        if self.on_evict is not None:
            self.on_evict(node)
        if self.on_removed is not None:
            self.on_removed(node)
        parent = node.parent
        assert parent is not None
        del parent.children[node.key]
        self.evictable_blocks -= 1
        self.evicted_blocks += 1
        node.parent = None  # no longer cached: any entry left for it is stale
        if parent is not self.root and parent.ref == 0 and not parent.children:
            self._push(parent)  # a leaf now, at its own release time
        return node.block

    def allocate(self) -> int | None:
        """An empty block, evicting the LRU unpinned prefix block if none is empty."""
        block = self.pool.pop_free()
        if block is None:
            block = self.evict_one()
        return block

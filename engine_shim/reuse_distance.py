"""Reuse distances of prefix-cache lookups: the hit-ratio curve of every cache size at once.

For each full block a prefix lookup asks for, the *distance* is how much KV an LRU cache needs
to still hold that block: the tokens pinned by running requests now (they cannot be evicted,
so they come off the top), plus one block for every distinct cached block released more
recently than this one, plus the block itself. A lookup hits in a pool of C tokens exactly when
its distance is at most C; blocks never seen before (and blocks beyond the largest distance
tracked) are cold misses. Counting looked-up tokens by distance is a Mattson stack-distance
histogram, from which the hit ratio at *every* size follows (SHARDS, FAST'15).

The model, and where it is an approximation:
- recency is the last *release* (the moment no running request holds the block), which is
  what both SGLang's radix cache and the reference engine evict by; a block another running
  request holds is a hit at any size (distance one block: it cannot have been evicted);
- a request releases its blocks leaf first (a parent is at least as recent as its children),
  so along one prompt the distances never decrease, and a lookup that "stops at the first
  missing block" is the same as counting each block against the size;
- pinned tokens are those of *this* run; a smaller pool would run fewer requests at once and
  pin less, so predictions for much smaller pools are pessimistic;
- the host tier is a victim cache below the pool: device + host behaves as one LRU of both
  sizes, so its curve is read at pool + host.

Memory is bounded by spatial sampling (SHARDS): a block is tracked when its hash falls below a
threshold; each tracked reference stands for 1/rate blocks. When more than ``max_tracked``
blocks are tracked, the threshold is lowered (fixed-size SHARDS) and the blocks above it are
forgotten. Cost per looked-up block: one hash comparison, and for sampled ones a Fenwick-tree
rank, O(log n).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Iterable, Sequence

from kvstats.snapshot import ReuseDistances

# Buckets: the pool size times 2^(k/2) for k = -8 .. 12, i.e. 1/16x to 64x the pool in half
# octaves (0.25x, 0.5x, 1x, 2x and 4x are bounds exactly), plus the pool + lower tiers.
HALF_OCTAVES = range(-8, 13)
HASH_SPACE = 1 << 32
DEFAULT_MAX_TRACKED = 1 << 16


def bucket_bounds(pool_tokens: int, extra: Iterable[int] = ()) -> tuple[int, ...]:
    """Upper bounds in tokens: 1/16x .. 64x the pool in half octaves, and ``extra`` sizes."""
    if pool_tokens <= 0:
        raise ValueError(f"pool size must be positive, got {pool_tokens}")
    grid = {max(1, round(pool_tokens * 2 ** (k / 2))) for k in HALF_OCTAVES}
    return tuple(sorted(grid | {int(x) for x in extra if x > 0}))


def sample_hash(key: Hashable) -> int:
    """A uniform 32-bit value per block: bytes digests are already uniform, so use their bits
    (stable across processes, so benchmark runs sample the same blocks)."""
    if isinstance(key, bytes | bytearray) and len(key) >= 4:
        return int.from_bytes(key[:4], "little")
    if isinstance(key, int):  # e.g. a block id: scrambled (Fibonacci hashing), ids are dense
        return (key * 0x9E3779B1) & (HASH_SPACE - 1)
    return hash(key) & (HASH_SPACE - 1)


class _Fenwick:
    """Counts at integer positions; prefix sums in O(log n)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.tree = [0] * (size + 1)

    def add(self, position: int, delta: int) -> None:
        i = position + 1
        while i <= self.size:
            self.tree[i] += delta
            i += i & -i

    def prefix(self, position: int) -> int:
        """Sum over positions [0, position]."""
        i, total = position + 1, 0
        while i > 0:
            total += self.tree[i]
            i -= i & -i
        return total


class RecencyOrder:
    """Released blocks ordered by release time: how many were released after a given one.

    Release times are positions in a Fenwick tree; when the positions run out, the live ones
    are renumbered in order (amortised O(log n) per release). The dict's insertion order is
    the release order, so the oldest block is its first key.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._time: dict[Hashable, int] = {}
        self._tree = _Fenwick(capacity)
        self._next = 0

    def __len__(self) -> int:
        return len(self._time)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._time

    def release(self, key: Hashable) -> None:
        self.remove(key)
        if self._next >= self._tree.size:
            self._renumber()
        self._time[key] = self._next
        self._tree.add(self._next, 1)
        self._next += 1

    def remove(self, key: Hashable) -> None:
        t = self._time.pop(key, None)
        if t is not None:
            self._tree.add(t, -1)

    def newer_than(self, key: Hashable) -> int:
        """Blocks released after ``key`` (which must be present)."""
        return len(self._time) - self._tree.prefix(self._time[key])

    def oldest(self) -> Hashable | None:
        return next(iter(self._time), None)

    def snapshot_keys(self) -> list[Hashable]:
        return list(self._time)

    def _renumber(self) -> None:
        size = max(1024, 4 * len(self._time))
        self._tree = _Fenwick(size)
        for i, key in enumerate(self._time):
            self._time[key] = i
            self._tree.add(i, 1)
        self._next = len(self._time)


class ReuseDistanceTracker:
    """Sampled reuse distances of prefix lookups, published as a cumulative histogram.

    The engine tells it three things: ``lookup`` (a new request's cacheable block keys, root
    first, before anything is pinned), ``pinned`` (a block went from idle to held) and
    ``released`` (a block is idle again). Keys are the blocks' chain hashes. Which blocks take
    part is the engine's eviction order: the reference engine (and SGLang) fill empty blocks
    first, so only cached blocks compete; vLLM's free queue is one LRU of every free block,
    cached or empty, so its adapter also reports empty blocks (keyed by block id).
    """

    def __init__(
        self,
        block_size: int,
        pool_tokens: int,
        extra_bounds: Iterable[int] = (),
        max_tracked: int = DEFAULT_MAX_TRACKED,
    ) -> None:
        self.block_size = block_size
        self.bounds = bucket_bounds(pool_tokens, extra_bounds)
        self.max_tracked = max_tracked
        self.threshold = HASH_SPACE  # a block is tracked when sample_hash(key) < threshold
        self._idle = RecencyOrder()
        self._held: set[Hashable] = set()
        # Looked-up tokens per bucket (not cumulative), as sampled estimates.
        self._buckets = [0.0] * len(self.bounds)
        self._distance_sum = 0.0
        self._unassigned = 0  # looked-up blocks no sampled block has stood for yet
        self.query_tokens = 0

    @property
    def rate(self) -> float:
        return self.threshold / HASH_SPACE

    @property
    def tracked(self) -> int:
        return len(self._idle) + len(self._held)

    def _sampled(self, key: Hashable) -> bool:
        return sample_hash(key) < self.threshold

    # ------------------------------------------------------------------ engine events

    def pinned(self, key: Hashable) -> None:
        if self._sampled(key):
            self._idle.remove(key)
            self._held.add(key)
            self._bound_memory()

    def released(self, key: Hashable) -> None:
        if self._sampled(key):
            self._held.discard(key)
            self._idle.release(key)
            self._bound_memory()

    def forget(self, key: Hashable) -> None:
        """A block known under another key from now on (vLLM: an empty block got its hash)."""
        self._held.discard(key)
        self._idle.remove(key)

    def distances(self, keys: Sequence[Hashable], pinned_tokens: int) -> list[float]:
        """Distances in tokens of the sampled ``keys`` now (inf: cold). No side effects."""
        bs, rate = self.block_size, self.rate
        out = []
        for key in keys:
            if not self._sampled(key):
                continue
            if key in self._held:
                out.append(float(bs))  # another running request holds it: a hit at any size
            elif key in self._idle:
                out.append(pinned_tokens + bs * (1 + self._idle.newer_than(key)) / rate)
            else:
                out.append(math.inf)
        return out

    def record(self, query_tokens: int, blocks: int, distances: Sequence[float]) -> None:
        """A first admission: ``query_tokens`` looked up, of which ``blocks`` full cacheable
        blocks, ``distances`` those of its sampled blocks.

        Each sampled block stands for ``blocks / len(distances)`` of this prompt's blocks (not
        1/rate): the prompt's block tokens are then counted exactly, and only how they split
        by distance is estimated. A prompt with no sampled block hands its blocks to the next
        one that has some. Every weight is positive, so the published counts never decrease.
        """
        self.query_tokens += query_tokens
        self._unassigned += blocks
        if not distances:
            return
        weight = self.block_size * self._unassigned / len(distances)
        self._unassigned = 0
        for d in distances:
            if d == math.inf:
                continue
            i = bisect.bisect_left(self.bounds, d)  # the first bound >= d
            if i < len(self.bounds):
                self._buckets[i] += weight
            self._distance_sum += weight * d

    def lookup(self, keys: Sequence[Hashable], query_tokens: int, pinned_tokens: int) -> None:
        self.record(query_tokens, len(keys), self.distances(keys, pinned_tokens))

    # ------------------------------------------------------------------ memory bound

    def _bound_memory(self) -> None:
        # Idle blocks farther than the largest bound can only ever be cold: forget the oldest.
        top_blocks = self.bounds[-1] / self.block_size * self.rate
        while len(self._idle) > top_blocks + 1:
            oldest = self._idle.oldest()
            assert oldest is not None
            self._idle.remove(oldest)
        while self.tracked > self.max_tracked:  # fixed-size SHARDS: sample less
            self.threshold //= 2
            for key in [k for k in self._held if not self._sampled(k)]:
                self._held.discard(key)
            for key in [k for k in self._idle.snapshot_keys() if not self._sampled(k)]:
                self._idle.remove(key)

    # ------------------------------------------------------------------ publishing

    def histogram(self) -> ReuseDistances:
        cumulative, total = [], 0.0
        for count in self._buckets:
            total += count
            cumulative.append(min(self.query_tokens, math.floor(total)))
        return ReuseDistances(
            sampling_rate=self.rate,
            bounds_tokens=self.bounds,
            cumulative_tokens=tuple(cumulative),
            query_tokens=self.query_tokens,
            distance_sum_tokens=math.floor(self._distance_sum),
        )

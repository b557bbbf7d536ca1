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
- pinned tokens are those of *this* run; a smaller pool would run fewer requests at once (pin
  less) and queue more (a queued prompt's prefix ages while it waits), so predictions for much
  smaller pools under heavy concurrency are the least accurate;
- the host tier is a victim cache below the pool: device + host behaves as one LRU of both
  sizes, so its curve is read at pool + host.

Memory is bounded by spatial sampling (SHARDS): a block is tracked when its hash falls below a
threshold; each tracked reference stands for 1/rate blocks. When more than ``max_tracked``
blocks are tracked, the threshold is lowered (fixed-size SHARDS) and the blocks above it are
forgotten. Cost: per block that becomes held or idle, a hash comparison and, when sampled, a
dict update and at most one Fenwick-tree update; per lookup, a hash comparison per block and
O(k log n) ranks by bisection for its n sampled blocks over k buckets.
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
SCRAMBLE = 0x9E3779B1  # Fibonacci hashing of integer keys (dense block ids)
DEFAULT_MAX_TRACKED = 1 << 16
# A lookup's sampled blocks: (bucket index, how many, their distances' sum); the bucket is
# len(bounds) beyond the largest bound and len(bounds) + 1 for cold misses.
Observation = list[tuple[int, int, float]]


def bucket_bounds(pool_tokens: int, extra: Iterable[int] = ()) -> tuple[int, ...]:
    """Upper bounds in tokens: 1/16x .. 64x the pool in half octaves, and ``extra`` sizes."""
    if pool_tokens <= 0:
        raise ValueError(f"pool size must be positive, got {pool_tokens}")
    grid = {max(1, round(pool_tokens * 2 ** (k / 2))) for k in HALF_OCTAVES}
    return tuple(sorted(grid | {int(x) for x in extra if x > 0}))


def sample_hash(key: Hashable) -> int:
    """A uniform 32-bit value per block: bytes digests are already uniform, so use their bits
    (stable across processes, so benchmark runs sample the same blocks)."""
    if type(key) is bytes:  # block hashes: the hot path, checked first
        return int.from_bytes(key[:4], "little")
    if isinstance(key, int):  # e.g. a block id: scrambled (Fibonacci hashing), ids are dense
        return (key * SCRAMBLE) & (HASH_SPACE - 1)
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

    Release times are consecutive integers, so the entries after time t are all the times
    after it minus the *tombstones* after it (entries since re-released or pinned again),
    which a Fenwick tree counts. A release is then a dict insert, a removal one tree update,
    a rank one prefix sum. When the times run past the tree, the live entries are renumbered
    in order (amortised O(1)). The dict's insertion order is the release order, so the oldest
    block is its first key.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._time: dict[Hashable, int] = {}
        self._dead = _Fenwick(capacity)
        self._dead_count = 0
        self._next = 0

    def __len__(self) -> int:
        return len(self._time)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._time

    def release(self, key: Hashable) -> None:
        self.remove(key)
        if self._next >= self._dead.size:
            self._renumber()
        self._time[key] = self._next
        self._next += 1

    def remove(self, key: Hashable) -> None:
        t = self._time.pop(key, None)
        if t is not None:
            self._dead.add(t, 1)
            self._dead_count += 1

    def newer_than(self, key: Hashable) -> int:
        """Blocks released after ``key`` (which must be present)."""
        t = self._time[key]
        return (self._next - 1 - t) - (self._dead_count - self._dead.prefix(t))

    def oldest(self) -> Hashable | None:
        return next(iter(self._time), None)

    def snapshot_keys(self) -> list[Hashable]:
        return list(self._time)

    def _renumber(self) -> None:
        self._dead = _Fenwick(max(1024, 4 * len(self._time)))
        self._dead_count = 0
        for i, key in enumerate(self._time):
            self._time[key] = i
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
        self._idle = RecencyOrder()
        self._held: set[Hashable] = set()
        # Looked-up tokens per bucket (not cumulative), as sampled estimates.
        self._buckets = [0.0] * len(self.bounds)
        self._distance_sum = 0.0
        self.query_tokens = 0
        self._published: ReuseDistances | None = None  # until the next change
        # A block is tracked when sample_hash(key) < threshold. Start where the blocks that
        # span the largest bound fit in half of max_tracked (a power-of-two rate): the work per
        # engine event is then bounded from the first step, not only once memory fills.
        span_blocks = self.bounds[-1] / block_size
        threshold = HASH_SPACE
        while threshold > 1 and span_blocks * threshold / HASH_SPACE > max_tracked / 2:
            threshold //= 2
        self._set_threshold(threshold)

    @property
    def rate(self) -> float:
        return self.threshold / HASH_SPACE

    @property
    def tracked(self) -> int:
        return len(self._idle) + len(self._held)

    def _sampled(self, key: Hashable) -> bool:
        return sample_hash(key) < self.threshold

    # ------------------------------------------------------------------ engine events
    # On the engine's hot path (every block that becomes held or idle): one hash comparison
    # for the blocks not sampled, a few dict operations for those that are.

    def pinned(self, key: Hashable) -> None:
        if sample_hash(key) < self.threshold:
            self._idle.remove(key)
            self._held.add(key)
            if len(self._held) + len(self._idle) > self.max_tracked:
                self._bound_memory()

    def released(self, key: Hashable) -> None:
        if sample_hash(key) < self.threshold:
            self._held.discard(key)
            idle = self._idle
            idle.release(key)
            if len(idle) > self._idle_limit or len(idle) + len(self._held) > self.max_tracked:
                self._bound_memory()

    def forget(self, key: Hashable) -> None:
        """A block known under another key from now on (vLLM: an empty block got its hash)."""
        self._held.discard(key)
        self._idle.remove(key)

    def _distance(self, key: Hashable, pinned_tokens: int) -> float:
        if key in self._held:
            return float(self.block_size)  # another running request holds it: always a hit
        if key in self._idle:
            # The block itself, and each sampled block released since for 1/rate blocks
            # (scaling the block itself too would add 1/rate - 1 blocks of bias).
            return pinned_tokens + self.block_size * (1 + self._idle.newer_than(key) / self.rate)
        return math.inf

    def _sampled_keys(self, keys: Sequence[Hashable]) -> list[Hashable]:
        return [key for key in keys if self._sampled(key)]

    def distances(self, keys: Sequence[Hashable], pinned_tokens: int) -> list[float]:
        """The distance in tokens of each sampled key now (inf: cold), one rank each."""
        return [self._distance(key, pinned_tokens) for key in self._sampled_keys(keys)]

    def observe(self, keys: Sequence[Hashable], pinned_tokens: int) -> Observation:
        """A lookup's sampled keys by bucket, taken before anything is pinned. No side effects.

        Distances never decrease along a prompt (see the module's notes), so a run of keys
        whose first and last share a bucket is all in it: bisection needs O(k log n) ranks
        for a prompt of n sampled blocks over k buckets, not n. (A run's distance sum is
        taken from its ends.)"""
        sampled = self._sampled_keys(keys)
        out: Observation = []
        if not sampled:
            return out
        bounds = self.bounds
        cold = len(bounds) + 1
        known: dict[int, float] = {}

        def at(i: int) -> tuple[float, int]:
            d = known.get(i)
            if d is None:
                d = known[i] = self._distance(sampled[i], pinned_tokens)
            return d, cold if d == math.inf else bisect.bisect_left(bounds, d)

        stack = [(0, len(sampled) - 1)]
        while stack:
            lo, hi = stack.pop()
            (a, bucket_a), (b, bucket_b) = at(lo), at(hi)
            if bucket_a == bucket_b:
                n = hi - lo + 1
                out.append((bucket_a, n, 0.0 if bucket_a == cold else (a + b) / 2 * n))
            elif hi == lo + 1:
                out.append((bucket_a, 1, 0.0 if bucket_a == cold else a))
                out.append((bucket_b, 1, 0.0 if bucket_b == cold else b))
            else:
                mid = (lo + hi) // 2
                stack += [(mid + 1, hi), (lo, mid)]
        return out

    def record(self, query_tokens: int, observed: Observation) -> None:
        """A first admission: ``query_tokens`` looked up, ``observed`` its sampled blocks.

        Each sampled block stands for 1/rate blocks (Horvitz-Thompson: unbiased, and every
        weight positive, so the published counts never decrease). Renormalising per prompt
        instead is biased under spatial sampling: a prompt whose shared prefix happens to be
        unsampled would hand that prefix's weight to its cold tail.
        """
        self.query_tokens += query_tokens
        self._published = None
        weight = self.block_size / self.rate
        for bucket, n, distance_sum in observed:
            if bucket < len(self._buckets):
                self._buckets[bucket] += weight * n
            self._distance_sum += weight * distance_sum

    def lookup(self, keys: Sequence[Hashable], query_tokens: int, pinned_tokens: int) -> None:
        self.record(query_tokens, self.observe(keys, pinned_tokens))

    # ------------------------------------------------------------------ memory bound

    def _set_threshold(self, threshold: int) -> None:
        self.threshold = threshold
        # Sampled idle blocks that span the largest bound: any older one can only be cold.
        self._idle_limit = self.bounds[-1] / self.block_size * self.rate + 1
        self._published = None

    def _bound_memory(self) -> None:
        while self.tracked > self.max_tracked:  # fixed-size SHARDS: sample less
            self._set_threshold(self.threshold // 2)
            for key in [k for k in self._held if not self._sampled(k)]:
                self._held.discard(key)
            for key in [k for k in self._idle.snapshot_keys() if not self._sampled(k)]:
                self._idle.remove(key)
        while len(self._idle) > self._idle_limit:
            oldest = self._idle.oldest()
            assert oldest is not None
            self._idle.remove(oldest)

    # ------------------------------------------------------------------ publishing

    def histogram(self) -> ReuseDistances:
        """The counts so far (built once per change: engines publish one per step)."""
        if self._published is not None:
            return self._published
        cumulative, total = [], 0.0
        for count in self._buckets:
            total += count
            cumulative.append(min(self.query_tokens, math.floor(total)))
        self._published = ReuseDistances(
            sampling_rate=self.rate,
            bounds_tokens=self.bounds,
            cumulative_tokens=tuple(cumulative),
            query_tokens=self.query_tokens,
            distance_sum_tokens=math.floor(self._distance_sum),
        )
        return self._published

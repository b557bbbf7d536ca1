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
forgotten.

Spatial sampling alone is noisy when a few prefixes carry most lookups: whether a trace's few
hot blocks fall below the threshold moves the whole curve (up to 0.15 at 1/4 and 0.40 at 1/8,
measured). So the sample is stratified: a block looked up by a second request within a window of
recent lookups becomes *hot* and is tracked whatever its hash, each reference and each release
counting for itself alone (weight 1); the others are sampled as before and stand for 1/rate of the
blocks that are not hot. Which blocks are hot depends on the lookups, never on the hash, so the
sampled stratum stays a uniform sample of its own and the estimate stays unbiased. Hot blocks are
at most a quarter of ``max_tracked``, the least recently looked up demoted first.

Cost: per block that becomes held or idle, a hash comparison (and a set test once some blocks
are hot) and, when tracked, a dict update and at most one tombstone (a byte and a counter,
O(1)); engines that know a request's blocks together pass them in one call, so most of that runs
at C speed. Per lookup: a hash comparison per block, membership tests for the held and cold
runs, and O(k log n) ranks by bisection for its n idle blocks over k buckets, each rank O(1)
plus a C-speed count (two with hot blocks); at admission, one ordered-dict test per block (an
engine admitting many requests a step does that for one of them: ``record(promote=...)``).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import operator
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from kvstats.snapshot import ReuseDistances

# Buckets: the pool size times 2^(k/2) for k = -8 .. 12, i.e. 1/16x to 64x the pool in half
# octaves (0.25x, 0.5x, 1x, 2x and 4x are bounds exactly), plus the pool + lower tiers.
HALF_OCTAVES = range(-8, 13)
HASH_SPACE = 1 << 32
SCRAMBLE = 0x9E3779B1  # Fibonacci hashing of integer keys (dense block ids)
DEFAULT_MAX_TRACKED = 1 << 16
# A lookup's tracked blocks by bucket: (bucket index, how many, their distances' sum, tokens
# each stands for); the bucket is len(bounds) beyond the largest bound and len(bounds) + 1 for
# cold misses.
Part = tuple[int, int, float, float]


@dataclass(slots=True)
class Observation:
    """One prompt's lookup, taken before it pins anything; recorded at its first admission."""

    parts: list[Part] = field(default_factory=list)
    # Every block key looked up (root first): at record time, the ones seen in an earlier
    # lookup become hot.
    keys: Sequence[Hashable] = ()


def bucket_bounds(pool_tokens: int, extra: Iterable[int] = ()) -> tuple[int, ...]:
    """Upper bounds in tokens: 1/16x .. 64x the pool in half octaves, and ``extra`` sizes."""
    if pool_tokens <= 0:
        raise ValueError(f"pool size must be positive, got {pool_tokens}")
    grid = {max(1, round(pool_tokens * 2 ** (k / 2))) for k in HALF_OCTAVES}
    return tuple(sorted(grid | {int(x) for x in extra if x > 0}))


def sample_hash(key: Hashable) -> int:
    """A uniform 32-bit value per block: bytes digests are already uniform, so use their bits
    (stable across processes, so benchmark runs sample the same blocks). Big-endian, so that
    for a digest of 4 bytes or more ``sample_hash(key) < t`` is ``key < t.to_bytes(4, "big")``:
    a comparison of bytes, which a whole prompt's keys run through at C speed."""
    if type(key) is bytes:  # block hashes: the hot path, checked first
        return int.from_bytes(key[:4], "big")
    if isinstance(key, int):  # e.g. a block id: scrambled (Fibonacci hashing), ids are dense
        return (key * SCRAMBLE) & (HASH_SPACE - 1)
    return hash(key) & (HASH_SPACE - 1)


CHUNK_BITS = 9  # release times per chunk of the tombstone counts (512)


class RecencyOrder:
    """Released blocks ordered by release time: how many were released after a given one.

    Release times are consecutive integers, so the entries after time t are all the times
    after it minus the *tombstones* after it (entries since re-released or pinned again). A
    tombstone is one byte set and one chunk count raised, O(1): blocks change state far more
    often than they are ranked (every pin and release, against a few ranks per looked-up
    prompt). A rank sums the chunk counts before t's chunk (prefix sums kept until the next
    tombstone, so the ranks of one lookup share them) and counts t's chunk up to t at C speed.
    When the times run past the arrays, the live entries are renumbered in order (amortised
    O(1)). The dict's insertion order is the release order, so the oldest block is its first
    key. Entries marked *hot* are counted a second time, the same way, by a second byte array
    (the tracker weighs them apart).
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._time: dict[Hashable, int] = {}
        # The released keys, for membership tests at C speed (a live view: read, never write).
        self.keys = self._time.keys()
        self.hot_keys: set[Hashable] = set()  # live entries marked hot
        self._next = 0
        self._reset(capacity)

    def _reset(self, capacity: int) -> None:
        chunks = -(-capacity >> CHUNK_BITS)
        self._capacity = chunks << CHUNK_BITS
        self._dead = bytearray(self._capacity)
        self._dead_in_chunk = [0] * chunks
        self._dead_count = 0
        self._dead_before: list[int] | None = None  # prefix sums of _dead_in_chunk
        self._hot = bytearray(self._capacity)  # 1 at the time of each live hot entry
        self._hot_in_chunk = [0] * chunks
        self._hot_before: list[int] | None = None
        for key in self.hot_keys:
            self._mark(self._time[key], 1)

    @property
    def hot_count(self) -> int:
        return len(self.hot_keys)

    def _mark(self, t: int, value: int) -> None:
        if self._hot[t] != value:
            self._hot[t] = value
            self._hot_in_chunk[t >> CHUNK_BITS] += 1 if value else -1
            self._hot_before = None

    def mark_hot(self, keys: Iterable[Hashable]) -> None:
        """``set_hot(key, True)`` of each of ``keys``, all present (a request's hot blocks
        just released: one loop, no call per key)."""
        time, hot, in_chunk, hot_keys = self._time, self._hot, self._hot_in_chunk, self.hot_keys
        for key in keys:
            t = time[key]
            if not hot[t]:
                hot[t] = 1
                in_chunk[t >> CHUNK_BITS] += 1
                hot_keys.add(key)
        self._hot_before = None

    def set_hot(self, key: Hashable, hot: bool) -> None:
        """Mark a live entry hot (or not); keys not present are ignored."""
        t = self._time.get(key)
        if t is None:
            return
        self._mark(t, 1 if hot else 0)
        (self.hot_keys.add if hot else self.hot_keys.discard)(key)

    def __len__(self) -> int:
        return len(self._time)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._time

    def time_of(self, key: Hashable) -> int | None:
        return self._time.get(key)

    def times_of(self, keys: Iterable[Hashable]) -> list[int | None]:
        return list(map(self._time.get, keys))

    def release(self, key: Hashable) -> None:
        self.remove(key)
        if self._next >= self._capacity:
            self._renumber(1)
        self._time[key] = self._next
        self._next += 1

    def release_all(self, keys: Sequence[Hashable]) -> None:
        """``release`` of each of ``keys`` in order, in one pass."""
        self.remove_all(keys)  # usually none: they were held, not idle
        n, live = len(keys), len(self._time)
        if self._next + n > self._capacity:
            self._renumber(n)
        start = self._next
        self._time.update(zip(keys, range(start, start + n), strict=True))
        self._next += n
        if len(self._time) - live != n:  # a key given twice: its last release counts
            for key in keys:
                self._time.pop(key, None)
            for t in range(start, start + n):
                self._bury(t)
            for key in list(dict.fromkeys(reversed(keys)))[::-1]:
                self.release(key)

    def _bury(self, t: int) -> None:
        self._dead[t] = 1
        self._dead_in_chunk[t >> CHUNK_BITS] += 1
        self._dead_count += 1
        self._dead_before = None

    def remove(self, key: Hashable) -> None:
        t = self._time.pop(key, None)
        if t is not None:
            self._bury(t)
            if key in self.hot_keys:
                self.hot_keys.discard(key)
                self._mark(t, 0)

    def remove_all(self, keys: Sequence[Hashable]) -> None:
        """``remove`` of each key (``_bury`` inlined: this loop runs for every pinned block)."""
        if self._time.keys().isdisjoint(keys):  # e.g. new blocks: a C-speed test, no loop
            return
        pop, dead, dead_in_chunk, removed = self._time.pop, self._dead, self._dead_in_chunk, 0
        hot_keys, hot, hot_in_chunk = self.hot_keys, self._hot, self._hot_in_chunk
        for key in keys:
            t = pop(key, None)
            if t is not None:
                dead[t] = 1
                dead_in_chunk[t >> CHUNK_BITS] += 1
                removed += 1
                if hot[t]:
                    hot[t] = 0
                    hot_in_chunk[t >> CHUNK_BITS] -= 1
                    hot_keys.discard(key)
                    self._hot_before = None
        if removed:
            self._dead_count += removed
            self._dead_before = None

    def newer_than(self, key: Hashable) -> int:
        """Blocks released after ``key`` (which must be present)."""
        return self.newer_than_time(self._time[key])

    def newer_than_time(self, t: int) -> int:
        """Live entries released after time ``t`` (a live entry's time)."""
        before = self._dead_before
        if before is None:
            before = self._dead_before = [0, *itertools.accumulate(self._dead_in_chunk)]
        chunk = t >> CHUNK_BITS
        dead_through_t = before[chunk] + self._dead.count(1, chunk << CHUNK_BITS, t + 1)
        return (self._next - 1 - t) - (self._dead_count - dead_through_t)

    def hot_newer_than_time(self, t: int) -> int:
        """Live hot entries released after time ``t``."""
        if not self.hot_keys:
            return 0
        before = self._hot_before
        if before is None:
            before = self._hot_before = [0, *itertools.accumulate(self._hot_in_chunk)]
        chunk = t >> CHUNK_BITS
        hot_through_t = before[chunk] + self._hot.count(1, chunk << CHUNK_BITS, t + 1)
        return len(self.hot_keys) - hot_through_t

    def oldest(self) -> Hashable | None:
        return next(iter(self._time), None)

    def snapshot_keys(self) -> list[Hashable]:
        return list(self._time)

    def _renumber(self, room: int) -> None:
        """Times 0..n-1 for the live entries, in order, and room for ``room`` more. In place:
        ``keys`` stays the same view."""
        self._time.update(zip(list(self._time), range(len(self._time)), strict=True))
        self._next = len(self._time)
        self._reset(max(1024, 4 * (self._next + room)))


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
        hot_capacity: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.bounds = bucket_bounds(pool_tokens, extra_bounds)
        self.max_tracked = max_tracked
        self._idle = RecencyOrder()
        self._held: set[Hashable] = set()
        # Hot blocks (tracked whatever their hash), least recently looked up first; 0: none.
        self._hot_capacity = hot_capacity
        # key -> the lookup (a count) that last asked for it. Engines may read it (not write):
        # the vLLM adapter inlines ``tracks`` on its per-block path.
        self.hot_blocks: dict[Hashable, int] = {}
        self._lookups = 0
        # Keys of recent lookups that are not hot, oldest first: a second lookup makes one hot.
        self._seen: dict[Hashable, None] = {}
        # Engines that keep their own sets of tracked blocks (the vLLM adapter) hear of a key
        # that became hot (and answer whether they hold its block now) or stopped being hot.
        self.on_promote: Callable[[Hashable], bool] | None = None
        self.on_demote: Callable[[Hashable], None] | None = None
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

    def sample_at_most(self, rate: float) -> None:
        """Track at most this share of the blocks (benchmarks and tests of the sampling; the
        blocks above the new threshold are forgotten, as when memory fills)."""
        threshold = max(1, int(HASH_SPACE * rate))
        if threshold < self.threshold:
            self._set_threshold(threshold)
            self._forget_untracked()
            self._bound_memory()

    @property
    def rate(self) -> float:
        return self.threshold / HASH_SPACE

    @property
    def tracked(self) -> int:
        return len(self._idle) + len(self._held)

    def _sampled(self, key: Hashable) -> bool:
        return sample_hash(key) < self.threshold

    def tracks(self, key: Hashable) -> bool:
        """Whether events about this key count: it is sampled, or hot."""
        return sample_hash(key) < self.threshold or key in self.hot_blocks

    @property
    def hot(self) -> int:
        return len(self.hot_blocks)

    @property
    def hot_capacity(self) -> int:
        """At most a quarter of the tracked blocks are hot, unless set (0: no hot blocks)."""
        return self.max_tracked // 4 if self._hot_capacity is None else self._hot_capacity

    @hot_capacity.setter
    def hot_capacity(self, value: int) -> None:
        self._hot_capacity = value

    # ------------------------------------------------------------------ engine events
    # On the engine's hot path (every block that becomes held or idle): one hash comparison
    # for the blocks not sampled, a few dict operations for those that are. Engines that know
    # a request's blocks together (the reference engine) tell them in one call each.

    def pinned(self, key: Hashable) -> None:
        if sample_hash(key) < self.threshold or key in self.hot_blocks:
            self.pinned_sampled(key)

    def released(self, key: Hashable) -> None:
        if sample_hash(key) < self.threshold or key in self.hot_blocks:
            self.released_sampled(key)

    def pinned_sampled(self, key: Hashable) -> None:
        """``pinned`` of a key the caller found tracked (its own inlined test)."""
        self._idle.remove(key)
        self._held.add(key)
        if len(self._held) + len(self._idle) > self.max_tracked:
            self._bound_memory()

    def released_sampled(self, key: Hashable) -> None:
        """``released`` of a key the caller found tracked."""
        self._held.discard(key)
        idle = self._idle
        idle.release(key)
        if key in self.hot_blocks:
            idle.set_hot(key, True)
        if len(idle) > self._idle_limit or len(idle) + len(self._held) > self.max_tracked:
            self._bound_memory()

    def pinned_all(self, keys: Sequence[Hashable]) -> None:
        """``pinned`` of each key."""
        keys = self._sampled_keys(keys)
        if keys:
            self._idle.remove_all(keys)
            self._held.update(keys)
            if len(self._held) + len(self._idle) > self.max_tracked:
                self._bound_memory()

    def released_all(self, keys: Sequence[Hashable]) -> None:
        """``released`` of each key in order (one request's blocks, leaf first)."""
        keys = self._sampled_keys(keys)
        if keys:
            self._held.difference_update(keys)
            idle = self._idle
            idle.release_all(keys)
            if self.hot_blocks:
                idle.mark_hot(self.hot_blocks.keys() & keys)
            if len(idle) > self._idle_limit or len(idle) + len(self._held) > self.max_tracked:
                self._bound_memory()

    def looks_past(self, key: Hashable) -> bool:
        """Whether a lookup that missed this block should go on to the next: it is tracked
        (its distance counts), or not sampled (a later one may be). A sampled block that is not
        tracked is cold, and so is every block after it (the prompt order): engines stop
        there instead of hashing the rest of the prompt, since cold blocks add to no bucket."""
        return key in self._idle.keys or key in self._held or sample_hash(key) >= self.threshold

    def forget(self, key: Hashable) -> None:
        """A block known under another key from now on (vLLM: an empty block got its hash)."""
        self._held.discard(key)
        self._idle.remove(key)

    def _distance(self, key: Hashable, pinned_tokens: int) -> float:
        if key in self._held:
            return float(self.block_size)  # another running request holds it: always a hit
        t = self._idle.time_of(key)
        return math.inf if t is None else self._idle_distance(t, pinned_tokens)

    def _idle_distance(self, t: int, pinned_tokens: int) -> float:
        """The distance of the idle block released at ``t``: the pinned tokens, the block
        itself, each hot block released since for itself and each other tracked one for 1/rate
        blocks (scaling the block itself too would add 1/rate - 1 blocks of bias)."""
        idle, bs = self._idle, self.block_size
        newer = idle.newer_than_time(t)
        hot = idle.hot_newer_than_time(t) if idle.hot_keys else 0
        return pinned_tokens + bs + (newer - hot) * (bs / self.rate) + hot * bs

    def _sampled_keys(self, keys: Sequence[Hashable]) -> Sequence[Hashable]:
        """The tracked keys among ``keys``: sampled, or hot."""
        threshold, below = self.threshold, self.threshold_key
        if below is None or not keys:  # every block tracked
            return keys
        hot = self.hot_blocks
        digests = cast("Sequence[bytes]", keys)
        if set(map(type, keys)) == {bytes} and min(map(len, digests)) >= 4:  # C speed
            tracked = map(below.__gt__, digests)
            if hot:
                tracked = map(operator.or_, tracked, map(hot.__contains__, keys))
            return list(itertools.compress(keys, tracked))
        if hot:
            return [key for key in keys if sample_hash(key) < threshold or key in hot]
        return [key for key in keys if sample_hash(key) < threshold]

    def distances(self, keys: Sequence[Hashable], pinned_tokens: int) -> list[float]:
        """The distance in tokens of each sampled key now (inf: cold), one rank each."""
        return [self._distance(key, pinned_tokens) for key in self._sampled_keys(keys)]

    def observe(self, keys: Sequence[Hashable], pinned_tokens: int) -> Observation:
        """A lookup's tracked keys by bucket, taken before anything is pinned. No side effects:
        an engine may look a waiting request up again and record only its admission. Hot keys
        and sampled ones are bucketed apart (they stand for different numbers of blocks).

        Along a prompt (see the module's notes) the blocks other requests hold come first,
        then idle blocks released ever longer ago (distances never decrease), then cold ones.
        So the held run and the cold run are found by membership tests at C speed, and the
        idle run is cut at each bucket bound it crosses by bisection: O(k log n) ranks for n
        idle blocks over k buckets, not n. (A run's distance sum is taken from its ends.)
        Anything out of that order is classified block by block."""
        observed = Observation(keys=keys)
        tracked = self._sampled_keys(keys)
        weight, hot = self.block_size / self.rate, self.hot_blocks
        if hot and not hot.keys().isdisjoint(tracked):
            hot_part = list(filter(hot.__contains__, tracked))
            tracked = list(itertools.filterfalse(hot.__contains__, tracked))
            self._observe_stratum(hot_part, pinned_tokens, float(self.block_size), observed.parts)
        self._observe_stratum(tracked, pinned_tokens, weight, observed.parts)
        return observed

    def _observe_stratum(
        self, sampled: Sequence[Hashable], pinned_tokens: int, weight: float, out: list[Part]
    ) -> None:
        """``observe`` of one stratum's keys (in prompt order), each standing for ``weight``."""
        n = len(sampled)
        if not n:
            return
        bounds, bs = self.bounds, self.block_size
        held = self._held
        h = len(list(itertools.takewhile(held.__contains__, sampled)))  # the held run
        if h:
            out.append((bisect.bisect_left(bounds, bs), h, float(bs * h), weight))
        rest = sampled[h:] if h else sampled
        times = self._idle.times_of(rest)
        try:
            c = times.index(None)
        except ValueError:
            c = len(times)
        if c:
            self._observe_idle_run(times, c, pinned_tokens, weight, out)
        if c < len(times):
            tail = rest[c:]
            if times.count(None) == len(tail) and held.isdisjoint(tail):
                out.append((len(bounds) + 1, len(tail), 0.0, weight))  # cold
            else:  # not in the engines' order: each block on its own
                for key in tail:
                    d = self._distance(key, pinned_tokens)
                    if d == math.inf:
                        out.append((len(bounds) + 1, 1, 0.0, weight))
                    else:
                        out.append((bisect.bisect_left(bounds, d), 1, d, weight))

    def _observe_idle_run(
        self, times: list[int | None], c: int, pinned_tokens: int, weight: float, out: list[Part]
    ) -> None:
        """Buckets of ``times[:c]``: idle blocks, newest release first."""
        bounds, idle_distance = self.bounds, self._idle_distance

        def distance(i: int) -> float:
            t = times[i]
            assert t is not None
            return idle_distance(t, pinned_tokens)

        index, start, first = range(c), 0, distance(0)
        last_bucket = bisect.bisect_left(bounds, distance(c - 1))
        while True:
            bucket = bisect.bisect_left(bounds, first)
            end = (
                c
                if bucket == last_bucket
                else bisect.bisect_right(index, float(bounds[bucket]), start + 1, c, key=distance)
            )
            last = first if end == start + 1 else distance(end - 1)
            out.append((bucket, end - start, (first + last) / 2 * (end - start), weight))
            if end == c:
                return
            start, first = end, distance(end)

    def record(
        self, query_tokens: int, observed: Observation, held_blocks: int = 0, promote: bool = True
    ) -> None:
        """A first admission: ``query_tokens`` looked up, ``observed`` its tracked blocks;
        ``held_blocks``: how many of its first blocks the admission holds now (its hits), if
        it pinned them before this call. ``promote=False`` leaves its keys out of finding hot
        blocks (an engine that admits many requests a step does that for one of them: a hot
        prefix is in most admissions, and which one is chosen does not depend on the hash).

        Each sampled block stands for 1/rate blocks and each hot one for itself
        (Horvitz-Thompson per stratum: unbiased, and every weight positive, so the published
        counts never decrease). Renormalising per prompt instead is biased under spatial
        sampling: a prompt whose shared prefix happens to be unsampled would hand that
        prefix's weight to its cold tail.
        """
        self.query_tokens += query_tokens
        self._published = None
        for bucket, n, distance_sum, weight in observed.parts:
            if bucket < len(self._buckets):
                self._buckets[bucket] += weight * n
            self._distance_sum += weight * distance_sum
        if promote and self.hot_capacity > 0 and self.threshold < HASH_SPACE:
            self._promote_repeats(observed.keys, held_blocks)

    def lookup(
        self,
        keys: Sequence[Hashable],
        query_tokens: int,
        pinned_tokens: int,
        held_blocks: int = 0,
    ) -> None:
        self.record(query_tokens, self.observe(keys, pinned_tokens), held_blocks)

    # ------------------------------------------------------------------ hot blocks

    def _promote_repeats(self, keys: Sequence[Hashable], held_blocks: int) -> None:
        """Keys seen in an earlier recent lookup become hot; hot ones are looked up again.
        Set operations at C speed: most of a hot prefix's keys take no Python step."""
        self._lookups += 1
        hot, seen = self.hot_blocks, self._seen
        if hot:
            again = hot.keys() & keys
            if again:
                hot.update(dict.fromkeys(again, self._lookups))
        repeats = seen.keys() & keys
        if repeats:
            held = set(keys[:held_blocks])
            for key in repeats:
                del seen[key]
                self._promote(key, key in held)
            if len(hot) > self.hot_capacity:
                self._demote_least_recent()
        new = set(keys).difference(hot)
        if new:
            seen.update(dict.fromkeys(new))
            capacity = max(1024, self.max_tracked // 2)
            if len(seen) > capacity:  # the oldest go, a quarter at a time
                for key in list(itertools.islice(seen, len(seen) - capacity + capacity // 4)):
                    del seen[key]
        if self.tracked > self.max_tracked:
            self._bound_memory()

    def _promote(self, key: Hashable, held: bool) -> None:
        self.hot_blocks[key] = self._lookups
        idle = self._idle
        engine_holds = self.on_promote(key) if self.on_promote is not None else False
        if key in idle.keys:
            idle.set_hot(key, True)
        elif held or engine_holds:
            self._held.add(key)

    def _demote_least_recent(self) -> None:
        """Back under the hot capacity (an eighth below it: demotions come in batches), the
        blocks looked up least recently first."""
        capacity = self.hot_capacity
        excess = len(self.hot_blocks) - capacity + capacity // 8
        for key, _ in heapq.nsmallest(excess, self.hot_blocks.items(), key=operator.itemgetter(1)):
            del self.hot_blocks[key]
            self._demote(key)

    def _demote(self, key: Hashable) -> None:
        """Back to the sampled stratum: tracked with weight 1/rate if sampled, else forgotten."""
        if self._sampled(key):
            self._idle.set_hot(key, False)
        else:
            self.forget(key)
            if self.on_demote is not None:
                self.on_demote(key)

    # ------------------------------------------------------------------ memory bound

    def _set_threshold(self, threshold: int) -> None:
        self.threshold = threshold
        # sample_hash(key) < threshold, for a digest: key < threshold_key (None: all tracked).
        self.threshold_key = threshold.to_bytes(4, "big") if threshold < HASH_SPACE else None
        # Sampled idle blocks that span the largest bound: any older one can only be cold.
        self._idle_limit = self.bounds[-1] / self.block_size * self.rate + 1
        self._published = None

    def _forget_untracked(self) -> None:
        """After the threshold was lowered: the blocks above it that are not hot go."""
        for key in [k for k in self._held if not self.tracks(k)]:
            self._held.discard(key)
        for key in [k for k in self._idle.snapshot_keys() if not self.tracks(k)]:
            self._idle.remove(key)

    def _bound_memory(self) -> None:
        idle = self._idle
        while self.tracked > self.max_tracked and self.threshold > 1:  # fixed-size SHARDS
            self._set_threshold(self.threshold // 2)
            self._forget_untracked()
        # Idle blocks beyond the largest bound, in sampled blocks (a hot one is rate of one).
        while len(idle) - idle.hot_count * (1 - self.rate) > self._idle_limit:
            oldest = idle.oldest()
            assert oldest is not None
            idle.remove(oldest)

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

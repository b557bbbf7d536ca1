"""The prefix blocks a KV event stream says are resident, and whether that count is whole.

Per KV group and tier a multiset of 64-bit block fingerprints: a block hash stored twice (two
blocks computed for one prefix, as a hybrid model's miss does) is resident until removed
twice, exactly as the engine's hash-to-blocks map counts it. A fingerprint costs 8 bytes (in
``bytearray`` buckets, found with ``bytes.find``) instead of the ~70 a Python ``set`` of ints
takes: a sidecar watching a fleet of 1M-block engines holds ~9 MB per engine, not ~70.

*Whole* means every batch since a known-empty cache was applied: the stream was read from its
first batch (sequence 0, replayed if need be), or an ``AllBlocksCleared`` came since a loss.
A lost batch, a refused one, or a removal of a block never stored makes it not whole, until
the next ``AllBlocksCleared`` or a restart (sequence 0 again). Counts are published only
while whole: never a number that only looks exact.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from .decode import Batch, Cleared, Removed, Stored, Unknown

MAX_GROUPS = 64  # KV cache groups per stream (vLLM models have a handful)
MAX_SETS = MAX_GROUPS * 16  # (group, tier, entry size) sets: a few tiers and partial sizes each
MAX_BLOCK_SIZE = 1 << 20
_MASK64 = (1 << 64) - 1
_BUCKET_TARGET = 128  # fingerprints per bucket before the table doubles (a 1 KiB find)


class BlockMultiset:
    """64-bit fingerprints with multiplicity, 8 bytes each. ``collections.Counter`` does the
    same job in ~100 bytes an entry; ``tests/engine_shim/test_kv_events.py`` proves the two
    agree."""

    __slots__ = ("_buckets", "_mix", "_shift", "size")

    def __init__(self) -> None:
        self._buckets = [bytearray() for _ in range(16)]
        self._shift = 60  # 64 - log2(buckets)
        # A per-process odd multiplier spreads the buckets: a publisher cannot choose hashes
        # that all land in one bucket (which would make every find linear in the stream).
        self._mix = random.getrandbits(64) | 1
        self.size = 0

    def _bucket(self, fp: int) -> bytearray:
        return self._buckets[((fp * self._mix) & _MASK64) >> self._shift]

    def add(self, fp: int) -> None:
        self._bucket(fp).extend(fp.to_bytes(8, "little"))
        self.size += 1
        if self.size > _BUCKET_TARGET * len(self._buckets):
            self._grow()

    def add_many(self, fps: list[int]) -> None:
        """``add`` for each of ``fps``, the per-entry work inlined (the hot path)."""
        buckets, mix, shift = self._buckets, self._mix, self._shift
        for fp in fps:
            buckets[((fp * mix) & _MASK64) >> shift].extend(fp.to_bytes(8, "little"))
        self.size += len(fps)
        while self.size > _BUCKET_TARGET * len(self._buckets):
            self._grow()

    def remove(self, fp: int) -> bool:
        """Remove one copy; False if there was none."""
        bucket = self._bucket(fp)
        key = fp.to_bytes(8, "little")
        at = bucket.find(key)
        while at % 8:  # a match across two entries; -1 % 8 == 7, so -1 loops once more
            if at == -1:
                return False
            at = bucket.find(key, at + 1)
        last = len(bucket) - 8
        bucket[at : at + 8] = bucket[last:]
        del bucket[last:]
        self.size -= 1
        return True

    def count(self, fp: int) -> int:
        bucket = self._bucket(fp)
        key = fp.to_bytes(8, "little")
        return sum(1 for i in range(0, len(bucket), 8) if bucket[i : i + 8] == key)

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def items(self) -> Counter[int]:
        """Every fingerprint with its count (for tests and debugging: O(size))."""
        found: Counter[int] = Counter()
        for bucket in self._buckets:
            for i in range(0, len(bucket), 8):
                found[int.from_bytes(bucket[i : i + 8], "little")] += 1
        return found

    def nbytes(self) -> int:
        """Bytes of fingerprint storage (bytearrays over-allocate up to ~1/8 more)."""
        return 8 * self.size

    def _grow(self) -> None:
        old = self._buckets
        self._buckets = [bytearray() for _ in range(2 * len(old))]
        self._shift -= 1
        for bucket in old:
            for i in range(0, len(bucket), 8):
                entry = bucket[i : i + 8]
                self._bucket(int.from_bytes(entry, "little")).extend(entry)


@dataclass(slots=True)
class Residency:
    """One stream's (one engine DP rank's) resident blocks, applied batch by batch.

    Kept by KV group, tier and entry size: a ``BlockStored`` smaller than its group's blocks
    is a *partial* entry (vLLM's hybrid models in align mode cache a prompt's tail inside a
    block), which may sit on a block that also holds a full entry. Full entries are distinct
    blocks; with partial entries the block count is only known to lie between the full
    entries and all entries, and a tier that has some publishes no exact count."""

    blocks: dict[tuple[int, str, int], BlockMultiset] = field(default_factory=dict)
    # The same sets by (group, tier), largest entry size (the full blocks) first.
    by_group: dict[tuple[int, str], list[tuple[int, BlockMultiset]]] = field(default_factory=dict)
    whole: bool = False
    why_not_whole: str = "no batch read yet"
    # Events refused or not understood, by reason (published as the stream's error counter).
    skipped: Counter[str] = field(default_factory=Counter)

    def start_over(self, whole: bool, why: str = "") -> None:
        """The engine's cache is empty (a restart, AllBlocksCleared), or unknown from here."""
        self.blocks.clear()
        self.by_group.clear()
        self.whole = whole
        self.why_not_whole = "" if whole else why

    def lose(self, why: str) -> None:
        """Batches were lost: what is resident is no longer known."""
        if self.whole:
            self.whole = False
            self.why_not_whole = why

    def apply(self, batch: Batch) -> None:
        for event in batch.events:
            if isinstance(event, Stored):
                self._stored(event)
            elif isinstance(event, Removed):
                self._removed(event)
            elif isinstance(event, Cleared):
                self.start_over(whole=True)
            elif isinstance(event, Unknown):
                # A newer engine's event may move blocks in or out: the count is not known.
                self.skipped["unknown_event"] += 1
                self.lose(f"an event this exporter does not know ({event.type!r})")

    def _known_tier(self, tier: str | None) -> bool:
        if tier is None:
            self.skipped["unknown_medium"] += 1
            return False
        return True

    def _stored(self, event: Stored) -> None:
        if not 0 < event.block_size <= MAX_BLOCK_SIZE:
            self.skipped["invalid_event"] += 1
            self.lose(f"a BlockStored event with block_size {event.block_size}")
            return
        if not self._known_tier(event.tier):
            return
        assert event.tier is not None
        key = (event.group, event.tier, event.block_size)
        found = self.blocks.get(key)
        if found is None:
            if len(self.blocks) >= MAX_SETS or not 0 <= event.group < MAX_GROUPS:
                self.skipped["too_many_groups"] += 1
                self.lose(f"KV group {event.group} is past the {MAX_GROUPS} groups kept")
                return
            found = self.blocks[key] = BlockMultiset()
            sets = self.by_group.setdefault((event.group, event.tier), [])
            sets.append((event.block_size, found))
            sets.sort(key=lambda entry: -entry[0])
        found.add_many(event.fingerprints)

    def _removed(self, event: Removed) -> None:
        if not self._known_tier(event.tier):
            return
        assert event.tier is not None
        # Removals do not say the entry's size: the group's sets, largest (full) first.
        sets = self.by_group.get((event.group, event.tier), [])
        if len(sets) == 1:  # the common case: no partial entries
            remove = sets[0][1].remove
            for fp in event.fingerprints:
                if not remove(fp) and self.whole:
                    self.skipped["unknown_block"] += 1
                    self.lose("a block was removed that the stream never stored")
            return
        for fp in event.fingerprints:
            if not any(found.remove(fp) for _, found in sets) and self.whole:
                self.skipped["unknown_block"] += 1
                self.lose("a block was removed that the stream never stored")

    def cached_blocks(self) -> dict[str, tuple[int, int]]:
        """Per tier, (fewest, most) blocks the cache entries can be: equal unless partial
        entries (smaller than their group's blocks) may share a block with a full one."""
        full_size = self._full_sizes()
        found: dict[str, tuple[int, int]] = {}
        for (group, tier, size), entries in self.blocks.items():
            low, high = found.get(tier, (0, 0))
            full = size == full_size[(group, tier)]
            found[tier] = (low + (entries.size if full else 0), high + entries.size)
        return found

    def resident_slots(self) -> dict[str, int]:
        """Slots (blocks x block size) holding resident prefix blocks, by tier, where that is
        exact (no partial entries); the device tier always when exact (every engine has one:
        none resident there is an exact 0)."""
        full_size = self._full_sizes()
        slots: dict[str, int] = {"device": 0}
        inexact = set()
        for (group, tier, size), entries in self.blocks.items():
            if size != full_size[(group, tier)] and entries.size:
                inexact.add(tier)
            slots[tier] = slots.get(tier, 0) + entries.size * size
        return {tier: n for tier, n in slots.items() if tier not in inexact}

    def _full_sizes(self) -> dict[tuple[int, str], int]:
        """Each (group, tier)'s block size: its largest entries are full blocks."""
        return {key: sets[0][0] for key, sets in self.by_group.items()}

    def resident_blocks(self) -> int:
        return sum(found.size for found in self.blocks.values())

    def nbytes(self) -> int:
        return sum(found.nbytes() for found in self.blocks.values())

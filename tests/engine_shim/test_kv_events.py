"""KV event streams without sockets: decoding, resident blocks, sequence bookkeeping, bounds.

Batches are built as the engines encode them: tagged maps (vLLM since PR 42892, SGLang) and
positional arrays (older vLLM), field order as the engines declare it. SGLang's own classes
are used in ``tests/engine_classes``; vLLM's own publisher in ``tests/vllm_live``.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.snapshots import canned_snapshot
from engine_shim.events.decode import (
    Cleared,
    EventDecodeError,
    Removed,
    Stored,
    Unknown,
    decode_batch,
    decode_batch_by_event,
    fingerprint,
)
from engine_shim.events.merge import evictable_bounds, with_stream
from engine_shim.events.residency import BlockMultiset, Residency
from engine_shim.events.stream import STREAM_ERRORS, EventStreamState
from kvstats.snapshot import Pool
from kvstats.validate import parse_snapshot

encode = msgspec.msgpack.encode


def stored_map(
    hashes: list[Any], medium: str | None = "GPU", group: int = 0, size: int = 16
) -> dict[str, Any]:
    """vLLM 0.32's BlockStored as a tagged map, every field it sends."""
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": list(range(size * len(hashes))),
        "block_size": size,
        "lora_id": None,
        "medium": medium,
        "lora_name": None,
        "extra_keys": [None] * len(hashes),
        "group_idx": group,
        "kv_cache_spec_kind": "full_attention",
    }


def stored_array(hashes: list[Any], medium: str | None = "GPU", size: int = 16) -> list[Any]:
    """Older vLLM's positional BlockStored: [tag, block_hashes, parent, token_ids, block_size,
    lora_id, medium]."""
    return ["BlockStored", hashes, None, list(range(size * len(hashes))), size, None, medium]


def removed_map(hashes: list[Any], medium: str | None = "GPU", group: int = 0) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium, "group_idx": group}


def batch(*events: Any, rank: int | None = 0) -> bytes:
    return encode([1.5, list(events), rank])


# ------------------------------------------------------------------------------ decoding


def test_both_vllm_encodings_decode_alike() -> None:
    maps = decode_batch(batch(stored_map([1, 2]), removed_map([1]), {"type": "AllBlocksCleared"}))
    arrays = decode_batch(
        batch(stored_array([1, 2]), ["BlockRemoved", [1], "GPU"], ["AllBlocksCleared"])
    )
    assert (
        maps.events
        == arrays.events
        == [
            Stored([1, 2], "device", 0, 16),
            Removed([1], "device", 0),
            Cleared(),
        ]
    )
    assert maps.ts == 1.5 and maps.dp_rank == 0


@pytest.mark.parametrize(
    ("medium", "tier"),
    [
        ("GPU", "device"),
        (None, "device"),
        ("CPU", "host"),
        ("CPU_PINNED", "host"),
        ("STORAGE", "storage"),
        ("DISK", "storage"),
        ("EXTERNAL", "external"),
        ("HOLOGRAM", None),
    ],
)
def test_every_medium_the_engines_name_has_a_tier(medium: str | None, tier: str | None) -> None:
    (event,) = decode_batch(batch(stored_map([7], medium))).events
    assert isinstance(event, Stored) and event.tier == tier


def test_hashes_become_64_bit_fingerprints() -> None:
    sha = bytes(range(32))
    signed = -(2**63)  # SGLang publishes signed int64 hashes
    (event,) = decode_batch(batch(stored_map([2**64 - 1, signed, sha]))).events
    assert isinstance(event, Stored)
    assert event.fingerprints == [2**64 - 1, 2**63, int.from_bytes(sha[:8], "big")]
    assert fingerprint(sha) == event.fingerprints[2]


hashes = st.lists(
    st.one_of(st.integers(-(2**63), 2**64 - 1), st.binary(min_size=8, max_size=40)),
    min_size=1,
    max_size=5,
)
events = st.one_of(
    st.builds(
        stored_map,
        hashes,
        st.sampled_from(["GPU", "CPU", "CPU_PINNED", "DISK", None, "HBM9"]),
        st.integers(0, 3),
        st.integers(1, 64),
    ),
    st.builds(stored_array, hashes, st.sampled_from(["GPU", "CPU", None]), st.integers(1, 64)),
    st.builds(removed_map, hashes, st.sampled_from(["GPU", "STORAGE", None]), st.integers(0, 3)),
    st.just({"type": "AllBlocksCleared"}),
    st.just(["AllBlocksCleared"]),
    st.just({"type": "BlockPinned", "block_hashes": [1]}),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=8), st.one_of(st.none(), st.integers(0, 7)))
def test_the_one_pass_decoder_equals_the_event_by_event_one(
    batch_events: list[Any], rank: int | None
) -> None:
    payload = batch(*batch_events, rank=rank)
    assert decode_batch(payload) == decode_batch_by_event(payload)


def test_an_event_type_from_the_future_is_skipped_not_fatal() -> None:
    decoded = decode_batch(
        batch({"type": "BlockPinned", "block_hashes": [1]}, ["BlockMoved", [2]], stored_map([3]))
    )
    assert decoded.events[:2] == [Unknown("BlockPinned"), Unknown("BlockMoved")]
    assert isinstance(decoded.events[2], Stored)
    state = EventStreamState()
    take_live(state, 0, batch(stored_map([3]), {"type": "BlockPinned", "block_hashes": [1]}))
    report = state.report()
    assert report.errors["unknown_event"] == 1 and report.events == 2
    assert not report.whole and "'BlockPinned'" in report.why_not_whole


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "invalid_batch"),
        (b"\xc1garbage", "invalid_batch"),
        (encode({"ts": 1}), "invalid_batch"),
        (encode([1.0, "not a list", 0]), "invalid_batch"),
        (encode([1.0, [{"type": "BlockStored", "block_hashes": "x"}], 0]), "invalid_event"),
        (encode([1.0, [{"type": "BlockRemoved"}], 0]), "invalid_event"),
        (encode([1.0, [{"no": "type"}], 0]), "invalid_event"),
        (encode([1.0, [42], 0]), "invalid_event"),
        (encode([1.0, [["BlockStored", [1.5]]], 0]), "invalid_event"),
    ],
)
def test_garbage_is_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode_batch(payload)
    assert caught.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_no_bytes_crash_the_decoder(payload: bytes) -> None:
    try:
        decode_batch(payload)
    except EventDecodeError as exc:
        assert exc.reason in STREAM_ERRORS


# ------------------------------------------------------------------------ the multiset


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), max_size=400))
def test_the_multiset_agrees_with_counter(ops: list[tuple[int, int]]) -> None:
    """``BlockMultiset`` does ``collections.Counter``'s job in 8 bytes a block: same answers."""
    ours, library = BlockMultiset(), Counter[int]()
    for kind, small in ops:
        fp = (small * 0x9E3779B97F4A7C15) & (2**64 - 1)  # spread over 64 bits, some repeats
        if kind == 1:
            ours.add(fp)
            library[fp] += 1
        elif kind == 2:  # a batch: this one, and the next 199 (past a growth of the table)
            batch = [(fp + i * 0x9E3779B97F4A7C15) & (2**64 - 1) for i in range(200)]
            ours.add_many(batch)
            library.update(batch)
        else:
            assert ours.remove(fp) == (library[fp] > 0)
            if library[fp]:
                library[fp] -= 1
        assert ours.size == library.total()
    assert ours.items() == +library


def test_the_multiset_grows_and_finds_entries_only_at_their_own_offset() -> None:
    ours = BlockMultiset()
    rng = random.Random(1)
    values = [rng.getrandbits(64) for _ in range(20_000)]
    for v in values:
        ours.add(v)
    assert ours.size == 20_000 and ours.nbytes() == 160_000
    # A key that appears only straddling two stored entries is not in the set.
    ours2 = BlockMultiset()
    ours2.add(int.from_bytes(b"\x00" * 4 + b"ABCD", "little"))
    ours2.add(int.from_bytes(b"EFGH" + b"\x00" * 4, "little"))
    straddling = int.from_bytes(b"ABCDEFGH", "little")
    assert not ours2.remove(straddling) and ours2.size == 2
    for v in values:
        assert ours.remove(v)
    assert ours.size == 0


# ---------------------------------------------------------------------- residency


def test_a_hash_stored_twice_stays_until_removed_twice() -> None:
    """Two blocks for one prefix (a hybrid model's miss computes it again): vLLM's map holds
    both, and removes them one at a time."""
    residency = Residency(whole=True)
    residency.apply(decode_batch(batch(stored_map([1, 2]), stored_map([1, 2]))))
    residency.apply(decode_batch(batch(removed_map([1]))))
    assert residency.resident_slots() == {"device": 3 * 16}
    assert residency.whole


def test_groups_and_tiers_are_kept_apart() -> None:
    residency = Residency(whole=True)
    residency.apply(
        decode_batch(
            batch(
                stored_map([1, 2, 3], group=0),
                stored_map([1], group=1),
                stored_map([1, 2], medium="CPU"),
                stored_map([9], medium="DISK", size=64),
            )
        )
    )
    residency.apply(decode_batch(batch(removed_map([1], group=1), removed_map([2], "CPU"))))
    assert residency.resident_slots() == {"device": 48, "host": 16, "storage": 64}


def test_partial_entries_leave_the_block_count_between_full_and_all_entries() -> None:
    """vLLM's hybrid models in align mode cache a prompt's tail as a partial entry (a
    BlockStored with fewer tokens than a block), possibly on a block that holds a full one:
    the count is a range and no exact resident figure is published until they are gone."""
    state = EventStreamState()
    take_live(state, 0, batch(stored_map([1, 2], size=64), stored_map([3], size=32)))
    report = state.report()
    assert report.whole and report.cached_blocks == {"device": (2, 3)}
    assert report.resident_slots == {}
    take_live(state, 1, batch(removed_map([3])))  # a removal does not say the size
    report = state.report()
    assert report.cached_blocks == {"device": (2, 2)} and report.resident_slots == {"device": 128}
    assert sum(report.errors.values()) == 0


def test_removing_what_was_never_stored_breaks_wholeness() -> None:
    residency = Residency(whole=True)
    residency.apply(decode_batch(batch(removed_map([5]))))
    assert not residency.whole and residency.skipped["unknown_block"] == 1
    residency.apply(decode_batch(batch({"type": "AllBlocksCleared"}, stored_map([1]))))
    assert residency.whole and residency.resident_slots() == {"device": 16}


def test_a_hostile_group_count_is_bounded() -> None:
    residency = Residency(whole=True)
    residency.apply(decode_batch(batch(*(stored_map([1], group=g) for g in range(100)))))
    assert len(residency.blocks) == 64
    assert residency.skipped["too_many_groups"] == 36 and not residency.whole


# ------------------------------------------------------------------ sequence numbers


def take_live(state: EventStreamState, seq: int, payload: bytes, now: float = 10.0) -> int | None:
    """What the subscriber does with a live batch when no replay is available."""
    missing = state.before_live(seq)
    state.settle(seq)
    state.take(seq, payload, now)
    return missing


def test_a_stream_read_from_its_start_is_whole() -> None:
    state = EventStreamState()
    assert take_live(state, 0, batch(stored_map([1]))) is None
    assert take_live(state, 1, batch(stored_map([2]))) is None
    report = state.report()
    assert report.whole and report.resident_slots == {"device": 32}
    assert (report.batches, report.events, report.lost_batches) == (2, 2, 0)


def test_joining_late_without_replay_is_not_whole_and_not_a_loss() -> None:
    state = EventStreamState()
    assert take_live(state, 500, batch(stored_map([1]))) == 0  # the subscriber asks for 0..
    report = state.report()
    assert not report.whole and report.resident_slots == {}
    assert "joined the stream at batch 500" in report.why_not_whole
    assert report.lost_batches == 0  # published before we subscribed: not lost by us


def test_joining_late_with_a_full_replay_is_whole() -> None:
    state = EventStreamState()
    missing = state.before_live(3)
    assert missing == 0
    for seq in range(3):  # the replay socket's answer
        state.take(seq, batch(stored_map([seq])), 5.0, replayed=True)
    state.settle(3)
    state.take(3, batch(stored_map([3])), 6.0)
    report = state.report()
    assert report.whole and report.resident_slots == {"device": 64}
    assert report.replayed_batches == 3 and report.lost_batches == 0


def test_a_gap_is_lost_until_all_blocks_cleared() -> None:
    state = EventStreamState()
    take_live(state, 0, batch(stored_map([1])))
    assert take_live(state, 5, batch(stored_map([2]))) == 1
    report = state.report()
    assert report.lost_batches == 4 and not report.whole
    assert "4 batches lost before batch 5" in report.why_not_whole
    take_live(state, 6, batch({"type": "AllBlocksCleared"}, stored_map([7])))
    report = state.report()
    assert report.whole and report.resident_slots == {"device": 16} and report.lost_batches == 4


def test_a_restart_at_zero_starts_whole_and_a_late_one_does_not() -> None:
    state = EventStreamState()
    for seq in range(10):
        take_live(state, seq, batch(stored_map([seq])))
    take_live(state, 0, batch(stored_map([100])))  # the engine restarted: an empty cache
    report = state.report()
    assert report.whole and report.resident_slots == {"device": 16}
    for seq in range(1, 10):
        take_live(state, seq, batch())
    assert take_live(state, 3, batch(stored_map([1]))) == 0  # back, but not to 0
    report = state.report()
    assert not report.whole and report.errors["seq_backwards"] == 1 and report.lost_batches == 0


def test_live_batches_the_replay_already_brought_are_skipped_not_backwards() -> None:
    state = EventStreamState()
    assert state.before_live(4) == 0
    for seq in range(6):  # the replay came back with 0..5 (5 was published meanwhile)
        state.take(seq, batch(stored_map([seq])), 1.0, replayed=True)
    state.settle(4)
    for seq in (4, 5):  # queued on the SUB socket while replaying
        assert state.before_live(seq) is None
        state.take(seq, batch(stored_map([seq])), 2.0)
    take_live(state, 6, batch(stored_map([6])))
    report = state.report()
    assert report.whole and report.resident_slots == {"device": 7 * 16}
    assert report.errors["seq_backwards"] == 0 and report.batches == 7


def test_an_empty_replay_before_any_batch_means_nothing_was_published() -> None:
    state = EventStreamState()
    assert not state.report().whole
    state.nothing_published()
    report = state.report()
    assert report.whole and report.resident_slots == {"device": 0} and report.batches == 0
    take_live(state, 0, batch(stored_map([1])))
    assert state.report().resident_slots == {"device": 16}


def test_replayed_batches_already_applied_are_ignored() -> None:
    state = EventStreamState()
    for seq in range(3):
        take_live(state, seq, batch(stored_map([seq])))
    state.take(1, batch(stored_map([1])), 1.0, replayed=True)
    assert state.report().resident_slots == {"device": 48}


def test_refused_batches_are_counted_and_break_wholeness() -> None:
    state = EventStreamState(max_batch_bytes=1000)
    take_live(state, 0, batch(stored_map([1])))
    take_live(state, 1, batch(stored_map(list(range(100)))))
    take_live(state, 2, b"\xc1")
    report = state.report()
    assert report.errors["oversize"] == 1 and report.errors["invalid_batch"] == 1
    assert not report.whole and report.batches == 3


# --------------------------------------------------------------------------- bounds


def bridge_pool(capacity_blocks: int, used_blocks: int, block: int = 16) -> Pool:
    return Pool("full", block, capacity_blocks * block, used_blocks * block, None, None)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 200), st.data())
def test_bounds_contain_every_evictable_count_the_pool_allows(capacity: int, data: Any) -> None:
    """Any pool state (used U, cached-and-used k, evictable E) gives C = k + E cached blocks;
    the bounds from C and U always contain E."""
    used = data.draw(st.integers(0, capacity))
    cached_in_use = data.draw(st.integers(0, used))
    evictable = data.draw(st.integers(0, capacity - used))
    pool = bridge_pool(capacity, used)
    bounds = evictable_bounds(cached_in_use + evictable, pool)
    assert bounds is not None
    lower, upper = bounds
    assert lower <= evictable * 16 <= upper <= pool.capacity_slots - pool.used_slots


def test_a_stream_with_more_cached_blocks_than_the_pool_gives_no_bounds() -> None:
    assert evictable_bounds(101, bridge_pool(100, 10)) is None
    assert evictable_bounds(100, bridge_pool(100, 10)) == (90 * 16, 90 * 16)


def test_a_whole_stream_adds_resident_slots_and_bounds_to_a_bridge_snapshot() -> None:
    state = EventStreamState()
    take_live(state, 0, batch(stored_map(list(range(30))), stored_map([1, 2], "CPU_PINNED")))
    data = canned_snapshot()
    data["pools"] = [data["pools"][0]]
    data["groups"] = [g for g in data["groups"] if g["pool"] == "full"]
    pool = data["pools"][0]
    pool.update(evictable_slots=None, available_slots=None)
    snap = parse_snapshot(data)
    merged = with_stream(snap, state.report())
    used_blocks = pool["used_slots"] // pool["block_size"]
    assert merged.prefix_resident_slots == {"device": 30 * 16, "host": 2 * 16}
    bounded = merged.pools[0]
    assert bounded.evictable_slots_lower == max(0, 30 - used_blocks) * pool["block_size"]
    assert parse_snapshot(merged.to_json()) == merged  # within the schema's rules
    # Not whole: nothing is added.
    take_live(state, 9, batch())
    assert with_stream(snap, state.report()) == snap


def test_the_shims_exact_figures_win_over_the_stream() -> None:
    state = EventStreamState()
    take_live(state, 0, batch(stored_map([1, 2]), stored_map([3], "CPU")))
    data = canned_snapshot()
    data["prefix_resident_slots"] = {"device": 999}
    snap = parse_snapshot(data)
    merged = with_stream(snap, state.report())
    assert merged.prefix_resident_slots == {"device": 999, "host": 16}
    assert merged.pools == snap.pools  # exact evictable known: no bounds

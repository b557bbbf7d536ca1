"""Reuse distances: the tracker against an exact computation and against a real LRU prefix cache.

The oracles are written here from the definitions, not taken from the code under test:
- ``ExactDistances``: the distance of a block is the pinned tokens plus one block per distinct
  block released after it (plus itself), by a linear scan over every block ever released;
- ``measured_hit_ratio``: the reference engine's own prefix cache (LRU by release time, leaves
  first) of a given size, fed the same requests, counting the tokens it really hits.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import math
import random
import statistics
from collections.abc import Hashable

import pytest
import torch

from devtools.reuse_traces import block_keys, curve_errors, hot_prefix_trace, replay_concurrently
from engine_shim.reference import ModelShape
from engine_shim.reference.pool import BlockPool
from engine_shim.reference.prefix_cache import PrefixCache
from engine_shim.reuse_distance import RecencyOrder, ReuseDistanceTracker, bucket_bounds
from kvstats.reuse import size_for_hit_ratio, working_set
from kvstats.snapshot import ReuseDistances, SnapshotError
from kvstats.validate import parse_snapshot
from tests.builders import valid

BS = 4


class ExactDistances:
    """The definition, by brute force: every release time kept, every rank counted."""

    def __init__(self) -> None:
        self.released: dict[Hashable, int] = {}
        self.held: set[Hashable] = set()
        self.clock = 0

    def pinned(self, key: Hashable) -> None:
        self.released.pop(key, None)
        self.held.add(key)

    def release(self, key: Hashable) -> None:
        self.held.discard(key)
        self.clock += 1
        self.released[key] = self.clock

    def distance(self, key: Hashable, pinned_tokens: int) -> float:
        if key in self.held:
            return float(BS)
        if key not in self.released:
            return math.inf
        t = self.released[key]
        newer = sum(1 for other in self.released.values() if other > t)
        return float(pinned_tokens + BS * (1 + newer))


def bucket_of(tracker: ReuseDistanceTracker, distance: float) -> int:
    """The bucket a distance belongs in, from the bounds (cold: one past the last)."""
    if distance == math.inf:
        return len(tracker.bounds) + 1
    return bisect.bisect_left(tracker.bounds, distance)


def chains(prompt: list[int]) -> list[tuple[int, ...]]:
    """Block keys of a prompt's cacheable full blocks: the whole prefix up to each block."""
    cacheable = len(prompt) - 1
    return [tuple(prompt[: (i + 1) * BS]) for i in range(cacheable // BS)]


def trace(seed: int, n: int, prefixes: int = 6) -> list[list[int]]:
    """Requests sharing a few prefixes of different popularity, with unique tails."""
    rng = random.Random(seed)
    shared = [
        [rng.randrange(1000) for _ in range(rng.choice((8, 16, 40)))] for _ in range(prefixes)
    ]
    out = []
    for _ in range(n):
        head = shared[min(int(rng.expovariate(0.6)), prefixes - 1)]
        tail = [rng.randrange(1000) for _ in range(rng.randrange(1, 14))]
        out.append(head + tail)
    return out


@pytest.mark.parametrize("keys", [40, 3000])
def test_recency_order_counts_newer_releases_through_renumbering(keys: int) -> None:
    """Single and batched removals and releases, against the definition; 3,000 keys spread
    the times over many tombstone chunks, and renumbering happens every few releases."""
    order = RecencyOrder(capacity=4)
    exact = ExactDistances()
    rng = random.Random(3)
    for step in range(4000):
        batch = rng.sample(range(keys), rng.choice((1, 1, 2, 7, 40)))
        if len(batch) > 2 and rng.random() < 0.1:
            batch.insert(rng.randrange(len(batch)), batch[-1])  # a key given twice
        pin = rng.random() < 0.2
        if len(batch) == 1:
            (order.remove if pin else order.release)(batch[0])
        else:
            (order.remove_all if pin else order.release_all)(batch)
        for key in batch:
            exact.pinned(key) if pin else exact.release(key)
        for probe in rng.sample(range(keys), 3):
            if probe in exact.released:
                want = (exact.distance(probe, 0) - BS) / BS
                assert order.newer_than(probe) == want, step
            assert (probe in order) == (probe in exact.released)
    assert len(order) == len(exact.released)
    assert order.snapshot_keys() == sorted(exact.released, key=exact.released.__getitem__)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_unsampled_distances_equal_the_definition(seed: int, batched: bool) -> None:
    """Events one block at a time (the vLLM adapter) or a request's blocks in one call (the
    reference engine): the same distances, the definition's."""
    rng = random.Random(seed)
    tracker = ReuseDistanceTracker(BS, pool_tokens=64, max_tracked=10**9)
    exact = ExactDistances()
    running: list[list[tuple[int, ...]]] = []
    pinned_tokens = 0
    for prompt in trace(seed, 150):
        keys = chains(prompt)
        got = tracker.distances(keys, pinned_tokens)
        want = [exact.distance(k, pinned_tokens) for k in keys]
        assert got == want
        assert all(a <= b for a, b in itertools.pairwise(got)), "distances along a prompt"
        observed = tracker.observe(keys, pinned_tokens)  # by bisection: the same buckets
        assert sorted(b for b, n, _, _ in observed.parts for _ in range(n)) == [
            bucket_of(tracker, d) for d in want
        ]
        tracker.record(len(prompt), observed)
        if batched:
            tracker.pinned_all([k for k in keys if not any(k in other for other in running)])
        else:
            for k in keys:
                tracker.pinned(k)
        for k in keys:
            exact.pinned(k)
        running.append(keys)
        pinned_tokens += len(keys) * BS
        while running and (len(running) > 3 or rng.random() < 0.5):
            done = running.pop(rng.randrange(len(running)))
            pinned_tokens -= len(done) * BS
            # leaf first, as the engines release; blocks other requests hold stay held
            idle = [k for k in reversed(done) if not any(k in other for other in running)]
            if batched:
                tracker.released_all(idle)
            for k in idle:
                exact.release(k)
                if not batched:
                    tracker.released(k)


def test_keys_out_of_the_engines_order_are_bucketed_one_by_one() -> None:
    """Held and idle blocks after a cold one (not the engines' order): still each block's own
    bucket, as its distance says."""
    tracker = ReuseDistanceTracker(BS, pool_tokens=16, max_tracked=10**9)
    idle = [("idle", i) for i in range(40)]
    tracker.released_all(idle)
    tracker.pinned(("held", 0))
    keys = [idle[39], idle[30], ("cold", 0), idle[38], ("held", 0), idle[0], ("cold", 1)]
    buckets = sorted(b for b, n, _, _ in tracker.observe(keys, 8).parts for _ in range(n))
    want = [bucket_of(tracker, d) for d in tracker.distances(keys, 8)]
    assert buckets == sorted(want)
    assert want.count(len(tracker.bounds) + 1) == 2 and len(set(want)) >= 4


def lru_replay(prompts: list[list[int]], pool_blocks: int) -> tuple[int, int]:
    """(hit tokens, query tokens) of the reference engine's prefix cache of this size."""
    shape = ModelShape(num_layers=1, num_kv_heads=1, head_dim=2, vocab_size=1000)
    cache = PrefixCache(BlockPool("full", shape, 1, pool_blocks, BS, torch.device("cpu")))
    hits = queries = 0
    for prompt in prompts:
        cacheable = prompt[: len(prompt) - 1]
        path = cache.match(cacheable)
        for node in path:
            cache.pin(node)
        hits += len(path) * BS
        queries += len(prompt)
        parent = path[-1] if path else cache.root
        for i in range(len(path), len(cacheable) // BS):
            block = cache.allocate()
            if block is None:
                break
            inserted = cache.insert(parent, tuple(cacheable[i * BS : (i + 1) * BS]), block)
            assert inserted is not None
            path.append(inserted)
            parent = inserted
        for node in reversed(path):  # leaf first
            cache.unpin(node)
    return hits, queries


@pytest.mark.parametrize("seed", range(4))
def test_the_histogram_predicts_a_real_lru_cache_exactly_without_sampling(seed: int) -> None:
    """One request at a time (nothing pinned at lookups): the curve is exact at every bound."""
    prompts = trace(seed, 400)
    tracker = ReuseDistanceTracker(BS, pool_tokens=64, max_tracked=10**9)
    for prompt in prompts:
        keys = chains(prompt)
        tracker.lookup(keys, len(prompt), pinned_tokens=0)
        for k in keys:
            tracker.pinned(k)
        for k in reversed(keys):
            tracker.released(k)
    hist = tracker.histogram()
    assert hist.sampling_rate == 1.0 and hist.query_tokens == sum(map(len, prompts))
    for bound, cumulative in zip(hist.bounds_tokens, hist.cumulative_tokens, strict=True):
        if bound % BS:
            continue  # a real pool holds whole blocks
        hits, queries = lru_replay(prompts, bound // BS)
        assert queries == hist.query_tokens
        assert cumulative == hits, f"{bound} tokens"


def sampled_vs_exact(seed: int, max_tracked: int) -> tuple[list[float], float]:
    """Signed errors per bound (sampled - exact, as shares of lookups); the sampling rate."""
    rng = random.Random(seed)
    shared = [[rng.randrange(10**6) for _ in range(64)] for _ in range(6000)]
    zipf = [1 / (i + 1) ** 0.8 for i in range(6000)]  # Zipf-like popularity of 6,000 prefixes
    exact = ReuseDistanceTracker(BS, pool_tokens=8192, max_tracked=10**9)
    sampled = ReuseDistanceTracker(BS, pool_tokens=8192, max_tracked=max_tracked)
    for _ in range(12000):
        prompt = rng.choices(shared, zipf)[0] + [rng.randrange(10**6) for _ in range(9)]
        keys = block_keys(prompt, BS)
        for t in (exact, sampled):
            t.lookup(keys, len(prompt), 0)
            for k in keys:
                t.pinned(k)
            for k in reversed(keys):
                t.released(k)
        assert sampled.tracked <= max_tracked
    assert exact.rate == 1
    e, s = exact.histogram(), sampled.histogram()
    errors = [
        (b - a) / e.query_tokens
        for a, b in zip(e.cumulative_tokens, s.cumulative_tokens, strict=True)
    ]
    return errors, sampled.rate


def test_batched_events_sample_and_bound_memory_as_single_ones() -> None:
    """A request's blocks told in one call: the same sampling, memory bound (the threshold
    lowered mid-batch) and histogram as the same events one by one."""
    rng = random.Random(5)
    shared = [[rng.randrange(10**6) for _ in range(64)] for _ in range(300)]
    single, batched = (ReuseDistanceTracker(BS, pool_tokens=512, max_tracked=600) for _ in "ab")
    for _ in range(1500):
        prompt = rng.choice(shared) + [rng.randrange(10**6) for _ in range(9)]
        keys = block_keys(prompt, BS)
        for t in (single, batched):
            t.lookup(keys, len(prompt), 0)
        for k in keys:
            single.pinned(k)
        batched.pinned_all(keys)
        for k in reversed(keys):
            single.released(k)
        batched.released_all(keys[::-1])
        assert (batched.rate, batched.tracked) == (single.rate, single.tracked)
        assert batched.tracked <= 600
    assert single.rate < 1 / 4  # the bound was hit, and the threshold lowered, several times
    assert batched.histogram() == single.histogram()


def test_sampling_keeps_memory_bounded_and_is_unbiased() -> None:
    """Fixed-size SHARDS at 1/8-1/16: memory stays under the limit, and averaged over six
    traces the error shrinks (Horvitz-Thompson weights are unbiased; the per-prompt weighting
    tried first was off by 0.5 here). With spatial sampling alone one trace's error was set by
    how many blocks of its few hottest prefixes happened to be sampled (up to 0.13 measured);
    with those tracked in full (hot blocks), 0.0074."""
    runs = [sampled_vs_exact(seed, max_tracked=32000) for seed in range(6)]
    assert all(rate <= 1 / 8 for _, rate in runs), [rate for _, rate in runs]
    mean = [statistics.fmean(errors[i] for errors, _ in runs) for i in range(len(runs[0][0]))]
    worst_single = max(abs(x) for errors, _ in runs for x in errors)
    print(f"mean error max {max(map(abs, mean)):.4f}, single traces max {worst_single:.4f}")
    assert max(map(abs, mean)) < 0.01
    assert worst_single < 0.02


@pytest.mark.parametrize("seed", range(4))
def test_the_c_speed_sample_test_is_sample_hash_against_the_threshold(seed: int) -> None:
    """The tracked keys of a prompt are picked by bytes comparisons at C speed: the same keys,
    in the same order, as the definition (sampled by ``sample_hash``, or hot), for digests,
    block ids, short keys and lists that mix them, at any threshold."""
    rng = random.Random(seed)
    tracker = ReuseDistanceTracker(BS, 4096)
    digests = [rng.randbytes(rng.choice((36, 36, 36, 4, 5))) for _ in range(300)]
    others: list[Hashable] = [rng.randrange(10**6) for _ in range(40)]
    others += [rng.randbytes(rng.randrange(4)) for _ in range(10)] + ["text"]
    for rate in (0.9, 0.5, 1 / 3, 1 / 8, 1 / 1000, 0.0):
        tracker.sample_at_most(rate)
        tracker.hot_blocks.clear()
        tracker.hot_blocks.update(dict.fromkeys(rng.sample(digests, 30), 0))
        for keys in (digests, rng.sample(digests, 50) + others[:3], others, digests[:1], []):
            expected = [k for k in keys if tracker.tracks(k)]
            assert list(tracker._sampled_keys(keys)) == expected
            assert tracker.threshold_key is not None
            assert all(
                (k < tracker.threshold_key) == (tracker._sampled(k))
                for k in keys
                if type(k) is bytes and len(k) >= 4
            )


def test_bounds_span_a_sixteenth_to_64_times_the_pool() -> None:
    bounds = bucket_bounds(4096, extra=[4096 + 1000])
    assert bounds[0] == 256 and bounds[-1] == 4096 * 64
    for multiple in (0.25, 0.5, 1, 2, 4):
        assert int(4096 * multiple) in bounds
    assert 5096 in bounds and list(bounds) == sorted(set(bounds))
    with pytest.raises(ValueError):
        bucket_bounds(0)


def test_the_section_round_trips_and_bad_sections_are_refused() -> None:
    tracker = ReuseDistanceTracker(BS, pool_tokens=64)
    tracker.lookup([b"\x00" * 8], 10, 0)
    tracker.released(b"\x00" * 8)
    tracker.lookup([b"\x00" * 8], 10, 8)
    data = valid()
    data["reuse_distance"] = _wire(tracker.histogram())
    snap = parse_snapshot(data)
    assert snap.reuse_distance == tracker.histogram()
    hist = snap.reuse_distance
    assert hist is not None and hist.distance_sum_tokens == 4 * 12  # 8 pinned + 1 block of 4
    assert hist.hit_ratio_at(16) == 4 / 20  # distance 12: in the bucket up to 16 tokens
    assert hist.hit_ratio_at(11) == 0.0
    # A newer section version is skipped, not refused: an older exporter keeps working.
    data["reuse_distance"] = {**_wire(tracker.histogram()), "version": 2}
    assert parse_snapshot(data).reuse_distance is None
    for change, message in (
        ({"sampling_rate": 0}, "sampling_rate"),
        ({"bounds_tokens": [2, 1] + [5] * 19}, "bounds_tokens"),
        ({"cumulative_tokens": [1, 0] + [0] * 19}, "must not decrease"),
        ({"query_tokens": 0, "cumulative_tokens": [0] * 20 + [1]}, "exceeds query_tokens"),
        ({"bounds_tokens": [1]}, "one cumulative count each"),
    ):
        data["reuse_distance"] = {**_wire(tracker.histogram()), **change}
        with pytest.raises(SnapshotError, match=message):
            parse_snapshot(data)


def _wire(hist: ReuseDistances) -> dict[str, object]:
    wire: dict[str, object] = json.loads(json.dumps(dataclasses.asdict(hist)))
    return wire


def test_working_set_is_prometheus_histogram_quantile() -> None:
    """The values promtool computes for alerts/tests/reuse.test.yml (same buckets)."""
    bounds = [250, 500, 1000, 2000, 4000, 64000]
    for cumulative, expected in (
        ([6000, 9000, 12000, 30000, 45000, 48000], 3760.0),
        ([30000, 40000, 45000, 46000, 47000, 48000], 820.0),
        ([3000, 6000, 15000, 16000, 17000, 18000], 2400.0),
        ([0, 0, 0, 0, 0, 10], 4000.0),  # in the largest bucket: its lower bound
        ([10, 10, 10, 10, 10, 10], 225.0),  # within the first bucket, from 0
    ):
        assert working_set(bounds, cumulative, 0.9) == pytest.approx(expected)
    assert working_set(bounds, [0] * 6, 0.9) is None


def test_the_watch_line_and_the_cli_table_read_the_curve() -> None:
    from exporter.exposition import Exposition
    from exporter.reuse_curve import Curve, format_curve
    from exporter.watch import LiveView
    from tests.exposition_fixture import fleet_view

    text = Exposition(fleet_view(), process_metrics=False).render().decode()
    shown: list[str] = []
    LiveView(shown.append).show(text)
    (ref,) = [line for line in shown if " ref/0 " in line]
    # The fixture's curve: bounds 1,861 .. 1,905,664 tokens, +3,000 per bound up to 60,000 of
    # 100,000 looked up. The pool (29,776) is the 9th bound: 27 %; x0.5 the 7th (21 %), x2 the
    # 11th (33 %), x4 the 14th (42 %). 90 % of 60,000 is reached at the 18th, 476,416 = 16.0x.
    assert ref.endswith(
        "if KV (warming up: 0s of 5m, since start, sampled 25%) x0.5 21% x1 27% x2 33% x4 42%,"
        " working set 16.0x"
    )
    curve = Curve("t", [100.0, 200.0, 400.0], [10.0, 30.0, 40.0], 50.0, {"pool": 200.0})
    table = format_curve(curve)
    assert table[0] == "t: 50 prompt tokens looked up"
    assert table[3].split() == ["200", "tokens", "1.00", "60.0%", "<-", "the", "pool"]
    (working,) = [line for line in table if "working set" in line]
    assert working.endswith("200 tokens (1.00x the pool)")  # in the top bucket: its floor


def test_size_for_hit_ratio_is_the_recording_rules_histogram_quantile() -> None:
    """The CLI's answer and the dashboard's (alerts/tests/reuse.test.yml, by promtool) agree on
    the same curves: A and B of that test."""
    bounds = [250.0, 500.0, 1000.0, 2000.0, 4000.0, 64000.0]
    a = [6000.0, 9000.0, 12000.0, 30000.0, 45000.0, 48000.0]
    b = [30000.0, 40000.0, 45000.0, 46000.0, 47000.0, 48000.0]
    assert size_for_hit_ratio(bounds, a, 60000.0, 0.5) == 2000
    assert size_for_hit_ratio(bounds, a, 60000.0, 0.75) == 4000
    assert size_for_hit_ratio(bounds, b, 60000.0, 0.5) == 250
    assert size_for_hit_ratio(bounds, b, 60000.0, 0.75) == 1000
    assert size_for_hit_ratio(bounds, a, 60000.0, 0.9) is None  # above the ceiling (80 %)
    assert size_for_hit_ratio(bounds, a, 0.0, 0.5) is None


def test_the_cli_answers_the_questions_people_ask_of_the_curve() -> None:
    """The ceiling, the KV a hit ratio needs (interpolated as histogram_quantile does, cold
    misses in +Inf), and more GPU KV against a host tier of the same size (same hit ratio in
    the LRU model; the host serves the extra hits)."""
    from exporter.reuse_curve import Curve, format_answers

    curve = Curve(
        "t",
        [100.0, 141.0, 200.0, 283.0, 400.0, 566.0, 800.0],
        [10.0, 20.0, 30.0, 40.0, 55.0, 60.0, 70.0],
        100.0,
        {"pool": 200.0},
        bytes_per_token=2048.0,
    )
    assert format_answers(curve) == [
        "  hit ratio with this pool (200 tokens, 400 KiB): 30.0%",
        "  with unlimited KV (the ceiling, read at 4x the pool): at least 70.0%;"
        " the other 30.0% are first-time prompts (or older)",
        # 50 of 100 lookups: two thirds of the way from 283 (40) to 400 (55)
        "  for a hit ratio of 50%: 361 tokens, 722 KiB (1.80x the pool)",
        "  for a hit ratio of 75%: not reachable (the ceiling is 70.0%)",
        "  for a hit ratio of 90%: not reachable (the ceiling is 70.0%)",
        "                               more KV   as GPU KV            as a host tier",
        "                   +83 tokens, 166 KiB       40.0%   30.0% + 10.0% from host",
        "                  +200 tokens, 400 KiB       55.0%   30.0% + 25.0% from host",
        "                 +600 tokens, 1.17 MiB       70.0%   30.0% + 40.0% from host",
    ]
    unmarked = Curve("t", [100.0], [1.0], 2.0, {})
    assert format_answers(unmarked) == []  # no pool size: nothing to compare with


def _reuse_exposition(buckets: tuple[float, float, float, float], count: float) -> str:
    """One engine whose pool is 100 tokens, its reuse histogram at 50, 100, 200, 400 tokens."""
    labels = 'engine="e",dp_rank="0",model="m"'
    lines = [
        f'kvcache_prefix_reuse_bucket_info{{{labels},mark="pool",bound="100.0"}} 1',
        f"kvcache_prefix_reuse_sampling_ratio{{{labels}}} 0.25",
        "# TYPE kvcache_prefix_reuse_distance_tokens histogram",
    ]
    for bound, value in zip((50.0, 100.0, 200.0, 400.0), buckets, strict=True):
        lines.append(
            f'kvcache_prefix_reuse_distance_tokens_bucket{{{labels},le="{bound}"}} {value}'
        )
    lines.append(f'kvcache_prefix_reuse_distance_tokens_bucket{{{labels},le="+Inf"}} {count}')
    lines.append(f"kvcache_prefix_reuse_distance_tokens_count{{{labels}}} {count}")
    lines.append(f"kvcache_prefix_reuse_distance_tokens_sum{{{labels}}} 0")
    return "\n".join(lines) + "\n"


def test_watch_reads_the_what_if_curve_over_its_window_never_one_refresh() -> None:
    """A few seconds of a sampled histogram is noise: the curve is the engine's lifetime one
    (marked warming up) until a whole window of scrapes exists, then the window's increase."""
    from exporter.watch import LiveView

    now = [0.0]
    shown: list[str] = []
    view = LiveView(shown.append, what_if_window=300, clock=lambda: now[0])

    def line_at(t: float, buckets: tuple[float, float, float, float], count: float) -> str:
        now[0] = t
        shown.clear()
        view.show(_reuse_exposition(buckets, count))
        (line,) = shown
        return line.split(" | ")[-1] if " | " in line else line.split("  ", 1)[1]

    lifetime = line_at(0, (10, 20, 30, 40), 100)
    assert lifetime == (
        "if KV (warming up: 0s of 5m, since start, sampled 25%) x0.5 10% x1 20% x2 30% x4 40%,"
        " working set 2.0x"  # 90 % of the hits at 400 tokens is in the top bucket: its floor
    )
    # A burst two seconds later: one refresh would read 90 % everywhere; the lifetime curve
    # moves a little.
    assert line_at(2, (19, 29, 39, 49), 110).startswith(
        "if KV (warming up: 2s of 5m, since start, sampled 25%) x0.5 17% x1 26% x2 35% x4 45%"
    )
    assert line_at(150, (30, 60, 90, 120), 300).startswith("if KV (warming up: 2.5m of 5m")
    # The window has passed: the increase since the scrape a window ago (t=0).
    assert line_at(300, (110, 220, 330, 440), 1100).startswith(
        "if KV (last 5m, sampled 25%) x0.5 10% x1 20% x2 30% x4 40%"
    )
    # Later, the base moves with the window (the newest scrape at least 5 minutes old: t=150).
    assert line_at(460, (130, 260, 390, 520), 1300).startswith(
        "if KV (last 5.2m, sampled 25%) x0.5 10% x1 20% x2 30% x4 40%"
    )
    assert line_at(760, (130, 260, 390, 520), 1300) == "if KV (last 5m): no lookups"
    # The engine restarted (its counts fell): warming up again, from its new start.
    assert line_at(762, (1, 2, 3, 4), 10).startswith(
        "if KV (warming up: 0s of 5m, since start, sampled 25%) x0.5 10% x1 20%"
    )


@pytest.mark.parametrize("batched", [False, True])
def test_over_its_idle_limit_the_tracker_forgets_the_oldest_released_blocks(batched: bool) -> None:
    """Idle blocks older than the largest bound can only be cold: those are the ones dropped
    (the newest idle blocks are the ones the next lookups find)."""
    tracker = ReuseDistanceTracker(BS, pool_tokens=16, max_tracked=10**9)
    assert tracker.rate == 1.0
    limit = tracker.bounds[-1] // BS + 1  # 1024 tokens of 4-token blocks, and one
    keys = [f"block-{i}" for i in range(limit + 40)]
    if batched:
        for start in range(0, len(keys), 10):
            tracker.released_all(keys[start : start + 10])
    else:
        for key in keys:
            tracker.released(key)
    assert tracker.tracked == limit
    assert not any(tracker.looks_past(key) for key in keys[:40])  # the oldest: cold
    assert all(tracker.looks_past(key) for key in keys[40:])
    # The newest: one block away; the oldest kept: every kept block away.
    assert tracker.distances([keys[-1], keys[40]], pinned_tokens=0) == [BS, BS * limit]


@pytest.mark.parametrize("rate", [1 / 4, 1 / 8])
def test_hot_prefixes_are_tracked_in_full_so_few_of_them_cannot_skew_the_curve(
    rate: float,
) -> None:
    """Where a few prefixes carry most lookups, spatial sampling alone sets the curve by how
    many of their blocks fall under the threshold: here off by up to 0.06-0.2 in one trace.
    Blocks looked up twice are tracked in full (the stratified sample): every trace's curve
    within 0.02 of full tracking at every size, on the same events."""
    worst, worst_spatial = [], []
    for seed in range(6):
        exact = ReuseDistanceTracker(BS, pool_tokens=512, max_tracked=10**9)
        stratified = ReuseDistanceTracker(BS, pool_tokens=512, max_tracked=10**9)
        spatial = ReuseDistanceTracker(BS, pool_tokens=512, max_tracked=10**9, hot_capacity=0)
        for t in (stratified, spatial):
            t.sample_at_most(rate)
        trace = hot_prefix_trace(seed, 1500, BS)
        replay_concurrently([exact, stratified, spatial], trace, BS, seed)
        assert exact.rate == 1 and stratified.rate == spatial.rate == rate
        assert 0 < stratified.hot <= stratified.hot_capacity and spatial.hot == 0
        worst.append(max(map(abs, curve_errors(exact, stratified))))
        worst_spatial.append(max(map(abs, curve_errors(exact, spatial))))
    print(f"1/{1 / rate:g}: stratified worst {max(worst):.4f}, spatial {max(worst_spatial):.4f}")
    assert max(worst) < 0.02, worst
    # The workload is one that defeats spatial sampling alone (else this proves nothing).
    assert max(worst_spatial) > 3 * max(worst), worst_spatial


def test_hot_blocks_stay_within_their_share_of_memory_and_demote_the_least_recent() -> None:
    """Over its hot capacity the tracker demotes the block looked up least recently: a sampled
    one keeps being tracked (standing for 1/rate again), an unsampled one is forgotten and the
    engine told (the vLLM adapter keeps its own set of tracked blocks)."""
    tracker = ReuseDistanceTracker(BS, pool_tokens=64, max_tracked=400, hot_capacity=6)
    tracker.sample_at_most(1 / 2)
    promoted: list[Hashable] = []
    demoted: list[Hashable] = []

    def on_promote(key: Hashable) -> bool:
        promoted.append(key)
        return False

    tracker.on_promote, tracker.on_demote = on_promote, demoted.append
    keys = [hashlib.blake2b(bytes([i]), digest_size=8).digest() for i in range(12)]
    sampled = [tracker.tracks(k) for k in keys]
    assert 0 < sum(sampled) < len(keys)
    for _ in range(2):  # the second lookup makes each key hot
        for k in keys:
            tracker.lookup([k], BS, 0)
            tracker.pinned(k)
            tracker.released(k)
    assert promoted == keys and tracker.hot == 6
    assert demoted == [k for k, s in zip(keys[:6], sampled[:6], strict=True) if not s]
    assert [tracker.tracks(k) for k in keys] == sampled[:6] + [True] * 6
    hot_idle = [k for k in keys[6:] if tracker.looks_past(k)]
    assert len(hot_idle) == 6  # released after promotion: tracked, each counting for itself
    # Behind a block: one block for each hot block released since, 1/rate for each sampled one.
    assert tracker.distances([keys[-1]], 0) == [BS]
    assert tracker.distances([keys[6]], 0) == [BS + 5 * BS]
    demoted_sampled = [k for k, s in zip(keys[:6], sampled[:6], strict=True) if s]
    for i, key in enumerate(demoted_sampled):
        newer_sampled = len(demoted_sampled) - 1 - i
        assert tracker.distances([key], 0) == [BS + 6 * BS + newer_sampled * 2 * BS]
    assert tracker.tracked == 6 + len(demoted_sampled)

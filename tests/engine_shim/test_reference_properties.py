"""Property tests: random request streams against the reference engine, checked every step.

The engine is stepped synchronously (no loop thread) so every intermediate state is checked:
pool states sum to capacity, counters never decrease, the O(1) evictable count equals a
brute-force count over the radix tree, per-request tier hits add up to the counters, and no
request holds more SWA blocks than its group footprint says.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine_shim.reference import EngineConfig, ReferenceEngine, Request
from engine_shim.reference.prefix_cache import ROOT_HASH, Node, block_hash
from engine_shim.reuse_distance import Observation
from kvstats.snapshot import ReuseDistances
from kvstats.validate import parse_snapshot
from tests.engine_shim.test_prefix_cache import cached_nodes

PREFIXES = [[(7 * i + j) % 500 for j in range(40)] for i in range(4)]

request_stream = st.lists(
    st.tuples(
        st.integers(0, len(PREFIXES)),  # a shared prefix to reuse (== len: none)
        st.integers(0, 39),  # how much of it
        st.lists(st.integers(0, 511), min_size=1, max_size=30),  # own suffix
        st.integers(1, 40),  # max_tokens
        st.integers(0, 2),  # steps to run after submitting
    ),
    min_size=1,
    max_size=30,
)


def make_engine(
    base: EngineConfig, tmp: Path, hybrid: bool, tiers: bool, max_running: int
) -> ReferenceEngine:
    shape = base.shape
    if hybrid:
        shape = dataclasses.replace(shape, num_layers=3, swa_layers=1, sliding_window=10)
    config = dataclasses.replace(
        base,
        shape=shape,
        kv_memory_bytes=base.kv_memory_bytes // 2,  # 32 blocks: eviction and preemption are routine
        max_running=max_running,
        host_tier_tokens=64 if tiers else 0,
        storage_dir=tmp if tiers else None,
        storage_tier_tokens=256 if tiers else 0,
    )
    return ReferenceEngine(config)


def chain_hashes(prompt: list[int], bs: int) -> list[bytes]:
    """The identities of a prompt's lookable blocks (all but the last token), by definition."""
    out, parent = [], ROOT_HASH
    for start in range(0, (len(prompt) - 1) // bs * bs, bs):
        parent = block_hash(parent, tuple(prompt[start : start + bs]))
        out.append(parent)
    return out


def observe_whole_prompts(engine: ReferenceEngine) -> None:
    """Check each lookup the engine makes against one over the whole prompt's keys: the engine
    stops hashing at the first cold block, which must change no bucket."""
    telemetry, reuse = engine.telemetry, engine.telemetry.reuse
    original = telemetry.reuse_observation
    cold = len(reuse.bounds) + 1

    def by_bucket(observed: Observation) -> dict[tuple[int, float], int]:
        counts: dict[tuple[int, float], int] = {}
        for bucket, n, _, weight in observed.parts:
            if bucket != cold:
                counts[bucket, weight] = counts.get((bucket, weight), 0) + n
        return counts

    def checked(request: Request, path: list[Node]) -> Observation:
        used, _, _ = engine.kv.pool_counts(engine.full_pool)
        whole = reuse.observe(chain_hashes(request.prompt, engine.config.block_size), used)
        observed = original(request, path)
        assert by_bucket(observed) == by_bucket(whole)
        return observed

    telemetry.reuse_observation = checked  # type: ignore[method-assign]


def check_invariants(
    engine: ReferenceEngine, previous: dict[str, int], finished: list[Request]
) -> dict[str, int]:
    snap = parse_snapshot(engine.snapshot().to_json())  # also proves the published JSON is valid
    for pool in snap.pools:
        assert pool.evictable_slots is not None and pool.available_slots is not None
        assert pool.used_slots + pool.evictable_slots + pool.available_slots == pool.capacity_slots
    full = snap.pool("full")
    assert full is not None
    bs = engine.config.block_size
    nodes = cached_nodes(engine.cache)  # the test's own walk
    unpinned = sum(1 for n in nodes if n.ref == 0)
    assert full.evictable_slots == unpinned * bs
    # Every cached block's identity is its chain hash, however it was inserted (storage-tier
    # files are named by it).
    assert all(n.parent and n.hash == block_hash(n.parent.hash, n.key) for n in nodes)
    # What the reuse-distance tracker was told (one call per request's path) agrees with the
    # cache: held blocks are a hit at any size, idle ones rank by the cache's own release
    # clock; each request's lookup keys are its prompt's chain hashes (node hashes reused).
    far = 10**9  # pinned tokens: tells an idle block (>= far) from a held one (one block)
    reuse = engine.telemetry.reuse
    for n in nodes:
        if n.ref:
            assert reuse.distances([n.hash], far) == [bs]
    idle = sorted((n for n in nodes if not n.ref), key=lambda n: -n.released)
    ranks = reuse.distances([n.hash for n in idle], far)
    assert all(far < a < b for a, b in itertools.pairwise(ranks)), ranks
    for r in [*engine.running, *engine.waiting, *finished]:
        if r.prefix_keys is not None:  # as far as its lookup went
            assert r.prefix_keys == chain_hashes(r.prompt, bs)[: len(r.prefix_keys)]
    # Pinned blocks are exactly the distinct blocks the running requests hold (prefixes shared).
    held = len({b for r in engine.running for b in r.block_table})
    assert full.used_slots == held * bs

    c = snap.counters
    now = {
        "queries": c.prefix_query_tokens or 0,
        "evicted": c.evicted_tokens or 0,
        "preemptions": c.preemptions or 0,
        "iterations": c.iterations or 0,
        **{f"hit_{t}": v for t, v in c.prefix_hit_tokens.items()},
    }
    for key, value in previous.items():
        assert now[key] >= value, f"{key} went backwards: {value} -> {now[key]}"

    # Every admitted request's tier split is what the engine counted, and sums to its cached.
    admitted = {r for r in [*engine.running, *engine.waiting, *finished] if r.admitted_once}
    for tier, total in c.prefix_hit_tokens.items():
        assert total == sum(r.cached_tokens[tier] for r in admitted)
    assert sum(c.prefix_hit_tokens.values()) <= now["queries"]

    swa_group = next((g for g in snap.groups if g.kind == "sliding_window"), None)
    if swa_group is not None:
        for r in engine.running:
            assert sum(1 for b in r.swa_table if b >= 0) <= swa_group.blocks_per_request
    return now


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    stream=request_stream,
    hybrid=st.booleans(),
    tiers=st.booleans(),
    max_running=st.integers(1, 8),
)
def test_invariants_hold_after_every_step(
    small_engine_config: EngineConfig,
    tmp_path_factory: object,
    stream: list[tuple[int, int, list[int], int, int]],
    hybrid: bool,
    tiers: bool,
    max_running: int,
) -> None:
    tmp = tmp_path_factory.mktemp("storage")  # type: ignore[attr-defined]
    engine = make_engine(small_engine_config, tmp, hybrid, tiers, max_running)
    observe_whole_prompts(engine)
    previous: dict[str, int] = {}
    submitted: list[Request] = []
    try:
        for prefix_id, prefix_len, suffix, max_tokens, steps in stream:
            prefix = PREFIXES[prefix_id][:prefix_len] if prefix_id < len(PREFIXES) else []
            prompt = (prefix + suffix)[: engine.config.max_model_len - max_tokens]
            submitted.append(engine.submit(prompt, max_tokens))
            for _ in range(steps):
                engine.step()
                previous = check_invariants(engine, previous, submitted)
        for _ in range(2000):
            if all(r.done.is_set() for r in submitted):
                break
            engine.step()
            previous = check_invariants(engine, previous, submitted)
        assert all(r.done.is_set() for r in submitted), "the engine stalled"
        assert all(len(r.output) == r.max_tokens for r in submitted)
        # Idle: nothing is pinned, everything cached is evictable.
        full = engine.snapshot().pool("full")
        assert full is not None and full.used_slots == 0
        counters = engine.snapshot().counters
        event(f"preempted: {bool(counters.preemptions)}")
        event(f"evicted: {bool(counters.evicted_tokens)}")
        lower = engine.prefix_hit_tokens["host"] + engine.prefix_hit_tokens["storage"]
        event(f"lower-tier hit: {bool(lower)}")
    finally:
        if engine.storage is not None:
            engine.storage.close()


def test_cached_runs_generate_what_cold_runs_generate(
    small_engine_config: EngineConfig, tmp_path: Path
) -> None:
    """K/V read back from the device cache, host DRAM or storage is the K/V that was written."""
    engine = make_engine(small_engine_config, tmp_path, hybrid=True, tiers=True, max_running=4)

    def run(e: ReferenceEngine, prompt: list[int]) -> Request:
        r = e.submit(prompt, 6)
        while not r.done.is_set():
            e.step()
        return r

    try:
        for i in range(12):
            prompt = PREFIXES[i % 4] + [i, i + 1, i + 2]
            # Twice in a row (a device hit), cycling through more prefixes than the pool
            # holds (host and storage hits); each against a fresh engine with no cache.
            for _ in range(2):
                warm = run(engine, prompt)
                cold = run(make_engine(small_engine_config, tmp_path, True, False, 4), prompt)
                assert warm.output == cold.output, warm.cached_tokens
        hits = engine.snapshot().counters.prefix_hit_tokens
        assert hits["device"] > 0 and hits["host"] > 0 and hits["storage"] > 0, hits
    finally:
        assert engine.storage is not None
        engine.storage.close()


def test_a_sampled_lookup_stops_hashing_only_where_the_rest_is_cold(
    small_engine_config: EngineConfig, tmp_path: Path
) -> None:
    """With spatial sampling the engine hashes past unsampled blocks and stops at the first
    sampled block the tracker does not know: the buckets equal a lookup of the whole prompt's
    keys at every admission, while the rate falls as memory fills."""
    engine = make_engine(small_engine_config, tmp_path, hybrid=False, tiers=False, max_running=4)
    reuse = engine.telemetry.reuse
    reuse.max_tracked = 40  # a few requests' blocks: the threshold halves again and again
    observe_whole_prompts(engine)
    rng = random.Random(11)
    shared = [[rng.randrange(512) for _ in range(40)] for _ in range(6)]
    submitted = []
    for _ in range(300):
        prefix = rng.choice(shared)[: rng.randrange(4, 40)]
        tail = [rng.randrange(512) for _ in range(rng.randrange(1, 30))]
        submitted.append(engine.submit(prefix + tail, 2))
        for _ in range(rng.randrange(0, 3)):
            engine.step()
    while not all(r.done.is_set() for r in submitted):
        engine.step()
    hist = engine.snapshot().reuse_distance
    assert hist is not None and hist.sampling_rate <= 1 / 8 and reuse.tracked <= 40
    assert hist.cumulative_tokens[-1] > 0  # sampled hits were counted


def test_sampled_the_engine_tracks_hot_prefixes_in_full(
    small_engine_config: EngineConfig, tmp_path: Path
) -> None:
    """Sampled at 1/4 on requests where three prefixes carry most lookups, the engine's curve
    stays within 0.02 of the same engine tracking every block, request for request; spatial
    sampling alone, on the same requests, reads more than three times as far off (0.32)."""
    full, sampled, spatial = (
        make_engine(small_engine_config, tmp_path, hybrid=False, tiers=False, max_running=4)
        for _ in "abc"
    )
    for engine in (sampled, spatial):
        engine.telemetry.reuse.sample_at_most(1 / 4)
    spatial.telemetry.reuse.hot_capacity = 0
    rng = random.Random(3)
    systems = [[rng.randrange(512) for _ in range(n)] for n in (40, 24, 16)]
    for _ in range(400):
        prompt = rng.choices(systems, (60, 30, 10))[0] + [
            rng.randrange(512) for _ in range(rng.randrange(1, 30))
        ]
        steps = rng.randrange(0, 3)
        for engine in (full, sampled, spatial):
            engine.submit(prompt, 2)
            for _ in range(steps):
                engine.step()
    for engine in (full, sampled, spatial):
        while engine.scheduler.waiting or engine.scheduler.running:
            engine.step()
    a, b = full.snapshot().reuse_distance, sampled.snapshot().reuse_distance
    assert a is not None and b is not None and a.sampling_rate == 1 and b.sampling_rate == 0.25
    assert sampled.telemetry.reuse.hot > 0 and spatial.telemetry.reuse.hot == 0
    c = spatial.snapshot().reuse_distance
    assert c is not None

    def worst(other: ReuseDistances) -> float:
        pairs = zip(a.cumulative_tokens, other.cumulative_tokens, strict=True)
        return max(abs(x - y) for x, y in pairs) / a.query_tokens

    assert worst(b) < 0.02, worst(b)
    assert worst(c) > 3 * worst(b), (worst(b), worst(c))


def test_blocks_made_hot_by_an_admission_count_as_held_while_it_runs(
    small_engine_config: EngineConfig, tmp_path: Path
) -> None:
    """The second lookup of a prompt makes its blocks hot after admission pinned them: held
    (a hit at any size) while the request runs, idle blocks of their own once it is done."""
    engine = make_engine(small_engine_config, tmp_path, hybrid=False, tiers=False, max_running=4)
    reuse = engine.telemetry.reuse
    reuse.sample_at_most(1 / 1024)
    prompt = list(range(41))
    first = engine.submit(prompt, 1)
    while not first.done.is_set():
        engine.step()
    second = engine.submit(prompt, 20)
    engine.step()
    keys = chain_hashes(prompt, engine.config.block_size)
    bs = engine.config.block_size
    assert reuse.hot == len(keys) == 10
    assert reuse.distances(keys, 0) == [float(bs)] * 10
    while not second.done.is_set():
        engine.step()
    after = reuse.distances(keys, 0)
    assert all(bs <= x < float("inf") for x in after) and after == sorted(after)

"""The exporter's arithmetic, by hand: ratios, headroom, exhaustion ETA, restarts, continuity."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics

import pytest

from exporter.config import parse_config
from exporter.derive import (
    CounterContinuity,
    CounterKey,
    PoolRatios,
    UsageTrend,
    concurrency_headroom,
    counter_values,
    engine_capacity_tokens,
    engine_max_concurrency,
    exhaustion_eta,
    is_restart,
    pool_ratios,
)
from exporter.state import TargetState
from kvstats.snapshot import Counters, KVGroup, Pool, Snapshot
from tests.builders import snap


def test_pool_ratios_by_hand() -> None:
    r = pool_ratios(snap().pools[0])
    assert (r.active, r.physical, r.evictable) == (0.1, 0.6, 0.5)
    unknown = pool_ratios(snap(evictable=None).pools[0])
    assert unknown.active == 0.1 and unknown.physical is None and unknown.evictable is None


def test_max_concurrency_and_headroom_are_group_aware() -> None:
    # 100 blocks; per request 4 full + 2 swa blocks (shared pool): 100/6 = 16.67 at most.
    groups = (
        KVGroup("full", "full_attention", "full", 4),
        KVGroup("swa", "sliding_window", "full", 2, 32),
    )
    s = snap(groups=groups)
    assert engine_max_concurrency(s) == pytest.approx(100 / 6)
    # Free = capacity - used = 1440 tokens = 90 blocks -> 15 requests fit.
    assert concurrency_headroom(s) == 15
    # Without groups: one full-attention group of cdiv(64, 16) = 4 blocks.
    assert engine_max_concurrency(snap()) == 25
    assert concurrency_headroom(snap()) == 22
    # Unknown evictable still gives headroom: available + evictable is capacity - used.
    assert concurrency_headroom(snap(evictable=None)) == 22
    assert concurrency_headroom(snap(max_model_len=None)) is None


def test_headroom_with_separate_pools_takes_the_tightest() -> None:
    pools = (Pool("full", 16, 1600, 0, 0, 1600), Pool("swa", 16, 320, 160, 0, 160))
    groups = (
        KVGroup("full", "full_attention", "full", 4),
        KVGroup("swa", "sliding_window", "swa", 2, 32),
    )
    s = snap(pools=pools, groups=groups)
    assert engine_max_concurrency(s) == pytest.approx(10.0)  # swa: 20 blocks / 2
    assert concurrency_headroom(s) == 5  # swa: 10 free blocks / 2


def test_exhaustion_eta() -> None:
    # used grows 10 tokens/s; 1000 left at the last sample -> 100 s.
    growing = [(t, 500.0 + 10 * t) for t in range(0, 50, 5)]
    assert exhaustion_eta(growing, capacity=1000 + growing[-1][1]) == pytest.approx(100.0)
    assert exhaustion_eta([(t, 5.0) for t in range(6)], 100) is None  # flat
    assert exhaustion_eta([(t, 9.0 - t) for t in range(6)], 100) is None  # shrinking
    assert exhaustion_eta([(t, 1.0 + t) for t in range(4)], 100) is None  # too few samples
    assert exhaustion_eta([(t, 90.0 + 10 * t) for t in range(5)], 100) == 0.0  # already full
    # Too short a stretch of the window: not yet a trend.
    assert exhaustion_eta([(t, 1.0 + t) for t in range(10)], 1000, window=60) is None


def forecasts(
    series: list[float], capacity: float, window: float = 120, step: float = 1
) -> list[float | None]:
    """The published forecast after each poll, as the exporter keeps its window."""
    history: list[tuple[float, float]] = []
    out = []
    for i, used in enumerate(series):
        now = i * step
        history.append((now, used))
        history = [(t, u) for t, u in history if t >= now - window]
        out.append(exhaustion_eta(history, capacity, window))
    return out


def test_exhaustion_eta_is_the_least_squares_line_to_capacity() -> None:
    """Against an independent fit (the standard library's): from the fitted value at the last
    sample, capacity is reached after (capacity - fitted) / slope seconds."""
    rng = random.Random(3)
    for _ in range(200):
        slope = rng.uniform(0.5, 50)
        times = sorted(rng.uniform(0, 100) for _ in range(rng.randint(5, 60)))
        samples = [(t, 1000 + slope * t + rng.gauss(0, 5)) for t in times]
        fit = statistics.linear_regression([t for t, _ in samples], [u for _, u in samples])
        fitted_now = fit.intercept + fit.slope * times[-1]
        eta = exhaustion_eta(samples, capacity=50_000)
        assert eta == pytest.approx((50_000 - fitted_now) / fit.slope, rel=1e-9)


def trend_series(rng: random.Random) -> tuple[str, list[tuple[float, int] | None]]:
    """Polls as (time, used), None for a gap: growth, noise, saw-teeth, irregular intervals,
    a wall clock and pools of every size."""
    clock = rng.choice([0.0, 1.7e9])
    scale = rng.choice([1.0, 1e3, 1e7])
    shape = rng.choice(["growth", "noise", "saw", "step"])
    out: list[tuple[float, int] | None] = []
    gaps = set(rng.sample(range(150), 3))
    t = clock
    for i in range(400):
        t += rng.choice([1.0, 1.0, 0.5, 2.5, rng.uniform(0.1, 3)])
        base = {
            "growth": 10 * i + rng.gauss(0, 20),
            "noise": 500 + rng.gauss(0, 200),
            "saw": 50 * (i % 40),
            "step": 100.0 if i < 150 else 900.0,
        }[shape]
        out.append(None if i in gaps else (t, round(scale * max(0.0, base))))
    return shape, out


@pytest.mark.parametrize("seed", range(40))
def test_usage_trend_keeps_the_reference_fit_with_running_sums(seed: int) -> None:
    rng = random.Random(seed)
    window = rng.choice([10.0, 60.0, 300.0])
    trend = UsageTrend(window)
    history: list[tuple[float, int]] = []
    published = 0
    shape, polls = trend_series(rng)
    for poll in polls:
        if poll is None:  # a gap: the exporter starts a new trend (TargetState drops the old)
            trend = UsageTrend(window)
            history = []
            continue
        trend.add(*poll)
        history = [(t, u) for t, u in [*history, poll] if t >= poll[0] - window]
        assert list(trend.samples) == history
        capacity = 2 * max(u for _, u in history) + 1
        expected = exhaustion_eta(history, capacity, window)
        got = trend.eta(capacity)
        if expected is None:
            assert got is None
        else:
            published += 1
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert published > 0 or shape != "growth"


def test_forecast_is_quiet_on_noise_and_oscillation() -> None:
    rng = random.Random(1)
    flat = [5000 + rng.gauss(0, 400) for _ in range(3000)]
    published = [f for f in forecasts(flat, 10_000) if f is not None]
    assert len(published) < 0.01 * len(flat), f"{len(published)} forecasts on a flat pool"
    # Agentic bursts: used climbs to 80 % over 20 s, drops to 10 %, again and again.
    saw = [1000 + 7000 * ((i % 30) / 20 if i % 30 < 20 else 0) for i in range(3000)]
    published = [f for f in forecasts(saw, 10_000) if f is not None]
    assert len(published) < 0.02 * len(saw), f"{len(published)} forecasts on bursts"


def test_forecast_tracks_real_growth_steadily() -> None:
    """10 tokens/s growth under noise of 150 tokens, a 120 s window of 1 s polls: the slope's
    standard error is 150 / sqrt(120^3 / 12) = 0.4 tokens/s (4 %), so every forecast is within
    5 standard errors (20 %) of the truth once the window is half full, nearly every poll
    publishes one, and consecutive forecasts never jump."""
    rng = random.Random(2)
    capacity = 100_000.0
    series = [2000 + 10 * i + rng.gauss(0, 150) for i in range(3000)]
    results = forecasts(series, capacity)[60:]
    published = [(i + 60, f) for i, f in enumerate(results) if f is not None]
    assert len(published) >= 0.99 * len(results)
    for i, eta in published:
        truth = (capacity - (2000 + 10 * i)) / 10
        assert eta == pytest.approx(truth, rel=0.2), (i, eta, truth)
    for (_, before), (_, after) in itertools.pairwise(published):
        assert abs(after - before) <= 0.05 * before + 2, (before, after)


def test_restart_detection() -> None:
    before = snap()
    assert not is_restart(before, snap(sequence=2, queries=120))
    assert is_restart(before, snap(instance="b", sequence=2))
    assert is_restart(before, snap(sequence=0))
    # One counter going back, same instance, rising sequence: that counter's reset, not a restart.
    assert not is_restart(before, snap(sequence=2, queries=99))
    # Engines with no identity (some bridges): only every counter going back at once tells.
    anon = dataclasses.replace(before, sequence=0)
    anon = dataclasses.replace(anon, engine=dataclasses.replace(anon.engine, instance_id="unknown"))

    def anon_with(queries: int, hits: int, preemptions: int) -> Snapshot:
        return dataclasses.replace(
            anon,
            counters=Counters(
                prefix_query_tokens=queries,
                prefix_hit_tokens={"device": hits},
                preemptions=preemptions,
            ),
        )

    assert is_restart(anon, anon_with(5, 1, 0))
    assert not is_restart(anon, anon_with(99, 60, 3))  # one counter dipped, the others grew


def test_counters_stay_monotonic_across_restarts() -> None:
    c: CounterContinuity[str] = CounterContinuity()
    assert c.update({"q": 100, "h": 10}, restarted=False) == {"q": 100, "h": 10}
    assert c.update({"q": 150, "h": 12}, restarted=False) == {"q": 150, "h": 12}
    assert c.update({"q": 5, "h": 0}, restarted=True) == {"q": 155, "h": 12}
    assert c.update({"q": 30, "h": 4}, restarted=False) == {"q": 180, "h": 16}
    assert c.update({"q": 1, "h": 1}, restarted=True) == {"q": 181, "h": 17}


def test_a_one_counter_dip_resets_that_counter_only() -> None:
    """As Prometheus reads counter resets: the dipped counter restarts from its new value on top
    of its last one; the other counters are untouched (once every counter's last value was
    added: 3001 exported where 2001 was true)."""
    c: CounterContinuity[str] = CounterContinuity()
    assert c.update({"q": 2000, "h": 1000}, restarted=False) == {"q": 2000, "h": 1000}
    assert c.update({"q": 1999, "h": 1001}, restarted=False) == {"q": 3999, "h": 1001}
    assert c.update({"q": 2001, "h": 1002}, restarted=False) == {"q": 4001, "h": 1002}
    assert c.update({"q": 2002, "h": 1003}, restarted=False) == {"q": 4002, "h": 1003}


def test_counter_values_flatten_and_skip_unknowns() -> None:
    assert counter_values(snap()) == {
        CounterKey("prefix_hit_tokens", "device"): 50,
        CounterKey("prefix_query_tokens"): 100,
        CounterKey("preemptions"): 2,
    }


def test_a_failed_poll_or_a_restart_starts_the_forecast_over() -> None:
    """A gap in the data is not a trend: after a failed poll (or an engine restart) the window
    refills before a forecast is published again, and the forecast follows the new data only."""
    config = parse_config({"targets": [{"name": "t", "kind": "shim", "url": "http://x"}]})
    state = TargetState(config.targets[0], eta_window=60)

    def poll(t: float, used: int, sequence: int, instance: str = "a") -> float | None:
        state.record_success([snap(used, 0, 1600, instance, sequence)], now=t, duration=0.01)
        return state.engines[0].eta_seconds

    etas = [poll(t, 100 + 10 * t, t + 1) for t in range(40)]  # 10 slots/s
    assert etas[-1] == pytest.approx((1600 - 490) / 10)
    state.record_failure("timeout", 1.0)
    # Back, and now shrinking: a kept history would still see growth and publish.
    after = [poll(40 + t, 490 - t, 41 + t) for t in range(29)]
    assert after == [None] * 29
    # Another failure, then growth: published only once the new samples cover half the window.
    state.record_failure("connect", 0.0)
    regrow = [poll(100 + t, 500 + 20 * t, 100 + t) for t in range(40)]
    assert regrow[:29] == [None] * 29 and regrow[-1] == pytest.approx((1600 - 1280) / 20)
    # A restart (new instance) clears it too.
    assert poll(140, 1300, 1, instance="b") is None


# ------------------------------------------ edges found by mutation testing (scripts/mutation)


def test_an_empty_pool_has_zero_ratios_not_a_division_error() -> None:
    empty = Pool("full", 16, 0, 0, 0, 0)
    assert pool_ratios(empty) == PoolRatios(0.0, 0.0, 0.0)
    blind = Pool("full", 16, 0, 0, None, None)
    assert pool_ratios(blind) == PoolRatios(0.0, None, None)
    one = Pool("full", 1, 1, 1, 0, 0)  # a one-slot pool is not an empty one
    assert pool_ratios(one) == PoolRatios(1.0, 1.0, 0.0)


def test_partial_blocks_do_not_count_towards_concurrency() -> None:
    # 1,000 slots of 16-token blocks = 62 whole blocks (62.5 would admit half a block);
    # 4 blocks per max-length request (64 tokens). (Headroom floors whole requests of whole
    # blocks, so a partial block can never change it: that mutant is equivalent.)
    pools = (Pool("full", 16, 1000, 0, 0, 1000),)
    s = snap(pools=pools, groups=(KVGroup("full", "full_attention", "full", 4),))
    assert engine_max_concurrency(s) == pytest.approx(62 / 4)


def test_token_capacity_is_the_engines_own_or_vllms_formula() -> None:
    stated = dataclasses.replace(snap(), capacity_tokens=12_345)
    assert engine_capacity_tokens(stated, 99.0) == 12_345
    derived = dataclasses.replace(snap(), capacity_tokens=None, max_model_len=64)
    assert engine_capacity_tokens(derived, 2.5) == 160  # 2.5 x 64
    assert engine_capacity_tokens(derived, None) is None
    unknown_len = dataclasses.replace(derived, max_model_len=None)
    assert engine_capacity_tokens(unknown_len, 2.5) is None


def t_statistic(samples: list[tuple[float, float]]) -> float:
    """The slope over its standard error, from the textbook formulas (independent of derive)."""
    fit = statistics.linear_regression([t for t, _ in samples], [u for _, u in samples])
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    sxx = sum((t - mean_t) ** 2 for t, _ in samples)
    residual = sum((u - fit.intercept - fit.slope * t) ** 2 for t, u in samples)
    return fit.slope / math.sqrt(residual / (n - 2) / sxx)


def test_a_forecast_needs_three_standard_errors_of_growth() -> None:
    """Published exactly when the slope is at least 3 standard errors above zero (n - 2
    degrees of freedom), on noisy series around that line."""
    rng = random.Random(5)
    near = 0
    for _ in range(400):
        n = rng.randint(5, 12)
        samples = [(float(i), 100 + 2 * i + rng.gauss(0, 4)) for i in range(n)]
        t = t_statistic(samples)
        if abs(t - 3.0) < 1e-9:
            continue
        near += 2.5 < t < 3.5
        assert (exhaustion_eta(samples, 10_000) is not None) == (t >= 3.0), t
    assert near >= 20  # the threshold itself was exercised, not only clear cases


def test_forecast_window_and_spacing_edges() -> None:
    line = [(t, 10.0 * t) for t in (0.0, 7.5, 15.0, 22.5, 30.0)]
    assert exhaustion_eta(line, 1000, window=60) == pytest.approx(70.0)  # spans exactly half
    assert exhaustion_eta(line[:-1], 1000, window=60) is None  # 22.5 s: less than half
    fast = [(0.1 * i, 10.0 * i) for i in range(5)]  # 0.1 s polls: variance of times < 1 s^2
    assert exhaustion_eta(fast, 1000) == pytest.approx((1000 - 40) / 100)
    same_time = [(1.0, float(u)) for u in range(5)]
    assert exhaustion_eta(same_time, 1000) is None


def test_restart_edges() -> None:
    before = snap()
    # The same snapshot polled twice is not a restart.
    assert not is_restart(before, before)
    # Identity lost (an empty instance id now): a different engine answers.
    assert is_restart(before, snap(instance="", sequence=2, queries=200))
    # No identity on either side: an empty id is no identity, counters decide.
    anon = snap(instance="", sequence=5)
    assert not is_restart(anon, snap(instance="", sequence=1, queries=200, hits=60))
    # An idle engine without identity: counters equal, not gone back.
    assert not is_restart(anon, snap(instance="", sequence=5))


def test_counters_hold_when_unchanged_and_survive_repeated_resets() -> None:
    c: CounterContinuity[str] = CounterContinuity()
    assert c.update({"q": 100}, restarted=False) == {"q": 100}
    assert c.update({"q": 100}, restarted=False) == {"q": 100}  # idle: not a reset
    assert c.update({"q": 10}, restarted=False) == {"q": 110}  # reset 1
    assert c.update({"q": 5}, restarted=False) == {"q": 115}  # reset 2 keeps reset 1's base
    assert c.update({"q": 7}, restarted=False) == {"q": 117}


def state_for_one_shim() -> TargetState:
    config = parse_config({"targets": [{"name": "t", "kind": "shim", "url": "http://x"}]})
    return TargetState(config.targets[0], eta_window=60)


def test_a_restarted_engine_already_past_its_old_counts_continues_from_their_sum() -> None:
    """The restart, not a counter going back, decides: an engine that restarts and counts past
    its old values before the next poll (a fast restart, a slow poll) still restarted."""
    state = state_for_one_shim()
    queries = CounterKey("prefix_query_tokens")
    state.record_success([snap(queries=100, hits=50, sequence=7)], now=1.0, duration=0.01)
    assert state.engines[0].counters[queries] == 100
    state.record_success([snap(queries=150, hits=60, instance="b")], now=2.0, duration=0.01)
    assert state.restarts == 1
    assert state.engines[0].counters[queries] == 250  # 100 before + 150 since
    assert state.engines[0].counters[CounterKey("prefix_hit_tokens", "device")] == 110
    state.record_success([snap(queries=160, hits=61, instance="b", sequence=2)], 3.0, 0.01)
    assert state.engines[0].counters[queries] == 260 and state.restarts == 1


def test_a_multi_pool_engine_publishes_its_soonest_forecast() -> None:
    """The engine is full when its first pool is: the soonest pool's ETA, whichever pool is
    listed first or last (here the sliding-window pool, listed first, fills later)."""
    for fast_first in (True, False):
        state = state_for_one_shim()
        for t in range(40):
            fast = Pool("full", 16, 1600, 100 + 20 * t, 0, 1500 - 20 * t)
            slow = Pool("swa", 16, 1600, 100 + 5 * t, 0, 1500 - 5 * t)
            pools = (fast, slow) if fast_first else (slow, fast)
            state.record_success([snap(pools=pools, sequence=t + 1)], float(t), 0.01)
        # At t = 39: full holds 880 of 1600 at 20/s (36 s); swa 295 at 5/s (261 s).
        assert state.engines[0].eta_seconds == pytest.approx((1600 - 880) / 20), fast_first

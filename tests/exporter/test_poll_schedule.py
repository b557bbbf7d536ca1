"""Poll scheduling arithmetic: the shared tick grid and jittered backoff."""

from __future__ import annotations

import random

import pytest

from exporter.poller import FAILURES_BEFORE_BACKOFF, next_delay, next_tick


def test_next_tick_stays_on_the_grid() -> None:
    # Woke 3 ms late on tick 5 of a 1 s grid: the next poll is tick 6, not 7.
    assert next_tick(0.0, 1.0, 5.003, 1.0, 5.010) == 6.0
    assert next_tick(100.0, 0.5, 102.5001, 0.5, 102.51) == 103.0
    # A backoff of 4 intervals lands 4 ticks on.
    assert next_tick(0.0, 1.0, 5.003, 4.0, 5.010) == 9.0
    # A poll that overran (slow target) skips the ticks it missed.
    assert next_tick(0.0, 1.0, 5.003, 1.0, 7.5) == 8.0


def test_backoff_starts_after_a_few_failures_and_is_capped() -> None:
    rng = random.Random(1)
    for failures in range(FAILURES_BEFORE_BACKOFF + 1):
        assert next_delay(2.0, failures, 30.0, rng) == 2.0  # a restart is seen within one poll
    delays = [next_delay(2.0, FAILURES_BEFORE_BACKOFF + 2, 30.0, rng) for _ in range(200)]
    assert min(delays) >= 2.0 * 4 * 0.8 and max(delays) <= 2.0 * 4 * 1.2
    assert len(set(delays)) > 100  # jittered, so failing fleets do not retry in lockstep
    assert max(next_delay(2.0, 50, 30.0, rng) for _ in range(100)) <= 36.0
    assert next_delay(2.0, 50, 30.0, rng) == pytest.approx(30.0, rel=0.2)

"""exporter/state.py on its own: what a target remembers between polls, without I/O.

Label sanitising, a failure streak's "news" (what the exporter logs once, not every poll), the
reason an unsupported shim gives, the model taken from the target's config, the report's
independence from later polls, and the poll-duration histogram's buckets.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from exporter.config import Target, parse_config
from exporter.state import MAX_LABEL_LEN, POLL_BUCKETS, Histogram, TargetState, sanitize_label
from kvstats.snapshot import ProducerStatus, Snapshot
from tests.builders import snap

TARGET = Target(name="ref", kind="shim", url="http://127.0.0.1:1/v1/kv/stats", timeout=1.0)


def with_model(snapshot: Snapshot, model: str) -> Snapshot:
    return dataclasses.replace(snapshot, engine=dataclasses.replace(snapshot.engine, model=model))


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
        ("a model with spaces", "a model with spaces"),
        ("tab\there", "tab_here"),
        ("new\nline", "new_line"),
        ("bell\x07", "bell_"),
        ("del\x7f", "del_"),
        ("c1\x9b[31m", "c1_[31m"),
        ("nbsp\u00a0x", "nbsp_x"),
        ("line\u2028sep", "line_sep"),
        ("zero\u200bwidth", "zero_width"),
        ("  padded  ", "padded"),
        ("", "unknown"),
        ("   ", "unknown"),
        ("modèle-日本語", "modèle-日本語"),
    ],
)
def test_labels_are_printable(raw: str, shown: str) -> None:
    assert sanitize_label(raw) == shown


def test_labels_are_bounded_at_exactly_the_limit() -> None:
    assert sanitize_label("m" * MAX_LABEL_LEN) == "m" * MAX_LABEL_LEN
    longer = sanitize_label("m" * (MAX_LABEL_LEN + 1))
    assert longer == "m" * (MAX_LABEL_LEN - 3) + "..." and len(longer) == MAX_LABEL_LEN
    assert sanitize_label("abcdef", max_len=5) == "ab..."


def test_a_failure_is_news_once_per_streak_and_per_reason() -> None:
    state = TargetState(TARGET, eta_window=60)
    state.record_success([snap()], now=1.0, duration=0.01)
    assert state.up and set(state.engines) == {0}
    assert state.record_failure("timeout", 0.5) is True  # a new streak
    assert state.record_failure("timeout", 0.5) is False  # the same streak, the same reason
    assert state.record_failure("connect", 0.1) is True  # a new reason
    assert state.record_failure("connect", 0.1) is False
    assert (state.up, state.engines, state.consecutive_failures) == (False, {}, 4)
    assert state.errors["timeout"] == 2 and state.errors["connect"] == 2
    assert state.polls == 5 and state.last_failure == "connect"
    state.record_success([snap()], now=2.0, duration=0.01)
    assert state.consecutive_failures == 0 and state.up
    assert state.last_failure is None
    assert state.record_failure("connect", 0.1) is True  # after a success: a new streak
    assert state.last_success == 2.0


def test_an_unsupported_shim_is_counted_with_its_reason_while_its_numbers_are_kept() -> None:
    state = TargetState(TARGET, eta_window=60)
    said = dataclasses.replace(snap(), status=ProducerStatus("unsupported", "vLLM 9.9"))
    silent = dataclasses.replace(snap(), status=ProducerStatus("unsupported", None))
    state.record_success([said], now=1.0, duration=0.01)
    assert (state.up, state.unsupported_reason, state.errors["unsupported_engine"]) == (
        True,
        "vLLM 9.9",
        1,
    )
    state.record_success([silent], now=2.0, duration=0.01)
    assert state.unsupported_reason == "no reason given"
    assert state.errors["unsupported_engine"] == 2
    ok = dataclasses.replace(snap(), status=ProducerStatus("ok", None))
    state.record_success([ok], now=3.0, duration=0.01)
    assert state.unsupported_reason is None and state.errors["unsupported_engine"] == 2
    state.record_success([snap()], now=4.0, duration=0.01)  # no status at all
    assert state.unsupported_reason is None and state.errors["unsupported_engine"] == 2


@pytest.mark.parametrize(
    ("reported", "configured", "shown"),
    [
        ("", "llama", "llama"),
        ("unknown", "llama", "llama"),
        ("mistral", "llama", "mistral"),  # the engine's own name wins
        ("", None, "unknown"),
        ("unknown", None, "unknown"),
        ("bad\nname", "llama", "bad_name"),
        ("", "configured\tname", "configured_name"),
    ],
)
def test_the_model_label_falls_back_to_the_targets_config(
    reported: str, configured: str | None, shown: str
) -> None:
    state = TargetState(dataclasses.replace(TARGET, model=configured), eta_window=60)
    state.record_success([with_model(snap(), reported)], now=1.0, duration=0.01)
    assert state.engines[0].model == shown


def test_a_report_is_not_changed_by_later_polls() -> None:
    state = TargetState(TARGET, eta_window=60)
    state.record_success([snap()], now=1.0, duration=0.01)
    report = state.report()
    state.record_failure("timeout", 0.5)
    state.record_success([snap(instance="b")], now=2.0, duration=0.02)
    assert report.up and report.polls == 1 and report.errors["timeout"] == 0
    assert report.durations.counts == [0, 1] + [0] * (len(POLL_BUCKETS) - 1)
    assert report.engines[0].snapshot.engine.instance_id == "a"
    assert report.last_success == 1.0 and report.restarts == 0
    later = state.report()
    assert later.restarts == 1 and later.polls == 3 and later.errors["timeout"] == 1


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (0.0, 0),
        (0.005, 0),  # le is inclusive: a bound belongs to its own bucket
        (0.0050001, 1),
        (1.0, POLL_BUCKETS.index(1.0)),
        (10.0, len(POLL_BUCKETS) - 1),
        (10.5, len(POLL_BUCKETS)),  # +Inf
    ],
)
def test_poll_durations_fall_in_prometheus_buckets(seconds: float, bucket: int) -> None:
    histogram = Histogram()
    histogram.observe(seconds)
    histogram.observe(seconds)
    assert histogram.counts[bucket] == 2 and sum(histogram.counts) == 2
    assert histogram.total == 2 * seconds


def test_a_restart_is_counted_once_and_starts_the_forecast_over() -> None:
    state = TargetState(TARGET, eta_window=10)
    for i in range(10):  # a steadily filling pool: a forecast
        state.record_success([snap(used=100 + 100 * i, evictable=0)], now=float(i), duration=0.01)
    assert state.engines[0].eta_seconds is not None
    state.record_success([snap(used=1100, evictable=0, instance="b")], now=10.0, duration=0.01)
    assert state.restarts == 1 and state.engines[0].eta_seconds is None
    state.record_success([snap(used=1200, evictable=0, instance="b")], now=11.0, duration=0.01)
    assert state.restarts == 1


def test_a_target_never_polled_is_down_with_nothing_counted() -> None:
    report = TargetState(TARGET, eta_window=60).report()
    assert (report.up, report.engines, report.polls, report.last_success) == (False, {}, 0, None)
    assert set(report.errors.values()) == {0} and report.restarts == 0
    assert report.durations.counts == [0] * (len(POLL_BUCKETS) + 1)
    assert (report.streams, report.read_at, report.discovery_errors) == ((), None, 0)
    state = TargetState(TARGET, eta_window=60)
    assert state.unsupported_reason is None and state.discovery_problem is None
    assert state.record_failure("connect", 0.1) is True
    assert state.consecutive_failures == 1


def test_each_rank_keeps_its_own_memory_and_its_own_stream() -> None:
    events = parse_config(
        {
            "targets": [
                {
                    "name": "v",
                    "kind": "vllm",
                    "url": "http://127.0.0.1:1",
                    "events": {"endpoint": "tcp://127.0.0.1:5557", "dp_ranks": 2,
                               "max_batch_bytes": "1MiB"},
                }
            ]
        }
    ).targets[0]  # fmt: skip
    state = TargetState(events, eta_window=10)
    assert {r: s.max_batch_bytes for r, s in state.streams.items()} == {0: 2**20, 1: 2**20}
    state.read_streams()
    assert state.streams_read_at is not None and abs(state.streams_read_at - time.time()) < 5
    state.read_streams(now=123.0)
    assert state.streams_read_at == 123.0
    rank1 = dataclasses.replace(
        snap(instance="r1"), engine=dataclasses.replace(snap().engine, dp_rank=1, instance_id="r1")
    )
    state.record_success([snap(), rank1], now=1.0, duration=0.01)
    state.record_success([snap(), rank1], now=2.0, duration=0.01)
    assert state.restarts == 0  # two ranks, two instances: neither is a restart of the other
    for instance in ("x", "y"):
        state.record_success([snap(instance=instance), rank1], now=3.0, duration=0.01)
    assert state.restarts == 2
    view = state.engines[0]
    assert view.capacity_tokens == 1600 and view.max_concurrency == 25.0

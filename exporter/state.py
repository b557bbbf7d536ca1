"""What the exporter remembers about each target between polls.

A poll's outcome goes in (``record_success`` / ``record_failure``); immutable views come out
for the collector. When a target fails its engines are dropped at once, so no stale values
are ever served; counter bases survive, so counters continue where they were.
"""

from __future__ import annotations

import bisect
import time
import unicodedata
from dataclasses import dataclass, field

from engine_shim.events.merge import with_stream
from engine_shim.events.stream import EventStreamState, StreamReport
from kvstats.snapshot import Snapshot

from .config import Target
from .derive import (
    CounterContinuity,
    CounterKey,
    PoolRatios,
    UsageTrend,
    concurrency_headroom,
    counter_values,
    engine_capacity_tokens,
    engine_max_concurrency,
    is_restart,
    pool_ratios,
)
from .sources import ERROR_REASONS

MAX_LABEL_LEN = 128
POLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def sanitize_label(value: str, max_len: int = MAX_LABEL_LEN) -> str:
    """Printable, bounded label values: engines are not trusted to send sane model names."""
    cleaned = "".join(
        ch if unicodedata.category(ch)[0] not in ("C", "Z") or ch == " " else "_" for ch in value
    ).strip()
    if len(cleaned) > max_len:
        cleaned = cleaned[: max_len - 3] + "..."
    return cleaned or "unknown"


@dataclass(frozen=True, slots=True)
class EngineView:
    """One data-parallel rank's latest snapshot with everything derived from it."""

    snapshot: Snapshot
    model: str
    counters: dict[CounterKey, int]
    ratios: dict[str, PoolRatios]
    max_concurrency: float | None
    headroom: int | None
    eta_seconds: float | None
    capacity_tokens: int | None = None


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = POLL_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(POLL_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value


@dataclass(slots=True)
class ReloadStats:
    """Configuration reloads so far (SIGHUP, POST /-/reload)."""

    successes: int = 0
    failures: int = 0
    last_ok: bool = True
    last_success: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class TargetReport:
    """An immutable copy of a target's state, taken under the poller's lock for one render."""

    target: Target
    up: bool
    engines: dict[int, EngineView]
    polls: int
    errors: dict[str, int]
    last_success: float | None
    restarts: int
    durations: Histogram
    # The target's KV event streams (one per DP rank), as of the last poll.
    streams: tuple[StreamReport, ...] = ()
    read_at: float | None = None  # when ``streams`` were read (Unix time)
    discovery_errors: int = 0  # failed asks where the streams are (events: discover)


@dataclass(slots=True)
class _RankMemory:
    previous: Snapshot | None = None
    continuity: CounterContinuity[CounterKey] = field(default_factory=CounterContinuity)
    trends: dict[str, UsageTrend] = field(default_factory=dict)


class TargetState:
    def __init__(self, target: Target, eta_window: float) -> None:
        self.target = target
        self.eta_window = eta_window
        self.up = False
        self.engines: dict[int, EngineView] = {}
        self.polls = 0
        self.errors = dict.fromkeys(ERROR_REASONS, 0)
        self.consecutive_failures = 0
        self.last_failure: str | None = None  # the reason of the current failure streak
        self.unsupported_reason: str | None = None  # what an unsupported shim says, if one is
        self.last_success: float | None = None
        self.restarts = 0
        self.durations = Histogram()
        self._ranks: dict[int, _RankMemory] = {}
        events = target.events
        self.streams = (
            {}
            if events is None
            else {
                source.dp_rank: EventStreamState(source.dp_rank, events.max_batch_bytes)
                for source in events.sources()
            }
        )
        # Where the engine says its streams are (events: discover): failed asks, and why.
        self.discovery_errors = 0
        self.discovery_problem: str | None = None
        self.stream_reports: tuple[StreamReport, ...] = ()
        self.streams_read_at: float | None = None

    def report(self) -> TargetReport:
        return TargetReport(
            target=self.target,
            up=self.up,
            engines=self.engines,  # replaced, never mutated, by record_*
            polls=self.polls,
            errors=dict(self.errors),
            last_success=self.last_success,
            restarts=self.restarts,
            durations=Histogram(
                self.durations.buckets, list(self.durations.counts), self.durations.total
            ),
            streams=self.stream_reports,
            read_at=self.streams_read_at,
            discovery_errors=self.discovery_errors,
        )

    def read_streams(self, now: float | None = None) -> None:
        """Take the event streams' state for this poll (they run between polls)."""
        self.stream_reports = tuple(self.streams[r].report() for r in sorted(self.streams))
        self.streams_read_at = time.time() if now is None else now

    def record_failure(self, reason: str, duration: float) -> bool:
        """Count a failed poll; True when this is news (a new streak, or a new reason)."""
        news = self.consecutive_failures == 0 or reason != self.last_failure
        self.last_failure = reason
        self.polls += 1
        self.errors[reason] += 1
        self.consecutive_failures += 1
        self.durations.observe(duration)
        self.up = False
        self.engines = {}
        for memory in self._ranks.values():
            memory.trends.clear()  # a gap in the data is not a trend
        return news

    def record_success(self, snapshots: list[Snapshot], now: float, duration: float) -> None:
        # Derive everything before touching the state: if deriving raises, the caller counts
        # an internal failure and this target's last numbers are not left standing.
        engines = {}
        streams = {r.dp_rank: r for r in self.stream_reports}
        for snapshot in snapshots:
            rank = snapshot.engine.dp_rank
            engines[rank] = self._view(with_stream(snapshot, streams.get(rank)), now)
        self.polls += 1
        unsupported = [
            s.status.reason or "no reason given"
            for s in snapshots
            if s.status is not None and s.status.state == "unsupported"
        ]
        if unsupported:
            # Answered, with what is still exact (published): counted, and alerted on.
            self.errors["unsupported_engine"] += 1
        self.unsupported_reason = unsupported[0] if unsupported else None
        self.consecutive_failures = 0
        self.last_failure = None
        self.durations.observe(duration)
        self.engines = engines
        self.up = True
        self.last_success = now

    def _view(self, snapshot: Snapshot, now: float) -> EngineView:
        memory = self._ranks.setdefault(snapshot.engine.dp_rank, _RankMemory())
        restarted = memory.previous is not None and is_restart(memory.previous, snapshot)
        if restarted:
            self.restarts += 1
            memory.trends.clear()
        memory.previous = snapshot
        counters = memory.continuity.update(counter_values(snapshot), restarted)

        etas = []
        for pool in snapshot.pools:
            trend = memory.trends.get(pool.name)
            if trend is None:
                trend = memory.trends[pool.name] = UsageTrend(self.eta_window)
            trend.add(now, pool.used_slots)
            eta = trend.eta(float(pool.capacity_slots))
            if eta is not None:
                etas.append(eta)

        concurrency = engine_max_concurrency(snapshot)
        model = snapshot.engine.model
        if self.target.model and model in ("", "unknown"):
            model = self.target.model
        return EngineView(
            snapshot=snapshot,
            model=sanitize_label(model),
            counters=counters,
            ratios={p.name: pool_ratios(p) for p in snapshot.pools},
            max_concurrency=concurrency,
            capacity_tokens=engine_capacity_tokens(snapshot, concurrency),
            headroom=concurrency_headroom(snapshot),
            eta_seconds=min(etas) if etas else None,
        )

"""One event stream's bookkeeping: batch order, losses, replays and health, without I/O.

The subscriber (``exporter/event_streams.py``) hands every batch here in the order it arrives.
Before a live batch it calls ``before_live(seq)``; when that names a gap it replays the
missing batches from the engine's replay socket (``take(..., replayed=True)``), then calls
``settle(seq)``, which counts whatever the replay could not bring back as lost.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .decode import EventDecodeError, decode_batch
from .residency import Residency

# Why a batch or event was not applied (the ``reason`` label of the stream's error counter).
STREAM_ERRORS: tuple[str, ...] = (
    "invalid_frame",  # not (topic, 8-byte seq, payload)
    "invalid_batch",  # a payload that is not an event batch
    "invalid_event",  # a known event type whose fields do not fit
    "oversize",  # a batch past the configured byte limit
    "seq_backwards",  # a sequence number below the last one, not a restart at 0
    "unknown_event",  # an event type this exporter does not know (a newer engine)
    "unknown_medium",  # a medium (tier) this exporter does not know
    "unknown_block",  # a removal of a block the stream never stored
    "too_many_groups",  # more KV groups than are kept
    "replay_failed",  # the replay socket did not answer in time, or answered garbage
    "disconnected",  # the connection dropped (the engine went away, or a frame past ZMQ's limit)
    "subscriber_error",  # the subscriber failed (a socket error; logged), and reconnected
)


@dataclass(frozen=True, slots=True)
class StreamReport:
    """What the exporter publishes of one stream, taken at one instant."""

    dp_rank: int
    batches: int
    events: int
    lost_batches: int
    replayed_batches: int
    errors: dict[str, int]
    # Unix time of the last batch received (live or replayed), else of subscribing: a stream
    # that never carried a batch is as silent as one that stopped.
    last_batch_time: float | None
    whole: bool
    why_not_whole: str
    resident_slots: dict[str, int]  # by tier where exact; empty while not whole
    # Per tier, (fewest, most) resident blocks; equal unless partial entries (see Residency).
    cached_blocks: dict[str, tuple[int, int]]


@dataclass(slots=True)
class EventStreamState:
    dp_rank: int = 0
    max_batch_bytes: int = 16 << 20
    residency: Residency = field(default_factory=Residency)
    next_seq: int | None = None  # None: no batch read yet
    live_seq: int | None = None  # the last batch that came live (not replayed)
    batches: int = 0
    events: int = 0
    lost_batches: int = 0
    replayed_batches: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    last_batch_time: float | None = None
    started_at: float | None = None  # when the subscriber first connected (Unix time)

    def before_live(self, seq: int) -> int | None:
        """Called before live batch ``seq``: the first sequence number to replay, or None."""
        if self._replayed_already(seq):
            return None
        if self.next_seq is not None and 0 < seq < self.next_seq:
            # Going back, but not to 0: the engine restarted and its first batches went by.
            self.errors["seq_backwards"] += 1
            self.residency.start_over(whole=False, why="")
            self.next_seq = self.live_seq = None
        if self.next_seq is None:
            return 0 if seq > 0 else None  # joined a running stream: try from its start
        if seq > self.next_seq:
            return self.next_seq
        return None

    def take(self, seq: int, payload: bytes, now: float, replayed: bool = False) -> None:
        """Apply batch ``seq`` if it is the next one (or a restart); count it either way."""
        if replayed and self.next_seq is not None and seq < self.next_seq:
            return  # the replay overlaps what was already applied
        if not replayed and self._replayed_already(seq):
            return  # queued on the socket while the replay brought it
        if self.next_seq is None:
            self.residency.start_over(
                whole=seq == 0,
                why=f"joined the stream at batch {seq}: earlier batches were not replayable",
            )
        elif seq < self.next_seq:
            if seq != 0:  # not announced by before_live: a publisher going back at random
                self.before_live(seq)
                self.take(seq, payload, now)
                return
            self.residency.start_over(whole=True)  # restarted: an empty cache, its first batch
        elif seq > self.next_seq:
            self.settle(seq)
        self.next_seq = seq + 1
        self.batches += 1
        self.last_batch_time = now
        if replayed:
            self.replayed_batches += 1
        else:
            self.live_seq = seq
        self._apply(payload)

    def nothing_published(self) -> None:
        """The replay socket, asked from batch 0 before any batch came, had none: the engine
        has published nothing yet, so its prefix cache holds nothing the stream would say."""
        if self.next_seq is None:
            self.residency.start_over(whole=True)

    def _replayed_already(self, seq: int) -> bool:
        """A live batch below the next one but past the last live one: the replay brought it
        while it waited on the socket. (At or below the last live one it is going back.)"""
        return (
            self.next_seq is not None
            and seq < self.next_seq
            and (self.live_seq is None or seq > self.live_seq)
        )

    def settle(self, seq: int) -> None:
        """Live batch ``seq`` is next: what is still missing before it is lost."""
        if self.next_seq is None or seq <= self.next_seq:
            return
        self.lost_batches += seq - self.next_seq
        self.residency.lose(f"{seq - self.next_seq} batches lost before batch {seq}")
        self.next_seq = seq

    def refuse(self, reason: str) -> None:
        """A frame that never became a batch: its events are lost."""
        self.errors[reason] += 1
        self.residency.lose(f"a batch was refused ({reason})")

    def _apply(self, payload: bytes) -> None:
        if len(payload) > self.max_batch_bytes:
            self.refuse("oversize")
            return
        try:
            batch = decode_batch(payload)
        except EventDecodeError as exc:
            self.refuse(exc.reason)
            return
        self.events += len(batch.events)
        self.residency.apply(batch)
        self.errors.update(self.residency.skipped)
        self.residency.skipped.clear()

    def report(self) -> StreamReport:
        whole = self.residency.whole
        return StreamReport(
            dp_rank=self.dp_rank,
            batches=self.batches,
            events=self.events,
            lost_batches=self.lost_batches,
            replayed_batches=self.replayed_batches,
            errors={reason: self.errors.get(reason, 0) for reason in STREAM_ERRORS},
            last_batch_time=self.last_batch_time or self.started_at,
            whole=whole,
            why_not_whole="" if whole else self.residency.why_not_whole,
            resident_slots=self.residency.resident_slots() if whole else {},
            cached_blocks=self.residency.cached_blocks() if whole else {},
        )

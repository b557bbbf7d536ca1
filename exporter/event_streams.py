"""Subscribers to engines' KV event streams (ZMQ PUB, one per DP rank), on the poller's loop.

Each stream is one asyncio task: a SUB socket on the rank's endpoint and, when batches are
missing (on joining, after a reconnect, a gap), a DEALER to the engine's replay ROUTER that
asks for them from the first missing sequence number. What the batches mean is
``engine_shim.events``; this module only moves frames and keeps time. A stream that floods,
sends garbage or stops costs its own target and shows in its counters, never the poller: the
task yields every 2 ms of work, and every failure is caught, counted and retried.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import zmq
import zmq.asyncio

from engine_shim.events.discovery import (
    DISCOVERY_PATHS,
    DiscoveryError,
    EventSource,
    discover_sources,
)
from engine_shim.events.stream import EventStreamState

from .config import EventsConfig
from .errors import PollError
from .fetch import Connection
from .sources import fetch
from .state import TargetState

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
DISCOVERY_INTERVAL = 30.0  # asking the engine again where its streams are
DISCOVERY_RETRY = 5.0  # after a discovery that failed
MAX_DISCOVERY_BYTES = 1 << 20
SLICE_SECONDS = 0.002  # the longest a stream holds the poller's loop between yields
RECONNECT_DELAY = 1.0


class EventSubscriber:
    def __init__(
        self,
        source: EventSource,
        config: EventsConfig,
        state: EventStreamState,
        context: zmq.asyncio.Context,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config  # its limits: batch size, replay timeout
        self.state = state
        self.context = context
        self.clock = clock
        self.endpoint = source.endpoint
        self.replay_endpoint = source.replay_endpoint
        self.topic = source.topic.encode()

    async def run(self) -> None:
        if self.state.started_at is None:
            self.state.started_at = self.clock()
        while True:
            sub = self._socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, self.topic)
            sub.setsockopt(zmq.RCVHWM, 10_000)
            # A peer that breaks ZMQ's rules (a frame past MAXMSGSIZE) is dropped and never
            # reconnected by ZMQ: the monitor says so, and a new socket takes its place.
            monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sub.connect(self.endpoint)
            try:
                # Before the first live batch: what the engine published before we came.
                if (
                    self.replay_endpoint is not None
                    and self.state.next_seq is None
                    and await self.replay(0) == 0
                ):
                    self.state.nothing_published()
                if await _first_done(self._read(sub), monitor.recv_multipart()) == 1:
                    self.state.errors["disconnected"] += 1
                    log.info("KV events %s: disconnected; reconnecting", self.endpoint)
                    await asyncio.sleep(RECONNECT_DELAY)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a socket error or a bug: counted, reconnected
                self.state.refuse("subscriber_error")
                log.warning("KV events %s: %r; reconnecting", self.endpoint, exc)
                await asyncio.sleep(RECONNECT_DELAY)
            finally:
                sub.disable_monitor()
                monitor.close(linger=0)
                sub.close(linger=0)

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self.context.socket(kind)
        # Past this ZMQ drops the peer instead of buffering a hostile frame; batches between
        # max_batch_bytes and this are read and refused ("oversize").
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * self.config.max_batch_bytes + 4096)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    async def _read(self, sub: zmq.asyncio.Socket) -> None:
        clock = asyncio.get_running_loop().time
        # The same socket, read without the event loop: batches already queued are taken in
        # a row (a trip through the loop per batch would cost more than decoding it).
        queued: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)
        while True:
            await self._live(await sub.recv_multipart())
            since = clock()
            while clock() - since < SLICE_SECONDS:
                try:
                    frames = queued.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                await self._live(frames)
            # A flooding stream must not starve the other targets: every poll waits at most
            # a slice per step it takes (connect, send, each read).
            await asyncio.sleep(0)

    async def _live(self, frames: list[bytes]) -> None:
        seq = _sequence(frames)
        if seq is None:
            self.state.refuse("invalid_frame")
            return
        missing = self.state.before_live(seq)
        if missing is not None and self.replay_endpoint is not None:
            await self.replay(missing, seq)
        self.state.settle(seq)
        self.state.take(seq, frames[2], self.clock())

    async def replay(self, start: int, until: int | None = None) -> int | None:
        """Ask the replay socket for batches from ``start`` (up to ``until``, exclusive) and
        apply them: how many it sent, None if it failed. vLLM's ``ZmqEventPublisher`` answers
        ``(b"", topic, seq, payload)`` per buffered batch, then ``(b"", b"", END_SEQ, b"")``;
        SGLang's copy likewise; vLLM's first releases left the topic out."""
        assert self.replay_endpoint is not None
        dealer = self._socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        deadline = asyncio.get_running_loop().time() + self.config.replay_timeout
        sent = 0
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0 or not await dealer.poll(max(1, int(left * 1000))):
                    self.state.errors["replay_failed"] += 1
                    return None
                frames = await dealer.recv_multipart()
                if frames[:1] != [b""] or len(frames) not in (3, 4):
                    self.state.errors["replay_failed"] += 1
                    return None
                seq_bytes, payload = frames[-2:]
                if seq_bytes == END_SEQ:
                    return sent
                if len(seq_bytes) != 8:
                    self.state.errors["replay_failed"] += 1
                    return None
                seq = int.from_bytes(seq_bytes, "big")
                sent += 1
                if until is None or seq < until:
                    self.state.take(seq, payload, self.clock(), replayed=True)
                if sent % 32 == 0:
                    await asyncio.sleep(0)
        finally:
            dealer.close(linger=0)


async def follow_streams(
    state: TargetState, context: zmq.asyncio.Context, tls: ssl.SSLContext
) -> None:
    """Subscribe to the target's KV event streams for as long as the exporter runs: the
    configured ones, or the ones the engine names, asked again every ``DISCOVERY_INTERVAL`` (a
    restarted engine may publish on new ports: its streams start over)."""
    events = state.target.events
    assert events is not None
    if not events.discover:
        subscribers = [
            EventSubscriber(source, events, state.streams[source.dp_rank], context).run()
            for source in events.sources()
        ]
        await asyncio.gather(*subscribers)
        return
    parts = urlsplit(state.target.url)
    path = DISCOVERY_PATHS[state.target.kind]
    client = Connection(urlunsplit((parts.scheme, parts.netloc, path, "", "")), tls)
    followed: tuple[EventSource, ...] = ()
    tasks: list[asyncio.Task[None]] = []
    try:
        while True:
            try:
                body = await fetch(client, state.target, MAX_DISCOVERY_BYTES)
                sources = discover_sources(state.target.kind, body, parts.hostname or "")
            except (PollError, DiscoveryError) as exc:
                problem = f"{path}: {exc}"
                state.discovery_errors += 1
                if problem != state.discovery_problem:
                    log.warning("target %s: KV event streams: %s", state.target.name, problem)
                state.discovery_problem = problem
                await asyncio.sleep(DISCOVERY_RETRY)
                continue
            state.discovery_problem = None
            if sources != followed:
                log.info(
                    "target %s: KV event streams at %s",
                    state.target.name,
                    ", ".join(f"rank {s.dp_rank}: {s.endpoint}" for s in sources),
                )
                await _cancel(tasks)
                state.streams = {
                    s.dp_rank: EventStreamState(s.dp_rank, events.max_batch_bytes) for s in sources
                }
                tasks = [
                    asyncio.create_task(
                        EventSubscriber(s, events, state.streams[s.dp_rank], context).run()
                    )
                    for s in sources
                ]
                followed = sources
            await asyncio.sleep(DISCOVERY_INTERVAL)
    finally:
        await _cancel(tasks)
        client.close()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _first_done(*awaitables: Awaitable[object]) -> int:
    """Run ``awaitables`` until one finishes (re-raising its error); cancel the others.
    Returns the index of the one that finished."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = next(i for i, t in enumerate(tasks) if t in done)
    tasks[first].result()
    return first


def _sequence(frames: list[bytes]) -> int | None:
    """The sequence number of ``(topic, seq, payload)``, or None for another shape."""
    if len(frames) != 3 or len(frames[1]) != 8:
        return None
    return int.from_bytes(frames[1], "big")

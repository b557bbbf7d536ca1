"""Concurrent polling: one asyncio task per target, so no target can delay another.

A failing target is retried at the poll interval for its first few failures (a restart comes
back within one poll), then with jittered exponential backoff up to ``max_backoff``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import threading
import time
from collections.abc import Callable

import zmq.asyncio

from kvstats.snapshot import Snapshot

from .config import Config
from .errors import PollError
from .event_streams import follow_streams
from .nvml import GpuReading, NvmlReader
from .sources import Client, body_parser, fetch, new_connection, series_estimate
from .state import TargetReport, TargetState

log = logging.getLogger(__name__)

FAILURES_BEFORE_BACKOFF = 3


def next_delay(interval: float, failures: int, max_backoff: float, rng: random.Random) -> float:
    """Seconds to the next poll after ``failures`` consecutive failures (0: success)."""
    if failures <= FAILURES_BEFORE_BACKOFF:
        return interval
    backoff = min(max_backoff, interval * 2.0 ** (failures - FAILURES_BEFORE_BACKOFF))
    return max(interval, backoff * rng.uniform(0.8, 1.2))


def next_tick(origin: float, interval: float, started: float, delay: float, now: float) -> float:
    """The grid point ``delay`` after the tick a poll started on (``started`` is that tick
    plus wake-up latency); if that is already past, the next grid point after ``now``."""
    current = origin + round((started - origin) / interval) * interval
    tick = current + max(1, round(delay / interval)) * interval
    if tick <= now:
        tick = origin + math.floor((now - origin) / interval + 1) * interval
    return tick


class Poller:
    def __init__(
        self,
        config: Config,
        nvml: NvmlReader,
        on_change: Callable[[TargetReport | None], None],
        carried: dict[str, TargetState] | None = None,
    ) -> None:
        self.config = config
        self.nvml = nvml
        self.on_change = on_change
        self.lock = threading.Lock()
        # A reload keeps the state (counters, restarts, history) of every target it keeps as is.
        carried = carried or {}
        self.states = [
            carried[t.name]
            if t.name in carried
            and carried[t.name].target == t
            and carried[t.name].eta_window == config.eta_window
            else TargetState(t, config.eta_window)
            for t in config.targets
        ]
        self.gpus: list[GpuReading] = []
        self.rounds_completed = threading.Event()  # set once every target was polled once
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._rng = random.Random()
        self._origin = 0.0
        # (engine instance id, DP rank) -> the target that reports it, so that two targets
        # reaching one engine (two engines told the same shim port) are caught, not merged.
        self._claims: dict[tuple[str, int], str] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._stopping = asyncio.Event()
            ready.set()
            try:
                loop.run_until_complete(self._main())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="kvcache-poller", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        """The loop thread runs and no target's (or NVML's) polling task has ended."""
        if self._thread is None or not self._thread.is_alive():
            return False
        return not any(task.done() for task in self._tasks)

    # ---------------------------------------------------------------------- loops

    async def _main(self) -> None:
        assert self._stopping is not None
        tls = ssl.create_default_context()
        clients = [new_connection(s.target, tls) for s in self.states]
        first = [asyncio.Event() for _ in self.states]
        self._origin = asyncio.get_running_loop().time()
        tasks = [
            asyncio.create_task(self._poll_target(c, s, e))
            for c, s, e in zip(clients, self.states, first, strict=True)
        ]
        if self.nvml.available:
            tasks.append(asyncio.create_task(self._poll_nvml()))
        context = zmq.asyncio.Context()
        for state in self.states:
            if state.target.events is not None:
                tasks.append(asyncio.create_task(follow_streams(state, context, tls)))
        self._tasks = tasks
        waiter = asyncio.create_task(self._await_first_round(first))
        await self._stopping.wait()
        for task in [*tasks, waiter]:
            task.cancel()
        await asyncio.gather(*tasks, waiter, return_exceptions=True)
        for client in clients:
            client.close()
        context.destroy(linger=0)

    async def _await_first_round(self, first: list[asyncio.Event]) -> None:
        await asyncio.gather(*(e.wait() for e in first))
        self.rounds_completed.set()

    async def _poll_target(self, client: Client, state: TargetState, first: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.poll_interval
        parse = body_parser(state.target.kind)
        origin = self._origin
        while True:
            started = loop.time()
            try:
                await self.poll_once(client, state, parse)
            except Exception as exc:  # nothing may end a target's polling: count it, go on
                self._fail(state, "internal", repr(exc), 0.0, exc)
            first.set()
            delay = next_delay(
                interval, state.consecutive_failures, self.config.max_backoff, self._rng
            )
            # Wake on a grid shared by all targets: one event-loop wakeup per interval for the
            # whole fleet instead of one per target. Each target is still its own task, so a
            # slow one only delays itself (it skips the ticks it missed).
            tick = next_tick(origin, interval, started, delay, loop.time())
            await asyncio.sleep(max(0.0, tick - loop.time()))

    async def poll_once(
        self,
        client: Client,
        state: TargetState,
        parse: Callable[[bytes], list[Snapshot]],
    ) -> None:
        started = time.perf_counter()
        failure: tuple[str, str] | None = None
        snapshots: list[Snapshot] = []
        try:
            body = await fetch(client, state.target, self.config.max_response_bytes)
            snapshots = parse(body)
            estimate = series_estimate(snapshots, len(state.streams))
            cap = self.config.max_series_per_target
            if estimate > cap:
                raise PollError(
                    "too_many_series", f"~{estimate} series exceed max_series_per_target {cap}"
                )
            self._claim(state.target.name, snapshots)
        except PollError as exc:
            failure = (exc.reason, exc.message)
        except Exception as exc:  # a bug must be counted and visible, never kill the loop
            self._fail(state, "internal", repr(exc), time.perf_counter() - started, exc)
            return
        duration = time.perf_counter() - started
        if failure is not None:
            self._fail(state, *failure, duration)
            return
        was_failing = state.consecutive_failures > 0
        said = state.unsupported_reason
        self._record(state, lambda: state.record_success(snapshots, time.time(), duration))
        if was_failing:
            log.info("target %s is back", state.target.name)
        if state.unsupported_reason != said and state.unsupported_reason is not None:
            log.warning(
                "target %s: unsupported_engine (its series hold only what is still exact): %s",
                state.target.name,
                state.unsupported_reason,
            )

    def _fail(
        self,
        state: TargetState,
        reason: str,
        message: str,
        duration: float,
        exc: BaseException | None = None,
    ) -> None:
        """Count a failed poll; one log line per change of state, never one per poll."""
        if reason != "duplicate_instance":
            self._release(state.target.name)
        news: list[bool] = []
        self._record(state, lambda: news.append(state.record_failure(reason, duration)))
        if news and news[0]:
            log.warning(
                "target %s: %s: %s",
                state.target.name,
                reason,
                message,
                exc_info=exc if reason == "internal" else None,
            )

    def _claim(self, name: str, snapshots: list[Snapshot]) -> None:
        """Raise ``duplicate_instance`` if another live target already reports these engines."""
        keys = {
            (s.engine.instance_id, s.engine.dp_rank)
            for s in snapshots
            if s.engine.instance_id not in ("", "unknown")
        }
        with self.lock:
            for key in keys:
                owner = self._claims.get(key)
                if owner is not None and owner != name:
                    raise PollError(
                        "duplicate_instance",
                        f"reports the same engine as target {owner} (instance {key[0][:16]},"
                        f" DP rank {key[1]}): give every engine its own shim address",
                    )
            for key in [k for k, v in self._claims.items() if v == name and k not in keys]:
                del self._claims[key]
            for key in keys:
                self._claims[key] = name

    def _release(self, name: str) -> None:
        with self.lock:
            for key in [k for k, v in self._claims.items() if v == name]:
                del self._claims[key]

    def _record(self, state: TargetState, update: Callable[[], None]) -> None:
        """Apply a poll's result and hand the target's new state to ``on_change``."""
        with self.lock:
            state.read_streams()
            update()
            report = state.report()
        self.on_change(report)

    def gpu_readings(self) -> list[GpuReading]:
        with self.lock:
            return list(self.gpus)

    def reports(self) -> list[TargetReport]:
        with self.lock:
            return [s.report() for s in self.states]

    async def _poll_nvml(self) -> None:
        while True:
            try:
                readings = await self.nvml.read_within(self.config.timeout)
            except Exception as exc:  # counted; the loop goes on
                log.warning("NVML read failed: %r", exc)
                readings = []
            with self.lock:
                self.gpus = readings
            self.on_change(None)
            await asyncio.sleep(self.config.poll_interval)

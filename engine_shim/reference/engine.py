"""The reference engine: a short loop over a scheduler, a KV manager and telemetry.

It is the embedded default that makes the stack run on any laptop and the ground truth of the
test suite. Admission is by free blocks; prefix hits come from the device radix cache, then the
host tier, then the storage tier; when decode runs out of blocks the newest running request is
preempted (recompute). After every iteration an immutable snapshot is published, so readers
on other threads never stall the loop and never see a half-updated pool.

- ``scheduler.Scheduler``: which request runs, prefill/decode, preemption;
- ``kv_manager.KVManager``: pools, prefix cache, lower tiers, a request's blocks and K/V;
- ``telemetry.Telemetry``: counters and the published snapshot.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from typing import Any

from kvstats.snapshot import KVGroup, Snapshot

from ..events.publisher import EventPublisher, block_removed, block_stored
from .kv_manager import KVManager, gpu_uuid, pick_device
from .model import ToyModel
from .pool import BlockPool
from .prefix_cache import Node, PrefixCache
from .request import TIERS, EngineConfig, Request, RequestRejected
from .scheduler import Scheduler
from .telemetry import Telemetry
from .tiers import HostTier, StorageTier

__all__ = ["TIERS", "EngineConfig", "ReferenceEngine", "Request", "RequestRejected"]


class ReferenceEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.model = ToyModel(config.shape, self.device, seed=config.seed)
        self.kv = KVManager(config, self.device)
        self.telemetry = Telemetry(config, self.kv, gpu_uuid(self.device))
        self.scheduler = Scheduler(config, self.kv, self.model, self.telemetry)
        self.kv_events: EventPublisher | None = None
        self._step_events: list[dict[str, Any]] = []
        if config.kv_events_endpoint is not None:
            self.kv_events = EventPublisher(
                config.kv_events_endpoint,
                config.kv_events_replay_endpoint,
                dp_rank=config.dp_rank,
            )
            self.kv.cache.on_stored = self._stored
            self.kv.cache.on_removed = self._removed
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._snapshot = self._build_snapshot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------- the parts, by name

    @property
    def full_pool(self) -> BlockPool:
        return self.kv.full_pool

    @property
    def swa_pool(self) -> BlockPool | None:
        return self.kv.swa_pool

    @property
    def pools(self) -> list[BlockPool]:
        return self.kv.pools

    @property
    def cache(self) -> PrefixCache:
        return self.kv.cache

    @property
    def host(self) -> HostTier | None:
        return self.kv.host

    @property
    def storage(self) -> StorageTier | None:
        return self.kv.storage

    @property
    def groups(self) -> tuple[KVGroup, ...]:
        return self.kv.groups

    @property
    def max_concurrency(self) -> float | None:
        return self.kv.max_concurrency

    @property
    def capacity_tokens(self) -> int | None:
        return self.kv.capacity_tokens

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def instance_id(self) -> str:
        return self.telemetry.instance_id

    @property
    def iterations(self) -> int:
        return self.telemetry.iterations

    @property
    def preemptions(self) -> int:
        return self.telemetry.preemptions

    @property
    def prefix_query_tokens(self) -> int:
        return self.telemetry.prefix_query_tokens

    @property
    def prefix_hit_tokens(self) -> dict[str, int]:
        return self.telemetry.prefix_hit_tokens

    def pool_counts(self, pool: BlockPool) -> tuple[int, int, int]:
        return self.kv.pool_counts(pool)

    # ------------------------------------------------------------------ public API

    def submit(self, prompt: list[int], max_tokens: int) -> Request:
        """Queue a request (thread-safe). Raises RequestRejected for one that can never run."""
        cfg = self.config
        if not prompt:
            raise RequestRejected("prompt must not be empty")
        if max_tokens < 1:
            raise RequestRejected(f"max_tokens must be at least 1, got {max_tokens}")
        if any(not 0 <= t < cfg.shape.vocab_size for t in prompt):
            raise RequestRejected(f"token ids must be in [0, {cfg.shape.vocab_size})")
        if len(prompt) + max_tokens > cfg.max_model_len:
            raise RequestRejected(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds"
                f" max_model_len {cfg.max_model_len}"
            )
        self.kv.check_fits(len(prompt) + max_tokens)
        request = Request(id=f"req-{next(self._ids)}", prompt=list(prompt), max_tokens=max_tokens)
        self._inbox.put(request)
        return request

    def generate(self, prompt: list[int], max_tokens: int, timeout: float = 60.0) -> Request:
        request = self.submit(prompt, max_tokens)
        if not request.done.wait(timeout):
            raise TimeoutError(f"{request.id} did not finish within {timeout} s")
        return request

    def snapshot(self) -> Snapshot:
        """The snapshot published after the last iteration, with the peaks since the previous
        read: O(pools), never blocks the loop."""
        return self.telemetry.with_peaks(self._snapshot)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reference-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.kv_events is not None:
            self.kv_events.close()
        self.kv.close()

    # ----------------------------------------------------------------------- loop

    def _loop(self) -> None:
        idle_publish = 0.05
        while not self._stop.is_set():
            if not self.waiting and not self.running:
                try:
                    self.waiting.append(self._inbox.get(timeout=idle_publish))
                except queue.Empty:
                    self._publish()
                    continue
            started = time.perf_counter()
            self.step()
            spent = time.perf_counter() - started
            if spent < self.config.iteration_time:
                self._stop.wait(self.config.iteration_time - spent)

    def step(self) -> None:
        """One iteration: take new requests, let the scheduler run, publish."""
        started = time.perf_counter()
        while True:
            try:
                self.waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        admitted, prefill_tokens, decoded = self.scheduler.step()
        if self._step_events and self.kv_events is not None:
            # One batch per step, as vLLM publishes.
            self.kv_events.publish(self._step_events)
            self._step_events = []
        self._publish()
        if self.config.log_iterations:
            self.telemetry.log_iteration(
                admitted,
                prefill_tokens,
                decoded,
                time.perf_counter() - started,
                sum(r.num_computed for r in self.running),
                len(self.waiting),
            )

    def _stored(self, node: Node) -> None:
        parent = node.parent
        self._step_events.append(
            block_stored(
                [node.hash],
                None if parent is None or parent.parent is None else parent.hash,
                list(node.key),
                self.config.block_size,
            )
        )

    def _removed(self, node: Node) -> None:
        self._step_events.append(block_removed([node.hash]))

    def kv_event_sources(self) -> dict[str, Any]:
        """What vLLM's ``GET /kv_event_sources`` says, for this engine's publisher."""
        if self.kv_events is None:
            return {}
        return {
            str(self.config.dp_rank): {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": self.kv_events.endpoint,
                "replay_endpoint": self.kv_events.replay_endpoint,
                "topic": "",
            }
        }

    def _build_snapshot(self) -> Snapshot:
        return self.telemetry.snapshot(self.running, self.waiting)

    def _publish(self) -> None:
        self._snapshot = self._build_snapshot()

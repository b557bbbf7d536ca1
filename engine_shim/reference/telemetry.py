"""The reference engine's statistics and the snapshot it publishes after every iteration."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Sized

from kvstats.snapshot import Counters, EngineIdentity, Pool, Requests, Snapshot, Tier

from .. import __version__
from ..reuse_distance import Observation, ReuseDistanceTracker
from .kv_manager import KVManager
from .prefix_cache import Node
from .request import TIERS, EngineConfig, Request

iteration_log = logging.getLogger("engine_shim.iterations")


class Telemetry:
    """Counters since this instance started, and the immutable snapshot readers get."""

    def __init__(self, config: EngineConfig, kv: KVManager, gpu_uuid: str | None) -> None:
        self.config = config
        self.kv = kv
        self.gpu_uuid = gpu_uuid
        self.instance_id = uuid.uuid4().hex
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = dict.fromkeys(TIERS, 0)
        self.preemptions = 0
        self.iterations = 0
        self._sequence = 0
        full = kv.full_pool
        lower = [t.capacity_blocks * config.block_size for t in (kv.host, kv.storage) if t]
        # The pool and the pool with each lower tier below it are bounds of their own.
        self.reuse = ReuseDistanceTracker(
            config.block_size,
            full.capacity_slots,
            extra_bounds=itertools.accumulate(lower, initial=full.capacity_slots),
        )
        kv.cache.on_held = self.reuse.pinned_all
        kv.cache.on_idle = self.reuse.released_all
        # Per pool, the highest (used, used + evictable) slots at any step since the last read.
        self._peaks: dict[str, tuple[int, int]] = {}
        self._peaks_lock = threading.Lock()

    def reuse_observation(self, request: Request, path: list[Node]) -> Observation:
        """The reuse distances of a request's prompt blocks now, before anything is pinned
        (``path``: its cached prefix now). Past the cached prefix, blocks are hashed only up
        to the first cold one: the rest are cold too, and count in no bucket."""
        request.prefix_keys = self.kv.prefix_keys(
            request.prompt, path, self.reuse.looks_past, request.prefix_keys
        )
        used, _, _ = self.kv.pool_counts(self.kv.full_pool)
        return self.reuse.observe(request.prefix_keys, used)

    def admitted(
        self, request: Request, hits: dict[str, int], observed: Observation | None = None
    ) -> None:
        """A request's first admission: its prompt was looked up (re-admissions are not)."""
        self.prefix_query_tokens += len(request.prompt)
        for tier, count in hits.items():
            self.prefix_hit_tokens[tier] += count
        if observed is not None:  # its hits are pinned by now
            held = sum(hits.values()) // self.config.block_size
            self.reuse.record(len(request.prompt), observed, held_blocks=held)

    def snapshot(self, running: Sized, waiting: Sized) -> Snapshot:
        kv, bs = self.kv, self.config.block_size
        pools = []
        for pool in kv.pools:
            used, evictable, available = kv.pool_counts(pool)
            with self._peaks_lock:
                peak_used, peak_physical = self._peaks.get(pool.name, (0, 0))
                self._peaks[pool.name] = (
                    max(peak_used, used),
                    max(peak_physical, used + evictable),
                )
            pools.append(
                Pool(
                    name=pool.name,
                    block_size=pool.block_size,
                    capacity_slots=pool.capacity_slots,
                    used_slots=used,
                    evictable_slots=evictable,
                    available_slots=available,
                    bytes_per_slot=pool.bytes_per_slot,
                    device=str(kv.device),
                    gpu_uuid=self.gpu_uuid,
                )
            )
        hits = {"device": self.prefix_hit_tokens["device"]}
        if kv.host is not None:
            hits["host"] = self.prefix_hit_tokens["host"]
        if kv.storage is not None:
            hits["storage"] = self.prefix_hit_tokens["storage"]
        self._sequence += 1
        return Snapshot(
            engine=EngineIdentity(
                kind="reference",
                version=__version__,
                model=self.config.shape.name,
                dp_rank=self.config.dp_rank,
                instance_id=self.instance_id,
            ),
            time=time.time(),
            sequence=self._sequence,
            max_model_len=self.config.max_model_len,
            pools=tuple(pools),
            groups=kv.groups,
            max_concurrency=kv.max_concurrency,
            capacity_tokens=kv.capacity_tokens,
            requests=Requests(running=len(running), waiting=len(waiting)),
            counters=Counters(
                prefix_query_tokens=self.prefix_query_tokens,
                prefix_hit_tokens=hits,
                evicted_tokens=kv.cache.evicted_blocks * bs,
                preemptions=self.preemptions,
                iterations=self.iterations,
            ),
            host_tier=None
            if kv.host is None
            else Tier(kv.host.capacity_blocks * bs, kv.host.used_blocks * bs),
            storage_tier=None
            if kv.storage is None
            else Tier(kv.storage.capacity_blocks * bs, kv.storage.used_blocks * bs),
            reuse_distance=self.reuse.histogram(),
        )

    def with_peaks(self, snap: Snapshot) -> Snapshot:
        """The published snapshot with each pool's peaks since the previous read; the read
        starts the next period (at the published values)."""
        pools = []
        with self._peaks_lock:
            for pool in snap.pools:
                physical = pool.capacity_slots - (pool.available_slots or 0)
                peak_used, peak_physical = self._peaks.get(pool.name, (0, 0))
                self._peaks[pool.name] = (pool.used_slots, physical)
                pools.append(
                    dataclasses.replace(
                        pool,
                        peak_used_slots=max(peak_used, pool.used_slots),
                        peak_physical_slots=max(peak_physical, physical),
                    )
                )
        return dataclasses.replace(snap, pools=tuple(pools))

    def log_iteration(
        self,
        prefills: int,
        prefill_tokens: int,
        decodes: int,
        seconds: float,
        computed_tokens: int,
        waiting: int,
    ) -> None:
        pool = self.kv.full_pool
        used, evictable, _ = self.kv.pool_counts(pool)
        used_blocks = used // pool.block_size
        iteration_log.info(
            "iteration %d: prefill %d req %d tok, decode %d req %d tok, %.1f ms | "
            "kv cache: %.1f%% (%d/%d blocks, %d tokens), evictable %.1f%%, waiting %d",
            self.iterations,
            prefills,
            prefill_tokens,
            decodes,
            decodes,
            seconds * 1000,
            100 * used_blocks / pool.num_blocks,
            used_blocks,
            pool.num_blocks,
            computed_tokens,
            100 * evictable / pool.capacity_slots,
            waiting,
        )

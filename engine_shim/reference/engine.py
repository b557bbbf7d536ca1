"""The reference engine: a scheduler loop over real paged KV pools.

It is the embedded default that makes the stack run on any laptop and the ground truth of the
test suite. Admission is by free blocks; prefix hits come from the device radix cache, then the
host tier, then the storage tier; when decode runs out of blocks the newest running request is
preempted (recompute). After every iteration an immutable snapshot is published, so readers
on other threads never stall the loop and never see a half-updated pool.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvstats.capacity import (
    GroupFootprint,
    full_attention_blocks,
    kv_cache_size_tokens,
    max_concurrency,
    sliding_window_blocks,
)
from kvstats.snapshot import Counters, EngineIdentity, KVGroup, Pool, Requests, Snapshot, Tier

from .. import __version__
from .model import DTYPES, ModelShape, ToyModel
from .pool import BlockPool
from .prefix_cache import Node, PrefixCache, block_hash
from .tiers import HostTier, StorageTier

log = logging.getLogger(__name__)
iteration_log = logging.getLogger("engine_shim.iterations")

TIERS = ("device", "host", "storage")


class RequestRejected(ValueError):
    """A request the engine can never serve (too long, bad parameters): a 4xx, not a crash."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    shape: ModelShape = field(default_factory=ModelShape)
    block_size: int = 16
    kv_memory_bytes: int = 32 * 2**20
    max_model_len: int = 4096
    max_running: int = 64
    # Simulated GPU time of one iteration: the loop sleeps out what compute did not use.
    iteration_time: float = 0.005
    # Hybrid models: swa pool token slots as a share of the full pool's (SGLang's
    # --swa-full-tokens-ratio); the memory budget is split so that both fit.
    swa_pool_ratio: float = 0.5
    host_tier_tokens: int = 0
    storage_dir: Path | None = None
    storage_tier_tokens: int = 0
    device: str = "auto"
    dp_rank: int = 0
    log_iterations: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_model_len <= 0 or self.max_running <= 0:
            raise ValueError("block_size, max_model_len and max_running must be positive")
        if self.kv_memory_bytes <= 0:
            raise ValueError("kv_memory_bytes must be positive")
        if self.iteration_time < 0 or not 0 < self.swa_pool_ratio <= 1:
            raise ValueError("iteration_time must be >= 0 and swa_pool_ratio in (0, 1]")
        if self.host_tier_tokens < 0 or self.storage_tier_tokens < 0:
            raise ValueError("tier sizes must not be negative")
        if self.storage_tier_tokens and self.storage_dir is None:
            raise ValueError("a storage tier needs storage_dir")


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    max_tokens: int
    output: list[int] = field(default_factory=list)
    # Full pool: one entry per logical block; the node when the block is in the prefix cache.
    block_table: list[int] = field(default_factory=list)
    nodes: list[Node | None] = field(default_factory=list)
    # SWA pool: -1 where a block slid out of the window and was released.
    swa_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    # Cursors, so a decode step touches only its newest blocks: the leading blocks already in
    # the prefix cache (always contiguous from 0), and the leading SWA blocks already released.
    committed_blocks: int = 0
    swa_released: int = 0
    cached_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    admitted_once: bool = False
    finish_reason: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _gpu_uuid(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    raw = getattr(props, "uuid", None)
    return None if raw is None else f"GPU-{raw}"


class ReferenceEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        shape = config.shape
        bs = config.block_size
        self.device = _pick_device(config.device)
        self.gpu_uuid = _gpu_uuid(self.device)
        self.model = ToyModel(shape, self.device, seed=config.seed)

        full_bpt = shape.bytes_per_token(shape.full_layers)
        swa_bpt = shape.bytes_per_token(shape.swa_layers) if shape.hybrid else 0
        full_tokens = int(config.kv_memory_bytes / (full_bpt + config.swa_pool_ratio * swa_bpt))
        self.full_pool = BlockPool(
            "full", shape, shape.full_layers, full_tokens // bs, bs, self.device
        )
        self.swa_pool: BlockPool | None = None
        if shape.hybrid:
            swa_blocks = int(full_tokens * config.swa_pool_ratio) // bs
            self.swa_pool = BlockPool("swa", shape, shape.swa_layers, swa_blocks, bs, self.device)

        block_shape = tuple(self.full_pool.kv.shape[1:])
        self.host = (
            HostTier(config.host_tier_tokens // bs, (bs, *block_shape), DTYPES[shape.dtype])
            if config.host_tier_tokens
            else None
        )
        self.storage = (
            StorageTier(config.storage_dir, config.storage_tier_tokens // bs)
            if config.storage_dir is not None and config.storage_tier_tokens
            else None
        )
        self.cache = PrefixCache(self.full_pool, on_evict=self._back_up)

        self.groups = self._groups()
        self.max_concurrency = max_concurrency(
            {p.name: p.num_blocks for p in self.pools},
            [GroupFootprint(g.pool, g.blocks_per_request) for g in self.groups],
        )
        # vLLM's definition, so the same model reads the same capacity on every engine path.
        self.capacity_tokens = (
            None
            if self.max_concurrency is None
            else kv_cache_size_tokens(self.max_concurrency, config.max_model_len)
        )

        self.instance_id = uuid.uuid4().hex
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._ids = itertools.count()
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = dict.fromkeys(TIERS, 0)
        self.preemptions = 0
        self.iterations = 0
        self._sequence = 0
        self._snapshot = self._build_snapshot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------- shape

    @property
    def pools(self) -> list[BlockPool]:
        return [self.full_pool] + ([self.swa_pool] if self.swa_pool is not None else [])

    def _groups(self) -> tuple[KVGroup, ...]:
        cfg, shape = self.config, self.config.shape
        groups = [
            KVGroup(
                name="full",
                kind="full_attention",
                pool="full",
                blocks_per_request=full_attention_blocks(cfg.max_model_len, cfg.block_size),
            )
        ]
        if shape.hybrid:
            assert shape.sliding_window is not None
            groups.append(
                KVGroup(
                    name="swa",
                    kind="sliding_window",
                    pool="swa",
                    # One token in flight per step: prefill writes only the window's tail.
                    blocks_per_request=sliding_window_blocks(
                        cfg.max_model_len, cfg.block_size, shape.sliding_window, 1
                    ),
                    sliding_window=shape.sliding_window,
                )
            )
        return tuple(groups)

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
        if -(-(len(prompt) + max_tokens) // cfg.block_size) > self.full_pool.num_blocks:
            raise RequestRejected("request needs more KV blocks than the whole pool holds")
        swa = next((g for g in self.groups if g.pool == "swa"), None)
        if (
            self.swa_pool is not None
            and swa is not None
            and swa.blocks_per_request > self.swa_pool.num_blocks
        ):
            raise RequestRejected("the sliding-window pool is smaller than one request's window")
        request = Request(id=f"req-{next(self._ids)}", prompt=list(prompt), max_tokens=max_tokens)
        self._inbox.put(request)
        return request

    def generate(self, prompt: list[int], max_tokens: int, timeout: float = 60.0) -> Request:
        request = self.submit(prompt, max_tokens)
        if not request.done.wait(timeout):
            raise TimeoutError(f"{request.id} did not finish within {timeout} s")
        return request

    def snapshot(self) -> Snapshot:
        """The snapshot published after the last iteration: O(1), never blocks the loop."""
        return self._snapshot

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reference-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.storage is not None:
            self.storage.close()

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
        """One iteration: admit, prefill, decode, finish, publish."""
        started = time.perf_counter()
        while True:
            try:
                self.waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        admitted = self._admit()
        prefill_tokens = sum(len(r.tokens) - r.num_computed for r in admitted)
        for request in admitted:
            self._prefill(request)
        decoding = [r for r in self.running if r not in admitted]
        decoded = 0
        for request in decoding:
            if request in self.running and self._decode(request):
                decoded += 1
        self.iterations += 1
        self._publish()
        if self.config.log_iterations:
            self._log_iteration(
                len(admitted), prefill_tokens, decoded, time.perf_counter() - started
            )

    # ------------------------------------------------------------------ admission

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        while self.waiting and len(self.running) < self.config.max_running:
            request = self.waiting[0]
            if not self._allocate_for_admission(request):
                break
            self.waiting.popleft()
            self.running.append(request)
            admitted.append(request)
        return admitted

    def _allocate_for_admission(self, request: Request) -> bool:
        bs = self.config.block_size
        tokens = request.tokens
        # At least one token is computed so that prefill yields the next token's logits.
        cacheable = len(tokens) - 1
        hits = dict.fromkeys(TIERS, 0)
        for node in self.cache.match(tokens[:cacheable]):
            self.cache.pin(node)
            request.nodes.append(node)
            request.block_table.append(node.block)
            hits["device"] += bs
        self._load_from_lower_tiers(request, cacheable, hits)
        request.num_computed = len(request.block_table) * bs

        needed = -(-len(tokens) // bs) - len(request.block_table)
        for _ in range(needed):
            block = self.cache.allocate()
            if block is None:
                self._release(request)
                return False
            request.block_table.append(block)
            request.nodes.append(None)
        if self.swa_pool is not None and not self._allocate_swa(request, len(tokens)):
            self._release(request)
            return False

        if not request.admitted_once:
            request.admitted_once = True
            request.cached_tokens = hits
            self.prefix_query_tokens += len(request.prompt)
            for tier, count in hits.items():
                self.prefix_hit_tokens[tier] += count
        return True

    def _load_from_lower_tiers(
        self, request: Request, cacheable: int, hits: dict[str, int]
    ) -> None:
        if self.host is None and self.storage is None:
            return
        bs = self.config.block_size
        tokens = request.tokens
        parent = request.nodes[-1] if request.nodes else self.cache.root
        assert parent is not None
        pos = len(request.block_table) * bs
        while pos + bs <= cacheable:
            key = tuple(tokens[pos : pos + bs])
            digest = block_hash(parent.hash, key)
            tier, data = "host", self.host.get(digest) if self.host is not None else None
            if data is None:
                tier, data = (
                    "storage",
                    self.storage.get(digest) if self.storage is not None else None,
                )
            if data is None:
                return
            block = self.cache.allocate()
            if block is None:
                return
            self.full_pool.load_block(block, data.to(self.device))
            node = self.cache.insert(parent, key, block)
            assert node is not None, "match() stopped at this block, so it cannot be cached"
            request.nodes.append(node)
            request.block_table.append(block)
            hits[tier] += bs
            parent = node
            pos += bs

    def _allocate_swa(self, request: Request, length: int) -> bool:
        """SWA blocks for the window's tail of positions [0, length): older ones are never held."""
        assert self.swa_pool is not None and self.config.shape.sliding_window is not None
        bs = self.config.block_size
        first = max(0, length - self.config.shape.sliding_window) // bs
        request.swa_table = [-1] * first
        request.swa_released = first
        for _ in range(first, -(-length // bs)):
            block = self.swa_pool.pop_free()
            if block is None:
                return False
            request.swa_table.append(block)
        return True

    # ------------------------------------------------------------ prefill / decode

    def _write_kv(self, request: Request, start: int, end: int, prefill: bool) -> None:
        """Write K/V of positions [start, end); on prefill, rebuild the whole SWA window.

        SWA blocks are per-request and never cached (SGLang's SWA rings), so after a prefix
        hit the window's K/V for cached positions is recomputed, not read from the cache.
        """
        tokens = request.tokens
        full_layers = self.config.shape.full_layers
        swa_start = kv_start = start
        if self.swa_pool is not None:
            assert self.config.shape.sliding_window is not None
            window_start = max(0, end - self.config.shape.sliding_window)
            swa_start = window_start if prefill else max(start, window_start)
            kv_start = min(start, swa_start)
        kv = self.model.kv(tokens[kv_start:end], kv_start)
        self.full_pool.write(
            self.full_pool.slots(request.block_table, start, end),
            kv[start - kv_start :, :full_layers],
        )
        if self.swa_pool is not None:
            slots = self.swa_pool.slots(request.swa_table, swa_start, end)
            self.swa_pool.write(slots, kv[swa_start - kv_start :, full_layers:])
        request.num_computed = end
        self._commit_full_blocks(request)

    def _commit_full_blocks(self, request: Request) -> None:
        """Insert newly filled blocks into the prefix cache (and write them through to storage)."""
        bs = self.config.block_size
        tokens = request.tokens
        for i in range(request.committed_blocks, request.num_computed // bs):
            if request.nodes[i] is not None:
                request.committed_blocks = i + 1
                continue
            parent = self.cache.root if i == 0 else request.nodes[i - 1]
            if parent is None:
                return  # an uncached (duplicate) block breaks the chain: the rest stays private
            node = self.cache.insert(
                parent, tuple(tokens[i * bs : (i + 1) * bs]), request.block_table[i]
            )
            if node is None:
                return
            request.nodes[i] = node
            request.committed_blocks = i + 1
            if self.storage is not None:
                self.storage.put(node.hash, self.full_pool.block_data(node.block))

    def _next_token(self, request: Request) -> int:
        tokens = request.tokens
        n = len(tokens)
        full = self.full_pool.read(self.full_pool.slots(request.block_table, 0, n))
        keys, values = full[:, 0, 0], full[:, 0, 1]
        if self.swa_pool is not None:
            assert self.config.shape.sliding_window is not None
            start = max(0, n - self.config.shape.sliding_window)
            swa = self.swa_pool.read(self.swa_pool.slots(request.swa_table, start, n))
            keys = torch.cat([keys, swa[:, 0, 0]])
            values = torch.cat([values, swa[:, 0, 1]])
        return self.model.next_token(tokens[-1], keys, values)

    def _prefill(self, request: Request) -> None:
        self._write_kv(request, request.num_computed, len(request.tokens), prefill=True)
        self._emit(request, self._next_token(request))

    def _decode(self, request: Request) -> bool:
        """Write the last token's K/V and sample the next; False when the request was preempted."""
        position = len(request.tokens) - 1
        if not self._grow(request, position):
            return False
        self._write_kv(request, position, position + 1, prefill=False)
        self._emit(request, self._next_token(request))
        return True

    def _grow(self, request: Request, position: int) -> bool:
        bs = self.config.block_size
        if self.swa_pool is not None:
            self._slide_window(request, position)
        while True:
            need_full = position // bs >= len(request.block_table)
            need_swa = self.swa_pool is not None and position // bs >= len(request.swa_table)
            if not need_full and not need_swa:
                return True
            if need_full:
                block = self.cache.allocate()
                if block is not None:
                    request.block_table.append(block)
                    request.nodes.append(None)
                    continue
            elif self.swa_pool is not None:
                block = self.swa_pool.pop_free()
                if block is not None:
                    request.swa_table.append(block)
                    continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False

    def _slide_window(self, request: Request, position: int) -> None:
        """Release SWA blocks that attention at ``position`` can no longer see."""
        assert self.swa_pool is not None and self.config.shape.sliding_window is not None
        first_visible = max(0, position - self.config.shape.sliding_window + 1)
        for i in range(request.swa_released, first_visible // self.config.block_size):
            if request.swa_table[i] >= 0:
                self.swa_pool.release(request.swa_table[i])
                request.swa_table[i] = -1
            request.swa_released = i + 1

    def _emit(self, request: Request, token: int) -> None:
        request.output.append(token)
        if len(request.output) >= request.max_tokens:
            request.finish_reason = "length"
        elif len(request.tokens) >= self.config.max_model_len:
            request.finish_reason = "max_model_len"
        if request.finish_reason is not None:
            # Release at once: a finished request must never become a preemption victim.
            self._release(request)
            self.running.remove(request)
            request.done.set()

    # -------------------------------------------------------------- release paths

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop its KV (cached blocks stay evictable), requeue first."""
        self._release(request)
        self.running.remove(request)
        self.waiting.appendleft(request)
        self.preemptions += 1

    def _release(self, request: Request) -> None:
        for block, node in zip(request.block_table, request.nodes, strict=True):
            if node is not None:
                self.cache.unpin(node)
            else:
                self.full_pool.release(block)
        if self.swa_pool is not None:
            for block in request.swa_table:
                if block >= 0:
                    self.swa_pool.release(block)
        request.block_table, request.nodes, request.swa_table = [], [], []
        request.committed_blocks = request.swa_released = 0
        request.num_computed = 0

    def _back_up(self, node: Node) -> None:
        """Eviction hook: keep the block's K/V in host DRAM (HiCache L2) before reuse."""
        if self.host is not None:
            self.host.put(node.hash, self.full_pool.block_data(node.block))

    # ------------------------------------------------------------------ reporting

    def pool_counts(self, pool: BlockPool) -> tuple[int, int, int]:
        """(used, evictable, available) token slots; O(1)."""
        bs = pool.block_size
        evictable = self.cache.evictable_blocks if pool is self.full_pool else 0
        free = pool.num_free_blocks
        return (pool.num_blocks - free - evictable) * bs, evictable * bs, free * bs

    def _build_snapshot(self) -> Snapshot:
        pools = []
        for pool in self.pools:
            used, evictable, available = self.pool_counts(pool)
            pools.append(
                Pool(
                    name=pool.name,
                    block_size=pool.block_size,
                    capacity_slots=pool.capacity_slots,
                    used_slots=used,
                    evictable_slots=evictable,
                    available_slots=available,
                    bytes_per_slot=pool.bytes_per_slot,
                    device=str(self.device),
                    gpu_uuid=self.gpu_uuid,
                )
            )
        bs = self.config.block_size
        hits = {"device": self.prefix_hit_tokens["device"]}
        if self.host is not None:
            hits["host"] = self.prefix_hit_tokens["host"]
        if self.storage is not None:
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
            groups=self.groups,
            max_concurrency=self.max_concurrency,
            capacity_tokens=self.capacity_tokens,
            requests=Requests(running=len(self.running), waiting=len(self.waiting)),
            counters=Counters(
                prefix_query_tokens=self.prefix_query_tokens,
                prefix_hit_tokens=hits,
                evicted_tokens=self.cache.evicted_blocks * bs,
                preemptions=self.preemptions,
                iterations=self.iterations,
            ),
            host_tier=None
            if self.host is None
            else Tier(self.host.capacity_blocks * bs, self.host.used_blocks * bs),
            storage_tier=None
            if self.storage is None
            else Tier(self.storage.capacity_blocks * bs, self.storage.used_blocks * bs),
        )

    def _publish(self) -> None:
        self._snapshot = self._build_snapshot()

    def _log_iteration(
        self, prefills: int, prefill_tokens: int, decodes: int, seconds: float
    ) -> None:
        pool = self.full_pool
        used, evictable, _ = self.pool_counts(pool)
        used_blocks = used // pool.block_size
        tokens = sum(r.num_computed for r in self.running)
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
            tokens,
            100 * evictable / pool.capacity_slots,
            len(self.waiting),
        )

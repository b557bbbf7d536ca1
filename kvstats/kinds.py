"""The registry of target kinds: how the exporter reads each kind of engine endpoint.

One line per kind (node_exporter's ``registerCollector`` is the model). The exporter's config,
the CLIs' choices and the bridge dispatch all read it, so a new bridge is one module in
``engine_shim/bridges`` (a ``convert(text, now)`` function and the ``FAMILIES`` it reads) plus
one line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TargetKind:
    name: str  # the config's ``kind:``
    default_path: str  # appended to a target URL that has no path
    # ``None``: the endpoint serves kvcache.stats snapshots (JSON). Otherwise the module whose
    # ``convert(text, now)`` turns the engine's own /metrics text into snapshots, and whose
    # ``FAMILIES`` are the only metric families parsed out of that text.
    bridge: str | None = None


KINDS: dict[str, TargetKind] = {
    kind.name: kind
    for kind in (
        TargetKind("shim", "/v1/kv/stats"),
        TargetKind("vllm", "/metrics", bridge="engine_shim.bridges.vllm"),
        TargetKind("sglang", "/metrics", bridge="engine_shim.bridges.sglang"),
    )
}
TARGET_KINDS: tuple[str, ...] = tuple(KINDS)
BRIDGE_KINDS: tuple[str, ...] = tuple(k for k, v in KINDS.items() if v.bridge is not None)

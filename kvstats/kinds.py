"""The registry of kinds: how the exporter reads each kind of endpoint, and which engines a
snapshot may come from.

One line per kind (node_exporter's ``registerCollector`` is the model). The exporter's config,
the CLIs' choices, the bridge dispatch, the snapshot validator and the schema document all
read it when they run, so a new bridge is one module in ``engine_shim/bridges`` (a
``convert(text, now)`` function and the ``FAMILIES`` it reads) plus one ``register`` line here
(``tests/kvstats/test_kinds.py`` registers a toy one and follows it through).

Two names, two questions: a *target kind* (the config's ``kind:``) is how a URL is read (a
shim's JSON, or a bridge over an engine's own ``/metrics``); an *engine kind* (a snapshot's
``engine.kind``) is which engine the numbers describe. A vLLM engine is read either way.
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


KINDS: dict[str, TargetKind] = {}
ENGINES: list[str] = []  # engine kinds, in registration order


def register(kind: TargetKind | None = None, engine: str | None = None) -> None:
    """Add a target kind, an engine kind, or both (a bridge for a new engine)."""
    if kind is not None:
        KINDS[kind.name] = kind
    if engine is not None and engine not in ENGINES:
        ENGINES.append(engine)


register(TargetKind("shim", "/v1/kv/stats"), engine="reference")
register(TargetKind("vllm", "/metrics", bridge="engine_shim.bridges.vllm"), engine="vllm")
register(TargetKind("sglang", "/metrics", bridge="engine_shim.bridges.sglang"), engine="sglang")


def target_kinds() -> tuple[str, ...]:
    return tuple(KINDS)


def bridge_kinds() -> tuple[str, ...]:
    return tuple(name for name, kind in KINDS.items() if kind.bridge is not None)


def engine_kinds() -> tuple[str, ...]:
    return tuple(ENGINES)

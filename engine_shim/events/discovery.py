"""Where an engine publishes its KV events, from what the engine itself says, without I/O.

vLLM (0.32+) serves ``GET /kv_event_sources``: per DP rank the publisher config it runs, with
the endpoints it bound (``tcp://*:0`` resolved to its node IP and port); so does the reference
engine's shim. SGLang's ``GET
/server_info`` has a ``kv_events`` descriptor (its router's contract): a host, a base port
(rank r publishes on base + r), the topic, ``dp_size`` and the replay socket's base port. A
wildcard host (``*``, ``0.0.0.0``, ``::``) is where the engine binds, so the subscriber dials
the engine's own host, the one the target's URL names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# The path that describes an engine's publishers, by target kind (the reference engine's shim
# answers vLLM's).
DISCOVERY_PATHS = {
    "shim": "/kv_event_sources",
    "vllm": "/kv_event_sources",
    "sglang": "/server_info",
}

_TCP = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+|::):(\d{1,5})$")
_WILDCARDS = {"*", "0.0.0.0", "::", "[::]"}
MAX_RANKS = 256


@dataclass(frozen=True, slots=True)
class EventSource:
    """One DP rank's KV event publisher, as a subscriber dials it."""

    dp_rank: int
    endpoint: str
    replay_endpoint: str | None
    topic: str


class DiscoveryError(ValueError):
    """The engine's answer names no publisher a sidecar can subscribe to (and says why)."""


def discover_sources(kind: str, body: bytes, host: str) -> tuple[EventSource, ...]:
    """The publishers of a ``kind`` engine whose discovery path answered ``body``; ``host``
    is the engine's host in the target's URL."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise DiscoveryError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise DiscoveryError("expected a JSON object")
    sources = _sglang(data, host) if kind == "sglang" else _vllm(data, host)
    if not sources:
        raise DiscoveryError(
            "the engine publishes no KV events over zmq: start it with --kv-events-config"
            ' \'{"enable_kv_cache_events": true, "publisher": "zmq", ...}\''
        )
    return tuple(sorted(sources, key=lambda s: s.dp_rank))


def _vllm(data: dict[str, Any], host: str) -> list[EventSource]:
    if len(data) > MAX_RANKS:
        raise DiscoveryError(f"{len(data)} DP ranks (at most {MAX_RANKS} are followed)")
    sources = []
    for rank, config in data.items():
        if not isinstance(rank, str) or not rank.isdigit() or not isinstance(config, dict):
            raise DiscoveryError(f"DP rank {str(rank)[:20]!r}: not a rank and its config")
        if not config.get("enable_kv_cache_events") or config.get("publisher") != "zmq":
            continue
        replay = config.get("replay_endpoint")
        sources.append(
            EventSource(
                dp_rank=int(rank),
                endpoint=dialable(config.get("endpoint"), host),
                replay_endpoint=None if replay is None else dialable(replay, host),
                topic=_topic(config.get("topic", "")),
            )
        )
    return sources


def _sglang(data: dict[str, Any], host: str) -> list[EventSource]:
    described = data.get("kv_events")
    if described is None:
        return []
    if not isinstance(described, dict):
        raise DiscoveryError("kv_events: expected an object")
    if described.get("publisher") != "zmq":
        return []
    ranks = described.get("dp_size", 1)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or not 0 < ranks <= MAX_RANKS:
        raise DiscoveryError(f"kv_events.dp_size: {str(ranks)[:20]!r} is not 1-{MAX_RANKS}")
    endpoint_host = described.get("endpoint_host")
    if not isinstance(endpoint_host, str):
        raise DiscoveryError("kv_events.endpoint_host: expected a host")
    base = _port(described.get("endpoint_port_base"), ranks, "endpoint_port_base")
    replay = described.get("replay_endpoint_port_base")
    replay_base = None if replay is None else _port(replay, ranks, "replay_endpoint_port_base")
    topic = _topic(described.get("topic", ""))
    where = host if endpoint_host in _WILDCARDS else endpoint_host
    if ":" in where and not where.startswith("["):
        where = f"[{where}]"
    return [
        EventSource(
            dp_rank=rank,
            endpoint=dialable(f"tcp://{where}:{base + rank}", host),
            replay_endpoint=None
            if replay_base is None
            else dialable(f"tcp://{where}:{replay_base + rank}", host),
            topic=topic,
        )
        for rank in range(ranks)
    ]


def dialable(endpoint: object, host: str) -> str:
    """``endpoint`` as a subscriber dials it: TCP only, a wildcard host replaced by ``host``."""
    if not isinstance(endpoint, str):
        raise DiscoveryError(f"endpoint {str(endpoint)[:80]!r}: expected tcp://HOST:PORT")
    found = _TCP.match(endpoint)
    if not found:
        raise DiscoveryError(
            f"endpoint {endpoint[:80]!r}: only tcp://HOST:PORT is reachable from a sidecar"
        )
    port = int(found.group(2))
    if not 0 < port <= 65535:
        raise DiscoveryError(f"endpoint {endpoint[:80]!r}: port {port} is not a TCP port")
    where = found.group(1)
    if where in _WILDCARDS:
        where = f"[{host}]" if ":" in host else host
    return f"tcp://{where}:{port}"


def _port(value: object, ranks: int, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 65536 - ranks:
        raise DiscoveryError(f"kv_events.{key}: {str(value)[:20]!r} is not a TCP port")
    return value


def _topic(value: object) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise DiscoveryError(f"topic {str(value)[:40]!r}: expected a short string")
    return value

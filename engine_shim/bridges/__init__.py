"""Bridges: an engine's own Prometheus ``/metrics`` text -> ``kvcache.stats/v1`` snapshots.

For servers where nothing can be installed in-process. Pure functions over text (parsed with
prometheus_client's parser); a bridge returns the snapshots it could build and a list of what
the text did not say, and raises BridgeError only when it can build nothing truthful.
"""

from __future__ import annotations

import time

from ._samples import BridgeError, BridgeResult

__all__ = ["BRIDGE_KINDS", "BridgeError", "BridgeResult", "convert"]

BRIDGE_KINDS = ("vllm", "sglang")


def convert(kind: str, text: str, now: float | None = None) -> BridgeResult:
    """Translate one scrape of an engine's ``/metrics``; ``now`` stamps the snapshots."""
    stamp = time.time() if now is None else now
    if kind == "vllm":
        from .vllm import convert_vllm

        return convert_vllm(text, stamp)
    if kind == "sglang":
        from .sglang import convert_sglang

        return convert_sglang(text, stamp)
    raise BridgeError(f"no bridge for engine kind {kind!r} (have: {', '.join(BRIDGE_KINDS)})")

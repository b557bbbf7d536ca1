"""Bridges: an engine's own Prometheus ``/metrics`` text -> ``kvcache.stats`` snapshots.

For servers where nothing can be installed in-process. Pure functions over text (parsed with
prometheus_client's parser); a bridge returns the snapshots it could build and a list of what
the text did not say, and raises BridgeError only when it can build nothing truthful.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import cast

from kvstats.kinds import KINDS, bridge_kinds

from ._samples import BridgeError, BridgeResult

__all__ = ["BridgeError", "BridgeResult", "bridge", "convert"]


def bridge(kind: str) -> Callable[[str, float], BridgeResult]:
    """The registered bridge of ``kind`` (see ``kvstats.kinds``)."""
    spec = KINDS.get(kind)
    if spec is None or spec.bridge is None:
        raise BridgeError(f"no bridge for engine kind {kind!r} (have: {', '.join(bridge_kinds())})")
    return cast(Callable[[str, float], BridgeResult], importlib.import_module(spec.bridge).convert)


def convert(kind: str, text: str, now: float | None = None) -> BridgeResult:
    """Translate one scrape of an engine's ``/metrics``; ``now`` stamps the snapshots."""
    return bridge(kind)(text, time.time() if now is None else now)

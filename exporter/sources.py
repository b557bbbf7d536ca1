"""Fetch a target and turn its answer into snapshots; every failure is a PollError with a reason.

``shim`` targets serve ``kvcache.stats`` JSON (v2; v1 from older shims); ``vllm`` and
``sglang`` targets serve their engine's Prometheus text, which ``engine_shim.bridges``
translates into the same snapshots.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from kvstats.kinds import KINDS
from kvstats.snapshot import Snapshot, SnapshotError
from kvstats.validate import parse_snapshot

from . import families
from .config import Target
from .errors import ERROR_REASONS, PollError
from .fetch import Connection

__all__ = ["ERROR_REASONS", "PollError"]


class Client(Protocol):
    """What a poll needs of a target's connection (``fetch.Connection``; fakes in benchmarks)."""

    async def get(self, headers: dict[str, str], max_bytes: int, timeout: float) -> bytes: ...


def new_connection(target: Target, tls: ssl.SSLContext) -> Connection:
    """One kept-alive connection per target; the TLS context is shared (each one holds its own
    copy of the CA bundle, ~0.6 MB)."""
    return Connection(target.url, tls)


async def fetch(client: Client, target: Target, max_bytes: int) -> bytes:
    """GET the target's URL within its timeout, the whole answer included (a target that
    trickles bytes cannot hold a poll open); the body is refused past ``max_bytes``."""
    headers = {"User-Agent": "kvcache-exporter", "Accept-Encoding": "identity"}
    token = target.bearer_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return await client.get(headers, max_bytes, target.timeout)


def parse_shim_body(body: bytes) -> list[Snapshot]:
    """One snapshot object, or an array of them (one per data-parallel rank)."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise PollError("invalid_body", "JSON nested too deeply") from None
    except ValueError as exc:  # not JSON, not UTF-8, or an integer too long to convert
        raise PollError("invalid_body", f"not JSON: {exc}") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise PollError("invalid_snapshot", "an empty array of snapshots")
    try:
        snapshots = [parse_snapshot(item) for item in items]
    except SnapshotError as exc:
        raise PollError("invalid_snapshot", str(exc)) from None
    ranks = [s.engine.dp_rank for s in snapshots]
    if len(set(ranks)) != len(ranks):
        raise PollError("invalid_snapshot", f"duplicate dp_rank in {ranks}")
    return snapshots


def _bridge_parser(kind: str) -> Callable[[bytes], list[Snapshot]]:
    from engine_shim.bridges import BridgeError, bridge

    translate = bridge(kind)

    def parse(body: bytes) -> list[Snapshot]:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PollError("invalid_body", f"metrics text is not UTF-8: {exc}") from None
        try:
            return translate(text, time.time()).snapshots
        except BridgeError as exc:
            raise PollError("invalid_snapshot", str(exc)) from None

    return parse


def body_parser(kind: str) -> Callable[[bytes], list[Snapshot]]:
    """The kind's parser (see ``kvstats.kinds``): snapshots as JSON, or a bridge's."""
    return parse_shim_body if KINDS[kind].bridge is None else _bridge_parser(kind)


def series_estimate(snapshots: list[Snapshot], streams: int = 0) -> int:
    """An upper bound on the series these snapshots (and ``streams`` KV event streams) become
    (for the per-target cap)."""
    return families.series_estimate(
        [len(s.pools) for s in snapshots],
        [len(s.reuse_distance.bounds_tokens) for s in snapshots if s.reuse_distance],
        streams,
    )

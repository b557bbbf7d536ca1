"""Fetch a target and turn its answer into snapshots; every failure is a PollError with a reason.

``shim`` targets serve ``kvcache.stats/v1`` JSON; ``vllm`` and ``sglang`` targets serve their
engine's Prometheus text, which ``engine_shim.bridges`` translates into the same snapshots.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable

import httpx

from kvstats.kinds import KINDS
from kvstats.snapshot import Snapshot, SnapshotError, parse_snapshot

from . import families
from .config import Target

# Every reason a poll can fail; the error counter is pre-seeded with each at 0.
ERROR_REASONS = (
    "connect",
    "timeout",
    "http_status",
    "too_large",
    "invalid_body",
    "invalid_snapshot",
    "too_many_series",
    "duplicate_instance",
    "internal",
)


class PollError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in ERROR_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def new_transport(tls: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
    """One keep-alive connection per target: a shared pool scans all its connections on each
    request (polling became O(targets^2)), and the client layers (auth, redirects, cookies)
    cost a third of a poll's CPU for nothing a stats endpoint needs. The TLS context is
    shared: each one holds its own copy of the CA bundle (~0.6 MB)."""
    return httpx.AsyncHTTPTransport(
        verify=tls,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        trust_env=False,
    )


async def fetch(transport: httpx.AsyncHTTPTransport, target: Target, max_bytes: int) -> bytes:
    """GET the target's URL within its timeout, the whole answer included (a target that
    trickles bytes cannot hold a poll open); the body is refused past ``max_bytes``."""
    headers = {"Accept-Encoding": "identity", "User-Agent": "kvcache-exporter"}
    token = target.bearer_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    t = target.timeout
    request = httpx.Request(
        "GET",
        target.url,
        headers=headers,
        extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}},
    )
    try:
        async with asyncio.timeout(t):
            response = await transport.handle_async_request(request)
            try:
                if response.status_code != 200:
                    raise PollError("http_status", f"HTTP {response.status_code} from {target.url}")
                declared = response.headers.get("Content-Length")
                if (
                    declared is not None
                    and declared.isascii()
                    and declared.isdigit()
                    and (len(declared) > 18 or int(declared) > max_bytes)
                ):
                    raise PollError(
                        "too_large", f"Content-Length {declared} exceeds {max_bytes} bytes"
                    )
                chunks, size = [], 0
                assert isinstance(response.stream, httpx.AsyncByteStream)
                async for chunk in response.stream:
                    size += len(chunk)
                    if size > max_bytes:
                        raise PollError("too_large", f"body exceeds {max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
            finally:
                await response.aclose()
    except TimeoutError:
        raise PollError("timeout", f"no complete answer within {t} s") from None
    except httpx.TimeoutException as exc:
        raise PollError("timeout", f"no answer within {t} s ({type(exc).__name__})") from None
    except httpx.TransportError as exc:
        raise PollError("connect", f"{type(exc).__name__}: {exc}") from None


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


def series_estimate(snapshots: list[Snapshot]) -> int:
    """An upper bound on the series these snapshots become (for the per-target cap)."""
    return families.series_estimate([len(s.pools) for s in snapshots])

"""vLLM's own KV events, read by the exporter, against vLLM's own block pool.

A live engine (a small pool: evictions are routine) publishes its KV events with the zmq
publisher and a replay socket, both on ports it picks (``tcp://*:0``). The exporter (its own
process and venv, as deployed) reads the same engine twice: through the shim (exact) and as a
plain ``kind: vllm`` target with ``events: {discover: true}`` (the plug-in-free path: it asks
vLLM's ``/kv_event_sources`` where the streams are). It subscribes only after the first
phase, so it joins late and has to replay. After every phase the resident slots from events
equal the cached blocks of vLLM's pool (counted one block at a time inside the engine) and
the shim's figure, and the bounds from events contain the shim's exact evictable count. The
in-engine checker also holds the bounds against the exact count at every scheduler step
(``assert_every_step_counted_exactly``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.vllm_server import VllmServer

from .test_live_pressure import Chain
from .test_live_vllm import (
    BLOCK,
    MODELS,
    SHARED,
    assert_every_step_counted_exactly,
    unique_tokens,
    wait_idle,
)

POOL_BLOCKS = 48  # 47 usable
TOPIC = "kv-events"
SHIM, EVENTS = "live-shim", "live-events"


@pytest.fixture(scope="module", params=MODELS)
def events_server(
    request: pytest.FixtureRequest, models: dict[str, Path], workdir: Path
) -> Iterator[VllmServer]:
    events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:0",
        "replay_endpoint": "tcp://*:0",
        "topic": TOPIC,
    }
    server = VllmServer(
        models[request.param],
        workdir / f"events-{request.param}",
        extra_args=(
            "--num-gpu-blocks-override",
            str(POOL_BLOCKS),
            "--kv-events-config",
            json.dumps(events),
        ),
        # The node IP that tcp://*:0 binds; dev mode for POST /reset_prefix_cache.
        extra_env={"VLLM_HOST_IP": "127.0.0.1", "VLLM_SERVER_DEV_MODE": "1"},
    )
    with server.running():
        yield server


def exporter_samples(chain: Chain) -> dict[tuple[str, str, str], float]:
    """(name, engine, tier / bound / state / reason) -> value, from the exporter's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{chain.exporter_port}/metrics", timeout=5).text
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            extra = next(
                (s.labels[k] for k in ("tier", "bound", "state", "reason") if k in s.labels), ""
            )
            found[(s.name, s.labels.get("engine", ""), extra)] = s.value
    return found


def check_phase(chain: Chain, server: VllmServer, phase: str) -> dict[tuple[str, str, str], float]:
    """At rest after ``phase``: events, the shim and vLLM's pool agree on the cached blocks."""
    wait_idle(server)
    truth = server.checks()[-1]
    shim_cached, pool_cached = truth["cached"]
    assert shim_cached == pool_cached, (phase, truth)
    want = pool_cached * BLOCK
    seen: dict[tuple[str, str, str], float] = {}

    def settled() -> bool:
        nonlocal seen
        seen = exporter_samples(chain)
        return (
            seen.get(("kvcache_events_resident_whole", EVENTS, "")) == 1
            and seen.get(("kvcache_prefix_resident_slots", EVENTS, "device")) == want
            and seen.get(("kvcache_prefix_resident_slots", SHIM, "device")) == want
            and seen.get(("kvcache_pool_slots", SHIM, "evictable")) == truth["truth"][1] * BLOCK
        )

    try:
        chain.wait(settled, 60, f"{phase}: {want} resident slots from events and the shim")
    except AssertionError:
        raise AssertionError(f"{phase}: last seen {seen}") from None
    exact = seen[("kvcache_pool_slots", SHIM, "evictable")]
    lower = seen[("kvcache_pool_evictable_slots_bound", EVENTS, "lower")]
    upper = seen[("kvcache_pool_evictable_slots_bound", EVENTS, "upper")]
    assert lower <= exact <= upper, (phase, lower, exact, upper)
    assert ("kvcache_pool_slots", EVENTS, "evictable") not in seen  # never passed off as exact
    for engine in (EVENTS, SHIM):
        assert seen[("kvcache_events_batches_lost_total", engine, "")] == 0, (phase, engine)
        assert seen[("kvcache_events_resident_whole", engine, "")] == 1, (phase, engine)
    errors = {k: v for k, v in seen.items() if k[0] == "kvcache_events_errors_total" and v}
    assert not errors, (phase, errors)
    return seen


def test_resident_blocks_from_vllms_events_equal_its_pool_after_every_phase(
    events_server: VllmServer, tmp_path: Path
) -> None:
    server = events_server
    sources = server.kv_event_sources()
    (source,) = sources.values()
    assert source["topic"] == TOPIC and source["endpoint"].startswith("tcp://127.0.0.1:")

    # Phase 1, before the exporter subscribes: requests sharing a 3-block prefix.
    for i in range(4):
        server.complete(SHARED + unique_tokens(i, 200), 16)
    wait_idle(server)
    assert server.checks()[-1]["cached"][1] > 0

    # The exporter asks vLLM where its streams are (GET /kv_event_sources), as a user would.
    events = {"discover": True}
    chain = Chain(
        server,
        tmp_path,
        targets=[
            # The shim's port says where vLLM's streams are too: their health beside its counts.
            {"name": SHIM, "kind": "shim", "url": server.shim_url, "events": events},
            {"name": EVENTS, "kind": "vllm", "url": server.url, "events": events},
        ],
    )
    chain.start_exporter()
    try:
        seen = check_phase(chain, server, "shared prefix, joined late")
        assert seen[("kvcache_events_replayed_batches_total", EVENTS, "")] > 0

        # Phase 2: unique prompts that do not fit together. Once no empty block is left, every
        # block vLLM allocates is an evicted cached one (BlockRemoved, then BlockStored).
        first = len(server.checks())
        for i in range(8):
            server.complete(unique_tokens(100 + i, 1000), 8)
        check_phase(chain, server, "evictions")
        steps = server.checks()[first:]
        full = next(i for i, c in enumerate(steps) if c["truth"][2] == 0)
        assert full < len(steps) - 10, "the pool never ran out of empty blocks: nothing evicted"

        # Phase 3: vLLM drops its whole prefix cache (AllBlocksCleared). vLLM publishes the
        # events a scheduler step took, so an idle engine's reset reaches the stream with its
        # next step: a prompt shorter than a block (nothing to cache) is that step.
        response = httpx.post(f"{server.url}/reset_prefix_cache", timeout=30)
        assert response.status_code == 200, response.text
        server.complete(unique_tokens(300, 20), 4)
        seen = check_phase(chain, server, "reset_prefix_cache")
        assert seen[("kvcache_prefix_resident_slots", EVENTS, "device")] == 0

        # Phase 4: caching again after the reset, the shared prefix hit again.
        for i in range(3):
            server.complete(SHARED + unique_tokens(200 + i, 300), 8)
        seen = check_phase(chain, server, "after the reset")
        assert seen[("kvcache_prefix_resident_slots", EVENTS, "device")] > 0
    finally:
        chain.stop()
    assert_every_step_counted_exactly(server)

"""Reference engine behaviour on its own loop thread: workloads, tiers, hybrid capacity, logs."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pytest

from engine_shim.reference import EngineConfig, ModelShape, ReferenceEngine
from engine_shim.reference.workload import Workload
from kvstats.capacity import cdiv


def running(config: EngineConfig) -> ReferenceEngine:
    engine = ReferenceEngine(config)
    engine.start()
    return engine


def wait_rounds(workload: Workload, rounds: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while workload.rounds < rounds:
        assert time.monotonic() < deadline, f"only {workload.rounds} rounds in {timeout} s"
        time.sleep(0.02)


def test_agentic_workload_reproduces_sglangs_motivating_case() -> None:
    """After sub-agents finish: active usage < 10 % while physical occupancy > 50 %."""
    config = EngineConfig(kv_memory_bytes=8 * 2**20, max_model_len=2048, iteration_time=0.002)
    engine = running(config)
    workload = Workload(engine, "agentic", seed=1, pause=2.0)
    workload.start()
    try:
        wait_rounds(workload, 4)
        time.sleep(0.2)  # inside the pause between rounds: only the lead agent runs
        full = engine.snapshot().pool("full")
        assert full is not None and full.evictable_slots is not None
        active = full.used_slots / full.capacity_slots
        physical = (full.used_slots + full.evictable_slots) / full.capacity_slots
        print(
            f"agentic: active {active:.1%}, physical {physical:.1%}, evictable"
            f" {full.evictable_slots / full.capacity_slots:.1%} of {full.capacity_slots} tokens"
        )
        assert active < 0.10
        assert physical > 0.50
        assert engine.snapshot().counters.prefix_hit_tokens["device"] > 0
    finally:
        workload.stop()
        engine.stop()


def test_burst_workload_drives_the_pool_into_preemption() -> None:
    config = EngineConfig(kv_memory_bytes=2 * 2**20, max_model_len=512, iteration_time=0.0)
    engine = running(config)
    workload = Workload(engine, "burst", seed=2, pause=0.1)
    workload.start()
    try:
        wait_rounds(workload, 1)
        snap = engine.snapshot()
        assert snap.counters.preemptions and snap.counters.preemptions > 0
    finally:
        workload.stop()
        engine.stop()


def test_chat_workload_reuses_conversation_history() -> None:
    engine = running(
        EngineConfig(kv_memory_bytes=4 * 2**20, max_model_len=1024, iteration_time=0.001)
    )
    workload = Workload(engine, "chat", seed=3)
    workload.start()
    try:
        wait_rounds(workload, 12)
        counters = engine.snapshot().counters
        assert counters.prefix_hit_tokens["device"] > 0
        assert counters.prefix_query_tokens and counters.prefix_query_tokens > 0
    finally:
        workload.stop()
        engine.stop()


def test_storage_tier_hit_survives_an_engine_restart(tmp_path: Path) -> None:
    config = EngineConfig(
        kv_memory_bytes=2**20,
        max_model_len=512,
        iteration_time=0.0,
        storage_dir=tmp_path / "l3",
        storage_tier_tokens=4096,
    )
    prompt = list(range(100, 300))
    first = running(config)
    try:
        before = first.generate(prompt, 8)
    finally:
        first.stop()  # flushes the write-through queue
    assert list((tmp_path / "l3").glob("*.kvblock")), "nothing was persisted"

    second = running(config)
    try:
        assert second.instance_id != first.instance_id
        after = second.generate(prompt, 8)
        assert after.cached_tokens["device"] == 0
        assert after.cached_tokens["storage"] == (len(prompt) - 1) // 16 * 16
        assert after.output == before.output
        snap = second.snapshot()
        assert snap.counters.prefix_hit_tokens["storage"] == after.cached_tokens["storage"]
        assert snap.storage_tier is not None and snap.storage_tier.used_tokens > 0
    finally:
        second.stop()


def test_host_tier_serves_prefixes_evicted_from_the_device() -> None:
    config = EngineConfig(
        kv_memory_bytes=2**20, max_model_len=512, iteration_time=0.0, host_tier_tokens=8192
    )
    engine = running(config)
    try:
        capacity = engine.full_pool.capacity_slots
        first = engine.generate(list(range(200)), 4)
        # Push the first prompt's blocks out of the device pool with other prompts.
        for i in range(capacity // 400 + 2):
            engine.generate([(7 * i + j) % 4000 for j in range(400)], 4)
        again = engine.generate(list(range(200)), 4)
        assert again.cached_tokens["host"] > 0
        assert again.output == first.output
        snap = engine.snapshot()
        assert snap.counters.evicted_tokens and snap.counters.evicted_tokens > 0
        assert (
            snap.host_tier is not None
            and 0 < snap.host_tier.used_tokens <= snap.host_tier.capacity_tokens
        )
    finally:
        engine.stop()


def test_hybrid_max_concurrency_follows_the_group_aware_formula() -> None:
    """Worked example: full + SWA pools; the SWA pool, not blocks x bs / L, is the bound."""
    shape = ModelShape(
        num_layers=4,
        num_kv_heads=2,
        head_dim=32,
        dtype="float16",
        swa_layers=2,
        sliding_window=1024,
    )
    config = EngineConfig(
        shape=shape,
        block_size=16,
        kv_memory_bytes=2**24,
        max_model_len=4096,
        swa_pool_ratio=0.1,
        iteration_time=0.0,
    )
    engine = ReferenceEngine(config)
    # 512 B per token in each pool; 16 MiB / (512 + 0.1 x 512) = 29789 full tokens.
    assert engine.full_pool.num_blocks == 29789 // 16 == 1861
    assert engine.swa_pool is not None and engine.swa_pool.num_blocks == 2978 // 16 == 186
    full_per_req, swa_per_req = cdiv(4096, 16), cdiv(1024, 16) + 1
    assert [g.blocks_per_request for g in engine.groups] == [256, 65]
    naive = engine.full_pool.num_blocks * 16 / 4096  # 7.27: what dashboards compute
    expected = min(1861 / full_per_req, 186 / swa_per_req)  # 2.86: the SWA pool binds
    assert engine.max_concurrency == pytest.approx(expected)
    assert engine.max_concurrency == pytest.approx(186 / 65)
    assert naive == pytest.approx(7.26953125)
    assert engine.snapshot().max_concurrency == engine.max_concurrency
    # Token capacity by vLLM's definition, int(max concurrency x max_model_len):
    # int(186 / 65 x 4096) = 11,720 tokens, not the full pool's 1,861 x 16 = 29,776 slots.
    snap = engine.snapshot()
    assert snap.capacity_tokens == int(186 / 65 * 4096) == 11_720
    full = snap.pool("full")
    assert full is not None and full.capacity_slots == 29_776


def test_iteration_log_line(caplog: pytest.LogCaptureFixture) -> None:
    config = dataclasses.replace(
        EngineConfig(kv_memory_bytes=2**20, iteration_time=0.0), log_iterations=True
    )
    engine = ReferenceEngine(config)
    caplog.set_level(logging.INFO, logger="engine_shim.iterations")
    request = engine.submit(list(range(40)), 3)
    while not request.done.is_set():
        engine.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "engine_shim.iterations"]
    assert len(lines) == 3
    assert lines[0].startswith("iteration 1: prefill 1 req 40 tok, decode 0 req 0 tok,")
    assert "kv cache: 4.7% (3/64 blocks, 40 tokens)" in lines[0]
    assert "decode 1 req 1 tok" in lines[1]


def test_rejects_requests_that_can_never_run() -> None:
    from engine_shim.reference import RequestRejected

    engine = ReferenceEngine(EngineConfig(kv_memory_bytes=2**20, max_model_len=128))
    for prompt, max_tokens, message in [
        ([], 4, "must not be empty"),
        ([1] * 10, 0, "at least 1"),
        ([1] * 120, 16, "exceeds max_model_len"),
        ([10**6], 4, "token ids"),
    ]:
        with pytest.raises(RequestRejected, match=message):
            engine.submit(prompt, max_tokens)


def cached_blocks(engine: ReferenceEngine) -> int:
    """Nodes of the radix tree (blocks in the prefix cache), counted by walking it."""
    todo, count = [engine.cache.root], -1
    while todo:
        node = todo.pop()
        count += 1
        todo.extend(node.children.values())
    return count


def test_kv_events_on_vllms_wire_protocol_track_the_prefix_cache() -> None:
    """The engine publishes vLLM-shaped KV events; the exporter's own subscriber, joining
    late (replay) and following a workload with evictions, ends with the cache's block count."""
    import asyncio
    import json
    import threading

    import zmq.asyncio

    from engine_shim.events.discovery import discover_sources
    from engine_shim.events.stream import EventStreamState
    from exporter.config import EventsConfig
    from exporter.event_streams import EventSubscriber

    config = EngineConfig(
        kv_memory_bytes=2 * 2**20,
        max_model_len=512,
        iteration_time=0.0,
        kv_events_endpoint="tcp://127.0.0.1:0",
        kv_events_replay_endpoint="tcp://127.0.0.1:0",
    )
    engine = running(config)
    workload = Workload(engine, "burst", seed=2, pause=0.1)
    workload.start()
    state = EventStreamState()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    context = zmq.asyncio.Context()
    following: asyncio.Task[None] | None = None

    async def follow(subscriber: EventSubscriber) -> asyncio.Task[None]:
        return asyncio.ensure_future(subscriber.run())

    async def unfollow() -> None:
        if following is not None:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)

    try:
        wait_rounds(workload, 1)  # events published before anyone listens: replayed
        body = json.dumps(engine.kv_event_sources()).encode()
        (source,) = discover_sources("shim", body, "127.0.0.1")
        subscriber = EventSubscriber(source, EventsConfig(), state, context)
        following = asyncio.run_coroutine_threadsafe(follow(subscriber), loop).result(5)
        wait_rounds(workload, 3)
        workload.stop()
        deadline = time.monotonic() + 30
        while True:
            report = state.report()
            idle = not engine.running and not engine.waiting
            exact = (cached_blocks(engine),) * 2
            if idle and report.cached_blocks.get("device") == exact:
                break
            assert time.monotonic() < deadline, (report, cached_blocks(engine))
            time.sleep(0.05)
        assert report.whole and report.replayed_batches > 0 and report.lost_batches == 0
        assert sum(report.errors.values()) == 0, report.errors
        assert engine.cache.evicted_blocks > 0  # the small pool evicted: BlockRemoved came
    finally:
        workload.stop()
        asyncio.run_coroutine_threadsafe(unfollow(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        context.destroy(linger=0)
        engine.stop()

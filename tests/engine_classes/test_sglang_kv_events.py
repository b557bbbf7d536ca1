"""SGLang's KV events, made with SGLang's own classes and published by its own publisher.

SGLang cannot serve on this CPU (its kernels are CUDA-only), but its event module installs and
runs: ``scripts/test`` puts SGLang (``--no-deps``) on the path of the vLLM environment and runs
this folder there. Every tier SGLang names (HiCache's device, host, disk and external pools),
its signed 64-bit hashes, and its publisher's wire protocol (PUB frames, the replay ROUTER) go
through the exporter's own decoder and subscriber.
"""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import zmq.asyncio
from sglang.srt.disaggregation.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    StorageMedium,
    ZmqEventPublisher,
)

from engine_shim.events.decode import Cleared, Removed, Stored, decode_batch, fingerprint
from engine_shim.events.discovery import EventSource, discover_sources
from engine_shim.events.stream import EventStreamState
from exporter.config import EventsConfig
from exporter.event_streams import EventSubscriber

PAGE = 64  # SGLang's page size here: one BlockStored hash per page


def stored(hashes: list[int], medium: str | None) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=None,
        token_ids=list(range(PAGE * len(hashes))),
        block_size=PAGE,
        lora_id=None,
        medium=medium,
    )


def encode(batch: KVEventBatch) -> bytes:
    return msgspec.msgpack.Encoder().encode(batch)  # as SGLang's publisher thread does


def test_every_sglang_tier_decodes_to_its_own_tier() -> None:
    negative = -(2**63)  # SGLang hashes are signed int64 (its dynamo format's namespaced ones)
    batch = KVEventBatch(
        ts=time.time(),
        events=[
            stored([1, 2, negative], StorageMedium.GPU.value),
            stored([3], StorageMedium.CPU.value),
            stored([4, 5], StorageMedium.DISK.value),
            stored([6], StorageMedium.EXTERNAL.value),
            stored([7], None),  # medium left out (omit_defaults): the device pool
            BlockRemoved(block_hashes=[3], medium=StorageMedium.CPU.value),
            AllBlocksCleared(),
        ],
        attn_dp_rank=2,
    )
    decoded = decode_batch(encode(batch))
    assert decoded.dp_rank == 2
    kinds = [type(e) for e in decoded.events]
    assert kinds == [Stored] * 5 + [Removed, Cleared]
    tiers = [e.tier for e in decoded.events if isinstance(e, Stored | Removed)]
    assert tiers == ["device", "host", "storage", "external", "device", "host"]
    first = decoded.events[0]
    assert isinstance(first, Stored)
    assert first.fingerprints == [1, 2, fingerprint(negative)] and first.block_size == PAGE

    state = EventStreamState()
    state.take(0, encode(KVEventBatch(ts=1.0, events=batch.events[:6])), 1.0)
    report = state.report()
    assert report.whole and sum(report.errors.values()) == 0
    assert report.resident_slots == {
        "device": 4 * PAGE,
        "host": 0,
        "storage": 2 * PAGE,
        "external": PAGE,
    }


async def _subscribe_until(
    subscriber: EventSubscriber, done: object, publisher: ZmqEventPublisher
) -> None:
    task = asyncio.create_task(subscriber.run())
    try:
        deadline = time.monotonic() + 20
        while not done():  # type: ignore[operator]
            assert time.monotonic() < deadline, subscriber.state.report()
            # An empty batch now and then: a live batch dropped while the SUB socket was still
            # connecting shows up as a gap before the next one, which the replay refills.
            publisher.publish(KVEventBatch(ts=time.time(), events=[]))
            await asyncio.sleep(0.2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_sglangs_own_publisher_through_the_exporters_subscriber() -> None:
    publisher = ZmqEventPublisher(
        attn_dp_rank=0,
        endpoint="tcp://127.0.0.1:0",
        replay_endpoint="tcp://127.0.0.1:0",
        topic="kv-events",
        bind=True,
    )
    context: zmq.asyncio.Context | None = None
    try:
        # Before anyone subscribes: only the replay socket can bring these back.
        publisher.publish(KVEventBatch(ts=1.0, events=[stored([10, 11, 12], "GPU")]))
        publisher.publish(KVEventBatch(ts=2.0, events=[stored([10], "CPU_PINNED")]))
        publisher.publish(KVEventBatch(ts=3.0, events=[BlockRemoved(block_hashes=[12])]))
        time.sleep(0.5)  # its publisher thread has sent (to nobody) and buffered them
        # What the exporter's discovery makes of the descriptor SGLang's /server_info serves.
        endpoint, replay = publisher._local_pub_endpoint, publisher._local_replay_endpoint
        assert endpoint is not None and replay is not None
        server_info = {
            "kv_events": {
                "publisher": "zmq",
                "endpoint_host": "*",
                "endpoint_port_base": int(endpoint.rsplit(":", 1)[1]),
                "replay_endpoint_port_base": int(replay.rsplit(":", 1)[1]),
                "topic": "kv-events",
                "block_size": PAGE,
                "dp_size": 1,
            }
        }
        (source,) = discover_sources("sglang", json.dumps(server_info).encode(), "127.0.0.1")
        assert source == EventSource(0, endpoint, replay, "kv-events")
        state = EventStreamState()
        context = zmq.asyncio.Context()
        subscriber = EventSubscriber(source, EventsConfig(discover=True), state, context)

        def resident(device: int, host: int) -> bool:
            """Whole, with these blocks resident (a tier unseen since the last clear has no
            entry)."""
            report = state.report()
            slots = {tier: n for tier, n in report.resident_slots.items() if n or tier == "device"}
            want = {"device": device * PAGE, **({"host": host * PAGE} if host else {})}
            return report.whole and slots == want

        asyncio.run(_subscribe_until(subscriber, lambda: resident(2, 1), publisher))
        assert state.report().replayed_batches >= 3
        # Live batches from here on, then SGLang's cache flush.
        publisher.publish(KVEventBatch(ts=4.0, events=[stored([13, 14], "GPU")]))
        asyncio.run(_subscribe_until(subscriber, lambda: resident(4, 1), publisher))
        publisher.publish(KVEventBatch(ts=5.0, events=[AllBlocksCleared(), stored([20], None)]))
        asyncio.run(_subscribe_until(subscriber, lambda: resident(1, 0), publisher))
        report = state.report()
        assert report.lost_batches == 0 and sum(report.errors.values()) == 0, report
    finally:
        if context is not None:
            context.destroy(linger=0)
        publisher.shutdown()

"""What a KV event stream costs the sidecar: events per second on one core, bytes per block.

    .venv/bin/python bench/kv_events.py

A vLLM-shaped stream (tagged-map events as vLLM 0.32 sends them, block size 16, token ids
included): per batch a few prefill ``BlockStored`` of 16 blocks, many decode ``BlockStored`` of
one block and the ``BlockRemoved`` that keep the pool at its size. Side by side in one run:

- naive: msgspec decoding into plain Python objects, a ``collections.Counter`` of hashes (what
  a subscriber written in an afternoon does);
- ours: ``EventStreamState.take`` (typed msgspec decoding, which skips token ids without
  building them, and the 8-byte-per-block multiset), sequence bookkeeping included;
- ours over ZMQ: the exporter's own subscriber (asyncio, its SUB socket) reading the same
  batches from a PUB socket in another process, end to end.

Printed: events/s of each (goal: ours >= 100k events/s on one core), and the memory a
resident block costs in ours and in a Counter / set (tracemalloc, 1M blocks: the engine size
the issue names).
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_shim.events.residency import BlockMultiset
from engine_shim.events.stream import EventStreamState
from exporter.config import EventsConfig
from exporter.event_streams import EventSubscriber

BLOCK = 16
POOL = 200_000  # resident blocks the stream keeps at steady state
BATCHES = 400


def stored(hashes: list[int]) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": hashes[0] - 1,
        "token_ids": [random.randrange(150_000) for _ in range(BLOCK * len(hashes))],
        "block_size": BLOCK,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }


def removed(hashes: list[int]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", "group_idx": 0}


def workload() -> tuple[list[bytes], list[bytes], int]:
    """(warm-up batches filling the pool, steady-state batches, events in the steady ones)."""
    rng = random.Random(1)
    resident: list[int] = []
    fill = []
    for _ in range(0, POOL, 1024):
        hashes = [rng.getrandbits(63) for _ in range(1024)]
        resident += hashes
        fill.append(msgspec.msgpack.encode([0.0, [stored(hashes)], 0]))
    steady, events = [], 0
    for _ in range(BATCHES):
        batch: list[dict[str, Any]] = []
        for _ in range(4):  # prefills
            hashes = [rng.getrandbits(63) for _ in range(16)]
            batch.append(stored(hashes))
        for _ in range(64):  # decodes filling one block each
            batch.append(stored([rng.getrandbits(63)]))
        grown = sum(len(e["block_hashes"]) for e in batch)
        resident += [h for e in batch for h in e["block_hashes"]]
        gone = []
        for _ in range(grown):  # evictions keep the pool at its size
            i = rng.randrange(len(resident))
            resident[i], resident[-1] = resident[-1], resident[i]
            gone.append(resident.pop())
        for i in range(0, len(gone), 8):
            batch.append(removed(gone[i : i + 8]))
        events += len(batch)
        steady.append(msgspec.msgpack.encode([1.0, batch, 0]))
    return fill, steady, events


def naive(fill: list[bytes], steady: list[bytes]) -> float:
    counts: Counter[int] = Counter()

    def apply(payload: bytes) -> None:
        _, events, _ = msgspec.msgpack.decode(payload)
        for event in events:
            if event["type"] == "BlockStored":
                counts.update(event["block_hashes"])
            elif event["type"] == "BlockRemoved":
                counts.subtract(event["block_hashes"])

    for payload in fill:
        apply(payload)
    start = time.process_time()
    for payload in steady:
        apply(payload)
    return time.process_time() - start


def ours(fill: list[bytes], steady: list[bytes]) -> float:
    state = EventStreamState()
    for seq, payload in enumerate(fill):
        state.take(seq, payload, 0.0)
    start = time.process_time()
    for seq, payload in enumerate(steady, start=len(fill)):
        state.take(seq, payload, 0.0)
    elapsed = time.process_time() - start
    report = state.report()
    assert report.whole and sum(report.errors.values()) == 0, report
    assert report.cached_blocks["device"] == (1024 * len(fill),) * 2, report.cached_blocks
    return elapsed


PUBLISHER = textwrap.dedent("""
    import sys, zmq
    batches = [bytes.fromhex(line) for line in open(sys.argv[1]).read().split()]
    pub = zmq.Context().socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    print(pub.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    sys.stdin.readline()  # the subscriber is connected
    for seq, payload in enumerate(batches):
        pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
    sys.stdin.readline()
""")


def over_zmq(fill: list[bytes], steady: list[bytes], tmp: Path) -> tuple[float, float, int]:
    """(wall s, subscriber CPU s, batches lost) for the steady batches, through the exporter's
    own subscriber reading a PUB socket in another process."""
    batches = fill + steady
    (tmp / "batches.hex").write_text("\n".join(b.hex() for b in batches))
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(tmp / "batches.hex")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    port = int(proc.stdout.readline())
    state = EventStreamState()
    context = zmq.asyncio.Context()
    (source,) = EventsConfig(endpoint=f"tcp://127.0.0.1:{port}").sources()
    subscriber = EventSubscriber(source, EventsConfig(), state, context)

    async def run() -> tuple[float, float]:
        task = asyncio.create_task(subscriber.run())
        await asyncio.sleep(1.0)  # connected and subscribed
        proc.stdin.write("go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        while state.batches + state.lost_batches < len(fill):
            await asyncio.sleep(0.001)
        # The pool is full; the steady batches are queued behind: the subscriber's own rate.
        wall, cpu = time.perf_counter(), time.process_time()
        while state.batches + state.lost_batches < len(batches):
            await asyncio.sleep(0.001)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return wall, cpu

    try:
        wall, cpu = asyncio.run(run())
    finally:
        context.destroy(linger=0)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        proc.wait(timeout=10)
    return wall, cpu, state.lost_batches


def memory_per_block(blocks: int = 1_000_000) -> dict[str, float]:
    """Bytes per resident block (tracemalloc, after building each with ``blocks`` hashes)."""
    rng = random.Random(2)
    hashes = [rng.getrandbits(63) for _ in range(blocks)]
    found = {}
    for name, build in (
        ("ours (BlockMultiset)", _multiset),
        ("collections.Counter", Counter),
        ("set of ints", set),
    ):
        fresh = [h ^ 1 for h in hashes]  # ints not shared with the list above
        tracemalloc.start()
        kept: object = build(fresh)
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        found[name] = size / blocks
        del kept
    return found


def _multiset(hashes: list[int]) -> BlockMultiset:
    found = BlockMultiset()
    for h in hashes:
        found.add(h)
    return found


def main() -> None:
    import tempfile

    fill, steady, events = workload()
    size = sum(map(len, steady)) / len(steady)
    print(f"stream: {len(steady)} batches of {events / len(steady):.0f} events")
    print(f"        ({size / 1024:.0f} KiB each, token ids included), pool of {POOL:,} blocks")
    t_naive = min(naive(fill, steady) for _ in range(3))
    t_ours = min(ours(fill, steady) for _ in range(3))
    print(f"naive decode + Counter : {events / t_naive:>10,.0f} events/s (one core)")
    print(
        f"ours (EventStreamState): {events / t_ours:>10,.0f} events/s (one core)"
        f"  {t_naive / t_ours:.1f}x naive  (goal >= 100,000)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu, lost = over_zmq(fill, steady, Path(tmp))
    print(
        f"ours over ZMQ, end to end: {events / wall:>10,.0f} events/s wall,"
        f" {events / cpu:,.0f} per CPU second, {lost} batches lost"
    )
    for name, per_block in memory_per_block().items():
        print(f"memory per resident block, {name:<22}: {per_block:6.1f} bytes")


if __name__ == "__main__":
    main()

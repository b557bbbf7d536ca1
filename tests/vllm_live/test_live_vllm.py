"""A running vLLM engine (the CPU build, a tiny model made here), read by the shim and the bridge.

Per model (full attention: Llama; hybrid sliding-window + full: Gemma 2) one server runs with
vLLM's default pool (1 GiB) and one with a small pool under pressure. Every number is compared
exactly: with vLLM's own figures (its log, ``/metrics``), with a brute-force count of the pool
taken inside the engine after every scheduler call (``checking.py``), and with token counts
worked out by hand from the requests sent.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.vllm_server import MAX_MODEL_LEN, VllmServer
from engine_shim.bridges import convert
from kvstats.snapshot import Snapshot
from kvstats.validate import parse_snapshot

BLOCK = 128  # vLLM's CPU block size
SHARED = list(range(3, 3 + 3 * BLOCK))  # a 3-block prefix every request shares
UNIQUE = 200  # then 200 tokens of its own: one more full block and a partial one
OUTPUT = 16
MODELS = ("gemma2", "llama")  # hybrid (sliding-window + full attention) and full attention
# Each way of counting runs live: the what-if curve on (the general hooks) and off (the default:
# the counts fused into vLLM's own methods).
CURVE = {"gemma2": "on", "llama": "off"}
COUNTING = {"gemma2": "hooks", "llama": "fused"}


def unique_tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(400, 509) for _ in range(n)]


def samples(text: str, name: str) -> float:
    (value,) = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    return float(value)


def config_label(text: str, label: str) -> str:
    match = re.search(rf'^vllm:cache_config_info\{{.*?\b{label}="([^"]*)"', text, re.M)
    assert match, label
    return match.group(1)


def shim(server: VllmServer) -> Snapshot:
    return parse_snapshot(server.stats())


def wait_idle(server: VllmServer, timeout: float = 120) -> Snapshot:
    deadline = time.monotonic() + timeout
    while True:
        snap = shim(server)
        assert snap.requests is not None
        if snap.requests.running == 0 and snap.requests.waiting == 0:
            return snap
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.2)


def assert_every_step_counted_exactly(server: VllmServer) -> list[dict[str, Any]]:
    checks = server.checks()
    assert checks, "the checking scheduler wrote nothing"
    wrong = [c for c in checks if c["served"] != c["truth"]]
    assert not wrong, f"{len(wrong)} of {len(checks)} steps differ from the pool, e.g. {wrong[:3]}"
    wrong = [c for c in checks if c["tokens"][0] != c["tokens"][1]]
    assert not wrong, f"evictable prefix tokens differ from the pool's: {wrong[:3]}"
    assert {c["status"] for c in checks} == {"ok"}  # a supported release, sized before serving
    wrong = [c for c in checks if c["cached"][0] != c["cached"][1]]
    assert not wrong, f"resident (cached) blocks differ from the pool's: {wrong[:3]}"
    # The bounds a bridge publishes from a whole event stream hold the exact evictable count at
    # every step: bounds from the true cached count and vLLM's usage contain the true evictable.
    wrong = [c for c in checks if not c["bounds"][0] <= c["truth"][1] <= c["bounds"][1]]
    assert not wrong, f"evictable outside its bounds: {wrong[:3]}"
    for c in checks:  # vLLM's own usage sees only the pinned blocks
        used, evictable, available = c["truth"]
        assert c["vllm_usage"] == pytest.approx(used / (used + evictable + available))
    return checks


@pytest.fixture(scope="module", params=MODELS)
def idle_server(
    request: pytest.FixtureRequest, models: dict[str, Path], workdir: Path
) -> Iterator[VllmServer]:
    with VllmServer(
        models[request.param],
        workdir / f"idle-{request.param}",
        extra_env={"KVCACHE_SHIM_REUSE_DISTANCE": CURVE[request.param]},
    ).running() as server:
        yield server


# Evictable blocks per KV group after four requests (a shared 3-block prefix, a unique rest)
# and idle, and the prefix-hit tokens, worked out by hand. KV is computed for prompt + output - 1
# tokens (584 + 15 = 599): 4 full blocks per request, the first 3 shared.
# - Llama: one group; 3 shared + 4 x 1 unique = 7 blocks; requests 2-4 hit 384 tokens each.
# - Gemma 2: vLLM's sliding-window group keeps a request's blocks only inside the window (128
#   tokens), so the first request leaves just its last full block there (1). A hybrid hit needs
#   every group, so the second request misses and computes the prefix again: the full-attention
#   group now holds it twice (4 + 4) and the window group gains the prefix's last block and its
#   own (2). Requests 3 and 4 hit 384 tokens and add one unique block per group each.
EXPECTED = {
    "llama": ({"FullAttentionSpec": 7}, 3 * 384),
    "gemma2": ({"FullAttentionSpec": 4 + 4 + 1 + 1, "SlidingWindowSpec": 1 + 2 + 1 + 1}, 2 * 384),
}


def test_shared_prefix_then_idle(idle_server: VllmServer) -> None:
    server = idle_server
    kind = server.model.name
    for i in range(4):  # one after another: the order decides what vLLM caches
        server.complete(SHARED + unique_tokens(i, UNIQUE), OUTPUT)
    wait_idle(server)
    time.sleep(3)  # a quiet engine: its snapshot must still be fresh

    snap, text = shim(server), server.metrics()
    full = snap.pools[0]
    checks = assert_every_step_counted_exactly(server)
    expected_blocks, expected_hits = EXPECTED[kind]
    assert {c["counting"] for c in checks} == {COUNTING[kind]}
    assert {c["curve"] for c in checks} == {CURVE[kind] == "on"}
    assert checks[-1]["evictable_by_group"] == expected_blocks
    assert full.used_slots == 0
    assert full.evictable_slots == sum(expected_blocks.values()) * BLOCK
    assert samples(text, "vllm:kv_cache_usage_perc") == 0.0  # vLLM's blind spot
    assert time.time() - snap.time < 1.5, "an idle engine's snapshot went stale"

    # Capacity and concurrency: vLLM's own figures, exactly.
    assert snap.capacity_tokens == int(config_label(text, "kv_cache_size_tokens"))
    assert snap.max_concurrency == float(config_label(text, "kv_cache_max_concurrency"))
    logged = re.search(r"KV cache size: ([\d,]+) tokens", server.log())
    assert logged and snap.capacity_tokens == int(logged.group(1).replace(",", ""))
    num_blocks = int(config_label(text, "num_gpu_blocks"))
    assert full.capacity_slots == (num_blocks - 1) * BLOCK
    # One 1 GiB allocation (VLLM_CPU_KVCACHE_SPACE=1), counted once for every group.
    assert full.bytes_per_slot is not None
    assert full.bytes_per_slot * num_blocks * BLOCK == int(
        config_label(text, "kv_cache_memory_bytes")
    )

    # Counters: vLLM's, and by hand (4 prompts looked up; 3 of them hit the shared prefix).
    c = snap.counters
    assert c.prefix_query_tokens == samples(text, "vllm:prefix_cache_queries_total") == 4 * 584
    assert c.prefix_hit_tokens["device"] == samples(text, "vllm:prefix_cache_hits_total")
    assert c.prefix_hit_tokens["device"] == expected_hits
    assert c.preemptions == samples(text, "vllm:num_preemptions_total") == 0
    assert c.iterations == samples(text, "vllm:iteration_tokens_total_count")


def test_the_bridge_agrees_with_the_shim(idle_server: VllmServer) -> None:
    server = idle_server
    wait_idle(server)
    result = convert("vllm", server.metrics(), time.time())
    (bridged,), missing = result.snapshots, result.missing
    snap = shim(server)
    b, s = bridged.pools[0], snap.pools[0]
    assert (b.capacity_slots, b.used_slots, b.block_size) == (
        s.capacity_slots,
        s.used_slots,
        s.block_size,
    )
    assert b.bytes_per_slot == s.bytes_per_slot
    assert b.evictable_slots is None and any("evictable" in m for m in missing)
    assert bridged.capacity_tokens == snap.capacity_tokens
    assert bridged.max_concurrency == snap.max_concurrency
    assert bridged.max_model_len == snap.max_model_len == MAX_MODEL_LEN
    assert bridged.counters.prefix_query_tokens == snap.counters.prefix_query_tokens
    assert bridged.counters.prefix_hit_tokens["device"] == snap.counters.prefix_hit_tokens["device"]
    assert bridged.counters.preemptions == snap.counters.preemptions
    assert bridged.engine.model == snap.engine.model


def test_the_start_up_line_says_what_it_verified(idle_server: VllmServer) -> None:
    log = idle_server.log()
    line = next((x for x in log.splitlines() if "kvcache shim" in x and "verified" in x), None)
    assert line is not None, "the shim's start-up line is not in vLLM's log"
    assert "vllm 0.32.0" in line and "KVCacheBlock.{ref_cnt,_block_hash,is_null}" in line
    curve = CURVE[idle_server.model.name]
    assert f"what-if curve {curve}" in line
    assert ("counting fused into" in line) is (curve == "off")
    assert f"http://127.0.0.1:{idle_server.shim_port}/v1/kv/stats" in line


def test_a_busy_shim_port_never_stops_vllm(models: dict[str, Path], workdir: Path) -> None:
    """Two shim-enabled servers told the same stats port: both serve; the second says so loudly,
    and takes the port over once it is free (monitoring must never take serving down)."""
    small = ("--num-gpu-blocks-override", "48")
    first = VllmServer(models["llama"], workdir / "busy-a", extra_args=small)
    first.start()
    second: VllmServer | None = None
    try:
        first.wait_ready()  # its shim port is known from here on
        first_instance = shim(first).engine.instance_id
        second = VllmServer(
            models["llama"], workdir / "busy-b", shim_port=first.shim_port, extra_args=small
        )
        second.start()
        second.wait_ready()
        assert second.complete(SHARED, 4)["choices"][0]["finish_reason"] == "length"
        errors = [x for x in second.log().splitlines() if "cannot serve KV stats" in x]
        assert len(errors) == 1 and "ERROR" in errors[0], errors
        assert f"127.0.0.1:{first.shim_port}" in errors[0] and "KVCACHE_SHIM_LISTEN" in errors[0]
        assert shim(first).engine.instance_id == first_instance  # the port still answers for A
        first.stop()
        deadline = time.monotonic() + 30
        while True:  # the second engine's shim binds on its next retry
            try:
                snap = shim(second)
                if snap.engine.instance_id != first_instance:
                    break
            except (httpx.HTTPError, ValueError):
                pass  # not bound yet, or the first engine's socket closing
            assert time.monotonic() < deadline, "the second shim never took the free port"
            time.sleep(0.5)
        assert snap.counters.prefix_query_tokens == len(SHARED)  # the second engine's request
        assert "port free again" in second.log()
    finally:
        first.stop()
        if second is not None:
            second.stop()

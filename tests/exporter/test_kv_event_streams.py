"""KV event streams through the exporter: real ZMQ sockets, a publisher that speaks vLLM's wire
protocol (``tests/kv_publisher.py``) and misbehaves on request, the exporter's /metrics.

The vLLM target's scrape is the 0.33 fixture (one pool, no evictable count): the stream adds
resident slots per tier and evictable bounds while it is whole, and its own health always.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from devtools.static_server import spawn
from exporter import event_streams
from exporter.app import Exporter
from exporter.config import parse_config
from tests.exporter.test_exporter_behaviour import get, snapshot_json
from tests.helpers import CannedServer, body, wait_for
from tests.kv_publisher import Publisher

FIXTURES = Path(__file__).parents[1] / "fixtures"
VLLM_METRICS = (FIXTURES / "vllm-0.33.0-dp1.prom").read_bytes()
BLOCK = 16


def stored(hashes: list[int], medium: str | None = "GPU", group: int = 0) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": list(range(BLOCK * len(hashes))),
        "block_size": BLOCK,
        "lora_id": None,
        "medium": medium,
        "group_idx": group,
    }


def removed(hashes: list[int], medium: str | None = "GPU") -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


CLEARED = {"type": "AllBlocksCleared"}


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    made: list[Publisher] = []
    yield made
    for publisher in made:
        publisher.close()


@pytest.fixture
def vllm_server(servers: list[CannedServer]) -> CannedServer:
    server = CannedServer(body(VLLM_METRICS, content_type="text/plain; version=0.0.4"))
    servers.append(server)
    return server


def vllm_target(name: str, url: str, publisher: Publisher, **events: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"endpoint": publisher.endpoint, "replay_timeout": "1s", **events}
    if publisher.replay_port is not None and "replay_endpoint" not in events:
        config["replay_endpoint"] = publisher.replay_endpoint
    return {"name": name, "kind": "vllm", "url": url, "events": config}


def start(*targets: dict[str, Any], interval: float = 0.2) -> Exporter:
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "poll_interval": interval,
            "timeout": interval,
            "nvml": "off",
            "targets": list(targets),
        }
    )
    exporter = Exporter(config)
    exporter.start()
    return exporter


def stream(exporter: Exporter, engine: str, rank: str = "0") -> dict[str, float]:
    """The stream's series (and the engine's resident slots / bounds) keyed by name{label}."""
    text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("engine") != engine or s.labels.get("dp_rank", rank) != rank:
                continue
            extra = {k: v for k, v in s.labels.items() if k in ("tier", "bound", "reason")}
            key = s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(extra.items()))
            found[key] = s.value
    return found


def settled(exporter: Exporter, engine: str, want: dict[str, float], rank: str = "0") -> None:
    """Wait until the exporter's /metrics show ``want`` (a poll after the batches landed)."""
    last: dict[str, float] = {}

    def matches() -> bool:
        nonlocal last
        last = stream(exporter, engine, rank)
        return all(last.get(k) == v for k, v in want.items())

    deadline = time.monotonic() + 10
    while not matches():
        assert time.monotonic() < deadline, "never saw (want, last) " + repr(
            {k: (v, last.get(k)) for k, v in want.items()}
        )
        time.sleep(0.05)


def resident(device: int = 0, host: int = 0) -> dict[str, float]:
    """The resident-slot series of a whole stream (a tier with no block has no series)."""
    want: dict[str, float] = {"kvcache_prefix_resident_slots{tier=device}": device * BLOCK}
    if host:
        want["kvcache_prefix_resident_slots{tier=host}"] = host * BLOCK
    return want


# ------------------------------------------------------------------------ the happy path


def test_a_whole_stream_gives_resident_slots_by_tier_and_evictable_bounds(
    vllm_server: CannedServer, publishers: list[Publisher]
) -> None:
    publisher = Publisher()
    publishers.append(publisher)
    exporter = start(vllm_target("vllm-a", vllm_server.url, publisher))
    try:
        settled(exporter, "vllm-a", {"kvcache_events_resident_whole": 1})
        publisher.wait_subscribed()
        publisher.publish([stored(list(range(40))), stored([1, 2, 3], "CPU")])
        publisher.publish([removed([0, 1])])
        settled(
            exporter,
            "vllm-a",
            {
                **resident(device=38, host=3),
                "kvcache_events_batches_total": 2,
                "kvcache_events_total": 3,
                "kvcache_events_batches_lost_total": 0,
                "kvcache_events_resident_whole": 1,
            },
        )
        seen = stream(exporter, "vllm-a")
        capacity = get(exporter, "kvcache_pool_capacity_slots", engine="vllm-a")[0]
        used = get(exporter, "kvcache_pool_slots", engine="vllm-a", state="used")[0]
        lower = seen["kvcache_pool_evictable_slots_bound{bound=lower}"]
        upper = seen["kvcache_pool_evictable_slots_bound{bound=upper}"]
        assert lower == max(0, 38 * BLOCK - used) and lower <= upper <= capacity - used
        # Never passed off as the exact count.
        assert get(exporter, "kvcache_pool_slots", engine="vllm-a", state="evictable") == []
        assert seen["kvcache_events_last_batch_age_seconds"] < 5
    finally:
        exporter.stop()


@pytest.mark.parametrize("legacy", [False, True], ids=["vllm-0.31+", "topicless-replay"])
def test_joining_late_replays_from_zero_and_is_whole(
    legacy: bool, vllm_server: CannedServer, publishers: list[Publisher]
) -> None:
    publisher = Publisher(legacy_replay=legacy)
    publishers.append(publisher)
    for i in range(5):  # published before the exporter came
        publisher.publish([stored([i])], send=False)
    exporter = start(vllm_target("vllm-a", vllm_server.url, publisher))
    try:
        settled(exporter, "vllm-a", {**resident(device=5), "kvcache_events_resident_whole": 1})
        publisher.wait_subscribed()
        publisher.publish([stored([5, 6])])
        settled(exporter, "vllm-a", {**resident(device=7), "kvcache_events_resident_whole": 1})
        seen = stream(exporter, "vllm-a")
        assert seen["kvcache_events_replayed_batches_total"] == 5
        assert seen["kvcache_events_batches_lost_total"] == 0
    finally:
        exporter.stop()


def test_an_engine_that_published_nothing_yet_is_whole_and_empty(
    vllm_server: CannedServer, publishers: list[Publisher]
) -> None:
    publisher = Publisher()
    publishers.append(publisher)
    exporter = start(vllm_target("vllm-a", vllm_server.url, publisher))
    try:
        settled(exporter, "vllm-a", {**resident(), "kvcache_events_resident_whole": 1})
        assert publisher.replays == 1
    finally:
        exporter.stop()


def test_without_a_replay_socket_a_gap_is_lost_until_all_blocks_cleared(
    vllm_server: CannedServer, publishers: list[Publisher]
) -> None:
    publisher = Publisher(replay=False)
    publishers.append(publisher)
    exporter = start(vllm_target("vllm-a", vllm_server.url, publisher))
    try:
        publisher.wait_subscribed()
        publisher.publish([stored([1, 2])])
        settled(exporter, "vllm-a", {**resident(device=2), "kvcache_events_resident_whole": 1})
        for i in range(3):
            publisher.publish([stored([10 + i])], send=False)  # missed
        publisher.publish([stored([3])])
        settled(
            exporter,
            "vllm-a",
            {"kvcache_events_batches_lost_total": 3, "kvcache_events_resident_whole": 0},
        )
        seen = stream(exporter, "vllm-a")
        # Not whole: no resident count and no bounds, rather than numbers that look exact.
        assert not any(k.startswith("kvcache_prefix_resident_slots") for k in seen)
        assert not any(k.startswith("kvcache_pool_evictable_slots_bound") for k in seen)
        publisher.publish([CLEARED, stored([7])])
        settled(exporter, "vllm-a", {**resident(device=1), "kvcache_events_resident_whole": 1})
        assert stream(exporter, "vllm-a")["kvcache_events_batches_lost_total"] == 3
    finally:
        exporter.stop()


def test_with_a_replay_socket_a_gap_is_replayed_not_lost(
    vllm_server: CannedServer, publishers: list[Publisher]
) -> None:
    publisher = Publisher()
    publishers.append(publisher)
    exporter = start(vllm_target("vllm-a", vllm_server.url, publisher))
    try:
        settled(exporter, "vllm-a", {"kvcache_events_resident_whole": 1})  # the first replay
        publisher.wait_subscribed()
        publisher.publish([stored([1])])
        for i in range(3):
            publisher.publish([stored([10 + i])], send=False)
        publisher.publish([removed([1])])
        settled(
            exporter,
            "vllm-a",
            {
                **resident(device=3),
                "kvcache_events_resident_whole": 1,
                "kvcache_events_batches_lost_total": 0,
                "kvcache_events_replayed_batches_total": 3,
            },
        )
    finally:
        exporter.stop()


# ----------------------------------------------------------------------------- bad input


def _garbage(p: Publisher) -> None:
    p.publish_raw(b"\xc1 not msgpack")


def _wrong_shape(p: Publisher) -> None:
    p.send_frames([b"", b"short", b"x"])
    p.send_frames([b""])


def _oversize(p: Publisher) -> None:
    p.publish([stored(list(range(60)))])  # past the 1 KiB limit, within ZMQ's (8 KiB)


def _seq_backwards(p: Publisher) -> None:
    p.publish_raw(msgspec.msgpack.encode([1.0, [], 0]), seq=max(1, p.seq - 1))


def _unknown_event(p: Publisher) -> None:
    p.publish([{"type": "BlockPinned", "block_hashes": [1]}])


def _unknown_medium(p: Publisher) -> None:
    p.publish([stored([1], medium="HBM4-FAR")])


def _unknown_block(p: Publisher) -> None:
    p.publish([removed([123456])])


def _bad_event(p: Publisher) -> None:
    p.publish([{"type": "BlockStored", "block_hashes": "not a list"}])


HOSTILE = {
    "garbage": (_garbage, "invalid_batch", False),
    "wrong-shape": (_wrong_shape, "invalid_frame", False),
    "oversize": (_oversize, "oversize", False),
    "seq-backwards": (_seq_backwards, "seq_backwards", False),
    "unknown-event": (_unknown_event, "unknown_event", False),
    "unknown-medium": (_unknown_medium, "unknown_medium", True),
    "unknown-block": (_unknown_block, "unknown_block", False),
    "bad-event": (_bad_event, "invalid_event", False),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_publisher_is_counted_by_reason_and_costs_only_its_target(
    case: str, vllm_server: CannedServer, servers: list[CannedServer], publishers: list[Publisher]
) -> None:
    misbehave, reason, stays_whole = HOSTILE[case]
    publisher = Publisher(replay=False)
    publishers.append(publisher)
    shim = CannedServer(body(snapshot_json()))
    servers.append(shim)
    exporter = start(
        vllm_target("vllm-a", vllm_server.url, publisher, max_batch_bytes="1KiB"),
        {"name": "shim-b", "kind": "shim", "url": shim.url},
    )
    try:
        publisher.wait_subscribed()
        for i in range(3):
            publisher.publish([stored([i])])
        settled(exporter, "vllm-a", {**resident(device=3), "kvcache_events_resident_whole": 1})
        misbehave(publisher)
        settled(
            exporter,
            "vllm-a",
            {f"kvcache_events_errors_total{{reason={reason}}}": 1 + (case == "wrong-shape")},
        )
        seen = stream(exporter, "vllm-a")
        assert seen["kvcache_events_resident_whole"] == (1 if stays_whole else 0), seen
        others = {k: v for k, v in seen.items() if k.startswith("kvcache_events_errors_total")}
        assert sum(others.values()) == 1 + (case == "wrong-shape"), others
        # The other target and the vLLM target's own scrape go on.
        polls = get(exporter, "kvcache_exporter_polls_total", engine="shim-b")[0]
        wait_for(
            lambda: get(exporter, "kvcache_exporter_polls_total", engine="shim-b")[0] > polls + 2,
            10,
            "the other target's polls",
        )
        assert get(exporter, "kvcache_exporter_target_up", engine="shim-b") == [1]
        assert get(exporter, "kvcache_exporter_target_up", engine="vllm-a") == [1]
        # The stream goes on too: an AllBlocksCleared makes the count whole again.
        publisher.publish([CLEARED, stored([42])])
        settled(exporter, "vllm-a", {**resident(device=1), "kvcache_events_resident_whole": 1})
    finally:
        exporter.stop()


def test_a_frame_past_zmqs_limit_drops_the_connection_and_counts_as_lost(
    vllm_server: CannedServer, publishers: list[Publisher]
) -> None:
    publisher = Publisher(replay=False)
    publishers.append(publisher)
    exporter = start(vllm_target("vllm-a", vllm_server.url, publisher, max_batch_bytes="1KiB"))
    try:
        publisher.wait_subscribed()
        publisher.publish([stored([1])])
        settled(exporter, "vllm-a", {"kvcache_events_resident_whole": 1})
        publisher.publish_raw(b"\x00" * 1_000_000)  # ZMQ drops the peer, never buffers it
        publisher.wait_subscribed()  # the subscriber reconnected
        publisher.publish([stored([2])])
        settled(
            exporter,
            "vllm-a",
            {
                "kvcache_events_batches_lost_total": 1,
                "kvcache_events_resident_whole": 0,
                "kvcache_events_errors_total{reason=disconnected}": 1,
            },
        )
    finally:
        exporter.stop()


FLOODER = """
import sys, msgspec, zmq
pub = zmq.Context().socket(zmq.XPUB)
pub.setsockopt(zmq.SNDHWM, 1000)
print(pub.bind_to_random_port("tcp://127.0.0.1"), flush=True)
pub.recv()  # subscribed
stored = {"type": "BlockStored", "block_hashes": list(range(64)), "parent_block_hash": None,
          "token_ids": list(range(1024)), "block_size": 16, "lora_id": None, "medium": "GPU"}
payload = msgspec.msgpack.encode([1.0, [stored] * 8, 0])
seq = 0
while True:  # as fast as ZMQ takes them, until the test kills it
    pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
    seq += 1
"""


def test_a_flooding_publisher_does_not_starve_the_other_targets(
    vllm_server: CannedServer,
) -> None:
    """An engine (its own process, as in production) publishing as fast as ZMQ lets it: the
    exporter keeps polling its other target (another process too: no test thread shares the
    exporter's interpreter lock) on time, not one poll timing out at 0.5 s."""
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER], stdout=subprocess.PIPE, text=True)
    shim, shim_port = spawn(snapshot_json(), "application/json")
    assert flooder.stdout is not None
    port = int(flooder.stdout.readline())
    exporter = start(
        {
            "name": "vllm-a",
            "kind": "vllm",
            "url": vllm_server.url,
            "events": {"endpoint": f"tcp://127.0.0.1:{port}"},
        },
        {"name": "shim-b", "kind": "shim", "url": f"http://127.0.0.1:{shim_port}"},
        interval=0.5,
    )
    try:
        wait_for(
            lambda: stream(exporter, "vllm-a").get("kvcache_events_batches_total", 0) > 100,
            10,
            "the flood",
        )
        polls = get(exporter, "kvcache_exporter_polls_total", engine="shim-b")[0]
        wait_for(
            lambda: get(exporter, "kvcache_exporter_polls_total", engine="shim-b")[0] >= polls + 5,
            10,
            "the other target's polls while the stream floods",
        )
        assert get(exporter, "kvcache_exporter_target_up", engine="shim-b") == [1]
        # Not one of its polls timed out waiting for the loop the stream floods.
        assert sum(get(exporter, "kvcache_exporter_poll_errors_total", engine="shim-b")) == 0
        assert flooder.poll() is None  # still flooding
    finally:
        for process in (flooder, shim):
            process.kill()
            process.wait()
        exporter.stop()


# ------------------------------------------------------------------------ ranks and silence


def adjacent_publishers() -> tuple[Publisher, Publisher]:
    """Two publishers on ports p and p + 1, as a DP-2 engine binds them."""
    for _ in range(50):
        first = Publisher(replay=False)
        try:
            return first, Publisher(replay=False, port=first.port + 1)
        except zmq.ZMQError:
            first.close()
    raise AssertionError("no two adjacent free ports in 50 tries")


def test_each_dp_rank_is_its_own_stream_on_port_plus_rank(
    vllm_server: CannedServer, publishers: list[Publisher]
) -> None:
    first, second = adjacent_publishers()
    publishers += [first, second]
    exporter = start(vllm_target("vllm-a", vllm_server.url, first, dp_ranks=2))
    try:
        first.wait_subscribed()
        second.wait_subscribed()
        first.publish([stored([1])])
        second.publish([stored([1, 2]), stored([3], "CPU")])
        settled(exporter, "vllm-a", {"kvcache_events_total": 1}, rank="0")
        settled(exporter, "vllm-a", {"kvcache_events_total": 2}, rank="1")
    finally:
        exporter.stop()


def test_a_silent_stream_ages_while_the_engine_is_polled(
    vllm_server: CannedServer, publishers: list[Publisher]
) -> None:
    publisher = Publisher(replay=False)
    publishers.append(publisher)
    exporter = start(vllm_target("vllm-a", vllm_server.url, publisher))
    try:
        publisher.wait_subscribed()
        publisher.publish([stored([1])])
        settled(exporter, "vllm-a", {"kvcache_events_batches_total": 1})
        wait_for(
            lambda: stream(exporter, "vllm-a")["kvcache_events_last_batch_age_seconds"] >= 1.0,
            10,
            "the silent stream's age to grow",
        )
        publisher.publish([stored([2])])
        wait_for(
            lambda: stream(exporter, "vllm-a")["kvcache_events_last_batch_age_seconds"] < 1.0,
            10,
            "a batch to reset the age",
        )
    finally:
        exporter.stop()


# ------------------------------------------------------------------------------ discovery


class VllmWithSources:
    """A vLLM API server's two answers: its /metrics (the fixture) and /kv_event_sources
    (naming ``publisher``'s sockets, as vLLM resolves ``tcp://*:0``), swappable live."""

    def __init__(self, servers: list[CannedServer]) -> None:
        self.sources: bytes = b"{}"
        self.sources_status = 200
        self.server = CannedServer(self.respond)
        servers.append(self.server)

    def respond(self, handler: Any) -> None:
        if handler.path == "/kv_event_sources":
            body(self.sources, self.sources_status)(handler)
        else:
            body(VLLM_METRICS, content_type="text/plain; version=0.0.4")(handler)

    def publish_at(self, publisher: Publisher) -> None:
        config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": publisher.endpoint,
            "replay_endpoint": publisher.replay_endpoint,
            "topic": "",
        }
        self.sources = json.dumps({"0": config}).encode()


@pytest.fixture
def fast_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_streams, "DISCOVERY_INTERVAL", 0.3)
    monkeypatch.setattr(event_streams, "DISCOVERY_RETRY", 0.2)


def test_discovered_streams_follow_the_engine_to_its_new_ports(
    servers: list[CannedServer], publishers: list[Publisher], fast_discovery: None
) -> None:
    engine = VllmWithSources(servers)
    engine.sources_status = 404  # vLLM still starting, or too old to say
    exporter = start(
        {"name": "vllm-a", "kind": "vllm", "url": engine.server.url, "events": {"discover": True}}
    )
    try:
        wait_for(
            lambda: get(exporter, "kvcache_events_discovery_errors_total", engine="vllm-a") >= [2],
            10,
            "failed discoveries counted",
        )
        assert get(exporter, "kvcache_exporter_target_up", engine="vllm-a") == [1]
        assert "kvcache_events_resident_whole" not in stream(exporter, "vllm-a")

        first = Publisher()
        publishers.append(first)
        engine.sources_status = 200
        engine.publish_at(first)
        settled(exporter, "vllm-a", {"kvcache_events_resident_whole": 1})
        first.wait_subscribed()
        first.publish([stored([1, 2, 3])])
        settled(exporter, "vllm-a", {**resident(device=3), "kvcache_events_batches_total": 1})

        # The engine restarts on new ports (tcp://*:0): an empty cache, a new stream.
        second = Publisher()
        publishers.append(second)
        engine.publish_at(second)
        first.close()
        publishers.remove(first)
        second.wait_subscribed()
        second.publish([stored([7])])
        settled(exporter, "vllm-a", {**resident(device=1), "kvcache_events_batches_total": 1})
        errors = get(exporter, "kvcache_events_discovery_errors_total", engine="vllm-a")[0]
        time.sleep(1)  # several more discoveries, all fine
        assert get(exporter, "kvcache_events_discovery_errors_total", engine="vllm-a") == [errors]
    finally:
        exporter.stop()


def test_an_engine_that_names_no_stream_is_counted_and_says_why(
    servers: list[CannedServer], fast_discovery: None, caplog: pytest.LogCaptureFixture
) -> None:
    engine = VllmWithSources(servers)
    engine.sources = b'{"0": {"enable_kv_cache_events": false, "publisher": "null"}}'
    with caplog.at_level("WARNING"):
        exporter = start(
            {
                "name": "vllm-a",
                "kind": "vllm",
                "url": engine.server.url,
                "events": {"discover": True},
            }
        )
        try:
            wait_for(
                lambda: (
                    get(exporter, "kvcache_events_discovery_errors_total", engine="vllm-a") >= [3]
                ),
                10,
                "failed discoveries counted",
            )
            assert get(exporter, "kvcache_exporter_target_up", engine="vllm-a") == [1]
        finally:
            exporter.stop()
    said = [r.getMessage() for r in caplog.records if "KV event streams" in r.getMessage()]
    assert len(said) == 1, said  # once, not once per retry
    assert "publishes no KV events" in said[0] and "--kv-events-config" in said[0]

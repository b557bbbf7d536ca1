"""Where an engine's KV event streams are, from its own answer: vLLM's /kv_event_sources and
SGLang's /server_info descriptor, good and bad (exporter-toolkit's table style)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine_shim.events.discovery import DiscoveryError, EventSource, discover_sources


def vllm_rank(endpoint: str, replay: str | None = None, **more: Any) -> dict[str, Any]:
    """One rank of vLLM's answer: its KVEventsConfig as the engine runs it."""
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "replay_endpoint": replay,
        "buffer_steps": 10000,
        "hwm": 100000,
        "max_queue_size": 100000,
        "topic": "kv-events",
        **more,
    }


def sglang_info(**descriptor: Any) -> dict[str, Any]:
    return {
        "model_path": "m",
        "kv_events": {
            "publisher": "zmq",
            "endpoint_host": "*",
            "endpoint_port_base": 5557,
            "topic": "",
            "block_size": 64,
            "dp_size": 2,
            **descriptor,
        },
    }


GOOD = {
    # vLLM 0.32 live, tcp://*:0 resolved to its node IP and ports.
    "vllm-resolved": (
        "vllm",
        {"0": vllm_rank("tcp://10.0.0.7:41707", "tcp://10.0.0.7:38299")},
        [EventSource(0, "tcp://10.0.0.7:41707", "tcp://10.0.0.7:38299", "kv-events")],
    ),
    # An explicit port with a wildcard host: the engine's host from the target's URL.
    "vllm-wildcard-dp2": (
        "vllm",
        {"1": vllm_rank("tcp://*:5558"), "0": vllm_rank("tcp://*:5557", "tcp://*:6557")},
        [
            EventSource(0, "tcp://vllm-0.llm:5557", "tcp://vllm-0.llm:6557", "kv-events"),
            EventSource(1, "tcp://vllm-0.llm:5558", None, "kv-events"),
        ],
    ),
    "vllm-one-rank-without-events": (
        "vllm",
        {"0": vllm_rank("tcp://*:5557"), "1": vllm_rank("tcp://*:5558", publisher="null")},
        [EventSource(0, "tcp://vllm-0.llm:5557", None, "kv-events")],
    ),
    "sglang-dp2-replay": (
        "sglang",
        sglang_info(replay_endpoint_port_base=6557),
        [
            EventSource(0, "tcp://vllm-0.llm:5557", "tcp://vllm-0.llm:6557", ""),
            EventSource(1, "tcp://vllm-0.llm:5558", "tcp://vllm-0.llm:6558", ""),
        ],
    ),
    "sglang-named-ipv6-host": (
        "sglang",
        sglang_info(endpoint_host="fd00::7", dp_size=1, topic="kv"),
        [EventSource(0, "tcp://[fd00::7]:5557", None, "kv")],
    ),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_good_answers_name_their_streams(case: str) -> None:
    kind, answer, expected = GOOD[case]
    assert list(discover_sources(kind, json.dumps(answer).encode(), "vllm-0.llm")) == expected


BAD: dict[str, tuple[str, bytes, str]] = {
    "not-json": ("vllm", b"<html>404</html>", "not JSON"),
    "a-list": ("vllm", b"[]", "expected a JSON object"),
    "vllm-without-events": ("vllm", b"{}", "publishes no KV events"),
    "vllm-events-off": (
        "vllm",
        json.dumps({"0": vllm_rank("tcp://*:5557", enable_kv_cache_events=False)}).encode(),
        "publishes no KV events",
    ),
    "vllm-ipc": (
        "vllm",
        json.dumps({"0": vllm_rank("ipc:///tmp/kv")}).encode(),
        "only tcp://HOST:PORT is reachable",
    ),
    "vllm-port-past-65535": (
        "vllm",
        json.dumps({"0": vllm_rank("tcp://*:70000")}).encode(),
        "is not a TCP port",
    ),
    "vllm-rank-not-a-number": (
        "vllm",
        json.dumps({"zero": vllm_rank("tcp://*:5557")}).encode(),
        "not a rank",
    ),
    "vllm-too-many-ranks": (
        "vllm",
        json.dumps({str(r): vllm_rank("tcp://*:5557") for r in range(300)}).encode(),
        "300 DP ranks",
    ),
    "sglang-without-descriptor": ("sglang", b'{"model_path": "m"}', "publishes no KV events"),
    "sglang-dp-size-huge": (
        "sglang",
        json.dumps(sglang_info(dp_size=10**9)).encode(),
        "dp_size",
    ),
    "sglang-ports-past-65535": (
        "sglang",
        json.dumps(sglang_info(endpoint_port_base=65535, dp_size=4)).encode(),
        "endpoint_port_base",
    ),
    "sglang-topic-not-a-string": (
        "sglang",
        json.dumps(sglang_info(topic=["x"])).encode(),
        "topic",
    ),
    "deeply-nested": ("vllm", b"[" * 100_000, "not JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_answers_are_refused_with_a_reason(case: str) -> None:
    kind, body, reason = BAD[case]
    with pytest.raises(DiscoveryError, match=reason):
        discover_sources(kind, body, "vllm-0.llm")

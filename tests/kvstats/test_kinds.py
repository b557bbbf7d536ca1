"""The kind registry is the one place a kind is added: registering a toy bridge (one module,
``tests/toy_bridge.py``, and one ``register`` line) is enough for the config, the bridge
dispatch, ``kvcache-shim convert``, the snapshot validator and a running exporter to take it.
And every registered kind is exercised by the suites that enumerate the registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine_shim import cli as shim_cli
from exporter.app import Exporter
from exporter.config import parse_config
from exporter.errors import ConfigError
from exporter.sources import body_parser
from kvstats import kinds
from kvstats.snapshot import SnapshotError
from kvstats.validate import parse_snapshot
from tests.builders import valid
from tests.helpers import CannedServer, body, wait_for

TOY_TEXT = (
    b"# TYPE toy_kv_capacity_tokens gauge\ntoy_kv_capacity_tokens 1000\ntoy_kv_used_tokens 250\n"
)


@pytest.fixture
def toy() -> Iterator[None]:
    """The toy kind registered for one test (the registry restored after it)."""
    saved_kinds, saved_engines = dict(kinds.KINDS), list(kinds.ENGINES)
    kinds.register(kinds.TargetKind("toy", "/toy-metrics", bridge="tests.toy_bridge"), engine="toy")
    try:
        yield
    finally:
        kinds.KINDS.clear()
        kinds.KINDS.update(saved_kinds)
        kinds.ENGINES[:] = saved_engines


def toy_config(url: str) -> dict[str, object]:
    return {
        "listen": "127.0.0.1:0",
        "poll_interval": 0.3,
        "timeout": 0.25,
        "nvml": "off",
        "targets": [{"name": "toy-1", "kind": "toy", "url": url}],
    }


def test_an_unregistered_kind_is_refused_everywhere() -> None:
    with pytest.raises(ConfigError, match="must be one of shim, vllm, sglang, got 'toy'"):
        parse_config(toy_config("http://127.0.0.1:1"))
    snapshot = valid()
    snapshot["engine"]["kind"] = "toy"
    with pytest.raises(SnapshotError, match="must be one of reference, vllm, sglang"):
        parse_snapshot(snapshot)
    with pytest.raises(SystemExit):
        shim_cli.main(["convert", "--engine", "toy", "-"])


@pytest.mark.usefixtures("toy")
def test_a_registered_kind_is_taken_by_config_dispatch_cli_and_validator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = parse_config(toy_config("http://engine:9000"))
    assert config.targets[0].url == "http://engine:9000/toy-metrics"  # its default path
    (snapshot,) = body_parser("toy")(TOY_TEXT)
    assert snapshot.engine.kind == "toy" and snapshot.pools[0].used_slots == 250
    scrape = tmp_path / "toy.prom"
    scrape.write_bytes(TOY_TEXT)
    assert shim_cli.main(["convert", "--engine", "toy", str(scrape)]) == 0
    assert '"kind": "toy"' in capsys.readouterr().out
    data = valid()
    data["engine"]["kind"] = "toy"
    assert parse_snapshot(data).engine.kind == "toy"


@pytest.mark.usefixtures("toy")
def test_a_running_exporter_polls_a_registered_kind() -> None:
    server = CannedServer(body(TOY_TEXT, content_type="text/plain"))
    exporter = Exporter(parse_config(toy_config(server.url)))
    exporter.start()
    try:

        def published() -> dict[str, float]:
            text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5).text
            return {
                s.name + s.labels.get("state", ""): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.labels.get("engine") == "toy-1"
            }

        wait_for(lambda: published().get("kvcache_exporter_target_up") == 1.0, 10, "a toy poll")
        values = published()
        assert values["kvcache_pool_capacity_slots"] == 1000.0
        assert values["kvcache_pool_slotsused"] == 250.0
        assert values["kvcache_active_usage_ratio"] == 0.25
        assert "kvcache_pool_slotsevictable" not in values  # the toy does not say: absent
    finally:
        exporter.stop()
        server.close()


def test_every_bridge_kind_has_a_fuzzed_fixture() -> None:
    """The fuzz suite reads one real scrape per bridge kind: a kind added without one fails."""
    from tests.test_fuzz import BRIDGE_TEXT

    assert set(BRIDGE_TEXT) == set(kinds.bridge_kinds())

"""Bridges from engines' own /metrics text, on the real-format fixtures, with values by hand."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from engine_shim.bridges import BridgeError, convert
from kvstats.validate import parse_snapshot
from tests.conftest import FIXTURES
from tests.helpers import CannedServer, body, wait_for

VLLM = (FIXTURES / "vllm-0.33.0-dp1.prom").read_text()
SGLANG = (FIXTURES / "sglang-0.5.23-hicache.prom").read_text()


def roundtrip(kind: str, text: str) -> tuple[list, list[str]]:  # type: ignore[type-arg]
    result = convert(kind, text, now=1000.0)
    # Whatever a bridge builds must pass the same strict parser the exporter applies.
    return [parse_snapshot(s.to_json()) for s in result.snapshots], result.missing


# ---------------------------------------------------------------------------------- vLLM


def test_vllm_fixture_by_hand() -> None:
    (snap,), missing = roundtrip("vllm", VLLM)
    # num_gpu_blocks 28493 with one engine series; minus the null block: 28492 usable.
    # usage 0.8735083532219571 x 28492 = 24888.0 pinned blocks; block_size 16.
    full = snap.pools[0]
    assert (full.block_size, full.capacity_slots, full.used_slots) == (16, 28492 * 16, 24888 * 16)
    assert full.evictable_slots is None and full.available_slots is None  # not knowable here
    assert any("evictable tokens (vLLM does not export them" in m for m in missing)
    assert snap.max_concurrency == 13.91259765625
    # kv_cache_size_tokens 455888 = int(13.91259765625 x 32768): max_model_len recovered.
    assert snap.max_model_len == 32768
    # Group-aware footprint: num_blocks / max_concurrency = 28493 / 13.9126 = 2048 blocks.
    assert [g.blocks_per_request for g in snap.groups] == [2048]
    assert (snap.requests.running, snap.requests.waiting) == (12, 3)
    c = snap.counters
    assert c.prefix_query_tokens == 1_843_211
    # Every source vLLM reports has a tier: disk -> storage, external_unspecified -> external.
    assert c.prefix_hit_tokens == {
        "device": 1_204_480,
        "host": 0,
        "storage": 0,
        "p2p": 0,
        "external": 0,
    }
    # vLLM's own token capacity, not blocks x block size; no kv_cache_memory_bytes: bytes unknown.
    assert snap.capacity_tokens == 455_888
    assert full.bytes_per_slot is None
    assert c.preemptions == 7
    assert c.evicted_tokens is None and c.iterations is None
    assert snap.engine.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert (
        snap.engine.instance_id == "vllm-created-1763820000.000"
    )  # from _created: changes on restart
    assert snap.time == 1000.0


def vllm_dp2() -> str:
    """Two DP engines behind one API server: every series doubled with engine="1", and
    num_gpu_blocks stamped with the DP-summed total on both cache_config_info series."""
    lines = []
    for line in VLLM.splitlines():
        if line.startswith("#") or 'engine="0"' not in line:
            lines.append(line)
            continue
        if line.startswith("vllm:cache_config_info"):
            line = line.replace('num_gpu_blocks="28493"', 'num_gpu_blocks="56986"')
        lines.append(line)
        second = line.replace('engine="0"', 'engine="1"')
        if second.startswith("vllm:kv_cache_usage_perc"):
            second = re.sub(r" [0-9.e+]+$", " 0.25", second)
        if second.startswith("vllm:num_preemptions_total"):
            second = re.sub(r" [0-9.e+]+$", " 2.0", second)
        lines.append(second)
    return "\n".join(lines) + "\n"


def test_vllm_dp2_divides_the_summed_block_count() -> None:
    snaps, _ = roundtrip("vllm", vllm_dp2())
    assert [s.engine.dp_rank for s in snaps] == [0, 1]
    # 56986 / 2 engines = 28493 blocks each, 28492 usable.
    assert snaps[0].pools[0].used_slots == 24888 * 16
    assert snaps[1].pools[0].used_slots == round(0.25 * 28492) * 16 == 7123 * 16
    assert snaps[0].pools[0].capacity_slots == snaps[1].pools[0].capacity_slots == 28492 * 16
    assert (snaps[0].counters.preemptions, snaps[1].counters.preemptions) == (7, 2)


RANK1 = {  # hand-written variant: engine 1 of a DP=2 server, every value its own
    "vllm:num_requests_running": 4,
    "vllm:num_requests_waiting": 0,
    "vllm:kv_cache_usage_perc": 0.25,
    "vllm:prefix_cache_queries_total": 500_000,
    "vllm:prefix_cache_hits_total": 100_000,
    "vllm:external_prefix_cache_queries_total": 7_000,
    "vllm:num_preemptions_total": 2,
    'vllm:prompt_tokens_cached_by_source_total{source="device"}': 90_000,
    'vllm:prompt_tokens_cached_by_source_total{source="host"}': 6_000,
    'vllm:prompt_tokens_cached_by_source_total{source="disk"}': 4_000,
    'vllm:prompt_tokens_cached_by_source_total{source="p2p"}': 300,
    'vllm:prompt_tokens_cached_by_source_total{source="external_unspecified"}': 20,
}


def vllm_dp2_distinct() -> str:
    lines = []
    for line in vllm_dp2().splitlines():
        if 'engine="1"' in line and not line.startswith("#"):
            name = line.split("{", 1)[0]
            source = re.search(r'source="([^"]+)"', line)
            key = f'{name}{{source="{source.group(1)}"}}' if source else name
            if key in RANK1:
                line = re.sub(r" [0-9.e+]+$", f" {float(RANK1[key])}", line)
            elif name.endswith("_created"):
                line = re.sub(r" [0-9.e+]+$", " 1.76390e+09", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_vllm_dp2_reads_each_engines_own_series() -> None:
    """Every count comes from its own engine's series, never the other's or their sum."""
    (zero, one), _ = roundtrip("vllm", vllm_dp2_distinct())
    (alone,), _ = roundtrip("vllm", VLLM)
    assert zero.counters == alone.counters and zero.requests == alone.requests
    assert (one.requests.running, one.requests.waiting) == (4, 0)
    assert one.pools[0].used_slots == 7123 * 16
    assert one.counters.prefix_query_tokens == 500_000 + 7_000
    assert one.counters.preemptions == 2
    assert one.counters.prefix_hit_tokens == {
        "device": 90_000,
        "host": 6_000,
        "storage": 4_000,
        "p2p": 300,
        "external": 20,
    }
    assert zero.engine.instance_id != one.engine.instance_id  # each from its own _created
    assert one.engine.instance_id == "vllm-created-1763900000.000"


def test_vllm_pool_bytes_from_the_kv_budget() -> None:
    """Hand-written variant: vLLM 0.32+ exports kv_cache_memory_bytes (per worker); blocks are
    budget // bytes per block, so budget // slots is the slot's size."""
    slots = 28493 * 16
    text = VLLM.replace(
        'kv_cache_memory_bytes="None"', f'kv_cache_memory_bytes="{slots * 8192 + 999}"'
    )
    (snap,), missing = roundtrip("vllm", text)
    assert snap.pools[0].bytes_per_slot == 8192
    assert not any("pool bytes" in m for m in missing)
    overridden = text.replace('num_gpu_blocks_override="None"', 'num_gpu_blocks_override="28493"')
    (snap,), missing = roundtrip("vllm", overridden)
    assert snap.pools[0].bytes_per_slot is None
    assert any(
        "pool bytes (kv_cache_memory_bytes not exported, or overridden)" in m for m in missing
    )
    (snap,), missing = roundtrip("vllm", VLLM)
    assert snap.pools[0].bytes_per_slot is None and any("pool bytes" in m for m in missing)


def with_usage(value: str, text: str = VLLM) -> str:
    return re.sub(r"(vllm:kv_cache_usage_perc\{[^}]*\}) \S+", rf"\1 {value}", text)


@pytest.mark.parametrize(
    ("usage", "used_blocks"), [("0.0", 0), ("1.0", 28492), ("1.5", None), ("-0.1", None)]
)
def test_vllm_usage_bounds(usage: str, used_blocks: int | None) -> None:
    if used_blocks is None:
        with pytest.raises(BridgeError, match="no valid vllm:kv_cache_usage_perc"):
            roundtrip("vllm", with_usage(usage))
    else:
        snaps, _ = roundtrip("vllm", with_usage(usage))
        assert snaps[0].pools[0].used_slots == used_blocks * 16


@pytest.mark.parametrize(
    ("blocks", "block_size", "valid"),
    [("2", "16", True), ("1", "16", False), ("28493", "1", True), ("28493", "0", False)],
)
def test_vllm_pool_shape_bounds(blocks: str, block_size: str, valid: bool) -> None:
    text = VLLM.replace('num_gpu_blocks="28493"', f'num_gpu_blocks="{blocks}"')
    text = text.replace('block_size="16",cache_dtype', f'block_size="{block_size}",cache_dtype')
    text = re.sub(r'kv_cache_max_concurrency="[^"]*"', 'kv_cache_max_concurrency="None"', text)
    if not valid:
        with pytest.raises(BridgeError, match="no valid vllm:kv_cache_usage_perc"):
            roundtrip("vllm", text)
        return
    snaps, _ = roundtrip("vllm", text)  # a two-block pool holds one usable block
    assert snaps[0].pools[0].capacity_slots == (int(blocks) - 1) * int(block_size)


def test_vllm_missing_counters_are_named_and_nonpositive_concurrency_ignored() -> None:
    text = "\n".join(
        ln
        for ln in VLLM.splitlines()
        if not ln.startswith(("vllm:prefix_cache_queries_total", "vllm:num_preemptions_total"))
    )
    text = text.replace(
        'kv_cache_max_concurrency="13.91259765625"', 'kv_cache_max_concurrency="0.0"'
    )
    (snap,), missing = roundtrip("vllm", text + "\n")
    assert "engine 0: prefix cache queries" in missing and "engine 0: preemptions" in missing
    assert snap.counters.prefix_query_tokens is None and snap.counters.preemptions is None
    assert snap.max_concurrency is None  # 0 is not a capacity
    assert (snap.requests.running, snap.requests.waiting) == (12, 3)
    assert snap.engine.version == "unknown" and snap.engine.dp_rank == 0 and snap.sequence == 0
    no_waiting = "\n".join(ln for ln in VLLM.splitlines() if "num_requests_waiting{" not in ln)
    (snap,), _ = roundtrip("vllm", no_waiting + "\n")
    assert snap.requests is None  # half of a pair is not a pair


def test_vllm_without_created_series_and_with_other_labels() -> None:
    # Multiprocess mode: no _created series. A newer vLLM: cache_config_info gains and loses labels.
    text = "\n".join(ln for ln in VLLM.splitlines() if "_created" not in ln) + "\n"
    text = text.replace(',cache_dtype="auto",', ',cache_dtype="auto",future_field="x",')
    text = text.replace('mamba_block_size="None",', "")
    (snap,), _ = roundtrip("vllm", text)
    assert snap.engine.instance_id == "unknown"
    assert snap.pools[0].used_slots == 24888 * 16


def test_older_vllm_without_concurrency_labels() -> None:
    text = re.sub(r'kv_cache_max_concurrency="[^"]*",', "", VLLM)
    text = re.sub(r'kv_cache_size_tokens="[^"]*",', "", text)
    text = "\n".join(ln for ln in text.splitlines() if "cached_by_source" not in ln) + "\n"
    (snap,), missing = roundtrip("vllm", text)
    assert snap.max_concurrency is None and snap.max_model_len is None and snap.groups == ()
    assert any("kv_cache_max_concurrency" in m for m in missing)
    assert snap.counters.prefix_hit_tokens == {"device": 1_204_480}  # from prefix_cache_hits_total


# -------------------------------------------------------------------------------- SGLang


def test_sglang_fixture_by_hand() -> None:
    (snap,), missing = roundtrip("sglang", SGLANG)
    full = snap.pools[0]
    # 187392 used + 117248 evictable + 121344 available = 425984 = max_total_num_tokens.
    assert (
        full.capacity_slots,
        full.used_slots,
        full.evictable_slots,
        full.available_slots,
    ) == (425_984, 187_392, 117_248, 121_344)
    assert full.block_size == 64
    assert len(snap.pools) == 1  # swa/mamba are 0 on this model: no sub-pools
    assert (snap.requests.running, snap.requests.waiting) == (48, 3)
    c = snap.counters
    # prefill_effective_tokens_total modes:
    # input 13105152 + device 18734592 + host 2461696 + storage 393216.
    assert c.prefix_query_tokens == 34_694_656
    assert c.prefix_hit_tokens == {"device": 18_734_592, "host": 2_461_696, "storage": 393_216}
    assert c.evicted_tokens == 9_437_184
    assert c.preemptions is None and any("retractions" in m for m in missing)
    assert snap.host_tier is not None
    assert (snap.host_tier.capacity_tokens, snap.host_tier.used_tokens) == (851_968, 612_352)


def sglang_dp2_tp2() -> str:
    """DP=2 x TP=2: scheduler series per dp_rank and tp_rank; rank 1 of TP repeats the
    capacity constants (it must not be summed) and has no live stats."""
    out = []
    for line in SGLANG.splitlines():
        if line.startswith("#") or 'tp_rank="0"' not in line:
            out.append(line)
            continue
        for dp in ("0", "1"):
            ranked = (
                line.replace('tp_rank="0"', f'dp_rank="{dp}",tp_rank="0"')
                if "dp_rank" not in line
                else line.replace('dp_rank="0"', f'dp_rank="{dp}"')
            )
            if dp == "1" and ranked.startswith(
                ("sglang:kv_used_tokens", "sglang:kv_available_tokens")
            ):
                used = ranked.startswith("sglang:kv_used_tokens")
                ranked = re.sub(r" [0-9.e+]+$", " 100000.0" if used else " 208736.0", ranked)
            out.append(ranked)
            if ranked.startswith("sglang:max_total_num_tokens"):
                out.append(ranked.replace('tp_rank="0"', 'tp_rank="1"'))
    return "\n".join(out) + "\n"


def test_sglang_dp2_tp2_reads_one_tp_rank_per_dp_rank() -> None:
    snaps, _ = roundtrip("sglang", sglang_dp2_tp2())
    assert [s.engine.dp_rank for s in snaps] == [0, 1]
    assert [s.pools[0].capacity_slots for s in snaps] == [425_984, 425_984]  # not 2x: one TP rank
    assert snaps[1].pools[0].used_slots == 100_000
    assert snaps[1].pools[0].available_slots == 208_736  # 100000 + 117248 + 208736 = 425984


def test_sglang_before_0_5_11_has_no_evictable() -> None:
    text = (
        "\n".join(ln for ln in SGLANG.splitlines() if not re.match(r"(# \w+ )?sglang:kv_", ln))
        + "\n"
    )
    (snap,), missing = roundtrip("sglang", text)
    full = snap.pools[0]
    assert full.used_slots == 187_392 and full.evictable_slots is None
    assert any("SGLang < 0.5.11" in m for m in missing)


def test_sglang_old_storage_label_and_tokenizer_counters() -> None:
    text = "\n".join(ln for ln in SGLANG.splitlines() if "prefill_effective" not in ln) + "\n"
    text = text.replace('cache_source="storage"', 'cache_source="storage_HiCacheFile"')
    (snap,), _ = roundtrip("sglang", text)
    assert snap.counters.prefix_hit_tokens == {
        "device": 18_734_592,
        "host": 2_461_696,
        "storage": 393_216,
    }
    assert snap.counters.prefix_query_tokens is None


def test_vllm_external_prefix_queries_count_as_queries() -> None:
    """Hand-written variant of the real format: a KV connector's cross-instance lookups
    (external_prefix_cache_queries_total, 0 in the captured fixture) are queries too."""
    text = VLLM.replace(
        'vllm:external_prefix_cache_queries_total{engine="0",'
        'model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0',
        'vllm:external_prefix_cache_queries_total{engine="0",'
        'model_name="meta-llama/Llama-3.1-8B-Instruct"} 50000.0',
    )
    assert text != VLLM
    (base,), _ = roundtrip("vllm", VLLM)
    (snap,), _ = roundtrip("vllm", text)
    assert base.counters.prefix_query_tokens == 1_843_211
    assert snap.counters.prefix_query_tokens == 1_843_211 + 50_000


def test_sglang_priority_series_are_not_added_to_the_totals() -> None:
    """Hand-written variant: with priority scheduling SGLang also exports per-priority series
    beside the total (priority=""); only the total is read."""
    extra = []
    for line in SGLANG.splitlines():
        if line.startswith(("sglang:prefill_effective_tokens_total", "sglang:num_running_reqs")):
            labels, value = line.rsplit(" ", 1)
            extra.append(labels.replace("}", ',priority="1"}') + " " + str(float(value) / 4))
            extra.append(line.replace("}", ',priority=""}', 1))
    text = SGLANG + "\n".join(extra) + "\n"
    text = "\n".join(
        ln
        for ln in text.splitlines()
        if not (
            ln.startswith(("sglang:prefill_effective_tokens_total", "sglang:num_running_reqs"))
            and "priority" not in ln
        )
    )
    (base,), _ = roundtrip("sglang", SGLANG)
    (snap,), _ = roundtrip("sglang", text + "\n")
    assert snap.counters == base.counters
    assert snap.requests == base.requests
    assert snap.counters.prefix_query_tokens == 13_105_152 + 18_734_592 + 2_461_696 + 393_216


def test_sglang_tokenizer_totals_are_not_given_to_each_dp_rank() -> None:
    """The tokenizer's cached_tokens_total has no dp_rank: with two ranks and no per-rank
    prefill counters, neither rank gets the fleet's hits (reported missing instead)."""
    text = "\n".join(ln for ln in sglang_dp2_tp2().splitlines() if "prefill_effective" not in ln)
    snaps, missing = roundtrip("sglang", text + "\n")
    assert [s.engine.dp_rank for s in snaps] == [0, 1]
    assert [s.counters.prefix_hit_tokens for s in snaps] == [{}, {}]
    assert sum("no per-rank prefill_effective_tokens_total" in m for m in missing) == 2


LABELS = (
    'engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",moe_ep_rank="0",'
    'pp_rank="0",tp_rank="0"'
)


def sglang_with(**series: float) -> str:
    """Hand-written variant of the real format: the fixture plus scheduler series (gauges and
    counters SGLang exports for hybrid SWA / Mamba models and retractions) with our values."""
    extra = [f"sglang:{name}{{{LABELS}}} {float(value)}" for name, value in series.items()]
    return SGLANG + "\n".join(extra) + "\n"


def test_sglang_hybrid_pools_and_retractions() -> None:
    text = sglang_with(
        max_total_num_tokens_swa=65536,
        swa_used_tokens=8192,
        swa_evictable_tokens=4096,
        swa_available_tokens=53248,
        mamba_used_tokens=12,
        mamba_evictable_tokens=3,
        mamba_available_tokens=49,
        num_retracted_requests_total=17,
    )
    (snap,), missing = roundtrip("sglang", text)
    pools = {p.name: p for p in snap.pools}
    assert list(pools) == ["full", "swa", "mamba"]
    swa = pools["swa"]
    assert (swa.block_size, swa.capacity_slots, swa.used_slots, swa.evictable_slots) == (
        64,
        65536,
        8192,
        4096,
    )
    assert swa.available_slots == 53248
    mamba = pools["mamba"]  # one slot per request state: block size 1, capacity their sum
    assert (mamba.block_size, mamba.capacity_slots, mamba.used_slots) == (1, 64, 12)
    assert (mamba.evictable_slots, mamba.available_slots) == (3, 49)
    assert snap.counters.preemptions == 17
    assert snap.counters.evicted_tokens == 9_437_184
    assert not any("retractions" in m for m in missing)


def test_sglang_hybrid_pools_that_do_not_add_up_are_left_out() -> None:
    text = sglang_with(
        max_total_num_tokens_swa=65536,
        swa_used_tokens=8192,
        swa_evictable_tokens=4096,
        swa_available_tokens=1,  # does not sum to 65,536
        mamba_used_tokens=0,
        mamba_evictable_tokens=0,
        mamba_available_tokens=0,  # an empty Mamba pool: no pool at all
    )
    (snap,), missing = roundtrip("sglang", text)
    assert [p.name for p in snap.pools] == ["full"]
    assert any("swa pool counts used 8192 + evictable 4096 + available 1" in m for m in missing)
    assert any("retractions (num_retracted_requests_total)" in m for m in missing)
    # No SWA capacity exported: the swa counts are not read as a pool.
    text = sglang_with(swa_used_tokens=1, swa_evictable_tokens=1, swa_available_tokens=1)
    (snap,), _ = roundtrip("sglang", text)
    assert [p.name for p in snap.pools] == ["full"]


def test_sglang_reads_the_lowest_pipeline_and_tensor_rank() -> None:
    """Hand-written variant: pipeline stage 1 and tensor rank 1 export their own series; the
    bridge reads rank (tp 0, pp 0) only, never a sum or another rank's values."""
    extra = []
    for line in SGLANG.splitlines():
        if line.startswith("sglang:") and 'pp_rank="0",tp_rank="0"' in line:
            name, value = line.rsplit(" ", 1)
            for pp, tp in (("1", "0"), ("0", "1")):
                labels = name.replace('pp_rank="0",tp_rank="0"', f'pp_rank="{pp}",tp_rank="{tp}"')
                extra.append(f"{labels} {float(value) / 2}")
    (base,), _ = roundtrip("sglang", SGLANG)
    (snap,), _ = roundtrip("sglang", SGLANG + "\n".join(extra) + "\n")
    assert snap.pools == base.pools and snap.counters == base.counters
    assert snap.requests == base.requests and snap.capacity_tokens == base.capacity_tokens


def test_sglang_inconsistent_pool_is_left_out_not_guessed() -> None:
    text = re.sub(r"(sglang:kv_used_tokens\{[^}]*\}) [0-9.e+]+", r"\1 187393.0", SGLANG)
    (snap,), missing = roundtrip("sglang", text)
    assert snap.pools[0].evictable_slots is None  # fell back to num_used_tokens
    assert any("do not sum to its capacity" in m for m in missing)


# ------------------------------------------------------------------------------ bad text


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("vllm", "", "no metrics"),
        ("vllm", 'vllm:kv_cache_usage_perc{engine="0"', "malformed"),
        ("vllm", VLLM[: VLLM.index("vllm:cache_config_info{") + 40], "malformed"),
        (
            "vllm",
            VLLM.replace(
                "# TYPE vllm:num_preemptions_total counter",
                "# TYPE vllm:num_preemptions_total counter\n"
                'vllm:num_preemptions_total{engine="0",model_name="m"} 1\n'
                'vllm:num_preemptions_total{engine="0",model_name="m"} 2',
            ),
            "duplicate series",
        ),
        # Families the bridge does not read are not parsed: their garbage costs nothing.
        # (See test_unread_families_are_not_parsed.)
        (
            "vllm",
            "\n".join(ln for ln in VLLM.splitlines() if "cache_config_info" not in ln),
            "not ready",
        ),
        ("vllm", SGLANG, "cache_config_info is missing"),
        ("sglang", VLLM, "max_total_num_tokens is missing"),
        (
            "vllm",
            re.sub(r"(kv_cache_usage_perc\{[^}]*\}) [0-9.e+]+", r"\1 NaN", VLLM),
            "no engine could be read",
        ),
        ("tgi", VLLM, "no bridge"),
    ],
)
def test_bad_text_is_a_clear_error(kind: str, text: str, message: str) -> None:
    with pytest.raises(BridgeError, match=message):
        convert(kind, text)


def test_convert_cli_prints_snapshots_and_what_is_missing() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine_shim.cli",
            "convert",
            "--engine",
            "vllm",
            str(FIXTURES / "vllm-0.33.0-dp1.prom"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["snapshots"][0]["pools"][0]["used_slots"] == 398_208
    assert out["missing"]
    for text, error in (
        ("nonsense{", "sglang:max_total_num_tokens is missing"),  # no family it reads
        ("sglang:max_total_num_tokens{", "malformed metrics text"),  # one it reads, broken
    ):
        bad = subprocess.run(
            [sys.executable, "-m", "engine_shim.cli", "convert", "--engine", "sglang", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and error in bad.stderr, (text, bad.stderr)


def test_unread_families_are_not_parsed() -> None:
    """A malformed or duplicated family the bridge never reads (a plugin's metric, a histogram)
    does not blind it; the same fault in a family it reads is still an error."""
    junk = '# TYPE plugin_thing gauge\nplugin_thing{a="1"} 1\nplugin_thing{a="1"} 2\nbroken{ 7\n'
    (snap,), _ = roundtrip("vllm", junk + VLLM)
    assert snap.pools[0].used_slots == 24888 * 16
    with pytest.raises(BridgeError, match="malformed"):
        convert("vllm", VLLM + 'vllm:num_preemptions_total{engine="0" 7\n')


# --------------------------------------------------------------- through the exporter


def test_exporter_publishes_contract_metrics_for_bridged_targets() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from exporter.app import Exporter
    from exporter.config import parse_config

    texts = {"vllm": VLLM.encode(), "sglang": SGLANG.encode()}
    servers = {
        k: CannedServer(body(v, content_type="text/plain; version=0.0.4")) for k, v in texts.items()
    }
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "poll_interval": 0.3,
            "timeout": 0.25,
            "nvml": "off",
            "targets": [
                {"name": k, "kind": k, "url": f"{s.url}/metrics"} for k, s in servers.items()
            ],
        }
    )
    exporter = Exporter(config)
    exporter.start()
    try:
        import httpx

        def sample_map() -> dict[tuple[str, str, str], float]:
            text = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics").text
            return {
                (
                    s.name,
                    s.labels.get("engine", ""),
                    s.labels.get("state", s.labels.get("tier", "")),
                ): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }

        wait_for(
            lambda: (
                sample_map().get(("kvcache_exporter_target_up", "sglang", "")) == 1
                and sample_map().get(("kvcache_exporter_target_up", "vllm", "")) == 1
            ),
            5,
            "both up",
        )
        m = sample_map()
        assert m[("kvcache_pool_slots", "sglang", "evictable")] == 117_248
        assert m[("kvcache_physical_usage_ratio", "sglang", "")] == (187_392 + 117_248) / 425_984
        assert m[("kvcache_tier_used_tokens", "sglang", "host")] == 612_352
        assert m[("kvcache_prefix_hit_tokens_total", "sglang", "storage")] == 393_216
        assert m[("kvcache_pool_slots", "vllm", "used")] == 398_208
        assert m[("kvcache_active_usage_ratio", "vllm", "")] == 398_208 / 455_872
        assert ("kvcache_pool_slots", "vllm", "evictable") not in m  # unknown, so absent
        assert ("kvcache_physical_usage_ratio", "vllm", "") not in m
        assert m[("kvcache_max_concurrency", "vllm", "")] == 13.91259765625
        # Headroom from the recovered footprint: (455872 - 398208) / 16 / 2048 = 1.76 -> 1.
        assert m[("kvcache_concurrency_headroom", "vllm", "")] == 1
        assert m[("kvcache_preemptions_total", "vllm", "")] == 7

        # The vLLM server restarts: its counters start again from small values. The exporter's
        # counters continue from where they were.
        restarted = re.sub(r"(vllm:num_preemptions_total\{[^}]*\}) 7.0", r"\1 1.0", VLLM)
        restarted = restarted.replace("1.843211e+06", "500.0").replace("1.76382e+09", "1.76399e+09")
        servers["vllm"].respond = body(restarted.encode())
        wait_for(
            lambda: sample_map().get(("kvcache_exporter_engine_restarts_total", "vllm", "")) == 1,
            5,
            "restart",
        )
        wait_for(  # the restarted engine's first poll is published with the restart count
            lambda: (
                sample_map().get(("kvcache_prefix_query_tokens_total", "vllm", ""))
                == 1_843_211 + 500
            ),
            5,
            "the counters continued across the restart",
        )
        m = sample_map()
        assert m[("kvcache_preemptions_total", "vllm", "")] == 8  # 7 before, 1 since
        assert m[("kvcache_prefix_query_tokens_total", "vllm", "")] == 1_843_211 + 500
    finally:
        exporter.stop()
        for s in servers.values():
            s.close()


@pytest.mark.parametrize(
    "label",
    [
        "num_gpu_blocks",
        "block_size",
        "kv_cache_size_tokens",
        "kv_cache_max_concurrency",
        "kv_cache_memory_bytes",
    ],
)
@pytest.mark.parametrize("value", ["²", "٣", "9" * 5000, ":3.9", "1e999", "-5", "nan", ""])
def test_config_labels_that_are_not_numbers_never_crash(label: str, value: str) -> None:
    """Labels are free text: a value int() or float() refuses is unknown, never an exception."""
    text = re.sub(rf'{label}="[^"]*"', f'{label}="{value}"', VLLM)
    try:
        result = convert("vllm", text)
    except BridgeError:
        return
    for snap in result.snapshots:
        parse_snapshot(snap.to_json())


# ------------------------------------------- SGLang: what a user reads in the snapshot and why


def drop(text: str, *names: str) -> str:
    """The text without the series (and HELP/TYPE) of these metric names."""
    return (
        "\n".join(
            ln
            for ln in text.splitlines()
            if not any(re.match(rf"(# \w+ )?{n}\b", ln) for n in names)
        )
        + "\n"
    )


def set_value(text: str, name: str, value: float) -> str:
    return re.sub(rf"^({re.escape(name)}\{{[^}}]*\}}) \S+$", rf"\g<1> {value}", text, flags=re.M)


def test_sglang_identity_and_capacity_as_published() -> None:
    (snap,), missing = roundtrip("sglang", SGLANG)
    e = snap.engine
    assert (e.kind, e.version, e.model, e.dp_rank, e.instance_id) == (
        "sglang",
        "unknown",  # SGLang's /metrics carries neither its version nor an instance id
        "meta-llama/Llama-3.1-8B-Instruct",
        0,
        "unknown",
    )
    assert snap.sequence == 0 and snap.time == 1000.0
    assert snap.capacity_tokens == 425_984  # max_total_num_tokens, SGLang's own token figure
    assert missing == ["dp 0: retractions (num_retracted_requests_total)"]
    unnamed = SGLANG.replace('model_name="meta-llama/Llama-3.1-8B-Instruct",', "")
    (snap,), _ = roundtrip("sglang", unnamed)
    assert snap.engine.model == "unknown"


def test_sglang_without_rank_labels_and_with_other_rank_numbers() -> None:
    """Older/single-process SGLang has no tp/pp labels; a scrape may hold only TP rank 1."""
    (base,), _ = roundtrip("sglang", SGLANG)
    for text in (
        SGLANG.replace(',pp_rank="0",tp_rank="0"', "").replace(',pp_rank="0"', ""),
        SGLANG.replace('tp_rank="0"', 'tp_rank="1"').replace('pp_rank="0"', 'pp_rank="2"'),
    ):
        (snap,), _ = roundtrip("sglang", text)
        assert snap.pools == base.pools and snap.requests == base.requests
        assert snap.counters.prefix_hit_tokens == base.counters.prefix_hit_tokens


def test_sglang_every_reason_names_the_rank_and_the_cause() -> None:
    with pytest.raises(
        BridgeError,
        match=re.escape(
            "sglang:max_total_num_tokens is missing: metrics are off (--enable-metrics),"
            " or this is not SGLang"
        ),
    ):
        convert("sglang", drop(SGLANG, "sglang:max_total_num_tokens"))
    with pytest.raises(
        BridgeError,
        match=re.escape(
            "no data-parallel rank could be read: dp 0: no valid sglang:max_total_num_tokens"
        ),
    ):
        convert("sglang", set_value(SGLANG, "sglang:max_total_num_tokens", 0))
    neither = drop(SGLANG, "sglang:kv_used_tokens", "sglang:num_used_tokens")
    with pytest.raises(
        BridgeError,
        match=re.escape(
            "no data-parallel rank could be read: dp 0: neither kv_*_tokens (SGLang >= 0.5.11)"
            " nor num_used_tokens"
        ),
    ):
        convert("sglang", neither)
    old = drop(SGLANG, "sglang:kv_used_tokens", "sglang:kv_evictable_tokens")
    (snap,), missing = roundtrip("sglang", old)
    assert snap.pools[0].evictable_slots is None
    assert missing == [
        "dp 0: evictable tokens (SGLang < 0.5.11 exports no kv_evictable_tokens)",
        "dp 0: retractions (num_retracted_requests_total)",
    ]
    tokenizer_only = drop(SGLANG, "sglang:prefill_effective_tokens_total")
    _, missing = roundtrip("sglang", tokenizer_only)
    assert missing == [
        "dp 0: prefix query tokens (no prefill_effective_tokens_total)",
        "dp 0: retractions (num_retracted_requests_total)",
    ]


def test_sglang_partial_pool_counts_fall_back_to_num_used_tokens() -> None:
    for gone in ("sglang:kv_available_tokens", "sglang:kv_evictable_tokens"):
        (snap,), _ = roundtrip("sglang", drop(SGLANG, gone))
        full = snap.pools[0]
        assert (full.used_slots, full.evictable_slots, full.available_slots) == (
            187_392,
            None,
            None,
        )
    # An old SGLang whose pool is completely full is still read (used == capacity).
    full_old = set_value(drop(SGLANG, "sglang:kv_used_tokens"), "sglang:num_used_tokens", 425_984)
    (snap,), _ = roundtrip("sglang", full_old)
    assert snap.pools[0].used_slots == 425_984


def test_sglang_defaults_for_series_it_may_lack() -> None:
    (snap,), _ = roundtrip("sglang", drop(SGLANG, "sglang:page_size"))
    assert snap.pools[0].block_size == 1  # token-granular pool when no page size is exported
    no_storage = "\n".join(ln for ln in SGLANG.splitlines() if 'mode="storage_hit"' not in ln)
    (snap,), _ = roundtrip("sglang", no_storage + "\n")
    assert snap.counters.prefix_hit_tokens == {
        "device": 18_734_592,
        "host": 2_461_696,
        "storage": 0,
    }
    assert snap.counters.prefix_query_tokens == 34_694_656 - 393_216
    (snap,), _ = roundtrip("sglang", drop(SGLANG, "sglang:num_queue_reqs"))
    assert snap.requests is None  # half a request count is not published
    (snap,), _ = roundtrip("sglang", drop(SGLANG, "sglang:num_running_reqs"))
    assert snap.requests is None


def test_sglang_tokenizer_hits_summed_per_tier_and_unlabelled_series_ignored() -> None:
    text = drop(SGLANG, "sglang:prefill_effective_tokens_total").replace(
        'sglang:cached_tokens_total{cache_source="storage",',
        'sglang:cached_tokens_total{cache_source="storage_mooncake",engine_type="x"} 7.0\n'
        'sglang:cached_tokens_total{cache_source="storage_file",',
    )
    text += 'sglang:cached_tokens_total{engine_type="unified"} 5.0\n'  # no cache_source
    (snap,), _ = roundtrip("sglang", text)
    assert snap.counters.prefix_hit_tokens == {
        "device": 18_734_592,
        "host": 2_461_696,
        "storage": 393_216 + 7,
    }


def test_sglang_host_tier_only_when_its_counts_make_sense() -> None:
    def host(used: float | None, total: float | None) -> object:
        text = SGLANG
        for name, value in (
            ("sglang:hicache_host_used_tokens", used),
            ("sglang:hicache_host_total_tokens", total),
        ):
            text = drop(text, name) if value is None else set_value(text, name, value)
        (snap,), _ = roundtrip("sglang", text)
        tier = snap.host_tier
        return None if tier is None else (tier.capacity_tokens, tier.used_tokens)

    assert host(851_968, 851_968) == (851_968, 851_968)  # a full host tier
    assert host(851_969, 851_968) is None  # more used than there is: not published
    assert host(None, 851_968) is None
    assert host(0, 0) is None  # HiCache off
    assert host(5, None) is None


def test_sglang_a_one_slot_mamba_pool_is_a_pool() -> None:
    text = sglang_with(mamba_used_tokens=1, mamba_evictable_tokens=0, mamba_available_tokens=0)
    (snap,), _ = roundtrip("sglang", text)
    assert [(p.name, p.capacity_slots) for p in snap.pools] == [("full", 425_984), ("mamba", 1)]


def test_sglang_non_numeric_dp_rank_is_rank_0_not_a_crash() -> None:
    text = re.sub(r'^((?!.*dp_rank).*tp_rank="0")\}', r'\1,dp_rank="a"}', SGLANG, flags=re.M)
    (snap,), _ = roundtrip("sglang", text)
    assert snap.engine.dp_rank == 0 and snap.pools[0].used_slots == 187_392


def sglang_dp2_old_hybrid() -> str:
    """Hand-written: DP=2 of an SGLang < 0.5.11 hybrid model, every per-rank value distinct."""
    out = []
    values = {
        "num_used_tokens": (1000, 2000),
        "max_total_num_tokens_swa": (4096, 8192),
        "swa_used_tokens": (100, 200),
        "swa_evictable_tokens": (10, 20),
        "swa_available_tokens": (3986, 7972),
        "mamba_used_tokens": (1, 2),
        "mamba_evictable_tokens": (3, 4),
        "mamba_available_tokens": (5, 6),
        "num_retracted_requests_total": (7, 8),
        "evicted_tokens_total": (90, 91),
    }
    base = drop(SGLANG, "sglang:kv_used_tokens", "sglang:kv_evictable_tokens")
    base = drop(base, "sglang:kv_available_tokens", "sglang:evicted_tokens_total")
    for name in values:
        if f"sglang:{name}{{" not in base:
            base += f"sglang:{name}{{{LABELS}}} 0.0\n"
    for line in base.splitlines():
        if line.startswith("#") or 'tp_rank="0"' not in line:
            out.append(line)
            continue
        for dp in (0, 1):
            ranked = line.replace('tp_rank="0"', f'tp_rank="0",dp_rank="{dp}"')
            name = ranked.split("{")[0].removeprefix("sglang:")
            if name in values:
                ranked = re.sub(r" \S+$", f" {float(values[name][dp])}", ranked)
            out.append(ranked)
    return "\n".join(out) + "\n"


def test_sglang_dp2_old_hybrid_reads_each_ranks_own_series() -> None:
    snaps, _ = roundtrip("sglang", sglang_dp2_old_hybrid())
    assert [s.engine.dp_rank for s in snaps] == [0, 1]
    got = [
        (
            {p.name: (p.used_slots, p.evictable_slots, p.capacity_slots) for p in s.pools},
            s.counters.preemptions,
            s.counters.evicted_tokens,
            s.engine.model,
        )
        for s in snaps
    ]
    model = "meta-llama/Llama-3.1-8B-Instruct"
    assert got == [
        (
            {"full": (1000, None, 425_984), "swa": (100, 10, 4096), "mamba": (1, 3, 9)},
            7,
            90,
            model,
        ),
        (
            {"full": (2000, None, 425_984), "swa": (200, 20, 8192), "mamba": (2, 4, 12)},
            8,
            91,
            model,
        ),
    ]


def test_sglang_garbage_in_families_it_does_not_read_costs_nothing() -> None:
    text = SGLANG + 'sglang:some_future_metric{a="1"} not-a-number\n'
    (snap,), _ = roundtrip("sglang", text)
    assert snap.pools[0].used_slots == 187_392

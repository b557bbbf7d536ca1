"""The mixin's configuration: overrides change what is generated, bad overrides are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mixin.build import main, outputs
from mixin.config import MixinConfig, MixinConfigError, load_config, override

ROOT = Path(__file__).resolve().parents[2]


def rules_of(config: MixinConfig) -> dict[str, dict[str, object]]:
    text = outputs(config)[Path("alerts/kvcache-rules.yml")]
    return {
        r.get("alert") or r["record"]: r for g in yaml.safe_load(text)["groups"] for r in g["rules"]
    }


def test_an_override_file_changes_thresholds_selectors_and_urls(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "exhausted_usage": 0.9,
                "exhausted_for": "2m",
                "exporter_selector": 'job="kv", namespace="prod"',
                "fleet_labels": ["region", "namespace"],
                "runbook_url_pattern": "https://wiki.example/kv#%s",
                "preemptions_per_second": 1,
                "what_if_target_hit_ratios": [0.6],
            }
        )
    )
    rules = rules_of(load_config(path))
    kv_for = rules["engine:kvcache_prefix_kv_for_hit_ratio_tokens:rate1h"]
    assert str(kv_for["expr"]).startswith("histogram_quantile(0.6, ")
    assert kv_for["labels"] == {"target_hit_ratio": "0.6"}
    exhausted = rules["KVCacheExhausted"]
    assert "> 0.9\n" in str(exhausted["expr"]) and exhausted["for"] == "2m"
    assert exhausted["annotations"]["runbook_url"] == "https://wiki.example/kv#kvcacheexhausted"  # type: ignore[index]
    assert 'up{job="kv", namespace="prod"}' in str(rules["KVCacheExporterAbsent"]["expr"])
    assert "count by (region, namespace)" in str(rules["KVCacheExporterAbsent"]["expr"])
    assert "sum by (region, namespace, model)" in str(
        rules["model:kvcache_active_usage:ratio"]["expr"]
    )
    assert "> 1.0" in str(rules["KVCachePreemptions"]["expr"])
    # The dashboards follow: a region variable, the same thresholds.
    fleet = outputs(load_config(path))[Path("dashboards/kvcache-fleet.json")]
    assert '"name": "region"' in fleet and 'region=~\\"$region\\"' in fleet


def test_the_command_writes_a_copy_and_checks_staleness(tmp_path: Path) -> None:
    assert main(["build", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "alerts" / "kvcache-rules.yml").is_file()
    assert main(["build", "--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "alerts" / "kvcache-rules.yml").write_text("stale\n")
    assert main(["build", "--out", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"exhausted_usag": 0.9}, "unknown setting 'exhausted_usag'"),
        ({"exhausted_usage": "high"}, "exhausted_usage must be a number"),
        ({"exhausted_usage": True}, "exhausted_usage must be a number"),
        ({"exhausted_for": "5 minutes"}, "is not a duration"),
        ({"fleet_labels": "cluster"}, "must be a list of label names"),
        ({"fleet_labels": ["clus-ter"]}, "is not a label name"),
        ({"runbook_url_pattern": "docs/runbooks.md#%s"}, "absolute URL"),
        ({"runbook_url_pattern": "https://x/runbooks"}, "absolute URL with %s"),
        ({"fleet_top_k": 2.5}, "fleet_top_k must be an integer"),
        ({"what_if_target_hit_ratios": 0.5}, "must be a list of ratios in (0, 1)"),
        ({"what_if_target_hit_ratios": [0.5, 1.0]}, "must be a list of ratios in (0, 1)"),
        ({"what_if_target_hit_ratios": [True]}, "must be a list of ratios in (0, 1)"),
        ({"what_if_target_hit_ratios": []}, "must be a list of ratios in (0, 1)"),
    ],
)
def test_bad_overrides_are_refused(overrides: dict[str, object], complaint: str) -> None:
    with pytest.raises(MixinConfigError, match=re.escape(complaint)):
        override(MixinConfig(), overrides)


def test_a_bad_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- a list\n")
    assert main(["build", "--config", str(path), "--out", str(tmp_path)]) == 2
    assert "expected a mapping" in capsys.readouterr().err


def test_each_rule_area_is_the_alerts_its_promtool_file_tests() -> None:
    """mixin/rules/<area>.py holds exactly the alerts alerts/tests/<area>.test.yml runs."""
    from mixin import rules

    tests = ROOT / "alerts" / "tests"
    for area in rules.AREAS:
        name = area.__name__.rsplit(".", 1)[1]
        declared = {str(rule["alert"]) for rule in area.alerts(MixinConfig())}
        tested = set(re.findall(r"alertname: (\w+)", (tests / f"{name}.test.yml").read_text()))
        assert declared == tested, name

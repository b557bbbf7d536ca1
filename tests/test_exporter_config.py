"""Config: the shipped example is valid, and bad configs name the file, the key and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).parent.parent / "examples" / "exporter.yaml"


def test_shipped_example_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert config.listen_port == 8322
    assert config.poll_interval == 5.0
    assert config.max_response_bytes == 4 * 2**20
    assert config.eta_window == 120.0
    assert [t.url for t in config.targets] == ["http://127.0.0.1:8321/v1/kv/stats"]


def base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"targets": [{"name": "a", "kind": "shim", "url": "http://127.0.0.1:1"}]}
    data.update(overrides)
    return data


def test_defaults_and_units() -> None:
    config = parse_config(
        base(poll_interval="500ms", timeout=0.25, max_response_bytes="1KiB", nvml=False)
    )
    assert config.poll_interval == 0.5 and config.timeout == 0.25
    assert config.max_response_bytes == 1024 and config.nvml == "off"
    assert config.targets[0].timeout == 0.25
    vllm = parse_config(base(targets=[{"name": "v", "kind": "vllm", "url": "http://h:8000"}]))
    assert vllm.targets[0].url == "http://h:8000/metrics"


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        (base(listen="8322"), "listen", "HOST:PORT"),
        (base(listen="x:99999"), "listen", "0-65535"),
        (base(poll_interval="fast"), "poll_interval", "duration"),
        (base(poll_interval=0), "poll_interval", "positive"),
        (base(nvml="maybe"), "nvml", "auto, on, off"),
        (base(max_response_bytes="lots"), "max_response_bytes", "size"),
        (base(polling=3), "polling", "unknown key"),
        ({"targets": []}, "targets", "non-empty list"),
        ({}, "targets", "non-empty list"),
        (base(targets=[{"kind": "shim", "url": "http://x"}]), "targets[0].name", "required"),
        (
            base(targets=[{"name": "a b", "kind": "shim", "url": "http://x"}]),
            "targets[0].name",
            "letters",
        ),
        (
            base(targets=[{"name": "a", "kind": "tgi", "url": "http://x"}]),
            "targets[0].kind",
            "shim, vllm, sglang",
        ),
        (
            base(targets=[{"name": "a", "kind": "shim", "url": "ftp://x"}]),
            "targets[0].url",
            "http(s) URL",
        ),
        (
            base(targets=[{"name": "a", "kind": "shim", "url": "http://x", "timeout": "9s"}]),
            "targets[0].timeout",
            "longer than poll_interval",
        ),
        (
            base(targets=[{"name": "a", "kind": "shim", "url": "http://x", "token": "t"}]),
            "targets[0].token",
            "unknown key",
        ),
        (
            base(
                targets=[
                    {"name": "a", "kind": "shim", "url": "http://x", "bearer_token_env": "NOPE_XYZ"}
                ]
            ),
            "targets[0].bearer_token_env",
            "not set",
        ),
        (
            base(targets=[{"name": "a", "kind": "shim", "url": "http://x"}] * 2),
            "targets[1].name",
            "duplicate",
        ),
        (base(gpus={"zzz": "GPU-1"}), "gpus.zzz", "names no target"),
        (base(gpus={"a": 5}), "gpus.a", "UUID"),
        ([1, 2], "(top level)", "mapping"),
    ],
)
def test_bad_config_names_key_and_problem(data: Any, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yaml")
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith("cfg.yaml: ")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("targets:\n  - name: a\n    kind: [shim\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.key.startswith("line ")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_cli(tmp_path: Path) -> None:
    ok = run_cli("check-config", str(EXAMPLE))
    assert ok.returncode == 0 and "OK, 1 target(s)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base(poll_interval="soon")))
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: poll_interval: expected a duration" in result.stderr
    missing = run_cli("check-config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_running_with_a_bad_config_exits_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base(nvml="sometimes")))
    result = run_cli("--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: nvml: must be one of auto, on, off" in result.stderr


# exporter-toolkit's testdata pattern: *.good.yml load, *.bad.yml fail with the error on their
# first line ("# error: KEY: PROBLEM"). Secrets in them ("hunter2", the tokens) must never show.
TESTDATA = Path(__file__).parent / "testdata" / "config"
SECRETS = ("hunter2", "s3cret")
TOKENS = {
    "KVCACHE_TEST_TOKEN_EMPTY": "",
    "KVCACHE_TEST_TOKEN_BROKEN": "s3cret\nX-Injected: 1",
    "KVCACHE_TEST_TOKEN_NEWLINE": "s3cret-token\n",
}


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("path", sorted(TESTDATA.glob("*.good.yml")), ids=lambda p: p.name)
def test_good_configs_load(path: Path, tokens: None) -> None:
    config = load_config(path)
    for target in config.targets:
        token = target.bearer_token()
        assert token is None or token == token.strip()
        assert not any(secret in repr(config) for secret in SECRETS)


@pytest.mark.parametrize("path", sorted(TESTDATA.glob("*.bad.yml")), ids=lambda p: p.name)
def test_bad_configs_fail_with_their_error_and_no_secret(path: Path, tokens: None) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# error: ")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert not any(secret in message for secret in SECRETS), message


def test_check_config_never_prints_a_password() -> None:
    result = run_cli("check-config", str(TESTDATA / "url-credentials.bad.yml"))
    assert result.returncode == 2
    assert "credentials in a URL are refused" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr

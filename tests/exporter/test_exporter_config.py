"""Config: the shipped example is valid, and bad configs name the file, the key and the problem."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import ConfigError, load_config, parse_config
from exporter.webconfig import load_web_config

EXAMPLE = Path(__file__).parents[2] / "examples" / "exporter.yaml"


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
TESTDATA = Path(__file__).parents[1] / "testdata" / "config"
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


# A config file can hold anything: every byte sequence either loads or fails with a ConfigError
# that names the file, never another exception (a traceback, a dead exporter on SIGHUP).
@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.builds(
            lambda text, at, junk: text[:at] + junk + text[at:],
            st.just(EXAMPLE.read_bytes()),
            st.integers(0, len(EXAMPLE.read_bytes())),
            st.binary(min_size=1, max_size=8),
        ),
        st.text(max_size=200).map(lambda t: t.encode("utf-16")),
    )
)
def test_any_bytes_load_or_fail_with_a_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.yaml"
        path.write_bytes(data)
        try:
            load_config(path)
        except ConfigError as exc:
            assert str(exc).startswith(f"{path}: ")


BCRYPT = "$2b$12$Yb9u3Yf5bMRtXbGQ0qAjPOxq2Jx4u3Jzw9Wq9W1k7o5rDk8bQf3YW"


@pytest.mark.parametrize(
    ("content", "where", "problem"),
    [
        (b"listen: 127.0.0.1:8322\ntargets:\xff []\n", "line 2, column 9", "not UTF-8"),
        ("targets: []\n".encode("utf-16"), "line 1, column 1", "not UTF-8"),
        (b"targets: " + b"[" * 5000 + b"]" * 5000 + b"\n", "(file)", "invalid YAML"),
        (
            f"basic_auth_users:\n  admin: {BCRYPT}\n  bob: [{BCRYPT}\n".encode(),
            "line ",
            "invalid YAML",
        ),
    ],
    ids=["non-utf8-byte", "utf16", "nested-too-deep", "yaml-error-beside-a-hash"],
)
def test_hostile_files_name_the_place_and_never_echo_content(
    tmp_path: Path, content: bytes, where: str, problem: str
) -> None:
    for load in (load_config, load_web_config):
        path = tmp_path / "hostile.yaml"
        path.write_bytes(content)
        with pytest.raises(ConfigError) as info:
            load(path)
        assert info.value.key.startswith(where) and problem in info.value.problem
        assert "$2b$" not in str(info.value) and "Yb9u3" not in str(info.value)


def test_check_config_on_a_non_utf8_file_exits_2_with_the_place(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("targets:\n  - name: caf\xe9\n".encode("latin-1"))
    for args in (("check-config", str(bad)), ("--config", str(bad))):
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert f"{bad}: line 2, column 14: not UTF-8 text" in result.stderr
        assert "Traceback" not in result.stderr

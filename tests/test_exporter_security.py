"""/metrics over real TLS on loopback, basic auth from an exporter-toolkit web config."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from pathlib import Path

import bcrypt
import httpx
import pytest
import yaml

from exporter.app import Exporter
from exporter.config import ConfigError, load_config
from exporter.webconfig import BasicAuth, load_web_config
from tests.helpers import CannedServer, body, wait_for
from tests.test_snapshot import valid

PASSWORD = "correct horse battery staple"


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    openssl(
        tmp_path,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        "tls.key",
        "-out",
        "tls.crt",
    )
    digest = (
        bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=6)).decode().replace("$2b$", "$2y$")
    )
    (tmp_path / "web.yml").write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key"},
                "basic_auth_users": {"prometheus": digest},
            }
        )
    )
    return tmp_path


def exporter_with_web_config(certs: Path, web_file: str) -> tuple[Exporter, CannedServer]:
    """A started exporter whose config names ``web_file``, polling a canned shim."""
    shim = CannedServer(body(json.dumps(valid()).encode()))
    config_path = certs / "exporter.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "poll_interval": 0.3,
                "timeout": 0.25,
                "nvml": "off",
                "web_config_file": web_file,
                "targets": [{"name": "a", "kind": "shim", "url": shim.url}],
            }
        )
    )
    exporter = Exporter(load_config(config_path))
    exporter.start()
    return exporter, shim


def test_tls_and_basic_auth(certs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exporter, shim = exporter_with_web_config(certs, "web.yml")
    try:
        url = f"https://127.0.0.1:{exporter.port}"
        with httpx.Client(
            verify=ssl.create_default_context(cafile=str(certs / "tls.crt"))
        ) as client:
            wait_for(
                lambda: client.get(f"{url}/healthz").status_code == 200, 5, "healthy"
            )  # open for probes
            assert client.get(f"{url}/metrics").status_code == 401
            assert (
                client.get(f"{url}/metrics").headers["WWW-Authenticate"]
                == 'Basic realm="kvcache-exporter"'
            )
            assert client.get(f"{url}/metrics", auth=("prometheus", "wrong")).status_code == 401
            assert client.get(f"{url}/metrics", auth=("nobody", PASSWORD)).status_code == 401
            ok = client.get(f"{url}/metrics", auth=("prometheus", PASSWORD))
            assert ok.status_code == 200 and "kvcache_pool_slots" in ok.text
            assert client.get(f"{url}/", auth=("prometheus", PASSWORD)).status_code == 200
            assert PASSWORD not in ok.text
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
            httpx.get(f"{url}/metrics")
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=3)
    finally:
        exporter.stop()
        shim.close()
    assert PASSWORD not in caplog.text


def test_basic_auth_caches_only_successes() -> None:
    digest = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4))
    auth = BasicAuth({"u": digest})
    import base64

    header = "Basic " + base64.b64encode(b"u:pw").decode()
    assert auth.check(header) and auth.check(header)
    assert not auth.check("Basic " + base64.b64encode(b"u:nope").decode())
    assert not auth.check("Basic !!!") and not auth.check("Bearer x") and not auth.check(None)
    assert BasicAuth({}).check(None)  # no users configured: open


@pytest.mark.parametrize(
    ("web", "key", "problem"),
    [
        ({"basic_auth_users": {"u": "plaintext"}}, "basic_auth_users.u", "bcrypt hash"),
        (
            {"tls_server_config": {"cert_file": "nope.crt", "key_file": "tls.key"}},
            "tls_server_config.cert_file",
            "no such file",
        ),
        ({"tls_server_config": {"cert_file": "tls.crt"}}, "tls_server_config", "go together"),
        (
            {"tls_server_config": {"cert_file": "tls.key", "key_file": "tls.crt"}},
            "tls_server_config",
            "cannot load",
        ),
        ({"tls": {}}, "tls", "unknown key"),
    ],
)
def test_bad_web_config_is_a_clear_error(certs: Path, web: dict, key: str, problem: str) -> None:  # type: ignore[type-arg]
    path = certs / "bad-web.yml"
    path.write_text(yaml.safe_dump(web))
    with pytest.raises(ConfigError) as info:
        load_web_config(path)
    assert info.value.key == key and problem in info.value.problem


def test_check_config_validates_the_web_config(certs: Path) -> None:
    (certs / "bad-web.yml").write_text(yaml.safe_dump({"basic_auth_users": {"u": "hunter2"}}))
    config = certs / "exporter.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "web_config_file": "bad-web.yml",
                "targets": [{"name": "a", "kind": "shim", "url": "http://x"}],
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "basic_auth_users.u: expected a bcrypt hash" in result.stderr
    assert "hunter2" not in result.stderr


def test_client_certificates_can_be_required(certs: Path) -> None:
    openssl(
        certs,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    openssl(
        certs,
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=prometheus",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    )
    openssl(
        certs,
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        "client.crt",
    )
    (certs / "mtls.yml").write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {
                    "cert_file": "tls.crt",
                    "key_file": "tls.key",
                    "client_ca_file": "ca.crt",
                }
            }
        )
    )
    exporter, shim = exporter_with_web_config(certs, "mtls.yml")
    try:
        url = f"https://127.0.0.1:{exporter.port}/metrics"
        trusted = ssl.create_default_context(cafile=str(certs / "tls.crt"))
        with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
            httpx.get(url, verify=trusted)
        trusted.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
        wait_for(
            lambda: "kvcache_pool_slots" in httpx.get(url, verify=trusted).text,
            5,
            "metrics over mTLS",
        )
    finally:
        exporter.stop()
        shim.close()

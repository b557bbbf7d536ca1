"""/metrics over real TLS on loopback, basic auth from an exporter-toolkit web config, and the
HTTP edges: plain HTTP on the TLS port, Accept-Encoding q-values, GETs that carry a body."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import httpx
import pytest
import yaml

from engine_shim.server import ShimApp, ShimServer
from exporter.app import Exporter, accepts_gzip
from exporter.config import ConfigError, load_config, parse_config
from exporter.webconfig import BasicAuth, load_web_config
from tests.builders import valid
from tests.helpers import CannedServer, body, wait_for

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
        # Plain HTTP on the TLS port: a clear 400, as Go's servers answer, not a silent close.
        plain = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=3)
        assert plain.status_code == 400
        assert plain.text == "Client sent an HTTP request to an HTTPS server.\n"
        with httpx.Client(
            verify=ssl.create_default_context(cafile=str(certs / "tls.crt"))
        ) as client:  # and TLS still works after it
            assert client.get(f"{url}/metrics", auth=("prometheus", PASSWORD)).status_code == 200
    finally:
        exporter.stop()
        shim.close()
    assert PASSWORD not in caplog.text


def bcrypt_costs(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The cost prefix (``$2b$NN$``) of every hash bcrypt checks a password against, from now."""
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(hashed[:7])
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    return checks


def test_basic_auth_edges_are_refusals_not_dropped_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import base64

    digest = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=5))
    auth = BasicAuth({"u": digest})

    def header(user: bytes, password: bytes, scheme: str = "Basic") -> str:
        return f"{scheme} " + base64.b64encode(user + b":" + password).decode()

    assert auth.check(header(b"u", b"pw", scheme="basic"))  # RFC 7617: case-insensitive
    assert auth.check(header(b"u", b"pw", scheme="BASIC"))
    assert not auth.check(header(b"u", b"p" * 73))  # bcrypt would raise past 72 bytes
    assert not auth.check(header(b"u", b"\xff" * 100))
    # An unknown user costs one bcrypt check at the configured cost, as a wrong password does.
    checks = bcrypt_costs(monkeypatch)
    assert not auth.check(header(b"nobody", b"pw"))
    assert not auth.check(header(b"u", b"wrong"))
    assert checks == [digest[:7], digest[:7]]  # $2b$05$ both times


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


@pytest.mark.parametrize(
    ("header", "gzipped"),
    [
        ("gzip", True),
        ("gzip, deflate", True),
        ("gzip;q=0", False),
        ("gzip; q=0.0, identity", False),
        ("identity", False),
        ("*;q=0.5", True),
        ("*;q=0.5, gzip;q=0", False),
        ("", False),
    ],
)
def test_accept_encoding_q_values(header: str, gzipped: bool) -> None:
    assert accepts_gzip(header) is gzipped


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or 3 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def smuggling(request_line: bytes, hidden: bytes) -> bytes:
    """A request whose body is another request (read as one, it would be answered twice)."""
    length = str(len(hidden)).encode()
    return (
        request_line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n" + hidden
    )


def test_a_get_with_a_body_is_refused_not_read_as_a_second_request() -> None:
    request = smuggling(b"GET /metrics", b"GET /nope-second-request HTTP/1.1\r\nHost: x\r\n\r\n")
    shim = CannedServer(body(json.dumps(valid()).encode()))
    exporter = Exporter(
        parse_config(
            {
                "listen": "127.0.0.1:0",
                "nvml": "off",
                "targets": [{"name": "a", "kind": "shim", "url": shim.url}],
            }
        )
    )
    exporter.start()
    engine_side = ShimServer(ShimApp(snapshots=lambda: [], healthy=lambda: True))
    engine_side.start()
    try:
        for port in (exporter.port, engine_side.port):
            answer = raw_exchange(port, request)
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
            assert answer.count(b"HTTP/1.") == 1, "the body was served as a request"
    finally:
        exporter.stop()
        engine_side.stop()
        shim.close()


def test_an_unknown_user_costs_the_slowest_configured_bcrypt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With users of different costs, an unknown user must cost what the slowest known user's
    wrong password costs: anything less tells user names apart by timing."""
    import base64

    fast = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4))
    slow = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=7))
    auth = BasicAuth({"fast": fast, "slow": slow})
    checks = bcrypt_costs(monkeypatch)
    assert not auth.check("Basic " + base64.b64encode(b"nobody:pw").decode())
    assert checks == [slow[:7]]  # $2b$07$


def test_a_wrong_password_flood_does_not_delay_cached_scrapes(tmp_path: Path) -> None:
    """Guesses cost bcrypt (cost 10 here, ~70 ms each, one at a time): they queue on threads
    of their own, so a scrape whose password was checked before answers at once."""
    digest = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    (tmp_path / "web.yml").write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": digest}}))
    exporter, shim = exporter_with_web_config(tmp_path, "web.yml")
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    # The attackers are another process, as they would be: 24 threads in this one would
    # contend for the exporter's interpreter lock, which no real attacker can.
    with httpx.Client(timeout=30, auth=("prometheus", PASSWORD)) as client:
        assert client.get(url).status_code == 200  # checked once, cached from here on
    flood = subprocess.Popen([sys.executable, "-c", GUESSER, url, "24"], stdout=subprocess.PIPE)
    try:
        with httpx.Client(timeout=30, auth=("prometheus", PASSWORD)) as client:
            assert flood.stdout is not None and flood.stdout.readline() == b"flooding\n"
            time.sleep(0.5)  # every worker would be waiting for bcrypt by now
            took = []
            for _ in range(20):
                start = time.monotonic()
                assert client.get(url).status_code == 200
                took.append(time.monotonic() - start)
                time.sleep(0.05)
    finally:
        flood.kill()
        flood.wait(10)
        exporter.stop()
        shim.close()
    assert max(took) < 0.3, took  # behind queued guesses: 0.6 s and more


GUESSER = """
import sys, threading, httpx
def guess():
    with httpx.Client(timeout=30) as client:
        while True:
            try:
                client.get(sys.argv[1], auth=("prometheus", "guess"))
            except httpx.HTTPError:
                pass
assert httpx.get(sys.argv[1], auth=("prometheus", "guess"), timeout=30).status_code == 401
threads = [threading.Thread(target=guess, daemon=True) for _ in range(int(sys.argv[2]))]
for t in threads:
    t.start()
print("flooding", flush=True)
threading.Event().wait()
"""

"""The HTTP front of both servers (kvstats/http.py) against hostile clients, by class.

Both servers run as the real processes users start (``exporter.cli`` with a config file and
``--web.enable-lifecycle``; ``engine_shim.cli reference``):
- framing: a table of attacks on every endpoint of both, each answered once with a refusal
  (or its own answer) and the connection closed; no request hidden in a body is ever answered;
- starvation: 1,100 slowloris connections while a normal client scrapes, on both;
- memory: a flood of long header lines from many stalled clients, RSS measured;
- time: heads, bodies and idle connections that take too long are closed (a server of its own
  with short limits).
"""

from __future__ import annotations

import resource
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from devtools.hostile_http import (
    Served,
    SlowClients,
    both_servers,
    exchange,
    p99,
    request,
    responses,
    rss_bytes,
    scrape_latencies,
)
from kvstats.http import HTTPServer, Limits, Request, Response
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]


def raise_descriptor_limit(wanted: int = 8192) -> None:
    """1,100 slow clients here, as many connections in the servers (which inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


raise_descriptor_limit()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Served]]:
    # The servers get a container's usual descriptor limit (1,024, soft and hard): 1,100 slow
    # clients are more than it allows, so the front must choose whom to keep.
    with both_servers(ROOT, tmp_path_factory.mktemp("front"), descriptors=1024) as served:
        yield served


# ------------------------------------------------------------------------------- framing


HIDDEN = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED_HIDDEN = f"{len(HIDDEN):x}\r\n".encode() + HIDDEN + b"\r\n0\r\n\r\n"
# name: (bytes for a path, the statuses it may get)
ATTACKS: dict[str, tuple[Callable[[str], bytes], set[int]]] = {
    "two equal Content-Length": (
        lambda p: request("GET", p, "Content-Length: 0", "Content-Length: 0"),
        {400},
    ),
    "conflicting Content-Length": (
        lambda p: request("POST", p, "Content-Length: 3", "Content-Length: 40", body=b"abc"),
        {400},
    ),
    "Transfer-Encoding with Content-Length": (
        lambda p: request(
            "POST",
            p,
            "Content-Length: 4",
            "Transfer-Encoding: chunked",
            body=CHUNKED_HIDDEN,
        ),
        {400},
    ),
    "Transfer-Encoding not chunked": (
        lambda p: request("POST", p, "Transfer-Encoding: gzip, chunked", body=CHUNKED_HIDDEN),
        {400, 501},
    ),
    "Content-Length not a number": (
        lambda p: request("POST", p, "Content-Length: +5", body=b"hello"),
        {400},
    ),
    "a 20 KiB header line": (lambda p: request("GET", p, "X-Long: " + "a" * 20_000), {431}),
    "150 header lines": (
        lambda p: request("GET", p, *(f"X-{i}: {i}" for i in range(150))),
        {431},
    ),
    "a bad request line": (lambda p: f"GET {p} x HTTP/1.1\r\nHost: x\r\n\r\n".encode(), {400}),
    "a GET with a body": (
        lambda p: request("GET", p, f"Content-Length: {len(HIDDEN)}", body=HIDDEN),
        {400},
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_framing_attacks_are_refused_once_and_closed_on_every_endpoint(
    servers: list[Served], attack: str
) -> None:
    build, allowed = ATTACKS[attack]
    for served in servers:
        for path in served.paths:
            statuses, closed = exchange(served.port, build(path))
            where = f"{served.name} {path}"
            assert len(statuses) == 1 and statuses[0] in allowed, (where, statuses)
            assert closed, f"{where}: the connection stayed open after a refusal"


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_request_hidden_in_a_body_is_never_answered(servers: list[Served], framing: str) -> None:
    """Every method on every endpoint, the body being another request: one answer only."""
    for served in servers:
        for path in served.paths:
            for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                if framing == "length":
                    data = request(method, path, f"Content-Length: {len(HIDDEN)}", body=HIDDEN)
                else:
                    data = request(method, path, "Transfer-Encoding: chunked", body=CHUNKED_HIDDEN)
                statuses, _ = exchange(served.port, data, quiet=0.3)
                assert len(statuses) == 1, (served.name, method, path, statuses)
                assert statuses[0] != 200 or (method, path) == ("POST", "/-/reload"), statuses


def test_pipelined_requests_are_answered_in_order(servers: list[Served]) -> None:
    for served in servers:
        data = request("GET", "/healthz") * 3 + request("GET", "/nowhere", "Connection: close")
        statuses, closed = exchange(served.port, data)
        assert statuses == [200, 200, 200, 404] and closed, served.name


# ---------------------------------------------------------------------------- starvation


def test_slowloris_does_not_starve_a_normal_client(servers: list[Served]) -> None:
    for served in servers:
        with SlowClients(served.port, 1100) as slow:
            wait_for(lambda: slow.opened >= 1100, 30, "slow clients connected")
            time.sleep(1.0)
            latencies = scrape_latencies(served.port, served.scrape, 6.0)
        answered = sum(1 for t in latencies if t != float("inf"))
        assert answered == len(latencies) >= 50, (served.name, answered, len(latencies))
        assert p99(latencies) < 1.0, (served.name, p99(latencies))


def test_a_flood_of_long_header_lines_keeps_memory_bounded(servers: list[Served]) -> None:
    """500 stalled clients each sending 8 KiB header lines (a thread per connection kept every
    line: hundreds of MiB); heads are capped at 16 KiB, so the server holds a few MiB."""
    line = b"X-Flood: " + b"f" * 8192 + b"\r\n"
    for served in servers:
        before = rss_bytes(served.pid)
        with SlowClients(served.port, 500, line) as slow:
            wait_for(lambda: slow.opened >= 500, 30, "flooding clients connected")
            time.sleep(4.0)
            during = rss_bytes(served.pid)
            latencies = scrape_latencies(served.port, served.scrape, 2.0)
        assert during - before < 64 << 20, (served.name, before >> 20, during >> 20)
        assert all(t < 1.0 for t in latencies), (served.name, latencies)


# ---------------------------------------------------------------------------- time limits


def echo(request: Request) -> Response:
    return Response(200, request.path.encode())


@pytest.fixture
def strict_server() -> Iterator[HTTPServer]:
    server = HTTPServer(
        echo,
        limits=Limits(head_timeout=0.5, body_timeout=0.5, idle_timeout=1.0, max_connections=8),
        body_limit=lambda method, path: 1024 if method == "POST" else 0,
    )
    server.start()
    yield server
    server.stop()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    ready, _, _ = select.select([sock], [], [], seconds)
    if not ready:
        return False
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    return True


def test_slow_heads_slow_bodies_and_idle_connections_are_closed(strict_server: HTTPServer) -> None:
    port = strict_server.port
    with socket.create_connection(("127.0.0.1", port)) as slow_head:
        slow_head.sendall(b"GET / HTTP/1.1\r\n")
        assert closed_within(slow_head, 3.0)
    with socket.create_connection(("127.0.0.1", port)) as slow_body:
        slow_body.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        slow_body.settimeout(3.0)
        assert slow_body.recv(4096).startswith(b"HTTP/1.1 408")
    with socket.create_connection(("127.0.0.1", port)) as idle:
        idle.sendall(request("GET", "/a"))
        answer = b""
        while not answer.endswith(b"/a"):
            answer += idle.recv(4096)
        assert responses(answer) == [200]
        assert not closed_within(idle, 0.5)  # kept alive ...
        assert closed_within(idle, 3.0)  # ... until idle too long


def test_at_capacity_a_new_client_replaces_the_longest_waiting_one(
    strict_server: HTTPServer,
) -> None:
    port = strict_server.port
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        for sock in stalled:
            sock.sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/fresh", timeout=2).text == "/fresh"
        assert closed_within(stalled[0], 1.0)  # the first to wait made room
        assert strict_server.refused.get("evicted", 0) >= 1
    finally:
        for sock in stalled:
            sock.close()


def test_a_failing_handler_is_a_500_and_the_server_goes_on() -> None:
    def broken(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("boom")
        return Response(200, b"fine")

    server = HTTPServer(broken)
    server.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{server.port}/boom").status_code == 500
        assert httpx.get(f"http://127.0.0.1:{server.port}/ok").text == "fine"
    finally:
        server.stop()

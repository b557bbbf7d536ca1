"""The exporter's lean HTTP/1.1 client against httpx, on the same raw servers.

Every answer shape a target can give (length-delimited, chunked, close-delimited, an error
status, too large, truncated, not HTTP at all, an idle keep-alive connection the server closed)
is fetched by both; the bodies must be equal, or both must fail, with the reason the exporter
counts.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from exporter.errors import PollError
from exporter.fetch import Connection

BODY = b'{"schema": "kvcache.stats/v2", "padding": "' + b"x" * 5000 + b'"}'
MAX = 64 << 10


def answer(status: bytes, headers: list[bytes], body: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def chunked(body: bytes, size: int = 777) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


RESPONSES: dict[str, tuple[bytes, bool]] = {  # name: (raw answer, close after it)
    "length": (answer(b"200 OK", [b"Content-Length: %d" % len(BODY)], BODY), False),
    "chunked": (answer(b"200 OK", [b"Transfer-Encoding: chunked"], chunked(BODY)), False),
    "close_delimited": (answer(b"200 OK", [b"Connection: close"], BODY), True),
    "not_found": (answer(b"404 Not Found", [b"Content-Length: 2"], b"no"), False),
    "too_large": (answer(b"200 OK", [b"Content-Length: %d" % (MAX + 1)], b""), True),
    "too_large_chunked": (
        answer(b"200 OK", [b"Transfer-Encoding: chunked"], chunked(b"y" * (MAX + 10))),
        False,
    ),
    "truncated": (answer(b"200 OK", [b"Content-Length: %d" % len(BODY)], BODY[:100]), True),
    "not_http": (b"SSH-2.0-OpenSSH_9.6\r\n", True),
    "closed_after_each": (answer(b"200 OK", [b"Content-Length: %d" % len(BODY)], BODY), True),
}
REASONS = {  # what the exporter counts for each failure
    "not_found": "http_status",
    "too_large": "too_large",
    "too_large_chunked": "too_large",
    "truncated": "connect",
    "not_http": "connect",
}


class RawServer:
    """Reads a request's head, writes ``raw``; closes the connection after it if told to."""

    def __init__(self, raw: bytes, close: bool) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.raw, self.close_after = raw, close
        self.heads: list[bytes] = []
        self.paths: list[bytes] = []
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/kv/stats?x=1"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.heads.append(head)
                self.paths.append(head.split(b" ")[1])
                conn.sendall(self.raw)
                if self.close_after:
                    conn.shutdown(socket.SHUT_WR)
                    return

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[str], RawServer]]:
    made: list[RawServer] = []

    def start(name: str) -> RawServer:
        server = RawServer(*RESPONSES[name])
        made.append(server)
        return server

    yield start
    for server in made:
        server.stop()


def ours(url: str, times: int = 1) -> list[bytes | str]:
    async def run() -> list[bytes | str]:
        conn = Connection(url, ssl.create_default_context())
        out: list[bytes | str] = []
        for _ in range(times):
            try:
                out.append(await conn.get({"User-Agent": "t"}, MAX, 2.0))
            except PollError as exc:
                out.append(exc.reason)
        conn.close()
        return out

    return asyncio.run(run())


def theirs(url: str, times: int = 1) -> list[bytes | str]:
    """httpx's reading of the same answer, on a fresh connection each time (httpx itself can
    lose the race with a server that closes a kept-alive connection; ours retries that)."""
    out: list[bytes | str] = []
    for _ in range(times):
        with httpx.Client(timeout=2.0) as client:
            try:
                response = client.get(url)
            except httpx.TransportError:
                out.append("connect")
                continue
            if response.status_code != 200:
                out.append("http_status")
            elif len(response.content) > MAX:
                out.append("too_large")
            else:
                out.append(response.content)
    return out


@pytest.mark.parametrize("name", sorted(RESPONSES))
def test_same_answer_as_httpx(name: str, serve: Callable[[str], RawServer]) -> None:
    server = serve(name)
    mine, reference = ours(server.url, times=3), theirs(server.url, times=3)
    if name in REASONS:
        assert mine == [REASONS[name]] * 3
        if name not in ("too_large", "too_large_chunked"):  # httpx has no cap: it reads all
            assert reference == [REASONS[name]] * 3
    else:
        assert mine == reference == [BODY] * 3
    assert all(path == b"/v1/kv/stats?x=1" for path in server.paths)


def test_a_kept_alive_connection_is_reused(serve: Callable[[str], RawServer]) -> None:
    server = serve("length")
    assert ours(server.url, times=5) == [BODY] * 5
    assert server.connections == 1


def test_a_connection_the_server_closed_is_reopened_once(
    serve: Callable[[str], RawServer],
) -> None:
    server = serve("closed_after_each")
    for _ in range(20):  # the race between the server's close and our next request
        assert ours(server.url, times=3) == [BODY] * 3
    assert server.connections == 60


class StallingServer:
    """Answers the first request; then, on the kept-alive connection, waits ``stall`` seconds
    and closes it without an answer; every later connection gets no answer at all."""

    def __init__(self, stall: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.stall = stall
        self.connections = 0
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/kv/stats"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections == 1:
                threading.Thread(target=self._first, args=(conn,), daemon=True).start()
            else:
                self.held.append(conn)  # read nothing, answer nothing

    def _first(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(RESPONSES["length"][0])
            conn.recv(65536)
            time.sleep(self.stall)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_the_retry_on_a_closed_connection_keeps_the_polls_deadline() -> None:
    """One deadline for the whole answer, retry included: a kept-alive connection that spends
    most of it before closing leaves the retry only the rest (a fresh deadline for the retry
    would make one poll last the stall plus a whole timeout)."""
    server = StallingServer(stall=1.0)
    timeout = 1.5

    async def run() -> tuple[bytes, str, float]:
        conn = Connection(server.url, None)
        first = await conn.get({}, MAX, timeout)
        start = time.monotonic()
        try:
            await asyncio.wait_for(conn.get({}, MAX, timeout), 10)
            outcome = "answered"
        except PollError as exc:
            outcome = exc.reason
        except TimeoutError:
            outcome = "no deadline"
        conn.close()
        return first, outcome, time.monotonic() - start

    try:
        first, outcome, elapsed = asyncio.run(run())
    finally:
        server.stop()
    assert first == BODY
    assert server.connections == 2  # the retry happened, on a fresh connection
    assert outcome == "timeout"
    assert timeout <= elapsed < timeout + 0.7, elapsed  # a fresh deadline: 1.0 + 1.5


@pytest.mark.parametrize(
    ("url", "secure", "port", "path", "host_header"),
    [
        ("http://engine/v1/kv/stats", False, 80, "/v1/kv/stats", "engine"),
        ("http://engine", False, 80, "/", "engine"),
        ("http://engine:80/?a=1&b=2", False, 80, "/?a=1&b=2", "engine"),
        ("http://engine:8321/x", False, 8321, "/x", "engine:8321"),
        ("https://engine/metrics", True, 443, "/metrics", "engine"),
        ("https://engine:443/metrics", True, 443, "/metrics", "engine"),
        ("https://engine:8443/metrics", True, 8443, "/metrics", "engine:8443"),
        ("https://engine:80/metrics", True, 80, "/metrics", "engine:80"),
        ("http://[::1]/metrics", False, 80, "/metrics", "[::1]"),
        ("http://[::1]:9400/metrics", False, 9400, "/metrics", "[::1]:9400"),
        ("https://[fd00::2]:443/metrics", True, 443, "/metrics", "[fd00::2]"),
    ],
)
def test_the_request_names_the_target_as_http_requires(
    url: str, secure: bool, port: int, path: str, host_header: str
) -> None:
    """RFC 9112: Host is the authority, the port left out when it is the scheme's default, an
    IPv6 literal in brackets; the request target is the path and query ("/" when empty)."""
    tls = ssl.create_default_context()
    conn = Connection(url, tls)
    assert (conn.secure, conn.port, conn.path, conn.host_header) == (
        secure,
        port,
        path,
        host_header,
    )
    bracketed = host_header.startswith("[")
    assert conn.host == (host_header[1:].split("]")[0] if bracketed else host_header.split(":")[0])
    assert conn.tls is (tls if secure else None)


class RecordingServer(RawServer):
    """A RawServer at a URL without a query."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/kv/stats"


def fetch(url: str, times: int = 1, max_bytes: int = MAX) -> list[bytes | PollError]:
    async def run() -> list[bytes | PollError]:
        conn = Connection(url, None)
        out: list[bytes | PollError] = []
        for _ in range(times):
            try:
                out.append(await conn.get({"Accept": "application/json"}, max_bytes, 2.0))
            except PollError as exc:
                out.append(exc)
        conn.close()
        return out

    return asyncio.run(run())


def test_the_request_head_is_one_get_with_host_and_the_callers_headers() -> None:
    server = RecordingServer(RESPONSES["length"][0], False)
    port = server.sock.getsockname()[1]
    try:
        assert fetch(server.url, times=2) == [BODY, BODY]
    finally:
        server.stop()
    expected = f"GET /v1/kv/stats HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json"
    assert server.heads == [expected.encode()] * 2
    assert server.connections == 1


@pytest.mark.parametrize(
    ("raw", "connections"),
    [
        # HTTP/1.0 closes after each answer unless it says otherwise: never reuse it.
        (b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY, 3),
        (answer(b"200 OK", [b"Content-Length: %d" % len(BODY), b"Connection: close"], BODY), 3),
        (answer(b"200 OK", [b"Content-Length: %d" % len(BODY), b"Connection: CLOSE"], BODY), 3),
        (
            answer(b"200 OK", [b"Content-Length: %d" % len(BODY), b"Connection: keep-alive"], BODY),
            1,
        ),
        # Trailers after the last chunk are read, so the connection stays usable.
        (
            answer(
                b"200 OK", [b"Transfer-Encoding: chunked"], chunked(BODY)[:-2] + b"X-T: 1\r\n\r\n"
            ),
            1,
        ),
    ],
)
def test_a_connection_is_kept_only_when_http_keeps_it(raw: bytes, connections: int) -> None:
    server = RecordingServer(raw, False)
    try:
        assert fetch(server.url, times=3) == [BODY] * 3
    finally:
        server.stop()
    assert server.connections == connections


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_the_size_cap_admits_exactly_max_bytes(framing: str) -> None:
    """A body of exactly the cap is read; one byte more is refused, however it is framed."""
    for size, expected in ((MAX, "ok"), (MAX + 1, "too_large")):
        body = b"z" * size
        if framing == "length":
            raw, close = answer(b"200 OK", [b"Content-Length: %d" % size], body), False
        elif framing == "chunked":
            raw, close = (
                answer(b"200 OK", [b"Transfer-Encoding: chunked"], chunked(body, 4096)),
                False,
            )
        else:
            raw, close = answer(b"200 OK", [b"Connection: close"], body), True
        server = RecordingServer(raw, close)
        try:
            (got,) = fetch(server.url)
        finally:
            server.stop()
        if expected == "ok":
            assert got == body, framing
        else:
            assert isinstance(got, PollError) and got.reason == "too_large", (framing, got)
            assert str(MAX) in got.message


@pytest.mark.parametrize(
    ("raw", "reason", "says"),
    [
        (
            answer(b"404 Not Found", [b"Content-Length: 0"], b""),
            "http_status",
            "HTTP 404 from 127.0.0.1:",
        ),
        (answer(b"503 Busy", [b"Content-Length: 0"], b""), "http_status", "HTTP 503 from"),
        (answer(b"200 OK", [b"Content-Length: 12x"], b""), "connect", "bad Content-Length '12x'"),
        (answer(b"200 OK", [b"Content-Length: -1"], b""), "connect", "bad Content-Length"),
        (
            answer(b"200 OK", [b"Content-Length: " + b"9" * 19], b""),
            "connect",
            "bad Content-Length",
        ),
        (
            answer(b"200 OK", [b"Content-Length: 100000"], b""),
            "too_large",
            "Content-Length 100000 exceeds 65536 bytes",
        ),
        (
            answer(b"200 OK", [b"Transfer-Encoding: chunked"], b"zz\r\n"),
            "connect",
            "not an HTTP/1.1 answer",
        ),
        (answer(b"200 OK", [b"Transfer-Encoding: chunked"], b"\r\n"), "connect", "bad chunk size"),
        (
            answer(b"200 OK", [b"Transfer-Encoding: chunked"], b"1" * 17 + b"\r\n"),
            "connect",
            "bad chunk size",
        ),
        (answer(b"200 OK", [b"Bad header"], b""), "connect", "bad header line"),
        (
            answer(b"200 OK", [b"X-%d: 1" % i for i in range(101)], b""),
            "connect",
            "more than 100 headers",
        ),
        (b"HTTP/2 200\r\n\r\n", "connect", "bad status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "connect", "bad status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "connect", "bad status line"),
        (b"HTTP/1.1 OK 200\r\n\r\n", "connect", "bad status line"),
    ],
)
def test_each_bad_answer_is_counted_with_what_was_wrong(raw: bytes, reason: str, says: str) -> None:
    server = RecordingServer(raw, True)
    try:
        (got,) = fetch(server.url)
    finally:
        server.stop()
    assert isinstance(got, PollError), got
    assert (got.reason, says in got.message) == (reason, True), got.message


def test_a_hundred_headers_are_read() -> None:
    headers = [b"X-%d: 1" % i for i in range(99)] + [b"Content-Length: %d" % len(BODY)]
    server = RecordingServer(answer(b"200 OK", headers, BODY), False)
    try:
        assert fetch(server.url) == [BODY]
    finally:
        server.stop()


def test_a_refused_connection_is_counted_as_connect_with_the_error() -> None:
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    (got,) = fetch(f"http://127.0.0.1:{port}/v1/kv/stats")
    assert isinstance(got, PollError) and got.reason == "connect"
    assert got.message.startswith("ConnectionRefusedError: ")


def test_a_server_that_closes_at_once_is_named() -> None:
    server = RecordingServer(b"", True)  # reads the request, answers nothing, closes
    try:
        (got,) = fetch(server.url)
    finally:
        server.stop()
    assert isinstance(got, PollError) and got.reason == "connect"
    assert got.message == "the connection closed before an answer"


def test_a_silent_server_times_out_with_the_deadline_in_the_message() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:

        async def run() -> PollError:
            conn = Connection(f"http://127.0.0.1:{silent.getsockname()[1]}/x", None)
            try:
                await conn.get({}, MAX, 0.3)
            except PollError as exc:
                return exc
            finally:
                conn.close()
            raise AssertionError("answered")

        error = asyncio.run(run())
    finally:
        silent.close()
    assert (error.reason, error.message) == ("timeout", "no complete answer within 0.3 s")


def test_every_callers_header_is_sent() -> None:
    server = RecordingServer(RESPONSES["length"][0], False)
    try:

        async def run() -> bytes:
            conn = Connection(server.url, None)
            try:
                return await conn.get({"Accept": "a/b", "Authorization": "Bearer t"}, MAX, 2.0)
            finally:
                conn.close()

        assert asyncio.run(run()) == BODY
    finally:
        server.stop()
    assert server.heads[0].split(b"\r\n")[2:] == [b"Accept: a/b", b"Authorization: Bearer t"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # 18 digits is the longest Content-Length taken (leading zeros are digits too).
        (answer(b"200 OK", [b"Content-Length: 000000000000000004"], b"four"), b"four"),
        # 16 hex digits is the longest chunk size taken; extensions after ";" are ignored.
        (
            answer(
                b"200 OK", [b"Transfer-Encoding: chunked"], b"0000000000000004\r\nfour\r\n0\r\n\r\n"
            ),
            b"four",
        ),
        (
            answer(
                b"200 OK", [b"Transfer-Encoding: chunked"], b"4;name=v;x=y\r\nfour\r\n0\r\n\r\n"
            ),
            b"four",
        ),
        # Bare LF line ends (RFC 9112 lets a recipient accept them), trailers included.
        (b"HTTP/1.1 200 OK\nContent-Length: 4\n\nfour", b"four"),
        (b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n4\nfour\r\n0\nX-T: 1\n\n", b"four"),
        # A close-delimited body larger than one read.
        (answer(b"200 OK", [], b"y" * 200_000), b"y" * 200_000),
    ],
)
def test_framing_at_its_limits_is_read(raw: bytes, expected: bytes) -> None:
    server = RecordingServer(raw, True)
    try:
        assert fetch(server.url, max_bytes=1 << 20) == [expected]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    where = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", "k.pem", "-out", "c.pem"],
        cwd=where, check=True, capture_output=True,
    )  # fmt: skip
    return str(where / "c.pem"), str(where / "k.pem")


class TlsServer(RecordingServer):
    def __init__(self, raw: bytes, cert: str, key: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        super().__init__(raw, False)

    def _talk(self, conn: socket.socket) -> None:
        try:
            wrapped = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()
            return
        super()._talk(wrapped)


@pytest.mark.parametrize(("host", "outcome"), [("localhost", "ok"), ("127.0.0.1", "refused")])
def test_https_targets_are_read_over_verified_tls(
    tls_files: tuple[str, str], host: str, outcome: str
) -> None:
    cert, key = tls_files
    server = TlsServer(RESPONSES["length"][0], cert, key)
    trusting = ssl.create_default_context(cafile=cert)
    url = f"https://{host}:{server.sock.getsockname()[1]}/v1/kv/stats"

    async def run() -> bytes | PollError:
        conn = Connection(url, trusting)
        try:
            return await conn.get({}, MAX, 5.0)
        except PollError as exc:
            return exc
        finally:
            conn.close()

    try:
        got = asyncio.run(run())
    finally:
        server.stop()
    if outcome == "ok":
        assert got == BODY
    else:  # the certificate names localhost, not the address asked for
        assert isinstance(got, PollError) and got.reason == "connect"
        assert "SSLCertVerificationError" in got.message

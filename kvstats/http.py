"""The HTTP/1.1 front of both servers (the exporter's ``/metrics``, the shim's stats endpoint).

One asyncio loop in its own thread owns every connection; h11 parses and frames (strict
HTTP/1.1: a malformed request line or header, conflicting lengths, an unsupported
``Transfer-Encoding`` are refused); handlers run on a small thread pool, so a slow handler
(bcrypt, a render) never stops the loop from reading other clients. What a thread per
connection could not bound is bounded here:

- connections: at most ``max_connections`` (fewer where the descriptor limit is lower); a
  new one beyond that closes the connection that has waited longest without a request in
  progress (slow or idle clients make room for new ones), never one being answered;
- time: a request head must arrive within ``head_timeout`` of its first byte, a body within
  ``body_timeout``, the next request within ``idle_timeout`` (kept-alive connections);
- size: a head of at most ``max_head_bytes`` and ``max_headers`` lines; a body only where the
  route takes one, at most its limit, read whole before the handler runs;
- framing: two ``Content-Length`` headers (even equal) or ``Transfer-Encoding`` beside
  ``Content-Length`` are refused with 400 and the connection closed, so no byte of a body is
  ever read as the next request.

Every refusal is an answer with ``Connection: close``, never a hang or a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_connections: int = 1024
    head_timeout: float = 10.0
    body_timeout: float = 10.0
    idle_timeout: float = 120.0  # longer than any scrape interval: keep-alive survives
    max_head_bytes: int = 16 << 10
    max_headers: int = 100
    workers: int = 16
    # Requests the route calls expensive (bcrypt for an uncached password) queue here: a flood
    # of them waits on the loop, never holds the workers that answer everyone else.
    expensive_workers: int = 2


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    client: str
    body_unread: bool = False  # a body this path does not take: the connection then closes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False


# Descriptors never given to clients: the exporter's targets and event sockets, files, logs.
RESERVED_DESCRIPTORS = 128


def connection_cap(wanted: int) -> int:
    """At most ``wanted`` client connections, and never so many that the process runs out of
    descriptors (a container's default soft limit is often 1,024)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return min(wanted, max(16, soft - RESERVED_DESCRIPTORS))


def raise_descriptor_limit() -> None:
    """The soft descriptor limit up to the hard one, as Go programs (Prometheus, its
    exporters) do at start: the soft default of 1,024 is a historical accident."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
        except (ValueError, OSError):
            log.debug("could not raise the descriptor limit", exc_info=True)


Handler = Callable[[Request], Response]
# The body a route takes, in bytes: 0 for none (a body sent there is refused).
BodyLimit = Callable[[str, str], int]
# Where a request is answered: "inline" on the loop (quick, never blocking: a cached render,
# a snapshot already made), "pool" on the workers, "expensive" on their own few threads (see
# ``Limits.expensive_workers``). Inline saves two thread hand-offs per request: in a burst of
# hundreds of clients those hand-offs, not the answers, were most of the loop's time.
Placement = Callable[[Request], str]
PLAIN_HTTP_ON_TLS = b"Client sent an HTTP request to an HTTPS server.\n"


def no_bodies(method: str, path: str) -> int:
    return 0


def on_the_pool(request: Request) -> str:
    return "pool"


class HTTPServer:
    """Serves ``handler`` on ``host:port`` (0: a free port, see ``.port``) until ``stop``."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "http",
        server_header: str = "kvcache",
        tls: ssl.SSLContext | None = None,
        limits: Limits = Limits(),
        body_limit: BodyLimit = no_bodies,
        placement: Placement = on_the_pool,
    ) -> None:
        self.handler, self.tls, self.limits, self.body_limit = handler, tls, limits, body_limit
        self.placement = placement
        self.name, self.server_header = name, server_header.encode()
        self.max_connections = connection_cap(limits.max_connections)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
            self._listener.listen(1024)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._pool = ThreadPoolExecutor(limits.workers, thread_name_prefix=f"{name}-worker")
        self._slow_pool = ThreadPoolExecutor(
            limits.expensive_workers, thread_name_prefix=f"{name}-expensive"
        )
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._accepting: asyncio.Task[None] | None = None
        # Open connections: when each last started waiting for a request (None: answering).
        self._waiting: dict[_Connection, float | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused: dict[str, int] = {}  # why connections were closed early, for tests/logs

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def host(self) -> str:
        return str(self._listener.getsockname()[0])

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._accepting = self._loop.create_task(self._accept())
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._thread is None:
            self._listener.close()
            return

        async def shut() -> None:
            if self._accepting is not None:
                self._accepting.cancel()
            for conn in list(self._waiting):
                conn.abort()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._listener.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._slow_pool.shutdown(wait=False, cancel_futures=True)
            self._thread = None

    # ----------------------------------------------------------------------- connections

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # e.g. out of descriptors: wait, never spin
                log.warning("%s: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self._waiting) >= self.max_connections and not self._make_room():
                self._count("over_capacity")
                sock.close()
                continue
            client = address[0] if isinstance(address, tuple) else str(address)
            # Counted now, not when its task first runs: accepting a backlog does not yield
            # to the loop, and the cap must hold within one burst.
            conn = _Connection(sock)
            self._waiting[conn] = time.monotonic()
            task = loop.create_task(self._open(conn, client))
            self._tasks.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(self._tasks.discard)

    def _make_room(self) -> bool:
        """Close the connection waiting longest for a request; False when all are answering."""
        waiting = [(since, c) for c, since in self._waiting.items() if since is not None]
        if not waiting:
            return False
        _, oldest = min(waiting, key=lambda w: w[0])
        self._count("evicted")
        oldest.abort()
        self._waiting.pop(oldest, None)
        return True

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    async def _open(self, conn: _Connection, client: str) -> None:
        loop = asyncio.get_running_loop()
        sock = conn.sock
        try:
            if self.tls is not None:
                async with asyncio.timeout(self.limits.head_timeout):
                    first = await _peek(loop, sock)
                if first and first[0] != 0x16:  # not a TLS handshake record: plain HTTP
                    sock.sendall(_error_bytes(400, PLAIN_HTTP_ON_TLS, self.server_header))
                    self._count("plain_http_on_tls")
                    return
            reader = asyncio.StreamReader(limit=64 << 10)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock=sock,
                ssl=self.tls,
                ssl_handshake_timeout=self.limits.head_timeout if self.tls else None,
            )
            conn.transport = transport
            if conn.closed:  # evicted while its transport was being set up
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self._serve(conn, reader, writer, client)
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError) as exc:
            self._count(type(exc).__name__)
            log.debug("%s: connection from %s ended: %r", self.name, client, exc)
        except asyncio.CancelledError:
            pass
        except Exception:  # never a dead loop: this connection only
            log.exception("%s: unexpected error on a connection from %s", self.name, client)
        finally:
            self._waiting.pop(conn, None)
            conn.abort()

    async def _serve(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: str,
    ) -> None:
        limits = self.limits
        loop = asyncio.get_running_loop()
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        while True:
            if conn.closed:
                return
            self._waiting[conn] = time.monotonic()
            refusal, request = await self._read_request(h, reader, client)
            if conn.closed:
                return
            self._waiting[conn] = None
            if refusal is not None:
                self._count(f"http_{refusal.status}")
                writer.write(_error_bytes(refusal.status, refusal.body, self.server_header))
                await writer.drain()
                return
            assert request is not None
            try:
                where = self.placement(request)
                if where == "inline":
                    response = self.handler(request)
                else:
                    pool = self._slow_pool if where == "expensive" else self._pool
                    response = await loop.run_in_executor(pool, self.handler, request)
            except Exception:
                log.exception(
                    "%s: the handler failed on %s %s", self.name, request.method, request.path
                )
                response = Response(500, b"internal error\n", close=True)
            close = response.close or request.body_unread or h.their_state is not h11.DONE
            headers: list[tuple[bytes, bytes]] = [
                (b"Server", self.server_header),
                (b"Content-Type", response.content_type.encode()),
                (b"Content-Length", str(len(response.body)).encode()),
                *((k.encode(), v.encode()) for k, v in response.headers),
            ]
            if close:
                headers.append((b"Connection", b"close"))
            reason = _reason(response.status)
            data = h.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
            assert data is not None
            writer.write(data)
            if request.method != "HEAD":
                body = h.send_with_data_passthrough(h11.Data(data=response.body))
                writer.writelines(body or ())
            writer.write(h.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            if close or h.our_state is h11.MUST_CLOSE:
                return
            h.start_next_cycle()

    async def _read_request(
        self, h: h11.Connection, reader: asyncio.StreamReader, client: str
    ) -> tuple[Response | None, Request | None]:
        """The next request, read whole, or the refusal to answer instead (then close)."""
        # What h11 kept past the previous request (pipelined), then what arrives.
        head = _Head(self.limits, h.trailing_data[0])
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                return _refusal(exc), None
            if event is h11.NEED_DATA:
                data = await head.read(reader)
                h.receive_data(data)  # b"": the client closed (h11 then says so)
                if not data and h.their_state is h11.IDLE:
                    raise ConnectionResetError("closed between requests")
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("closed between requests")
            if isinstance(event, h11.Request):
                refusal = self._check_head(event, bytes(head.raw))
                if refusal is not None:
                    return refusal, None
                body = await self._read_body(h, event, reader)
                if isinstance(body, Response):
                    return body, None
                return None, _request(event, body, client)
            return Response(400, b"unexpected data before a request\n"), None

    def _check_head(self, event: h11.Request, head: bytes) -> Response | None:
        limits = self.limits
        end = head.find(b"\r\n\r\n")
        if end < 0:
            end = head.find(b"\n\n")
        if end < 0 or end > limits.max_head_bytes:
            return Response(431, b"request head too large\n")
        raw_names = [
            line.split(b":", 1)[0].strip().lower()
            for line in head[:end].split(b"\n")[1:]
            if b":" in line
        ]
        if len(raw_names) > limits.max_headers:
            return Response(431, f"more than {limits.max_headers} header lines\n".encode())
        lengths = raw_names.count(b"content-length")
        if lengths > 1:
            return Response(400, b"more than one Content-Length\n")
        if lengths and b"transfer-encoding" in raw_names:
            return Response(400, b"Transfer-Encoding with Content-Length\n")
        return None

    async def _read_body(
        self, h: h11.Connection, event: h11.Request, reader: asyncio.StreamReader
    ) -> bytes | Response | None:
        limit = self.body_limit(
            event.method.decode("ascii", "replace"), event.target.decode("latin-1").split("?")[0]
        )
        declared, chunked = _framing(event)
        if not chunked and not declared:
            end = h.next_event()  # an empty body: its end is already known
            if not isinstance(end, h11.EndOfMessage):
                return Response(400, b"unexpected event after a request head\n")
            return b""
        if limit <= 0:
            if event.method in (b"GET", b"HEAD"):
                return Response(400, b"a GET or HEAD request must not have a body\n")
            return None  # answered without reading it, then closed
        if declared is not None and declared > limit:
            return Response(413, f"a body of at most {limit} bytes\n".encode())
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                return await _receive_body(h, reader, limit)
        except TimeoutError:
            return Response(408, b"the request body did not arrive in time\n")


class _Head:
    """A request's raw bytes up to the end of its head (what h11 does not keep), and its
    deadline: the keep-alive idle timeout until its first byte, the head timeout from then."""

    def __init__(self, limits: Limits, pipelined: bytes) -> None:
        self.limits = limits
        self.raw = bytearray(pipelined[: limits.max_head_bytes + 4])
        self.started = bool(self.raw)
        timeout = limits.head_timeout if self.started else limits.idle_timeout
        self.deadline = time.monotonic() + timeout

    async def read(self, reader: asyncio.StreamReader) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete request head in time" if self.started else "idle")
        async with asyncio.timeout(remaining):
            data = await reader.read(65536)
        if data and not self.started:
            self.started = True
            self.deadline = time.monotonic() + self.limits.head_timeout
        if len(self.raw) <= self.limits.max_head_bytes:
            self.raw += data[: self.limits.max_head_bytes + 4 - len(self.raw)]
        return data


def _refusal(exc: h11.RemoteProtocolError) -> Response:
    """The answer to a head h11 cannot parse: its status hint, 431 for a head too large."""
    status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
    if "exceeds" in str(exc) or "too long" in str(exc).lower():
        status = 431
    return Response(status, f"{exc}\n".encode())


def _request(event: h11.Request, body: bytes | None, client: str) -> Request:
    """A request read whole (``body`` None: left unread, the connection closes after)."""
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(
        event.method.decode("ascii", "replace"),
        event.target.decode("latin-1"),
        headers,
        body or b"",
        client,
        body is None,
    )


def _framing(event: h11.Request) -> tuple[int | None, bool]:
    """The body's declared length (h11 has checked it), and whether it is chunked."""
    declared = None
    chunked = False
    for name, value in event.headers:
        if name == b"content-length":
            declared = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return declared, chunked


async def _receive_body(
    h: h11.Connection, reader: asyncio.StreamReader, limit: int
) -> bytes | Response:
    """The body's bytes up to its end, refused (413) as soon as they pass ``limit``."""
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            item = h.next_event()
        except h11.RemoteProtocolError as exc:
            return Response(400, f"{exc}\n".encode())
        if item is h11.NEED_DATA:
            data = await reader.read(65536)
            h.receive_data(data)
            if not data:
                raise ConnectionResetError("closed inside a request body")
        elif isinstance(item, h11.Data):
            size += len(item.data)
            if size > limit:
                return Response(413, f"a body of at most {limit} bytes\n".encode())
            parts.append(bytes(item.data))
        elif isinstance(item, h11.EndOfMessage):
            return b"".join(parts)
        else:
            return Response(400, b"unexpected event in a request body\n")


class _Connection:
    """A connection the server can close from anywhere on its loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.transport: asyncio.BaseTransport | None = None
        self.closed = False

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
        else:
            self.sock.close()


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The connection's first byte, left unread (to tell TLS from plain HTTP)."""
    ready = loop.create_future()
    fd = sock.fileno()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    return sock.recv(1, socket.MSG_PEEK)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _error_bytes(status: int, body: bytes, server: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status} {_reason(status).decode()}\r\n".encode()
        + b"Server: "
        + server
        + b"\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )

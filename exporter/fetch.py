"""One GET per poll over a kept-alive HTTP/1.1 connection: the hot path of the exporter.

Polling 64 targets every second through httpx spent two thirds of the exporter's CPU in the
client's layers (connection pool, anyio cancel scopes, header models) for what is one request
line and one response on one connection. This client does only that: HTTP/1.1 GET, one
connection per target kept alive, ``Content-Length``, chunked and close-delimited bodies, TLS
with the shared context, a size cap enforced while reading and one deadline for the whole
answer. ``tests/exporter/test_fetch.py`` checks it against httpx on the same servers: same
bodies, same outcome for every failure.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from .errors import PollError

MAX_HEADER_LINE = 16 << 10
MAX_HEADERS = 100


class Connection:
    """A target's connection; reopened when the server closed it or an answer went wrong."""

    def __init__(self, url: str, tls: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.secure else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = 443 if self.secure else 80
        self.host_header = self.host if self.port == default else f"{self.host}:{self.port}"
        if ":" in self.host:  # an IPv6 literal
            self.host_header = f"[{self.host}]" + (f":{self.port}" if self.port != default else "")
        self.tls = tls if self.secure else None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            reader, writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self.tls,
                server_hostname=self.host if self.tls else None,
                limit=MAX_HEADER_LINE,
            )
        except (OSError, ssl.SSLError) as exc:
            raise PollError("connect", f"{type(exc).__name__}: {exc}") from None
        self._reader, self._writer = reader, writer
        return reader, writer

    async def get(self, headers: dict[str, str], max_bytes: int, timeout: float) -> bytes:
        """The body of a 200 answer, all of it within ``timeout`` seconds."""
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        ).encode()
        try:
            async with asyncio.timeout(timeout):
                reused = self._reader is not None
                if self._reader is None or self._writer is None:
                    reader, writer = await self._open()
                else:
                    reader, writer = self._reader, self._writer
                try:
                    return await self._exchange(reader, writer, request, max_bytes)
                except _ClosedBeforeAnswer:
                    if not reused:
                        raise PollError(
                            "connect", "the connection closed before an answer"
                        ) from None
                    # The server closed the kept-alive connection while idle: once more, fresh.
                    self.close()
                    reader, writer = await self._open()
                    return await self._exchange(reader, writer, request, max_bytes)
        except TimeoutError:
            self.close()
            raise PollError("timeout", f"no complete answer within {timeout} s") from None
        except PollError:
            self.close()
            raise
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, _ClosedBeforeAnswer) as exc:
            self.close()
            raise PollError("connect", f"{type(exc).__name__}: {exc}") from None
        except (ValueError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise PollError("connect", f"not an HTTP/1.1 answer: {exc}") from None

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: bytes,
        max_bytes: int,
    ) -> bytes:
        try:
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
        except (ConnectionError, OSError) as exc:
            raise _ClosedBeforeAnswer(str(exc)) from None
        if not status_line:
            raise _ClosedBeforeAnswer("no status line")
        version, _, rest = status_line.decode("latin-1").partition(" ")
        code = rest.split(" ", 1)[0]
        if not version.startswith("HTTP/1.") or not code.isdigit() or len(code) != 3:
            raise ValueError(f"bad status line {status_line[:80]!r}")
        headers = await _read_headers(reader)
        keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if code != "200":
            self.close()  # the body is not read: this connection is done
            raise PollError("http_status", f"HTTP {code} from {self.host_header}{self.path}")
        body, to_close = await _read_body(reader, headers, max_bytes)
        if to_close or not keep_alive:
            self.close()
        return body


class _ClosedBeforeAnswer(Exception):
    """The server closed the connection before any byte of an answer."""


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    """The answer's headers (names lowercased), at most ``MAX_HEADERS`` of them."""
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    raise ValueError(f"more than {MAX_HEADERS} headers")


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], max_bytes: int
) -> tuple[bytes, bool]:
    """The body as its headers frame it, and whether it ended with the connection."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, max_bytes), False
    if "content-length" in headers:
        declared = headers["content-length"]
        if not (declared.isascii() and declared.isdigit()) or len(declared) > 18:
            raise ValueError(f"bad Content-Length {declared[:40]!r}")
        if int(declared) > max_bytes:
            raise PollError("too_large", f"Content-Length {declared} exceeds {max_bytes} bytes")
        return await reader.readexactly(int(declared)), False
    # delimited by the server closing the connection
    return await _read_to_close(reader, max_bytes), True


async def _read_chunked(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        length_text = line.split(b";", 1)[0].strip()
        if not length_text or len(length_text) > 16:
            raise ValueError(f"bad chunk size {line[:40]!r}")
        length = int(length_text, 16)
        if length == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        size += length
        if size > max_bytes:
            raise PollError("too_large", f"body exceeds {max_bytes} bytes")
        chunks.append(await reader.readexactly(length))
        await reader.readexactly(2)  # CRLF after the chunk


async def _read_to_close(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await reader.read(65536):
        size += len(chunk)
        if size > max_bytes:
            raise PollError("too_large", f"body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)

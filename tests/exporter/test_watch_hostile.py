"""``kvcache-exporter watch`` against hostile or broken servers: it says what it could not read,
goes on, never hangs, and never writes a terminal control sequence it was sent."""

from __future__ import annotations

import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

import pytest

from exporter.watch import watch
from tests.helpers import CannedServer, body

GOOD = (
    b'kvcache_pool_capacity_slots{engine="a",dp_rank="0",model="m",pool="full"} 1000\n'
    b'kvcache_pool_slots{engine="a",dp_rank="0",model="m",pool="full",state="used"} 100\n'
)


def drip(h: BaseHTTPRequestHandler) -> None:
    """A body of 1,000 bytes at one byte every 0.2 s: a per-read timeout never fires."""
    h.send_response(200)
    h.send_header("Content-Type", "text/plain")
    h.send_header("Content-Length", "1000")
    h.end_headers()
    try:
        for _ in range(1000):
            h.wfile.write(b"#")
            h.wfile.flush()
            time.sleep(0.2)
    except OSError:
        pass  # the client gave up, as it should


HOSTILE: dict[str, tuple[Callable[[BaseHTTPRequestHandler], None], str]] = {
    "garbage": (body(b"\x00\xff not metrics {{{\n", content_type="text/plain"), "unreadable"),
    "server-error": (body(b"<html>oops</html>", 500, "text/html"), "cannot scrape"),
    "dripping": (drip, "no complete answer within 1 s"),
    "escapes": (
        body(
            b'kvcache_pool_capacity_slots{engine="\x1b]0;pwned\x07\x1b[2J",dp_rank="0",'
            b'model="m\\nFAKE LINE",pool="full"} 1000\n',
            content_type="text/plain",
        ),
        "\\x1b]0;pwned\\x07\\x1b[2J",
    ),
    "missing-labels": (
        body(
            b"kvcache_exporter_target_up 1\n"
            b'kvcache_prefix_hit_tokens_total{engine="a",dp_rank="0",model="m"} 5\n'
            b'kvcache_prefix_reuse_bucket_info{engine="a",dp_rank="0",model="m",mark="pool",'
            b'bound="lots"} 1\n' + GOOD,
            content_type="text/plain",
        ),
        "100/1000 slots",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_watch_survives_a_hostile_server(servers: list[CannedServer], case: str) -> None:
    respond, expected = HOSTILE[case]
    server = CannedServer(respond)
    servers.append(server)
    lines: list[str] = []
    started = time.monotonic()
    assert watch(f"{server.url}/metrics", 0.01, iterations=2, out=lines.append, deadline=1.0) == 0
    assert time.monotonic() - started < 6, "watch hung"
    assert len(lines) >= 2 and any(expected in line for line in lines), lines
    for line in lines:
        assert "\n" not in line and not any(
            (ord(c) < 32 and c != "\t") or 0x7F <= ord(c) <= 0x9F for c in line
        ), repr(line)

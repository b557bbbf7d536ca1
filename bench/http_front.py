"""Hostile clients against both HTTP servers, by class, with figures
(tests/system/test_http_front.py holds the same classes as pass/fail checks).

    .venv/bin/python bench/http_front.py              # this checkout
    .venv/bin/python bench/http_front.py --tree DIR   # the servers of another checkout

The servers run with a descriptor limit of 1,024 (soft and hard: a container's usual
default; ``--descriptors N`` to change it).

For the exporter (``/metrics``) and the shim (``/v1/kv/stats``), each run as users start them:
- framing: every attack of the test table on every endpoint: how many were refused once and
  closed (no second answer, no connection left open);
- slowloris: 1,100 connections sending a header line a second, never ending the head, while a
  normal client scrapes every 50 ms for 6 s: answered / attempted, p50, p99;
- header flood: 500 stalled connections sending 8 KiB header lines for 4 s: RSS before and
  during, and the normal client's p99 meanwhile.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.hostile_http import (  # noqa: E402
    SlowClients,
    both_servers,
    exchange,
    p99,
    rss_bytes,
    scrape_latencies,
)
from tests.system.test_http_front import ATTACKS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--descriptors", type=int, default=1024, help="the servers' limit")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    with (
        tempfile.TemporaryDirectory() as tmp,
        both_servers(args.tree, Path(tmp), args.descriptors) as servers,
    ):
        for served in servers:
            print(f"== {served.name} (port {served.port})")
            ok = total = 0
            for _, (build, allowed) in sorted(ATTACKS.items()):
                for path in served.paths:
                    statuses, closed = exchange(served.port, build(path), quiet=1.0)
                    total += 1
                    ok += len(statuses) == 1 and statuses[0] in allowed and closed
            print(f"framing: {ok}/{total} refused once and closed")

            with SlowClients(served.port, 1100) as slow:
                while slow.opened < 1100:
                    time.sleep(0.1)
                time.sleep(1.0)
                latencies = scrape_latencies(served.port, served.scrape, 6.0)
            print("slowloris x1100: " + summary(latencies))

            line = b"X-Flood: " + b"f" * 8192 + b"\r\n"
            before = rss_bytes(served.pid)
            with SlowClients(served.port, 500, line) as flood:
                while flood.opened < 500:
                    time.sleep(0.1)
                time.sleep(4.0)
                during = rss_bytes(served.pid)
                latencies = scrape_latencies(served.port, served.scrape, 2.0)
            print(
                f"header flood x500: RSS {before / 2**20:.0f} -> {during / 2**20:.0f} MiB; "
                + summary(latencies)
            )


def summary(latencies: list[float]) -> str:
    answered = [t for t in latencies if t != float("inf")]
    if not answered:
        return f"answered 0/{len(latencies)}"
    tail = p99(latencies)
    median = statistics.median(answered) * 1e3
    return f"answered {len(answered)}/{len(latencies)}, p50 {median:.1f} ms, " + (
        "p99 unanswered" if tail == float("inf") else f"p99 {tail * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()

"""Soak: the exporter polling 64 targets for 10^5 poll cycles, time compressed.

Run: ``.venv/bin/python bench/soak.py [--rounds 100000]``.

Each cycle polls all 64 targets through the real poll path (fetch, parse, validate, derive,
record) with no sleeps; the network is an in-memory client, so the cycle rate is
bounded by the exporter's own work. Targets evolve like engines do — counters grow, usage
moves, an occasional restart (new instance id, counters back to 0) and failure (HTTP 500,
garbage) — and the exposition is rendered every 15 cycles, as scrapes would. RSS and CPU per
poll are reported at checkpoints: the target is no growth beyond noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.snapshots import canned_snapshot as valid
from exporter.app import Exporter
from exporter.config import parse_config
from exporter.errors import PollError
from exporter.sources import body_parser


def rss_mb() -> float:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _template() -> str:
    """The snapshot JSON with placeholders: the fakes must cost far less than the exporter."""
    data = valid()
    data["pools"][0].update(used_slots=-101, available_slots=-102)
    data["engine"]["instance_id"] = "@instance@"
    data["sequence"] = -103
    data["counters"]["prefix_query_tokens"] = -104
    data["counters"]["prefix_hit_tokens"] = {"device": -105}
    text = json.dumps(data)
    for mark, field in (
        ("-101", "%(used)d"),
        ("-102", "%(available)d"),
        ('"@instance@"', '"e%(engine)d-i%(instance)d"'),
        ("-103", "%(sequence)d"),
        ("-104", "%(queries)d"),
        ("-105", "%(hits)d"),
    ):
        text = text.replace(mark, field)
    return text


TEMPLATE = _template()


class FakeEngine:
    """A target whose answers change every poll, like a busy engine's."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed  # each engine its own identity: one engine, one target
        self.instance = 0
        self.queries = 0
        self.sequence = 0

    async def get(self, headers: dict[str, str], max_bytes: int, timeout: float) -> bytes:
        """The poller's client interface (``exporter.sources.Client``), in memory."""
        r = self.rng.random()
        if r < 0.01:
            raise PollError("http_status", "HTTP 500")
        if r < 0.015:
            return b"{truncated"
        if r < 0.016:  # a restart: new instance, counters from zero
            self.instance += 1
            self.queries = 0
        self.sequence += 1
        self.queries += self.rng.randint(0, 500)
        used = self.rng.randrange(0, 800) // 16 * 16
        body = TEMPLATE % {
            "used": used,
            "available": 800 - used,
            "engine": self.seed,
            "instance": self.instance,
            "sequence": self.sequence,
            "queries": self.queries,
            "hits": self.queries // 2,
        }
        return body.encode()


async def soak(rounds: int, targets: int, checkpoints: int) -> None:
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "poll_interval": 1,
            "timeout": 0.5,
            "nvml": "off",
            "targets": [
                {"name": f"engine-{i:03d}", "kind": "shim", "url": f"http://engine-{i}:8321"}
                for i in range(targets)
            ],
        }
    )
    exporter = Exporter(config)  # not started: the loop below is the poller's, without sleeps
    poller = exporter.poller
    engines = [FakeEngine(i) for i in range(targets)]
    parse = body_parser("shim")
    print(
        f"soak: {targets} targets, {rounds} poll cycles ({rounds * targets:,} polls),"
        " time compressed"
    )
    print(f"{'cycles':>9} {'polls':>11} {'RSS MB':>8} {'CPU us/poll':>12} {'polls/s':>9}")
    step = max(1, rounds // checkpoints)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    last_cpu, last_wall, rss = cpu0, wall0, []
    for cycle in range(1, rounds + 1):
        await asyncio.gather(
            *(poller.poll_once(e, s, parse) for e, s in zip(engines, poller.states, strict=True))
        )
        if cycle % 15 == 0:
            exporter.exposition.render()
        if cycle % step == 0 or cycle == 1:
            cpu, wall = time.process_time(), time.perf_counter()
            polls = (step if cycle != 1 else 1) * targets
            rss.append(rss_mb())
            print(
                f"{cycle:>9,} {cycle * targets:>11,} {rss[-1]:>8.1f}"
                f" {(cpu - last_cpu) / polls * 1e6:>12.1f}"
                f" {polls / max(wall - last_wall, 1e-9):>9,.0f}",
                flush=True,
            )
            last_cpu, last_wall = cpu, wall
    errors = sum(sum(s.errors.values()) for s in poller.states)
    restarts = sum(s.restarts for s in poller.states)
    total = rounds * targets
    print(
        f"soak: {total:,} polls in {time.perf_counter() - wall0:.0f} s;"
        f" {(time.process_time() - cpu0) / total * 1e6:.1f} us CPU per poll;"
        f" {errors:,} failed polls and {restarts:,} restarts handled"
    )
    settled = rss[len(rss) // 4]  # after warm-up (allocator pools, first renders)
    print(
        f"soak: RSS {rss[0]:.1f} MB at start, {settled:.1f} MB after warm-up,"
        f" {rss[-1]:.1f} MB at the end"
        f" (growth after warm-up {rss[-1] - settled:+.1f} MB); peak"
        f" {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB"
    )


def main() -> None:
    logging.getLogger("exporter").setLevel(logging.ERROR)  # the injected failures are expected
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100_000)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--checkpoints", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(soak(args.rounds, args.targets, args.checkpoints))


if __name__ == "__main__":
    main()

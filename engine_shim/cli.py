"""``kvcache-shim``: run the reference engine with its stats endpoint."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from kvstats.http import raise_descriptor_limit
from kvstats.kinds import bridge_kinds
from kvstats.units import host_port, size_bytes

DEFAULT_SHIM_LISTEN = "127.0.0.1:8321"


def parse_size(text: str) -> int:
    try:
        return size_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_listen(text: str) -> tuple[str, int]:
    try:
        return host_port(text, "127.0.0.1")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reference_parser(sub: Any) -> None:
    p = sub.add_parser("reference", help="run the reference engine and its stats endpoint")
    p.add_argument(
        "--listen",
        type=parse_listen,
        default=DEFAULT_SHIM_LISTEN,
        help=f"address of the stats and completions endpoint (default {DEFAULT_SHIM_LISTEN})",
    )
    p.add_argument("--workload", choices=["none", "agentic", "chat", "burst"], default="none")
    p.add_argument("--model-name", default="reference-tiny")
    p.add_argument(
        "--kv-memory", type=parse_size, default="32MiB", help="KV pool budget (default 32MiB)"
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument(
        "--iteration-time", type=float, default=0.005, help="simulated seconds per iteration"
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--swa-layers", type=int, default=0, help="hybrid model: sliding-window layers")
    p.add_argument("--sliding-window", type=int, default=None)
    p.add_argument("--swa-pool-ratio", type=float, default=0.5)
    p.add_argument("--host-tier", type=parse_size, default="0", help="host DRAM tier size in bytes")
    p.add_argument("--storage-dir", type=Path, default=None)
    p.add_argument(
        "--storage-tier", type=parse_size, default="0", help="storage tier size in bytes"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dp-rank", type=int, default=0)
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding a bearer token that clients must send",
    )
    p.add_argument("--log-iterations", action="store_true", help="one log line per iteration")
    p.add_argument(
        "--kv-events",
        metavar="ENDPOINT",
        default=None,
        help="publish KV events on vLLM's wire protocol: bind a ZMQ PUB here (tcp://*:5557)",
    )
    p.add_argument(
        "--kv-events-replay",
        metavar="ENDPOINT",
        default=None,
        help="and the replay socket here (tcp://*:5558; needs --kv-events)",
    )
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcache-shim", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _reference_parser(sub)
    convert = sub.add_parser(
        "convert", help="print the snapshots a bridge makes of an engine's /metrics"
    )
    convert.add_argument("--engine", choices=bridge_kinds(), required=True)
    convert.add_argument("source", help="a file with /metrics text, - for stdin, or an http(s) URL")
    return parser


def run_convert(engine: str, source: str) -> int:
    import json

    from .bridges import BridgeError, convert

    try:
        if source.startswith(("http://", "https://")):
            import httpx

            response = httpx.get(source, timeout=10)
            response.raise_for_status()
            text = response.text
        elif source == "-":
            text = sys.stdin.read()
        else:
            text = Path(source).read_text()
        result = convert(engine, text)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"kvcache-shim convert: cannot read {source}: {exc}", file=sys.stderr)
        return 2
    except BridgeError as exc:
        print(f"kvcache-shim convert: {source}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # httpx errors
        print(f"kvcache-shim convert: cannot fetch {source}: {exc}", file=sys.stderr)
        return 2
    snapshots = [s.to_json() for s in result.snapshots]
    print(json.dumps({"snapshots": snapshots, "missing": result.missing}, indent=2))
    return 0


def run_reference(args: argparse.Namespace) -> int:
    # Imported here: only this command needs torch.
    import zmq

    from .reference import EngineConfig, ModelShape, ReferenceEngine
    from .reference.api import completions
    from .reference.workload import Workload
    from .server import ShimApp, ShimServer

    try:
        shape = ModelShape(
            name=args.model_name,
            num_layers=args.layers,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            dtype=args.dtype,
            swa_layers=args.swa_layers,
            sliding_window=args.sliding_window,
        )
        bytes_per_token = shape.bytes_per_token(shape.num_layers)
        config = EngineConfig(
            shape=shape,
            block_size=args.block_size,
            kv_memory_bytes=args.kv_memory,
            max_model_len=args.max_model_len,
            max_running=args.max_running,
            iteration_time=args.iteration_time,
            swa_pool_ratio=args.swa_pool_ratio,
            host_tier_tokens=args.host_tier // bytes_per_token,
            storage_dir=args.storage_dir,
            storage_tier_tokens=args.storage_tier // bytes_per_token,
            device=args.device,
            dp_rank=args.dp_rank,
            log_iterations=args.log_iterations,
            seed=args.seed,
            kv_events_endpoint=args.kv_events,
            kv_events_replay_endpoint=args.kv_events_replay,
        )
        engine = ReferenceEngine(config)
    except zmq.ZMQError as exc:
        print(f"kvcache-shim: cannot bind the KV event sockets: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"kvcache-shim: invalid engine settings: {exc}", file=sys.stderr)
        return 2
    token = args.token_file.read_text().strip() if args.token_file else None
    app = ShimApp(
        snapshots=lambda: [engine.snapshot()],
        healthy=engine.alive,
        completions=lambda body: completions(engine, body),
        bearer_token=token,
        kv_event_sources=engine.kv_event_sources,
    )
    host, port = args.listen
    try:
        server = ShimServer(app, host, port)
    except OSError as exc:
        print(f"kvcache-shim: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    engine.start()
    server.start()
    workload = None
    if args.workload != "none":
        workload = Workload(engine, args.workload, seed=args.seed)
        workload.start()
    full = engine.full_pool
    print(
        f"reference engine on {engine.device}: pool {full.num_blocks} blocks x {full.block_size}"
        f" = {full.capacity_slots} tokens, max concurrency {engine.max_concurrency:.2f};"
        f" stats at http://{server.host}:{server.port}/v1/kv/stats",
        flush=True,
    )
    if engine.kv_events is not None:
        print(
            f"KV events at {engine.kv_events.endpoint}"
            f" (replay {engine.kv_events.replay_endpoint or 'off'}); where: GET /kv_event_sources",
            flush=True,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if workload is not None:
        workload.stop()
    server.stop()
    engine.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "reference":
        raise_descriptor_limit()
        return run_reference(args)
    if args.command == "convert":
        return run_convert(args.engine, args.source)
    return 2


if __name__ == "__main__":
    sys.exit(main())

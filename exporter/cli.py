"""``kvcache-exporter``: run the sidecar, check a config, run the demo, or watch live."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading

from kvstats.http import raise_descriptor_limit

from .config import Config, ConfigError, load_config, parse_listen

USAGE = """\
kvcache-exporter --config FILE [--listen HOST:PORT]   run the sidecar (SIGHUP reloads FILE)
kvcache-exporter check-config FILE                     validate a config and exit
kvcache-exporter demo [--workload agentic|chat|burst]  reference engine + exporter + live view
kvcache-exporter watch [--url URL] [--what-if-window S] live one-line-per-engine view
kvcache-exporter reuse-curve (--shim URL | --prometheus URL --engine NAME [--window 1h])
                                                       hit ratio vs KV cache size"""


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text, "--listen", "--listen")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcache-exporter", usage=USAGE, description=__doc__)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument(
        "--listen", type=_listen, help="HOST:PORT for /metrics (overrides the config)"
    )
    parser.add_argument(
        "--web.config.file", dest="web_config", help="TLS / basic-auth file (overrides the config)"
    )
    parser.add_argument(
        "--web.enable-lifecycle",
        dest="lifecycle",
        action="store_true",
        help="allow POST /-/reload (as Prometheus); SIGHUP always reloads",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    demo = sub.add_parser("demo", help="run the reference engine and the exporter together")
    demo.add_argument("--listen", dest="demo_listen", type=_listen, default=("127.0.0.1", 8322))
    demo.add_argument("--workload", choices=["agentic", "chat", "burst"], default="agentic")
    demo.add_argument("--interval", type=float, default=1.0, help="poll interval in seconds")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument(
        "engine_args",
        nargs=argparse.REMAINDER,
        help="after --: extra arguments for kvcache-shim reference",
    )
    watch = sub.add_parser("watch", help="live view of an exporter's /metrics")
    watch.add_argument("--url", default="http://127.0.0.1:8322/metrics")
    watch.add_argument("--interval", type=float, default=2.0)
    watch.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    watch.add_argument(
        "--what-if-window",
        type=float,
        default=300.0,
        help="seconds the what-if curve is read over (default 300; warming up until then)",
    )
    curve = sub.add_parser("reuse-curve", help="the what-if hit-ratio curve of an engine")
    source = curve.add_mutually_exclusive_group(required=True)
    source.add_argument("--shim", help="a shim's URL (its /v1/kv/stats): since the engine started")
    source.add_argument("--prometheus", help="a Prometheus URL: the exporter's histogram")
    curve.add_argument(
        "--engine", help="engine name (the exporter's target name), with --prometheus"
    )
    curve.add_argument("--window", default="1h", help="with --prometheus: the range (default 1h)")
    return parser


def run(
    config_path: str,
    listen: tuple[str, int] | None,
    web_config: str | None = None,
    lifecycle: bool = False,
) -> int:
    from .app import Exporter
    from .nvml import NvmlUnavailable

    def load() -> Config:
        config = load_config(config_path)
        if web_config is not None:
            config = dataclasses.replace(config, web_config_file=web_config)
        return config

    try:
        config = load()
        exporter = Exporter(config, loader=load, lifecycle=lifecycle)
    except ConfigError as exc:
        print(f"kvcache-exporter: bad config: {exc}", file=sys.stderr)
        return 2
    except NvmlUnavailable as exc:
        print(f"kvcache-exporter: {exc}", file=sys.stderr)
        return 2
    host, port = listen if listen else (config.listen_host, config.listen_port)
    try:
        exporter.start(host, port)
    except OSError as exc:
        print(f"kvcache-exporter: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    # Signal handlers only raise flags; the main thread acts on them.
    wake = threading.Event()
    flags = {"stop": False, "reload": False}

    def raise_flag(name: str) -> None:
        flags[name] = True
        wake.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: raise_flag("stop"))
    signal.signal(signal.SIGHUP, lambda *_: raise_flag("reload"))
    while not flags["stop"]:
        wake.wait()
        wake.clear()
        if flags["reload"] and not flags["stop"]:
            flags["reload"] = False
            exporter.reload()
    exporter.stop()
    return 0


def reuse_curve(args: argparse.Namespace) -> int:
    from .reuse_curve import CurveError, curve_from_prometheus, curves_from_shim, format_curve

    try:
        if args.shim:
            curves = curves_from_shim(args.shim)
        elif not args.engine:
            print("kvcache-exporter reuse-curve: --prometheus needs --engine", file=sys.stderr)
            return 2
        else:
            curves = [curve_from_prometheus(args.prometheus, args.engine, args.window)]
    except CurveError as exc:
        print(f"kvcache-exporter reuse-curve: {exc}", file=sys.stderr)
        return 1
    for curve in curves:
        print("\n".join(format_curve(curve)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    raise_descriptor_limit()  # clients, targets and event sockets share the process's limit
    if args.command == "check-config":
        try:
            config = load_config(args.file)
            if config.web_config_file is not None:
                from .webconfig import load_web_config

                load_web_config(config.web_config_file)
        except ConfigError as exc:
            print(f"kvcache-exporter: bad config: {exc}", file=sys.stderr)
            return 2
        print(
            f"{args.file}: OK, {len(config.targets)} target(s): "
            + ", ".join(f"{t.name} ({t.kind} {t.url})" for t in config.targets)
        )
        return 0
    if args.command == "demo":
        from .demo import run_demo

        extra = [a for a in args.engine_args if a != "--"]
        return run_demo(args.demo_listen, args.workload, args.interval, args.duration, extra)
    if args.command == "reuse-curve":
        return reuse_curve(args)
    if args.command == "watch":
        from .watch import watch

        return watch(args.url, args.interval, args.count, what_if_window=args.what_if_window)
    if args.config is None:
        parser.print_usage(sys.stderr)
        print("kvcache-exporter: --config FILE is required to run the sidecar", file=sys.stderr)
        return 2
    return run(args.config, args.listen, args.web_config, args.lifecycle)


if __name__ == "__main__":
    sys.exit(main())

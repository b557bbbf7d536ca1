"""The rules and the fleet dashboard at fleet scale, on a real Prometheus (Debian's).

    .venv/bin/python bench/fleet.py [--engines 1000] [--hours 6] [--step 15]

1. Series: the exact series one exporter target publishes for one engine (the exporter renders a
   canned snapshot), repeated for ``--engines`` engines (two DP ranks per pod, pods spread over
   two clusters, five namespaces and five models), each with the target labels the Prometheus
   operator attaches (cluster, namespace, pod, instance, job). Values move: usage waves,
   counters growing at per-engine rates, the poll histogram filling.
2. History: ``--hours`` of it at the scrape interval (``--step``, 15 s), backfilled with
   ``promtool tsdb create-blocks-from openmetrics``; the recording rules over the same hours with
   ``promtool tsdb create-blocks-from rules`` (as after a real deployment's first hours).
3. Prometheus loads the blocks and evaluates ``alerts/kvcache-rules.yml`` every 15 s. Printed:
   each rule group's evaluation time (``prometheus_rule_group_last_duration_seconds``, the worst
   of several cycles; goal < 1 s), every fleet-dashboard query's latency over 1 h (15 s step)
   and 6 h (30 s step), the median of 3 runs after one warm-up (goal < 200 ms each), and the
   series count per engine.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.ports import wait_listening  # noqa: E402
from devtools.snapshots import canned_snapshot  # noqa: E402
from exporter.config import parse_config  # noqa: E402
from exporter.exposition import ExporterView, Exposition  # noqa: E402
from exporter.families import ENGINE_SCOPED, TARGET_FAMILIES  # noqa: E402
from exporter.state import TargetState  # noqa: E402
from kvstats.validate import parse_snapshot  # noqa: E402

GRAFANA_VARS = {
    "$__rate_interval": "1m",
    **{f"${v}": ".*" for v in ("cluster", "namespace", "instance", "model", "engine", "dp_rank")},
}


def template_series() -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every engine- and target-scoped series of one target."""
    config = parse_config({"targets": [{"name": "vllm", "kind": "shim", "url": "http://x"}]})
    state = TargetState(config.targets[0], config.eta_window)
    for poll in range(3):
        state.record_success([parse_snapshot(canned_snapshot())], 1e9 + poll, 0.004)
    text = Exposition(ExporterView([state.report()], [], {}, False, {}), False).render().decode()
    wanted = {f.exposed for f in (*ENGINE_SCOPED, *TARGET_FAMILIES)}
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            base = re.sub(r"_(bucket|count|sum|total)$", "", sample.name)
            if sample.name in wanted or base in wanted or f"{base}_total" in wanted:
                out.append((sample.name, dict(sample.labels), float(sample.value)))
    return out


def identity(engine: int) -> dict[str, str]:
    pod = f"vllm-{engine // 2:04d}"
    return {
        "cluster": f"cluster-{engine // 2 % 2}",
        "namespace": f"llm-{engine // 4 % 5}",
        "pod": pod,
        "instance": pod,
        "job": f"llm-{engine // 4 % 5}/kvcache-exporter",
    }


def engine_labels(engine: int, labels: dict[str, str]) -> dict[str, str]:
    out = dict(labels)
    if "dp_rank" in out:
        out["dp_rank"] = str(engine % 2)
    if "model" in out:
        out["model"] = f"model-{engine // 4 % 5}"
    return {**out, **identity(engine)}


def value_at(name: str, labels: dict[str, str], base: float, engine: int, t: float) -> float:
    """A plausible value for this series at time t (seconds since the start of history)."""
    phase = (engine * 0.37) % (2 * math.pi)
    usage = 0.45 + 0.35 * math.sin(2 * math.pi * t / (3600 + 97 * (engine % 13)) + phase)
    capacity = 1600
    polls = t / 15
    if name == "kvcache_pool_slots":
        used = round(capacity * usage)
        evictable = round((capacity - used) * 0.6)
        return {"used": used, "evictable": evictable}.get(
            labels.get("state", ""), capacity - used - evictable
        )
    if name == "kvcache_active_usage_ratio":
        return round(capacity * usage) / capacity
    if name in ("kvcache_physical_usage_ratio", "kvcache_evictable_ratio"):
        used = round(capacity * usage)
        evictable = round((capacity - used) * 0.6)
        return (used + evictable if "physical" in name else evictable) / capacity
    if name == "kvcache_concurrency_headroom":
        return max(0, math.floor(6 * (1 - usage)))
    if name == "kvcache_requests":
        return round(20 * usage) if labels.get("state") == "running" else round(5 * usage**4)
    if name == "kvcache_snapshot_timestamp_seconds":
        return t
    if name.endswith("_total") or name.endswith(("_bucket", "_count", "_sum")):
        rate = 1 + engine % 7
        if name.startswith("kvcache_exporter_poll_duration"):
            return round(polls) if not name.endswith("_sum") else 0.004 * polls
        if name == "kvcache_exporter_polls_total":
            return round(polls)
        return round(base * rate * t / 60)
    return base


def write_openmetrics(path: Path, engines: int, start: int, end: int, step: int) -> int:
    series = template_series()
    names: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in series:
        names.setdefault(name, []).append((labels, value))
    times = range(start, end + 1, step)
    count = 0
    with path.open("w") as out:
        write = out.write
        for name, rows in names.items():
            write(f"# TYPE {name} unknown\n")
            for engine in range(engines):
                for labels, base in rows:
                    if "dp_rank" not in labels and engine % 2:
                        continue  # a target's own series: one per pod, for both its DP ranks
                    full = engine_labels(engine, labels)
                    head = (
                        name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(full.items())) + "}"
                    )
                    count += 1
                    for ts in times:
                        write(f"{head} {value_at(name, labels, base, engine, ts - start)} {ts}\n")
        # up{} of every exporter, for KVCacheExporterAbsent.
        write("# TYPE up unknown\n")
        for engine in range(0, engines, 2):
            labels = identity(engine)
            head = "up{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
            count += 1
            for ts in times:
                write(f"{head} 1 {ts}\n")
        write("# EOF\n")
    return count


def run(cmd: list[str], **kwargs: Any) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:4])} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )


class Prometheus:
    def __init__(self, tmp: Path, rules: Path) -> None:
        self.data = tmp / "data"
        config = tmp / "prometheus.yml"
        config.write_text(f"global:\n  evaluation_interval: 15s\nrule_files:\n  - {rules}\n")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={self.data}",
                "--storage.tsdb.retention.time=30d",
                "--web.listen-address=127.0.0.1:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "prometheus.log").open("w"),
        )
        (self.port,) = wait_listening(self.proc, timeout=300)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(timeout=120)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(
                    "prometheus did not start:\n" + (tmp / "prometheus.log").read_text()[-3000:]
                )
            time.sleep(0.5)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def get(self, path: str, **params: Any) -> Any:
        r = self.client.get(f"{self.url}{path}", params=params)
        r.raise_for_status()
        return r.json()["data"]


def fleet_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "dashboards" / "kvcache-fleet.json").read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def rule_timings(prom: Prometheus) -> None:
    """Each rule group's evaluation time, the worst of six cycles."""
    time.sleep(35)  # every group evaluated at least once (30 s and 15 s intervals)
    worst: dict[str, float] = {}
    for _ in range(6):
        for group in prom.get("/api/v1/rules")["groups"]:
            worst[group["name"]] = max(
                worst.get(group["name"], 0.0), float(group["evaluationTime"])
            )
        time.sleep(15)
    print("rule group evaluation, worst of 6 cycles sampled (goal < 1 s):")
    for group, seconds in sorted(worst.items()):
        print(f"    {group:<16} {seconds * 1e3:8.1f} ms")
    rules_now = prom.get("/api/v1/rules")["groups"]
    firing = sum(
        1 for g in rules_now for r in g["rules"] if r.get("type") == "alerting" and r["alerts"]
    )
    print(f"    ({firing} alert rules with active alerts at the end of history)")


def query_timings(prom: Prometheus, now: int) -> None:
    """Every fleet dashboard query over 1 h and 6 h, median of 3 after a warm-up."""
    print("fleet dashboard queries, median of 3 after a warm-up (goal < 200 ms each):")
    slowest = 0.0
    for title, expr in [("(floor: vector(1))", "vector(1)"), *fleet_queries()]:
        cells = []
        for hours, step in ((1, 15), (6, 30)):
            params = {"query": expr, "start": now - hours * 3600, "end": now, "step": step}
            prom.get("/api/v1/query_range", **params)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                data = prom.get("/api/v1/query_range", **params)
                times.append(time.perf_counter() - t0)
            median = statistics.median(times)
            slowest = max(slowest, median)
            cells.append(f"{hours} h {median * 1e3:6.1f} ms ({len(data['result'])} series)")
        print(f"    {title[:58]:<58} " + "   ".join(cells))
    print(f"slowest: {slowest * 1e3:.1f} ms (goal < 200 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", type=int, default=1000)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--step", type=int, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    for tool in ("prometheus", "promtool"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing (Debian's prometheus package)")
    tmp = Path(tempfile.mkdtemp(prefix="kvcache-fleet-"))
    try:
        end = int(time.time()) // args.step * args.step
        start = end - int(args.hours * 3600)
        began = time.monotonic()
        om = tmp / "series.om"
        series = write_openmetrics(om, args.engines, start, end, args.step)
        samples = series * len(range(start, end + 1, args.step))
        print(
            f"{args.engines} engines, {series} series ({series / args.engines:.1f} per engine,"
            f" up{{}} included), {args.hours:g} h at {args.step} s: {samples / 1e6:.1f}M samples"
            f" ({om.stat().st_size / 1e9:.1f} GB of OpenMetrics, written in"
            f" {time.monotonic() - began:.0f} s)"
        )
        began = time.monotonic()
        run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(om), str(tmp / "data")])
        om.unlink()
        print(f"backfilled in {time.monotonic() - began:.0f} s")

        rules = ROOT / "alerts" / "kvcache-rules.yml"
        prom = Prometheus(tmp, rules)
        began = time.monotonic()
        run(
            [
                "promtool",
                "tsdb",
                "create-blocks-from",
                "rules",
                f"--start={start}",
                f"--end={end}",
                f"--url={prom.url}",
                f"--output-dir={tmp / 'rules-data'}",
                "--eval-interval=30s",
                str(rules),
            ],
            timeout=3600,
        )
        prom.stop()
        for block in (tmp / "rules-data").iterdir():
            shutil.move(str(block), tmp / "data" / block.name)
        print(
            f"recording rules backfilled over {args.hours:g} h in {time.monotonic() - began:.0f} s"
        )

        prom = Prometheus(tmp, rules)
        try:
            rule_timings(prom)
            query_timings(prom, end)
        finally:
            prom.stop()
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

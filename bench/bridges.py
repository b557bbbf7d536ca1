"""The vLLM bridge's cost per poll against a minimal poller, by data-parallel size.

    .venv/bin/python bench/bridges.py

A vLLM API server's ``/metrics`` for DP = 1, 8 and 32 engines (the fixture's families per
engine, plus the histograms a real server exports: 12 families of 40 buckets per engine) is
served from another process. Per poll, side by side in one run:

- minimal poller: httpx GET + prometheus_client's parser over the whole text (what any
  Python bridge would start from);
- ours: the exporter's connection + the vLLM bridge (only the families it reads are parsed).

Printed: CPU per poll for each, their ratio (goal <= 0.5x at DP = 8), and ours per engine
(linear in DP: about constant).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.static_server import spawn
from engine_shim.bridges import convert
from exporter.fetch import Connection

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm-0.33.0-dp1.prom"


def vllm_text(dp: int) -> str:
    """The fixture's series for ``dp`` engines (num_gpu_blocks summed, as vLLM stamps it),
    with 12 histogram families of 40 buckets per engine, as a real server has."""
    base = FIXTURE.read_text()
    families: dict[str, list[str]] = {}
    order: list[str] = []
    current = ""
    for line in base.splitlines():
        if line.startswith("# HELP "):
            current = line.split()[2]
            order.append(current)
            families[current] = [line]
        elif line.startswith("# TYPE "):
            families[current].append(line)
        elif line:
            for engine in range(dp):
                sample = line.replace('engine="0"', f'engine="{engine}"')
                sample = re.sub(
                    r'num_gpu_blocks="(\d+)"',
                    lambda m: f'num_gpu_blocks="{int(m.group(1)) * dp}"',
                    sample,
                )
                families[current].append(sample)
    out = [line for name in order for line in families[name]]
    for h in range(12):
        name = f"vllm:synthetic_latency_{h}_seconds"
        out += [f"# HELP {name} A latency histogram.", f"# TYPE {name} histogram"]
        for engine in range(dp):
            labels = f'engine="{engine}",model_name="m"'
            running = 0
            for b in range(40):
                running += b
                out.append(f'{name}_bucket{{{labels},le="{0.001 * 2 ** (b / 4):.6g}"}} {running}.0')
            out.append(f'{name}_bucket{{{labels},le="+Inf"}} {running}.0')
            out.append(f"{name}_count{{{labels}}} {running}.0")
            out.append(f"{name}_sum{{{labels}}} 12.5")
    return "\n".join(out) + "\n"


def serve(text: str) -> tuple[subprocess.Popen[bytes], str]:
    proc, port = spawn(text.encode(), "text/plain")
    return proc, f"http://127.0.0.1:{port}/metrics"


def minimal(url: str, polls: int) -> float:
    with httpx.Client() as client:
        client.get(url)
        started = time.process_time()
        for _ in range(polls):
            for family in text_string_to_metric_families(client.get(url).text):
                for _sample in family.samples:
                    pass
        return (time.process_time() - started) / polls


def ours(url: str, polls: int, dp: int) -> float:
    async def run() -> float:
        conn = Connection(url, ssl.create_default_context())
        await conn.get({}, 64 << 20, 10)
        started = time.process_time()
        for _ in range(polls):
            body = await conn.get({"Accept-Encoding": "identity"}, 64 << 20, 10)
            result = convert("vllm", body.decode("utf-8"), time.time())
            assert len(result.snapshots) == dp
        conn.close()
        return (time.process_time() - started) / polls

    return asyncio.run(run())


def main() -> None:
    print("vLLM bridge, CPU per poll (GET + translate), side by side")
    for dp in (1, 8, 32):
        text = vllm_text(dp)
        proc, url = serve(text)
        try:
            polls = max(20, 400 // dp)
            floor, mine = minimal(url, polls), ours(url, polls, dp)
        finally:
            proc.terminate()
        lines = text.count("\n")
        print(
            f"  DP={dp:>2} ({lines:>6} lines): minimal poller {floor * 1e3:7.2f} ms,"
            f" ours {mine * 1e3:6.2f} ms (ratio {mine / floor:.2f}x; goal <= 0.5x at DP=8);"
            f" ours per engine {mine / dp * 1e3:.3f} ms"
        )


if __name__ == "__main__":
    main()

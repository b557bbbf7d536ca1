"""The what-if curve on a live vLLM engine: predicted hit ratios vs measured at other pool sizes.

Run in the live vLLM environment (``scripts/test`` builds it)::

    .venv-vllm-live/bin/python bench/reuse_curve_vllm.py [--requests 600] [--concurrency 2]

The agentic and chat traces of ``bench/reuse_curve.py`` (token ids in the tiny model's
vocabulary) are replayed on vLLM's CPU build with the shim, the pool set by
``--num-gpu-blocks-override`` to 1x, 0.25x, 0.5x, 2x and 4x of 8,192 tokens. The 1x run's
``reuse_distance`` (from the shim, i.e. from inside vLLM's scheduler) predicts the device hit
ratio that the other runs measure (vLLM's own prefix hits, as the shim counts them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reuse_curve import Job, agentic_trace, chat_trace
from devtools.tiny_models import make_model
from devtools.vllm_server import SHIM_SCHEDULER, VllmServer
from kvstats.validate import parse_snapshot

SIZES = (1.0, 0.25, 0.5, 2.0, 4.0)
VOCAB = range(3, 509)  # the tiny model's ordinary token ids


def replay(server: VllmServer, jobs: list[Job], concurrency: int) -> None:
    def run(job: Job) -> None:
        for wave in job:
            with concurrent.futures.ThreadPoolExecutor(len(wave)) as pool:
                list(pool.map(lambda p: server.complete(p, 1), wave))

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run, jobs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--pool-tokens", type=int, default=8192)
    args = parser.parse_args()
    errors: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "models", "llama")
        header = ("workload", "size", "blocks", "predicted", "measured", "error")
        print("{:<8} {:>6} {:>7} {:>9} {:>9} {:>7}".format(*header))
        for name, build in (("agentic", agentic_trace), ("chat", chat_trace)):
            jobs = build(args.requests, vocab=VOCAB)
            base_hist = None
            block = 32  # vLLM's CPU attention takes multiples of 32
            for m in SIZES:
                blocks = int(args.pool_tokens * m) // block + 1  # + vLLM's null block
                server = VllmServer(
                    model,
                    Path(tmp) / f"{name}-{m}",
                    scheduler=SHIM_SCHEDULER,
                    extra_env={"KVCACHE_SHIM_REUSE_DISTANCE": "on"},
                    extra_args=(
                        "--num-gpu-blocks-override",
                        str(blocks),
                        "--block-size",
                        str(block),
                    ),
                )
                server.start()
                try:
                    server.wait_ready()
                    replay(server, jobs, args.concurrency)
                    snap = parse_snapshot(server.stats())
                finally:
                    server.stop()
                pool = snap.pools[0]
                assert pool.capacity_slots == int(args.pool_tokens * m), pool
                c = snap.counters
                measured = c.prefix_hit_tokens["device"] / (c.prefix_query_tokens or 1)
                if base_hist is None:
                    base_hist = snap.reuse_distance
                    assert base_hist is not None
                predicted = base_hist.hit_ratio_at(args.pool_tokens * m)
                assert predicted is not None
                errors.append(abs(predicted - measured))
                print(
                    f"{name:<8} {m:>5g}x {blocks:>7} {predicted:9.3f} {measured:9.3f}"
                    f" {predicted - measured:+7.3f}"
                )
            print(f"{'':<8} (1x: sampling rate {base_hist.sampling_rate:g})")  # type: ignore[union-attr]
    print(
        f"{args.concurrency} jobs in flight: mean absolute error {statistics.fmean(errors):.3f}"
        f" (goal <= 0.03), max {max(errors):.3f} (goal <= 0.06)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

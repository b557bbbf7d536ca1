"""The vLLM adapter's cost per scheduler step in machine instructions, counted by valgrind.

Run in the vLLM environment: ``.venv-vllm/bin/python bench/vllm_adapter_instructions.py``
(needs ``valgrind``; once per release, ``PYTHONPATH=.venv-vllm/matrix/0.32.0``).

The timed bench (``vllm_adapter.py``) pairs the shim with plain vLLM step by step, but a step of
5-9 ms wanders by tens of µs on a shared host, more than the cost it measures. The instructions
a step executes do not wander: the same seeded steps (``PYTHONHASHSEED`` fixed) run in one
process per lane (plain vLLM, the shim as it starts) under callgrind, which counts only inside
the measured steps (collection on for the one call that runs them: ``itertools.starmap``, which
neither vLLM's step nor the driver uses). Unlike the bench's bytecode counts, this includes the
work in C: dict lookups, allocations, the interpreter's attribute caches. The difference per
step is turned into µs at the rate plain vLLM's own steps run natively on this host (its µs
per step over its instructions per step): an estimate that leaves out cache misses and branch
mispredictions, which the timed bench has in it. The counts are exact for the process they
count, but part of CPython's work depends on where objects lie (those hashed by id), which the
shim's attach moves: ``--floor`` adds a third lane, plain vLLM with its heap shifted by a few
thousand objects, whose difference from plain is the size of that effect.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOGGLE = "starmap_next"  # callgrind collects only inside this C function


def run_lane(kind: str, size: int, batch: int, warm: int, steps: int) -> float:
    """Build one lane, run ``warm`` steps, then ``steps`` more inside one starmap call (the
    ones callgrind counts); returns their mean wall time per step."""
    from bench.vllm_adapter import Lane  # the same workload as the timed bench

    lane = Lane(size, batch, seed=0, tracked=kind == "shim", reuse=False)
    # "shifted": plain vLLM with its later objects elsewhere in memory, as the shim's attach
    # moves them. The same steps then differ only where CPython's work depends on addresses
    # (objects hashed by id in vLLM's sets and dicts): the floor of this method.
    ballast = [object() for _ in range(4096)] if kind == "shifted" else []
    gc.disable()  # as vLLM's engine core after start-up
    for _ in range(warm):
        lane.step()

    def measured(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            lane.step()
        return (time.perf_counter() - start) / n

    (per_step,) = itertools.starmap(measured, [(steps,)])
    del ballast
    return per_step


def callgrind_total(out_file: Path) -> int:
    """The instruction total callgrind wrote (``summary:`` line)."""
    for line in out_file.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out_file}")


def counted(
    size: int, batch: int, warm: int, steps: int, kinds: tuple[str, ...]
) -> dict[str, float]:
    """Instructions per measured step of each lane, all under callgrind at once."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed (apt install valgrind)")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {kind: Path(tmp) / f"{kind}.callgrind" for kind in kinds}
        children = {
            kind: subprocess.Popen(
                [
                    valgrind,
                    "--tool=callgrind",
                    "--collect-atstart=no",
                    f"--toggle-collect={TOGGLE}",
                    f"--callgrind-out-file={out}",
                    sys.executable,
                    __file__,
                    "--lane",
                    kind,
                    f"--sizes={size}",
                    f"--batches={batch}",
                    f"--warm={warm}",
                    f"--steps={steps}",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for kind, out in outs.items()
        }
        for kind, child in children.items():
            _, err = child.communicate()
            if child.returncode != 0:
                raise RuntimeError(f"{kind} lane under valgrind failed:\n{err[-2000:]}")
        return {kind: callgrind_total(out) / steps for kind, out in outs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--warm", type=int, default=40)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--floor", action="store_true", help="also plain vLLM with its heap shifted, per size"
    )
    parser.add_argument("--lane", choices=("plain", "shim", "shifted"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.lane:  # a child, under valgrind
        run_lane(args.lane, sizes[0], batches[0], args.warm, args.steps)
        return
    from vllm import __version__ as vllm_version

    print(
        f"vLLM {vllm_version}: machine instructions per scheduler step (callgrind, {args.steps}"
        f" steps after {args.warm}), plain vLLM and the shim as it starts (counts only); the"
        " difference in µs at plain vLLM's native rate on this host"
    )
    for batch in batches:
        for size in sizes:
            native = run_lane("plain", size, batch, args.warm, args.steps)
            kinds = ("plain", "shim", "shifted") if args.floor else ("plain", "shim")
            per_step = counted(size, batch, args.warm, args.steps, kinds)
            extra = per_step["shim"] - per_step["plain"]
            rate = native / per_step["plain"]  # seconds per instruction, plain vLLM's mix
            print(
                f"  {batch:>3} running, {size:>9,} blocks: plain vLLM {per_step['plain']:,.0f}"
                f" instructions/step ({native * 1e6:,.0f} us natively), shim {extra:+,.0f}"
                f" ({extra / per_step['plain']:+.2%}, about {extra * rate * 1e6:+.1f} us)"
            )
            if args.floor:
                shift = per_step["shifted"] - per_step["plain"]
                print(
                    f"  {batch:>3} running, {size:>9,} blocks: plain vLLM with its heap shifted"
                    f" {shift:+,.0f} ({shift / per_step['plain']:+.2%}, about"
                    f" {shift * rate * 1e6:+.1f} us): the floor"
                )


if __name__ == "__main__":
    main()

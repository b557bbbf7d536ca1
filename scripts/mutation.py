"""Run mutmut on each numeric module with the tests that own it; print scores and survivors.

Each module's tests run in the venv they need: the vLLM adapter's in ``.venv-vllm`` (vLLM's
real block pool, its newest supported release), where scripts/mutation installs mutmut too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    tests: tuple[str, ...]
    venv: str = ".venv"


MODULES: dict[str, Target] = {
    "exporter/derive.py": Target(("tests/exporter/test_derive.py",)),
    "exporter/state.py": Target(
        (
            "tests/exporter/test_state.py",
            "tests/exporter/test_derive.py",
            "tests/exporter/test_exposition.py",
        )
    ),
    "exporter/fetch.py": Target(("tests/exporter/test_fetch.py",)),
    "kvstats/capacity.py": Target(("tests/kvstats/test_capacity.py",)),
    "engine_shim/bridges/vllm.py": Target(("tests/engine_shim/test_bridges.py",)),
    "engine_shim/bridges/sglang.py": Target(("tests/engine_shim/test_bridges.py",)),
    "engine_shim/reference/prefix_cache.py": Target(("tests/engine_shim/test_prefix_cache.py",)),
    "engine_shim/reuse_distance.py": Target(("tests/engine_shim/test_reuse_distance.py",)),
    "engine_shim/adapters/vllm/": Target(("tests/vllm",), ".venv-vllm"),
}


MAX_SHOWN = 60  # survivors whose diff is printed per module (the rest are counted)


def copy_tree(dest: Path) -> list[str]:
    """The tracked files into ``dest``; returns their top-level names (for mutmut's also_copy)."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return sorted({name.decode().split("/")[0] for name in files if name})


def mutate(module: str, target: Target) -> dict[str, object]:
    mutmut = str(ROOT / target.venv / "bin" / "mutmut")
    if not Path(mutmut).exists():
        raise SystemExit(f"{mutmut} is missing: scripts/mutation installs it")
    with tempfile.TemporaryDirectory(prefix="kvcache-mutation-") as tmp:
        work = Path(tmp)
        top = copy_tree(work)
        with (work / "pyproject.toml").open("a") as f:
            f.write(
                "\n[tool.mutmut]\n"
                f"source_paths = [{json.dumps(module)}]\n"
                f"also_copy = {json.dumps(top)}\n"
                f"pytest_add_cli_args_test_selection = {json.dumps(list(target.tests))}\n"
            )
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        subprocess.run(
            [mutmut, "run", "--max-children", str(os.cpu_count() or 2)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        subprocess.run([mutmut, "export-cicd-stats"], cwd=work, capture_output=True, check=False)
        stats_path = work / "mutants" / "mutmut-cicd-stats.json"
        if not stats_path.exists():
            raise SystemExit(
                f"mutmut produced no results for {module} (run it in {work} to see why)"
            )
        stats: dict[str, object] = json.loads(stats_path.read_text())
        results = subprocess.run(
            [mutmut, "results"], cwd=work, capture_output=True, text=True, check=False
        ).stdout
        survivors = []
        names = [n for n in (line.strip().split(":")[0] for line in results.splitlines()) if n]
        stats["unshown"] = max(0, len(names) - MAX_SHOWN)
        for name in names[:MAX_SHOWN]:  # `mutmut show` takes a second or two each
            diff = subprocess.run(
                [mutmut, "show", name], cwd=work, capture_output=True, text=True, check=False
            ).stdout
            change = [
                ln
                for ln in diff.splitlines()
                if ln[:1] in "+-" and not ln.startswith(("+++", "---"))
            ]
            survivors.append((name, change))
        stats["survivors"] = survivors
        return stats


def main() -> int:
    chosen = sys.argv[1:] or list(MODULES)
    unknown = [m for m in chosen if m not in MODULES]
    if unknown:
        raise SystemExit(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    killed = total = 0
    for module in chosen:
        stats = mutate(module, MODULES[module])
        keys = ("killed", "timeout", "total", "no_tests", "unshown")
        counts = {key: int(str(stats.get(key, 0))) for key in keys}
        k, n = counts["killed"] + counts["timeout"], counts["total"]
        killed, total = killed + k, total + n
        print(
            f"{module}: {k}/{n} mutants killed ({100 * k / max(n, 1):.1f} %);"
            f" {counts['no_tests']} in code no selected test runs"
        )
        for name, change in stats["survivors"]:  # type: ignore[attr-defined]
            print(
                f"    survived {name.split('__mutmut_')[0].split('.')[-1]}: " + " | ".join(change)
            )
        if counts["unshown"]:
            print(f"    ... and {counts['unshown']} more survivors")
    print(f"all: {killed}/{total} killed ({100 * killed / max(total, 1):.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

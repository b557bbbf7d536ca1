"""Every torch-free module imports on its own, first, in a fresh interpreter: an import cycle
shows only for the module that starts it, which the rest of the suite (its imports in another
order) can hide. One cycle between the metric families and the target state once broke the SGLang
event-class tests only."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kvstats", "exporter", "engine_shim/bridges", "engine_shim/events", "mixin")


def modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] != "__main__":  # a command, run by ``python -m``
                found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    names = modules()
    assert "exporter.families" in names and len(names) > 40

    def imports(name: str) -> tuple[str, str]:
        done = subprocess.run(
            [sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True
        )
        return name, done.stderr.strip().splitlines()[-1] if done.returncode else ""

    with ThreadPoolExecutor(4) as pool:
        failures = {name: error for name, error in pool.map(imports, names) if error}
    assert failures == {}

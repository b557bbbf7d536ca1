from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    """Canned HTTP servers (``tests.helpers.CannedServer``) a test starts; closed after it."""
    made: list[Any] = []
    yield made
    for server in made:
        server.close()


@pytest.fixture
def small_engine_config(tmp_path: Path) -> Iterator[object]:
    from engine_shim.reference import EngineConfig, ModelShape

    yield EngineConfig(
        shape=ModelShape(num_layers=2, num_kv_heads=1, head_dim=8, vocab_size=512),
        block_size=4,
        kv_memory_bytes=64 * 4 * 2 * 1 * 8 * 2 * 2,  # 64 blocks of 4 tokens
        max_model_len=96,
        iteration_time=0.0,
    )


# tests/vllm needs vLLM, which lives in its own virtual environment (.venv-vllm) so that its
# pins never touch the main one; scripts/test runs that folder there, and fails if it fails.
collect_ignore = []
if importlib.util.find_spec("vllm") is None:
    collect_ignore += ["vllm", "vllm_live"]
IMAGE_TESTS = Path(__file__).parent / "images"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/images builds and runs the container images (root, buildah, podman, minutes):
    collected only when named, as scripts/test does after the main suite."""
    if collection_path != IMAGE_TESTS:
        return None
    named = (Path(arg.split("::")[0]).resolve() for arg in config.args)
    return None if any(path.is_relative_to(IMAGE_TESTS) for path in named) else True


# tests/engine_classes needs SGLang's classes: scripts/test runs it with them on the path.
if importlib.util.find_spec("sglang") is None:
    collect_ignore.append("engine_classes")

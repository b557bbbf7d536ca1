from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.tiny_models import make_model


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two tiny models, made once per session (about 3 s each)."""
    root = tmp_path_factory.mktemp("models")
    return {kind: make_model(root / kind, kind) for kind in ("llama", "gemma2")}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("vllm")

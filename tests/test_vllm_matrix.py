"""The support matrix in docs/engines.md is the file scripts/test runs (tests/vllm/matrix.txt)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.vllm_matrix import releases, table

ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_show_exactly_what_ci_runs() -> None:
    assert table() in (ROOT / "docs" / "engines.md").read_text(), (
        "docs/engines.md's support matrix differs: python -m devtools.vllm_matrix table"
    )


def test_the_matrix_covers_every_release_users_install() -> None:
    versions = [r.version for r in releases()]
    assert versions == sorted(versions, key=lambda v: tuple(map(int, v.split("."))))
    assert {"0.31.0", "0.32.0", "0.33.0", "0.34.0"} <= set(versions)
    assert any("live" in r.how for r in releases())


@pytest.mark.parametrize("line", ["0.35 block-pool", "0.35.0", "0.35.0 guessed", "latest live"])
def test_a_line_it_cannot_read_is_refused(line: str) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        releases(line)

"""The schema page in docs/ is generated from the dataclasses and must match them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kvstats import schema_doc

DOC = Path(__file__).parents[2] / "docs" / "snapshot-schema.md"


def test_every_field_is_described() -> None:
    fields = {f"{c.__name__}.{f.name}" for c in schema_doc.CLASSES for f in dataclasses.fields(c)}
    assert fields == set(schema_doc.DESCRIPTIONS)


def test_committed_page_is_up_to_date() -> None:
    assert DOC.read_text() == schema_doc.render(), (
        "regenerate: python -m kvstats.schema_doc > docs/snapshot-schema.md"
    )

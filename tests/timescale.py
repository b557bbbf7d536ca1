"""Alert rules on a test's time scale: minutes become seconds (no imports beyond re)."""

from __future__ import annotations

import re


def compress_minutes(text: str) -> str:
    """Alert ``for: 5m`` -> ``for: 5s`` and rule group intervals -> 1s: the test's time scale."""
    text = re.sub(r"(\n\s+for: )(\d+)m\n", r"\g<1>\2s\n", text)
    return re.sub(r"(\n\s+interval: )\d+[sm]\n", r"\g<1>1s\n", text)

"""Both dashboards against Grafana's published schema for the pinned Grafana (tsc over
``@grafana/schema``; see ``tests/grafana_schema.py`` for what that does and does not cover)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mixin.dashboards import GRAFANA_VERSION, SCHEMA_VERSION
from tests.grafana_schema import dashboard_typescript

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / "tests" / "node"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))


def node_modules() -> Path:
    modules = NODE / "node_modules"
    assert (modules / "@grafana" / "schema").is_dir(), (
        "tests/node is not installed: scripts/test runs `npm ci --prefix tests/node`"
    )
    return modules


def tsc(tmp_path: Path, sources: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "node_modules").symlink_to(node_modules())
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "tsconfig.json").write_text(
        json.dumps(
            {
                "compilerOptions": {
                    "strict": True,
                    "noEmit": True,
                    "module": "esnext",
                    "moduleResolution": "bundler",
                    "target": "es2022",
                    "skipLibCheck": True,
                },
                "files": sorted(sources),
            }
        )
    )
    return subprocess.run(
        ["node", str(node_modules() / "typescript" / "bin" / "tsc"), "-p", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_schema_package_is_the_pinned_grafanas() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"image: grafana/grafana:{GRAFANA_VERSION}" in compose
    package = json.loads((node_modules() / "@grafana" / "schema" / "package.json").read_text())
    assert package["version"] == GRAFANA_VERSION
    defaults = (
        node_modules() / "@grafana/schema/dist/esm/raw/dashboard/x/dashboard_types.gen.js"
    ).read_text()
    published = int(re.search(r"schemaVersion: (\d+)", defaults).group(1))  # type: ignore[union-attr]
    assert published == SCHEMA_VERSION
    for path in DASHBOARDS:
        assert json.loads(path.read_text())["schemaVersion"] == SCHEMA_VERSION, path.name


def test_dashboards_match_grafanas_published_schema(tmp_path: Path) -> None:
    sources = {
        path.with_suffix(".ts").name: dashboard_typescript(json.loads(path.read_text()))
        for path in DASHBOARDS
    }
    result = tsc(tmp_path, sources)
    assert result.returncode == 0, result.stdout + result.stderr


def broken(mutate: Any) -> dict[str, Any]:
    dashboard = json.loads(DASHBOARDS[0].read_text())
    out: dict[str, Any] = copy.deepcopy(dashboard)
    mutate(out)
    return out


def first(d: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(p for p in d["panels"] if p["type"] == kind)


@pytest.mark.parametrize(
    ("name", "mutate", "complaint"),
    [
        (
            "unknown option",
            lambda d: first(d, "timeseries")["options"].update(legendd={}),
            "legendd",
        ),
        (
            "value outside an enum",
            lambda d: first(d, "timeseries")["options"]["legend"].update(displayMode="grid"),
            '"grid"',
        ),
        (
            "missing required option",
            lambda d: first(d, "stat")["options"].pop("wideLayout"),
            "wideLayout",
        ),
        ("wrong type", lambda d: d.update(refresh=30), "refresh"),
        ("unknown variable key", lambda d: d["templating"]["list"][1].update(auto=True), "auto"),
    ],
)
def test_the_schema_check_can_fail(tmp_path: Path, name: str, mutate: Any, complaint: str) -> None:
    result = tsc(tmp_path, {"broken.ts": dashboard_typescript(broken(mutate))})
    assert result.returncode != 0, f"{name} passed the schema check"
    assert complaint in result.stdout, result.stdout

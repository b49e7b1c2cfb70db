"""Paths and helpers shared by the deployment checks."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "log-bridge"
DOCKERFILE = REPO / "Dockerfile"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "log-bridge"
NAMESPACE = "audit"
INSTALL_HINT = "install the deploy-checks extra: pip install -e '.[deploy-checks]'"

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]


def scenario_id(path: Path) -> str:
    """Test id of a scenario values file: its name without the -values.yaml suffix."""
    return path.name.removesuffix("-values.yaml")


def load_values(path: Path) -> dict[str, Any]:
    """Values of a scenario file (an empty file means no overrides)."""
    loaded = yaml.safe_load(path.read_text()) or {}
    assert isinstance(loaded, dict), f"{path} must hold a mapping"
    return loaded


def tool_path(name: str) -> str:
    """Absolute path of a console tool installed next to this interpreter (or on PATH); fail if absent."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: {INSTALL_HINT}")
    return found


def only(manifests: list[Manifest], kind: str, *, name: str | None = None) -> Manifest:
    """The single manifest of a kind (and name); fails if there are none or several."""
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def kinds(manifests: list[Manifest]) -> list[str]:
    """Kinds of the manifests, in order."""
    return [m["kind"] for m in manifests]

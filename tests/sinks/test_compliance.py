"""Every registered sink type runs the same compliance suite (success, retry, permanent, partial, close)."""

from __future__ import annotations

import importlib

import pytest

from sinks import registry
from sinks.testing.compliance import CHECKS, Harness, run_with_peer, unsupported

HARNESS_MODULES = {
    "splunk_hec": "tests.peers.hec",
    "datadog": "tests.peers.datadog",
    "s3": "tests.peers.s3",
    "syslog": "tests.peers.syslog",
    "http": "tests.peers.http_forward",
}
"""Harness modules of the sinks whose peers are test equipment (tests/peers, not shipped)."""


def harness_module(type_name: str) -> str:
    return HARNESS_MODULES.get(type_name, f"sinks.testing.{type_name}")


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

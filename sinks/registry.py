"""Where sink types come from: a map of `type:` names to lazily imported `"module:Class"` strings,
plus third-party sinks registered under the entry-point group `log_bridge.sinks`."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import cast

from sinks.base import SinkFactory
from sinks.errors import SinkTypeError

ENTRY_POINT_GROUP = "log_bridge.sinks"

BUILTIN: dict[str, str] = {
    "file": "sinks.file:FileSink",
    "memory": "sinks.memory:MemorySink",
    "s3": "sinks.s3:S3Sink",
    "splunk_hec": "sinks.splunk_hec:SplunkHecSink",
    "datadog": "sinks.datadog:DatadogSink",
}
"""Built-in sink types."""

EXTRAS: dict[str, str] = {"s3": "s3", "datadog": "datadog"}
"""The pip extra each optional sink needs (`pip install 'log-bridge[s3]'`)."""


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_types() -> list[str]:
    """Every sink type name, built-in and plugged in."""
    return sorted({**_plugins(), **BUILTIN})


def load(type_name: str) -> SinkFactory:
    """The sink class for `type_name`; a friendly error names a missing extra or an unknown type."""
    target = BUILTIN.get(type_name) or _plugins().get(type_name)
    if target is None:
        raise SinkTypeError(f"unknown sink type {type_name!r}; known types: {', '.join(known_types())}")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = EXTRAS.get(type_name)
        hint = f"; install it with: pip install 'log-bridge[{extra}]'" if extra else ""
        raise SinkTypeError(
            f"sink type {type_name!r} needs a package that is not installed ({exc.name}){hint}"
        ) from exc
    try:
        return cast(SinkFactory, getattr(module, attribute))
    except AttributeError as exc:
        raise SinkTypeError(f"sink type {type_name!r}: {target} does not exist") from exc

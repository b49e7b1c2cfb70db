"""Where sink types come from: one record per built-in type (its `type:` name, the lazily imported
`"module:Class"` that builds it, the pip extra it needs), plus third-party sinks registered under the
entry-point group `log_bridge.sinks`. A sink class carries its config model as `Config`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import cast

from sinks.base import Sink, SinkConfig, SinkFactory
from sinks.errors import SinkTypeError

ENTRY_POINT_GROUP = "log_bridge.sinks"


@dataclass(frozen=True, slots=True)
class SinkType:
    """One sink type: its name, where its class lives (imported on first use), and the extra it needs."""

    name: str
    target: str
    """`"module:Class"`; the class is the factory (`Class(name, config)`) and holds its config model `Config`."""
    extra: str | None = None
    """The pip extra that installs its dependencies (`pip install 'log-bridge[<extra>]'`)."""

    def load(self) -> SinkFactory:
        """The sink class; a friendly SinkTypeError names a missing extra."""
        module_name, _, attribute = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = f"; install it with: pip install 'log-bridge[{self.extra}]'" if self.extra else ""
            raise SinkTypeError(
                f"sink type {self.name!r} needs a package that is not installed ({exc.name}){hint}"
            ) from exc
        try:
            return cast(SinkFactory, getattr(module, attribute))
        except AttributeError as exc:
            raise SinkTypeError(f"sink type {self.name!r}: {self.target} does not exist") from exc

    def config_model(self) -> type[SinkConfig]:
        """The model that validates this type's own options."""
        return self.load().Config


TYPES: dict[str, SinkType] = {
    record.name: record
    for record in (
        SinkType("file", "sinks.file:FileSink"),
        SinkType("memory", "sinks.memory:MemorySink"),
        SinkType("s3", "sinks.s3:S3Sink", extra="s3"),
        SinkType("splunk_hec", "sinks.splunk_hec:SplunkHecSink"),
        SinkType("datadog", "sinks.datadog:DatadogSink", extra="datadog"),
        SinkType("syslog", "sinks.syslog:SyslogSink"),
        SinkType("http", "sinks.http_forward:HttpForwardSink"),
    )
}
"""Built-in sink types: adding a sink is one line here."""

BUILTIN: dict[str, str] = {name: record.target for name, record in TYPES.items()}
"""Built-in `type:` names and their `"module:Class"` (kept for callers that list them)."""
EXTRAS: dict[str, str] = {name: record.extra for name, record in TYPES.items() if record.extra}
"""The pip extra each optional sink needs."""


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_types() -> list[str]:
    """Every sink type name, built-in and plugged in."""
    return sorted({**_plugins(), **BUILTIN})


def record(type_name: str) -> SinkType:
    """The record of `type_name`, built-in or plugged in; SinkTypeError for an unknown one."""
    target = BUILTIN.get(type_name) or _plugins().get(type_name)
    if target is None:
        raise SinkTypeError(f"unknown sink type {type_name!r}; known types: {', '.join(known_types())}")
    return SinkType(type_name, target, EXTRAS.get(type_name))


def load(type_name: str) -> SinkFactory:
    """The sink class for `type_name`; a friendly error names a missing extra or an unknown type."""
    return record(type_name).load()


def build(sinks: Mapping[str, tuple[str, SinkConfig]]) -> dict[str, Sink]:
    """Build sinks from `name -> (type, validated options)` (no network I/O: a sink connects when used)."""
    return {name: load(type_name)(name, options) for name, (type_name, options) in sinks.items()}

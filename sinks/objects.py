"""Storing whole files through a sink: an optional capability, used by the WorkOS export archive.

A sink type that can store a file under a name of its own choosing (the file sink, the S3 sink) has an
`async def store_object(name, data, *, moment)` method. Sinks that deliver events to an API (Splunk HEC,
Datadog) have none, and configuration naming them where files are stored is refused.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from sinks import registry
from sinks.errors import SinkTypeError

__all__ = ["ObjectStore", "stores_objects"]


@runtime_checkable
class ObjectStore(Protocol):
    """A sink that can store a whole file."""

    name: str

    async def store_object(self, name: str, data: bytes, *, moment: datetime) -> None:
        """Store `data` durably under `name` (a relative path such as `exports/org_1/a_b.csv`), below the sink's
        own prefix or directory; `moment` fills a strftime prefix. Raises SinkError (a message naming no secret)
        when it is not stored."""
        ...


def stores_objects(type_name: str) -> bool:
    """Whether sinks of `type_name` can store files (pure: imports the sink's module, no I/O)."""
    try:
        factory = registry.load(type_name)
    except SinkTypeError:
        return False
    return callable(getattr(factory, "store_object", None))

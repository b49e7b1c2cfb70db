"""Running sinks' health checks, each within a time limit (`log-bridge check`, the delivery engine)."""

from __future__ import annotations

import asyncio

from receiver.config import Config
from sinks.base import Health, Sink
from sinks.errors import SinkError


async def check_sinks(config: Config, names: list[str], limit: float) -> tuple[dict[str, Health], list[str]]:
    """Build the sinks named and run their health checks concurrently, each within `limit` seconds; a check
    that hangs or raises is a failed check, never an exception that hides the others' results. So is a sink
    that cannot be built (a TLS file that cannot be read): those are named in the second value too."""
    from receiver.delivery import build_sinks

    sinks: dict[str, Sink] = {}
    unbuilt: dict[str, Health] = {}
    try:
        for name in names:
            try:
                sinks.update(build_sinks(config, [name]))
            except SinkError as exc:
                unbuilt[name] = Health(False, f"cannot be built: {exc}")
        found = await asyncio.gather(*(check(sink, limit) for sink in sinks.values()))
    finally:
        await asyncio.gather(*(sink.close() for sink in sinks.values()), return_exceptions=True)
    checked = dict(zip(sinks, found, strict=True))
    return {name: unbuilt.get(name) or checked[name] for name in names}, list(unbuilt)


async def check(sink: Sink, limit: float) -> Health:
    """A sink's health check within `limit` seconds: one that hangs or raises is a failed check (a sink's bug
    must neither hide the other sinks' results nor stop its checks)."""
    try:
        async with asyncio.timeout(limit):
            return await sink.healthcheck()
    except TimeoutError:
        return Health(False, f"no answer within {limit:g}s")
    except Exception as exc:
        return Health(False, f"health check raised {type(exc).__name__}")

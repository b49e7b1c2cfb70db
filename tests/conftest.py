"""Fixtures shared by the whole suite: a real log-bridge service on loopback, and an HTTP client."""

from __future__ import annotations

import contextlib
import copy
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families

from receiver.config import parse_config
from receiver.server import Service
from sinks.memory import MemorySink
from tests.workos_fake import FakeWorkOS, FakeWorkOSServer
from tests.workos_fake import stream as workos_stream

# The suite runs on shared, noisy machines: a slow example is not a failure (hypothesis's default deadline, 200 ms,
# failed property tests now and then when another process had the core).
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

# Every program a test starts (the `log-bridge` script included) runs this tree's code: an editable install may
# point at another checkout of the project, whose code the script would otherwise run.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")))
)

TOKEN = "Bearer test-secret-0123456789"

BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 0, "allowlist": ["127.0.0.1/32"], "shutdown_timeout": "5s"},
    "journal": {"max_bytes": "1GiB", "dedup_window": "24h"},
    "streams": [{"name": "workos", "path": "/workos", "auth": {"values": [TOKEN]}, "sinks": ["mem"]}],
    "sinks": {"mem": {"type": "memory", "batch": {"max_wait": "50ms"}, "retry": {"initial": "10ms", "max": "50ms"}}},
}

StartService = Callable[..., Awaitable[Service]]

ORGANIZATION = "org_01EHZNVPK3SFK441A1RGBFSHRT"


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `changes` merged in (mappings merge, everything else replaces)."""
    result = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[StartService]:
    """Starts real services on 127.0.0.1 (journal under tmp_path); all are stopped at the end."""
    running: list[Service] = []

    async def start(changes: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Service:
        tree = merge(BASE_CONFIG, {"journal": {"path": str(tmp_path / f"journal{len(running)}.db")}})
        tree = merge(tree, changes or {})
        service = Service(parse_config(tree, environ or {}))
        await service.start()
        running.append(service)
        _STARTED.append(service)
        return service

    yield start
    for service in running:
        _STARTED.remove(service)
        if not service.state.draining:
            await service.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session."""
    async with aiohttp.ClientSession() as session:
        yield session


@contextlib.asynccontextmanager
async def http_peer(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]], tls: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """A loopback HTTP server (HTTPS with `tls`) answering every request through `answer` (a stand-in S3, STS
    or HEC); yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        scheme = "https" if tls else "http"
        yield f"{scheme}://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def scrape(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition (None when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


_STARTED: list[Service] = []
"""Services started by `start_service`, newest last (the memory sinks of a test live in them)."""


def memory(name: str = "mem") -> MemorySink:
    """The memory sink the most recently started service built under `name`."""
    for service in reversed(_STARTED):
        sinks = service.engine.sinks if service.engine is not None else service.sinks  # a reload replaces them
        sink = sinks.get(name)
        if isinstance(sink, MemorySink):
            return sink
    raise LookupError(f"no running service has a memory sink named {name!r}")


@pytest.fixture
def workos_fake() -> Iterator[FakeWorkOS]:
    """A fake WorkOS API on loopback (tests/workos_fake.py) that knows ORGANIZATION, with an active HTTPS stream."""
    server = FakeWorkOSServer()
    fake = server.start()
    fake.organizations[ORGANIZATION] = workos_stream("active", last_synced_at="2024-01-15T10:30:00.000Z")
    yield fake
    server.stop()

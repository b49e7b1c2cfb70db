"""Benchmark of the Datadog sink: events/s into the local Datadog intake with gzip, and what
datadog-api-client's models would cost on the same path.

The intake runs in its own process (`python -m tests.peers.datadog --no-store --require-gzip`) so that
its decompression and parsing do not share the sink's interpreter lock. Every rate is the best of three runs
(the machine is shared); the CPU column is this process's CPU time (event loop and sink threads, not the
intake), which other load disturbs less than wall time. Run: `python -m bench.datadog`.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import os
import pstats
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from datadog_api_client.model_utils import data_to_dict
from datadog_api_client.v2.api.logs_api import LogsApi
from datadog_api_client.v2.model.content_encoding import ContentEncoding
from datadog_api_client.v2.model.http_log import HTTPLog
from datadog_api_client.v2.model.http_log_item import HTTPLogItem

from sinks.base import Event, Outcome
from sinks.datadog import GZIP_LEVEL, DatadogSink
from sinks.testing.compliance import make_events

TARGET = 30_000
"""events/s the sink must reach into the local intake with gzip."""
API_KEY = "bench-api-key"
BATCH = 1000
EVENTS = 20_000
"""Events per run of a sink row (the model rows send half as many)."""
RUNS = 3

Sender = Callable[[Sequence[Event]], Awaitable[None]]


def _start_intake() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.peers.datadog", "--port", "0", "--api-key", API_KEY]
        + ["--no-store", "--require-gzip"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"the intake did not start: {line!r}")
    return process, line.rsplit(" ", 1)[1].strip()


def _accepted(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_intake/stats", timeout=10) as answer:  # noqa: S310 (loopback URL)
        return int(json.load(answer)["accepted"])


def _sink(url: str) -> DatadogSink:
    return DatadogSink("bench", DatadogSink.Config.model_validate({"api_key": API_KEY, "endpoint": url}))


async def _measure(send: Sender, count: int, batch: int, concurrency: int) -> tuple[float, float]:
    """Best events/s and least CPU ms per 1000 events over RUNS runs of `count` fresh events."""
    rates, cpus = [], []
    for _ in range(RUNS):
        events = make_events(count)  # fresh: each wrapper is parsed on first use, as in the engine
        queue = iter([events[i : i + batch] for i in range(0, count, batch)])
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(_drain(queue, send) for _ in range(concurrency)))
        rates.append(count / (time.perf_counter() - wall))
        cpus.append((time.process_time() - cpu) * 1000 / (count / 1000))
    return max(rates), min(cpus)


async def _drain(queue: Iterator[Sequence[Event]], send: Sender) -> None:
    for batch in queue:
        await send(batch)


def _sink_sender(sink: DatadogSink) -> Sender:
    async def send(batch: Sequence[Event]) -> None:
        result = await sink.send(batch)
        if result.outcome is not Outcome.SUCCESS or result.failures:
            raise RuntimeError(f"send failed: {result.reason}")

    return send


def _model_sender(sink: DatadogSink) -> Sender:
    """Send through `LogsApi.submit_log`, building `HTTPLog`/`HTTPLogItem` models per batch, on a thread."""
    api = LogsApi(sink._client)

    def blocking(batch: Sequence[Event]) -> None:
        items = [
            HTTPLogItem(message=e.event_raw.decode(), ddsource=e.source or "workos", service="audit-logs")
            for e in batch
        ]
        api.submit_log(body=HTTPLog(items), content_encoding=ContentEncoding.GZIP)

    async def send(batch: Sequence[Event]) -> None:
        await asyncio.to_thread(blocking, batch)

    return send


def _ms(function: Callable[[], Any], rounds: int = 5) -> float:
    """Least milliseconds of one call over `rounds`."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def _stage_costs(sink: DatadogSink) -> dict[str, float]:
    """ms per 1000 events of each stage of a send, for the sink's encoder and for the client's models."""
    parse = float("inf")
    for _ in range(5):
        events = make_events(BATCH)
        gc.collect()
        started = time.perf_counter()
        for event in events:
            _ = event.event_raw  # decode the wrapper's head, keeping the event raw, as the first use does
        parse = min(parse, time.perf_counter() - started)
    costs = {"read the journaled wrapper's head, event kept raw (msgspec)": parse * 1000}
    costs["sink: encode log items (orjson)"] = _ms(lambda: [sink.encode(e) for e in events])
    body = b"[" + b",".join(sink.encode(e) for e in events) + b"]"

    def gzip() -> bytes:
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        return compressor.compress(body) + compressor.flush()

    costs[f"gzip level {GZIP_LEVEL} ({len(body) // 1000} kB -> {len(gzip()) // 1000} kB)"] = _ms(gzip)
    messages = [e.event_raw.decode() for e in events]

    def models() -> HTTPLog:
        return HTTPLog([HTTPLogItem(message=m, ddsource="compliance", service="audit-logs") for m in messages])

    costs["client: build HTTPLog/HTTPLogItem models (message already encoded)"] = _ms(models)
    built = models()
    costs["client: data_to_dict + json.dumps of the models"] = _ms(lambda: json.dumps(data_to_dict(built)))
    return costs


async def _profile_send(sink: DatadogSink) -> list[tuple[str, float]]:
    """Top functions (own time, ms per 1000 events) of the sink's send path (encoding, compression, HTTP)."""
    events = make_events(5 * BATCH)
    gc.collect()
    profile = cProfile.Profile()
    profile.enable()
    result = await sink.send(events)
    profile.disable()
    assert result.outcome is Outcome.SUCCESS and not result.failures
    rows: list[tuple[str, float]] = []
    for (filename, line, name), row in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        label = f"{os.path.basename(filename)}:{line}({name})" if line else name
        rows.append((label, row[2] * 1000 / 5))
    rows.sort(key=lambda r: -r[1])
    return rows[:6]


async def run() -> str:
    """Run the benchmark and return its Markdown section."""
    process, url = _start_intake()
    sink = _sink(url)
    try:
        await _sink_sender(sink)(make_events(2 * BATCH))  # warm up the connection and the intake
        before = _accepted(url)
        send = _sink_sender(sink)
        rows = [
            (f"sink `send`, {BATCH}-event batches, 1 in flight", await _measure(send, EVENTS, BATCH, 1)),
            (f"sink `send`, {BATCH}-event batches, 4 in flight", await _measure(send, EVENTS, BATCH, 4)),
            (
                f"sink `send`, {5 * BATCH}-event batches (5 requests each), 1 in flight",
                await _measure(send, EVENTS, 5 * BATCH, 1),
            ),
        ]
        sink_best = max(rate for _, (rate, _) in rows)
        models = _model_sender(sink)
        for concurrency in (1, 4):
            label = f"client models: `LogsApi.submit_log(HTTPLog([...]))`, {concurrency} in flight"
            rows.append((label, await _measure(models, EVENTS // 2, BATCH, concurrency)))
        costs = _stage_costs(sink)
        profile = await _profile_send(sink)
        delivered = _accepted(url) - before
    finally:
        await sink.close()
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()

    expected = RUNS * (3 * EVENTS + 2 * (EVENTS // 2)) + 5 * BATCH
    lines = [
        "### Datadog sink",
        "",
        f"Events/s into the local Datadog intake (`tests.peers.datadog` in its own process, gzip required), "
        f"{os.cpu_count()} CPU cores, best of {RUNS} runs. Target: >= {TARGET:,} events/s with gzip — "
        f"**{'met' if sink_best >= TARGET else 'NOT met'}** (best {sink_best:,.0f}). "
        f"The intake accepted {delivered:,} of the {expected:,} events sent.",
        "",
        "| path (gzip) | events/s | sink CPU ms / 1000 events |",
        "|---|---:|---:|",
        *(f"| {label} | {rate:,.0f} | {cpu:.1f} |" for label, (rate, cpu) in rows),
        "",
        "Cost of each stage, ms per 1000 events (one core):",
        "",
        "| stage | ms |",
        "|---|---:|",
        *(f"| {label} | {ms:.1f} |" for label, ms in costs.items()),
        "",
        "Top own-time functions of the sink's send path, ms per 1000 events (cProfile; own time includes the "
        "cyclic-GC passes a function's allocations trigger):",
        "",
        "| function | ms |",
        "|---|---:|",
        *(f"| `{label}` | {ms:.2f} |" for label, ms in profile),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(asyncio.run(run()))

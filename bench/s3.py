"""Benchmark of the `s3` sink against Ceph RGW on loopback (started here with RGWServer).

- batch layout: events/s through `S3Sink.send` (NDJSON, each compression), target >= 50k events/s;
- workos layout: objects/s through `S3Sink.send`, next to a plain concurrent boto3 put loop of the same
  objects in the same run (the ceiling), target >= 80 % of the plain loop.

Run: `python -m bench.s3` (prints a Markdown section). Falls back to moto's server when RGW cannot run here,
and says so (the figures are then not comparable with the target).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import msgspec

from sinks.base import Event
from sinks.s3 import S3Sink
from sinks.testing.compliance import make_events
from tests.peers.s3 import MotoS3, S3Server, delete_bucket, s3_client, sink_for

BATCH_EVENTS = 1000
BATCH_ROUNDS = 30
WORKOS_OBJECTS = 2000
WORKOS_BATCH = 1000  # the delivery engine's default batch.max_events
CONCURRENCY = 16
TARGET_EVENTS = 50_000
TARGET_RATIO = 0.80


def _start_server(stack: ExitStack) -> tuple[S3Server, str]:
    """RGW if it can run here, else moto (named in the result)."""
    try:
        from tests.peers.rgw import RGWServer, RGWUnavailable  # written alongside this sink
    except ImportError as exc:
        reason = f"tests.peers.rgw is missing ({exc})"
    else:
        rgw = RGWServer()
        try:
            rgw.start()
        except RGWUnavailable as exc:
            reason = str(exc).splitlines()[0] if str(exc) else "RGWUnavailable"
        else:
            stack.callback(rgw.stop)
            return rgw, "Ceph RGW"
    moto = MotoS3()
    moto.start()
    stack.callback(moto.stop)
    return moto, f"moto (RGW unavailable: {reason})"


def _sink(server: S3Server, bucket: str, **options: Any) -> S3Sink:
    return sink_for(server, bucket, name="bench", **{"concurrency": CONCURRENCY, **options})


async def _batch_rate(server: S3Server, bucket: str, compression: str, in_flight: int) -> tuple[float, int]:
    """Events/s of batch-layout sends, `in_flight` batches at a time; and the mean object size."""
    sink = _sink(server, bucket, layout="batch", compression=compression, prefix=f"batch-{compression}/")
    batches = [make_events(BATCH_EVENTS, start_seq=i * BATCH_EVENTS) for i in range(BATCH_ROUNDS)]
    sizes: list[int] = []
    try:
        await sink.send(batches[0][:10])  # warm up the client and the connection pool
        started = time.perf_counter()
        for offset in range(0, len(batches), in_flight):
            results = await asyncio.gather(*(sink.send(b) for b in batches[offset : offset + in_flight]))
            assert all(not r.failures and r.outcome.value == "success" for r in results), results
        elapsed = time.perf_counter() - started
        sizes.append(len(sink._batch_put(batches[0]).body))
    finally:
        await sink.close()
    return BATCH_EVENTS * BATCH_ROUNDS / elapsed, int(statistics.mean(sizes))


async def _workos_sink_rate(server: S3Server, bucket: str, events: Sequence[Event]) -> float:
    sink = _sink(server, bucket, prefix="sink/")
    try:
        await sink.send(events[:CONCURRENCY])  # warm-up
        started = time.perf_counter()
        for offset in range(0, len(events), WORKOS_BATCH):
            result = await sink.send(events[offset : offset + WORKOS_BATCH])
            assert result.outcome.value == "success" and not result.failures, result
        return len(events) / (time.perf_counter() - started)
    finally:
        await sink.close()


def _plain_rate(server: S3Server, bucket: str, events: Sequence[Event]) -> float:
    """A plain concurrent boto3 put loop of the same objects (same keys scheme, bodies and Content-MD5)."""
    # configured like the sink's client: a pool as wide as the threads, no extra checksums, no retries
    client = s3_client(server, max_pool_connections=CONCURRENCY, max_attempts=1)
    objects = [
        (
            f"plain/{e.timestamp[:10]}/{e.timestamp}_{e.key_suffix}.json",
            msgspec.json.format(e.event_raw, indent=2),
        )
        for e in events
    ]

    def put(item: tuple[str, bytes]) -> None:
        key, body = item
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentMD5=md5, ContentType="application/json")

    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(put, objects[:CONCURRENCY]))  # warm-up
            started = time.perf_counter()
            list(pool.map(put, objects))
            return len(objects) / (time.perf_counter() - started)
    finally:
        client.close()


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(function, *args)


async def run() -> str:
    """Measure and return the Markdown section."""
    with ExitStack() as stack:
        started = time.perf_counter()
        server, kind = await asyncio.to_thread(_start_server, stack)
        startup = time.perf_counter() - started
        admin = s3_client(server)
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        await _in_thread(lambda: admin.create_bucket(Bucket=bucket))
        try:
            batch_rows = []
            for compression in ("gzip", "zstd", "none"):
                for in_flight in (1, 4):
                    rate, size = await _batch_rate(server, bucket, compression, in_flight)
                    batch_rows.append((compression, in_flight, rate, size))
            events = make_events(WORKOS_OBJECTS)
            plain_rates, sink_rates = [], []
            for _ in range(3):  # interleaved, so both see the same machine load
                plain_rates.append(await _in_thread(_plain_rate, server, bucket, events))
                sink_rates.append(await _workos_sink_rate(server, bucket, events))
        finally:
            await _in_thread(delete_bucket, admin, bucket)
            admin.close()
    plain, sink = max(plain_rates), max(sink_rates)
    ratio = sink / plain
    # The delivery engine sends one batch at a time per sink: judge the target on that, worst compression.
    serial = min(rate for _, in_flight, rate, _ in batch_rows if in_flight == 1)
    lines = [
        "### S3 sink (`s3`)",
        "",
        f"Server: {kind} on 127.0.0.1 (started in {startup:.1f} s); {os.cpu_count()} CPU cores shared by the "
        f"server and the benchmark; `concurrency: {CONCURRENCY}`; every put carries Content-MD5.",
        "",
        "| measurement | figure |",
        "|---|---|",
    ]
    for compression, in_flight, rate, size in batch_rows:
        lines.append(
            f"| batch layout, {compression}, {BATCH_EVENTS}-event batches, {in_flight} send(s) in flight "
            f"| {rate:,.0f} events/s ({size / 1024:.0f} KiB objects) |"
        )
    lines += [
        f"| workos layout, plain boto3 put loop ({CONCURRENCY} threads, same objects) | {plain:,.0f} objects/s |",
        f"| workos layout, `S3Sink.send` ({WORKOS_BATCH}-event batches, one at a time) | {sink:,.0f} objects/s |",
        f"| workos layout, sink / plain loop | {ratio:.0%} |",
        "",
        f"Targets: batch layout >= {TARGET_EVENTS:,} events/s — "
        f"{'met' if serial >= TARGET_EVENTS else 'NOT met'} ({serial:,.0f} with the slowest compression, one send "
        f"at a time as the delivery engine does); workos layout >= {TARGET_RATIO:.0%} of the plain loop — "
        f"{'met' if ratio >= TARGET_RATIO else 'NOT met'} ({ratio:.0%}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(asyncio.run(run()))

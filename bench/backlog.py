"""Backlog benchmark: 1,000,000 events (100 per request) into a receiver whose only sink is paused (a memory
sink that always answers "retry", with a 60 s backoff), sampling the receiver's RSS and the ingest rate for
each successive 100k events. Target: RSS <= 200 MB and no slowdown as the backlog grows.

Run: `python -m bench.backlog` (prints the section).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from dataclasses import dataclass

from bench.intake import Bodies, metrics, python_load, receiver_process, rss_bytes

TOTAL_EVENTS = 1_000_000
EVENTS_PER_REQUEST = 100
SEGMENT_EVENTS = 100_000
CONNECTIONS = 16
TIME_LIMIT = 300.0
"""Seconds after which the load stops even if the million was not reached."""
RSS_TARGET = 200 * 1024 * 1024
SLOWDOWN_TOLERANCE = 0.85
"""The last 100k must be ingested at no less than this fraction of the first 100k's rate."""
PAUSED_SINK: dict[str, object] = {"type": "memory", "fail": "retry", "retry": {"initial": "60s", "max": "60s"}}


@dataclass
class Segment:
    """One successive 100k events."""

    index: int
    seconds: float
    rss: int

    @property
    def rate(self) -> float:
        """Events per second over the segment."""
        return SEGMENT_EVENTS / self.seconds if self.seconds else 0.0


class RssSampler:
    """Samples a process's RSS every 0.25 s in a thread and keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.max = max(self.max, rss_bytes(self.pid))
            except OSError:
                return
            self._stop.wait(0.25)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def measure() -> tuple[list[Segment], int, int, dict[str, float], float, int]:
    """Push the events; returns the segments, max RSS, RSS at start, final metrics, seconds and errors."""
    requests = TOTAL_EVENTS // EVENTS_PER_REQUEST
    per_segment = SEGMENT_EVENTS // EVENTS_PER_REQUEST
    with receiver_process(PAUSED_SINK) as receiver:
        start_rss = rss_bytes(receiver.pid)
        segments: list[Segment] = []
        mark = time.monotonic()

        def progress(done: int) -> None:
            nonlocal mark
            if done % per_segment == 0:
                now = time.monotonic()
                segments.append(Segment(len(segments) + 1, now - mark, rss_bytes(receiver.pid)))
                mark = now

        with RssSampler(receiver.pid) as sampler:
            started = time.monotonic()
            load = await python_load(
                receiver.url,
                Bodies(EVENTS_PER_REQUEST),
                connections=CONNECTIONS,
                duration=TIME_LIMIT,
                requests=requests,
                progress=progress,
            )
            elapsed = time.monotonic() - started
            final = await asyncio.to_thread(metrics, receiver.url)
        return segments, sampler.max, start_rss, final, elapsed, load.errors


def render(
    segments: list[Segment], max_rss: int, start_rss: int, final: dict[str, float], elapsed: float, errors: int
) -> str:
    """The Markdown section."""
    mib = 1024 * 1024
    journal_mib = final.get("log_bridge_journal_bytes", 0) / mib
    journaled = int(final.get("log_bridge_events_received_total", 0))
    delivered = int(final.get("log_bridge_sink_events_delivered_total", 0))
    lines = [
        "### Backlog (sink paused)",
        "",
        f"{TOTAL_EVENTS:,} events, {EVENTS_PER_REQUEST} per request, {CONNECTIONS} connections (Python aiohttp load "
        f"generator: the run is bounded by count, which wrk cannot do), into a receiver whose only sink is a memory "
        f'sink answering "retry" with a 60 s backoff, so nothing leaves the journal. RSS is the receiver\'s VmRSS '
        f"(sampled every 0.25 s and at each 100k). Machine: {os.cpu_count()} cores.",
        "",
        "| events so far | seconds for this 100k | events/s | RSS at the mark (MiB) |",
        "|---:|---:|---:|---:|",
    ]
    for segment in segments:
        lines.append(
            f"| {segment.index * SEGMENT_EVENTS:,} | {segment.seconds:.1f} | {segment.rate:,.0f} "
            f"| {segment.rss / mib:.0f} |"
        )
    first = segments[0].rate if segments else 0.0
    last = segments[-1].rate if segments else 0.0
    ratio = last / first if first else 0.0
    # Single 100k segments take 2-5 s on a shared machine, so one noisy second moves them: the medians of the
    # first three and last three segments decide.
    head = statistics.median(s.rate for s in segments[:3]) if segments else 0.0
    tail = statistics.median(s.rate for s in segments[-3:]) if segments else 0.0
    smooth = tail / head if head else 0.0
    rss_ok = max_rss <= RSS_TARGET
    rate_ok = smooth >= SLOWDOWN_TOLERANCE and len(segments) * SEGMENT_EVENTS >= TOTAL_EVENTS
    lines += [
        "",
        "| figure | measured | target | met |",
        "|---|---:|---:|---|",
        f"| max RSS | {max_rss / mib:.0f} MiB (at start {start_rss / mib:.0f} MiB) | ≤ 200 MB | "
        f"{'yes' if rss_ok else '**no**'} |",
        f"| ingest rate, first vs last 100k | {first:,.0f} → {last:,.0f} events/s ({ratio:.2f}×) | | |",
        f"| ingest rate, median of first 3 vs last 3 segments | {head:,.0f} → {tail:,.0f} events/s ({smooth:.2f}×) "
        f"| no slowdown (last ≥ {SLOWDOWN_TOLERANCE:.0%} of first) | {'yes' if rate_ok else '**no**'} |",
        f"| whole run | {journaled:,} events journaled in {elapsed:.1f} s ({journaled / elapsed:,.0f} events/s), "
        f"{errors} failed requests, {delivered} delivered, journal {journal_mib:,.0f} MiB | | |",
    ]
    return "\n".join(lines) + "\n"


async def run() -> str:
    """The backlog section, as Markdown."""
    return render(*(await measure()))


if __name__ == "__main__":
    print(asyncio.run(run()))

"""`log-bridge drain`: deliver what a journal still holds to its sinks, without taking new events.

For the volume of a replica that is gone (scaled down, its node lost): mount its claim, run `drain` with the same
configuration, and the backlog reaches the sinks. The delivery engine is the service's own; only the listener is
missing. Run it on a journal no `serve` is using: two processes delivering the same backlog send it twice.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from receiver.config import Config
from receiver.delivery import DeliveryEngine, build_sinks
from receiver.journal import Journal, connect
from receiver.metrics import Metrics


@dataclass(frozen=True, slots=True)
class Leftover:
    """What one sink has not passed yet when the drain ends."""

    sink: str
    events: int
    health: str


async def drain(config: Config, deadline: float) -> list[Leftover]:
    """Deliver the journal's backlog for up to `deadline` seconds; what is left, per sink (empty: all delivered)."""
    journal = Journal(config.journal.path, max_bytes=config.journal.max_bytes, dedup_window=0.0)
    await journal.open()
    try:
        engine = DeliveryEngine(config, journal, Metrics(), build_sinks(config))
        await engine.start()
        await engine.stop(deadline)
        health = {name: runner.health.message for name, runner in engine.runners.items()}
    finally:
        await journal.close()
    left = backlog_by_sink(config)
    return [Leftover(name, count, health.get(name, "")) for name, count in left.items() if count]


def backlog_by_sink(config: Config) -> dict[str, int]:
    """Events after each fed sink's cursor that are meant for it (action filters aside: at most this many)."""
    conn = connect(config.journal.path)
    try:
        cursors = dict(conn.execute("SELECT sink, seq FROM cursors").fetchall())
        left: dict[str, int] = {}
        for name in config.sinks:
            streams = config.streams_of(name)
            if not streams:
                continue
            left[name] = _events_after(conn, name, streams, int(cursors.get(name, 0)))
        return left
    finally:
        conn.close()


def _events_after(conn: sqlite3.Connection, sink: str, streams: tuple[str, ...], cursor: int) -> int:
    marks = ",".join(f"?{index}" for index in range(3, 3 + len(streams)))
    row = conn.execute(
        "SELECT total(last_seq - max(first_seq - 1, ?1)) FROM batches WHERE last_seq > ?1 "  # noqa: S608 - only ?s
        f"AND ((target IS NULL AND stream IN ({marks})) OR target = ?2)",
        (cursor, sink, *streams),
    ).fetchone()
    return int(row[0])

"""`log-bridge drain`: deliver what a journal still holds to its sinks, without taking new events.

For the volume of a replica that is gone (scaled down, its node lost): mount its claim, run `drain` with the same
configuration, and the backlog reaches the sinks. The delivery engine is the service's own; only the listener is
missing. Run it on a journal no `serve` is using: two processes delivering the same backlog send it twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from receiver.config import Config
from receiver.delivery import DeliveryEngine, build_sinks
from receiver.journal import Journal
from receiver.metrics import Metrics
from receiver.routing import OWED, ROUTING, carried_over


@dataclass(frozen=True, slots=True)
class Leftover:
    """What one sink has not passed yet when the drain ends."""

    sink: str
    events: int
    health: str


async def drain(config: Config, deadline: float) -> list[Leftover]:
    """Deliver the journal's backlog for up to `deadline` seconds; what is left, per sink (empty: all delivered)."""
    # The configured window: the keys of the records it delivers are kept for the service that starts next.
    journal = Journal(
        config.journal.path,
        max_bytes=config.journal.max_bytes,
        dedup_window=config.journal.dedup_window,
        dedup_max_keys=config.journal.dedup_max_keys,
        max_dead_letter_bytes=config.journal.max_dead_letter_bytes,
    )
    await journal.open()
    try:
        engine = DeliveryEngine(config, journal, Metrics(), build_sinks(config))
        # What a reload or an edited file took away from a sink is still that sink's, as at a `serve` start.
        owed = carried_over(await journal.load_meta(ROUTING), await journal.load_meta(OWED), config, journal.last_seq)
        engine.carry(owed)
        await engine.start()
        await engine.stop(deadline)
        health = {name: runner.health.message for name, runner in engine.runners.items()}
        left = await backlog_by_sink(config, journal, owed)
    finally:
        await journal.close()
    return [Leftover(name, count, health.get(name, "")) for name, count in left.items() if count]


async def backlog_by_sink(
    config: Config, journal: Journal, owed: dict[str, dict[str, float]] | None = None
) -> dict[str, int]:
    """Events after each fed sink's cursor that are meant for it, those of streams it still owes from an
    earlier routing included (action filters aside: at most this many)."""
    fed = [name for name in config.sinks if config.streams_of(name)]
    cursors = await journal.cursors(fed)
    return {
        name: await journal.count_after(
            cursors[name], set(config.streams_of(name)) | set((owed or {}).get(name, {})), name
        )
        for name in fed
    }

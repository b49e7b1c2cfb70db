"""The durable journal: the events in append-only segment files (`<journal>.segments/`), everything else in
SQLite (WAL mode, `synchronous=FULL`), all written by one thread that groups the writes of concurrent requests,
so one `fdatasync` serves many acknowledgements.

Segments (receiver.journal.segments) hold the backlog: one record per accepted request, its events numbered
`first..last`, their bytes as received one per line (zstd), with their actions, times and dedup keys. A segment
every active sink is past is unlinked whole. SQLite holds `cursors` (the last event seq each sink is past),
`dedup_log` (the dedup keys of delivered records, copied as delivery passes them, kept for the dedup window),
`dead_letters` (what could not be delivered, with the reason), `replays` (dead letters `dlq replay` put back,
until the service appends them) and `meta`.

Deduplication is looked up in memory (receiver.dedup) by the writer thread, in commit order; the keys reach the
index only once their record is durable, and are on disk in the same record, so a SIGKILL at any moment loses
neither an acknowledged event nor the key that makes its retry a duplicate. The backlog cap (`max_bytes`)
counts the undelivered records' bytes only; dedup keys have their own bound (`dedup_max_keys`).

Modules: `segments` (the event files), `schema` (tables, migrations, the shared statements), `writer` (the
group-commit thread), `facade` (the `Journal` the intake and the delivery engine use), `dead_letters` (`dlq
list` / `dlq replay` / `dlq purge`).
"""

from receiver.journal.dead_letters import (
    DeadLetter,
    count_dead_letters,
    iter_dead_letters,
    list_dead_letters,
    measure_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from receiver.journal.facade import PROBE_ROOM, WRITER_CACHE_KIB, AppendResult, Journal, Row
from receiver.journal.schema import COMPRESSION_LEVEL, INTAKE, SCHEMA, DiskFull, connect
from receiver.journal.writer import MAX_GROUP_JOBS

__all__ = [
    "COMPRESSION_LEVEL",
    "INTAKE",
    "MAX_GROUP_JOBS",
    "PROBE_ROOM",
    "SCHEMA",
    "WRITER_CACHE_KIB",
    "AppendResult",
    "DeadLetter",
    "DiskFull",
    "Journal",
    "Row",
    "connect",
    "count_dead_letters",
    "iter_dead_letters",
    "list_dead_letters",
    "measure_dead_letters",
    "purge_dead_letters",
    "replay_dead_letters",
]

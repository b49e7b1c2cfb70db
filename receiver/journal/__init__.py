"""The durable journal: SQLite in WAL mode with `synchronous=FULL`, written by one thread that groups the
writes of concurrent requests into one transaction, so one fsync serves many acknowledgements.

Tables: `batches` (the backlog: one row per accepted request, its events numbered `first_seq..last_seq`, their
bytes as received one per line), `cursors` (the last event seq each sink is past), `dedup_log` (one row per
accepted request with the dedup keys it brought, kept for the dedup window), `dead_letters` (what could not be
delivered, with the reason) and `meta` (the last seq handed out, so numbers never go back even when the backlog
empties).

A row per request rather than per event keeps SQLite's work per request nearly constant. Deduplication is
looked up in memory (receiver.dedup) by the writer thread, in commit order; the keys reach the index only once
their batch has committed, and are on disk in the same transaction, so a SIGKILL at any moment loses neither an
acknowledged event nor the key that makes its retry a duplicate. The backlog cap (`max_bytes`) counts the
undelivered events' bytes only; dedup keys have their own bound (`dedup_max_keys`).

Modules: `schema` (tables, migrations, the shared statements), `writer` (the group-commit thread), `facade` (the
`Journal` the intake and the delivery engine use), `dead_letters` (`dlq list` / `dlq replay`).
"""

from receiver.journal.dead_letters import DeadLetter, list_dead_letters, replay_dead_letters
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
    "list_dead_letters",
    "replay_dead_letters",
]

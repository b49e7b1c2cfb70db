"""The durable journal: SQLite in WAL mode with `synchronous=FULL`, written by one thread that groups the
writes of concurrent requests into one transaction, so one fsync serves many acknowledgements.

Tables: `batches` (the backlog: one row per accepted request, its events numbered `first_seq..last_seq`, their
compact JSON one per line), `cursors` (the last event seq each sink is past), `dedup` (keys seen within the dedup
window), `dead_letters` (what could not be delivered, with the reason) and `meta` (the last seq handed out, so
numbers never go back even when the backlog empties).

A row per request rather than per event keeps SQLite's work per request nearly constant: the intake's cost is
dominated by parsing, not by the B-tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from receiver.errors import JournalClosed, JournalError, JournalFull
from receiver.parsing import Parsed
from sinks.base import Event

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    target TEXT,
    received_at REAL NOT NULL,
    meta BLOB NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dedup (
    stream TEXT NOT NULL, key TEXT NOT NULL, seen REAL NOT NULL, PRIMARY KEY (stream, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_seen ON dedup (seen);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    sink TEXT,
    stream TEXT NOT NULL,
    data BLOB NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_sink ON dead_letters (sink);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""

WRITER_CACHE_KIB = 32 * 1024
"""The writer's page cache (SQLite's default is 2 MiB). Dedup keys are random, so inserts touch index pages all
over; a larger cache keeps more of that index in memory and saves about a quarter of the writer's CPU."""

INTAKE = "(intake)"
"""How `dlq list` names dead letters of the intake (bad input), which belong to no sink."""


def connect(path: Path, cache_kib: int | None = None) -> sqlite3.Connection:
    """A connection with the journal's durability settings and schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    if cache_kib is not None:
        conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
    conn.executescript(SCHEMA)
    return conn


def _map_error(exc: sqlite3.Error) -> JournalError:
    text = str(exc).lower()
    if "full" in text:
        return JournalFull("the journal's disk is full")
    return JournalError(f"journal write failed: {exc}")


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one request's batch became."""

    accepted: int
    duplicates: int
    dead_lettered: int


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


_STOP = object()


class Journal:
    """The journal of one process. Writes go through one thread (group commit); reads through another."""

    def __init__(self, path: Path, *, max_bytes: int, dedup_window: float) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.dedup_window = dedup_window
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        self._read_conn: sqlite3.Connection | None = None
        self._closed = False
        self.size_bytes = 0
        self.last_seq = 0
        self.commits = 0
        self._new_data: list[asyncio.Event] = []
        self._next_seq = 1

    # --- life cycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the database and start the writer thread."""
        conn = await asyncio.to_thread(connect, self.path, WRITER_CACHE_KIB)
        self._read_conn = await asyncio.to_thread(connect, self.path)
        self.last_seq = _last_seq(conn)
        self.size_bytes = self._measure(conn)
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="journal-write", daemon=True)
        self._writer.start()

    async def close(self) -> None:
        """Finish queued writes, then close both connections."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
        if self._read_conn is not None:
            conn = self._read_conn
            await asyncio.get_running_loop().run_in_executor(self._reader, conn.close)
        self._reader.shutdown(wait=True)

    def subscribe(self) -> asyncio.Event:
        """An event set whenever new rows are committed (the delivery engine waits on it)."""
        signal = asyncio.Event()
        self._new_data.append(signal)
        return signal

    # --- the writer thread -------------------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                jobs: list[_Job] = [first]  # type: ignore[list-item]
                stop = False
                while True:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stop = True
                        break
                    jobs.append(more)  # type: ignore[arg-type]
                self._run_group(conn, jobs)
                if stop:
                    return
        finally:
            conn.close()

    def _run_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        added = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Sequence numbers come from the database under its write lock, so another process (`dlq replay`)
            # writing to the same journal never hands out the same numbers.
            self._next_seq = _last_seq(conn) + 1
            first = self._next_seq
            for job in jobs:
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(conn)
                except Exception as exc:  # one request's failure must not sink the others in the group
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((job, None, _map_error(exc) if isinstance(exc, sqlite3.Error) else exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((job, result, None))
            added = self._next_seq != first
            if added:
                _store_last_seq(conn, self._next_seq - 1)
            conn.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced here, once for the whole group
            self.commits += 1
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure = _map_error(exc)
            log.error("journal commit failed", extra={"error": str(failure)})
            outcomes = [(job, None, failure) for job in jobs]
            added = False
        self.last_seq = _last_seq(conn)
        self.size_bytes = self._measure(conn)
        # One wake-up of the event loop for the whole group, not one per request.
        jobs[0].loop.call_soon_threadsafe(self._settle_group, outcomes, added)

    def _settle_group(self, outcomes: list[tuple[_Job, Any, BaseException | None]], added: bool) -> None:
        for job, result, error in outcomes:
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        if added:
            for signal in self._new_data:
                signal.set()

    @staticmethod
    def _measure(conn: sqlite3.Connection) -> int:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed or self._writer is None:
            raise JournalClosed("the journal is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, loop, future))
        return await future

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._read_conn is None:
            raise JournalClosed("the journal is closed")
        conn = self._read_conn
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)

    # --- intake ------------------------------------------------------------------------------------

    @property
    def over_cap(self) -> bool:
        """Whether the backlog is over `max_bytes`."""
        return self.size_bytes >= self.max_bytes

    async def append(self, stream: str, parsed: Parsed, received_at: float) -> AppendResult:
        """Commit one request's elements durably (one batch row, dedup keys, intake dead letters); returns
        after the fsync."""
        if self.over_cap:
            raise JournalFull(f"the journal is over its cap ({self.max_bytes} bytes)")
        cutoff = received_at - self.dedup_window

        def write(conn: sqlite3.Connection) -> AppendResult:
            fresh = _fresh_indexes(conn, stream, parsed.keys, cutoff, received_at) if self.dedup_window > 0 else None
            count = len(parsed) if fresh is None else len(fresh)
            if count:
                if fresh is None:
                    raws, actions, times = parsed.raws, parsed.actions, parsed.times
                else:
                    raws = [parsed.raws[i] for i in fresh]
                    actions = [parsed.actions[i] for i in fresh]
                    times = [parsed.times[i] for i in fresh]
                first = self._next_seq
                self._next_seq += count
                conn.execute(
                    "INSERT INTO batches (first_seq, last_seq, stream, received_at, meta, data) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (first, first + count - 1, stream, received_at, orjson.dumps([actions, times]), b"\n".join(raws)),
                )
            if parsed.rejected:
                conn.executemany(
                    "INSERT INTO dead_letters (sink, stream, data, reason, at) VALUES (NULL, ?, ?, ?, ?)",
                    [(stream, item.raw, item.reason, received_at) for item in parsed.rejected],
                )
            return AppendResult(count, len(parsed) - count, len(parsed.rejected))

        return await self._write(write)

    async def probe(self) -> bool:
        """Whether a write commits now (readiness)."""
        try:
            await self._write(
                lambda conn: conn.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (time.time(),))
            )
        except JournalError:
            return False
        return True

    # --- delivery ----------------------------------------------------------------------------------

    async def cursors(self, sinks: Iterable[str]) -> dict[str, int]:
        """Each sink's cursor (0 for a sink never seen)."""
        names = list(sinks)

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            found = dict(conn.execute("SELECT sink, seq FROM cursors").fetchall())
            return {name: int(found.get(name, 0)) for name in names}

        return await self._read(read)

    async def read(self, after: int, limit: int) -> list[tuple[Event, str | None]]:
        """At least `limit` events after `after` (whole batch rows, so possibly more), in order, whatever their
        stream, each with its target: the one sink a replayed event is meant for, or None when it is for every
        sink of its stream."""

        def read(conn: sqlite3.Connection) -> list[tuple[Event, str | None]]:
            rows = conn.execute(
                "SELECT first_seq, stream, target, received_at, meta, data FROM batches "
                "WHERE first_seq >= coalesce((SELECT max(first_seq) FROM batches WHERE first_seq <= ?1), 0) "
                "AND last_seq > ?1 ORDER BY first_seq",
                (after,),
            )
            found: list[tuple[Event, str | None]] = []
            for first, stream, target, received_at, meta, data in rows:
                actions, times = orjson.loads(meta)
                seq = first
                for raw, action, moment in zip(data.split(b"\n"), actions, times, strict=True):
                    if seq > after:
                        found.append(
                            (Event(seq, stream, raw, action=action, time=moment, received_at=received_at), target)
                        )
                    seq += 1
                if len(found) >= limit:
                    break
            return found

        return await self._read(read)

    async def commit_progress(
        self,
        sink: str,
        seq: int,
        dead: Sequence[tuple[Event, str]],
        active_sinks: Sequence[str],
    ) -> None:
        """Record that `sink` is past `seq`, dead-letter what it could not deliver, and drop the rows every
        active sink is past."""
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO dead_letters (sink, stream, data, reason, at) VALUES (?, ?, ?, ?, ?)",
                [(sink, event.stream, event.raw, reason, now) for event, reason in dead],
            )
            conn.execute(
                "INSERT INTO cursors (sink, seq) VALUES (?, ?) ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq",
                (sink, seq),
            )
            marks = [
                row[0]
                for row in conn.execute(
                    f"SELECT seq FROM cursors WHERE sink IN ({','.join('?' * len(active_sinks))})",  # noqa: S608
                    tuple(active_sinks),
                )
            ]
            if len(marks) == len(active_sinks):
                mark = min(marks)
                conn.execute("DELETE FROM batches WHERE first_seq <= ? AND last_seq <= ?", (mark, mark))

        await self._write(write)

    async def prune_dedup(self, now: float | None = None) -> None:
        """Forget dedup keys older than the window."""
        cutoff = (time.time() if now is None else now) - self.dedup_window
        await self._write(lambda conn: conn.execute("DELETE FROM dedup WHERE seen < ?", (cutoff,)))


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
    return int(row[0]) if row else 0


def _store_last_seq(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_seq', ?)", (seq,))


_KEYS_PER_QUERY = 500


def _fresh_indexes(
    conn: sqlite3.Connection, stream: str, keys: Sequence[str | None], cutoff: float, now: float
) -> list[int] | None:
    """Indexes of the elements not seen within the window (None: all of them), and remember their keys."""
    present = [key for key in keys if key is not None]
    if not present:
        return None
    seen: set[str] = set()
    for start in range(0, len(present), _KEYS_PER_QUERY):
        chunk = present[start : start + _KEYS_PER_QUERY]
        marks = ",".join("?" * len(chunk))
        seen.update(
            row[0]
            for row in conn.execute(
                f"SELECT key FROM dedup WHERE stream = ? AND seen >= ? AND key IN ({marks})",  # noqa: S608
                (stream, cutoff, *chunk),
            )
        )
    fresh: list[int] = []
    new_keys: set[str] = set()
    for index, key in enumerate(keys):
        if key is None:
            fresh.append(index)
        elif key not in seen and key not in new_keys:
            new_keys.add(key)
            fresh.append(index)
    conn.executemany(
        "INSERT OR REPLACE INTO dedup (stream, key, seen) VALUES (?, ?, ?)", [(stream, key, now) for key in new_keys]
    )
    return None if len(fresh) == len(keys) else fresh


# --- dead letters, for the CLI (a plain connection; safe while the service runs) -----------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered element."""

    id: int
    sink: str
    stream: str
    data: bytes
    reason: str
    at: float


def list_dead_letters(path: Path, sink: str | None = None) -> list[DeadLetter]:
    """Dead letters, oldest first; `sink` may be a sink's name or INTAKE."""
    if not path.exists():
        return []
    conn = connect(path)
    try:
        query = "SELECT id, sink, stream, data, reason, at FROM dead_letters"
        params: tuple[Any, ...] = ()
        if sink == INTAKE:
            query += " WHERE sink IS NULL"
        elif sink is not None:
            query += " WHERE sink = ?"
            params = (sink,)
        rows = conn.execute(query + " ORDER BY id", params).fetchall()
    finally:
        conn.close()
    return [DeadLetter(r[0], r[1] or INTAKE, r[2], bytes(r[3]), r[4], r[5]) for r in rows]


def replay_dead_letters(path: Path, sink: str | None = None) -> int:
    """Put sinks' dead letters back into the backlog, each for the sink that failed it. Intake dead letters
    (bad input) stay: they are not events. Returns how many were put back."""
    if not path.exists():
        return 0
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        query = "SELECT id, sink, stream, data FROM dead_letters WHERE sink IS NOT NULL"
        params: tuple[Any, ...] = ()
        if sink:
            query, params = query + " AND sink = ?", (sink,)
        now = time.time()
        rows = conn.execute(query + " ORDER BY id", params).fetchall()
        seq = _last_seq(conn)
        for _id, target, stream, data in rows:
            action, moment = _action_and_time(bytes(data), now)
            seq += 1
            conn.execute(
                "INSERT INTO batches (first_seq, last_seq, stream, target, received_at, meta, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, seq, stream, target, now, orjson.dumps([[action], [moment]]), data),
            )
        _store_last_seq(conn, seq)
        conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(row[0],) for row in rows])
        conn.execute("COMMIT")
    finally:
        conn.close()
    return len(rows)


def _action_and_time(raw: bytes, now: float) -> tuple[str, float]:
    from receiver.parsing import parse_body

    parsed = parse_body(raw, "application/json", now)
    if parsed.raws:
        return parsed.actions[0], parsed.times[0]
    return "", now

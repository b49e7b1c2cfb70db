"""The journal's asynchronous façade: the API of the intake (append, probe) and of the delivery engine (read,
cursors, progress), over the group-commit writer and one reader thread."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import msgspec
import orjson
import zstandard

from receiver.dedup import DEFAULT_MAX_KEYS as DEFAULT_DEDUP_MAX_KEYS
from receiver.dedup import DedupIndex
from receiver.errors import JournalClosed, JournalError, JournalFull
from receiver.journal.schema import (
    COMPRESSION_LEVEL,
    INSERT_BATCH,
    INSERT_DEAD_LETTER,
    ROWS_AFTER,
    ZSTD_MAGIC,
    backlog_bytes,
    batch_row,
    connect,
    insert_dead_letters,
    last_seq,
    open_problem,
)
from receiver.journal.writer import GroupWriter
from receiver.parsing import Parsed
from sinks.base import Event

if TYPE_CHECKING:
    from receiver.dedup_store import RedisDedupStore

T = TypeVar("T")

log = logging.getLogger("receiver.journal")

WRITER_CACHE_KIB = 8 * 1024
"""The writer's page cache (SQLite's default is 2 MiB)."""


CHECKPOINT_EVERY = 1.0
"""Seconds between WAL checkpoints (when something was committed)."""

RECENT_BYTES = 8 * 1024 * 1024
"""Memory the newest committed rows may take, for sinks that are caught up to take without a read: each row is
charged its events' bytes plus ROW_COST and EVENT_COST an event (`Row.cost`), so many tiny rows stay within it."""

ROW_COST = 640
"""Bytes a held row costs besides its events' bytes (the Row, its lists, the source tuple; measured ≈ 600)."""

EVENT_COST = 160
"""Bytes each held event costs besides its bytes (its `Event` and `bytes` object once made; ≈ 130–150)."""

DEFER_MAX_EVENTS = 2048
"""A published row of more events makes them in the writer thread at once: making 100 k `Event`s on the event
loop when a sink first asks would hold it for 30–60 ms; 2,048 take ≈ 1 ms."""

PROBE_ROOM = 256 * 1024
"""Bytes a readiness probe writes after the disk was full: more than most requests store (compressed)."""


def _lock_exclusively(path: Path) -> IO[bytes]:
    """Hold `<journal>.lock` for the life of the process: two services on one journal would each keep their
    own dedup index and sequence, so the second is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    real = path.resolve()  # the same database reached through a symlink takes the same lock
    handle = (real.parent / (real.name + ".lock")).open("a+b")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise JournalError(
            f"cannot open the journal {path}: another log-bridge process is serving from it (it holds {path.name}.lock)"
        ) from None
    return handle


@dataclass(slots=True)
class _Batch:
    """One request's batch on its way to the writer thread."""

    stream: str
    scope: str
    parsed: Parsed
    received_at: float
    elsewhere: frozenset[str]
    """Keys another replica has seen (journal.dedup_store)."""
    keys: list[str] = field(default_factory=list)
    """The keys stored with it (set by the writer)."""
    size: int = 0
    """Bytes stored (set by the writer)."""
    row: Row | None = None
    """The events stored, for the sinks caught up once committed (set by the writer)."""


_Source = tuple[Sequence[bytes | msgspec.Raw], Sequence[str], Sequence[float], float]
"""A batch row's elements as the intake parsed them: (raws, actions, times, received_at)."""


class Row:
    """The events of one batch row past a read's start, with what they share.

    A row a commit publishes (`Row.deferred`) makes its events only when a sink first asks for them: a sink that
    is caught up takes them, but the rows a sink that is behind will read from SQLite instead, or that no sink
    takes during an outage, are let go without an `Event` ever made for them. Until then it holds the elements
    as the intake parsed them, views into the request body when the body is not more than twice their size
    (the usual case: every element kept), else copies: what a held row keeps alive stays within about twice
    its `cost`, so the RECENT_BYTES bound holds for memory too."""

    __slots__ = ("_events", "_source", "count", "first", "size", "stream", "target")

    def __init__(self, stream: str, target: str | None, events: list[Event], size: int) -> None:
        self.stream = stream
        self.target = target
        """The one sink they were replayed for, or None: for every sink of the stream."""
        self.size = size
        """Bytes of the events."""
        self.first = events[0].seq if events else 0
        """The first event's seq."""
        self.count = len(events)
        self._events = events
        self._source: _Source | None = None
        """What a deferred row's events are made of, until they are."""

    @classmethod
    def deferred(cls, stream: str, first: int, source: _Source, size: int) -> Row:
        """The row of events `first..` (`size` bytes) whose `source` is (raws, actions, times, received_at), made
        into events on first use."""
        row = cls.__new__(cls)
        row.stream, row.target, row.first, row.count, row.size = stream, None, first, len(source[0]), size
        row._events, row._source = [], source
        return row

    @property
    def cost(self) -> int:
        """What holding the row takes, for the RECENT_BYTES bound."""
        return self.size + ROW_COST + EVENT_COST * self.count

    @property
    def last(self) -> int:
        """The last event's seq."""
        return self.first + self.count - 1

    @property
    def events(self) -> list[Event]:
        """The events, made on first use for a row a commit published (event loop only)."""
        if self._source is not None:
            self._events = _events(self.stream, self.first, *self._source)
            self._source = None
        return self._events


def _events(
    stream: str,
    first: int,
    raws: Sequence[bytes | msgspec.Raw],
    actions: Sequence[str],
    times: Sequence[float],
    received_at: float,
) -> list[Event]:
    """The events `first..` of a batch row: what a read of the journal gives and what a commit publishes alike."""
    return [
        Event(seq, stream, bytes(raw), action=action, time=moment, received_at=received_at)
        for seq, raw, action, moment in zip(range(first, first + len(raws)), raws, actions, times, strict=True)
    ]


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one request's batch became."""

    accepted: int
    duplicates: int
    dead_lettered: int


class Journal(GroupWriter):
    """The journal of one process. Writes go through one thread (group commit); reads through another."""

    def __init__(
        self, path: Path, *, max_bytes: int, dedup_window: float, dedup_max_keys: int = DEFAULT_DEDUP_MAX_KEYS
    ) -> None:
        super().__init__()
        self.path = path
        self.max_bytes = max_bytes
        self.dedup = DedupIndex(dedup_window, dedup_max_keys)
        self._pending: dict[str, set[int]] = {}
        """Fingerprints taken by the jobs of the commit group being written (writer thread only)."""
        self._pack = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL).compress  # writer thread only
        self._unpack = zstandard.ZstdDecompressor().decompress  # reader thread only
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        self._read_conn: sqlite3.Connection | None = None
        self.size_bytes = 0
        self._lock: IO[bytes] | None = None
        self.dedup_scopes: dict[str, str] = {}
        """Stream name -> dedup scope (its path), for keys stored by name by earlier versions."""
        self._checkpoints: asyncio.Task[None] | None = None
        self._recent: deque[Row] = deque()
        """The rows committed last by this process, oldest first (event loop only)."""
        self._recent_bytes = 0
        self.shared: RedisDedupStore | None = None
        """The dedup store shared with other replicas (journal.dedup_store), consulted besides the local index."""

    # --- life cycle --------------------------------------------------------------------------------

    async def open(self, exclusive: bool = False) -> None:
        """Create or open the database and start the writer thread; with `exclusive`, refuse a journal another
        process serves from. Raises JournalError naming the path and the reason."""
        conn = None
        try:
            if exclusive:
                self._lock = await asyncio.to_thread(_lock_exclusively, self.path)
            conn = await asyncio.to_thread(connect, self.path, WRITER_CACHE_KIB)
            self._read_conn = await asyncio.to_thread(connect, self.path)
            self.last_seq = last_seq(conn)
            self.size_bytes = backlog_bytes(conn)
            await asyncio.to_thread(self._load_dedup, conn, time.time())
        except (OSError, sqlite3.Error) as exc:
            for opened in (conn, self._read_conn):
                if opened is not None:
                    opened.close()
            self._read_conn = None
            self._release_lock()
            raise JournalError(f"cannot open the journal {self.path}: {open_problem(exc, self.path)}") from None
        self._start_writer(conn)
        self._checkpoints = asyncio.create_task(self._checkpoint_forever(), name="journal-checkpoint")

    async def _checkpoint_forever(self) -> None:
        """Copy the WAL into the database every CHECKPOINT_EVERY seconds when something was committed, from
        the reader's connection, so the checkpoint SQLite runs inside a commit once the WAL holds 1,000 pages
        (which restarts the WAL: without it the file grows for as long as writes keep coming) has only the last
        few pages to copy, and the requests of that group wait for little more than its fsync."""
        done = self.commits
        failed = False
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            if self.commits == done and not failed:
                continue
            done = self.commits
            try:
                await self._read(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
            except sqlite3.Error as exc:  # a full disk: the WAL keeps the data; try again later
                if not failed:
                    log.warning("journal checkpoint failed; will retry", extra={"error": str(exc)})
                failed = True
            else:
                failed = False

    async def close(self) -> None:
        """Finish queued writes, then close both connections."""
        if self._closed:
            return
        self._closed = True
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
        await self._stop_writer()
        if self._read_conn is not None:
            conn = self._read_conn
            await asyncio.get_running_loop().run_in_executor(self._reader, conn.close)
        self._reader.shutdown(wait=True)
        self._release_lock()

    def _group_ended(self) -> None:
        self._pending.clear()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the lock
            self._lock = None

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

    async def append(self, stream: str, parsed: Parsed, received_at: float, scope: str | None = None) -> AppendResult:
        """Commit one request's elements durably (one batch row, its dedup keys, intake dead letters); returns
        after the fsync. Keys are deduplicated within `scope` (the stream's path: renaming a stream keeps its
        keys), by default the stream's name."""
        if self.over_cap:
            raise JournalFull(f"the journal is over its cap ({self.max_bytes} bytes)")
        scope = scope or stream
        shared = self.shared if self.dedup.enabled else None
        elsewhere = await shared.seen(scope, parsed.keys) if shared is not None else frozenset()
        batch = _Batch(stream, scope, parsed, received_at, elsewhere)
        result: AppendResult = await self._write_batch(self._write_batches, batch)
        if shared is not None and batch.keys:  # only now, after the commit: a failure here can cause a duplicate,
            await shared.mark(scope, batch.keys)  # never a loss
        return result

    def _write_batches(self, conn: sqlite3.Connection, batches: list[_Batch]) -> list[AppendResult]:
        """Requests' batches in one INSERT per table: a batch row each, their keys in one `dedup_log` row per
        scope, the intake's dead letters (writer thread, in commit order, so a key in two of them is a duplicate
        in the second)."""
        rows: list[tuple[int, int, str, str | None, float, bytes, bytes]] = []
        letters: list[tuple[None, str, bytes, str, float, None]] = []
        logged: dict[str, tuple[float, list[str]]] = {}
        results: list[AppendResult] = []
        for batch in batches:
            parsed, at = batch.parsed, batch.received_at
            fresh = self._fresh(batch) if self.dedup.enabled else None
            indexes = range(len(parsed)) if fresh is None else fresh
            count = len(indexes)
            if count:
                if fresh is None:  # copies: the row outlives the call, whatever its caller does with `parsed`
                    raws, actions, times = list(parsed.raws), list(parsed.actions), list(parsed.times)
                else:
                    raws = [parsed.raws[i] for i in fresh]
                    actions = [parsed.actions[i] for i in fresh]
                    times = [parsed.times[i] for i in fresh]
                lines = b"\n".join(raws)
                rows.append(batch_row(self._pack, self._next_seq, batch.stream, None, at, lines, actions, times))
                size = len(lines) - count + 1
                if count > DEFER_MAX_EVENTS:
                    events = _events(batch.stream, self._next_seq, raws, actions, times, at)
                    batch.row = Row(batch.stream, None, events, size)
                else:
                    if 2 * size < parsed.held:  # views keeping a body twice their size alive (duplicates, padding)
                        raws = [bytes(raw) for raw in raws]
                    batch.row = Row.deferred(batch.stream, self._next_seq, (raws, actions, times, at), size)
                self._next_seq += count
                batch.size = len(rows[-1][6])
                if self.dedup.enabled:
                    batch.keys = [key for key in (parsed.keys[i] for i in indexes) if key is not None]
                    if batch.keys:
                        latest, keys = logged.setdefault(batch.scope, (at, []))
                        keys += batch.keys
                        # The row's time is its latest key's: pruned no earlier than any key in it is due.
                        logged[batch.scope] = (max(latest, at), keys)
            letters.extend((None, batch.stream, item.raw, item.reason, at, None) for item in parsed.rejected)
            results.append(AppendResult(count, len(parsed) - count, len(parsed.rejected)))
        conn.executemany(INSERT_BATCH, rows)
        if logged:
            conn.executemany(
                "INSERT INTO dedup_log (stream, at, keys) VALUES (?, ?, ?)",
                [(scope, at, orjson.dumps(keys)) for scope, (at, keys) in logged.items()],
            )
        if letters:
            conn.executemany(INSERT_DEAD_LETTER, letters)
        self._after_commit.append(lambda: self._committed(batches))
        return results

    def _fresh(self, batch: _Batch) -> list[int] | None:
        """Indexes of a batch's elements not seen before (None: all), their keys pending until the commit."""
        pending = self._pending.setdefault(batch.scope, set())
        taken: list[int] = []
        fresh = self.dedup.fresh(batch.scope, batch.parsed.keys, batch.received_at, pending, taken)
        if taken:
            self._undo.append(lambda: pending.difference_update(taken))
        if batch.elsewhere:  # seen by another replica within the window: a duplicate here too
            keys = batch.parsed.keys
            fresh = [
                i
                for i in (range(len(keys)) if fresh is None else fresh)
                if keys[i] is None or keys[i] not in batch.elsewhere
            ]
        return fresh

    def _committed(self, batches: list[_Batch]) -> None:
        for batch in batches:
            self.size_bytes += batch.size
            if batch.keys:
                self.dedup.add(batch.scope, batch.keys, batch.received_at)
            if batch.row is not None:  # the events as a read would give them back, for the sinks caught up
                self._published.append(batch.row)

    def _publish(self, published: list[Row]) -> None:
        self._recent.extend(published)
        self._recent_bytes += sum(row.cost for row in published)
        while self._recent_bytes > RECENT_BYTES and len(self._recent) > 1:
            self._recent_bytes -= self._recent.popleft().cost

    def recent_rows(self, after: int, limit: int) -> list[Row] | None:
        """What `read_rows` would give, from the rows this process committed last (kept in memory, up to
        RECENT_BYTES): None when they do not hold the event after `after`, for the caller to read the journal.
        Only contiguous rows are given: rows another process wrote (`dlq replay`) are read from the journal."""
        recent = self._recent
        index = len(recent) - 1
        while index >= 0 and recent[index].first > after + 1:  # sinks caught up ask for the newest
            index -= 1
        if index < 0 or recent[index].last <= after:
            return None
        row = recent[index]
        if row.first <= after:  # the row `after` falls in: only its events past `after`
            events = row.events[after + 1 - row.first :]
            row = Row(row.stream, row.target, events, sum(len(event.raw) for event in events))
        found = [row]
        count = row.count
        for following in range(index + 1, len(recent)):
            if count >= limit or recent[following].first != found[-1].last + 1:
                break
            found.append(recent[following])
            count += recent[following].count
        return found

    async def probe(self) -> bool:
        """Whether a write commits now (readiness). After the disk was full, the probe writes PROBE_ROOM
        bytes, so readiness returns only when there is room for requests again, not just for a probe."""
        room = b"\0" * PROBE_ROOM if self.disk_full else b""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (room or time.time(),))

        try:
            await self._write(write, proves_room=bool(room))
            if room:
                await self._write(lambda conn: conn.execute("DELETE FROM meta WHERE key = 'probe'"))
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

    async def load_meta(self, key: str) -> Any:
        """A JSON value kept in the journal's `meta` table (None when absent)."""

        def read(conn: sqlite3.Connection) -> Any:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return orjson.loads(row[0]) if row else None

        return await self._read(read)

    async def store_meta(self, key: str, value: Any) -> None:
        """Keep a JSON value in the `meta` table."""
        data = orjson.dumps(value)
        await self._write(lambda conn: conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, data)))

    async def scan_actions(self, after: int, upto: int) -> list[tuple[int, str, str | None, list[str]]]:
        """(first seq, stream, target, actions) of the batch rows holding events in (after, upto]: the
        actions only, without reading or decompressing the events."""

        def read(conn: sqlite3.Connection) -> list[tuple[int, str, str | None, list[str]]]:
            rows = conn.execute(
                f"SELECT first_seq, stream, target, meta FROM batches WHERE {ROWS_AFTER} "  # noqa: S608
                "AND first_seq <= ?2 ORDER BY first_seq",
                (after, upto),
            )
            return [(first, stream, target, orjson.loads(meta)[0]) for first, stream, target, meta in rows]

        return await self._read(read)

    async def count_after(self, after: int, streams: Iterable[str], sink: str) -> int:
        """Events after `after` that `sink` is to be given: those of `streams`, and those replayed for it."""
        names = sorted(streams)
        marks = ",".join("?" * len(names))  # placeholders only: the names are bound parameters
        query = (
            "SELECT coalesce(sum(last_seq - max(first_seq, ?1 + 1) + 1), 0) FROM batches "  # noqa: S608
            f"WHERE {ROWS_AFTER} AND (target = ?2 OR (target IS NULL AND stream IN ({marks})))"
        )

        def count(conn: sqlite3.Connection) -> int:
            row = conn.execute(query, (after, sink, *names)).fetchone()
            return int(row[0])

        return await self._read(count)

    async def start_cursors(self, sinks: Sequence[str], seq: int) -> None:
        """Put sinks at `seq` (a sink a reload adds starts at the journal's end, whatever cursor it had when a
        stream last fed it)."""
        if sinks:
            await self._write(
                lambda conn: conn.executemany(
                    "INSERT INTO cursors (sink, seq) VALUES (?, ?) ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq",
                    [(sink, seq) for sink in sinks],
                )
            )

    async def drop_cursors(self, sinks: Sequence[str]) -> None:
        """Forget removed sinks' cursors (what they owed is theirs no more)."""
        await self._write(
            lambda conn: conn.executemany("DELETE FROM cursors WHERE sink = ?", [(sink,) for sink in sinks])
        )

    async def read(self, after: int, limit: int) -> list[tuple[Event, str | None]]:
        """At least `limit` events after `after` (whole batch rows, so possibly more), in order, whatever their
        stream, each with its target: the one sink a replayed event is meant for, or None when it is for every
        sink of its stream."""
        return [(event, row.target) for row in await self.read_rows(after, limit) for event in row.events]

    async def read_rows(self, after: int, limit: int) -> list[Row]:
        """`read`, batch row by batch row: what a row's events share is given once, for the reader to decide
        on a whole row at a time."""

        def read(conn: sqlite3.Connection) -> list[Row]:
            rows = conn.execute(
                f"SELECT first_seq, stream, target, received_at, meta, data FROM batches WHERE {ROWS_AFTER} "  # noqa: S608
                "ORDER BY first_seq",
                (after,),
            )
            found: list[Row] = []
            count = 0
            for first, stream, target, received_at, meta, stored in rows:
                actions, times = orjson.loads(meta)
                # Rows are zstd frames, except those written uncompressed (`dlq replay`, earlier versions).
                data = self._unpack(stored) if stored[:4] == ZSTD_MAGIC else stored
                raws = data.split(b"\n")
                skip = max(0, after + 1 - first)  # the row `after` falls in: only its events past `after`
                kept = raws[skip:]
                events = _events(stream, first + skip, kept, actions[skip:], times[skip:], received_at)
                row = Row(stream, target, events, sum(map(len, kept)))
                if row.events:
                    found.append(row)
                    count += len(row.events)
                if count >= limit:
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
            for event, reason in dead:
                insert_dead_letters(conn, sink, event.stream, now, [(event.raw, reason, (event.action, event.time))])
            conn.execute(
                "INSERT INTO cursors (sink, seq) VALUES (?, ?) ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq",
                (sink, seq),
            )
            self._free_passed(conn, active_sinks)

        await self._write(write)

    def _free_passed(self, conn: sqlite3.Connection, active_sinks: Sequence[str]) -> None:
        """Delete the batch rows every active sink is past (all of them when no sink is active)."""
        marks = [
            row[0]
            for row in conn.execute(
                f"SELECT seq FROM cursors WHERE sink IN ({','.join('?' * len(active_sinks))})",  # noqa: S608
                tuple(active_sinks),
            )
        ]
        if len(marks) != len(active_sinks):
            return
        mark = min(marks) if marks else self._next_seq
        freed = conn.execute(
            "DELETE FROM batches WHERE first_seq <= ? AND last_seq <= ? RETURNING length(data)", (mark, mark)
        ).fetchall()
        if freed:
            size = sum(row[0] for row in freed)
            self._after_commit.append(lambda: setattr(self, "size_bytes", self.size_bytes - size))

    async def free_passed(self, active_sinks: Sequence[str]) -> None:
        """Free what the active sinks are all past (after a reload removed a sink that was behind)."""
        await self._write(lambda conn: self._free_passed(conn, active_sinks))

    async def prune_dedup(self, now: float | None = None) -> None:
        """Forget dedup keys older than the window, and recount the backlog (`dlq replay` adds to it from
        another process)."""
        moment = time.time() if now is None else now

        def write(conn: sqlite3.Connection) -> None:
            self.dedup.expire(moment)
            conn.execute("DELETE FROM dedup_log WHERE at < ?", (self.dedup.cutoff(moment),))
            total = backlog_bytes(conn)
            self._after_commit.append(lambda: setattr(self, "size_bytes", total))

        await self._write(write)

    def _load_dedup(self, conn: sqlite3.Connection, now: float) -> None:
        """Rebuild the dedup index from the keys of the window (a journal of an earlier version: from its
        `dedup` table, which is then dropped)."""
        if not self.dedup.enabled:
            return
        cutoff = self.dedup.cutoff(now)
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dedup'").fetchone():
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute("SELECT stream, key, seen FROM dedup WHERE seen >= ?", (cutoff,)).fetchall()
            conn.executemany(
                "INSERT INTO dedup_log (stream, at, keys) VALUES (?, ?, ?)",
                [(stream, seen, orjson.dumps([key])) for stream, key, seen in rows],
            )
            conn.execute("DROP TABLE dedup")
            conn.execute("COMMIT")
        for stream, at, keys in conn.execute(
            "SELECT stream, at, keys FROM dedup_log WHERE at >= ? ORDER BY at", (cutoff,)
        ):
            # Rows written before keys were scoped by stream path name the stream: map them to its path.
            self.dedup.add(self.dedup_scopes.get(stream, stream), orjson.loads(keys), at)

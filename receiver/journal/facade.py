"""The journal's asynchronous façade: the API of the intake (append, probe) and of the delivery engine (read,
cursors, progress), over the group-commit writer and one reader thread."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
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
from receiver.journal.dead_letters import CHUNK_BYTES
from receiver.journal.schema import (
    COMPRESSION_LEVEL,
    DEAD_LETTER_BYTES,
    DEAD_LETTERS_TAKEN,
    INSERT_DEAD_LETTER,
    ZSTD_MAGIC,
    DeadLettersFull,
    DiskFull,
    connect,
    disk_error,
    insert_dead_letters,
    last_seq,
    letter_bytes,
    open_problem,
    store_last_seq,
)
from receiver.journal.segments import SEGMENT_BYTES, Damaged, Record, SegmentLog, missing, record_meta
from receiver.journal.writer import GroupWriter, _Job
from receiver.parsing import Parsed
from sinks.base import Event

if TYPE_CHECKING:
    from receiver.dedup_store import RedisDedupStore

T = TypeVar("T")

log = logging.getLogger("receiver.journal")

WRITER_CACHE_KIB = 8 * 1024
"""The writer's page cache (SQLite's default is 2 MiB)."""


MAINTAIN_EVERY = 1.0
"""Seconds between WAL checkpoints (when something was committed) and looks for what `dlq replay` put back."""

REPLAY_ROWS = 1000
"""Replayed dead letters appended to the journal per write (fewer when they hold more than CHUNK_BYTES)."""

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
"""Bytes a readiness probe writes to SQLite after the disk was full (a request's dead letters go there), and
what it reserves in the segments' directory besides the largest body (`Journal.room`: a record's meta)."""

SPARE_BYTES = 4 * 1024 * 1024
"""Room kept allocated beside the segments (`SegmentLog.keep_spare`) and given up when a sink's progress
cannot commit for lack of space, so that the cursor moves and the segments it passed are unlinked: on a full
disk SQLite cannot grow its WAL, nor the database to checkpoint it. A few cursor commits and a checkpoint take
tens of KiB; 4 MiB holds the dedup keys the mark copies to `dedup_log` while it passes a whole segment
(SEGMENT_BYTES of events), after which that segment is freed."""

SPARE_RETRY = 0.25
"""Seconds between tries to allocate the spare room again while it is missing (requests wait for it)."""

DEFAULT_MAX_DEAD_LETTER_BYTES = 256 * 1024 * 1024
"""`journal.max_dead_letter_bytes` by default."""

HELD_BYTES = 8 * 1024 * 1024
"""Most memory the dedup keys of appended records take while held until the mark passes them (their bytes and
KEY_COST each: ≈ 90 k keys of 32 characters): what sinks that keep up pass is copied to `dedup_log` without
reading the records back (≈ 12 µs a record); past it (a sink behind) the records are read back as the mark
reaches them. A bound in bytes, not in keys: a sender's keys may be long."""

KEY_COST = 57
"""Memory of a held key besides its characters: the str object and its place in a list."""

PLAIN_BELOW = 32 * 1024 * 1024
"""While the backlog is under this many bytes, a record's events are written plain: a sink that keeps up
delivers them within seconds and the segment is unlinked, so compressing them would cost CPU for nothing; past
it (a sink behind or down) they are a zstd frame, a fifth to a tenth of that, so `max_bytes` holds a long
outage. A journal whose `max_bytes` is under four times this compresses past a quarter of its cap. (The meta
is always a frame: see `record_meta`.)"""


def _lock_exclusively(path: Path) -> list[IO[bytes] | int]:
    """Hold `<journal>.lock` and the segments' directory for the life of the process: two services on one
    journal would each keep their own dedup index and sequence, and append over each other's records, so the
    second is refused. The directory's lock holds when the lock file was removed (taken for a stale one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    real = path.resolve()  # the same database reached through a symlink takes the same lock
    segments = real.with_name(real.name + ".segments")
    segments.mkdir(exist_ok=True)
    handle = (real.parent / (real.name + ".lock")).open("a+b")
    held: list[IO[bytes] | int] = [handle]
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        directory = os.open(segments, os.O_RDONLY | os.O_DIRECTORY)
        held.append(directory)
        try:
            fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise
        except OSError:  # NFS emulates flock with fcntl locks, which a directory cannot take: the file's holds
            held.pop()
            os.close(directory)
    except BlockingIOError:
        _unlock(held)
        raise JournalError(
            f"cannot open the journal {path}: another log-bridge process is serving from it (it holds "
            f"{path.name}.lock and {segments.name}/; a lock ends with that process, so removing a file frees nothing)"
        ) from None
    except BaseException:
        _unlock(held)
        raise
    return held


def _unlock(held: list[IO[bytes] | int]) -> None:
    """Close what `_lock_exclusively` opened: closing a descriptor releases its lock."""
    for item in held:
        if isinstance(item, int):
            os.close(item)
        else:
            item.close()


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
    prints: list[int] = field(default_factory=list)
    """Their fingerprints in the dedup index, as `fresh` took them (set by the writer)."""
    size: int = 0
    """Bytes stored (set by the writer)."""
    record: int = -1
    """Its record's index in the group's records, when it has one (set by the writer)."""
    seqs: tuple[int, int] = (0, 0)
    """Its record's first and last seq (set by the writer)."""
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

    @classmethod
    def gap(cls, stream: str, first: int, last: int) -> Row:
        """Seqs `first..last` that hold no event to deliver (a damaged record): a reader moves past them."""
        row = cls(stream, None, [], 0)
        row.first, row.count = first, last - first + 1
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


def _keys_cost(keys: list[str]) -> int:
    """The memory held keys take, for the HELD_BYTES bound."""
    return sum(map(len, keys)) + KEY_COST * len(keys)


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


@dataclass(slots=True)
class _Replay:
    """Dead letters `dlq replay` put back, on their way to the segments: (id, target, stream, data, action,
    time) each."""

    rows: list[tuple[int, str, str, bytes, str, float]]
    received_at: float


def _next_replays(conn: sqlite3.Connection, targets: Sequence[str]) -> list[Any]:
    """The oldest replays for these targets: REPLAY_ROWS at most, holding CHUNK_BYTES at most, but at least one,
    so that what the service holds and writes at once stays bounded however large the dead letters are."""
    marks = ",".join("?" * len(targets))
    sizes = f"SELECT id, length(data) FROM replays WHERE target IN ({marks}) ORDER BY id LIMIT ?"  # noqa: S608
    ids: list[int] = []
    held = 0
    for replay_id, size in conn.execute(sizes, (*targets, REPLAY_ROWS)):
        held += int(size)
        if ids and held > CHUNK_BYTES:
            break
        ids.append(int(replay_id))
    if not ids:
        return []
    columns = "id, target, stream, data, action, time"
    query = f"SELECT {columns} FROM replays WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id"  # noqa: S608
    return conn.execute(query, ids).fetchall()


def _deleting_replays(ids: list[int]) -> Callable[[sqlite3.Connection], None]:
    def delete(conn: sqlite3.Connection) -> None:
        conn.executemany("DELETE FROM replays WHERE id = ?", [(i,) for i in ids])

    return delete


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one request's batch became."""

    accepted: int
    duplicates: int
    dead_lettered: int


class Journal(GroupWriter):
    """The journal of one process. Writes go through one thread (group commit); reads through another."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        dedup_window: float,
        dedup_max_keys: int = DEFAULT_DEDUP_MAX_KEYS,
        largest_body: int = 0,
        max_dead_letter_bytes: int = DEFAULT_MAX_DEAD_LETTER_BYTES,
    ) -> None:
        super().__init__()
        self.path = path
        self.max_bytes = max_bytes
        self.max_dead_letter_bytes = max_dead_letter_bytes
        """`journal.max_dead_letter_bytes` (a reload sets it): past it no request's dead letter is taken, and a
        sink's permanent failures are held and retried instead of dead-lettered."""
        self._dead_letters_added = 0
        """Bytes of the dead letters committed since open (writer thread, after each commit): only ever added to."""
        self._dead_letters_base = 0
        """`dead_letter_bytes` less `_dead_letters_added`, set by a count of the table (event loop)."""
        self._dead_letters_refused = False
        """Whether dead letters were refused (at their cap) since the last recount: it is what `dlq purge`
        frees room for, even when the count is below the cap (a request's letters would take it past)."""
        self.largest_body = largest_body
        """`server.max_body_bytes` (a reload sets it): what `room` is reckoned from."""
        self.dedup = DedupIndex(dedup_window, dedup_max_keys)
        self._pending: dict[str, set[int]] = {}
        """Fingerprints taken by the jobs of the commit group being written (writer thread only)."""
        self._pack = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL).compress  # writer thread only
        self._unpack = zstandard.ZstdDecompressor().decompress  # reader thread only
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        self.segments = SegmentLog(path.with_name(path.name + ".segments"))
        self._mark = 0
        """The seq every active sink is past, as last committed: records at or before it are delivered."""
        self._group_mark = 0
        """The mark as the commit group being written moves it (writer thread)."""
        self._held: deque[tuple[int, int, str, float, list[str]]] = deque()
        """(first seq, last seq, scope, received_at, keys) of the records with keys this process appended, in
        order, until the mark passes them, up to HELD_BYTES (writer thread)."""
        self._held_from = 0
        """Every record with keys whose last seq is past this one is in `_held`, but those a read found damaged
        (left out, as a read back would leave them)."""
        self._held_bytes = 0
        """What the keys in `_held` take (`_keys_cost`)."""
        self._read_conn: sqlite3.Connection | None = None
        self.size_bytes = 0
        self._lock: list[IO[bytes] | int] | None = None
        self.dedup_scopes: dict[str, str] = {}
        """Stream name -> dedup scope (its path), for keys stored by name by earlier versions."""
        self._maintenance: asyncio.Task[None] | None = None
        self._ingesting = asyncio.Lock()
        self._kept_damage: set[str] = set()
        """Places of damaged records this process has kept aside already."""
        self.damage_kept = 0
        """Dead letters of damaged journal bytes kept by this process (at open, and by reads since)."""
        self.on_damage: Callable[[int], object] = lambda count: None
        """Called with how many such dead letters a read kept, once they are committed (metrics)."""
        self._replayed: set[int] = set()
        """Ids of `replays` rows appended but not yet deleted there."""
        self.replay_sinks: frozenset[str] | None = None
        """The sinks whose replayed dead letters are taken from `replays`: the active ones (the delivery engine
        sets them; None until it has: none taken). Those of other sinks stay there: appended for a sink nothing
        delivers to, the mark would pass them and they would be lost; a later configuration that feeds the sink
        takes them."""
        self._told_waiting: set[str] = set()
        """Sinks whose waiting replays this process has logged (once each)."""
        self._recent: deque[Row] = deque()
        """The rows committed last by this process, oldest first (event loop only)."""
        self._recent_bytes = 0
        self.shared: RedisDedupStore | None = None
        """The dedup store shared with other replicas (journal.dedup_store), consulted besides the local index."""
        self.spare_held = False
        """Whether SPARE_BYTES are allocated beside the segments (writer thread, once open)."""
        self._spare_tried = 0.0
        """When the spare room was last tried while missing (monotonic)."""
        self._stored_end = 0
        """The last seq `meta` (`last_seq`) says was appended: kept up within MAINTAIN_EVERY, so that a start
        knows which events the segments must hold (writer thread, once open)."""

    # --- life cycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the database and the segments and start the writer thread; a journal another process
        has open is refused (only one process may append to the segments). Raises JournalError naming the path
        and the reason."""
        conn = None
        try:
            self._lock = await asyncio.to_thread(_lock_exclusively, self.path)
            # Beside the database itself, however it is reached (a symlink): one journal, one set of segments.
            real = self.path.resolve()
            self.segments = SegmentLog(real.with_name(real.name + ".segments"))
            new_database = not await asyncio.to_thread(self.path.exists)
            conn = await asyncio.to_thread(connect, self.path, WRITER_CACHE_KIB)
            self._read_conn = await asyncio.to_thread(connect, self.path)
            metas = await asyncio.to_thread(self._open_segments, conn)
            if new_database and self.segments.last_seq:
                log.warning(
                    "journal: a new database beside segments that hold events (the database was removed or moved): "
                    "every sink delivers those events again from the start, and the dead letters it held are gone",
                    extra={"database": str(self.path), "segments": str(self.segments.directory)},
                )
            self.spare_held = await asyncio.to_thread(self.segments.keep_spare, SPARE_BYTES)
            if not self.spare_held:  # requests wait until it is: delivery frees room first
                log.warning("journal: the disk lacks room for the journal's spare room", extra={"bytes": SPARE_BYTES})
            mark = conn.execute("SELECT value FROM meta WHERE key = 'mark'").fetchone()
            self._mark = int(mark[0]) if mark else 0
            # Events appended and not delivered that no segment holds (files removed, cut, an older backup
            # copied back while it was stopped): lost, so said, not passed over in silence.
            self.segments.damaged += missing(self._mark, last_seq(conn), self.segments.segments, self.segments.damaged)
            if self.segments.damaged:
                await asyncio.to_thread(self._keep_opened_damage, conn)
            cursors = conn.execute("SELECT coalesce(max(seq), 0) FROM cursors").fetchone()[0]
            # Numbers never go back, even past records a damaged disk lost: nothing may reuse a seq a cursor or
            # the mark has passed (a sink would skip the event).
            self._next_seq = max(self.segments.last_seq, last_seq(conn), self._mark, int(cursors)) + 1
            self.last_seq = self._held_from = self._next_seq - 1
            if self.last_seq > last_seq(conn):
                await asyncio.to_thread(store_last_seq, conn, self.last_seq)
            self._stored_end = self.last_seq
            self.size_bytes = self.segments.bytes_after(self._mark)
            self._dead_letters_base = int(conn.execute(DEAD_LETTER_BYTES).fetchone()[0])
            await asyncio.to_thread(self._load_dedup, conn, time.time(), metas)
        except (OSError, sqlite3.Error) as exc:
            self.segments.close()
            for opened in (conn, self._read_conn):
                if opened is not None:
                    opened.close()
            self._read_conn = None
            self._release_lock()
            raise JournalError(f"cannot open the journal {self.path}: {open_problem(exc, self.path)}") from None
        self._start_writer(conn)
        self._maintenance = asyncio.create_task(self._maintain_forever(), name="journal-maintenance")

    def _keep_opened_damage(self, conn: sqlite3.Connection) -> None:
        """Keep aside what the segments' recovery found damaged (before the writer thread starts)."""
        conn.execute("BEGIN IMMEDIATE")
        kept = self._keep_damage(conn, self.segments.damaged)
        conn.execute("COMMIT")
        self.damage_kept += kept
        self.segments.damaged.clear()

    def _open_segments(self, conn: sqlite3.Connection) -> list[Record]:
        """Open the segments, moving in the batch rows of an earlier version's journal (kept under their seqs,
        so the cursors still point where they did). Every record's meta, for the dedup index."""
        legacy = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'batches'").fetchone()
        rows = []
        if legacy:
            rows = conn.execute(
                "SELECT first_seq, stream, target, received_at, meta, data FROM batches ORDER BY first_seq"
            ).fetchall()
        floor = rows[0][0] - 1 if rows else last_seq(conn)
        metas = self.segments.open(floor)
        if legacy:
            records: list[tuple[int, int, int, bytes, bytes]] = []
            held = 0
            moved = self.segments.last_seq
            for first, stream, target, received_at, meta, data in rows:
                actions, times = orjson.loads(meta)
                if first <= moved:  # moved already, by an open that stopped before dropping the table
                    continue
                route = self.segments.route(stream, target)
                meta_bytes = record_meta(stream, target, received_at, actions, times)
                records.append((first, first + len(actions) - 1, route, meta_bytes, data))
                held += len(data)
                if held >= SEGMENT_BYTES:
                    self.segments.append(records)
                    records, held = [], 0
            if records:
                self.segments.append(records)
            conn.execute("DROP TABLE batches")  # only once its rows are durable in the segments
            store_last_seq(conn, max(last_seq(conn), self.segments.last_seq))
        return metas

    async def _maintain_forever(self) -> None:
        """Every MAINTAIN_EVERY seconds: append what `dlq replay` put back, recount the dead letters while some
        are refused (`dlq purge` may have freed room), and copy the WAL into the database when something was
        committed (from the reader's connection, so the checkpoint SQLite runs inside a commit once the WAL holds
        1,000 pages has only the last few pages to copy)."""
        done = -1
        failed = False
        taken = None
        while True:
            try:
                moved = await self.ingest_replays()
                # Another process may have taken some away (`dlq replay`, `dlq purge`, which say so in `meta`):
                # look then, and while any is refused.
                refused, self._dead_letters_refused = self._dead_letters_refused, False
                seen, taken = taken, await self.load_meta(DEAD_LETTERS_TAKEN)
                if moved or refused or seen != taken or self.dead_letter_bytes >= self.max_dead_letter_bytes:
                    await self._recount_dead_letters()
            except (JournalError, sqlite3.Error) as exc:
                log.warning("journal: cannot take replayed dead letters yet; will retry", extra={"error": str(exc)})
            if self.last_seq > self._stored_end:  # no sink's progress carried it (all of them down)
                with contextlib.suppress(JournalError):  # a full disk: tried again in a second, and at close
                    await self._write(self._store_end)
            if self.commits != done or failed:
                done = self.commits
                try:
                    await self._read(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
                except sqlite3.Error as exc:  # a full disk: the WAL keeps the data; try again later
                    if not failed:
                        log.warning("journal checkpoint failed; will retry", extra={"error": str(exc)})
                    failed = True
                else:
                    failed = False
            await asyncio.sleep(MAINTAIN_EVERY)

    async def close(self) -> None:
        """Finish queued writes, then close both connections."""
        if self._closed:
            return
        self._closed = True
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # its own failure is not the close's
                await self._maintenance
        await self._stop_writer()
        if self._read_conn is not None:
            conn = self._read_conn
            await asyncio.get_running_loop().run_in_executor(self._reader, conn.close)
        self._reader.shutdown(wait=True)
        self._release_lock()

    def _room_for_batches(self) -> bool:
        """Requests take disk space only while the spare room is held: once a full disk made the journal give
        it up, it is allocated again before any request, so that the room delivery frees goes to it first."""
        if self.spare_held:
            return True
        now = time.monotonic()
        if now - self._spare_tried < SPARE_RETRY:
            return False
        self._spare_tried = now
        self._restore_spare()
        return self.spare_held

    def _restore_spare(self) -> None:
        try:
            self.spare_held = self.segments.keep_spare(SPARE_BYTES)
        except OSError as exc:
            log.error("journal: cannot allocate the spare room", extra={"error": str(exc)})
        if self.spare_held:
            log.warning("journal: the spare room is allocated again; requests are taken")

    def _release_spare(self) -> bool:
        released = self.segments.release_spare()
        self.spare_held = False
        if released:
            log.warning(
                "journal: the disk is full; its spare room is given up for the sinks' progress, and requests wait "
                "until delivered segments free the disk"
            )
        return released

    def _rolled_back(self) -> None:
        self._group_mark = 0  # the mark it moved is not committed: a job run again must move it, keys and all

    def _group_ended(self) -> None:
        self._pending.clear()
        self._group_mark = 0

    def _last_write(self, conn: sqlite3.Connection) -> None:
        if self.last_seq > self._stored_end:  # a statement of its own (autocommit)
            store_last_seq(conn, self.last_seq)
            self._stored_end = self.last_seq

    def _writer_closed(self) -> None:
        self.segments.close()

    def _store_end(self, conn: sqlite3.Connection) -> None:
        """Keep the last seq appended in `meta`, in the writer's transaction (writer thread)."""
        end = self.last_seq
        if end > self._stored_end:
            store_last_seq(conn, end)
            self._after_commit.append(lambda: setattr(self, "_stored_end", max(self._stored_end, end)))

    def _release_lock(self) -> None:
        if self._lock is not None:
            _unlock(self._lock)
            self._lock = None

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._read_conn is None:
            raise JournalClosed("the journal is closed")
        conn = self._read_conn
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)

    # --- intake ------------------------------------------------------------------------------------

    @property
    def room(self) -> int:
        """What a readiness probe after a full disk reserves beside the segments: the largest request's record
        (its events take at most its body, their meta at most as much again: keys are at most
        MAX_KEY_CHARS), so that readiness returns only when such a request fits again, not just the probe."""
        return 2 * self.largest_body + PROBE_ROOM

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
        dead_bytes = sum(letter_bytes(item.raw, item.reason, stream) for item in parsed.rejected)
        if parsed.rejected and not self.takes_dead_letters(dead_bytes):
            raise DeadLettersFull(
                f"the journal's dead letters are at their cap ({self.max_dead_letter_bytes} bytes): a request with "
                "elements to dead-letter is refused until `log-bridge dlq replay` or `dlq purge` takes some away"
            )
        scope = scope or stream
        shared = self.shared if self.dedup.enabled else None
        elsewhere = await shared.seen(scope, parsed.keys) if shared is not None else frozenset()
        batch = _Batch(stream, scope, parsed, received_at, elsewhere)
        store = self._store_rejects(stream, received_at, parsed.rejected, dead_bytes) if parsed.rejected else None
        result: AppendResult = await self._write_batch(batch, store)
        if shared is not None and batch.keys:  # only now, after the commit: a failure here can cause a duplicate,
            await shared.mark(scope, batch.keys)  # never a loss
        return result

    def takes_dead_letters(self, size: int) -> bool:
        """Whether `size` more bytes of dead letters stay within `max_dead_letter_bytes`, or there are none: what
        passes the cap alone is taken then, or it would be refused for ever with nothing a purge could delete."""
        if self.dead_letter_bytes + size <= self.max_dead_letter_bytes or not self.dead_letter_bytes:
            return True
        self._dead_letters_refused = True
        return False

    @property
    def dead_letter_bytes(self) -> int:
        """What the dead letters take in the journal (`letter_bytes` each): counted as they are committed,
        counted again after `dlq replay` or `dlq purge` (other processes) took some away."""
        return self._dead_letters_base + self._dead_letters_added

    async def _recount_dead_letters(self) -> None:
        # On the reader's connection, not in the writer (a count of 256 MiB of letters takes 140-170 ms, which
        # would stall every commit behind it). The count sees the commits before its snapshot; those whose
        # hooks ran after `since` are added on top, so none is lost (one that committed before the snapshot
        # with its hook still to run is counted twice, until the next count: never an undercount). Each of the
        # two parts has one writer: the hooks add, the loop sets the base.
        def count(conn: sqlite3.Connection) -> tuple[int, int]:
            since = self._dead_letters_added
            return since, int(conn.execute(DEAD_LETTER_BYTES).fetchone()[0])

        since, counted = await self._read(count)
        self._dead_letters_base = counted - since

    def _count_dead_letters(self, size: int) -> None:
        """Count dead letters once their transaction commits (writer thread)."""
        self._after_commit.append(lambda: setattr(self, "_dead_letters_added", self._dead_letters_added + size))

    def _store_rejects(
        self, stream: str, at: float, rejected: Sequence[Any], size: int
    ) -> Callable[[sqlite3.Connection], None]:
        """What stores the intake's dead letters of a request (`size` bytes of them), in its group's transaction
        (before its events are appended: a request whose events fail is answered 503 and retried, and its dead
        letters are then stored again, never lost)."""
        letters = [(None, stream, item.raw, item.reason, at, None) for item in rejected]

        def store(conn: sqlite3.Connection) -> None:
            conn.executemany(INSERT_DEAD_LETTER, letters)
            self._count_dead_letters(size)

        return store

    def _append_batches(self, jobs: list[_Job], outcomes: list[tuple[_Job, Any, BaseException | None]]) -> bool:
        """The group's batches as records, appended with one write and one fdatasync (writer thread, in commit
        order, so a key in two of them is a duplicate in the second)."""
        records: list[tuple[int, int, int, bytes, bytes]] = []
        kept: list[tuple[_Job, Any]] = []
        first = self._next_seq
        for job in jobs:
            undos, seq, held = len(self._undo), self._next_seq, len(records)
            try:
                if isinstance(job.bulk, _Replay):
                    result: Any = self._replay_records(job.bulk, records)
                else:
                    result = self._record(job.bulk, records)
            except Exception as exc:  # one request's failure must not sink the others in the group
                for undo in reversed(self._undo[undos:]):
                    undo()
                del self._undo[undos:], records[held:]
                self._next_seq = seq
                failure = exc if isinstance(exc, JournalError) else JournalError(f"journal write failed: {exc}")
                outcomes.append((job, None, failure))
                continue
            kept.append((job, result))
        self._undo.clear()
        if records:
            try:
                sizes = self.segments.append(records)
            except OSError as exc:
                self._next_seq = first
                failure = disk_error(exc)
                self._write_failed("append", "journal write failed", failure)
                self._disk_failed(failure)
                outcomes.extend((job, None, failure) for job, _ in kept)
                return False
            self._room_proven()
            self._write_went_through("append")
            self.size_bytes += sum(sizes)
            self.last_seq = self._next_seq - 1
        batches = [job.bulk for job, _ in kept if isinstance(job.bulk, _Batch)]
        for batch in batches:
            if batch.record >= 0:
                batch.size = sizes[batch.record]
        self._committed(batches)
        outcomes.extend((job, result, None) for job, result in kept)
        return bool(records)

    def _record(self, batch: _Batch, records: list[tuple[int, int, int, bytes, bytes]]) -> AppendResult:
        """Add a request's record (its events not seen before) to the group's; what the request became."""
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
            if self.dedup.enabled:
                keys = parsed.keys if fresh is None else [parsed.keys[i] for i in fresh]
                batch.keys = [key for key in keys if key is not None] if None in keys else list(keys)  # type: ignore[arg-type]
            lines = b"\n".join(raws)
            first = self._next_seq
            meta = record_meta(batch.stream, None, at, actions, times, batch.scope, batch.keys)
            route = self.segments.route(batch.stream, None)
            batch.record, batch.seqs = len(records), (first, first + count - 1)
            packed = self.size_bytes >= min(PLAIN_BELOW, self.max_bytes // 4)
            records.append((*batch.seqs, route, meta, self._pack(lines) if packed else lines))
            size = len(lines) - count + 1
            if count > DEFER_MAX_EVENTS:
                batch.row = Row(batch.stream, None, _events(batch.stream, first, raws, actions, times, at), size)
            else:
                if 2 * size < parsed.held:  # views keeping a body twice their size alive (duplicates, padding)
                    raws = [bytes(raw) for raw in raws]
                batch.row = Row.deferred(batch.stream, first, (raws, actions, times, at), size)
            self._next_seq += count
        return AppendResult(count, len(parsed) - count, len(parsed.rejected))

    def _replay_records(self, replay: _Replay, records: list[tuple[int, int, int, bytes, bytes]]) -> int:
        """Add a record for each replayed dead letter, for the sink that failed it."""
        for _, target, stream, data, action, moment in replay.rows:
            meta = record_meta(stream, target, replay.received_at, [action], [moment])
            records.append(
                (self._next_seq, self._next_seq, self.segments.route(stream, target), meta, self._pack(data))
            )
            self._next_seq += 1
        return len(replay.rows)

    async def ingest_replays(self) -> int:
        """Append what `dlq replay` put back (the `replays` table, written by another process) for the sinks in
        `replay_sinks` to the journal, then delete it there; how many. A crash in between replays them again: a
        duplicate, never a loss."""
        if self.replay_sinks is None:
            return 0
        async with self._ingesting:
            targets = sorted(self.replay_sinks)
            moved = await self._take_replays(targets) if targets else 0
            await self._tell_waiting(targets)
            return moved

    async def _take_replays(self, targets: Sequence[str]) -> int:
        moved: dict[str, int] = {}
        while True:
            rows = await self._read(lambda conn: _next_replays(conn, targets))
            if not rows:
                if moved:  # what another process did to the backlog is in this service's log too
                    log.info("journal: replayed dead letters appended for delivery", extra={"sinks": moved})
                return sum(moved.values())
            fresh = [(i, t, s, bytes(d), a, m) for i, t, s, d, a, m in rows if i not in self._replayed]
            if fresh:  # those appended already wait only for their delete (it failed before)
                await self._enqueue(None, True, _Replay(fresh, time.time()))
                self._replayed.update(row[0] for row in fresh)
            await self._write(_deleting_replays([row[0] for row in rows]))
            self._replayed.difference_update(row[0] for row in rows)
            for row in fresh:
                moved[row[1]] = moved.get(row[1], 0) + 1

    async def _tell_waiting(self, targets: Sequence[str]) -> None:
        """Log, once a sink per process, that replays wait for a sink no stream feeds here: kept, not lost."""
        marks = ",".join("?" * len(targets))
        query = "SELECT target, count(*) FROM replays"
        query += f" WHERE target NOT IN ({marks}) GROUP BY target" if targets else " GROUP BY target"
        waiting = await self._read(lambda conn: conn.execute(query, tuple(targets)).fetchall())
        for target, count in waiting:
            if target not in self._told_waiting:
                self._told_waiting.add(target)
                log.warning(
                    "journal: replayed dead letters wait for a sink no stream feeds; they are delivered once a "
                    "configuration feeds it",
                    extra={"sink": target, "waiting": count},
                )

    def _fresh(self, batch: _Batch) -> list[int] | None:
        """Indexes of a batch's elements not seen before (None: all), their keys pending until the commit."""
        pending = self._pending.setdefault(batch.scope, set())
        taken: list[int] = []
        fresh = self.dedup.fresh(batch.scope, batch.parsed.keys, batch.received_at, pending, taken)
        batch.prints = taken
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
        held = self._held
        for batch in batches:
            if batch.keys:
                self.dedup.add_prints(batch.scope, batch.prints, batch.received_at)
                held.append((*batch.seqs, batch.scope, batch.received_at, batch.keys))
                self._held_bytes += _keys_cost(batch.keys)
            if batch.row is not None:  # the events as a read would give them back, for the sinks caught up
                self._published.append(batch.row)
        while self._held_bytes > HELD_BYTES:  # a sink is behind: what the mark passes later is read back
            _, self._held_from, _, _, keys = held.popleft()
            self._held_bytes -= _keys_cost(keys)

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
        """Whether a write commits now (readiness). After the disk was full, the probe also reserves `room`
        bytes beside the segments (and writes PROBE_ROOM to SQLite), so readiness returns only when there is
        room for the largest request again, not just for a probe."""
        filler = b"\0" * PROBE_ROOM if self.room_owed else b""

        def write(conn: sqlite3.Connection) -> None:
            if not self._room_for_batches():  # requests are refused until the spare room is back
                raise DiskFull("the journal's disk is full")
            if filler:
                self.segments.reserve(self.room)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (filler or time.time(),))

        try:
            await self._write(write, proves_room=bool(filler))
            if filler:
                await self._write(lambda conn: conn.execute("DELETE FROM meta WHERE key = 'probe'"))
        except JournalError:
            return False
        return True

    # --- delivery ----------------------------------------------------------------------------------

    async def cursors(self, sinks: Iterable[str]) -> dict[str, int]:
        """Each sink's cursor (0 for a sink never seen); JournalError when it cannot be read (locked, the disk)."""
        names = list(sinks)

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            found = dict(conn.execute("SELECT sink, seq FROM cursors").fetchall())
            return {name: int(found.get(name, 0)) for name in names}

        try:
            return await self._read(read)
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from None

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
        """(first seq, stream, target, actions) of the records holding events in (after, upto]: the actions
        only, without decompressing the events."""

        def read() -> list[tuple[int, str, str | None, list[str]]]:
            found = self.segments.read(after, upto - after, skip_to=self._mark, upto=upto)
            return [
                (record.first, record.stream, record.target, record.actions)
                for record in found
                if isinstance(record, Record)  # a damaged record holds nothing to deliver
            ]

        return await self._in_reader(read)

    async def count_after(self, after: int, streams: Iterable[str], sink: str) -> int:
        """Events after `after` that `sink` is to be given: those of `streams`, and those replayed for it."""
        names = frozenset(streams)
        return await self._in_reader(lambda: self.segments.count_after(after, names, sink, skip_to=self._mark))

    async def _in_reader(self, fn: Callable[[], T]) -> T:
        if self._read_conn is None:
            raise JournalClosed("the journal is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, fn)
        except (OSError, ValueError, zstandard.ZstdError) as exc:  # the disk failed, or changed a record
            raise JournalError(f"journal read failed: {exc}") from None

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

    async def read_rows(self, after: int, limit: int, max_bytes: int | None = None) -> list[Row]:
        """`read`, record by record (a request's events): what a record's events share is given once, for the
        reader to decide on a whole row at a time. With `max_bytes`, it stops too once the rows hold that many
        bytes of events (at least one row), reading the segments that much at a time: fewer than `limit` events
        and fewer than `max_bytes` bytes means the journal has no more."""

        def read() -> tuple[list[Row], list[Damaged]]:
            found: list[Row] = []
            damaged: list[Damaged] = []
            position, count, size = after, 0, 0
            while count < limit and (max_bytes is None or size < max_bytes):
                records = self.segments.read(position, limit - count, skip_to=self._mark, max_bytes=max_bytes)
                for record in records:
                    start, position = position, record.last
                    if isinstance(record, Damaged):  # the disk changed it since it was written: kept aside, passed
                        damaged.append(record)
                        found.append(Row.gap(record.stream, max(record.first, start + 1), record.last))
                        count += found[-1].count
                        continue
                    # Records are zstd frames, or plain when the backlog was small (and rows an earlier version
                    # wrote uncompressed, `dlq replay`).
                    try:
                        data = self._unpack(record.data) if record.data[:4] == ZSTD_MAGIC else record.data
                    except zstandard.ZstdError as exc:  # its CRC matches: written so, which no version does
                        log.error(
                            "journal: a record's events cannot be decompressed; they are skipped",
                            extra={"first_seq": record.first, "last_seq": record.last, "error": str(exc)},
                        )
                        found.append(Row.gap(record.stream, max(record.first, start + 1), record.last))
                        count += found[-1].count
                        continue
                    raws = data.split(b"\n")
                    skip = max(0, start + 1 - record.first)  # the record `start` falls in: only its events past it
                    kept = raws[skip:]
                    events = _events(
                        record.stream,
                        record.first + skip,
                        kept,
                        record.actions[skip:],
                        record.times[skip:],
                        record.received_at,
                    )
                    if events:
                        found.append(Row(record.stream, record.target, events, sum(map(len, kept))))
                        count, size = count + len(events), size + found[-1].size
                    if max_bytes is not None and size >= max_bytes:
                        break
                if not records or max_bytes is None:
                    break
            return found, damaged

        rows, damaged = await self._in_reader(read)
        # A segment unlinked meanwhile held only what every active sink had: not damage (a reader behind the
        # mark is a sink a reload took away).
        fresh = [item for item in damaged if item.place not in self._kept_damage and item.last > self._mark]
        if fresh:
            kept = await self._write(lambda conn: self._keep_damage(conn, fresh))
            self._kept_damage.update(item.place for item in fresh)
            if kept:
                self.damage_kept += kept
                self.on_damage(kept)
        return rows

    def _keep_damage(self, conn: sqlite3.Connection, damaged: Sequence[Damaged]) -> int:
        """Keep damaged journal bytes aside as intake dead letters (not events: `dlq replay` leaves them), one
        per place, however often it is read or the service restarts: its events cannot be delivered, but what
        is left of them is kept, with where and why."""
        now, count = time.time(), 0
        self._forget_held(damaged)
        for item in damaged:
            place = item.place
            kept = "SELECT 1 FROM dead_letters WHERE sink IS NULL AND substr(reason, 1, ?) = ?"
            if conn.execute(kept, (len(place), place)).fetchone():
                continue
            count += 1
            if not item.segment:  # events no segment file holds (`missing`)
                log.error(
                    "journal events missing: no segment file holds events the journal had not delivered; kept as "
                    "a dead letter naming their seqs",
                    extra={"seqs": f"{item.first}-{item.last}", "segments": str(self.segments.directory)},
                )
            else:
                log.error(
                    "journal: damaged bytes kept aside as a dead letter",
                    extra={"segment": item.segment, "offset": item.offset, "bytes": len(item.raw), "why": item.why},
                )
            insert_dead_letters(conn, None, item.stream, now, [(item.raw, item.reason, None)])
            self._count_dead_letters(letter_bytes(item.raw, item.reason, item.stream))
            if max(item.first, item.last) > last_seq(conn):  # its seqs are never given again (the reason names them)
                store_last_seq(conn, max(item.first, item.last))
        return count

    def _forget_held(self, damaged: Sequence[Damaged]) -> None:
        """Leave the keys of damaged records out of `_held`, as reading them back would (writer thread)."""
        if not all(item.first and item.known for item in damaged):  # which records it hit is not known:
            self._held.clear()  # read every one back
            self._held_bytes, self._held_from = 0, self._next_seq - 1
            return
        spans = [(item.first, max(item.first, item.last)) for item in damaged]
        kept = [held for held in self._held if not any(held[0] <= last and held[1] >= first for first, last in spans)]
        if len(kept) < len(self._held):
            self._held = deque(kept)
            self._held_bytes = sum(_keys_cost(held[4]) for held in kept)

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
            if dead:
                self._count_dead_letters(sum(letter_bytes(event.raw, why, event.stream) for event, why in dead))
            conn.execute(
                "INSERT INTO cursors (sink, seq) VALUES (?, ?) ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq",
                (sink, seq),
            )
            self._store_end(conn)
            self._free_passed(conn, active_sinks)

        await self._write(write, frees_room=True)

    def _free_passed(self, conn: sqlite3.Connection, active_sinks: Sequence[str]) -> None:
        """Move the mark to the seq every active sink is past (the journal's end when no sink is active): the
        dedup keys of the records it passes go to `dedup_log` in this transaction (a few records a delivered
        batch, never a whole segment at once), and the segments it passed are unlinked once it has committed."""
        marks = [
            row[0]
            for row in conn.execute(
                f"SELECT seq FROM cursors WHERE sink IN ({','.join('?' * len(active_sinks))})",  # noqa: S608
                tuple(active_sinks),
            )
        ]
        if len(marks) != len(active_sinks):
            return
        floor = max(self._mark, self._group_mark)  # a cursor commit earlier in this group may have moved it
        mark = max(min(marks) if marks else self._next_seq - 1, floor)
        if mark > floor:  # kept: at the next start, no cursor says which sinks are active
            if self.dedup.enabled:
                self._keep_keys(conn, floor, mark)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('mark', ?)", (mark,))
            self._group_mark = mark
        passed = self.segments.passed(mark)

        def moved() -> None:
            self._mark = max(self._mark, mark)
            held = self._held
            while held and held[0][1] <= self._mark:
                self._held_bytes -= _keys_cost(held.popleft()[4])
            self._held_from = max(self._held_from, self._mark)
            if passed:
                self.segments.drop(passed)
                if not self.spare_held:  # the room freed goes to the spare room before any request
                    self._restore_spare()
            self.size_bytes = self.segments.bytes_after(self._mark)

        self._after_commit.append(moved)

    def _keep_keys(self, conn: sqlite3.Connection, after: int, upto: int) -> None:
        """Copy the dedup keys still in the window of the records the mark passes, (after, upto], into
        `dedup_log`, one row per scope: from memory (`_held`) when this process appended them, else read back.
        Keys that cannot be read (a disk error) are logged and let go: a retry of their events may then be
        delivered again, and delivery goes on."""
        passed: Iterable[tuple[int, str | None, float, list[str]]]
        if after >= self._held_from:
            passed = ((last, scope, at, keys) for _, last, scope, at, keys in self._held)
        else:
            try:
                passed = [(r.last, r.scope, r.received_at, r.keys) for r in self.segments.metas(after, upto)]
            except (OSError, ValueError, zstandard.ZstdError) as exc:  # the disk failed or changed them
                log.error("journal: cannot read delivered records' dedup keys", extra={"error": str(exc)})
                return
        cutoff = self.dedup.cutoff(time.time())
        logged: dict[str, tuple[float, list[str]]] = {}
        for last, scope, received_at, record_keys in passed:
            if last > upto:
                break  # in order: the rest are after the mark
            if last > after and record_keys and received_at >= cutoff and scope is not None:
                latest, keys = logged.setdefault(scope, (received_at, []))
                keys += record_keys
                logged[scope] = (max(latest, received_at), keys)
        if logged:
            conn.executemany(
                "INSERT INTO dedup_log (stream, at, keys) VALUES (?, ?, ?)",
                [(scope, at, orjson.dumps(keys)) for scope, (at, keys) in logged.items()],
            )

    async def free_passed(self, active_sinks: Sequence[str]) -> None:
        """Free what the active sinks are all past (after a reload removed a sink that was behind)."""
        await self._write(lambda conn: self._free_passed(conn, active_sinks), frees_room=True)

    async def prune_dedup(self, now: float | None = None) -> None:
        """Forget dedup keys older than the window, and recount the backlog."""
        moment = time.time() if now is None else now

        def write(conn: sqlite3.Connection) -> None:
            self.dedup.expire(moment)
            conn.execute("DELETE FROM dedup_log WHERE at < ?", (self.dedup.cutoff(moment),))
            self._after_commit.append(lambda: setattr(self, "size_bytes", self.segments.bytes_after(self._mark)))

        await self._write(write)

    def _load_dedup(self, conn: sqlite3.Connection, now: float, metas: Sequence[Record]) -> None:
        """Rebuild the dedup index from the keys of the window: those of delivered records (`dedup_log`; a
        journal of an earlier version: its `dedup` table, which is then dropped), then those of the records
        not delivered yet (the segments)."""
        if not self.dedup.enabled:
            return
        self.dedup.stepping = False  # nothing waits on the writer yet: each generation is sealed at once
        try:
            self._load_keys(conn, now, metas)
        finally:
            self.dedup.settle()
            self.dedup.stepping = True

    def _load_keys(self, conn: sqlite3.Connection, now: float, metas: Sequence[Record]) -> None:
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
        # In commit order, as the index took them while serving: after a clock stepped back, keys received
        # since are older than the newest, and loaded in time order the newest would move the window past them.
        for stream, at, keys in conn.execute(
            "SELECT stream, at, keys FROM dedup_log WHERE at >= ? ORDER BY id", (cutoff,)
        ):
            try:
                held = orjson.loads(keys)
            except (orjson.JSONDecodeError, TypeError):
                held = None
            if not isinstance(held, list):  # the disk changed the row: its keys are let go, not the others'
                log.error("journal: a dedup_log row cannot be read; its keys are let go", extra={"stream": stream})
                continue
            # Rows written before keys were scoped by stream path name the stream: map them to its path.
            self.dedup.add(self.dedup_scopes.get(stream, stream), [key for key in held if isinstance(key, str)], at)
        for record in metas:  # those the mark passed have theirs in dedup_log
            if record.keys and record.scope is not None and record.received_at >= cutoff and record.last > self._mark:
                self.dedup.add(record.scope, record.keys, record.received_at)

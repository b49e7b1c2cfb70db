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
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import orjson
import zstandard

from receiver.dedup import DEFAULT_MAX_KEYS as DEFAULT_DEDUP_MAX_KEYS
from receiver.dedup import DedupIndex
from receiver.errors import JournalClosed, JournalError, JournalFull
from receiver.parsing import Parsed
from sinks.base import Event

if TYPE_CHECKING:
    from receiver.dedup_store import RedisDedupStore

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
CREATE TABLE IF NOT EXISTS dedup_log (
    id INTEGER PRIMARY KEY, stream TEXT NOT NULL, at REAL NOT NULL, keys BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dedup_log_at ON dedup_log (at);
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

WRITER_CACHE_KIB = 8 * 1024
"""The writer's page cache (SQLite's default is 2 MiB)."""


COMPRESSION_LEVEL = 1
"""zstd level of the stored events. Sync writes are the journal's bottleneck (every byte goes to the WAL, then to
the database at checkpoint, each fsynced); level 1 stores WorkOS events in a fifth to an eighth of their size for
≈ 3 µs of CPU per KiB."""
PROBE_ROOM = 256 * 1024
"""Bytes a readiness probe writes after the disk was full: more than most requests store (compressed)."""
MAX_GROUP_JOBS = 1024
"""Most requests one commit serves."""
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

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


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a directory it may not search: the directory is the problem
        return False


def _open_problem(exc: OSError | sqlite3.Error, path: Path) -> str:
    """Why a journal could not be opened, in one line, with the next step where it is clear."""
    if (
        isinstance(exc, PermissionError)
        or "readonly" in str(exc)
        or (isinstance(exc, sqlite3.Error) and not os.access(path.parent, os.W_OK))
    ):
        files = [path, *(path.with_name(path.name + end) for end in ("-wal", "-shm", ".lock"))]
        theirs = [str(f) for f in files if _exists(f) and not os.access(f, os.R_OK | os.W_OK)]
        if theirs:
            return (
                f"permission denied (log-bridge runs as UID {os.getuid()}; it cannot write {', '.join(theirs)}: "
                "make them its own, or writable by it)"
            )
        return (
            f"permission denied (log-bridge runs as UID {os.getuid()}; it needs to write in {path.parent}, "
            "for the database and its -wal and -shm files)"
        )
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return f"the file is not a log-bridge journal or is damaged ({exc}); move it aside to start a new one"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"the database is locked by another process ({exc})"
    if code == sqlite3.SQLITE_FULL:
        return "the disk is full"
    return str(exc)


def _map_error(exc: sqlite3.Error) -> JournalError:
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:  # the primary code of an extended one
        return DiskFull("the journal's disk is full")
    return JournalError(f"journal write failed: {exc}")


class DiskFull(JournalFull):
    """A write failed because the journal's file system has no room."""


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
    proves_room: bool = False
    """A request's batch or a readiness probe with room: its commit shows the disk has space again (a cursor
    update or a prune writes too little to say so)."""


_STOP = object()


class Journal:
    """The journal of one process. Writes go through one thread (group commit); reads through another."""

    def __init__(
        self, path: Path, *, max_bytes: int, dedup_window: float, dedup_max_keys: int = DEFAULT_DEDUP_MAX_KEYS
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.dedup = DedupIndex(dedup_window, dedup_max_keys)
        self._pending: dict[str, set[int]] = {}
        """Fingerprints taken by the jobs of the commit group being written (writer thread only)."""
        self._after_commit: list[Callable[[], None]] = []
        self._undo: list[Callable[[], None]] = []
        self._pack = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL).compress  # writer thread only
        self._unpack = zstandard.ZstdDecompressor().decompress  # reader thread only
        self._stop_seen = False
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-read")
        self._read_conn: sqlite3.Connection | None = None
        self._closed = False
        self.size_bytes = 0
        self.last_seq = 0
        self.commits = 0
        self._lock: IO[bytes] | None = None
        self.dedup_scopes: dict[str, str] = {}
        """Stream name -> dedup scope (its path), for keys stored by name by earlier versions."""
        self.disk_full = False
        """Set when a write fails for lack of space; cleared only when a write commits again (readiness)."""
        self._new_data: list[asyncio.Event] = []
        self._next_seq = 1
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
            self.last_seq = _last_seq(conn)
            self.size_bytes = _backlog_bytes(conn)
            await asyncio.to_thread(self._load_dedup, conn, time.time())
        except (OSError, sqlite3.Error) as exc:
            for opened in (conn, self._read_conn):
                if opened is not None:
                    opened.close()
            self._read_conn = None
            self._release_lock()
            raise JournalError(f"cannot open the journal {self.path}: {_open_problem(exc, self.path)}") from None
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
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the lock
            self._lock = None

    def subscribe(self) -> asyncio.Event:
        """An event set whenever new rows are committed (the delivery engine waits on it)."""
        signal = asyncio.Event()
        self._new_data.append(signal)
        return signal

    # --- the writer thread -------------------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while not self._stop_seen:
                first = self._queue.get()
                if first is _STOP:
                    return
                jobs: list[_Job] = [first]  # type: ignore[list-item]
                self._take_queued(jobs)
                self._run_group(conn, jobs)
        finally:
            conn.close()

    def _take_queued(self, jobs: list[_Job]) -> bool:
        """Add the jobs queued by now to the group; whether any were added."""
        taken = False
        while not self._stop_seen and len(jobs) < MAX_GROUP_JOBS:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is _STOP:
                self._stop_seen = True
                break
            jobs.append(more)  # type: ignore[arg-type]
            taken = True
        return taken

    def _run_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        added = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            # Sequence numbers come from the database under its write lock, so another process (`dlq replay`)
            # writing to the same journal never hands out the same numbers.
            self._next_seq = _last_seq(conn) + 1
            first = self._next_seq
            index = 0
            # Jobs queued while the group is written join it before the commit: one fsync for them too.
            while index < len(jobs) or self._take_queued(jobs):
                job = jobs[index]
                index += 1
                conn.execute("SAVEPOINT job")
                hooks, undos = len(self._after_commit), len(self._undo)
                try:
                    result = job.fn(conn)
                except Exception as exc:  # one request's failure must not sink the others in the group
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    for undo in self._undo[undos:]:
                        undo()
                    del self._after_commit[hooks:], self._undo[undos:]
                    failure = _map_error(exc) if isinstance(exc, sqlite3.Error) else exc
                    self.disk_full = self.disk_full or isinstance(failure, DiskFull)
                    outcomes.append((job, None, failure))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((job, result, None))
            added = self._next_seq != first
            if added:
                _store_last_seq(conn, self._next_seq - 1)
            conn.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced here, once for the whole group
            self.commits += 1
            if any(error is None and job.proves_room for job, _, error in outcomes):
                self.disk_full = False
            for hook in self._after_commit:  # only now may a retry of these events be called a duplicate
                hook()
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure = _map_error(exc)
            log.error("journal commit failed", extra={"error": str(failure)})
            self.disk_full = self.disk_full or isinstance(failure, DiskFull)
            outcomes = [(job, None, failure) for job in jobs]
            added = False
        finally:
            self._after_commit.clear()
            self._undo.clear()
            self._pending.clear()
        self.last_seq = self._next_seq - 1 if added else _last_seq(conn)
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

    async def _write(self, fn: Callable[[sqlite3.Connection], T], proves_room: bool = False) -> T:
        if self._closed or self._writer is None:
            raise JournalClosed("the journal is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, loop, future, proves_room))
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

    async def append(self, stream: str, parsed: Parsed, received_at: float, scope: str | None = None) -> AppendResult:
        """Commit one request's elements durably (one batch row, its dedup keys, intake dead letters); returns
        after the fsync. Keys are deduplicated within `scope` (the stream's path: renaming a stream keeps its
        keys), by default the stream's name."""
        if self.over_cap:
            raise JournalFull(f"the journal is over its cap ({self.max_bytes} bytes)")
        scope = scope or stream
        shared = self.shared if self.dedup.enabled else None
        elsewhere = await shared.seen(scope, parsed.keys) if shared is not None else frozenset()
        committed: list[str] = []

        def write(conn: sqlite3.Connection) -> AppendResult:
            fresh = None
            if self.dedup.enabled:
                pending = self._pending.setdefault(scope, set())
                taken: list[int] = []
                fresh = self.dedup.fresh(scope, parsed.keys, received_at, pending, taken)
                self._undo.append(lambda: pending.difference_update(taken))
                if elsewhere:  # seen by another replica within the window: a duplicate here too
                    fresh = [
                        i
                        for i in (range(len(parsed)) if fresh is None else fresh)
                        if parsed.keys[i] is None or parsed.keys[i] not in elsewhere
                    ]
            indexes = range(len(parsed)) if fresh is None else fresh
            count = len(indexes)
            keys: list[str] = []
            size = 0
            if count:
                if fresh is None:
                    raws, actions, times = parsed.raws, parsed.actions, parsed.times
                else:
                    raws = [parsed.raws[i] for i in fresh]
                    actions = [parsed.actions[i] for i in fresh]
                    times = [parsed.times[i] for i in fresh]
                first = self._next_seq
                self._next_seq += count
                data = self._pack(b"\n".join(raws))
                conn.execute(
                    "INSERT INTO batches (first_seq, last_seq, stream, received_at, meta, data) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (first, first + count - 1, stream, received_at, orjson.dumps([actions, times]), data),
                )
                size = len(data)
                if self.dedup.enabled:
                    keys = [key for key in (parsed.keys[i] for i in indexes) if key is not None]
                    if keys:
                        conn.execute(
                            "INSERT INTO dedup_log (stream, at, keys) VALUES (?, ?, ?)",
                            (scope, received_at, orjson.dumps(keys)),
                        )
            committed[:] = keys
            self._after_commit.append(lambda: self._committed(scope, keys, received_at, size))
            if parsed.rejected:
                conn.executemany(
                    "INSERT INTO dead_letters (sink, stream, data, reason, at) VALUES (NULL, ?, ?, ?, ?)",
                    [(stream, item.raw, item.reason, received_at) for item in parsed.rejected],
                )
            return AppendResult(count, len(parsed) - count, len(parsed.rejected))

        result = await self._write(write, proves_room=True)
        if shared is not None and committed:  # only now, after the commit: a failure here can cause a duplicate,
            await shared.mark(scope, committed)  # never a loss
        return result

    def _committed(self, stream: str, keys: list[str], at: float, size: int) -> None:
        self.size_bytes += size
        if keys:
            self.dedup.add(stream, keys, at)

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
                "SELECT first_seq, stream, target, meta FROM batches "
                "WHERE first_seq >= coalesce((SELECT max(first_seq) FROM batches WHERE first_seq <= ?1), 0) "
                "AND last_seq > ?1 AND first_seq <= ?2 ORDER BY first_seq",
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
            "WHERE first_seq >= coalesce((SELECT max(first_seq) FROM batches WHERE first_seq <= ?1), 0) "
            f"AND last_seq > ?1 AND (target = ?2 OR (target IS NULL AND stream IN ({marks})))"
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

    async def drop_cursors(self, sinks: Sequence[str]) -> dict[str, int]:
        """Forget removed sinks' cursors; returns how many events each was still owed (per its cursor)."""

        def write(conn: sqlite3.Connection) -> dict[str, int]:
            owed = {}
            for sink in sinks:
                row = conn.execute("DELETE FROM cursors WHERE sink = ? RETURNING seq", (sink,)).fetchone()
                owed[sink] = max(0, self.last_seq - int(row[0])) if row else 0
            return owed

        return await self._write(write)

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
            for first, stream, target, received_at, meta, stored in rows:
                actions, times = orjson.loads(meta)
                # Rows are zstd frames, except those written uncompressed (`dlq replay`, earlier versions).
                data = self._unpack(stored) if stored[:4] == _ZSTD_MAGIC else stored
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
            total = _backlog_bytes(conn)
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


def _backlog_bytes(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT total(length(data)) FROM batches").fetchone()[0])


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
    return int(row[0]) if row else 0


def _store_last_seq(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_seq', ?)", (seq,))


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

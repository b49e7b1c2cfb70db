"""The group-commit writer: one thread runs every write of the process, and gathers the writes queued meanwhile
into one group. Its requests' SQLite writes (their dead letters) share one transaction and one fsync, each in
its own savepoint, so one request's failure does not sink the others; then their batches are appended to the
segment files (receiver.journal.segments) with one write and one `fdatasync`, and the requests are answered.
The group's other writes (cursors, meta, probes, pruning) follow in a second transaction, so that no request
waits for them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from receiver.errors import JournalClosed, JournalError
from receiver.journal.schema import DiskFull, disk_error, map_error

log = logging.getLogger("receiver.journal")

T = TypeVar("T")
B = TypeVar("B")

MAX_GROUP_JOBS = 1024
"""Most requests one commit serves."""


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any] | None
    """What the job runs on the writer's connection, `fn(conn)`: for a batch, what it stores in SQLite besides
    its events (the intake's dead letters), or None."""
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    proves_room: bool = False
    """A request's batch or a readiness probe with room: its commit shows the disk has space again (a cursor
    update or a prune writes too little to say so)."""
    bulk: Any = None
    """A request's batch: appended to the segments together with the batches of its group."""
    frees_room: bool = False
    """A sink's progress: its commit lets delivered segments be unlinked, so on a full disk the journal's
    spare room is given up for it (`_release_spare`)."""


_STOP = object()


class GroupWriter:
    """The writer thread and its queue; the journal's façade (receiver.journal.facade) builds on it."""

    def __init__(self) -> None:
        self._after_commit: list[Callable[[], None]] = []
        """Run once the group has committed (writer thread)."""
        self._undo: list[Callable[[], None]] = []
        """Run when a job is rolled back to its savepoint (writer thread)."""
        self._stop_seen = False
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._closed = False
        self.last_seq = 0
        self.commits = 0
        self.disk_full = False
        """Whether the journal's disk is full, as its writes say (readiness, the gauge): set when a write fails for
        lack of space; cleared when a write proves room again, or when a later write fails for another reason (an
        I/O error, a volume turned read-only: the disk is then not known to be full, and saying so would send
        the operator freeing space that is there)."""
        self.room_owed = False
        """Set when a write fails for lack of space; cleared only when a write proves room again, whatever failed
        in between: until then the readiness probe reserves room for the largest request (`probe`)."""
        self._failing: dict[str, str] = {}
        """Kind of write ('commit', 'append') -> what it last failed with, while it fails (writer thread)."""
        self._new_data: list[asyncio.Event] = []
        self._published: list[Any] = []
        """What the group's commit hooks hand to the event loop (`_publish`), with the group's outcomes."""
        self._next_seq = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop that started the writer: asyncio.get_running_loop costs a `getpid` system call a request."""
        self._loop_thread = 0
        """The thread that loop runs in: a caller in another thread runs another loop."""

    def _start_writer(self, conn: sqlite3.Connection) -> None:
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="journal-write", daemon=True)
        self._writer.start()

    async def _stop_writer(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)

    def _group_ended(self) -> None:
        """After each group, committed or not (writer thread): drop per-group state."""

    def subscribe(self) -> asyncio.Event:
        """An event set whenever new rows are committed (the delivery engine waits on it)."""
        signal = asyncio.Event()
        self._new_data.append(signal)
        return signal

    def unsubscribe(self, signal: asyncio.Event) -> None:
        """Stop setting a signal `subscribe` gave (a sink runner retired by a reload)."""
        with contextlib.suppress(ValueError):
            self._new_data.remove(signal)

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
            try:
                self._last_write(conn)
            except sqlite3.Error as exc:
                log.error("journal: the last write before closing failed", extra={"error": str(map_error(exc))})
            conn.close()
            self._writer_closed()

    def _last_write(self, conn: sqlite3.Connection) -> None:
        """After the last group, before the connection closes (writer thread)."""

    def _writer_closed(self) -> None:
        """After the last group (writer thread)."""

    def _take_queued(self, jobs: list[_Job]) -> None:
        """Add the jobs queued by now to the group."""
        while not self._stop_seen and len(jobs) < MAX_GROUP_JOBS:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is _STOP:
                self._stop_seen = True
                break
            jobs.append(more)  # type: ignore[arg-type]

    def _run_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        """The group's batches first: their SQLite part (a request's dead letters) in one transaction, their
        events appended with one write and one fdatasync, and their requests answered; then, in a second
        transaction, the writes no request waits on (a sink's cursor, which moves the mark and copies dedup
        keys: ≈ 1.5 ms of CPU and a WAL fsync, that requests queued with it waited for before)."""
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        batches = [job for job in jobs if job.bulk is not None]
        stores = [job for job in batches if job.fn is not None]
        later = [job for job in jobs if job.bulk is None]
        loop = jobs[0].loop
        added = False
        try:
            try:
                if batches and not self._room_for_batches():  # what delivery frees goes to the spare room first
                    full = DiskFull("the journal's disk is full")
                    self._disk_failed(full)
                    outcomes.extend((job, None, full) for job in batches)
                else:
                    # Batches whose SQLite part failed: their events are not appended.
                    refused = self._run_transaction(conn, stores, outcomes) if stores else set()
                    appends = [job for job in batches if id(job) not in refused]
                    added = bool(appends) and self._append_batches(appends, outcomes)
            except Exception:  # a bug or an unforeseen error: answer the group, and keep the writer alive
                added = self._failed(batches, outcomes)
            published, self._published = self._published, []
            if batches:  # one wake-up of the event loop for the group's requests, not one per request
                loop.call_soon_threadsafe(self._settle_group, outcomes, added, published)
            if later:
                outcomes = []
                try:
                    self._run_transaction(conn, later, outcomes)
                    self._retry_with_spare(conn, outcomes)
                except Exception:
                    self._failed(later, outcomes)
                loop.call_soon_threadsafe(self._settle_group, outcomes, False, [])
        finally:
            self._group_ended()

    def _retry_with_spare(
        self, conn: sqlite3.Connection, outcomes: list[tuple[_Job, Any, BaseException | None]]
    ) -> None:
        """Run again, once the spare room is given up, the sinks' progress that failed for lack of space: on a
        full disk SQLite cannot grow its WAL (nor the database, to checkpoint it), so without room no cursor
        would move, no delivered segment would be unlinked, and nothing would ever free the disk."""
        stuck = [job for job, _, error in outcomes if job.frees_room and isinstance(error, DiskFull)]
        if not stuck or not self._release_spare():
            return
        ids = {id(job) for job in stuck}
        outcomes[:] = [outcome for outcome in outcomes if id(outcome[0]) not in ids]
        self._run_transaction(conn, stuck, outcomes)

    def _rolled_back(self) -> None:
        """After a transaction rolled back (writer thread): forget what its jobs set for the rest of the group,
        which may run them again (`_retry_with_spare`)."""

    def _room_for_batches(self) -> bool:
        """Whether the group's requests may take disk space (writer thread)."""
        return True

    def _release_spare(self) -> bool:
        """Give the spare room back to the file system; whether there was any (writer thread)."""
        return False

    @staticmethod
    def _failed(jobs: list[_Job], outcomes: list[tuple[_Job, Any, BaseException | None]]) -> bool:
        """Answer the jobs not settled yet with an internal error (logged), after a bug or an unforeseen
        error, so that the writer stays alive."""
        log.exception("journal group failed")
        settled = {id(job) for job, _, _ in outcomes}
        failure = JournalError("journal write failed: internal error")
        outcomes.extend((job, None, failure) for job in jobs if id(job) not in settled)
        return False

    def _run_transaction(
        self, conn: sqlite3.Connection, jobs: list[_Job], outcomes: list[tuple[_Job, Any, BaseException | None]]
    ) -> set[int]:
        """The group's SQLite writes in one transaction; the ids of the batches whose part failed."""
        refused: set[int] = set()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in jobs:
                if not self._in_savepoint(conn, job, outcomes):
                    refused.add(id(job))
            conn.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced here, once for the whole group
            self.commits += 1
            self._write_went_through("commit")
            if any(error is None and job.proves_room for job, _, error in outcomes):
                self._room_proven()
            for hook in self._after_commit:  # what is committed stays so: a hook that fails is logged only
                try:
                    hook()
                except Exception:
                    log.exception("journal: an after-commit step failed")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._rolled_back()
            failure = map_error(exc)
            self._write_failed("commit", "journal commit failed", failure)
            self._disk_failed(failure)
            done = {id(job) for job in jobs}
            outcomes[:] = [outcome for outcome in outcomes if id(outcome[0]) not in done]
            outcomes.extend((job, None, failure) for job in jobs)
            refused = done
        finally:
            self._after_commit.clear()
            self._undo.clear()
        return refused

    def _in_savepoint(
        self, conn: sqlite3.Connection, job: _Job, outcomes: list[tuple[_Job, Any, BaseException | None]]
    ) -> bool:
        """Run a job in a savepoint; on failure roll back to it, undo its side effects and record the failure
        as its outcome. A job that is no batch has its result recorded. Whether it succeeded."""
        fn = job.fn
        if fn is None:
            return True
        conn.execute("SAVEPOINT job")
        hooks, undos = len(self._after_commit), len(self._undo)
        try:
            result = fn(conn)
        except Exception as exc:  # one request's failure must not sink the others in the group
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            for undo in reversed(self._undo[undos:]):
                undo()
            del self._after_commit[hooks:], self._undo[undos:]
            failure = map_error(exc) if isinstance(exc, sqlite3.Error) else exc
            if isinstance(exc, OSError):  # a file of the job's own (the probe's reservation)
                failure = disk_error(exc)
            if isinstance(exc, sqlite3.Error | OSError) or isinstance(failure, DiskFull):
                self._disk_failed(failure)  # not a request's own refusal (its dead letters over their cap)
            outcomes.append((job, None, failure))
            return False
        conn.execute("RELEASE job")
        if job.bulk is None:
            outcomes.append((job, result, None))
        return True

    def _disk_failed(self, failure: BaseException) -> None:
        """A write failed in SQLite or the file system (writer thread): the disk is full if it failed for lack
        of space, else not known to be; room is owed from the first lack of space until a write proves it."""
        self.disk_full = isinstance(failure, DiskFull)
        self.room_owed = self.room_owed or self.disk_full

    def _room_proven(self) -> None:
        """A write that needed room committed (writer thread): the disk is not full."""
        self.disk_full = self.room_owed = False

    def _write_failed(self, kind: str, message: str, failure: BaseException) -> None:
        """Log a failed write of `kind` when it starts: not again while writes of that kind fail the same way, until
        one goes through (a full disk refuses every group; each refused request is logged, rate-limited, by the
        intake). A failure that changes (the disk full, then an I/O error) is logged again (writer thread)."""
        error = str(failure)
        if self._failing.get(kind) != error:
            log.error(message, extra={"error": error})
        self._failing[kind] = error

    def _write_went_through(self, kind: str) -> None:
        """A write of `kind` went through: its next failure is logged (writer thread)."""
        self._failing.pop(kind, None)

    def _append_batches(self, jobs: list[_Job], outcomes: list[tuple[_Job, Any, BaseException | None]]) -> bool:
        """Append the group's batches to the segments and record their outcomes (writer thread); whether any
        event was added."""
        raise NotImplementedError

    def _publish(self, published: list[Any]) -> None:
        """Take what a group's commit hooks published (event loop)."""

    def _settle_group(
        self, outcomes: list[tuple[_Job, Any, BaseException | None]], added: bool, published: list[Any]
    ) -> None:
        if published:
            self._publish(published)
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

    async def _write(
        self, fn: Callable[[sqlite3.Connection], T], proves_room: bool = False, frees_room: bool = False
    ) -> T:
        return await self._enqueue(fn, proves_room, None, frees_room)  # type: ignore[no-any-return]

    async def _write_batch(self, batch: B, store: Callable[[sqlite3.Connection], Any] | None) -> Any:
        """Queue one request's batch, appended with the batches of its group (and `store` run in the group's
        transaction before, when given); this batch's result once durable."""
        return await self._enqueue(store, True, batch)

    async def _enqueue(
        self, fn: Callable[..., Any] | None, proves_room: bool, bulk: Any, frees_room: bool = False
    ) -> Any:
        if self._closed or self._writer is None:
            raise JournalClosed("the journal is closed")
        loop = self._loop
        if loop is None or threading.get_ident() != self._loop_thread or not loop.is_running():  # another loop
            loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Job(fn, loop, future, proves_room, bulk, frees_room))
        return await future

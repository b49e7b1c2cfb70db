"""The group-commit writer: one thread runs every write of the process, and gathers the writes queued meanwhile
into one transaction, so one fsync (`synchronous=FULL`) serves many acknowledgements. Each write runs in its own
savepoint: one request's failure does not sink the others in its group."""

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

from receiver.errors import JournalClosed
from receiver.journal.schema import DiskFull, last_seq, map_error, store_last_seq

log = logging.getLogger("receiver.journal")

T = TypeVar("T")
B = TypeVar("B")

MAX_GROUP_JOBS = 1024
"""Most requests one commit serves."""


@dataclass(slots=True)
class _Job:
    fn: Callable[..., Any]
    """What the job runs on the writer's connection: `fn(conn)`, or for a batch `fn(conn, batches)` with the
    batches of every job of a run."""
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    proves_room: bool = False
    """A request's batch or a readiness probe with room: its commit shows the disk has space again (a cursor
    update or a prune writes too little to say so)."""
    bulk: Any = None
    """A request's batch: written by `fn` together with the batches queued next to it, in one statement per
    table rather than one per request."""


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
        """Set when a write fails for lack of space; cleared only when a write commits again (readiness)."""
        self._new_data: list[asyncio.Event] = []
        self._published: list[Any] = []
        """What the group's commit hooks hand to the event loop (`_publish`), with the group's outcomes."""
        self._next_seq = 1

    def _start_writer(self, conn: sqlite3.Connection) -> None:
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
            self._next_seq = last_seq(conn) + 1
            first = self._next_seq
            index = 0
            # Jobs queued while the group is written join it before the commit: one fsync for them too.
            while index < len(jobs) or self._take_queued(jobs):
                end = index + 1
                if jobs[index].bulk is not None:  # this batch and those queued right after it, written at once
                    while end < len(jobs) and jobs[end].bulk is not None and jobs[end].fn == jobs[index].fn:
                        end += 1
                    self._run_bulk(conn, jobs[index:end], outcomes)
                else:
                    self._in_savepoint(conn, [jobs[index]], outcomes)
                index = end
            added = self._next_seq != first
            if added:
                store_last_seq(conn, self._next_seq - 1)
            conn.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced here, once for the whole group
            self.commits += 1
            if any(error is None and job.proves_room for job, _, error in outcomes):
                self.disk_full = False
            for hook in self._after_commit:  # only now may a retry of these events be called a duplicate
                hook()
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure = map_error(exc)
            log.error("journal commit failed", extra={"error": str(failure)})
            self.disk_full = self.disk_full or isinstance(failure, DiskFull)
            outcomes = [(job, None, failure) for job in jobs]
            added = False
        finally:
            self._after_commit.clear()
            self._undo.clear()
            self._group_ended()
            published, self._published = self._published, []
        self.last_seq = self._next_seq - 1 if added else last_seq(conn)
        # One wake-up of the event loop for the whole group, not one per request.
        jobs[0].loop.call_soon_threadsafe(self._settle_group, outcomes, added, published)

    def _run_bulk(
        self, conn: sqlite3.Connection, run: list[_Job], outcomes: list[tuple[_Job, Any, BaseException | None]]
    ) -> None:
        """Write a run of batches with one statement per table; if that fails, each batch again on its own, so
        one request's failure does not sink the others."""
        if len(run) > 1 and self._in_savepoint(conn, run, outcomes, fail=False):
            return
        for job in run:
            self._in_savepoint(conn, [job], outcomes)

    def _in_savepoint(
        self,
        conn: sqlite3.Connection,
        jobs: list[_Job],
        outcomes: list[tuple[_Job, Any, BaseException | None]],
        fail: bool = True,
    ) -> bool:
        """Run jobs (one closure, or batches) in a savepoint; on failure roll back to it and undo their side
        effects, and with `fail` record the failure as their outcome. Whether they succeeded."""
        conn.execute("SAVEPOINT job")
        hooks, undos, seq = len(self._after_commit), len(self._undo), self._next_seq
        try:
            if jobs[0].bulk is None:
                results = [jobs[0].fn(conn)]
            else:
                results = jobs[0].fn(conn, [job.bulk for job in jobs])
        except Exception as exc:  # one request's failure must not sink the others in the group
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            for undo in reversed(self._undo[undos:]):
                undo()
            del self._after_commit[hooks:], self._undo[undos:]
            self._next_seq = seq
            if fail:
                failure = map_error(exc) if isinstance(exc, sqlite3.Error) else exc
                self.disk_full = self.disk_full or isinstance(failure, DiskFull)
                outcomes.extend((job, None, failure) for job in jobs)
            return False
        conn.execute("RELEASE job")
        outcomes.extend(zip(jobs, results, [None] * len(jobs), strict=True))
        return True

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

    async def _write(self, fn: Callable[[sqlite3.Connection], T], proves_room: bool = False) -> T:
        return await self._enqueue(fn, proves_room, None)  # type: ignore[no-any-return]

    async def _write_batch(self, fn: Callable[[sqlite3.Connection, list[B]], list[Any]], batch: B) -> Any:
        """Queue one request's batch, for `fn` to write with the batches queued next to it (its results in the
        batches' order); this batch's result once committed."""
        return await self._enqueue(fn, True, batch)

    async def _enqueue(self, fn: Callable[..., Any], proves_room: bool, bulk: Any) -> Any:
        if self._closed or self._writer is None:
            raise JournalClosed("the journal is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Job(fn, loop, future, proves_room, bulk))
        return await future

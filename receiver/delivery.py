"""The delivery engine: each sink reads the journal at its own cursor, in batches, and the engine retries
with exponential backoff and full jitter, dead-letters permanent failures, and keeps the metrics.

Written once for every sink: a sink only sends one batch and classifies the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import math
import random
import re
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from itertools import accumulate, islice
from typing import TypeVar

from receiver.config import Config, RetryConfig, SinkSection
from receiver.errors import JournalClosed, JournalError
from receiver.health import check
from receiver.journal import Journal
from receiver.journal.schema import letter_bytes
from receiver.metrics import Metrics
from sinks import registry
from sinks.base import Event, Health, Outcome, SendResult, Sink

log = logging.getLogger(__name__)

JOURNAL_RETRY_MAX = 5.0
"""Longest wait between tries of a journal operation that failed."""

T = TypeVar("T")

BACKLOG_REFRESH = 1.0
"""How often a sink's backlog count is checked against the journal's end."""
BACKLOG_RECOUNT = 30.0
"""How often it is recounted even when the journal did not grow."""

IDLE_POLL = 1.0
"""How often an idle sink looks at the journal anyway: `dlq replay` writes from another process."""

READ_BYTES = 8 << 20
"""Bytes of events a sink behind reads from the journal at a time, at least (twice its batch.max_bytes if more)."""
PENDING_MIN_WAIT = 0.1
"""The least wait before asking a sink again about events it answered PENDING, whatever wait it asked for."""

HEALTH_RECHECK = 30.0
"""How often a red sink with nothing to send runs its health check again: no send will say it is back."""

SEND_STALLED = 300.0
"""How long one send may go without returning before the sink is shown down (it is not cut short: a sink
bounds its own requests, and a long upload is no failure; one that never returns holds back its events)."""

HEALTH_TIMEOUT = 30.0
"""How long a sink's health check may take (as `log-bridge check`'s default): one that hangs is a failed check,
not the end of the sink's checks."""


def action_filter(include: Sequence[str], exclude: Sequence[str]) -> Callable[[str], bool]:
    """A predicate on an event's action from include/exclude globs (no include globs: everything)."""
    inc = re.compile("|".join(fnmatch.translate(g) for g in include)) if include else None
    exc = re.compile("|".join(fnmatch.translate(g) for g in exclude)) if exclude else None

    def wanted(action: str) -> bool:
        if inc is not None and not inc.match(action):
            return False
        return exc is None or not exc.match(action)

    return wanted


def backoff(attempt: int, policy: RetryConfig, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt: full jitter over an exponential ceiling (attempt counts from 1)."""
    ceiling = min(policy.max, policy.initial * float(2 ** min(attempt - 1, 62)))
    return float(ceiling * rng())


class SinkRunner:
    """Feeds one sink from the journal."""

    def __init__(
        self,
        name: str,
        sink: Sink,
        section: SinkSection,
        streams: Sequence[str],
        journal: Journal,
        metrics: Metrics,
        active_sinks: Sequence[str],
    ) -> None:
        self.name = name
        self.sink = sink
        self.section = section
        self.streams = frozenset(streams)
        self.legacy: dict[str, float] = {}
        """Streams that fed this sink until a reload: their events up to the seq given (inf until the requests
        in flight on them have finished) are still this sink's."""
        self.journal = journal
        self.metrics = metrics
        self.active_sinks = tuple(active_sinks)
        self.wants_action = action_filter(section.include_actions, section.exclude_actions)
        self._every_action = not section.include_actions and not section.exclude_actions
        self.cursor = 0
        self.health = Health(True, "not checked yet")
        self._health_seen = 0
        """Health updates so far: a check that a send's answer overtook does not overwrite it."""
        self._config_problem: str | None = None
        """The last configuration problem a send met (a refused token, a wrong URL): health stays red with it
        until a send succeeds, whatever the sink's own check says."""
        self._read_pos = 0
        self._buffer: deque[Event] = deque()
        self._buffered_bytes = 0
        self._first_buffered_at = 0.0
        self._signal = journal.subscribe()
        self._stopping = False
        self._halting = False
        self._halted = asyncio.Event()
        self._caught_up = False
        self._unread = 0
        """Events this sink is owed in the journal after `_read_pos` (counted, then decreased as read); with
        action filters, only those the filters let through."""
        self._counted_upto = 0
        """With action filters: the journal seq up to which `_unread` has been counted."""
        self._counting = asyncio.Lock()
        self._in_flight = 0

    async def prime(self) -> None:
        """Read this sink's cursor and count its backlog (before `run`, so the gauge is true from the start; again
        when `run` failed)."""
        cursors = await self._persist(lambda: self.journal.cursors([self.name]), "read the cursor")
        self.cursor = cursors[self.name]
        self._read_pos = self.cursor
        if self._every_action:
            self._unread = await self._persist(
                lambda: self.journal.count_after(self.cursor, self.streams | set(self.legacy), self.name),
                "count the backlog",
            )
        else:
            async with self._counting:  # not beside count_forever's: each would count what the other did
                self._counted_upto, self._unread = self.cursor, 0
                await self._persist(self._count_new, "count the backlog")

    async def _count_new(self) -> None:
        """With action filters: add the wanted events the journal gained since the last count (actions are
        read, not the events' bytes), so the backlog never counts an event the filters will skip."""
        upto = self.journal.last_seq
        if upto <= self._counted_upto:
            return
        rows = await self.journal.scan_actions(self._counted_upto, upto)
        floor = max(self._counted_upto, self._read_pos)  # what was read meanwhile is not unread
        added = 0
        for first, stream, target, actions in rows:
            for offset, action in enumerate(actions):
                seq = first + offset
                if floor < seq <= upto and self._wants(stream, target, seq, action):
                    added += 1
        self._unread += added
        self._counted_upto = max(upto, self._read_pos)

    def owed(self) -> int:
        """Events this sink still has to deliver: unread, buffered, and being sent or retried."""
        return self._unread + len(self._buffer) + self._in_flight

    async def count_forever(self, every: float = BACKLOG_RECOUNT) -> None:
        """Keep `_unread` true: recount when the journal grew, and every `every` seconds anyway (`dlq replay`
        writes from another process)."""
        counted_seq = -1
        counted_at = 0.0
        while True:
            if not self._every_action:
                with contextlib.suppress(JournalError):
                    async with self._counting:
                        await self._count_new()
                await asyncio.sleep(BACKLOG_REFRESH)
                continue
            last_seq, position = self.journal.last_seq, self._read_pos
            if last_seq != counted_seq or time.monotonic() - counted_at >= every:
                try:
                    unread = await self.journal.count_after(position, self.streams | set(self.legacy), self.name)
                except JournalError:
                    unread = None
                if unread is not None and position == self._read_pos:  # no read in between: the count holds
                    self._unread = unread
                    counted_seq, counted_at = last_seq, time.monotonic()
            await asyncio.sleep(BACKLOG_REFRESH)

    def _owns(self, stream: str, target: str | None, seq: int) -> bool:
        """Whether an event is this sink's: replayed for it, from a stream that feeds it, or from a stream that
        fed it until a reload (accepted before the reload took effect)."""
        if target is not None:
            return target == self.name
        if stream in self.streams:
            return True
        until = self.legacy.get(stream)
        return until is not None and seq <= until

    def _wants(self, stream: str, target: str | None, seq: int, action: str) -> bool:
        """Whether the sink is to be given the event: its own, and let through by the action filters."""
        return self._owns(stream, target, seq) and (target is not None or self.wants_action(action))

    async def _fill(self) -> None:
        """Read more rows into the buffer; sets `_caught_up` when the journal has nothing more."""
        batch = self.section.batch
        limit = max(2 * batch.max_events, 256)
        if len(self._buffer) >= batch.max_events or self._buffered_bytes >= batch.max_bytes:
            return
        # Bytes too: a backlog of large events (up to server.max_body_bytes each) read 2 x max_events at a time
        # would hold gigabytes.
        room = max(2 * batch.max_bytes, READ_BYTES)
        rows = self.journal.recent_rows(self._read_pos, limit)
        if rows is None:  # behind the events kept in memory, or after rows another process wrote
            rows = await self._persist(lambda: self.journal.read_rows(self._read_pos, limit, room), "read the journal")
            self._caught_up = sum(row.count for row in rows) < limit and sum(row.size for row in rows) < room
        else:
            self._caught_up = sum(row.count for row in rows) < limit
        if not rows:
            return
        self._read_pos = rows[-1].last
        wanted: list[Event] = []
        size: int | None = None  # bytes of `wanted`: known per row in the common case, else summed once below
        if not self._every_action:
            wanted = [
                event
                for row in rows
                for event in row.events
                if self._wants(row.stream, row.target, event.seq, event.action)
            ]
            counted = sum(1 for event in wanted if event.seq <= self._counted_upto)
            self._unread = max(0, self._unread - counted)
            self._counted_upto = max(self._counted_upto, self._read_pos)
        elif self.legacy:
            wanted = [event for row in rows for event in row.events if self._owns(row.stream, row.target, event.seq)]
            self._unread = max(0, self._unread - len(wanted))
        else:  # the common case: no filters and no reload to settle, so a whole row is this sink's or not
            size = 0
            for row in rows:
                if row.stream in self.streams if row.target is None else row.target == self.name:
                    wanted += row.events
                    size += row.size
            self._unread = max(0, self._unread - len(wanted))
        if wanted:
            if not self._buffer:
                self._first_buffered_at = time.monotonic()
            self._buffer.extend(wanted)
            self._buffered_bytes += sum(len(event.raw) for event in wanted) if size is None else size

    def _take_batch(self) -> list[Event]:
        limits = self.section.batch
        if len(self._buffer) <= limits.max_events and self._buffered_bytes <= limits.max_bytes:
            batch = list(self._buffer)  # all of it fits (the common case once caught up)
            self._buffer.clear()
            self._buffered_bytes = 0
            return batch
        # The first max_events, cut to max_bytes (at least one event): whole-list steps, not a loop of pops,
        # which cost ≈ 0.8 µs an event when the buffer holds more than a batch (a sink catching up).
        batch = list(islice(self._buffer, limits.max_events))
        sizes = [len(event.raw) for event in batch]
        size = sum(sizes)
        if size > limits.max_bytes:
            ends = list(accumulate(sizes))
            count = max(1, bisect_right(ends, limits.max_bytes))
            del batch[count:]
            size = ends[count - 1]
        for _ in range(len(batch)):
            self._buffer.popleft()
        self._buffered_bytes -= size
        if self._buffer:
            self._first_buffered_at = time.monotonic()
        return batch

    def _batch_ready(self) -> bool:
        limits = self.section.batch
        if len(self._buffer) >= limits.max_events:
            return True
        if self._buffered_bytes >= limits.max_bytes:
            return True
        return self._stopping or time.monotonic() - self._first_buffered_at >= limits.max_wait

    async def deliver(self) -> None:
        """`run`, started again at the cursor after an error nothing classifies (a sink's bug, a journal read
        that fails in an unforeseen way), after a backoff, with the sink down meanwhile: nothing past the
        cursor is skipped (what was read or sent again is a duplicate, never a loss)."""
        failures, cursor = 0, self.cursor
        while True:
            try:
                if failures:  # again: from the cursor, its backlog counted anew
                    await self.prime()
                await self.run()
                return
            except JournalClosed:
                raise
            except Exception as exc:
                failures = failures + 1 if self.cursor == cursor else 1  # a crash after progress starts over
                cursor = self.cursor
                delay = backoff(failures, self.section.retry)
                log.exception(
                    "sink runner failed; starting it again at its cursor",
                    extra={"sink": self.name, "failures": failures, "delay_s": round(delay, 3)},
                )
                self._set_health(Health(False, f"delivery failed ({type(exc).__name__}); starting again"))
                self._buffer.clear()
                self._buffered_bytes = 0
                if not await self._pause(delay):
                    return

    async def run(self) -> None:
        """Deliver until stopped; on stop, keep draining until the backlog is empty."""
        while not self._halting:
            self._signal.clear()
            await self._fill()
            if self._buffer and (self._batch_ready() or not self._caught_up):
                await self._deliver(self._take_batch())
                continue
            if not self._buffer:
                if self._read_pos > self.cursor:  # only rows for other sinks were passed: move on
                    await self._commit(self._read_pos, [])
                if self._stopping and self._caught_up:
                    return
                await self._wait(IDLE_POLL)
            else:
                await self._wait(self._first_buffered_at + self.section.batch.max_wait - time.monotonic())

    async def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._signal.wait(), seconds)

    def stop(self) -> None:
        """Finish what is in the journal, without waiting for batches to fill."""
        self._stopping = True
        self._signal.set()

    def halt(self) -> None:
        """Stop after the send in progress, without waiting out a backoff; what is not committed stays in the
        journal at this sink's cursor (a reload rebuilding the sink resends it: a duplicate, never a loss)."""
        self._halting = True
        self._halted.set()
        self._signal.set()

    def unsubscribe(self) -> None:
        """Stop listening to the journal's commits (a runner retired by a reload, once its tasks ended)."""
        self.journal.unsubscribe(self._signal)

    async def _deliver(self, batch: list[Event]) -> None:
        self._in_flight = len(batch)
        try:
            await self._settle(batch)
        finally:
            self._in_flight = 0

    async def _settle(self, batch: list[Event]) -> None:
        """Send until every event is delivered or dead-lettered, then commit the cursor past them. Dead letters
        the journal has no room for (`journal.max_dead_letter_bytes`) are held, never dropped: sent again after
        a backoff, the cursor before them, until they are delivered or there is room."""
        todo = batch
        held = 0
        while True:
            dead = await self._send(todo)
            if dead is None:
                return  # halted: nothing committed, the events stay owed at this sink's cursor
            size = sum(letter_bytes(event.raw, why, event.stream) for event, why in dead)
            if not dead or self.journal.takes_dead_letters(size):
                break
            held += 1
            delay = backoff(held, self.section.retry)
            self._set_health(Health(False, "dead letters at their cap (journal.max_dead_letter_bytes): failures held"))
            log.warning(
                "dead letters at their cap: the sink's permanent failures are held and sent again",
                extra={"sink": self.name, "events": len(dead), "delay_s": round(delay, 3), "reason": dead[0][1]},
            )
            if not await self._pause(delay):
                return
            todo = [event for event, _ in dead]
        if dead:
            self.metrics.dead_lettered.labels(self.name).inc(len(dead))
            log.error("events dead-lettered", extra={"sink": self.name, "events": len(dead), "reason": dead[0][1]})
        position = self._buffer[0].seq - 1 if self._buffer else self._read_pos
        await self._commit(position, dead)

    async def _send(self, todo: list[Event]) -> list[tuple[Event, str]] | None:
        """Send until every event is delivered or failed for good: those failed, with why (None: halted)."""
        policy = self.section.retry
        dead: list[tuple[Event, str]] = []
        attempt = 0
        pending_only = False
        while todo:
            if not pending_only:  # asking again about events awaiting the peer's confirmation is no new attempt
                attempt += 1
            started = time.monotonic()
            stalled = asyncio.get_running_loop().call_later(SEND_STALLED, self._stalled, len(todo))
            try:
                result = await self.sink.send(todo)
            except Exception as exc:  # a sink must classify, but a bug in one must not stop delivery
                log.exception("sink raised instead of classifying", extra={"sink": self.name})
                result = SendResult.retry(f"sink error: {type(exc).__name__}")
            finally:
                stalled.cancel()
            self.metrics.send_seconds.labels(self.name).observe(time.monotonic() - started)
            retry: list[tuple[Event, str]] = []
            pending: list[Event] = []
            delivered = 0
            problem: str | None = None
            judged: Sequence[Event] = todo
            if result.outcome is Outcome.SUCCESS and not result.failures:  # all delivered: no per-event look
                delivered, judged = len(todo), ()
            for event in judged:
                verdict = result.outcome_of(event)
                if verdict is None:
                    delivered += 1
                elif verdict.outcome is Outcome.PERMANENT:
                    dead.append((event, verdict.reason or "permanent failure"))
                elif verdict.outcome is Outcome.PENDING:
                    pending.append(event)
                else:
                    retry.append((event, verdict.reason or "retryable failure"))
                    if verdict.config_problem and problem is None:
                        problem = verdict.reason
            self.metrics.delivered.labels(self.name).inc(delivered)
            permanent = len(todo) - delivered - len(retry) - len(pending)
            if permanent:
                self.metrics.failed.labels(self.name, "permanent").inc(permanent)
            if not retry and not pending:
                if delivered:
                    self._config_problem = None
                    self._set_health(Health(True, "last send succeeded"))
                else:  # a peer refusing everything is no sink that works (its dead letters say what it refused)
                    self._set_health(Health(False, f"every event of the last send was refused: {dead[-1][1]}"))
                break
            pending_only = not retry
            delay = result.retry_after or 0.0
            if pending:
                delay = max(delay, PENDING_MIN_WAIT)
            if retry:
                self.metrics.failed.labels(self.name, "retry").inc(len(retry))
                reason = retry[0][1]
                if problem is not None:
                    self._config_problem = problem
                self._set_health(Health(False, f"send failed, retrying: {reason}"))
                if policy.max_attempts is not None and attempt >= policy.max_attempts:
                    dead.extend((event, f"gave up after {attempt} attempts: {why}") for event, why in retry)
                    retry = []
                    if not pending:
                        break
                else:
                    delay = max(backoff(attempt, policy), delay)
                    log.warning(
                        "send failed, will retry",
                        extra={
                            "sink": self.name,
                            "events": len(retry),
                            "attempt": attempt,
                            "delay_s": round(delay, 3),
                            "reason": reason,
                        },
                    )
            if not await self._pause(delay):
                return None  # nothing committed: the events stay owed at this sink's cursor
            todo = [event for event, _ in retry] + pending
            self._in_flight = len(todo)
        return dead

    def _stalled(self, events: int) -> None:
        """A send has not returned within SEND_STALLED: its answer, when it comes, says how the sink is."""
        log.warning(
            "send has not returned; the sink delivers nothing meanwhile",
            extra={"sink": self.name, "events": events, "after_s": SEND_STALLED},
        )
        self._set_health(Health(False, f"a send has not returned for {SEND_STALLED:g}s"))

    async def _pause(self, delay: float) -> bool:
        """Wait `delay` seconds before sending again, or less when the runner halts: whether to go on."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._halted.wait(), delay)
        return not self._halting

    async def _commit(self, position: int, dead: list[tuple[Event, str]]) -> None:
        # Until this commits, the dead letters exist only here: keep trying, never skip past them.
        await self._persist(
            lambda: self.journal.commit_progress(self.name, position, dead, self.active_sinks), "record progress"
        )
        self.cursor = position
        if self.legacy:  # what is read is not yet delivered: a runner rebuilt or started again reads it again
            self.legacy = {name: until for name, until in self.legacy.items() if until > position}

    async def _persist(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a journal operation, retrying through journal errors (a full disk, a locked file) until it works, the
        sink shown down meanwhile (it delivers nothing; its next send, or check when idle, says how it is)."""
        delay = 0.1
        while True:
            try:
                return await operation()
            except JournalClosed:
                raise
            except JournalError as exc:
                log.error(f"cannot {what}; retrying", extra={"sink": self.name, "error": str(exc)})
                self._set_health(Health(False, f"cannot {what}, retrying: {exc}"))  # stuck: say so
                await asyncio.sleep(delay)
                delay = min(delay * 2, JOURNAL_RETRY_MAX)

    def _set_health(self, health: Health) -> None:
        self.health = health
        self._health_seen += 1
        self.metrics.sink_up.labels(self.name).set(1 if health.ok else 0)

    async def check_health(self) -> Health:
        """Run the sink's health check and record it, unless a send answered meanwhile (that is newer)."""
        seen = self._health_seen
        health = await check(self.sink, HEALTH_TIMEOUT)
        if health.ok and self._config_problem is not None:
            health = Health(False, f"last send failed: {self._config_problem} (red until a send succeeds)")
        if self._health_seen == seen:
            self._set_health(health)
        return health


def build_sinks(config: Config, names: Iterable[str] | None = None) -> dict[str, Sink]:
    """Build the configured sinks, or those named, through the registry (no network I/O)."""
    wanted = config.sinks if names is None else names
    return registry.build({name: (config.sinks[name].type, config.sinks[name].options) for name in wanted})


class DeliveryEngine:
    """All the sink runners of one process."""

    def __init__(self, config: Config, journal: Journal, metrics: Metrics, sinks: Mapping[str, Sink]) -> None:
        self.config = config
        self.journal = journal
        self.metrics = metrics
        self.sinks = dict(sinks)
        self.runners: dict[str, SinkRunner] = {}
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._hurried = asyncio.Event()
        self._abandoned = asyncio.Event()
        active = active_sinks(config)
        for name in active:
            self.runners[name] = self._runner(name, config, active)
        journal.replay_sinks = frozenset(active)  # replays for other sinks wait until a configuration feeds them

    def _runner(self, name: str, config: Config, active: Sequence[str]) -> SinkRunner:
        runner = SinkRunner(
            name, self.sinks[name], config.sinks[name], config.streams_of(name), self.journal, self.metrics, active
        )
        self.metrics.backlog.labels(name).set_function(runner.owed)
        return runner

    async def _launch(self, runner: SinkRunner) -> None:
        await runner.prime()
        self._tasks[runner.name] = [
            asyncio.create_task(runner.deliver(), name=f"sink:{runner.name}"),
            asyncio.create_task(self._watch_health(runner), name=f"health:{runner.name}"),
            asyncio.create_task(runner.count_forever(), name=f"backlog:{runner.name}"),
        ]

    async def start(self) -> None:
        """Start delivering, and check each sink's health in the background (a red check does not stop intake)."""
        for runner in self.runners.values():
            await self._launch(runner)

    @staticmethod
    async def _watch_health(runner: SinkRunner) -> None:
        """Check the sink's health at start, then again every HEALTH_RECHECK seconds while it is red with nothing
        to send: a failed check (or a send that gave up) would otherwise keep it red after the sink is back.
        While it owes events its sends say how it is, and a check does not overrule them."""
        health = await runner.check_health()
        if health.ok:
            log.info("sink healthy", extra={"sink": runner.name, "detail": health.message})
        else:
            log.error("sink health check failed", extra={"sink": runner.name, "detail": health.message})
        while True:
            await asyncio.sleep(HEALTH_RECHECK)
            if runner.health.ok or runner.owed():
                continue
            health = await runner.check_health()
            if health.ok:
                log.info("sink healthy again", extra={"sink": runner.name, "detail": health.message})

    async def reconfigure(self, config: Config, built: Mapping[str, Sink]) -> None:
        """Apply a reloaded configuration: `built` holds the new sinks (added or changed). A removed sink's
        cursor is dropped; an added one starts at the journal's end; a changed one is rebuilt at its cursor.
        A sink no stream feeds (one only the WorkOS export archive uses) is kept unless removed or changed."""
        active = active_sinks(config)
        # The one journal write a reload cannot do without, before anything changes: when it fails (a full
        # disk), the reload fails with every runner of the running configuration still delivering.
        added = [name for name in active if name not in self.runners]
        try:
            await self.journal.start_cursors(added, self.journal.last_seq)
        except BaseException:
            for sink in built.values():
                await _close(sink)
            raise
        # Replays for a sink on its way out stay in `replays` from now on; those for an added one once it runs.
        self.journal.replay_sinks = frozenset(active).intersection(self.journal.replay_sinks or ())
        before = self.config
        owed = {name: runner.owed() for name, runner in self.runners.items()}
        legacy = {name: dict(runner.legacy) for name, runner in self.runners.items()}
        for name in active:  # acknowledged under streams that no longer feed the sink: still owed by it
            dropped = set(before.streams_of(name)) - set(config.streams_of(name)) if name in before.sinks else set()
            legacy.setdefault(name, {}).update(dict.fromkeys(dropped, math.inf))
        gone = [name for name in self.runners if name not in active or name in built]
        for name in gone:  # its sink object is kept when the configuration still has it unchanged
            await self._retire(name, config.server.shutdown_timeout, close=name not in config.sinks or name in built)
        for name in [n for n in self.sinks if n not in config.sinks or n in built]:
            await _close(self.sinks.pop(name))
        for name in active:
            if name in self.runners:
                runner = self.runners[name]
                runner.streams = frozenset(config.streams_of(name))
                runner.legacy = legacy[name]
                runner.active_sinks = tuple(active)
        removed = [name for name in gone if name not in active]
        if removed:
            # From here on the reload goes to its end: a journal write that fails is only logged, what it would
            # have recorded being also true without it (a removed sink's cursor is read by no runner; the rows
            # every remaining sink has passed are freed by the next progress any of them records).
            await _unless_refused(self.journal.drop_cursors(removed), "forget the removed sinks' cursors")
            for name in removed:
                self.metrics.forget_sink(name)  # its runner has stopped: nothing counts for it any more
                log.warning(
                    "sink removed: its undelivered events are no longer owed to it",
                    extra={"sink": name, "undelivered_events": owed.get(name, 0)},
                )
        self.sinks.update(built)
        for name in active:
            if name not in self.runners:
                self.runners[name] = runner = self._runner(name, config, active)
                runner.legacy = legacy.get(name, {})
                await self._launch(runner)
        self.config = config
        self.journal.replay_sinks = frozenset(active)
        # A removed sink may have been the one holding rows back.
        await _unless_refused(self.journal.free_passed(active), "free the rows every sink has passed")

    def owed_elsewhere(self) -> dict[str, dict[str, float]]:
        """Each sink's streams that fed it until a reload, and up to which seq (inf: still settling)."""
        return {name: dict(runner.legacy) for name, runner in self.runners.items() if runner.legacy}

    def carry(self, legacy: Mapping[str, Mapping[str, float]]) -> None:
        """Give the runners (before they start) what earlier configurations left them owing."""
        for name, streams in legacy.items():
            if name in self.runners:
                self.runners[name].legacy.update(streams)

    def close_legacy(self, streams: Iterable[str], until: int) -> None:
        """The requests in flight on `streams` when a reload stopped them feeding some sinks have finished:
        those sinks still owe their events up to `until`, and no later ones."""
        for runner in self.runners.values():
            for name in streams:
                if runner.legacy.get(name) == math.inf:
                    runner.legacy[name] = until

    def abandon(self) -> None:
        """Stop now: `stop` waits no longer for the sinks to drain (what they hold stays in the journal)."""
        self._abandoned.set()

    def hurry(self) -> None:
        """The process is stopping: a reload stops waiting for retired sinks' sends in progress (what they
        were sending stays at their cursors)."""
        self._hurried.set()

    async def _retire(self, name: str, deadline: float, close: bool) -> None:
        runner = self.runners.pop(name)
        runner.halt()
        tasks = self._tasks.pop(name, [])
        if tasks:
            hurried = asyncio.ensure_future(self._hurried.wait())
            try:
                await asyncio.wait([tasks[0], hurried], timeout=max(deadline, 1.0), return_when=asyncio.FIRST_COMPLETED)
            finally:
                hurried.cancel()
        pending = [task for task in tasks[:1] if not task.done()]
        for task in [*pending, *tasks[1:]]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        runner.unsubscribe()
        for gauge in (self.metrics.backlog, self.metrics.sink_up):
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        if close:
            await _close(self.sinks.pop(name))

    async def stop(self, deadline: float) -> dict[str, int]:
        """Let the sinks drain the backlog for up to `deadline` seconds, then close them. Returns the sinks still
        delivering then, with the events each had left (empty: all drained)."""
        for runner in self.runners.values():
            runner.stop()
        runs = {tasks[0]: name for name, tasks in self._tasks.items()}
        others = [task for tasks in self._tasks.values() for task in tasks[1:]]
        if runs:
            every = asyncio.ensure_future(asyncio.wait(runs))
            abandoned = asyncio.ensure_future(self._abandoned.wait())
            await asyncio.wait([every, abandoned], timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
            every.cancel()
            abandoned.cancel()
        done = {task for task in runs if task.done()}
        pending = set(runs) - done
        left = {runs[task]: self.runners[runs[task]].owed() for task in pending}
        for task in [*pending, *others]:
            task.cancel()
        await asyncio.gather(*pending, *others, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("sink runner failed", extra={"task": task.get_name(), "error": repr(task.exception())})
        for sink in self.sinks.values():
            await _close(sink)
        return left


async def _unless_refused(write: Awaitable[None], what: str) -> None:
    """A journal write a reload can go on without: its failure is logged."""
    try:
        await write
    except JournalClosed:
        raise
    except JournalError as exc:
        log.error(f"reload: cannot {what} in the journal; going on without", extra={"error": str(exc)})


async def _close(sink: Sink) -> None:
    try:
        await sink.close()
    except Exception:
        log.exception("closing a sink failed")


def active_sinks(config: Config) -> list[str]:
    """The sinks some stream feeds, in configuration order."""
    return [name for name in config.sinks if config.streams_of(name)]

"""The delivery engine: each sink reads the journal at its own cursor, in batches, and the engine retries
with exponential backoff and full jitter, dead-letters permanent failures, and keeps the metrics.

Written once for every sink: a sink only sends one batch and classifies the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from receiver.config import Config, RetryConfig, SinkSection
from receiver.errors import JournalClosed, JournalError
from receiver.journal import Journal
from receiver.metrics import Metrics
from sinks import registry
from sinks.base import Event, Health, Outcome, SendResult, Sink

log = logging.getLogger(__name__)

JOURNAL_RETRY_MAX = 5.0
"""Longest wait between tries of a journal operation that failed."""

T = TypeVar("T")

IDLE_POLL = 1.0
"""How often an idle sink looks at the journal anyway: `dlq replay` writes from another process."""


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
        self.journal = journal
        self.metrics = metrics
        self.active_sinks = tuple(active_sinks)
        self.wants_action = action_filter(section.include_actions, section.exclude_actions)
        self._every_action = not section.include_actions and not section.exclude_actions
        self.cursor = 0
        self.health = Health(True, "not checked yet")
        self._config_problem: str | None = None
        """The last configuration problem a send met (a refused token, a wrong URL): health stays red with it
        until a send succeeds, whatever the sink's own check says."""
        self._read_pos = 0
        self._buffer: deque[Event] = deque()
        self._buffered_bytes = 0
        self._first_buffered_at = 0.0
        self._signal = journal.subscribe()
        self._stopping = False
        self._caught_up = False

    def _wants(self, event: Event, target: str | None) -> bool:
        if target is not None:
            return target == self.name
        return event.stream in self.streams and self.wants_action(event.action)

    async def _fill(self) -> None:
        """Read more rows into the buffer; sets `_caught_up` when the journal has nothing more."""
        limit = max(2 * self.section.batch.max_events, 256)
        if len(self._buffer) >= self.section.batch.max_events:
            return
        rows = await self._persist(lambda: self.journal.read(self._read_pos, limit), "read the journal")
        self._caught_up = len(rows) < limit
        if not rows:
            return
        self._read_pos = rows[-1][0].seq
        if self._every_action:  # the common case: no filters, so only the stream and the target decide
            wanted = [
                event
                for event, target in rows
                if (event.stream in self.streams if target is None else target == self.name)
            ]
        else:
            wanted = [event for event, target in rows if self._wants(event, target)]
        if wanted:
            if not self._buffer:
                self._first_buffered_at = time.monotonic()
            self._buffer.extend(wanted)
            self._buffered_bytes += sum(len(event.raw) for event in wanted)

    def _take_batch(self) -> list[Event]:
        batch: list[Event] = []
        size = 0
        limits = self.section.batch
        while self._buffer and len(batch) < limits.max_events:
            event = self._buffer[0]
            if batch and size + len(event.raw) > limits.max_bytes:
                break
            size += len(event.raw)
            batch.append(self._buffer.popleft())
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

    async def run(self) -> None:
        """Deliver until stopped; on stop, keep draining until the backlog is empty."""
        self.cursor = (await self.journal.cursors([self.name]))[self.name]
        self._read_pos = self.cursor
        while True:
            self._signal.clear()
            await self._fill()
            self.metrics.backlog.labels(self.name).set(max(0, self.journal.last_seq - self.cursor))
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

    async def _deliver(self, batch: list[Event]) -> None:
        policy = self.section.retry
        todo = batch
        dead: list[tuple[Event, str]] = []
        attempt = 0
        pending_only = False
        while todo:
            if not pending_only:  # asking again about events awaiting the peer's confirmation is no new attempt
                attempt += 1
            started = time.monotonic()
            try:
                result = await self.sink.send(todo)
            except Exception as exc:  # a sink must classify, but a bug in one must not stop delivery
                log.exception("sink raised instead of classifying", extra={"sink": self.name})
                result = SendResult.retry(f"sink error: {type(exc).__name__}")
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
                self._config_problem = None
                self._set_health(Health(True, "last send succeeded"))
                break
            pending_only = not retry
            delay = result.retry_after or 0.0
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
            await asyncio.sleep(delay)
            todo = [event for event, _ in retry] + pending
        if dead:
            self.metrics.dead_lettered.labels(self.name).inc(len(dead))
            log.error("events dead-lettered", extra={"sink": self.name, "events": len(dead), "reason": dead[0][1]})
        position = self._buffer[0].seq - 1 if self._buffer else self._read_pos
        await self._commit(position, dead)

    async def _commit(self, position: int, dead: list[tuple[Event, str]]) -> None:
        # Until this commits, the dead letters exist only here: keep trying, never skip past them.
        await self._persist(
            lambda: self.journal.commit_progress(self.name, position, dead, self.active_sinks), "record progress"
        )
        self.cursor = position

    async def _persist(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a journal operation, retrying through journal errors (a full disk, a locked file) until it works."""
        delay = 0.1
        while True:
            try:
                return await operation()
            except JournalClosed:
                raise
            except JournalError as exc:
                log.error(f"cannot {what}; retrying", extra={"sink": self.name, "error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, JOURNAL_RETRY_MAX)

    def _set_health(self, health: Health) -> None:
        self.health = health
        self.metrics.sink_up.labels(self.name).set(1 if health.ok else 0)

    async def check_health(self) -> Health:
        """Run the sink's health check and record it."""
        try:
            health = await self.sink.healthcheck()
        except Exception as exc:
            health = Health(False, f"health check raised {type(exc).__name__}")
        if health.ok and self._config_problem is not None:
            health = Health(False, f"last send failed: {self._config_problem} (red until a send succeeds)")
        self._set_health(health)
        return health


def build_sinks(config: Config, names: Iterable[str] | None = None) -> dict[str, Sink]:
    """Build the configured sinks, or those named (no network I/O)."""
    sinks: dict[str, Sink] = {}
    for name in config.sinks if names is None else names:
        section = config.sinks[name]
        factory = registry.load(section.type)
        sinks[name] = factory(name, section.options)
    return sinks


class DeliveryEngine:
    """All the sink runners of one process."""

    def __init__(self, config: Config, journal: Journal, metrics: Metrics, sinks: Mapping[str, Sink]) -> None:
        active = [name for name in config.sinks if config.streams_of(name)]
        self.runners = {
            name: SinkRunner(name, sinks[name], config.sinks[name], config.streams_of(name), journal, metrics, active)
            for name in active
        }
        self.sinks = dict(sinks)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start delivering, and check each sink's health in the background (a red check does not stop intake)."""
        for runner in self.runners.values():
            self._tasks.append(asyncio.create_task(runner.run(), name=f"sink:{runner.name}"))
            self._tasks.append(asyncio.create_task(self._first_check(runner), name=f"health:{runner.name}"))

    @staticmethod
    async def _first_check(runner: SinkRunner) -> None:
        health = await runner.check_health()
        if health.ok:
            log.info("sink healthy", extra={"sink": runner.name, "detail": health.message})
        else:
            log.error("sink health check failed", extra={"sink": runner.name, "detail": health.message})

    async def stop(self, deadline: float) -> bool:
        """Let the sinks drain the backlog for up to `deadline` seconds, then close them. True if all drained."""
        for runner in self.runners.values():
            runner.stop()
        done, pending = await asyncio.wait(self._tasks, timeout=deadline) if self._tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("sink runner failed", extra={"task": task.get_name(), "error": repr(task.exception())})
        for sink in self.sinks.values():
            try:
                await sink.close()
            except Exception:
                log.exception("closing a sink failed")
        return not [t for t in pending if t.get_name().startswith("sink:")]

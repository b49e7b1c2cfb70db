"""The compliance suite every registered sink runs: success, retryable failure, permanent failure,
partial failure, close.

A sink's test module supplies a `Harness`: it starts the sink's peer (a local stand-in or a real server),
builds the sink pointed at it, can tell the peer how to answer, and reports what the peer stored.
Third-party sinks can run the same checks against their own harness. The checks raise ComplianceError (an
AssertionError, so test runners report it as a failure) explicitly: they hold under `python -O` too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import orjson

from receiver.samples import sample_wrappers
from sinks.base import Event, Health, Outcome, SendResult, Sink
from sinks.outcome import Verdict

REJECT_ACTION = "compliance.reject"
"""A harness in partial mode makes its peer reject every event with this action, and only those."""

Mode = Literal["ok", "retry", "permanent", "partial"]
CHECKS = ("success", "retry", "permanent", "partial", "close")


class Harness(Protocol):
    """A sink wired to a peer that can be told how to answer."""

    supports: frozenset[str]
    """Which of "retry", "permanent", "partial" the peer can be made to produce."""

    async def start(self) -> None:
        """Start the peer."""

    async def stop(self) -> None:
        """Stop the peer and remove what it made."""

    def build(self) -> Sink:
        """A new sink pointed at the peer."""

    def set_mode(self, mode: Mode) -> None:
        """How the peer answers from now on: normally, with a retryable failure, with a permanent failure,
        or rejecting only the events whose action is REJECT_ACTION."""

    async def received(self) -> list[dict[str, Any]]:
        """The bare WorkOS events the peer has stored so far, in any order."""


def make_events(count: int, *, start_seq: int = 1, stream: str = "workos", reject: Sequence[int] = ()) -> list[Event]:
    """Realistic journaled events; those at the indexes in `reject` carry REJECT_ACTION."""
    now = time.time()
    wrappers = sample_wrappers(count, "compliance", actions=("user.signed_in",), start=now - 60)
    events = []
    for index, wrapper in enumerate(wrappers):
        if index in reject:
            wrapper["event"]["action"] = REJECT_ACTION
        action, occurred = wrapper["event"]["action"], now - 60 + index * 0.001
        events.append(
            Event(start_seq + index, stream, orjson.dumps(wrapper), action=action, time=occurred, received_at=now)
        )
    return events


class ComplianceError(AssertionError):
    """A sink did not behave as the delivery engine needs."""


def check(condition: object, message: object) -> None:
    """Fail the check with `message` unless `condition` holds (not an `assert`: it survives `python -O`)."""
    if not condition:
        raise ComplianceError(str(message))


async def settle(sink: Sink, batch: Sequence[Event], *, limit: float = 30.0) -> SendResult:
    """Send `batch` the way the delivery engine treats PENDING events (asked about again after their
    `retry_after`, for at most `limit` seconds) and return every event's final verdict."""
    verdicts: dict[int, Verdict] = {}
    todo = list(batch)
    deadline = time.monotonic() + limit
    while todo:
        result = await sink.send(todo)
        pending: list[Event] = []
        wait = 0.0
        for event in todo:
            verdict = result.outcome_of(event)
            if verdict is None:
                continue
            if verdict.outcome is Outcome.PENDING and time.monotonic() < deadline:
                pending.append(event)
                wait = max(wait, verdict.retry_after or 0.0)
            else:
                verdicts[event.seq] = verdict
        if pending:
            await asyncio.sleep(wait)
        todo = pending
    return SendResult.collect(batch, verdicts)


def _ids(events: Sequence[dict[str, Any]]) -> list[str]:
    return sorted(str(event["id"]) for event in events)


async def check_success(harness: Harness) -> None:
    """A normal send delivers every event, once, unchanged."""
    harness.set_mode("ok")
    sink = harness.build()
    try:
        events = make_events(25)
        result = await settle(sink, events)
        check(result.outcome is Outcome.SUCCESS and not result.failures, result)
        stored = await harness.received()
        check(_ids(stored) == _ids([e.event for e in events]), "the peer did not store every event exactly once")
        by_id = {str(e["id"]): e for e in stored}
        for event in events:
            check(by_id[event.event["id"]] == event.event, f"event {event.event['id']} arrived altered")
    finally:
        await sink.close()


async def check_retry(harness: Harness) -> None:
    """A retryable failure is classified RETRY with a reason; once the peer recovers the batch goes through."""
    harness.set_mode("retry")
    sink = harness.build()
    try:
        events = make_events(10)
        result = await settle(sink, events)
        failures = [result.outcome_of(e) for e in events]
        check(all(f is not None and f.outcome is Outcome.RETRY for f in failures), result)
        check(all(f is not None and f.reason for f in failures), result)
        harness.set_mode("ok")
        retried = await settle(sink, events)
        check(retried.outcome is Outcome.SUCCESS and not retried.failures, retried)
        stored = set(_ids(await harness.received()))
        check(stored >= set(_ids([e.event for e in events])), "events retried after recovery did not all arrive")
    finally:
        await sink.close()


async def check_permanent(harness: Harness) -> None:
    """A permanent failure is classified PERMANENT with a reason, for every event of the batch."""
    harness.set_mode("permanent")
    sink = harness.build()
    try:
        events = make_events(5)
        result = await settle(sink, events)
        for event in events:
            failure = result.outcome_of(event)
            check(failure is not None and failure.outcome is Outcome.PERMANENT and failure.reason, result)
    finally:
        await sink.close()


async def check_partial(harness: Harness) -> None:
    """When the peer rejects one event, only that one fails (PERMANENT, with a reason); the rest are stored."""
    harness.set_mode("partial")
    sink = harness.build()
    try:
        events = make_events(12, reject=(7,))
        result = await settle(sink, events)
        bad = events[7]
        failure = result.outcome_of(bad)
        check(failure is not None and failure.outcome is Outcome.PERMANENT and failure.reason, result)
        for event in events:
            if event is not bad:
                check(result.outcome_of(event) is None, (event, result))
        stored = _ids(await harness.received())
        check(bad.event["id"] not in stored, "the rejected event was stored")
        check(
            set(stored) >= {e.event["id"] for e in events if e is not bad}, "events beside the rejected one were lost"
        )
    finally:
        await sink.close()


async def check_close(harness: Harness) -> None:
    """A healthy peer passes the health check; close releases the sink and may be called twice."""
    harness.set_mode("ok")
    sink = harness.build()
    health = await sink.healthcheck()
    check(isinstance(health, Health) and health.ok, health)
    check(health.message, "the health check has no message")
    await settle(sink, make_events(1))
    await sink.close()
    await sink.close()


def unsupported(name: str, harness: Harness) -> bool:
    """Whether the check needs a failure mode the harness's peer cannot produce (the caller skips it)."""
    return name in ("retry", "permanent", "partial") and name not in harness.supports


async def run_with_peer(name: str, harness: Harness) -> None:
    """Start the harness's peer, run one named check, stop the peer."""
    await harness.start()
    try:
        await run_check(name, harness)
    finally:
        await harness.stop()


async def run_check(name: str, harness: Harness) -> None:
    """Run one named check (one of CHECKS)."""
    await {
        "success": check_success,
        "retry": check_retry,
        "permanent": check_permanent,
        "partial": check_partial,
        "close": check_close,
    }[name](harness)

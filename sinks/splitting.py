"""Sending a batch as HTTP requests and splitting a refused request down to the events at fault.

Splunk HEC and the Datadog intake refuse a whole request for one bad event and do not always say which
(HEC sometimes names it with `invalid-event-number`). Both sinks hand their encoded events to `send_in_parts`,
which posts each part, bisects a refused one until the bad events stand alone (or cuts out the named one), and
stops at the first answer that says "later" so nothing more is tried against a failing peer. What happened to
every event is gathered in a `Tally`, which becomes the batch's `SendResult`. Retrying is still the delivery
engine's: this only decides, within one `send`, which events failed and how.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sinks.base import Event, Failure, Outcome, SendResult

__all__ = ["Answer", "Item", "Part", "Tally", "send_in_parts"]

Item = tuple[Event, bytes]
"""An event and its encoded bytes, ready to be joined into a request body."""
Part = list[Item]
"""The items of one request."""


@dataclass(frozen=True, slots=True)
class Answer:
    """How the peer answered one request, as far as the events it carried are concerned."""

    outcome: Outcome
    reason: str = ""
    retry_after: float | None = None
    refused_data: bool = False
    """The peer refused the request's content (HEC 400 with a data code, 413; Datadog 400/413): split it."""
    bad_index: int | None = None
    """Which item of the request the peer blamed, when it says."""

    @classmethod
    def ok(cls) -> Answer:
        """Accepted."""
        return _OK

    @classmethod
    def retry(cls, reason: str, retry_after: float | None = None) -> Answer:
        """Not accepted now; stop this send and let the engine try again later."""
        return cls(Outcome.RETRY, reason, retry_after)

    @classmethod
    def permanent(cls, reason: str) -> Answer:
        """These events will never be accepted as they are."""
        return cls(Outcome.PERMANENT, reason)

    @classmethod
    def refused(cls, reason: str, bad_index: int | None = None) -> Answer:
        """Something in the request's data was refused: find it."""
        return cls(Outcome.PERMANENT, reason, refused_data=True, bad_index=bad_index)


_OK = Answer(Outcome.SUCCESS)


@dataclass(slots=True)
class Tally:
    """What happened to each event of one batch so far; events not named were delivered."""

    failures: dict[int, Failure] = field(default_factory=dict)
    retry_after: float | None = None
    halted: Answer | None = None
    """The retryable answer that stopped the send: what was left was not tried against a failing peer."""

    def fail(self, events: Iterable[Event], outcome: Outcome, reason: str) -> None:
        """Record one outcome for these events."""
        failure = Failure(outcome, reason)
        for event in events:
            self.failures[event.seq] = failure

    def wait_at_least(self, seconds: float | None) -> None:
        """Keep the longest wait a peer asked for."""
        if seconds is not None:
            self.retry_after = seconds if self.retry_after is None else max(self.retry_after, seconds)

    def result(self, batch: Sequence[Event]) -> SendResult:
        """The batch's classified result: one outcome when every event shares it, else per-event failures."""
        if not self.failures:
            return SendResult.success()
        distinct = set(self.failures.values())
        if len(self.failures) == len(batch) and len(distinct) == 1:
            only = distinct.pop()
            return SendResult(only.outcome, only.reason, self.retry_after if only.outcome is Outcome.RETRY else None)
        return SendResult.partial(self.failures, self.retry_after)


async def send_in_parts(
    parts: Iterable[Part], post: Callable[[Part], Awaitable[Answer]], tally: Tally, *, peer: str
) -> None:
    """Post every part in order, splitting refused ones, and record each event's outcome in `tally`.

    A part the peer refuses for its data is halved (or, when the peer names the bad item, that item is taken
    out and the rest is sent again) until each refused event stands alone and is failed PERMANENT with the
    peer's text. A RETRY answer halts the send: that part and every part not yet posted are failed RETRY with
    the peer's reason and `Retry-After`. `peer` names the peer in reasons ("HEC", "Datadog").
    """
    stack = list(parts)
    stack.reverse()
    while stack:
        part = stack.pop()
        if tally.halted is not None:
            tally.fail((event for event, _ in part), Outcome.RETRY, tally.halted.reason)
            continue
        answer = await post(part)
        if answer.outcome is Outcome.SUCCESS:
            continue
        if answer.outcome is Outcome.RETRY:
            tally.halted = answer
            tally.wait_at_least(answer.retry_after)
            tally.fail((event for event, _ in part), Outcome.RETRY, answer.reason)
        elif not answer.refused_data:
            tally.fail((event for event, _ in part), Outcome.PERMANENT, answer.reason)
        elif len(part) == 1:
            tally.fail([part[0][0]], Outcome.PERMANENT, f"{peer} refused this event: {answer.reason}")
        elif answer.bad_index is not None and 0 <= answer.bad_index < len(part):
            bad = answer.bad_index
            tally.fail([part[bad][0]], Outcome.PERMANENT, f"{peer} refused this event: {answer.reason}")
            # The peer may already have taken the items before the bad one; sending them again keeps
            # delivery at-least-once whether or not it did.
            stack.append(part[:bad] + part[bad + 1 :])
        else:
            middle = len(part) // 2
            stack.append(part[middle:])
            stack.append(part[:middle])

"""What a sink answers: one vocabulary for a whole send, for one request of it and for one event.

A `Verdict` is one classified answer (delivered, worth another try, never going to work, or accepted and not
yet confirmed). A `SendResult` is the verdict of a whole `send` plus the events whose own verdict differs.
The delivery engine retries RETRY events with backoff, asks again about PENDING ones after `retry_after`,
dead-letters PERMANENT ones with the reason, and shows a configuration problem in the sink's health until a
send succeeds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from sinks.base import Event

__all__ = ["Outcome", "SendResult", "Verdict"]


class Outcome(enum.Enum):
    """How a send ended for some events."""

    SUCCESS = "success"
    RETRY = "retry"
    PERMANENT = "permanent"
    PENDING = "pending"
    """Accepted by the peer, not yet confirmed durable (HEC indexer acknowledgement): the engine calls `send`
    again with these events after `retry_after`, without counting an attempt, and the sink answers from its
    confirmation state rather than sending them twice."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One classified answer: about a whole send, one request of it, or one event."""

    outcome: Outcome
    reason: str = ""
    retry_after: float | None = None
    """Seconds the peer asked to wait (`Retry-After`); the engine waits at least this long."""
    split: bool = False
    """The peer refused the request's data (HEC 400 with a data code, 413, ...): bisect it (sinks.splitting)."""
    bad_index: int | None = None
    """Which item of the request the peer blamed, when it says."""
    config_problem: bool = False
    """A RETRY that waiting does not cure (a refused token, a wrong URL, a TLS failure): the engine keeps the
    sink unhealthy with this reason until a send succeeds."""

    @classmethod
    def ok(cls) -> Verdict:
        """Delivered."""
        return _OK

    @classmethod
    def retry(cls, reason: str, retry_after: float | None = None, *, config_problem: bool = False) -> Self:
        """Not delivered now; try again later (for a SendResult: the whole batch)."""
        return cls(Outcome.RETRY, reason, retry_after, config_problem=config_problem)

    @classmethod
    def permanent(cls, reason: str) -> Self:
        """Never deliverable as it is: dead-letter it (for a SendResult: the whole batch)."""
        return cls(Outcome.PERMANENT, reason)

    @classmethod
    def refused(cls, reason: str, bad_index: int | None = None) -> Verdict:
        """Something in the request's data was refused: find it by splitting."""
        return cls(Outcome.PERMANENT, reason, split=True, bad_index=bad_index)

    @classmethod
    def pending(cls, reason: str, ask_again_after: float) -> Verdict:
        """Accepted, awaiting the peer's confirmation: ask again after `ask_again_after` seconds."""
        return cls(Outcome.PENDING, reason, ask_again_after)


_OK = Verdict(Outcome.SUCCESS)


@dataclass(frozen=True, slots=True)
class SendResult(Verdict):
    """The classified answer to one `send`: every event of the batch has this verdict except those named in
    `failures` (by `Event.seq`), which have their own."""

    failures: Mapping[int, Verdict] = field(default_factory=dict)

    @classmethod
    def success(cls) -> SendResult:
        """All delivered."""
        return _SUCCESS

    @classmethod
    def of(cls, verdict: Verdict) -> SendResult:
        """The same verdict for every event of the batch."""
        if verdict.outcome is Outcome.SUCCESS:
            return _SUCCESS
        return cls(verdict.outcome, verdict.reason, verdict.retry_after, config_problem=verdict.config_problem)

    @classmethod
    def partial(cls, failures: Mapping[int, Verdict]) -> SendResult:
        """Everything delivered except the events named in `failures`."""
        if not failures:
            return _SUCCESS
        waits = [v.retry_after for v in failures.values() if v.retry_after is not None]
        problem = any(v.config_problem for v in failures.values())
        return cls(Outcome.SUCCESS, "", max(waits) if waits else None, config_problem=problem, failures=dict(failures))

    @classmethod
    def collect(cls, batch: Sequence[Event], verdicts: Mapping[int, Verdict]) -> SendResult:
        """The batch's result from per-event verdicts (events not named were delivered): one verdict when every
        event shares it, else the exceptions."""
        if len(verdicts) == len(batch) and len(distinct := set(verdicts.values())) == 1:
            return cls.of(distinct.pop())
        return cls.partial(verdicts)

    def outcome_of(self, event: Event) -> Verdict | None:
        """The verdict that applies to `event`, or None when it was delivered."""
        own = self.failures.get(event.seq)
        if own is not None:
            return own
        if self.outcome is Outcome.SUCCESS:
            return None
        return Verdict(self.outcome, self.reason, self.retry_after, config_problem=self.config_problem)


_SUCCESS = SendResult(Outcome.SUCCESS)

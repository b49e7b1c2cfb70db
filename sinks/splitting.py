"""Sending a batch as requests and splitting a refused request down to the events at fault.

Splunk HEC, the Datadog intake and most HTTP collectors refuse a whole request for one bad event and do not
always say which (HEC sometimes names it with `invalid-event-number`). A sink hands its encoded events to
`send_in_parts`, which posts each part, bisects a refused one until the bad events stand alone (or cuts out
the named one), and stops at the first answer that says "later" so nothing more is tried against a failing
peer. Each event's verdict is recorded in a dict that `SendResult.collect` turns into the batch's result.
Retrying is still the delivery engine's: this only decides, within one `send`, which events failed and how.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace

from sinks.base import Event
from sinks.outcome import Outcome, Verdict

__all__ = ["Item", "Part", "Verdicts", "fail", "send_in_parts"]

Item = tuple[Event, bytes]
"""An event and its encoded bytes, ready to be joined into a request body."""
Part = list[Item]
"""The items of one request."""
Verdicts = dict[int, Verdict]
"""Per `Event.seq`, the verdict of each event that was not delivered."""


def fail(verdicts: Verdicts, events: Iterable[Event], verdict: Verdict) -> None:
    """Record one verdict for these events."""
    for event in events:
        verdicts[event.seq] = verdict


async def send_in_parts(
    parts: Iterable[Part], post: Callable[[Part], Awaitable[Verdict]], verdicts: Verdicts, *, peer: str
) -> None:
    """Post every part in order, splitting refused ones, and record each undelivered event's verdict.

    A part the peer refuses for its data (`Verdict.split`) is halved (or, when the peer names the bad item,
    that item is taken out and the rest is sent again) until each refused event stands alone and is failed
    PERMANENT with the peer's text. A RETRY answer halts the send: that part and every part not yet posted
    are failed with it. A PENDING answer (accepted, awaiting confirmation) is recorded for the part's events.
    `peer` names the peer in reasons ("HEC", "Datadog").
    """
    stack = list(parts)
    stack.reverse()
    halted: Verdict | None = None
    while stack:
        part = stack.pop()
        if halted is not None:
            fail(verdicts, (event for event, _ in part), halted)
            continue
        answer = await post(part)
        if answer.outcome is Outcome.SUCCESS:
            continue
        if answer.outcome is Outcome.RETRY:
            halted = answer
            fail(verdicts, (event for event, _ in part), answer)
        elif not answer.split or answer.outcome is Outcome.PENDING:
            fail(verdicts, (event for event, _ in part), answer)
        elif len(part) == 1:
            fail(verdicts, [part[0][0]], _alone(answer, peer))
        elif answer.bad_index is not None and 0 <= answer.bad_index < len(part):
            bad = answer.bad_index
            fail(verdicts, [part[bad][0]], _alone(answer, peer))
            # The peer may already have taken the items before the bad one; sending them again keeps
            # delivery at-least-once whether or not it did.
            stack.append(part[:bad] + part[bad + 1 :])
        else:
            middle = len(part) // 2
            stack.append(part[middle:])
            stack.append(part[:middle])


def _alone(answer: Verdict, peer: str) -> Verdict:
    return replace(answer, reason=f"{peer} refused this event: {answer.reason}", split=False, bad_index=None)

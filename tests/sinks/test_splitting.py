"""send_in_parts: the splitting shared by the HEC and Datadog sinks, driven by a peer that refuses bad events.

The peer here is a plain coroutine that behaves like the intakes do: it refuses a whole request when any item in
it is bad, optionally naming the first bad one, or answers "later" for a while. The sinks' own tests run the same
code against their real local peers.
"""

from __future__ import annotations

from collections.abc import Sequence

from sinks.base import Event, Outcome, SendResult, Verdict
from sinks.splitting import Part, Verdicts, send_in_parts
from sinks.testing.compliance import REJECT_ACTION, make_events


class Peer:
    """Refuses requests holding a REJECT_ACTION event; answers RETRY to the first `busy` requests."""

    def __init__(self, *, names_bad_item: bool = False, busy: int = 0, retry_after: float | None = None) -> None:
        self.names_bad_item = names_bad_item
        self.busy = busy
        self.retry_after = retry_after
        self.requests: list[list[int]] = []
        self.accepted: list[int] = []

    async def post(self, part: Part) -> Verdict:
        self.requests.append([event.seq for event, _ in part])
        if self.busy:
            self.busy -= 1
            return Verdict.retry("peer is busy", self.retry_after)
        bad = [index for index, (event, _) in enumerate(part) if event.action == REJECT_ACTION]
        if bad:
            return Verdict.refused("invalid event", bad[0] if self.names_bad_item else None)
        self.accepted.extend(event.seq for event, _ in part)
        return Verdict.ok()


def parts_of(events: Sequence[Event], size: int) -> list[Part]:
    items: Part = [(event, b"{}") for event in events]
    return [items[i : i + size] for i in range(0, len(items), size)]


class TestSendInParts:
    async def test_bisection_dead_letters_only_the_bad_events_and_delivers_the_rest_once(self) -> None:
        events = make_events(100, reject=[7, 63])
        peer, tally = Peer(), {}
        await send_in_parts(parts_of(events, 100), peer.post, tally, peer="Test")
        assert sorted(peer.accepted) == [e.seq for e in events if e.action != REJECT_ACTION]
        assert len(peer.accepted) == len(set(peer.accepted)) == 98
        assert set(tally) == {events[7].seq, events[63].seq}
        assert {f.outcome for f in tally.values()} == {Outcome.PERMANENT}
        assert all(f.reason == "Test refused this event: invalid event" for f in tally.values())
        # two bad events among 100: at most 2 * (log2(100) + 1) refused requests plus the accepted halves
        assert len(peer.requests) <= 30
        result = SendResult.collect(events, tally)
        assert result.outcome is Outcome.SUCCESS
        assert result.outcome_of(events[7]) is not None and result.outcome_of(events[8]) is None

    async def test_a_named_bad_item_is_cut_out_without_bisecting(self) -> None:
        events = make_events(50, reject=[10, 40])
        peer, tally = Peer(names_bad_item=True), {}
        await send_in_parts(parts_of(events, 50), peer.post, tally, peer="Test")
        assert set(tally) == {events[10].seq, events[40].seq}
        assert len(peer.requests) == 3  # refused (names 10), refused (names 39 of the rest), accepted
        assert sorted(peer.accepted) == [e.seq for e in events if e.action != REJECT_ACTION]

    async def test_a_retry_answer_halts_the_send_and_every_untried_part_is_retried_with_the_wait(self) -> None:
        events = make_events(30)
        peer, tally = Peer(busy=1, retry_after=7.0), {}
        await send_in_parts(parts_of(events, 10), peer.post, tally, peer="Test")
        assert peer.requests == [[e.seq for e in events[:10]]]  # nothing more is tried against a busy peer
        result = SendResult.collect(events, tally)
        assert result.outcome is Outcome.RETRY
        assert result.reason == "peer is busy"
        assert result.retry_after == 7.0

    async def test_parts_sent_before_a_halt_count_as_delivered_and_only_the_rest_is_retried(self) -> None:
        events = make_events(30, reject=[2])
        peer, tally = Peer(), {}

        async def busy_on_third(part: Part) -> Verdict:
            if len(peer.requests) >= 2 and part[0][0].seq == events[20].seq:
                peer.requests.append([event.seq for event, _ in part])
                return Verdict.retry("later")
            return await peer.post(part)

        await send_in_parts(parts_of(events, 10), busy_on_third, tally, peer="Test")
        result = SendResult.collect(events, tally)
        assert result.outcome is Outcome.SUCCESS  # partial: per-event failures
        assert {seq for seq, f in tally.items() if f.outcome is Outcome.RETRY} == {e.seq for e in events[20:]}
        assert {seq for seq, f in tally.items() if f.outcome is Outcome.PERMANENT} == {events[2].seq}
        assert sorted(peer.accepted) == [e.seq for e in events[:20] if e.action != REJECT_ACTION]

    async def test_a_permanent_answer_fails_its_part_and_the_others_still_go(self) -> None:
        events = make_events(20)
        accepted: list[int] = []

        async def refuse_first(part: Part) -> Verdict:
            if part[0][0].seq == events[0].seq:
                return Verdict.permanent("unsupported media type")
            accepted.extend(event.seq for event, _ in part)
            return Verdict.ok()

        tally: Verdicts = {}
        await send_in_parts(parts_of(events, 10), refuse_first, tally, peer="Test")
        assert set(tally) == {e.seq for e in events[:10]}
        assert {f.reason for f in tally.values()} == {"unsupported media type"}
        assert accepted == [e.seq for e in events[10:]]

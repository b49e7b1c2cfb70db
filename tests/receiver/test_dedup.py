"""The dedup index on its own: keys found across the current and sealed generations, the window's bounds,
eviction, late keys, fingerprints of negative hashes, a restart's bulk load, and a property test against a
reference model (key -> when it was seen)."""

from __future__ import annotations

import gc
import itertools
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver import dedup
from receiver.dedup import FINGERPRINT, GENERATIONS, DedupIndex
from receiver.journal import Journal
from tests.receiver.test_journal import batch

WINDOW = 12.0
"""With 12 generations, one second each: generation n holds the keys seen in [n, n + 1)."""


def fresh(index: DedupIndex, keys: list[str | None], now: float, stream: str = "s") -> list[int]:
    """Indexes of the fresh elements (all of them spelled out)."""
    found = index.fresh(stream, keys, now, set(), [])
    return list(range(len(keys))) if found is None else found


def seen(index: DedupIndex, keys: list[str], now: float, stream: str = "s") -> list[str]:
    """The keys the index calls duplicates at `now`."""
    new = set(fresh(index, list(keys), now, stream))
    return [key for i, key in enumerate(keys) if i not in new]


def spread(index: DedupIndex, count: int, start: float, stream: str = "s") -> list[str]:
    """Add `count` keys, 10 per call, evenly over the window from `start`; returns them."""
    keys = [f"{stream}-key-{i}" for i in range(count)]
    for i in range(0, count, 10):
        index.add(stream, keys[i : i + 10], start + WINDOW * i / count)
    return keys


class TestFingerprints:
    def test_a_negative_hash_gives_an_unsigned_60_bit_fingerprint(self) -> None:
        key = next(k for k in (f"neg-{i}" for i in itertools.count()) if hash(k) < 0)
        taken: list[int] = []
        DedupIndex(WINDOW, 100).fresh("s", [key], 0.0, set(), taken)
        assert taken == [hash(key) & FINGERPRINT] and 0 <= taken[0] < 1 << 60

    def test_keys_of_negative_and_positive_hashes_are_found_once_sealed(self) -> None:
        keys = [f"sign-{i}" for i in range(200)]
        assert any(hash(k) < 0 for k in keys) and any(hash(k) > 0 for k in keys)
        index = DedupIndex(WINDOW, 1000)
        index.add("s", keys, 0.5)
        index.add("s", ["later"], 3.5)  # generation 0 is sealed
        assert seen(index, keys + ["never"], 4.0) == keys


class TestLookup:
    def test_keys_of_sealed_and_current_generations_are_found(self) -> None:
        index = DedupIndex(WINDOW, 100_000)
        keys = spread(index, 5000, 0.0)  # 12 generations, 11 of them sealed, the buckets split many times
        assert index.size == 5000
        assert seen(index, keys, WINDOW) == keys
        assert fresh(index, [f"other-{i}" for i in range(500)], WINDOW) == list(range(500))

    def test_a_key_twice_in_one_call_the_second_is_the_duplicate(self) -> None:
        index = DedupIndex(WINDOW, 100)
        pending: set[int] = set()
        taken: list[int] = []
        assert index.fresh("s", ["a", "b", "a", None, None], 1.0, pending, taken) == [0, 1, 3, 4]
        assert sorted(taken) == sorted(hash(k) & FINGERPRINT for k in ("a", "b")) and set(taken) == pending

    def test_pending_keys_are_duplicates_before_they_are_added(self) -> None:
        index = DedupIndex(WINDOW, 100)
        pending: set[int] = set()
        assert index.fresh("s", ["a"], 1.0, pending, []) is None
        assert index.fresh("s", ["a", "b"], 1.0, pending, []) == [1]

    def test_streams_are_apart(self) -> None:
        index = DedupIndex(WINDOW, 100)
        index.add("s", ["a"], 0.5)
        index.add("s", ["b"], 5.5)
        assert seen(index, ["a", "b"], 6.0, "t") == []
        assert seen(index, ["a", "b"], 6.0, "s") == ["a", "b"]


class TestWindow:
    @pytest.mark.parametrize("expired", [False, True], ids=["lookup only", "after expire"])
    def test_a_key_is_remembered_a_window_and_forgotten_a_generation_later(self, expired: bool) -> None:
        index = DedupIndex(WINDOW, 100)
        index.add("s", ["k"], 5.5)  # generation 5
        index.add("s", ["newer"], 17.25)  # generation 17: 5 is sealed
        for now, remembered in [(17.5, True), (17.99, True), (18.0, False), (18.5, False)]:
            if expired:
                index.expire(now)
            assert seen(index, ["k"], now) == (["k"] if remembered else []), now
        assert index.size == (1 if expired else 2)
        assert index.cutoff(18.0) == 6.0

    def test_the_window_moves_with_the_newest_key(self) -> None:
        index = DedupIndex(WINDOW, 100)
        index.add("s", ["old"], 0.5)
        index.add("s", ["mid"], 6.5)
        index.add("s", ["new"], 13.0)  # generation 13: generation 0 is out of every window from now on
        assert index.size == 2 and seen(index, ["old", "mid", "new"], 13.0) == ["mid", "new"]

    @pytest.mark.parametrize("back", [3.0, 15.0], ids=["less than a window", "more than a window"])
    def test_keys_after_the_clock_stepped_back_are_remembered_a_window(self, back: float) -> None:
        # A clock that ran ahead and was set right (NTP stepping it back, a VM restored): the keys received
        # since carry earlier times than the newest. Each is still a duplicate for a whole window of the
        # index's time, which only moves on once the clock is past the newest key again.
        index = DedupIndex(WINDOW, 100)
        index.add("s", ["ahead"], 20.5)
        index.add("s", ["after"], 20.5 - back)
        assert seen(index, ["ahead", "after"], 20.5 - back + 1) == ["ahead", "after"]
        index.expire(20.5 + WINDOW - 0.5)
        assert seen(index, ["ahead", "after"], 20.5 + WINDOW - 0.5) == ["ahead", "after"]
        index.add("s", ["later"], 20.5 + WINDOW + 1.5)
        assert index.size == 1 and seen(index, ["ahead", "after"], 20.5 + WINDOW + 1.5) == []

    def test_keys_piling_up_after_the_clock_stepped_back_are_evicted_oldest_first(self) -> None:
        """Was a defect: after a step back every key joined the newest generation, which moves on only once the
        clock is past it again. Past max_keys eviction drops whole generations, oldest first, and at last that
        one: every key received since the step was forgotten at once (here 250 of 300, so every WorkOS retry of
        them would be delivered again). The newest generation now gives way to a new one once it holds
        max_keys / GENERATIONS keys, so eviction forgets the oldest keys first."""
        index = DedupIndex(WINDOW, 120)
        index.add("s", ["ahead"], 20.5)
        keys = [f"k{n}" for n in range(300)]
        for start in range(0, len(keys), 10):
            index.add("s", keys[start : start + 10], 8.5)  # the clock was set back 12 s, and stays there
        assert index.size <= 120
        remembered = seen(index, keys, 9.0)
        assert remembered[-100:] == keys[-100:], f"{len(remembered)} remembered, from {remembered[:1]}"
        index.add("s", ["on"], 20.5 + WINDOW + 40)  # the clock past all of them again, a window on
        assert seen(index, keys, 20.5 + WINDOW + 40) == []

    def test_a_key_late_by_less_than_a_generation_joins_its_own(self) -> None:
        index = DedupIndex(WINDOW, 100)
        index.add("s", ["new"], 20.5)
        index.add("s", ["late"], 19.75)  # received before "new", committed after it
        index.add("s", ["on"], 31.0)  # generation 19 is the oldest of the window: "late" is held still
        assert seen(index, ["late"], 31.0) == ["late"]
        index.add("s", ["on"], 32.0)  # a window after its generation: forgotten, as any key of it
        assert seen(index, ["late", "new"], 32.0) == ["new"]


class TestSealing:
    """A generation that is no longer the newest moves into the sorted buckets."""

    def test_late_keys_join_their_sealed_generation_once(self) -> None:
        index = DedupIndex(WINDOW, 100)
        index.add("s", ["a"], 3.5)
        index.add("s", ["b"], 4.5)  # generation 3 sealed
        index.add("s", ["c", "a"], 3.9)  # received before b, committed after it
        assert index.size == 3
        assert seen(index, ["a", "c"], 15.99) == ["a", "c"]
        assert seen(index, ["a", "c"], 16.0) == []

    def test_a_slot_is_clean_before_it_is_reused(self) -> None:
        index = DedupIndex(WINDOW, 100)
        index.add("s", ["k"], 0.5)  # generation 0, slot 0
        index.add("s", ["x"], 1.5)  # sealed
        index.expire(13.0)  # gone
        index.add("s", ["y"], 16.5)  # generation 16: slot 0 again
        index.add("s", ["z"], 17.5)  # sealed
        assert index.size == 2 and seen(index, ["k", "y", "z"], 17.5) == ["y", "z"]

    def test_a_generation_is_sealed_a_step_at_a_time_and_found_meanwhile(self) -> None:
        index = DedupIndex(WINDOW, 100_000)
        keys = [f"big-{i}" for i in range(5000)]
        index.add("s", keys, 0.5)
        index.add("s", ["next"], 1.5)  # generation 0 is handed over: one step of it moves, not all
        state = index._streams["s"]
        step = dedup.STEP_KEYS + dedup.STEP_PER_KEY  # what a request of one key takes on
        assert sum(state.counts) == step and state.sealing[0].left == 5000 - step
        assert seen(index, keys, 1.6) == keys  # half in the buckets, half still a set: every key is found
        for i in range(4):
            index.add("s", [f"more-{i}"], 1.7)
        assert not state.sealing and sum(state.counts) == 5000 and index.size == 5005
        assert seen(index, keys, 1.8) == keys

    def test_large_requests_seal_and_sweep_within_the_next_generation(self) -> None:
        index = DedupIndex(WINDOW, 10_000_000)
        state = None
        for number in range(3 * GENERATIONS):  # the window fills, then generations expire as new ones seal
            for i in range(5):  # 5 requests of 2,000 keys a generation
                index.add("s", [f"g{number}-{i}-{k}" for k in range(2000)], number + 0.1 + i / 10)
                index.expire(number + 0.1 + i / 10)
            state = index._streams["s"]
            if number:  # what the last generation handed over and freed is done before the next one starts
                assert not state.sealing and state.sweep is None, f"generation {number}"
        assert state is not None and index.size == 2000 * 5 * (GENERATIONS + 1)

    def test_an_expiry_takes_one_step_for_all_the_streams(self) -> None:
        index = DedupIndex(WINDOW, 10_000_000)
        streams = [f"s{n}" for n in range(50)]
        for stream in streams:
            index.add(stream, [f"{stream}-{k}" for k in range(3000)], 0.5)
            index.add(stream, ["next"], 1.5)  # generation 0 handed over, one step of it sealed
        before = sum(sum(index._streams[stream].counts) for stream in streams)
        index.expire(1.6)
        moved = sum(sum(index._streams[stream].counts) for stream in streams) - before
        assert 0 < moved <= dedup.STEP_KEYS

    def test_a_slot_half_swept_is_purged_before_it_is_reused(self) -> None:
        index = DedupIndex(WINDOW, 100_000)
        keys = [f"old-{i}" for i in range(3000)]  # generation 0, slot 0: 16 buckets
        with mock.patch.object(dedup, "STEP_KEYS", 1):  # a step sweeps one bucket
            index.add("s", keys, 0.5)
            for at in (1.5, 5.5, 6.5):  # generations 1, 5 and 6 (1 and 5 sealed, which keeps the buckets)
                index.add("s", [f"at-{at}"], at)
            index.settle()
            index.expire(13.0)  # generation 0 goes: its entries are dead at once, swept a bucket a step
            index.add("s", ["y"], 16.5)  # generation 16 (slot 0), generation 1 goes too: the sweep starts again
            assert index._streams["s"].sweep is not None
            index.add("s", ["z"], 17.5)  # generation 16 is sealed into slot 0: generation 0's entries must be gone
        assert seen(index, keys, 17.6) == []
        assert seen(index, ["y", "z", "at-5.5", "at-6.5"], 17.6) == ["y", "z", "at-5.5", "at-6.5"]
        assert index.size == 4

    def test_fingerprints_on_bucket_edges_are_found_after_the_buckets_split(self) -> None:
        stream = dedup._Stream()
        edges = [(j << 50) + d for j in range(1, 1 << 10) for d in (-1, 0, 1)]  # around every edge of ≤ 1024 buckets
        stream.seal(0, set(edges))
        for number in range(1, GENERATIONS + 1):  # 16 buckets become 128: edges move at every split
            stream.seal(number, {hash(f"g{number}-{i}") & FINGERPRINT for i in range(1200)})
            stream.step(1000)  # split while a generation is half moved in
        stream.settle()
        assert len(stream.buckets) == 128 and sum(stream.counts) == len(edges) + 1200 * GENERATIONS
        assert sorted(stream.sealed(set(edges), 0)) == sorted(edges)
        assert all(list(bucket) == sorted(bucket) for bucket in stream.buckets)
        assert stream.sealed({(j << 50) + 2 for j in range(1, 1 << 10)}, 0) == []


class TestEviction:
    def test_the_oldest_generation_goes_first_and_is_counted(self) -> None:
        index = DedupIndex(WINDOW, 25)
        evictions: list[int] = []
        index.on_evict = evictions.append
        index.add("s", [f"a{i}" for i in range(10)], 1.5)
        index.add("t", [f"b{i}" for i in range(10)], 2.5)
        index.add("s", [f"c{i}" for i in range(10)], 3.5)  # 30 > 25: generation 1 of s goes
        assert (index.size, index.evicted, evictions) == (20, 10, [10])
        assert seen(index, ["a0", "c0"], 4.0) == ["c0"] and seen(index, ["b0"], 4.0, "t") == ["b0"]
        index.add("s", [f"d{i}" for i in range(10)], 4.5)  # 30 again: t's generation 2 goes
        assert (index.size, index.evicted, evictions) == (20, 20, [10, 10])
        assert seen(index, ["c0", "d0"], 5.0) == ["c0", "d0"] and seen(index, ["b0"], 5.0, "t") == []
        index.add("s", [f"e{i}" for i in range(10)], 5.5)  # and s's sealed generation 3
        assert (index.size, index.evicted, evictions) == (20, 30, [10, 10, 10])
        assert seen(index, ["c0", "d0", "e0"], 6.0) == ["d0", "e0"]

    def test_a_generation_larger_than_the_bound_is_dropped_whole(self) -> None:
        index = DedupIndex(WINDOW, 5)
        index.add("s", [f"k{i}" for i in range(8)], 1.0)
        assert (index.size, index.evicted) == (0, 8)
        assert seen(index, ["k1"], 1.5) == []


def gc_visits(root: object) -> int:
    """The references a full garbage collection follows from the GC-tracked objects reachable from `root` (it
    visits each of them, a cache miss apiece, with the GIL held): how long its pause is, in references."""
    seen: set[int] = set()
    todo = [root]
    visits = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or not gc.is_tracked(obj) or callable(obj) or isinstance(obj, types.ModuleType):
            continue  # the index's own data, not the code and modules its callbacks lead to
        seen.add(id(obj))
        referents = gc.get_referents(obj)
        visits += len(referents)
        todo += referents
    return visits


class TestGarbageCollection:
    @pytest.mark.parametrize("sealing", [False, True])
    def test_a_full_collection_visits_none_of_the_keys(self, sealing: bool) -> None:
        # 200,000 keys in one generation (a busy stream's two hours): held as Python ints in a set, every full
        # collection visited each of them (≈ 14 ms of GIL held per 200,000, every few seconds under load).
        index = DedupIndex(WINDOW, 1_000_000)
        for i in range(0, 200_000, 100):
            index.add("s", [f"key-{k}" for k in range(i, i + 100)], 0.5)
        if sealing:  # the next generation starts: this one is sealed a step at a time, looked up meanwhile
            index.add("s", ["next"], 1.5)
            assert index._streams["s"].sealing
        assert index.size == 200_000 + sealing
        assert gc_visits(index) < 1_000
        assert seen(index, ["key-0", "key-199999", "key-200000"], 1.6) == ["key-0", "key-199999"]


class TestNewestGeneration:
    def test_no_dict_of_it_grows_past_a_part(self) -> None:
        # One dict held the newest generation: growing, it copied its whole table with the GIL held, a pause
        # of the whole service of ≈ 65 ms at 2 M keys (bench.dedup's burst), more with a larger max_keys.
        index = DedupIndex(WINDOW, 1_000_000)
        with mock.patch.object(dedup, "PART_KEYS", 1000):
            for i in range(0, 5_500, 100):
                pending: set[int] = set()
                taken: list[int] = []
                batch = [f"key-{k}" for k in range(i, i + 100)]
                assert index.fresh("s", batch, 0.5, pending, taken) is None
                index.add_prints("s", taken, 0.5)
            index.add("s", ["key-0", "key-5499", "key-5500"], 0.5)  # a bulk load may repeat keys
        state = index._streams["s"]
        assert [len(part) for part in state.newest] == [1000] * 5 + [501]
        assert index.size == 5_501
        keys = [f"key-{k}" for k in range(5_502)]
        assert seen(index, keys, 0.6) == keys[:-1]
        index.add("s", ["next"], 1.5)  # the next generation: this one is sealed part by part, found meanwhile
        assert len(state.sealing) == 5 and index.size == 5_502  # a step sealed the first part already
        assert sum(queued.left for queued in state.sealing) + sum(state.counts) == 5_501
        assert seen(index, keys, 1.6) == keys[:-1]
        index.settle()
        assert seen(index, keys, 1.6) == keys[:-1] and sum(state.counts) == 5_501

    def test_a_late_key_that_a_later_part_holds_is_held_once(self) -> None:
        # A late key was checked against the first queued part of its generation only: a key the second
        # part held was sealed twice and counted twice, and the count evicted keys still in the window.
        with mock.patch.object(dedup, "PART_KEYS", 3), mock.patch.object(dedup, "STEP_KEYS", 1):
            index = DedupIndex(WINDOW, 4)
            index.add("s", ["m0", "m1", "m2"], 0.5)
            index.add("s", ["m3"], 0.5)
            index.add("s", [], 1.5)  # generation 0 is queued, in two parts; a step of one key seals one
            state = index._streams["s"]
            assert [(queued.number, queued.left) for queued in state.sealing] == [(0, 2), (0, 1)]
            index.add("s", ["m3"], 0.75)  # late: generation 0 holds it already, in its second part
            assert (index.size, index.evicted) == (4, 0)
            index.settle()
        entries = [entry for bucket in state.buckets for entry in bucket]
        assert len(entries) == len(set(entries)) == 4
        assert seen(index, ["m0", "m1", "m2", "m3"], 1.6) == ["m0", "m1", "m2", "m3"]


class TestBulkLoad:
    """What `Journal._load_dedup` does at start: every generation of the window added in time order."""

    def test_every_key_of_the_window_is_found_after_a_bulk_load(self) -> None:
        index = DedupIndex(WINDOW, 100_000)
        keys = spread(index, 20_000, 0.25)
        assert index.size == 20_000 and seen(index, keys, WINDOW + 0.25) == keys

    async def test_a_restart_rebuilds_every_generation(self, tmp_path: Path) -> None:
        path = tmp_path / "j.db"
        now, window = time.time(), 3600.0
        journal = Journal(path, max_bytes=1 << 30, dedup_window=window)
        span, first = journal.dedup.span, int((now - window) // journal.dedup.span) + 1  # a generation of margin
        keys = {n: [f"restart-{n}-{i}" for i in range(100)] for n in range(first, first + GENERATIONS)}
        await journal.open()
        try:
            for n, some in keys.items():  # a request in the middle of each generation of the window
                await journal.append("s", batch(*some), min(n * span + span / 2, now))
        finally:
            await journal.close()
        again = Journal(path, max_bytes=1 << 30, dedup_window=window)
        await again.open()
        try:
            assert again.dedup.size == 100 * GENERATIONS
            assert len(again.dedup._streams["s"].generations()) == GENERATIONS
            result = await again.append("s", batch(*itertools.chain(*keys.values()), "new"), time.time())
            assert (result.accepted, result.duplicates) == (1, 100 * GENERATIONS)
        finally:
            await again.close()

    @pytest.mark.parametrize("delivered", [False, True], ids=["in the segments", "in dedup_log"])
    async def test_a_restart_after_the_clock_stepped_back_keeps_the_keys_received_since(
        self, tmp_path: Path, delivered: bool
    ) -> None:
        # The clock ran two days ahead, then was set right: the keys received since are older than the newest.
        # Loaded in time order, the newest would move the window past them.
        path, now = tmp_path / "j.db", time.time()
        journal = Journal(path, max_bytes=1 << 30, dedup_window=86400)
        await journal.open()
        try:
            for key, at in (("ahead", now + 2 * 86400), ("since", now)):
                await journal.append("s", batch(key), at)
                if delivered:  # the mark passes it: its keys are copied to dedup_log, a row each
                    await journal.commit_progress("sink", journal.last_seq, [], ["sink"])
        finally:
            await journal.close()
        again = Journal(path, max_bytes=1 << 30, dedup_window=86400)
        await again.open()
        try:
            result = await again.append("s", batch("ahead", "since", "new"), now + 60)
            assert (result.accepted, result.duplicates) == (1, 2)
        finally:
            await again.close()


# --- the reference model -------------------------------------------------------------------------------------

STREAMS = ("s", "s", "s", "t")
"""Mostly one stream, so its keys meet again; a second one for the scoping and the eviction order."""
KEYS = [f"m{i}" for i in range(4)]
EIGHTHS = st.integers(0, 7).map(lambda n: n / 8)
"""Lateness below one generation, in exact binary fractions (a time on a generation's edge is exact)."""

operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.sampled_from([0.125, 0.5]) | st.integers(1, 20).map(float)),
        st.tuples(
            st.sampled_from(["request", "failed request"]),
            st.sampled_from(STREAMS),
            st.lists(st.one_of(st.none(), st.sampled_from(KEYS)), max_size=6),
            EIGHTHS,
        ),
        st.tuples(st.just("add"), st.sampled_from(STREAMS), st.lists(st.sampled_from(KEYS), max_size=4), EIGHTHS),
        st.tuples(st.just("expire"), EIGHTHS),
    ),
    min_size=20,
    max_size=120,
)


class Model:
    """What the index must answer: (stream, key, generation) -> the last time added, as the index holds them."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.held: dict[tuple[str, str, int], float] = {}
        self.last: dict[tuple[str, str], float] = {}
        """The last time each key was added, evicted or not: a key unseen for 13/12 of the window is fresh."""
        self.newest: dict[str, int] = {}
        self.clock = float("-inf")
        """The latest time the index was told (by add or expire): the window ends there at the earliest."""
        self.evicted = 0

    def add(self, stream: str, keys: list[str], at: float) -> None:
        number = int(at // 1.0)
        newest = self.newest.get(stream, number)
        if number < newest - GENERATIONS:
            return
        self.clock = max(self.clock, at)
        if number > newest:
            self._drop(lambda s, n: s == stream and n < number - GENERATIONS)
        self.newest[stream] = max(newest, number)
        for key in keys:
            self.held[(stream, key, number)] = max(at, self.held.get((stream, key, number), at))
            self.last[(stream, key)] = max(at, self.last.get((stream, key), at))
        while len(self.held) > self.max_keys:
            oldest = min((n, s) for s, _, n in self.held)
            self.evicted += self._drop(lambda s, n, oldest=oldest: (n, s) == oldest)

    def expire(self, now: float) -> None:
        self.clock = max(self.clock, now)
        self._drop(lambda s, n: n < int((now - WINDOW) // 1.0))

    def _drop(self, which: Callable[[str, int], bool]) -> int:
        gone = [entry for entry in self.held if which(entry[0], entry[2])]
        for entry in gone:
            del self.held[entry]
        return len(gone)

    def must_be_duplicate(self, stream: str, key: str, now: float) -> bool:
        """Held, and seen at most a window before `now` and before the latest time the index was told (an add or an
        expire at a later time moves the window on)."""
        return any(
            max(now, self.clock) - at <= WINDOW for (s, k, _), at in self.held.items() if (s, k) == (stream, key)
        )

    def must_be_fresh(self, stream: str, key: str, now: float) -> bool:
        """Never seen, or not for 13/12 of the window."""
        at = self.last.get((stream, key))
        return at is None or now - at > WINDOW * 13 / 12


class TestAgainstAModel:
    @settings(max_examples=300, deadline=None)
    @given(
        operations=operations,
        max_keys=st.sampled_from([4, 12, 1000]),
        step=st.sampled_from([1, 3, 1024]),
        part=st.sampled_from([1, 3, dedup.PART_KEYS]),
    )
    def test_the_index_answers_as_the_model_allows(
        self, operations: list[tuple[Any, ...]], max_keys: int, step: int, part: int
    ) -> None:
        # Tiny buckets: the few keys split them over and over. Tiny steps: generations are looked up while
        # they are half sealed, and buckets while half swept. Tiny parts: the newest generation in many dicts.
        with (
            mock.patch.object(dedup, "BUCKET_KEYS", 2),
            mock.patch.object(dedup, "STEP_KEYS", step),
            mock.patch.object(dedup, "PART_KEYS", part),
        ):
            self.run(operations, max_keys)

    def run(self, operations: list[tuple[Any, ...]], max_keys: int) -> None:
        index = DedupIndex(WINDOW, max_keys)
        model = Model(max_keys)
        clock = 0.0
        for operation in operations:
            kind = operation[0]
            if kind == "advance":
                clock += operation[1]
            elif kind == "expire":
                now = clock - operation[1]
                index.expire(now)
                model.expire(now)
            else:
                _, stream, keys, late = operation
                at = clock - late  # received a little before what was added already
                if kind == "add":
                    index.add(stream, keys, at)
                    model.add(stream, keys, at)
                else:
                    self.request(index, model, stream, keys, at, committed=kind == "request")
            assert index.size == len(model.held)
            assert index.evicted == model.evicted

    def request(
        self, index: DedupIndex, model: Model, stream: str, keys: list[str | None], at: float, committed: bool
    ) -> None:
        """What `Journal.append` does: look the keys up, then add the fresh ones once committed."""
        taken: list[int] = []
        answer = index.fresh(stream, keys, at, set(), taken)
        fresh = set(range(len(keys))) if answer is None else set(answer)
        earlier: set[str] = set()
        for i, key in enumerate(keys):
            if key is None:
                assert i in fresh
            elif key in earlier:
                assert i not in fresh, f"{key} twice in one request"
            else:
                earlier.add(key)
                if model.must_be_duplicate(stream, key, at):
                    assert i not in fresh, f"{key} seen within the window, called fresh at {at}"
                if model.must_be_fresh(stream, key, at):
                    assert i in fresh, f"{key} not seen for 13/12 of the window, called a duplicate at {at}"
        added = [key for i, key in enumerate(keys) if i in fresh and key is not None]
        assert sorted(taken) == sorted(hash(key) & FINGERPRINT for key in added)
        if committed:
            index.add(stream, added, at)
            model.add(stream, added, at)

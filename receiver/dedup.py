"""The dedup index: which keySuffixes each stream has seen within the dedup window, in memory.

Keys are remembered as 60-bit fingerprints (the low 60 bits of `hash(key)`, never negative) by generation of
`window / GENERATIONS` seconds, so a whole generation expires at once. Per stream, the newest generation is a
dict of fingerprints used as a set (it takes the inserts: one C-level update per request; CPython's garbage
collector does not track a dict of ints, where it visits every entry of a set: a full collection, which holds
the GIL and comes every few seconds under load, took ≈ 68 ms per million keys of a set), in parts of at most
PART_KEYS keys (a dict grows by copying its whole table, which held the GIL 65 ms at 2 M keys). When a newer
one starts it is sealed, part by part: each key goes, as the 8-byte entry `fingerprint << 4 | slot`, into a
sorted `array('Q')` bucket chosen by the fingerprint's top bits (128–256 entries a bucket); the slot
(generation number mod 16) names its generation, and the window never holds more than 13, so slots never
collide. A byte per cell of fingerprints (4–8 cells a sealed
key) says whether a sealed entry falls there, so most fresh keys cost a byte read and no bisect. Expiry and
eviction free a generation's slot at once (its entries are dead to lookups from then on) and a sweep rebuilds
the buckets without them, one bucket at a time (no second copy of the index, no Python int per sealed key alive
at once); a freed slot is clean before it is reused.

Sealing and sweeping are done a step at a time, STEP_KEYS + STEP_PER_KEY keys' worth per key of the commit that
takes the step (the generation being sealed is looked up as the set it was until its last key is in the
buckets), so no request waits for a whole generation, and the work ends within the next generation whatever the
request size. Over a day of 1 M keys (12 seals, 12 expiries; bench.dedup) the longest a request's dedup work
held the writer went from 206–251 ms (the whole generation at once) to 12.7–15.7 ms at 100 keys a request, and
from 192–217 to 18.4–18.5 ms at 1,000 (a request of 1,000 keys alone takes ≈ 0.8 ms), for 10–15 % more work
in all (≈ 3.4 s a day against 3.0). Doubling the buckets (as the index grows, about log2(keys / 256) times)
is still done at once (11–34 ms at 2,048 buckets). At start (`settle`) nothing waits and the whole load is
sealed at once.

The keys themselves are written to the journal with the batch they came in (same transaction), so a restart
rebuilds the index from disk; the process's hash seed may change between runs because nothing hashed is stored.
Times are received times, so roughly increasing: a key a little late (received before a newer batch, committed
after it) joins its own generation. One older by more than a generation comes from a clock that was stepped
back (it ran ahead and NTP set it right, a VM was restored): it joins the newest generation, so that it is
remembered a whole window of the index's time, which moves on only once the clock is past the newest key again
(taken at its own time, it would be forgotten early, or at once when the step was more than a window). Meanwhile
a newest generation that holds `max_keys / GENERATIONS` keys gives way to a new one, numbered one on: otherwise
every key received since the step would pile into it, and an eviction past `max_keys` forget them all at once.

A fingerprint match treats a fresh event as a duplicate with probability about n / 2^60 per event, for n keys
in the window (1 in 10^12 with a million keys). Measured with 1 M keys over a 24 h window (bench.dedup, on a
shared 2-core machine): 16.1 bytes per key live (tracemalloc) and 24.8 of RSS growth, where the generation sets
this replaced took 85.8 and 97.1. The price is at start:
`Journal.open` with 1 M keys takes 1.3–2.0 s instead of 0.3–0.45 (≈ 1 µs per key to seal). A lookup of 10 fresh
keys costs ≈ 0.75 of the sets' time, of 10 keys seen in a sealed generation ≈ 1.15.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import islice, repeat
from operator import attrgetter

DEFAULT_MAX_KEYS = 2_000_000
"""Keys the index holds at most by default (≈ 16 bytes of memory live, 25–37 of RSS, and ≈ 40 bytes of disk each)."""

GENERATIONS = 12
"""Generations per window: a key is remembered for at least the window and at most 1/12 longer."""

FINGERPRINT = (1 << 60) - 1
"""The bits of `hash(key)` a key is remembered by."""

BUCKET_KEYS = 256
"""Sealed keys per bucket on average at most: past it a stream's buckets double."""

CELL_BITS = 10
"""Each bucket's fingerprints fall in 2^CELL_BITS cells of the lookup filter (4–8 per key)."""

PART_KEYS = (1 << 20) * 2 // 3
"""Keys of the newest generation one dict holds: past it a new dict takes the inserts. A dict's table is copied
whole when it grows (≈ 32 ns a key on a 2-core VM, holding the GIL: 62–70 ms at 2 M keys, a pause of the whole
service); a part fills a table of 2^20 slots (two thirds of them usable), whose growth copied 349,525 keys
(≈ 15 ms), and never grows again. Each full part costs a lookup one more probe a key (≈ 0.1 µs: a cache miss),
so parts are large: a stream fills one only past 97 events a second for a whole generation (2 h of a 24 h
window). Over a burst of 2 M keys into one generation (bench.dedup), the longest request and the mean, 10 keys
a request: one dict 65 ms, 7.1 µs; parts of 2^18 keys 7.5 ms, 12.4 µs; 2^19 14.6 ms, 9.2 µs; 2^20 29.6 ms,
8.2 µs (100 keys: 49, 96, 72, 57 µs). Parts that fill their tables hold 1 M keys in the RSS one dict takes
(70 MiB); parts of 2^19 took 90."""

STEP_KEYS = 1024
"""Keys a step of sealing moves into the buckets (about a millisecond of the writer thread), besides
STEP_PER_KEY for each key of the request that takes the step."""

STEP_PER_KEY = 2
"""A request of k keys takes a step of STEP_KEYS + STEP_PER_KEY·k: a generation's sealing and the sweep of
the whole index (≈ 1.4 keys' worth per key sealed, with 13 generations in the window) end within the next
generation whatever the request size."""

SWEEP_COST = 8
"""A bucket swept (10–17 µs) costs about as much as this many keys sealed (1.2–2.3 µs each), for a step's budget."""

_SLOT_BITS = 4
_SLOT = (1 << _SLOT_BITS) - 1
_FREE = -(1 << 63)
"""The generation number of a free slot: older than every window."""


_Prints = dict[int, None]
"""Fingerprints, as the keys of a dict: a set the garbage collector does not track (see the module's doc)."""


@dataclass(slots=True)
class _Sealing:
    """A part of a generation on its way into the buckets: looked up as its set until every key is in."""

    number: int
    prints: _Prints
    """Never changed once queued (late keys come as a part of their own), so that `step` can take its keys in
    order without a copy of them: building one, an array of a whole part, held the GIL ≈ 33 ms."""
    rest: Iterator[int]
    """The keys `step` has not taken yet: an iterator of `prints`."""
    done: int = 0

    @property
    def left(self) -> int:
        return len(self.prints) - self.done


class _Stream:
    """One stream's keys: the newest generation in a set, the older ones sealed into sorted buckets a step at a
    time (a generation waiting for its turn is looked up as the set it was)."""

    __slots__ = (
        "buckets",
        "cells",
        "counts",
        "dirty",
        "newest",
        "number",
        "recell",
        "sealing",
        "shift",
        "slots",
        "stale",
        "sweep",
    )

    def __init__(self) -> None:
        self.number = _FREE
        """The newest generation's number: `newest` holds its keys."""
        self.newest: list[_Prints] = [{}]
        """The newest generation's keys, in parts of PART_KEYS: the last takes the inserts."""
        self.sealing: list[_Sealing] = []
        """Generations still to move into the buckets, oldest first."""
        self.slots = [_FREE] * (_SLOT + 1)
        """Slot -> the number of the sealed generation in it."""
        self.counts = [0] * (_SLOT + 1)
        """Slot -> the keys of that generation in the buckets."""
        self.buckets = [array("Q")]
        self.shift = 60
        """A fingerprint's bucket is `fingerprint >> shift`, its cell `fingerprint >> (shift - CELL_BITS)`."""
        self.cells = bytearray(1 << CELL_BITS)
        """1 where a sealed entry's fingerprint may fall (a cell may still say 1 for entries purged since, which
        costs a bisect, never a miss): a lookup whose cell is 0 is a miss without a bisect."""
        self.dirty: set[int] = set()
        """Slots freed whose entries may still be in the buckets (dead to lookups: their slot says _FREE)."""
        self.sweep: int | None = None
        """Where the sweep that purges `dirty` slots is (None: none is due)."""
        self.stale = 0
        """Entries dropped since the cells were made exact: their cells may still say 1."""
        self.recell = False
        """Whether the sweep also makes the cells exact (once the stale entries are many, or after a split)."""

    def generations(self) -> list[tuple[int, int]]:
        """(number, keys) of every generation held."""
        held = {n: self.counts[slot] for slot, n in enumerate(self.slots) if n != _FREE}
        for queued in self.sealing:
            held[queued.number] = held.get(queued.number, 0) + queued.left
        newest = self.newest_keys()
        if newest:
            held[self.number] = newest
        return list(held.items())

    def newest_keys(self) -> int:
        """Keys of the newest generation."""
        return sum(map(len, self.newest))

    def take(self, prints: Collection[int], looked_up: bool) -> int:
        """Add fingerprints to the newest generation; how many were new to it. `looked_up`: `fresh` found none
        of them in the index."""
        current = self.newest[-1]
        if current and len(current) + len(prints) > PART_KEYS:  # they would make its table grow: a new part
            current = {}
            self.newest.append(current)
        if len(self.newest) > 1 and not looked_up:  # a key a full part holds stays there (a bulk load may repeat keys)
            prints = set(prints)
            for part in self.newest[:-1]:
                if not part.keys().isdisjoint(prints):
                    prints -= part.keys() & prints
        before = len(current)
        current.update(zip(prints, repeat(None)))
        return len(current) - before

    @property
    def busy(self) -> bool:
        """Whether sealing or purging is left to do."""
        return bool(self.sealing) or self.sweep is not None

    def sealed(self, prints: AbstractSet[int], oldest: int) -> list[int]:
        """The fingerprints among `prints` held by a sealed generation numbered `oldest` or later."""
        found = [p for queued in self.sealing if queued.number >= oldest for p in prints & queued.prints.keys()]
        if not any(self.counts):  # nothing in the buckets yet
            return found
        buckets, cells, slots = self.buckets, self.cells, self.slots
        shift, cell_shift = self.shift, self.shift - CELL_BITS
        for fingerprint in prints:
            if not cells[fingerprint >> cell_shift]:
                continue
            bucket = buckets[fingerprint >> shift]
            i = bisect_left(bucket, fingerprint << _SLOT_BITS)
            # A fingerprint's entries are adjacent, one per generation holding it: any live one is a match.
            while i < len(bucket) and bucket[i] >> _SLOT_BITS == fingerprint:
                if slots[bucket[i] & _SLOT] >= oldest:
                    found.append(fingerprint)
                    break
                i += 1
        return found

    def seal_newest(self) -> None:
        """Hand the newest generation, part by part, to `step` (its keys stay counted: no part holds another's)."""
        parts, self.newest = self.newest, [{}]
        for part in parts:
            self.seal(self.number, part, whole=True)

    def seal(self, number: int, prints: _Prints, whole: bool = False) -> int:
        """Take `prints` (the dict itself, not a copy: nothing changes it afterwards) as a part of generation
        `number`, to be moved into the buckets by `step`; returns how many were new to it. `whole`: a part of
        the newest generation, none of whose keys another part holds."""
        slot = number & _SLOT
        if self.slots[slot] == number and not whole:  # late keys of a generation sealed or being sealed
            prints = {p: None for p in prints if not self._has(p << _SLOT_BITS | slot)}
            for queued in self.sealing:  # those a queued part of it holds stay there (it may have several)
                if queued.number == number and not queued.prints.keys().isdisjoint(prints):
                    for held in prints.keys() & queued.prints.keys():
                        del prints[held]
        if not prints:
            return 0
        if self.slots[slot] != number:
            if slot in self.dirty:  # its old entries must go before it is reused (3 generations after it was freed)
                self._purge(len(self.buckets))
            self.slots[slot] = number
        self.sealing.append(_Sealing(number, prints, iter(prints)))
        self.sealing.sort(key=attrgetter("number"))
        return len(prints)

    def step(self, budget: int) -> int:
        """Move up to `budget` keys of the generations being sealed into the buckets, or purge up to `budget`
        keys' worth of buckets of freed slots' entries: a bounded piece of the work, whose rest waits for the
        next. Returns the budget used."""
        given = budget
        while budget > 0 and self.sealing:
            queued = self.sealing[0]
            slot = queued.number & _SLOT
            chunk = array("Q", islice(queued.rest, budget))
            queued.done += len(chunk)
            if not queued.left:
                self.sealing.pop(0)
            budget -= len(chunk)
            self.counts[slot] += len(chunk)
            self._grow(sum(self.counts))
            buckets, cells = self.buckets, self.cells
            shift, cell_shift = self.shift, self.shift - CELL_BITS
            for fingerprint in chunk:
                insort(buckets[fingerprint >> shift], fingerprint << _SLOT_BITS | slot)  # a memmove in a small bucket
                cells[fingerprint >> cell_shift] = 1
        if budget > 0 and self.sweep is not None:
            count = max(1, budget // SWEEP_COST)
            self._purge(count)
            budget -= count * SWEEP_COST
        return given - max(budget, 0)

    def settle(self) -> None:
        """Do all the work left (at start, after a bulk load)."""
        while self.busy:
            self.step(1 << 20)

    def _has(self, entry: int) -> bool:
        """Whether the buckets hold this entry (fingerprint and slot)."""
        bucket = self.buckets[entry >> (self.shift + _SLOT_BITS)]
        i = bisect_left(bucket, entry)
        return i < len(bucket) and bucket[i] == entry

    def drop(self, numbers: Collection[int]) -> int:
        """Forget these generations; returns how many keys they held. Their entries in the buckets are dead to
        lookups at once and purged by later steps."""
        dropped = 0
        if self.number in numbers:
            dropped, self.newest = self.newest_keys(), [{}]
        dropped += sum(queued.left for queued in self.sealing if queued.number in numbers)
        self.sealing = [queued for queued in self.sealing if queued.number not in numbers]
        freed = [slot for slot, n in enumerate(self.slots) if n in numbers]
        entries = sum(self.counts[slot] for slot in freed)  # those in the buckets, whose cells may stay 1
        dropped += entries
        for slot in freed:
            self.slots[slot], self.counts[slot] = _FREE, 0
        if freed:
            if not any(self.counts):  # nothing left in the buckets: start them again
                self.buckets, self.shift, self.cells = [array("Q")], 60, bytearray(1 << CELL_BITS)
                self.dirty.clear()
                self.sweep, self.stale, self.recell = None, 0, False
            else:
                self.dirty.update(freed)
                self.sweep = 0  # every bucket may hold entries of the slots just freed
                self.stale += entries
                if 2 * self.stale > sum(self.counts):  # every few generations: the sweep rebuilds the cells too
                    self.recell = True
        return dropped

    def _purge(self, count: int) -> None:
        """Rebuild up to `count` buckets from the sweep on without the entries of dirty slots, and their cells."""
        if self.sweep is None:
            return
        live = [n != _FREE for n in self.slots]
        buckets, cells = self.buckets, self.cells
        cell_bits = CELL_BITS
        cell_shift = self.shift - CELL_BITS + _SLOT_BITS
        stop = min(len(buckets), self.sweep + count)
        for i in range(self.sweep, stop):  # one bucket at a time: no second copy of the index
            bucket = buckets[i] = array("Q", [entry for entry in buckets[i] if live[entry & _SLOT]])
            if self.recell:
                cells[i << cell_bits : (i + 1) << cell_bits] = bytes(1 << cell_bits)
                for entry in bucket:
                    cells[entry >> cell_shift] = 1
        self.sweep = stop
        if stop == len(buckets):
            self.dirty.clear()
            if self.recell:
                self.stale, self.recell = 0, False
            self.sweep = None

    def _grow(self, total: int) -> None:
        """Double the buckets (and the cells) until `total` keys average at most BUCKET_KEYS per bucket."""
        while total > BUCKET_KEYS * len(self.buckets):
            self.shift -= 1
            half = 1 << (self.shift + _SLOT_BITS)  # bucket i becomes 2i (entries below (2i+1)·half) and 2i+1
            grown: list[array[int]] = []
            for i, bucket in enumerate(self.buckets):
                cut = bisect_left(bucket, (2 * i + 1) * half)
                grown += (bucket[:cut], bucket[cut:])
                del bucket[:]  # free it now: no second copy of the index
            self.buckets = grown
            # A cell becomes two: both say what it said (a superset: never a miss; the purges sharpen them).
            cells = bytearray(2 * len(self.cells))
            cells[0::2] = self.cells
            cells[1::2] = self.cells
            self.cells = cells
            self.sweep, self.recell = 0, True  # a sweep from the start makes the cells exact again


class DedupIndex:
    """Fingerprints of the keys seen per stream, by generation; bounded by `max_keys`."""

    def __init__(self, window: float, max_keys: int) -> None:
        self.window = window
        self.max_keys = max_keys
        self.span = window / GENERATIONS if window > 0 else 1.0
        self._streams: dict[str, _Stream] = {}
        self.size = 0
        self.evicted = 0
        """Keys dropped before their window ended because the index was full."""
        self.on_evict: Callable[[int], object] = lambda count: None
        self.stepping = True
        """Whether adds seal and sweep a step at a time (False during a bulk load: nothing waits on it)."""

    @property
    def enabled(self) -> bool:
        """Whether deduplication is on (`dedup_window` > 0)."""
        return self.window > 0

    def fresh(
        self, stream: str, keys: Sequence[str | None], now: float, pending: set[int], taken: list[int]
    ) -> list[int] | None:
        """Indexes of the elements whose key was not seen (None: all of them). Their fingerprints join
        `pending` (the keys of this commit group, not in the index yet) and are listed in `taken`."""
        if None in keys:
            prints: list[int | None] = [None if key is None else hash(key) & FINGERPRINT for key in keys]
            candidates = {p for p in prints if p is not None}
        else:  # the usual: every element has a key
            prints = [hash(key) & FINGERPRINT for key in keys]
            candidates = set(prints)  # type: ignore[arg-type]
        if not candidates:
            return None
        seen = candidates & pending
        state = self._streams.get(stream)
        if state is not None:
            oldest = self._oldest(now)
            if state.number >= oldest:
                for part in state.newest:
                    if not part.keys().isdisjoint(candidates):
                        seen |= candidates & part.keys()
            seen.update(state.sealed(candidates, oldest))
        if not seen and len(candidates) == len(keys):
            pending |= candidates
            taken.extend(candidates)
            return None
        fresh: list[int] = []
        for index, fingerprint in enumerate(prints):
            if fingerprint is None:
                fresh.append(index)
            elif fingerprint not in seen:
                seen.add(fingerprint)  # a key twice in one request: the second is the duplicate
                pending.add(fingerprint)
                taken.append(fingerprint)
                fresh.append(index)
        return None if len(fresh) == len(keys) else fresh

    def add(self, stream: str, keys: Iterable[str], at: float) -> None:
        """Remember keys seen at `at` (after the batch that holds them committed)."""
        self.add_prints(stream, {hash(key) & FINGERPRINT for key in keys}, at, looked_up=False)

    def add_prints(self, stream: str, prints: Collection[int], at: float, looked_up: bool = True) -> None:
        """`add` for keys whose fingerprints `fresh` took already (the writer hashes each key once), none of
        which the index holds; `looked_up=False` for keys that may be held already."""
        number = int(at // self.span)
        state = self._streams.get(stream)
        if state is None:
            state = self._streams[stream] = _Stream()
        elif number < state.number - 1:  # the clock was stepped back: see the module's doc
            number = state.number
            if state.newest_keys() >= self.max_keys // GENERATIONS:
                number += 1  # a new generation after all, so that eviction past max_keys forgets the oldest keys
        if number == state.number:  # the common case: the newest generation
            self.size += state.take(prints, looked_up)
        elif number > state.number:  # a new generation: the window moves with the newest key
            self.size -= state.drop({n for n, _ in state.generations() if n < number - GENERATIONS})
            state.seal_newest()
            state.number = number
            self.size += state.take(prints, looked_up)
        else:  # late: received before a newer batch, committed after it
            self.size += state.seal(number, dict.fromkeys(prints))
        if state.busy and self.stepping:  # a piece of the sealing or sweeping left, in proportion to the request
            state.step(STEP_KEYS + STEP_PER_KEY * len(prints))
        elif state.sealing and not self.stepping:  # a bulk load: each generation sealed at once, as it is handed over
            state.settle()
        if self.size > self.max_keys:
            self._evict()

    def settle(self) -> None:
        """Seal and sweep everything still waiting (after a bulk load, when no request waits on it)."""
        for state in self._streams.values():
            state.settle()

    def expire(self, now: float) -> None:
        """Forget the generations that ended more than a window ago."""
        oldest = self._oldest(now)
        budget = STEP_KEYS  # one step for all the streams together: streams that receive nothing move on too
        for state in self._streams.values():
            self.size -= state.drop({n for n, _ in state.generations() if n < oldest})
            if state.busy and budget > 0:
                budget -= state.step(budget)

    def _evict(self) -> None:
        while self.size > self.max_keys:
            number, stream = min((n, s) for s, state in self._streams.items() for n, _ in state.generations())
            dropped = self._streams[stream].drop({number})
            self.size -= dropped
            self.evicted += dropped
            self.on_evict(dropped)

    def cutoff(self, now: float) -> float:
        """The oldest time whose keys the index still needs after a restart."""
        return self._oldest(now) * self.span

    def _oldest(self, now: float) -> int:
        """The number of the oldest generation still inside the window at `now`."""
        return int((now - self.window) // self.span)

"""20,000 deterministically mutated bodies against a real service on loopback: never a 5xx, every accepted element
is delivered as bytes of the body sent, every dead letter is bytes of the body with a reason, and damage to one
element never costs the elements it did not touch.

What "did not touch" means, exactly:
- NDJSON: every line the mutation did not reach (its bytes and both its line breaks intact) is delivered.
- JSON array (declared application/json or undeclared): every element before the damage is delivered; the
  elements after it too when the damaged stretch is self-contained — it closes every string it opens and its
  brackets never close the array nor stay open (a stray or missing bracket is pinned separately by
  test_exactness.TestDefects.test_unbalanced_brackets_in_one_element_cost_only_that_element).
A broken array declared NDJSON has no line to keep (test_exactness.TestDefects.test_array_declared_ndjson...).
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from receiver.journal import list_dead_letters
from receiver.samples import sample_wrappers
from sinks.memory import MemorySink
from tests.conftest import TOKEN, StartService
from tests.receiver.jsontext import NotStrictJSON, check_line, compact, sent_in

SEED = 20261201
BODIES = 20_000
WORKERS = 8
"""Concurrent senders on one keep-alive client (several at once let the journal group their commits)."""

JSON = "application/json"
NDJSON = "application/x-ndjson"

# --- bodies ------------------------------------------------------------------------------------------

_TEMPLATES = sample_wrappers(6)
_FIXED_TIME = "2026-01-02T03:04:05.678Z"
_EXTRAS: list[tuple[str, Any]] = [
    ("count", orjson.Fragment(b"18446744073709551616")),
    ("ratio", orjson.Fragment(b"1.000000000000000000001")),
    ("huge", orjson.Fragment(b"1e999")),
    ("tiny", orjson.Fragment(b"-1e-999")),
    ("note", orjson.Fragment(b'"caf\\u00e9 \\ud83d\\ude00 \\"q\\" \\\\ \\/ \\b\\f\\n\\r\\t \\u0000"')),
    ("name", "Zoë 😀 ünïcödé"),
    ("nested", {"a": [1, {"b": [True, None, 2.5]}], "c": {}}),
]


@dataclass
class Body:
    """A valid body and where its elements lie: `seps[i]` is the separator before element i (the '[' or a line
    break before the first), `seps[i + 1]` the one after it (',' or ']' or a line break)."""

    fmt: str  # "array" or "ndjson"
    data: bytes
    elements: list[bytes]
    seps: list[int]
    pretty: bool


def _wrapper(rng: random.Random, number: int) -> bytes:
    """A realistic wrapper whose event id and keySuffix carry the body's number (so a delivered line can be
    traced to its request) and otherwise random hex (so no single mutation makes two keys equal)."""
    wrapper = copy.deepcopy(rng.choice(_TEMPLATES))
    event = wrapper["event"]
    event["id"] = f"01{number:08d}" + rng.randbytes(8).hex().upper()
    event["actor"]["id"] = "user_" + rng.randbytes(10).hex()
    event["occurred_at"] = wrapper["timestamp"] = _FIXED_TIME
    wrapper["keySuffix"] = f"{number:08d}" + rng.randbytes(12).hex()
    for name, value in rng.sample(_EXTRAS, rng.randint(0, 3)):
        event["metadata"][name] = value
    return orjson.dumps(wrapper, option=orjson.OPT_INDENT_2 if rng.random() < 0.2 else 0)


def make_body(rng: random.Random, number: int) -> Body:
    count = rng.randint(2, 7)
    if rng.random() < 0.5:
        elements = [_wrapper(rng, number) for _ in range(count)]
        elements = [e if rng.random() < 0.5 else compact(e) for e in elements]
        pretty = any(b"\n" in e for e in elements)
        joiner = b",\n" if pretty else b","
        data, seps, pos = bytearray(b"["), [0], 1
        for index, element in enumerate(elements):
            if index:
                data += joiner
                seps.append(pos)
                pos += len(joiner)
            data += element
            pos += len(element)
        seps.append(pos)
        data += b"]"
        return Body("array", bytes(data), elements, seps, pretty)
    elements = [compact(_wrapper(rng, number)) for _ in range(count)]
    data = b"\n".join(elements) + b"\n"
    seps, pos = [-1], 0
    for element in elements:
        pos += len(element)
        seps.append(pos)
        pos += 1
    return Body("ndjson", data, elements, seps, False)


# --- mutations ---------------------------------------------------------------------------------------

INSERTS = [
    b'"',
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b",,",
    b"\x00",
    b"\xff",
    b"\\ud800",
    b'"\\ud800"',
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1" + b"0" * 400,
    b"\xef\xbb\xbf",
    b"\r",
    b"\n",
    b"\r\n",
    b" ",
]
REPLACEMENTS = [b"NaN", b"-Infinity", b"1" + b"0" * 400, b"1e999", b'"\\ud800"', b'"\\udc00x"', b'"a\x00b"']
REPLACEMENTS += [b'"\xff"', b"[" * 1100 + b"]" * 1100, b"[" * 1100, b"{}", b"[]", b'""']


@dataclass
class Mutation:
    kind: str
    data: bytes
    start: int
    """The original bytes [start, end) were replaced (start == end: an insertion); -1 when several places
    changed (no contract about untouched elements then)."""
    end: int


def _value_span(rng: random.Random, data: bytes) -> tuple[int, int] | None:
    """A value after a ':' (a number, string or literal: up to the next ',' or '}' outside a string)."""
    colons = [m.start() for m in re.finditer(b":", data)]
    if not colons:
        return None
    start = rng.choice(colons) + 1
    while start < len(data) and data[start] in b" \n":
        start += 1
    if start >= len(data):
        return None
    if data[start] == 0x22:
        end = start + 1
        while end < len(data) and data[end] != 0x22:
            end += 2 if data[end] == 0x5C else 1
        return start, min(end + 1, len(data))
    end = start
    while end < len(data) and data[end] not in b",}]\n":
        end += 1
    return (start, end) if end > start else None


def mutate(rng: random.Random, body: Body) -> Mutation:
    data = body.data
    size = len(data)
    kind = rng.choices(
        ["flip", "insert", "truncate", "duplicate", "delete", "deep", "value", "line-break", "empty", "multi", "none"],
        weights=[14, 30, 6, 6, 6, 4, 14, 6, 4, 6, 4],
    )[0]
    if kind == "flip":
        at = rng.randrange(size)
        new = rng.randrange(256) if rng.random() < 0.5 else data[at] ^ (1 << rng.randrange(8))
        return Mutation(kind, data[:at] + bytes([new]) + data[at + 1 :], at, at + 1)
    if kind == "insert":
        at = rng.randrange(size + 1)
        return Mutation(kind, data[:at] + rng.choice(INSERTS) + data[at:], at, at)
    if kind == "truncate":
        at = rng.randrange(size)
        return Mutation(kind, data[:at], at, size)
    if kind == "duplicate":
        a = rng.randrange(size)
        b = min(size, a + rng.randint(1, 400))
        at = rng.randrange(size + 1)
        return Mutation(kind, data[:at] + data[a:b] + data[at:], at, at)
    if kind == "delete":
        a = rng.randrange(size)
        b = min(size, a + rng.randint(1, 40))
        return Mutation(kind, data[:a] + data[b:], a, b)
    if kind == "deep":
        at = rng.randrange(size + 1)
        return Mutation(kind, data[:at] + b"[" * rng.choice([64, 1100, 20_000]) + data[at:], at, at)
    if kind == "value":
        span = _value_span(rng, data)
        if span is not None:
            a, b = span
            return Mutation(kind, data[:a] + rng.choice(REPLACEMENTS) + data[b:], a, b)
        kind = "none"
    if kind == "line-break":
        breaks = [m.start() for m in re.finditer(b"\n", data)]
        if breaks:
            at = rng.choice(breaks)
            return Mutation(
                kind, data[:at] + rng.choice([b"\r\n", b"\r", b"", b"\n\n", b" "]) + data[at + 1 :], at, at + 1
            )
        kind = "none"
    if kind == "empty":  # an empty element: a separator doubled
        at = rng.choice(body.seps[1:-1] or [body.seps[0]])
        sep = b"\n" if body.fmt == "ndjson" else b","
        return Mutation(kind, data[:at] + sep + data[at:], at, at)
    if kind == "multi":
        current = body
        for _ in range(rng.randint(2, 4)):
            step = mutate(rng, current)
            current = Body(body.fmt, step.data, [], [0, len(step.data)], body.pretty)
        return Mutation(kind, current.data, -1, -1)
    if rng.random() < 0.5 and kind == "none":  # a whole-body line ending change
        if b"\n" in data:
            return Mutation("crlf-all", data.replace(b"\n", b"\r\n"), -1, -1)
    return Mutation("none", data, size, size)


# --- the contract ------------------------------------------------------------------------------------


def _touched(start: int, end: int, before: int, after: int) -> bool:
    """Whether the replaced bytes [start, end) reach an element lying between separators `before` and
    `after` (both included: a separator belongs to the elements on both sides)."""
    if start == end:  # an insertion at `start` lands in the element whose stretch (before, after] holds it
        return before < start <= after
    return start <= after and end > before


_KEY = re.compile(rb'"keySuffix": ?"([0-9a-f]+)"')
_TAGS = re.compile(rb'"(?:keySuffix": ?"|id": ?"01)(\d{8})')
_LEX = re.compile(rb'"(?:[^"\\]|\\.)*+"|["\[\]{}]', re.S)


def _self_contained(data: bytes, begin: int, stop: int) -> bool:
    """Scanning `data` from the separator at `begin` (or the array's '[') up to the ',' at `stop`: every string
    closed, and the bracket depth back to the array's own level without ever having closed the array."""
    depth = 1 if data[begin] == 0x2C else 0
    for match in _LEX.finditer(data, begin, stop):
        token = match.group()
        if token[0] == 0x22:
            if len(token) == 1:
                return False  # a string still open at `stop`
        elif token in (b"[", b"{"):
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                return False
    return depth == 1 and data[stop] == 0x2C


def required(body: Body, mutation: Mutation, content_type: str | None) -> list[bytes]:
    """The elements of the original body that must be delivered from the mutated one (as the sink writes them:
    an element that spanned lines without its whitespace)."""
    if mutation.start < 0:
        return []
    start, end, data = mutation.start, mutation.end, mutation.data
    shift = len(data) - len(body.data)
    text = data.strip(b" \t\r\n").removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    intact = [not _touched(start, end, body.seps[i], body.seps[i + 1]) for i in range(len(body.elements))]
    if body.fmt == "ndjson":
        if content_type == NDJSON and text.startswith(b"["):
            return []  # might be taken for a JSON array sent as NDJSON
        if content_type != NDJSON and not text.startswith(b"{"):
            return []  # sniffed as something else
        return [e for e, ok in zip(body.elements, intact, strict=True) if ok]
    if content_type == NDJSON or start <= body.seps[0]:
        return []  # declared NDJSON, or the '[' itself was reached
    keep = []
    begin = body.seps[0]
    first_after: int | None = None
    for index, element in enumerate(body.elements):
        if not intact[index]:
            continue
        if body.seps[index + 1] < start:  # wholly before the damage
            keep.append(element)
            begin = body.seps[index + 1]
        elif first_after is None:
            first_after = index
    if first_after is not None and _self_contained(data, begin, body.seps[first_after] + shift):
        keep.extend(e for e, ok in zip(body.elements[first_after:], intact[first_after:], strict=True) if ok)
    if mutation.kind == "duplicate":  # a copied key may make its first holder the one dedup keeps
        copied = data[start : start + shift]
        keep = [e for e in keep if _KEY.search(e).group(1) not in copied]  # type: ignore[union-attr]
    return [compact(e) if b"\n" in e else e for e in keep]


# --- running -----------------------------------------------------------------------------------------


@dataclass
class Sent:
    body: Body
    mutation: Mutation
    content_type: str | None
    gzipped: bool
    status: int
    answer: Any
    retry_after: str | None
    _squeezed: bytes | None = None

    def holds(self, data: bytes) -> bool:
        """Whether `data` is bytes of the body sent (see jsontext.sent_in)."""
        body = self.mutation.data
        if self._squeezed is None and (b"\n" in body or b"\r" in body):
            self._squeezed = compact.__wrapped__(body)
        return sent_in(data, body, self._squeezed)


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def violation(self, what: str, sent: Sent, detail: object = "") -> None:
        self.outcomes[f"VIOLATION {what}"] += 1
        if sum(1 for v in self.violations if v.startswith(what)) < 3:
            self.violations.append(
                f"{what}: kind={sent.mutation.kind} fmt={sent.body.fmt} ct={sent.content_type} gzip={sent.gzipped} "
                f"status={sent.status} answer={sent.answer} at={sent.mutation.start}..{sent.mutation.end} "
                f"{detail!s:.300} body={sent.mutation.data[:600]!r}"
            )

    def summary(self) -> str:
        return "\n".join(f"  {count:7d}  {name}" for name, count in sorted(self.outcomes.items()))


async def _send(session: aiohttp.ClientSession, url: str, worker: int, results: dict[int, Sent]) -> None:
    for number in range(worker, BODIES, WORKERS):
        rng = random.Random(SEED * 1_000_003 + number)
        body = make_body(rng, number)
        mutation = mutate(rng, body)
        content_type = rng.choice([JSON, NDJSON, None])
        gzipped = rng.random() < 0.2
        headers = {"Authorization": TOKEN}
        skip: tuple[str, ...] = ("Content-Type",) if content_type is None else ()
        if content_type is not None:
            headers["Content-Type"] = content_type
        payload = mutation.data
        if gzipped:
            payload = gzip.compress(payload, compresslevel=1, mtime=0)
            headers["Content-Encoding"] = "gzip"
        async with session.post(url, data=payload, headers=headers, skip_auto_headers=skip) as response:
            text = await response.read()
            try:
                answer = orjson.loads(text)
            except orjson.JSONDecodeError:
                answer = text[:200]
            retry_after = response.headers.get("Retry-After")
            results[number] = Sent(body, mutation, content_type, gzipped, response.status, answer, retry_after)


def attribute(data: bytes, results: dict[int, Sent], tally: Tally, what: str) -> int | None:
    """The number of the request whose body `data` is bytes of: by the numbers its ids and keys carry, else
    (a mutation mangled them) by searching every body."""
    for tag in dict.fromkeys(_TAGS.findall(data)):
        number = int(tag)
        if number in results and results[number].holds(data):
            return number
    tally.outcomes[f"{what} traced by searching every body"] += 1
    return next((n for n, sent in results.items() if sent.holds(data)), None)


def check(results: dict[int, Sent], lines: list[bytes], letters: list[Any], tally: Tally) -> None:
    """Hold every request against what the sink got and the intake's dead letters."""
    by_request: dict[int, list[bytes]] = {}
    for line in lines:
        number = attribute(line, results, tally, "delivered line")
        if number is None:
            tally.outcomes["VIOLATION delivered line that is bytes of no body sent"] += 1
            tally.violations.append(f"delivered line that is bytes of no body sent: {line[:300]!r}")
            continue
        by_request.setdefault(number, []).append(line)
    for letter in letters:
        if not letter.reason:
            tally.outcomes["VIOLATION dead letter without a reason"] += 1
            tally.violations.append(f"dead letter without a reason: {letter.data[:300]!r}")
        if letter.data and _TAGS.search(letter.data) and attribute(letter.data, results, tally, "dead letter") is None:
            tally.outcomes["VIOLATION dead letter that is bytes of no body sent"] += 1
            tally.violations.append(f"dead letter that is bytes of no body sent: {letter.data[:300]!r}")
    total_dead = 0
    for number, sent in sorted(results.items()):
        tally.outcomes[f"mutation {sent.mutation.kind}"] += 1
        tally.outcomes[f"status {sent.status}"] += 1
        mine = by_request.get(number, [])
        if sent.status >= 500:
            if sent.status != 503 or not sent.retry_after:
                tally.violation("5xx", sent)
            continue
        must = required(sent.body, sent.mutation, sent.content_type)
        if sent.status != 200:
            if mine:
                tally.violation("delivered from a refused body", sent, mine[0][:160])
            if must:
                tally.violation("refused a body holding untouched good elements", sent, must[0][:160])
            continue
        accepted, duplicates, dead = (sent.answer[k] for k in ("accepted", "duplicates", "dead_lettered"))
        total_dead += dead
        tally.outcomes["elements accepted"] += accepted
        tally.outcomes["elements answered duplicate"] += duplicates
        tally.outcomes["elements dead-lettered"] += dead
        if min(accepted, duplicates, dead) < 0 or len(mine) != accepted:
            tally.violation("answer does not match what was delivered", sent, f"{len(mine)} delivered")
        if duplicates and sent.mutation.kind not in ("duplicate", "multi"):
            tally.violation("duplicates without a duplicated slice", sent)
        for line in mine:
            try:
                check_line(line)
            except NotStrictJSON as exc:
                tally.violation("delivered line is not strict JSON", sent, f"{exc} {line[:200]!r}")
        delivered = Counter(mine)
        missing = [e for e in must if delivered[e] == 0]
        tally.outcomes["untouched elements required (and delivered)"] += len(must)
        if missing:
            tally.violation("untouched good element not delivered", sent, missing[0][:160])
        if sent.mutation.kind != "none" and accepted + duplicates < len(sent.body.elements) - 1:
            tally.outcomes["200 where the damage cost more than one element (outside the contract)"] += 1
    if total_dead != len(letters):
        tally.outcomes["VIOLATION dead letters differ from the answers"] += 1
        tally.violations.append(f"{len(letters)} dead letters, the answers said {total_dead}")


async def test_twenty_thousand_mutated_bodies(start_service: StartService) -> None:
    service = await start_service()
    started = time.monotonic()
    results: dict[int, Sent] = {}
    connector = aiohttp.TCPConnector(limit=WORKERS)
    async with aiohttp.ClientSession(connector=connector) as session:  # one keep-alive client
        url = service.url + "/workos"
        await asyncio.gather(*(_send(session, url, i, results) for i in range(WORKERS)))
    sent_at = time.monotonic()

    sink = service.sinks["mem"]
    assert isinstance(sink, MemorySink)
    expected = sum(s.answer["accepted"] for s in results.values() if s.status == 200)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(sink.events) < expected and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # anything beyond what was accepted would show up now

    tally = Tally()
    tally.outcomes["bodies sent"] = len(results)
    check(results, [event.raw for event in sink.events], list_dead_letters(service.config.journal.path), tally)
    took = f"{sent_at - started:.1f}s (+{time.monotonic() - sent_at:.1f}s checking)"
    summary = f"intake fuzz: {len(results)} bodies in {took}\n" + tally.summary()
    print("\n" + summary)
    assert len(results) == BODIES
    assert not tally.violations, summary + "\n" + "\n".join(tally.violations)

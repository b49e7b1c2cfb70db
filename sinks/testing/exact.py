"""Test helpers for exact delivery: an event whose values a re-serialising sink would change, a JSON reader
that does not refuse them, and a whitespace-free comparison of JSON texts.

orjson refuses integers beyond 64 bits and `1e999`; msgspec refuses `1e999`. The fake peers read with
`loads`, which takes every strict-JSON text (and refuses what is not: `NaN`, `Infinity`), so a test can see
what arrived; comparisons of what arrived are made on the bytes (`same_json`), never on parsed values.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import orjson

from sinks.base import Event

__all__ = ["EXACT_EVENT_RAW", "EXACT_LITERALS", "exact_event", "loads", "same_json"]

EXACT_LITERALS: tuple[bytes, ...] = (
    b"18446744073709551616",
    b"-1e999",
    b"1.000000000000000000001",
    b"123456789012345678901234567890",
    rb'"\u00e9\ud83d\ude00"',
    rb'"a\"b\\c\/d"',
    rb'"\u0000"',
)
"""Values that must reach a destination as these very bytes: integers beyond 64 bits, a number beyond any
float, more digits than a double holds, and string escapes a parser would resolve (and a serialiser write
differently)."""

EXACT_EVENT_RAW = (
    b'{"id":"01HYEXACT0000000000000001","action":"user.signed_in","occurred_at":"2024-01-15T10:30:00.000Z",'
    b'"actor":{"id":"user_1","type":"user"},"targets":[{"id":"team_1","type":"team"}],'
    b'"context":{"location":"192.0.2.10","user_agent":"Chrome/124.0"},"metadata":{'
    + b",".join(b'"v%d":%s' % (number, literal) for number, literal in enumerate(EXACT_LITERALS))
    + b',"all":['
    + b",".join(EXACT_LITERALS)
    + b"]}}"
)
"""A bare WorkOS event holding every one of EXACT_LITERALS, in `metadata` and in a list."""


def exact_event(
    seq: int = 1,
    *,
    event_raw: bytes = EXACT_EVENT_RAW,
    key_suffix: str = "exact0001",
    source: str | None = "team-exact",
    stream: str = "workos",
) -> Event:
    """A journaled event built from raw bytes (never from Python values), whose bare event is `event_raw`."""
    head = {"keySuffix": key_suffix, "timestamp": "2024-01-15T10:30:00.123Z"}
    if source is not None:
        head["source"] = source
    raw = b'{"event":' + event_raw + b"," + orjson.dumps(head)[1:]
    return Event(seq, stream, raw, action="user.signed_in", time=1705314600.0, received_at=1705314600.5)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes | str) -> Any:
    """Any strict-JSON text as Python values: orjson when it can, else the json module (integers of any size;
    `1e999` becomes inf, so a parsed view is for looking at, not for comparing)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data, parse_constant=_refuse_constant)


def compact(data: bytes | str) -> bytes:
    """The JSON text with the whitespace between tokens normalised; every value keeps its text."""
    return msgspec.json.format(data.encode() if isinstance(data, str) else data, indent=0)


def same_json(left: bytes | str, right: bytes | str) -> bool:
    """Whether two JSON texts differ at most in the whitespace between tokens."""
    return compact(left) == compact(right)

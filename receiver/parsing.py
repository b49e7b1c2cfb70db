"""Turning a request body into journal records: decompression with limits, JSON array / NDJSON parsing,
and sorting each element into a deliverable record or a dead letter with its reason."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import zstandard

from receiver.errors import BodyError

NDJSON_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/jsonlines",
    }
)
_CHUNK = 64 * 1024


# --- decompression -------------------------------------------------------------------------------


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """The body without its Content-Encoding, refusing (413) to grow past `limit` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        return _gunzip(body, limit)
    if encoding == "zstd":
        return _unzstd(body, limit)
    raise BodyError(415, f"unsupported Content-Encoding {encoding[:40]!r}; use identity, gzip or zstd")


def _too_large(limit: int) -> BodyError:
    return BodyError(413, f"decompressed body is larger than max_body_bytes ({limit} bytes)")


def _gunzip(body: bytes, limit: int) -> bytes:
    out = bytearray()
    data = body
    try:
        while data:  # a gzip body may hold several members
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            chunk = inflater.decompress(data, limit + 1 - len(out))
            out += chunk
            while inflater.unconsumed_tail and len(out) <= limit:
                out += inflater.decompress(inflater.unconsumed_tail, limit + 1 - len(out))
            if len(out) > limit:
                raise _too_large(limit)
            if not inflater.eof:
                raise BodyError(400, "gzip body is truncated")
            data = inflater.unused_data
    except zlib.error as exc:
        raise BodyError(400, f"gzip body cannot be decompressed: {exc}") from None
    return bytes(out)


def _unzstd(body: bytes, limit: int) -> bytes:
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        with reader:
            while chunk := reader.read(_CHUNK):
                out += chunk
                if len(out) > limit:
                    raise _too_large(limit)
    except zstandard.ZstdError as exc:
        raise BodyError(400, f"zstd body cannot be decompressed: {exc}") from None
    return bytes(out)


# --- parsing -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Rejected:
    """An element that cannot be delivered, kept with the reason."""

    raw: bytes
    reason: str


@dataclass(slots=True)
class Parsed:
    """What a body held: the deliverable elements, column by column, and the rejected ones."""

    raws: list[bytes] = field(default_factory=list)
    """Compact JSON of each wrapper."""
    actions: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    """Epoch seconds of each event's `occurred_at`, else of the receipt."""
    keys: list[str | None] = field(default_factory=list)
    """Each element's dedup key: `keySuffix`, else the event's `id`."""
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.raws)


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson refuses integers beyond 64 bits, which are valid JSON; the standard library takes them.
        return json.loads(data, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _dumps(value: Any, _orjson_dumps: Any = orjson.dumps) -> bytes:
    try:
        return _orjson_dumps(value)  # type: ignore[no-any-return]
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _where(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno} column {exc.colno}: {exc.msg}"
    return str(exc)


def parse_body(body: bytes, content_type: str, received_at: float) -> Parsed:
    """Parse a JSON array or NDJSON body (by Content-Type, else by sniffing); raises BodyError(400)."""
    text = body.strip()
    if not text:
        raise BodyError(400, "empty body: expected a JSON array or NDJSON")
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared in NDJSON_TYPES and not text.startswith(b"["):
        return _parse_ndjson(text, received_at)
    if text.startswith(b"["):
        try:
            value = _loads(text)
        except ValueError as exc:
            raise BodyError(400, f"body is not a valid JSON array: {_where(exc)}") from None
        if not isinstance(value, list):  # pragma: no cover - a '[' start always parses to a list
            raise BodyError(400, "expected a JSON array")
        return _sort(value, received_at)
    if text.startswith(b"{"):
        return _parse_ndjson(text, received_at)
    raise BodyError(400, "body is neither a JSON array nor NDJSON: it must start with '[' or '{'")


def _parse_ndjson(text: bytes, received_at: float) -> Parsed:
    # One object, even pretty-printed over several lines, is one element.
    try:
        whole = _loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return _sort([whole], received_at)
    parsed = Parsed()
    first_error = ""
    any_json = False
    for number, line in enumerate(text.split(b"\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            element = _loads(line)
        except ValueError as exc:
            reason = f"line {number} is not valid JSON: {_where(exc)}"
            first_error = first_error or reason
            parsed.rejected.append(Rejected(line, reason))
            continue
        any_json = True
        _sort_one(element, received_at, parsed)
    if not any_json:
        raise BodyError(400, f"body is neither a JSON array nor NDJSON: {first_error}")
    return parsed


def _sort(elements: list[Any], received_at: float) -> Parsed:
    parsed = Parsed()
    for element in elements:
        _sort_one(element, received_at, parsed)
    return parsed


def _sort_one(element: Any, received_at: float, parsed: Parsed) -> None:
    # The hot path of the intake: one call per element, so it keeps to plain lookups.
    if type(element) is not dict:
        parsed.rejected.append(Rejected(_dumps(element), f"element is a JSON {_kind(element)}, not an object"))
        return
    event = element.get("event")
    if event is not None or "event" in element:
        if type(event) is not dict:
            parsed.rejected.append(Rejected(_dumps(element), f"event is a JSON {_kind(event)}, not an object"))
            return
        wrapper = element
        key = element.get("keySuffix")
    elif type(element.get("action")) is str:
        event = element
        wrapper = {"event": element}
        key = None
    else:
        parsed.rejected.append(
            Rejected(_dumps(element), "object has no event (and is not a bare event with an action)")
        )
        return
    if type(key) is not str or not key:
        key = event.get("id")
        if type(key) is not str or not key:
            key = None
    action = event.get("action")
    parsed.raws.append(_dumps(wrapper))
    parsed.actions.append(action if type(action) is str else "")
    parsed.times.append(_epoch(event.get("occurred_at"), received_at))
    parsed.keys.append(key)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _epoch(value: Any, fallback: float, _parse: Any = datetime.fromisoformat) -> float:
    if type(value) is str and value:
        try:
            moment = _parse(value)
        except ValueError:
            return fallback
        if moment.tzinfo is None:
            return fallback
        return float(moment.timestamp())
    return fallback

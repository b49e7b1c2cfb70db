"""Turning a request body into journal records: decompression with limits, JSON array / NDJSON splitting,
and sorting each element into a deliverable record or a dead letter with its reason.

Elements are never re-serialised: each one is kept as the bytes that were received (only whitespace outside
strings is removed from an element that spans lines), so numbers of any size or precision and every escape
reach the sinks exactly as WorkOS sent them. msgspec splits a JSON array into the raw bytes of its elements and
decodes only the few fields the receiver needs (`keySuffix`, the event's `action`, `occurred_at` and `id`).
When the fast path refuses a body, a tolerant splitter finds the elements' boundaries so each bad element is
dead-lettered with its reason and the good ones next to it are kept.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
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

DEFAULT_MAX_EVENTS = 100_000
"""Elements one request may hold (`server.max_events_per_request`)."""


@dataclass(slots=True)
class Rejected:
    """An element that cannot be delivered, kept with the reason."""

    raw: bytes
    reason: str
    malformed: bool = False
    """Not JSON at all (as opposed to JSON that is not a WorkOS element)."""


@dataclass(slots=True)
class Parsed:
    """What a body held: the deliverable elements, column by column, and the rejected ones."""

    raws: list[bytes | msgspec.Raw] = field(default_factory=list)
    """Each wrapper's bytes as received, on one line (msgspec.Raw views into the body on the fast path)."""
    actions: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    """Epoch seconds of each event's `occurred_at`, else of the receipt."""
    keys: list[str | None] = field(default_factory=list)
    """Each element's dedup key: `keySuffix`, else the event's `id`."""
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.raws)


class _Head(msgspec.Struct):
    """The fields of an event the receiver reads; every other field is skipped (validated, not converted)."""

    action: Any = None
    occurred_at: Any = None
    id: Any = None


class _Element(msgspec.Struct):
    """A wrapper (`event` + `keySuffix`), or a bare event (`action`, `occurred_at`, `id` at the top)."""

    event: _Head | None | msgspec.UnsetType = msgspec.UNSET
    keySuffix: Any = None  # noqa: N815 - WorkOS's field name
    action: Any = None
    occurred_at: Any = None
    id: Any = None


class _FastHead(msgspec.Struct):
    """`_Head` for the fast path: msgspec parses `occurred_at` (RFC 3339) in C; anything else falls back."""

    action: Any = None
    occurred_at: datetime | None = None
    id: Any = None


class _FastElement(msgspec.Struct):
    """A wrapper with an event object (the fast path; anything else falls back)."""

    event: _FastHead
    keySuffix: Any = None  # noqa: N815 - WorkOS's field name


_split = msgspec.json.Decoder(list[msgspec.Raw]).decode
_elements = msgspec.json.Decoder(list[_FastElement]).decode
_element = msgspec.json.Decoder(_Element).decode
_BOM = b"\xef\xbb\xbf"
_JSON_SPACE = b" \t\r\n"
_KINDS = {
    "int": "number",
    "float": "number",
    "str": "string",
    "array": "array",
    "null": "null",
    "bool": "boolean",
    "object": "object",
}
_GOT = re.compile(r"got `([a-z]+)`")


def _not_utf8(data: bytes) -> bool:
    if data.isascii():
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _one_line(raw: bytes) -> bytes:
    # A pretty-printed element: its newlines are whitespace (JSON strings cannot hold raw newlines), and the
    # journal and NDJSON sinks keep one element per line. Only whitespace goes; values stay byte for byte.
    if b"\n" in raw or b"\r" in raw:
        return msgspec.json.format(raw, indent=-1)
    return raw


def parse_body(body: bytes, content_type: str, received_at: float, *, max_events: int = DEFAULT_MAX_EVENTS) -> Parsed:
    """Split a JSON array or NDJSON body (by Content-Type, else by its first byte) into elements.

    Bad elements are rejected one by one, next to the good ones. BodyError (400) when nothing in the body can
    be taken and some of it is not JSON at all (the sender learns where), 413 for more than `max_events`."""
    parsed = _parse(body, content_type, received_at, max_events)
    if not parsed.raws:
        malformed = next((item for item in parsed.rejected if item.malformed), None)
        if malformed is not None:
            raise BodyError(400, f"body is not valid JSON: {malformed.reason}")
    return parsed


def _parse(body: bytes, content_type: str, received_at: float, max_events: int) -> Parsed:
    text = body.strip(_JSON_SPACE)
    if text.startswith(_BOM):  # RFC 8259 lets a parser ignore a UTF-8 byte order mark
        text = text[len(_BOM) :].lstrip(_JSON_SPACE)
    if not text:
        raise BodyError(400, "empty body: expected a JSON array or NDJSON")
    if text[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in text[:4]:
        raise BodyError(400, "body is not UTF-8: JSON must be sent as UTF-8 (this looks like UTF-16 or UTF-32)")
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared in NDJSON_TYPES:
        if text.startswith(b"[") and _one_array(text):  # a JSON array sent as NDJSON: take it as the array
            return _parse_array(text, received_at, max_events)
        return _parse_lines(text, received_at, max_events)
    if text.startswith(b"["):
        return _parse_array(text, received_at, max_events)
    if text.startswith(b"{"):
        parsed = Parsed()
        try:  # one object, even pretty-printed over several lines, is one element
            _element(text)
        except (msgspec.DecodeError, RecursionError):
            return _parse_lines(text, received_at, max_events)
        _sort_one(text, received_at, parsed, "")
        return parsed
    raise BodyError(400, "body is neither a JSON array nor NDJSON: it must start with '[' or '{'")


def _one_array(text: bytes) -> bool:
    try:
        _split(text)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def _too_many(max_events: int) -> BodyError:
    return BodyError(413, f"more than max_events_per_request ({max_events}) elements in one request")


def _parse_array(text: bytes, received_at: float, max_events: int) -> Parsed:
    parsed = _fast(text, received_at, max_events)
    if parsed is not None:
        return parsed
    # The fast path refused the body: find each element's bounds and judge it alone.
    parsed = Parsed()
    pieces, tail_problem = _split_tolerant(text, max_events)
    for index, piece in enumerate(pieces):
        _sort_one(piece, received_at, parsed, f"element {index}: ", check_utf8=True)
    if tail_problem is not None:
        parsed.rejected.append(Rejected(*tail_problem))
    return parsed


def _fast(text: bytes, received_at: float, max_events: int, expected: int | None = None) -> Parsed | None:
    """The common case in two C passes: every element a wrapper with an event object, valid UTF-8, on one
    line. None when any element needs a closer look."""
    if _not_utf8(text):
        return None
    try:
        elements = _elements(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    if len(elements) > max_events:
        raise _too_many(max_events)
    if expected is not None and len(elements) != expected:
        return None
    heads = [element.event for element in elements]
    raws: list[bytes | msgspec.Raw] = list(_split(text))
    if b"\n" in text or b"\r" in text:
        raws = [_one_line(bytes(raw)) for raw in raws]
    parsed = Parsed(raws)
    parsed.keys = [_key(element.keySuffix, element.event) for element in elements]
    parsed.actions = [action if type(action) is str else "" for action in [head.action for head in heads]]
    parsed.times = [
        received_at if moment is None or moment.tzinfo is None else moment.timestamp()
        for moment in [head.occurred_at for head in heads]
    ]
    return parsed


def _key(suffix: Any, head: _Head | _FastHead | _Element) -> str | None:
    if type(suffix) is str and suffix:
        return suffix
    key = head.id
    return key if type(key) is str and key else None


_STRUCTURE = re.compile(rb'["\[\]{},]')
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+"', re.S)


def _split_tolerant(text: bytes, max_events: int) -> tuple[list[bytes], tuple[bytes, str, bool] | None]:
    """The elements of a JSON array that may be broken, by bracket depth outside strings (linear); and what
    follows the array or is left unterminated, with its reason."""
    pieces: list[bytes] = []
    depth = 0
    start = pos = 1
    end = len(text)

    def add(piece: bytes) -> None:
        pieces.append(piece)
        if len(pieces) > max_events:
            raise _too_many(max_events)

    while True:
        match = _STRUCTURE.search(text, pos)
        if match is None:
            rest = text[start:].strip(_JSON_SPACE)
            return pieces, ((rest, "the body ends inside an element (truncated?)", True) if rest else None)
        char = text[match.start()]
        pos = match.end()
        if char == 0x22:  # '"'
            closed = _STRING_REST.match(text, pos)
            if closed is None:
                rest = text[start:].strip(_JSON_SPACE)
                return pieces, (rest, "the body ends inside a string (truncated?)", True)
            pos = closed.end()
        elif char in b"[{":
            depth += 1
        elif char in b"]}":
            if depth == 0:
                piece = text[start : match.start()].strip(_JSON_SPACE)
                if piece or pieces:
                    add(piece)
                rest = text[pos:end].strip(_JSON_SPACE)
                return pieces, ((rest, "data after the end of the JSON array", True) if rest else None)
            depth -= 1
        elif depth == 0:  # ','
            add(text[start : match.start()].strip(_JSON_SPACE))
            start = pos


def _parse_lines(text: bytes, received_at: float, max_events: int) -> Parsed:
    lines = [line for line in text.split(b"\n") if line.strip(_JSON_SPACE)]
    if len(lines) > max_events:
        raise _too_many(max_events)
    # The lines as one array take the fast path; its count check catches a line that holds two elements.
    parsed = _fast(b"[" + b",".join(lines) + b"]", received_at, max_events, expected=len(lines))
    if parsed is not None:
        return parsed
    check_utf8 = not text.isascii()
    parsed = Parsed()
    for number, line in enumerate(text.split(b"\n"), start=1):
        line = line.strip(_JSON_SPACE)
        if line:
            _sort_one(line, received_at, parsed, f"line {number}: ", check_utf8=check_utf8)
    return parsed


def _reason(exc: Exception, where: str) -> str:
    if isinstance(exc, RecursionError):
        return f"{where}nested too deeply"
    message = str(exc)
    got = _GOT.search(message)
    if isinstance(exc, msgspec.ValidationError) and got is not None:
        kind = _KINDS.get(got.group(1), got.group(1))
        if "$.event" in message:
            return f"{where}event is a JSON {kind}, not an object"
        if message.endswith("`") or "- at `$`" in message or "at `$." not in message:
            return f"{where}element is a JSON {kind}, not an object"
    return f"{where}not valid JSON: {message.removeprefix('JSON is malformed: ')}"


def _sort_one(raw: bytes, received_at: float, parsed: Parsed, where: str, *, check_utf8: bool = False) -> None:
    # The hot path of the intake: one call per element.
    if not raw:
        parsed.rejected.append(Rejected(raw, f"{where}empty element", True))
        return
    try:
        element = _element(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        parsed.rejected.append(Rejected(raw, _reason(exc, where), not isinstance(exc, msgspec.ValidationError)))
        return
    if check_utf8 and _not_utf8(raw):
        parsed.rejected.append(Rejected(raw, f"{where}not valid UTF-8", True))
        return
    event = element.event
    if event is None:
        parsed.rejected.append(Rejected(raw, f"{where}event is a JSON null, not an object"))
        return
    raw = _one_line(raw)
    if event is msgspec.UNSET:
        if type(element.action) is not str:
            parsed.rejected.append(
                Rejected(raw, f"{where}object has no event (and is not a bare event with an action)")
            )
            return
        head: _Head | _Element = element
        raw = b'{"event":' + raw + b"}"
        key = None
    else:
        head = event
        key = element.keySuffix
    key = _key(key, head)
    action = head.action
    parsed.raws.append(raw)
    parsed.actions.append(action if type(action) is str else "")
    parsed.times.append(_epoch(head.occurred_at, received_at))
    parsed.keys.append(key)


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

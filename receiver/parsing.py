"""Turning a (decompressed: receiver.decoding) request body into journal records: JSON array / NDJSON splitting,
and sorting each element into a deliverable record or a dead letter with its reason.

Elements are never re-serialised: each one is kept as the bytes that were received (only whitespace outside
strings is removed from an element that spans lines), so numbers of any size or precision and every escape
reach the sinks exactly as WorkOS sent them. msgspec splits a JSON array into the raw bytes of its elements and
decodes only the few fields the receiver needs (`keySuffix`, the event's `action`, `occurred_at` and `id`).
When the fast path refuses a body, a tolerant splitter finds the elements' boundaries so each bad element is
dead-lettered with its reason and the good ones next to it are kept.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import msgspec

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


# --- parsing -------------------------------------------------------------------------------------

DEFAULT_MAX_EVENTS = 100_000
"""Elements one request may hold (`server.max_events_per_request`)."""

MAX_KEY_CHARS = 256
"""A dedup key (`keySuffix`, else the event's `id`) longer than this is remembered by its SHA-256 instead
(DIGEST_PREFIX and 64 hex digits), so that what dedup keeps a key (`dedup_log`, a record's meta, a shared
index) is bounded whatever a sender puts there. WorkOS's keys are a few dozen characters."""

DIGEST_PREFIX = "sha256:"
"""How a digested key starts. A key sent starting so is digested too, so that no key sent can equal the
digest of another (and make a different event a duplicate)."""


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
    held: int = 0
    """Bytes of the body the raws are views into (0 when they are bytes of their own): what keeping any of them
    keeps alive."""

    def __len__(self) -> int:
        return len(self.raws)


_ABSENT = msgspec.Raw(b"")


class _Head(msgspec.Struct):
    """The fields of an event the receiver reads, kept raw: any JSON value is fine there, and a number beyond
    the range of a double must not make a valid event a dead letter. Every other field is skipped (validated,
    not converted)."""

    action: msgspec.Raw = _ABSENT
    occurred_at: msgspec.Raw = _ABSENT
    id: msgspec.Raw = _ABSENT


class _Element(_Head):
    """A wrapper (`event` + `keySuffix`), or a bare event (`action`, `occurred_at`, `id` at the top)."""

    event: _Head | None | msgspec.UnsetType = msgspec.UNSET
    keySuffix: msgspec.Raw = _ABSENT  # noqa: N815 - WorkOS's field name


_FastKey = Annotated[str, msgspec.Meta(max_length=MAX_KEY_CHARS)]
"""A key the fast path takes as it is; a longer one sends the body to the slow path, which digests it."""


class _FastHead(msgspec.Struct):
    """`_Head` for the fast path, typed as WorkOS sends it (msgspec parses `occurred_at`, RFC 3339, in C);
    any other type sends the body to the slow path."""

    action: str | None = None
    occurred_at: datetime | None = None
    id: _FastKey | None = None


class _FastElement(msgspec.Struct):
    """A wrapper with an event object (the fast path)."""

    event: _FastHead
    keySuffix: _FastKey | None = None  # noqa: N815 - WorkOS's field name


_split = msgspec.json.Decoder(list[msgspec.Raw]).decode
_elements = msgspec.json.Decoder(list[_FastElement]).decode
_typed_element = msgspec.json.Decoder(_Element).decode
_one_value = msgspec.json.Decoder(msgspec.Raw).decode


def _element(raw: bytes) -> _Element:
    """One element decoded. The typed decoder gives up at the first value of the wrong type, before it could see
    that what follows makes the element no JSON at all (`"keySuffix":"k"}` would be "a JSON string"): such an
    element raises the DecodeError of its syntax, not a ValidationError of its type (one nested too deeply to
    check keeps the error of its type)."""
    try:
        return _typed_element(raw)
    except msgspec.ValidationError:
        with contextlib.suppress(RecursionError):
            _one_value(raw)
        raise


_string = msgspec.json.Decoder(str).decode
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
    # UTF-16 and UTF-32 put a NUL next to the first character ('[' or '{'); UTF-8 JSON never does.
    if text[:2] in (b"\xff\xfe", b"\xfe\xff") or text[0] == 0 or text[1:2] == b"\x00":
        raise BodyError(400, "body is not UTF-8: JSON must be sent as UTF-8 (this looks like UTF-16 or UTF-32)")
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared in NDJSON_TYPES:
        if text.startswith(b"[") and _one_array(text, max_events):  # a JSON array sent as NDJSON: the array
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
        _sort_one(text, received_at, parsed, "", check_utf8=True)
        return parsed
    raise BodyError(400, "body is neither a JSON array nor NDJSON: it must start with '[' or '{'")


def _one_array(text: bytes, max_events: int) -> bool:
    """Whether the body is one JSON array, maybe with bad elements (not NDJSON whose first line is one)."""
    try:
        _split(text)
    except (msgspec.DecodeError, RecursionError):
        if b"\n" in text:  # maybe NDJSON lines, some of them arrays: whole ones are not looked for again
            return _split_tolerant(text, max_events)[2] is None
        return _split_broken(text, max_events)[1] is None
    return True


def _too_many(max_events: int) -> BodyError:
    return BodyError(413, f"more than max_events_per_request ({max_events}) elements in one request")


def _parse_array(text: bytes, received_at: float, max_events: int) -> Parsed:
    parsed = _fast(text, received_at, max_events)
    if parsed is not None:
        return parsed
    # The fast path refused the body: find each element's bounds and judge it alone.
    parsed = Parsed()
    pieces, tail_problem = _split_broken(text, max_events)
    for index, piece in enumerate(pieces):
        _sort_one(piece, received_at, parsed, f"element {index}: ", check_utf8=True)
    if tail_problem is not None:
        parsed.rejected.append(Rejected(*tail_problem))
    return parsed


def _split_broken(text: bytes, max_events: int) -> tuple[list[bytes], _TailProblem | None]:
    """The elements of a JSON array the fast path refused, and what is left over with its reason."""
    pieces, starts, tail_problem = _split_tolerant(text, max_events)
    pieces, tail_problem = _whole_after_malformed(text, pieces, starts, tail_problem)
    if len(pieces) > max_events:
        raise _too_many(max_events)
    return pieces, tail_problem


def _fast(text: bytes, received_at: float, max_events: int, lines: list[bytes] | None = None) -> Parsed | None:
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
    raws: list[bytes | msgspec.Raw] = list(_split(text))
    if lines is not None and (
        len(raws) != len(lines) or any(memoryview(r) != line for r, line in zip(raws, lines, strict=True))
    ):
        return None
    heads = [element.event for element in elements]
    held = len(text)
    if b"\n" in text or b"\r" in text:
        raws, held = [_one_line(bytes(raw)) for raw in raws], 0
    keys = [element.keySuffix or element.event.id or None for element in elements]
    if DIGEST_PREFIX in "\0".join(filter(None, keys)):  # maybe a key that reads as a digest: the slow path sees
        return None
    parsed = Parsed(raws, held=held)
    parsed.keys = keys
    parsed.actions = [head.action or "" for head in heads]
    parsed.times = [
        received_at if moment is None or moment.tzinfo is None else moment.timestamp()
        for moment in [head.occurred_at for head in heads]
    ]
    return parsed


def _text(raw: msgspec.Raw) -> str | None:
    """A head field's value when it is a non-empty JSON string."""
    if bytes(memoryview(raw)[:1]) != b'"':
        return None
    return _string(raw) or None


_STRUCTURE = re.compile(rb'["\[\]{},]')
_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+"', re.S)


_CLOSER = {ord("["): ord("]"), ord("{"): ord("}")}
_WRAPPER_NEXT = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"event"[ \t\r\n]*:')


_TailProblem = tuple[bytes, str, bool]
_IN_STRING = "the body ends inside a string (truncated?)"
_AFTER_ARRAY = "data after the end of the JSON array"


def _split_tolerant(text: bytes, max_events: int) -> tuple[list[bytes], list[int], _TailProblem | None]:
    """The elements of a JSON array that may be broken, found in one linear pass; where each begins in `text`
    (and, last, where what was left unsplit begins); and what follows the array or is left unterminated, with
    its reason. Strings are skipped; opened brackets are stacked; a closer of the other kind closes through to
    its opener (or closes the innermost one when there is none); a stray '}' is ignored; only a ']' with nothing
    open ends the array. Inside objects only (no array open), a ',' followed by a wrapper's start (`{"event":`,
    never valid JSON there) ends an element left unclosed."""
    pieces: list[bytes] = []
    starts: list[int] = []
    stack: list[int] = []
    # How many closers of each kind the stack holds: whether a closer has its opener open, in constant time
    # (a scan of the stack at each closer made `[` * n + `}` * n quadratic).
    open_closers = {0x5D: 0, 0x7D: 0}
    start = pos = 1

    def add(piece: bytes) -> None:
        pieces.append(piece)
        starts.append(start)
        if len(pieces) > max_events:
            raise _too_many(max_events)

    while True:
        match = _STRUCTURE.search(text, pos)
        if match is None:
            rest = text[start:].strip(_JSON_SPACE)
            starts.append(start)
            return pieces, starts, ((rest, "the body ends inside an element (truncated?)", True) if rest else None)
        char = text[match.start()]
        pos = match.end()
        if char == 0x22:  # '"'
            closed = _STRING_REST.match(text, pos)
            if closed is None:
                rest = text[start:].strip(_JSON_SPACE)
                starts.append(start)
                return pieces, starts, (rest, _IN_STRING, True)
            pos = closed.end()
        elif char in _CLOSER:
            closer = _CLOSER[char]
            stack.append(closer)
            open_closers[closer] += 1
        elif char == 0x2C:  # ','
            if not stack or (not open_closers[0x5D] and _WRAPPER_NEXT.match(text, pos)):
                # At depth 0 a ',' ends an element. Inside objects a ',' must be followed by a key: a wrapper
                # there means the element before it was left without its closing brace(s). Not inside an
                # array, where `,{` is JSON: an object missing its '}' in `targets` must not make its
                # neighbour an element.
                add(text[start : match.start()].strip(_JSON_SPACE))
                start = pos
                stack.clear()
                open_closers[0x5D] = open_closers[0x7D] = 0
        elif open_closers[char]:
            while (popped := stack.pop()) != char:
                open_closers[popped] -= 1
            open_closers[char] -= 1
        elif stack:  # a closer with no opener of its kind: it closes the innermost one
            open_closers[stack.pop()] -= 1
        elif char == 0x5D:  # ']' with nothing open: the end of the array
            piece = text[start : match.start()].strip(_JSON_SPACE)
            if piece or pieces:
                add(piece)
            rest = text[pos:].strip(_JSON_SPACE)
            starts.append(pos)
            return pieces, starts, ((rest, _AFTER_ARRAY, True) if rest else None)


_COMMA_BEFORE_WRAPPER = re.compile(b",(?=" + _WRAPPER_NEXT.pattern + b")")
"""A ',' followed by a wrapper's start (`_WRAPPER_NEXT`)."""
_RESYNC_TRIES = 8
"""How many places in a body are tried as the start of the whole elements a malformed one swallowed. Each try
decodes up to the rest of the body, so the cost stays linear in it."""


def _malformed(piece: bytes) -> bool:
    try:
        _element(piece)
    except msgspec.ValidationError:
        return False
    except (msgspec.DecodeError, RecursionError):
        return True
    return False


def _whole_after_malformed(
    text: bytes, pieces: list[bytes], starts: list[int], tail_problem: _TailProblem | None
) -> tuple[list[bytes], _TailProblem | None]:
    """`pieces` and `tail_problem`, or, when a malformed element swallowed the whole elements after it, that
    element alone followed by them.

    A string left without its closing quote ends at a quote of a later element, and from there the splitter
    reads strings where the body has none: the elements after it end up in its piece, in the ones after it, or
    in the unsplit rest. Where a ',' inside a malformed piece (or that rest: when the body ends inside a
    string, or when a ']' in a malformed piece ended the array) is followed by a wrapper's start,
    and from there to the array's closing ']' the body is strict JSON, the elements of that stretch are the
    ones after it (each then judged alone). An object nested in the broken element is followed by its parents'
    closers, so it never passes for one. Only a body that ends with its ']' qualifies: a truncated one may have
    lost those closers."""
    if not text.endswith(b"]"):
        return pieces, tail_problem
    separators = set(starts)  # a piece begins right after its ',': that one is no place to start again
    tries = _RESYNC_TRIES
    judged: dict[int, bool] = {}

    def malformed(index: int) -> bool:
        if index not in judged:
            judged[index] = _malformed(pieces[index])
        return judged[index]

    for match in _COMMA_BEFORE_WRAPPER.finditer(text, 0, len(text) - 1):
        if match.start() + 1 in separators:
            continue
        index = bisect.bisect_right(starts, match.start()) - 1
        if index < len(pieces):
            if not malformed(index):
                continue
        elif tail_problem is None or tail_problem[1] not in (_IN_STRING, _AFTER_ARRAY):
            break
        elif tail_problem[1] == _AFTER_ARRAY:
            # Only a ']' read outside a string in a broken element: the element it ended goes with it. After
            # a whole last element the array did end there, and what follows is not looked into.
            if not (index and malformed(index - 1)):
                break
            index -= 1
        if not tries:
            break
        tries -= 1
        try:
            wholes = _split(b"[" + text[match.end() : -1] + b"]")
        except (msgspec.DecodeError, RecursionError):
            continue
        head = text[starts[index] : match.start()].strip(_JSON_SPACE)
        return [*pieces[:index], head, *map(bytes, wholes)], None
    return pieces, tail_problem


def _parse_lines(text: bytes, received_at: float, max_events: int) -> Parsed:
    lines = [line for line in (line.strip(_JSON_SPACE) for line in text.split(b"\n")) if line]
    if len(lines) > max_events:
        raise _too_many(max_events)
    # The lines as one array take the fast path, which counts only if each element is exactly one line.
    parsed = _fast(b"[" + b",".join(lines) + b"]", received_at, max_events, lines=lines)
    if parsed is not None:
        return parsed
    check_utf8 = not text.isascii()
    parsed = Parsed()
    for number, line in enumerate(text.split(b"\n"), start=1):
        line = line.strip(_JSON_SPACE)
        if line:
            _sort_one(line, received_at, parsed, f"line {number}: ", check_utf8=check_utf8)
    return parsed


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reason(exc: Exception, where: str, raw: bytes = b"") -> str:
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
    detail = message.removeprefix("JSON is malformed: ")
    if "hex escape" in detail or ("truncated" in detail and _SURROGATE.search(raw)):  # msgspec's words for it
        detail += " (a \\u escape that is not a whole character, such as a lone surrogate)"
    return f"{where}not valid JSON: {detail}"


def _sort_one(raw: bytes, received_at: float, parsed: Parsed, where: str, *, check_utf8: bool = False) -> None:
    # The slow path: one element judged alone; a dead letter keeps the bytes exactly as received.
    if not raw:
        parsed.rejected.append(Rejected(raw, f"{where}empty element", True))
        return
    try:
        element = _element(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        parsed.rejected.append(Rejected(raw, _reason(exc, where, raw), not isinstance(exc, msgspec.ValidationError)))
        return
    if check_utf8 and _not_utf8(raw):
        parsed.rejected.append(Rejected(raw, f"{where}not valid UTF-8", True))
        return
    event = element.event
    if event is None:
        parsed.rejected.append(Rejected(raw, f"{where}event is a JSON null, not an object"))
        return
    if event is msgspec.UNSET:
        action = _text(element.action)
        if action is None:
            parsed.rejected.append(
                Rejected(raw, f"{where}object has no event (and is not a bare event with an action)")
            )
            return
        head: _Head = element
        raw = b'{"event":' + _one_line(raw) + b"}"
        key = None
    else:
        head = event
        action = _text(head.action)
        key = _text(element.keySuffix)
        raw = _one_line(raw)
    parsed.raws.append(raw)
    parsed.actions.append(action or "")
    parsed.times.append(_epoch(_text(head.occurred_at), received_at))
    key = key or _text(head.id)
    if key is not None and (len(key) > MAX_KEY_CHARS or key.startswith(DIGEST_PREFIX)):
        key = DIGEST_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    parsed.keys.append(key)


def _epoch(value: str | None, fallback: float, _parse: Any = datetime.fromisoformat) -> float:
    if value:
        try:
            moment = _parse(value)
        except ValueError:
            return fallback
        if moment.tzinfo is None:
            return fallback
        return float(moment.timestamp())
    return fallback

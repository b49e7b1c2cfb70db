"""Test-only helpers for exactness tests: a strict arbitrary-precision JSON reading, JSON text generated as text
(so number and escape spellings vary), and whitespace compaction outside strings."""

from __future__ import annotations

import decimal
import functools
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import strategies as st

# --- reading -----------------------------------------------------------------------------------------


class NotStrictJSON(ValueError):
    """A line a sink wrote that strict JSON refuses."""


def _refuse_constant(name: str) -> Any:
    raise NotStrictJSON(f"{name} is not JSON")


_UNBOUNDED = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


@dataclass(frozen=True)
class HugeNumber:
    """A number whose exponent even an unbounded Decimal context refuses (1e99999999999999999999): its text."""

    text: str


def _decimal(text: str) -> Decimal | HugeNumber:
    try:
        return _UNBOUNDED.create_decimal(text)  # exact, whatever the exponent (the default context caps it)
    except ArithmeticError:
        return HugeNumber(text)


def _int(text: str) -> int | Decimal | HugeNumber:
    # Python refuses to convert more than 4300 digits to an int; such a number stays exact as a Decimal.
    return int(text) if len(text) <= 4000 else _decimal(text)


def exact_loads(text: str | bytes) -> Any:
    """JSON with numbers kept exact (ints of any size, Decimal for the rest), NaN/Infinity refused, and objects
    as lists of (key, value) pairs so that order and duplicate keys take part in comparisons."""
    return json.loads(
        text, parse_float=_decimal, parse_int=_int, parse_constant=_refuse_constant, object_pairs_hook=list
    )


def _check_strings(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # a lone surrogate (\ud800) cannot be encoded
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def strict_line(line: bytes) -> Any:
    """The value of one line a sink wrote; raises NotStrictJSON unless it is one line of strict UTF-8 JSON with
    no NaN/Infinity and no lone surrogate."""
    if b"\n" in line or b"\r" in line:
        raise NotStrictJSON("the line holds a line break")
    try:
        value = exact_loads(line.decode("utf-8"))
        _check_strings(value)
    except (UnicodeError, ValueError, RecursionError, ArithmeticError) as exc:
        raise NotStrictJSON(f"{type(exc).__name__}: {exc}") from None
    return value


def check_line(line: bytes) -> None:
    """strict_line without keeping the value: orjson (strict RFC 8259: UTF-8, no NaN, no lone surrogate) takes
    most lines at once; what it refuses (numbers beyond double range) goes the exact way."""
    if b"\n" not in line and b"\r" not in line:
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
        else:
            return
    strict_line(line)


def same_value(a: Any, b: Any) -> bool:
    """Equality that also tells 1.0 from 1.00 (Decimal equality does not)."""
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return a.as_tuple() == b.as_tuple()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# --- compaction --------------------------------------------------------------------------------------

# A JSON string cannot hold a raw line break, so a string token never spans lines: a broken quote in a mutated
# body cannot shift what counts as "inside a string" past the end of its own line.
_TOKEN_OR_SPACE = re.compile(rb'("(?:[^"\\\r\n]|\\[^\r\n])*")|[ \t\r\n]+')


@functools.lru_cache(maxsize=256)
def compact(raw: bytes) -> bytes:
    """`raw` without JSON whitespace outside strings."""
    return _TOKEN_OR_SPACE.sub(lambda m: m.group(1) or b"", raw)


def sent_in(line: bytes, body: bytes, squeezed: bytes | None = None) -> bool:
    """Whether `line` is bytes of `body` as sent: a slice of it, or a slice with whitespace outside strings
    removed (an element that spanned lines), possibly a bare event wrapped as `{"event":...}`. `squeezed`:
    `compact(body)` when the caller keeps it."""
    candidates = [line]
    if line.startswith(b'{"event":') and line.endswith(b"}"):
        candidates.append(line[len(b'{"event":') : -1])
    if any(c in body for c in candidates):
        return True
    if b"\n" in body or b"\r" in body:
        squeezed = compact(body) if squeezed is None else squeezed
        return any(c in squeezed for c in candidates)
    return False


# --- generated JSON text -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    """JSON text as tokens; rendered with chosen whitespace between them."""

    tokens: tuple[str, ...]

    def render(self, spaces: list[str] | None = None) -> str:
        if not spaces:
            return "".join(self.tokens)
        out = []
        for index, token in enumerate(self.tokens):
            out.append(token)
            out.append(spaces[index % len(spaces)])
        return "".join(out[:-1])


SPECIAL_NUMBERS = (
    "18446744073709551616",
    "-18446744073709551617",
    "1000000000000000000000000000000",
    "-1000000000000000000000000000000",
    "1.000000000000000000001",
    "1e999",
    "-1e-999",
    "1E+400",
    "-0",
    "-0.0e-0",
    "0.10",
    "4.9E-325",
    "1.7976931348623157e309",
    "123456789012345678901234567890.123456789012345678901234567890",
)
_DIGITS = "0123456789"


@st.composite
def numbers(draw: st.DrawFn) -> str:
    """A JSON number as text: any size, precision and spelling."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(SPECIAL_NUMBERS))
    sign = draw(st.sampled_from(["", "", "-"]))
    whole = draw(
        st.one_of(
            st.just("0"),
            st.text("123456789", min_size=1, max_size=1).flatmap(
                lambda first: st.text(_DIGITS, max_size=40).map(lambda rest: first + rest)
            ),
        )
    )
    frac = draw(st.one_of(st.just(""), st.text(_DIGITS, min_size=1, max_size=40).map(lambda d: "." + d)))
    exp = draw(
        st.one_of(
            st.just(""),
            st.tuples(
                st.sampled_from("eE"), st.sampled_from(["", "+", "-"]), st.text(_DIGITS, min_size=1, max_size=4)
            ).map("".join),
        )
    )
    return sign + whole + frac + exp


_SHORT_ESCAPES = ('\\"', "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t")


def _hex4(value: int, upper: bool) -> str:
    text = f"{value:04x}"
    return text.upper() if upper else text


@st.composite
def _unicode_escape(draw: st.DrawFn) -> str:
    upper = draw(st.booleans())
    point = draw(st.one_of(st.integers(0, 0x1F), st.just(0xE9), st.integers(0, 0xD7FF), st.integers(0xE000, 0xFFFF)))
    return "\\u" + _hex4(point, upper)


@st.composite
def _surrogate_pair(draw: st.DrawFn) -> str:
    upper = draw(st.booleans())
    point = draw(st.one_of(st.just(0x1F600), st.integers(0x10000, 0x10FFFF))) - 0x10000
    return "\\u" + _hex4(0xD800 + (point >> 10), upper) + "\\u" + _hex4(0xDC00 + (point & 0x3FF), upper)


_RAW_CHARS = st.characters(codec="utf-8", exclude_characters='"\\', min_codepoint=0x20)
"""Any character JSON lets a string hold raw (non-ASCII too); surrogates cannot be encoded, so are excluded."""


def strings(max_pieces: int = 6) -> st.SearchStrategy[str]:
    """A JSON string as text, mixing raw characters and every kind of escape."""
    piece = st.one_of(
        st.text(_RAW_CHARS, min_size=1, max_size=6),
        st.sampled_from(_SHORT_ESCAPES),
        _unicode_escape(),
        _surrogate_pair(),
    )
    return st.lists(piece, max_size=max_pieces).map(lambda parts: '"' + "".join(parts) + '"')


def decoded(token: str) -> str:
    """What a JSON string token means."""
    return str(json.loads(token))


def _array(items: list[Doc]) -> Doc:
    tokens: list[str] = ["["]
    for index, item in enumerate(items):
        if index:
            tokens.append(",")
        tokens.extend(item.tokens)
    tokens.append("]")
    return Doc(tuple(tokens))


def object_doc(members: list[tuple[str, Doc]]) -> Doc:
    """An object from (key token, value) members, in order (keys may repeat)."""
    tokens: list[str] = ["{"]
    for index, (key, value) in enumerate(members):
        if index:
            tokens.append(",")
        tokens.extend((key, ":"))
        tokens.extend(value.tokens)
    tokens.append("}")
    return Doc(tuple(tokens))


def _members(inner: st.SearchStrategy[Doc], reserved: frozenset[str] = frozenset()) -> st.SearchStrategy[Doc]:
    @st.composite
    def build(draw: st.DrawFn) -> Doc:
        keys = draw(st.lists(strings(3).filter(lambda k: decoded(k) not in reserved), max_size=4))
        members = [(key, draw(inner)) for key in keys]
        if members and draw(st.booleans()):  # a duplicate key, with another value
            members.append((draw(st.sampled_from(keys)), draw(inner)))
        return object_doc(members)

    return build()


SCALARS: st.SearchStrategy[Doc] = st.one_of(numbers(), strings(), st.sampled_from(["true", "false", "null"])).map(
    lambda token: Doc((token,))
)

VALUES: st.SearchStrategy[Doc] = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(_array), _members(inner)),
    max_leaves=16,
)

HEAD_KEYS = frozenset({"action", "occurred_at", "id", "event", "keySuffix"})
"""Fields the intake decodes; random members never use these names (at any spelling)."""

SPACES = st.sampled_from(["", "", "", "", " ", "  ", "\t", "\n", "\r\n", "\n    ", " \n\t "])
ONE_LINE_SPACES = st.sampled_from(["", "", "", " ", "  ", "\t", " \t "])
KEY_PLACEHOLDER = '"@KEY@"'

"""The small public interface every sink implements, and the types sinks share with the receiver.

A sink supplies only its config model, the one call that sends a batch, and the classification of the
answer. Batching, retries with backoff, attempt limits, dead-lettering and metrics live once in the
receiver's delivery engine; a sink never loops, sleeps or retries by itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, runtime_checkable

import msgspec

from sinks.fields import ByteSize, Duration, SinkConfig, TlsOptions, parse_duration, parse_size
from sinks.outcome import Outcome, SendResult, Verdict

__all__ = [
    "ByteSize",
    "Duration",
    "Event",
    "Health",
    "Outcome",
    "SendResult",
    "Sink",
    "SinkConfig",
    "SinkFactory",
    "TlsOptions",
    "Verdict",
    "parse_duration",
    "parse_size",
]


# --- what flows into a sink ----------------------------------------------------------------------


_EMPTY_RAW = msgspec.Raw(b"{}")


class _EventHead(msgspec.Struct):
    """The fields of a WorkOS event that sinks name records by; the rest is skipped, never converted."""

    id: Any = None
    occurred_at: Any = None


class _WrapperHead(msgspec.Struct):
    """The wrapper's own fields and the raw bytes of its event."""

    event: msgspec.Raw = msgspec.field(default_factory=lambda: _EMPTY_RAW)
    keySuffix: Any = None  # noqa: N815 - WorkOS's field name
    timestamp: Any = None
    source: Any = None


_wrapper_head = msgspec.json.Decoder(_WrapperHead)
_event_head = msgspec.json.Decoder(_EventHead)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class _EventSeat(msgspec.Struct, gc=False, eq=False):
    """An event's place in the journal (Event's positional fields)."""

    seq: int
    stream: str
    raw: bytes
    """The wrapper (`{"event": ..., "keySuffix": ..., ...}`) as received, on one line, unknown fields kept."""


class Event(_EventSeat, kw_only=True, gc=False, eq=False):
    """One journaled WorkOS element: the wrapper exactly as WorkOS sent it, plus what the intake derived.

    `raw` and `event_raw` are the bytes as received (whitespace aside): a sink embeds them as they are
    (`orjson.Fragment(event.event_raw)`), so numbers of any size and every escape reach the destination
    unchanged. `wrapper` and `event` are parsed views for people and tests; they hold `inf` where the bytes
    hold `1e999` and round long decimals to doubles, so a sink never serialises them back.

    A msgspec Struct: delivery builds one per event read back from the journal, and a Struct is made in C,
    a few times faster than a class with `__slots__`, and outside the garbage collector's scans (it holds no
    cycle).
    """

    action: str
    time: float
    """Epoch seconds of the event's `occurred_at`, else of its receipt."""
    received_at: float
    _head: _WrapperHead | None = None
    _wrapper: dict[str, Any] | None = None

    @property
    def head(self) -> _WrapperHead:
        """The wrapper's own fields, decoded on first use (the event itself stays raw)."""
        if self._head is None:
            self._head = _wrapper_head.decode(self.raw)
        return self._head

    @property
    def event_raw(self) -> bytes:
        """The bare WorkOS event's bytes exactly as received, for a sink to embed (`orjson.Fragment(...)`) or
        write. ValueError when the wrapper has no `event` (nothing may be delivered as if WorkOS had sent it),
        msgspec.DecodeError when `raw` is not JSON."""
        head = self.head
        if head.event is _EMPTY_RAW:
            raise ValueError("the wrapper has no `event`")
        return bytes(head.event)

    @property
    def event_id(self) -> str | None:
        """The event's `id`, when it is a non-empty string."""
        return _text(_event_head.decode(self.head.event).id)

    @property
    def occurred_at(self) -> str | None:
        """The event's `occurred_at` string, when it has one."""
        return _text(_event_head.decode(self.head.event).occurred_at)

    @property
    def key_suffix(self) -> str | None:
        """The wrapper's `keySuffix`, unique per delivered event."""
        return _text(self.head.keySuffix)

    @property
    def timestamp(self) -> str:
        """The wrapper's `timestamp` string, else the event's `occurred_at`, else the receive time (ISO-8601)."""
        return _text(self.head.timestamp) or self.occurred_at or iso_utc(self.received_at)

    @property
    def source(self) -> str | None:
        """The wrapper's `source` (the WorkOS team name), when it has one."""
        return _text(self.head.source)

    @property
    def wrapper(self) -> dict[str, Any]:
        """The wrapper parsed into Python values (for display and tests; never serialised back)."""
        if self._wrapper is None:
            self._wrapper = json.loads(self.raw)  # the standard library takes numbers beyond double range
        return self._wrapper

    @property
    def event(self) -> dict[str, Any]:
        """The bare WorkOS event parsed into Python values (for display and tests; never serialised back)."""
        event: dict[str, Any] = self.wrapper["event"]
        return event

    def __repr__(self) -> str:
        return f"Event(seq={self.seq}, stream={self.stream!r}, action={self.action!r})"


def iso_utc(epoch: float) -> str:
    """`2024-01-15T10:30:00.123Z` for an epoch time (always four year digits: `0999-…`, where strftime's `%Y`
    writes `999`). ValueError outside the years 1 to 9999."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


# --- what a sink answers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    """A sink's answer to a health check; `message` is shown to people, so it names no secret."""

    ok: bool
    message: str


# --- the interface -------------------------------------------------------------------------------


@runtime_checkable
class Sink(Protocol):
    """A destination. Built from its validated config; `send` is called with one batch at a time."""

    name: str

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Deliver one batch and classify the answer. Must not raise for delivery problems."""
        ...

    async def healthcheck(self) -> Health:
        """Check the destination is reachable and accepts these credentials."""
        ...

    async def close(self) -> None:
        """Release connections and files; safe to call twice."""
        ...


class SinkFactory(Protocol):
    """What the registry hands out: a sink class with its config model."""

    Config: ClassVar[type[SinkConfig]]

    def __call__(self, name: str, config: Any) -> Sink:
        """Build the sink (no network I/O here; `healthcheck` does that)."""
        ...

"""The small public interface every sink implements, and the types sinks share with the receiver.

A sink supplies only its config model, the one call that sends a batch, and the classification of the
answer. Batching, retries with backoff, attempt limits, dead-lettering and metrics live once in the
receiver's delivery engine; a sink never loops, sleeps or retries by itself.
"""

from __future__ import annotations

import enum
import json
import re
import ssl
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Protocol, runtime_checkable

import msgspec
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from sinks.errors import SinkError

__all__ = [
    "ByteSize",
    "Duration",
    "PositiveDuration",
    "Event",
    "Failure",
    "Health",
    "Outcome",
    "SendResult",
    "Sink",
    "SinkConfig",
    "SinkFactory",
    "TlsOptions",
    "classify_http_status",
    "parse_duration",
    "parse_size",
]


# --- configuration value types -------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_duration(value: object) -> float:
    """Seconds from `500ms`, `1s`, `5m`, `24h`, `7d`, or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 1s, 24h or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError("expected a duration such as 500ms, 1s, 24h or a number of seconds")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 (0 would turn this protection off)")
    return seconds


def _is_number(annotation: object) -> bool:
    """Whether a field's type is a number (int or float, or an optional one), bool excluded."""
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    return bool(args) and all(arg in (int, float, type(None)) for arg in args) and type(None) in args


def reject_boolean(model: type[BaseModel], value: object, field: str | None) -> object:
    """The body of a `field_validator("*", mode="before")`: YAML's `true` is not the number 1."""
    if isinstance(value, bool) and field is not None:
        info = model.model_fields.get(field)
        if info is not None and _is_number(info.annotation):
            raise ValueError("expected a number, not a boolean")
    return value


def parse_size(value: object) -> int:
    """Bytes from `1048576`, `10MiB`, `512KiB`, `1GB`, `2k`."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, 512KiB or 10MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = (match.group(2) or "").lower()
        base = 1024 if "i" in unit else 1000
        letter = unit[:1] if unit not in ("b", "") else ""
        factor = {"": 1, "k": base, "m": base**2, "g": base**3, "t": base**4}[letter]
        size = int(float(match.group(1)) * factor)
    else:
        raise ValueError("expected a size such as 1048576, 512KiB or 10MiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; YAML may say `500ms`, `1s`, `24h` or a number."""

PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]
"""A duration that must be more than 0 (a timeout: 0 would wait for ever, or not at all)."""

ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; YAML may say `10MiB` or a number."""


class SinkConfig(BaseModel):
    """Base of every sink's own options: frozen, keyword-only, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: object, info: ValidationInfo) -> object:
        return reject_boolean(cls, value, info.field_name)


class TlsOptions(SinkConfig):
    """How a sink checks the certificate of the server it sends to (`tls:` of the HTTP sinks)."""

    verify: bool = True
    """Check the certificate and the host name; `false` skips both (a test peer only)."""
    ca_file: str | None = Field(default=None, min_length=1)
    """PEM bundle of the CA(s) that sign the server's certificate; the system store when unset."""

    def client_context(self, sink: str) -> ssl.SSLContext:
        """The client TLS context. Reads `ca_file` (a local file, no network); one that cannot be loaded is a
        SinkError naming `sinks.<sink>.tls.ca_file`."""
        if not self.verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            detail = (str(exc) or type(exc).__name__)[:300]
            raise SinkError(f"sinks.{sink}.tls.ca_file: cannot load {self.ca_file!r}: {detail}") from None


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


class Event:
    """One journaled WorkOS element: the wrapper exactly as WorkOS sent it, plus what the intake derived.

    `raw` and `event_raw` are the bytes as received (whitespace aside): a sink embeds them as they are
    (`orjson.Fragment(event.event_raw)`), so numbers of any size and every escape reach the destination
    unchanged. `wrapper` and `event` are parsed views for people and tests; they hold `inf` where the bytes
    hold `1e999` and round long decimals to doubles, so a sink never serialises them back.
    """

    __slots__ = ("_head", "_wrapper", "action", "raw", "received_at", "seq", "stream", "time")

    def __init__(
        self,
        seq: int,
        stream: str,
        raw: bytes,
        *,
        action: str,
        time: float,
        received_at: float,
    ) -> None:
        self.seq = seq
        self.stream = stream
        self.raw = raw
        """The wrapper (`{"event": ..., "keySuffix": ..., ...}`) as received, on one line, unknown fields kept."""
        self.action = action
        self.time = time
        """Epoch seconds of the event's `occurred_at`, else of its receipt."""
        self.received_at = received_at
        self._head: _WrapperHead | None = None
        self._wrapper: dict[str, Any] | None = None

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
    """`2024-01-15T10:30:00.123Z` for an epoch time."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# --- what a sink answers -------------------------------------------------------------------------


class Outcome(enum.Enum):
    """How a send ended: delivered, worth another try, or never going to work for this data."""

    SUCCESS = "success"
    RETRY = "retry"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Failure:
    """One event's own outcome inside an otherwise classified batch."""

    outcome: Outcome
    reason: str


@dataclass(frozen=True, slots=True)
class SendResult:
    """The classified answer to one `send`.

    Every event of the batch has `outcome` except those named in `failures` (by `Event.seq`), which have
    their own. The engine retries RETRY events with backoff and dead-letters PERMANENT ones with the reason.
    """

    outcome: Outcome
    reason: str = ""
    retry_after: float | None = None
    """Seconds the peer asked to wait (`Retry-After`); the engine waits at least this long."""
    failures: Mapping[int, Failure] = field(default_factory=dict)

    @classmethod
    def success(cls) -> SendResult:
        """All delivered."""
        return _SUCCESS

    @classmethod
    def retry(cls, reason: str, retry_after: float | None = None) -> SendResult:
        """Nothing (known to be) delivered; try the whole batch again later."""
        return cls(Outcome.RETRY, reason, retry_after)

    @classmethod
    def permanent(cls, reason: str) -> SendResult:
        """The whole batch can never be delivered; dead-letter it."""
        return cls(Outcome.PERMANENT, reason)

    @classmethod
    def partial(cls, failures: Mapping[int, Failure], retry_after: float | None = None) -> SendResult:
        """Everything delivered except the events named in `failures`."""
        if not failures:
            return _SUCCESS
        return cls(Outcome.SUCCESS, "", retry_after, dict(failures))

    def outcome_of(self, event: Event) -> Failure | None:
        """The failure that applies to `event`, or None when it was delivered."""
        own = self.failures.get(event.seq)
        if own is not None:
            return own
        if self.outcome is Outcome.SUCCESS:
            return None
        return Failure(self.outcome, self.reason)


_SUCCESS = SendResult(Outcome.SUCCESS)


@dataclass(frozen=True, slots=True)
class Health:
    """A sink's answer to a health check; `message` is shown to people, so it names no secret."""

    ok: bool
    message: str


PERMANENT_HTTP_STATUSES = frozenset({400, 413, 415, 422})
"""Answers about the data itself. Any other failure (401/403 bad credentials, 404 wrong URL, 3xx, 408, 429,
5xx) is cured by waiting or by a configuration fix, so it is retried: a misconfigured sink must not cost data."""


def classify_http_status(status: int) -> Outcome:
    """2xx success; 400/413/415/422 permanent (the data is refused); everything else retry."""
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status in PERMANENT_HTTP_STATUSES:
        return Outcome.PERMANENT
    return Outcome.RETRY


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds (HTTP dates are ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


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

"""Configuration value types shared by the sinks: durations, sizes, URLs, secrets, compression and TLS.

Each is checked once here, so a sink's config model only names them (`timeout: PositiveDuration = 30.0`).
"""

from __future__ import annotations

import math
import re
import ssl
import typing
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from sinks.errors import SinkError

__all__ = [
    "ByteSize",
    "Compression",
    "Duration",
    "HEADER_NAME",
    "HttpUrl",
    "PositiveDuration",
    "Secret",
    "SinkConfig",
    "TlsOptions",
    "has_control_character",
    "parse_duration",
    "parse_size",
    "reject_boolean",
    "ConfigModel",
    "FilePath",
    "no_nul_byte",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
MAX_DURATION = 3650 * 86400.0
"""Longest duration: beyond about 292 years a timeout overflows the clocks of sockets and threads (an S3 sink with
`timeout: 999999999d` failed every send with `timestamp out of range for platform time_t`)."""
MAX_SIZE = 1024**5
"""Largest size (1 PiB): more fits in no disk or memory, and past 2**63 bytes in no SQLite integer."""
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?b?|b)?\s*$", re.IGNORECASE)


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
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError("a duration cannot be more than 3650d (ten years)")
    return seconds


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
        factor = {"": 1, "k": base, "m": base**2, "g": base**3, "t": base**4, "p": base**5}[letter]
        size = int(float(match.group(1)) * factor)
    else:
        raise ValueError("expected a size such as 1048576, 512KiB or 10MiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    if size > MAX_SIZE:
        raise ValueError("a size cannot be more than 1PiB")
    return size


def _positive(seconds: float) -> float:
    if not math.isfinite(seconds) or seconds <= 0:
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


def _http_url(value: str) -> str:
    try:
        url = URL(value.strip())
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("expected an http:// or https:// URL such as https://collector.example.com/ingest")
    if url.user or url.password:
        raise ValueError("put credentials in the sink's token, key or headers, not in the URL")
    if url.fragment:
        raise ValueError("the URL takes no fragment")
    return str(url).rstrip("/")


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP field name (a token of RFC 9110)."""


def has_control_character(text: str) -> bool:
    """Whether `text` holds a control character (a line break, a tab, NUL, DEL...): no credential does, and no
    HTTP client sends one in a header (aiohttp raises, botocore quotes the whole header in its error)."""
    return any(ord(character) < 0x20 or ord(character) == 0x7F for character in text)


def _secret(value: SecretStr) -> SecretStr:
    text = value.get_secret_value().strip()  # a secret file's trailing newline is not part of the secret
    if not text:
        raise ValueError("is empty (is its environment variable set?)")
    if has_control_character(text) or not text.isascii():  # the value itself is never repeated
        raise ValueError(
            "holds a line break, a tab, another control character or a non-ASCII one, as no credential does"
        )
    return SecretStr(text)


def no_nul_byte(value: object) -> object:
    """A file path as given, refused when it holds a NUL byte: no path can (the open or stat raised)."""
    if isinstance(value, str) and "\0" in value:
        raise ValueError("holds a NUL byte, which no file path can")
    return value


FilePath = Annotated[str, Field(min_length=1), BeforeValidator(no_nul_byte)]
"""A path to a file the service opens."""

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; YAML may say `500ms`, `1s`, `24h` or a number."""

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]
"""A Duration that must be finite and greater than zero (timeouts, intervals)."""

ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; YAML may say `10MiB` or a number."""

HttpUrl = Annotated[str, AfterValidator(_http_url)]
"""An http:// or https:// URL with a host and no credentials, without a trailing slash."""

Secret = Annotated[SecretStr, AfterValidator(_secret)]
"""A secret with surrounding whitespace trimmed; an empty one (an unset variable) is refused."""

Compression = Literal["none", "gzip", "zstd"]
"""A request or object body encoding (see sinks.http_client.compress)."""


class ConfigModel(BaseModel):
    """Base of every configuration model (the receiver's sections and the sinks' options): frozen,
    keyword-only, unknown keys rejected, and YAML's `true` never taken for the number 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: object, info: ValidationInfo) -> object:
        return reject_boolean(cls, value, info.field_name)


class SinkConfig(ConfigModel):
    """Base of every sink's own options."""

    def secrets(self) -> list[str]:
        """Secrets held in options that are not `SecretStr` (such as a URL path that is a credential): what
        logs, reasons and health messages must never show besides the `SecretStr` options."""
        return []


class TlsOptions(SinkConfig):
    """How a sink checks the server it connects to, and the client certificate it shows (`tls:`)."""

    verify: bool = True
    """Check the certificate and the host name; `false` skips both (a test peer only)."""
    ca_file: FilePath | None = None
    """PEM bundle of the CA(s) that sign the server's certificate; the system store when unset."""
    cert_file: FilePath | None = None
    """PEM client certificate (chain) for mutual TLS."""
    key_file: FilePath | None = None
    """PEM private key of `cert_file`."""

    @model_validator(mode="after")
    def _pair(self) -> TlsOptions:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    def client_context(self, sink: str) -> ssl.SSLContext:
        """The client TLS context. Reads the files (local, no network); one that cannot be loaded is a
        SinkError naming `sinks.<sink>.tls.<key>` (never the key's contents)."""
        where = "ca_file"
        try:
            if self.verify:
                context = ssl.create_default_context(cafile=self.ca_file)
            else:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if self.cert_file is not None:
                where = "cert_file"
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            name = getattr(self, where)
            detail = (str(exc) or type(exc).__name__)[:300]
            raise SinkError(f"sinks.{sink}.tls.{where}: cannot load {name!r}: {detail}") from None
        return context

"""Errors of the receiver. Every message is safe to show: none names a secret.

LogBridgeError
├── ConfigError          the YAML is invalid; `.errors` lists every problem with its YAML path
│   └── CertificateNotValidYet   server.tls holds a certificate valid from `.not_before` on
├── JournalError         the journal cannot take a write
│   ├── JournalFull      over `journal.max_bytes` (or the disk is full)
│   └── JournalClosed    shutting down
├── BodyError            a request body that cannot be read; carries the HTTP status to answer
│   └── ClientDisconnected   the client closed the connection before its whole body arrived
└── SinkError            a sink cannot be built or loaded (raised by `sinks`; re-exported by sinks.errors)
    └── SinkTypeError    unknown sink type, or its optional dependency is missing
"""

from __future__ import annotations

import datetime


class LogBridgeError(Exception):
    """Base of every error log-bridge raises on purpose."""


class ConfigError(LogBridgeError):
    """The configuration is invalid; each entry of `errors` is `yaml.path: message`."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))


class CertificateNotValidYet(ConfigError):
    """The TLS files hold a certificate that is not valid before `not_before` (refused while the one in use is)."""

    def __init__(self, errors: list[str], not_before: datetime.datetime) -> None:
        self.not_before = not_before
        super().__init__(errors)


class JournalError(LogBridgeError):
    """The journal cannot take a write."""


class JournalFull(JournalError):
    """The journal is over its size cap, or the disk is full."""


class JournalClosed(JournalError):
    """The journal is closed (the process is shutting down)."""


class BodyError(LogBridgeError):
    """A request body that cannot be accepted, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


class ClientDisconnected(BodyError):
    """The client closed the connection before its whole body arrived (nobody reads the answer)."""

    def __init__(self) -> None:
        super().__init__(400, "the connection closed before the whole body arrived")


class SinkError(LogBridgeError):
    """A sink that cannot be built (a TLS file that cannot be read, ...); the message names its YAML path."""


class SinkTypeError(SinkError):
    """A sink type that cannot be loaded: unknown, or its extra is not installed."""

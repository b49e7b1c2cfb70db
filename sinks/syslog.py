"""The syslog sink (`type: syslog`): RFC 5424 messages over TCP or TLS (RFC 5425), octet-counting framing
(RFC 6587 §3.4.1) by default or non-transparent (LF) framing, the message being the WorkOS wrapper as JSON or
an ArcSight Common Event Format (CEF) line.

Syslog over TCP has no acknowledgement: a batch counts as delivered once written, flushed and acknowledged by
the server's TCP stack on a connection alive when the write began; a reset during a write makes it RETRY, so
the server may receive part of it twice (docs/sinks/syslog.md says what can be lost).
"""

from __future__ import annotations

import asyncio
import fcntl
import re
import socket
import struct
import termios
from collections.abc import Sequence
from typing import Literal

import msgspec
from pydantic import Field

from sinks.base import Event, Health, SendResult, SinkConfig, iso_utc
from sinks.cef import cef_line
from sinks.fields import ByteSize, PositiveDuration, TlsOptions
from sinks.http_client import scrub
from sinks.outcome import Verdict
from sinks.splitting import Verdicts

__all__ = ["FACILITIES", "SD_ID", "SEVERITIES", "SyslogConfig", "SyslogSink"]

FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
              "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14,
              "solaris-cron": 15, **{f"local{n}": 16 + n for n in range(8)}}  # fmt: skip
SEVERITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}
CEF_SEVERITY = {0: 10, 1: 10, 2: 9, 3: 8, 4: 6, 5: 4, 6: 3, 7: 1}
"""CEF severity (0-10) for each syslog severity."""
SD_ID = "workos@32473"
"""The structured-data element carrying the event id, action and keySuffix (32473: RFC 5612's example PEN)."""

_PRINTABLE = re.compile(r"^[!-~]+$")
_SD_ESCAPE = re.compile(r'(["\\\]])')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BACKSLASHED = r"\\\1"


class SyslogConfig(SinkConfig):
    """The options of a `syslog` sink."""

    host: str = Field(pattern=r"^[^\s/@]+$")
    """A host name or an IP address, without scheme or port."""
    port: int | None = Field(None, ge=1, le=65535, strict=True)
    """Default 6514 (RFC 5425) with TLS, 601 (RFC 6587) with plain TCP."""
    transport: Literal["tcp", "tls"] = "tls"
    framing: Literal["octet-counting", "non-transparent"] = "octet-counting"
    format: Literal["json", "cef"] = "json"
    app_name: str = Field("workos-audit", max_length=48, pattern=r"^[!-~]+$")
    facility: Literal[tuple(FACILITIES)] = "authpriv"  # type: ignore[valid-type]
    severity: Literal[tuple(SEVERITIES)] = "info"  # type: ignore[valid-type]
    hostname: str | None = Field(None, max_length=255, pattern=r"^[!-~]+$")
    """The HOSTNAME field; unset: this machine's name."""
    max_message_size: ByteSize = Field(8192, ge=480)
    """The receiver's message size limit (rsyslog `maxMessageSize`, 8k by default): a longer message is refused
    before sending, since a receiver cuts it, or parses what is past its limit as a record of its own."""
    tls: TlsOptions = TlsOptions()
    timeout: PositiveDuration = 30.0
    """Limit on connecting and on writing one batch."""


class SyslogSink:
    """Writes RFC 5424 messages to one syslog server over a kept-open TCP or TLS connection."""

    Config = SyslogConfig

    def __init__(self, name: str, config: SyslogConfig) -> None:
        self.name = name
        self.config = config
        self._ssl = config.tls.client_context(name) if config.transport == "tls" else None
        self._port = config.port or (6514 if config.transport == "tls" else 601)
        self._where = f"syslog server {config.host}:{self._port} ({config.transport})"
        pri = FACILITIES[config.facility] * 8 + SEVERITIES[config.severity]
        host = (config.hostname or socket.gethostname())[:255] or "-"
        # PRI and VERSION, then the TIMESTAMP of each event, then this (joined, never %-formatted: a HOSTNAME or
        # APP-NAME may hold a '%').
        self._pri = f"<{pri}>1 "
        self._host_app = f" {host} {config.app_name} - "
        self._cef_severity = CEF_SEVERITY[SEVERITIES[config.severity]]
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"SyslogSink(name={self.name!r}, {self._where}, format={self.config.format!r})"

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Frame every event, write them on the connection and wait until the server's TCP stack has them."""
        verdicts: Verdicts = {}
        frames: list[bytes] = []
        sent: list[Event] = []
        for event in batch:
            try:
                frames.append(self.frame(event))
                sent.append(event)
            except (TypeError, ValueError, KeyError) as exc:  # no event, not JSON, a line feed in LF framing
                verdicts[event.seq] = Verdict.permanent(f"cannot encode the event for syslog: {scrub(exc, ())}")
        if frames:
            verdict = await self._write(b"".join(frames))
            if verdict is not None:
                verdicts.update((event.seq, verdict) for event in sent)
        return SendResult.collect(batch, verdicts)

    async def healthcheck(self) -> Health:
        """Open (or reuse) the connection: the server accepts TCP (and the TLS handshake)."""
        async with self._lock:
            connection = await self._connect()
        if isinstance(connection, Verdict):
            return Health(False, connection.reason)
        return Health(True, f"connected to {self._where}")

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        self._closed = True
        await self._drop()

    # --- messages ---

    def frame(self, event: Event) -> bytes:
        """One framed RFC 5424 message for `event`."""
        body = _without_tabs(event.raw) if self.config.format == "json" else cef_line(event, self._cef_severity)
        event.event_raw  # noqa: B018 - refuses a wrapper without an event (nothing is sent as if WorkOS had)
        action = event.action if 0 < len(event.action) <= 32 and _PRINTABLE.match(event.action) else "-"
        params = (("id", event.event_id), ("action", event.action), ("keySuffix", event.key_suffix))
        # A value with a control character (a line break would end the line for a SIEM that reads lines) is left
        # out: RFC 5424 has no escape for it, and the message carries it whole.
        sd = " ".join(
            f'{key}="{_SD_ESCAPE.sub(_BACKSLASHED, value)}"'
            for key, value in params
            if value and not _CONTROL.search(value)
        )
        message = (self._pri + _timestamp(event.time) + self._host_app + f"{action} [{SD_ID} {sd}] ").encode() + body
        if len(message) > self.config.max_message_size:
            # Sent, it would be cut, or split into a second record whose header is the event's own text (rsyslog).
            raise ValueError(
                f"the message is {len(message)} bytes, over max_message_size ({self.config.max_message_size});"
                " raise it (and the receiver's limit) to deliver this event"
            )
        if self.config.framing == "octet-counting":
            return b"%d %b" % (len(message), message)
        if b"\n" in message:
            raise ValueError("the message holds a line feed, which non-transparent framing cannot carry")
        return message + b"\n"

    # --- the connection ---

    async def _write(self, data: bytes) -> Verdict | None:
        async with self._lock:
            writer = await self._connect()
            if isinstance(writer, Verdict):
                return writer
            try:
                writer.write(data)
                await asyncio.wait_for(self._acknowledged(writer), self.config.timeout)
            except (OSError, TimeoutError, ConnectionError) as exc:
                await self._drop(abort=True)
                reason = f"connection to {self._where} lost while writing ({scrub(exc, ())}); the batch is sent again"
                return Verdict.retry(reason + " and the server may receive part of it twice")
        return None

    async def _acknowledged(self, writer: asyncio.StreamWriter) -> None:
        """Flushed, and acknowledged by the server's TCP stack (Linux SIOCOUTQ: nothing left unacknowledged).

        Flushed means no buffer in the process holds any of it: drain() returns with up to a high-water mark
        still buffered, and over TLS under the TLS layer the TCP transport buffers too (megabytes, when the
        server reads in bursts, while the socket's own queue is momentarily empty)."""
        await writer.drain()
        sock = writer.get_extra_info("socket")
        delay = 0.0005
        while _buffered(writer) > 0 or (sock is not None and _unacknowledged(sock.fileno()) > 0):
            await asyncio.sleep(delay)  # waiting for the peer's answer (bounded by `timeout`), not a retry
            delay = min(delay * 2, 0.05)
            if writer.is_closing():
                raise ConnectionError("the connection closed before the server acknowledged the data")

    async def _connect(self) -> asyncio.StreamWriter | Verdict:
        """Reuse a live connection or open a new one; a connection the server closed is not written to."""
        if self._closed:
            return Verdict.retry(f"sink {self.name!r} is closed")
        if self._conn is not None:
            reader, writer = self._conn
            if not (reader.at_eof() or reader.exception() is not None or writer.is_closing()):
                return writer
            await self._drop()
        host = self.config.host
        try:
            opening = asyncio.open_connection(
                host, self._port, ssl=self._ssl, server_hostname=host if self._ssl else None
            )
            self._conn = await asyncio.wait_for(opening, self.config.timeout)
            return self._conn[1]
        except TimeoutError:
            return Verdict.retry(f"no connection to {self._where} within {self.config.timeout:g}s")
        except OSError as exc:
            hint = "; set tls.ca_file to the server's CA (or tls.verify: false)" if "CERTIFICATE" in str(exc) else ""
            return Verdict.retry(f"cannot connect to {self._where}: {scrub(exc, ())}{hint}", config_problem=bool(hint))

    async def _drop(self, *, abort: bool = False) -> None:
        """Give the connection up. A transport closed with unsent data keeps it (and the socket) until the
        server reads it, forever for a server that stopped reading, so a connection that failed a write is
        aborted (its batch is sent again anyway), and one that does not close within a second is too."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        writer = conn[1]
        if abort:
            _abort(writer)
        else:
            writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, TimeoutError, ConnectionError):
            _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once, unsent data discarded: a reset (SO_LINGER 0), so the kernel does not keep the socket and
    its send queue either, trying to deliver them to a server that does not read."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


def _timestamp(epoch: float) -> str:
    """The TIMESTAMP field: NILVALUE for a time beyond what its four-digit year holds (MSG has the event's own)."""
    try:
        return iso_utc(epoch)
    except (ValueError, OverflowError, OSError):
        return "-"


def _without_tabs(raw: bytes) -> bytes:
    """The wrapper without a tab between its tokens (the only control character JSON text can hold raw):
    receivers escape control characters they receive (rsyslog writes `#011`), which would break the JSON.
    Only whitespace outside strings goes; every value keeps its bytes."""
    return msgspec.json.format(raw, indent=-1) if b"\t" in raw else raw


def _buffered(writer: asyncio.StreamWriter) -> int:
    """Bytes written to `writer` that the process still holds: in its transport and, over TLS, in the TCP
    transport under the TLS layer (asyncio's SSLProtocol keeps it as `_transport`; no public API reaches it)."""
    transport = writer.transport
    inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    held = transport.get_write_buffer_size()
    if isinstance(inner, asyncio.WriteTransport):
        held += inner.get_write_buffer_size()
    return held


def _unacknowledged(fd: int) -> int:
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:  # not a TCP socket here, or not Linux: drained is as far as we can see
        return 0

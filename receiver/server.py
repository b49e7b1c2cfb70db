"""Running the service: journal, sinks, delivery engine and HTTP listener, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import gc
import ipaddress
import logging
import math
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
from aiohttp import http_exceptions, web, web_protocol
from aiohttp.streams import EMPTY_PAYLOAD
from prometheus_client import Counter

from receiver.app import RETRY_AFTER_BUSY, Intake, RateLimitedLog, State, build_admin_app, build_app, where_raised
from receiver.config import AdminConfig, Config, ServerConfig, TLSConfig, listen_url, load_config, secret_values
from receiver.delivery import DeliveryEngine, build_sinks
from receiver.errors import CertificateNotValidYet, ConfigError, JournalClosed, JournalError, LogBridgeError
from receiver.front import MAX_HEAD, MAX_HEADER_LINE, Front
from receiver.journal import Journal
from receiver.limits import (
    PACEABLE,
    CappedListener,
    HandshakePacer,
    LoopErrors,
    connection_cap,
    paced_tls,
    raise_fd_limit,
)
from receiver.logs import scrub
from receiver.metrics import Metrics
from receiver.netaddr import AddressPolicy
from receiver.reload import plan_reload
from receiver.routing import OWED, ROUTING, carried_over, routing_of, stored
from sinks.base import Sink
from sinks.errors import SinkError

if TYPE_CHECKING:
    from receiver.metrics import WorkosMetrics
    from receiver.workos import WorkosService

log = logging.getLogger(__name__)

DEDUP_PRUNE_INTERVAL = 60.0
GC_YOUNG_THRESHOLD = 20_000
"""Allocations between young-generation collections (CPython's default: 700); measured with `bench`: about 6 %
less CPU per request and a p99 a third lower at 10 events per request."""


HANDSHAKE_FAILURES = ("certificate_refused", "client_certificate", "not_tls", "no_common_protocol", "other")
"""The kinds of failed TLS handshake counted apart (`log_bridge_tls_handshake_failures_total{reason}`)."""


def handshake_failure(reason: str | None) -> str:
    """The kind (one of HANDSHAKE_FAILURES) of a server-side handshake error whose OpenSSL reason is `reason`:
    the client refused the server's certificate (its alert says why: an unknown CA, a name it was not issued
    for, expired...), the client's certificate was missing or refused (mutual TLS), the client spoke no TLS
    (plain HTTP to the TLS port), or client and server share no version, cipher or group."""
    reason = reason or ""
    if "_ALERT_" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        return "certificate_refused"
    if reason in ("CERTIFICATE_VERIFY_FAILED", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATES_RETURNED"):
        return "client_certificate"
    if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL"):
        return "not_tls"
    if reason in (
        "UNSUPPORTED_PROTOCOL",
        "VERSION_TOO_LOW",
        "NO_SHARED_CIPHER",
        "NO_SHARED_GROUPS",
        "NO_SUITABLE_SIGNATURE_ALGORITHM",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
    ):
        return "no_common_protocol"
    return "other"


def _watched_handshakes(failed: Callable[[ssl.SSLError], None]) -> type[ssl.SSLObject]:
    """An SSLObject class (a context's `sslobject_class`, which asyncio's TLS layer instantiates) that reports
    each handshake error to `failed`; asyncio itself keeps them to its debug mode."""

    class WatchedHandshake(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                failed(exc)
                raise

    return WatchedHandshake


@dataclasses.dataclass(frozen=True, slots=True)
class FreshTls:
    """TLS files loaded by `ServerTls.load`, not in use yet."""

    context: ssl.SSLContext
    validity: tuple[datetime.datetime, datetime.datetime] | None
    unusable: str | None
    """Why the certificate cannot be presented now (kept all the same: the one in use cannot be either)."""
    stamp: tuple[object, ...]


TLS_WATCH_INTERVAL = 10.0
"""Seconds between looks at the TLS files. Files that changed and then stayed the same for one look are loaded,
as a reload would: a certificate renewed on disk (cert-manager updating a Kubernetes Secret, certbot) is in use
within 20 seconds, without a SIGHUP, and a pair caught halfway written is not tried."""


def tls_files_stamp(tls: TLSConfig) -> tuple[object, ...]:
    """What changes when a TLS file is replaced or rewritten, or its permissions or owner change: each one's
    device, inode, size, modification and change times and mode, through symbolic links (Kubernetes replaces a
    mounted Secret by swapping a link), or the error that stats it. The mode and change time see a `chmod` or
    `chown` that makes a refused key readable: the files are then tried again."""
    stamp: list[object] = []
    for path in (tls.cert_file, tls.key_file, tls.client_ca_file):
        try:
            found = os.stat(path) if path is not None else None
        except OSError as exc:
            stamp.append(exc.errno)
            continue
        stamp.append(
            found and (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_mode)
        )
    return tuple(stamp)


class ServerTls:
    """The listener's TLS: new handshakes use the pair loaded last, so a reload rotates the certificate
    without closing the socket or the connections open on it. Every failed handshake goes to `failed`."""

    def __init__(self, tls: TLSConfig, failed: Callable[[ssl.SSLError], None] = lambda exc: None) -> None:
        self.stamp = tls_files_stamp(tls)
        """The TLS files as they were when `current` was loaded from them (taken before, so that a change while
        loading is seen again)."""
        self.current = server_tls_context(tls)
        self.listening = server_tls_context(tls)
        self.listening.sni_callback = self._choose
        self.listening.sslobject_class = _watched_handshakes(failed)
        self.validity = certificate_validity(tls.cert_file)
        """The notBefore and notAfter of the certificate `current` presents (None: not known)."""

    def valid(self, now: datetime.datetime) -> bool:
        """Whether the certificate in use is within its validity at `now` (True when not known)."""
        return self.validity is None or self.validity[0] <= now <= self.validity[1]

    def expiry(self) -> float:
        """When the certificate in use expires (Unix time; NaN when not known)."""
        return self.validity[1].timestamp() if self.validity is not None else math.nan

    def load(self, tls: TLSConfig) -> FreshTls:
        """The files of `tls` loaded, for `use`; raises ConfigError when they cannot be, or when the certificate
        is out of its validity while the one in use is not (every new handshake would fail with it)."""
        stamp = tls_files_stamp(tls)
        context = server_tls_context(tls)
        validity = certificate_validity(tls.cert_file)
        now = datetime.datetime.now(datetime.UTC)
        unusable = validity_problem(tls, validity, now)
        if unusable is not None and self.valid(now):
            if validity is not None and now < validity[0]:
                raise CertificateNotValidYet([unusable], validity[0])
            raise ConfigError([unusable])
        return FreshTls(context, validity, unusable, stamp)

    def use(self, fresh: FreshTls) -> None:
        """New handshakes from now on present what `load` returned."""
        self.current, self.validity, self.stamp = fresh.context, fresh.validity, fresh.stamp
        if fresh.unusable is not None:  # no worse than the one in use, which is not valid either
            log.error(UNUSABLE_CERTIFICATE, extra={"problem": fresh.unusable})

    def _choose(self, connection: ssl.SSLObject, _name: str | None, context: ssl.SSLContext) -> None:
        if context is not self.current:
            connection.context = self.current


def listen_socket(host: str, port: int) -> CappedListener:
    """A listening TCP socket, its connection cap for the caller to set; `::` (or another unspecified IPv6
    address) takes IPv4 too (dual stack), so IPv4 peers arrive as IPv4-mapped addresses, which the allowlist
    checks as IPv4. An empty host is every interface. Raises LogBridgeError naming the address."""
    if host == "":
        host = "::" if _ipv6_available() else "0.0.0.0"  # noqa: S104
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = found[0]
        sock = CappedListener(family, kind, proto)
    except OSError as exc:
        raise LogBridgeError(f"cannot listen on {_where(host, port)}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and ipaddress.ip_address(str(address[0]).split("%")[0]).is_unspecified:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LogBridgeError(f"cannot listen on {_where(host, port)}: {exc.strerror or exc}") from None
    return sock


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return True
    except OSError:
        return False


class _Site(web.SockSite):
    """aiohttp's socket site, with the TLS handshake bounded by `server.header_timeout` and paced by `pacer`, whose
    connections start with `protocol` (the stream front, which hands what it does not serve to the runner's
    server)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        handshake_timeout: float,
        protocol: Callable[[], asyncio.Protocol],
        pacer: HandshakePacer,
        **kwargs: Any,
    ):
        super().__init__(runner, sock, **kwargs)
        self._handshake_timeout = handshake_timeout
        self._protocol = protocol
        self._pacer = pacer

    async def start(self) -> None:
        await web.BaseSite.start(self)
        protocol: Callable[[], asyncio.BaseProtocol] = self._protocol
        tls = self._ssl_context
        if tls is not None and PACEABLE:  # TLS made in the protocol, its handshake paced
            protocol, tls = paced_tls(self._pacer, self._protocol, tls, self._handshake_timeout), None
        self._server = await asyncio.get_running_loop().create_server(
            protocol,
            sock=self._sock,
            ssl=tls,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout if tls is not None else None,
        )


def server_tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS 1.2 or newer; with `client_ca_file`, clients must present a certificate that CA signed (mTLS), in a
    full handshake on every connection: no session is resumed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: _no_passphrase(tls))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(
            [f"server.tls: cannot load the certificate {tls.cert_file} with key {tls.key_file}: {reason}"]
        ) from None
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            raise ConfigError([f"server.tls.client_ca_file: cannot load {tls.client_ca_file}: {reason}"]) from None
        context.verify_mode = ssl.CERT_REQUIRED
        # A resumed session skips the client certificate check, so its sessions (kept by the listening context,
        # which a reload does not replace) would let in for hours the clients of a CA a reload stopped trusting.
        context.num_tickets = 0  # TLS 1.3 resumes only with tickets
        context.options |= ssl.OP_NO_TICKET  # TLS 1.2
    return context


def certificate_validity(path: Path) -> tuple[datetime.datetime, datetime.datetime] | None:
    """The notBefore and notAfter of the first certificate in the PEM file at `path` (the one a listener
    presents), or None when they cannot be read from it (OpenSSL, which loaded the file, is then the judge).
    Text around the PEM blocks may be in any encoding (`openssl pkcs12` writes a friendlyName as it is)."""
    try:
        pem = path.read_bytes().decode("latin-1")
        begin = pem.index("-----BEGIN CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(pem[begin : pem.index("-----END CERTIFICATE-----", begin) + 25])
        _, start, _ = _der_item(der, 0)  # Certificate
        _, at, _ = _der_item(der, start)  # tbsCertificate
        if der[at] == 0xA0:  # [0] version
            at = _der_item(der, at)[2]
        for _ in range(3):  # serialNumber, signature, issuer
            at = _der_item(der, at)[2]
        _, at, _ = _der_item(der, at)  # validity
        not_before = _der_time(der, at)
        return not_before, _der_time(der, _der_item(der, at)[2])
    except (OSError, ValueError, IndexError):
        return None


def _der_item(der: bytes, at: int) -> tuple[int, int, int]:
    """The tag of the DER item at `at`, where its content starts and where it ends."""
    tag, length, at = der[at], der[at + 1], at + 2
    if length & 0x80:
        size = length & 0x7F
        length, at = int.from_bytes(der[at : at + size], "big"), at + size
    return tag, at, at + length


def _der_time(der: bytes, at: int) -> datetime.datetime:
    tag, start, end = _der_item(der, at)
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950 to 2049
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        raise ValueError("not a time")
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)


def validity_problem(
    tls: TLSConfig, validity: tuple[datetime.datetime, datetime.datetime] | None, now: datetime.datetime
) -> str | None:
    """Why the certificate in `tls.cert_file`, of this `validity`, cannot be presented at `now` (expired, or not
    valid yet), if so."""
    if validity is None:
        return None
    not_before, not_after = validity
    if now > not_after:
        return f"server.tls.cert_file: the certificate in {tls.cert_file} expired on {not_after:%Y-%m-%d %H:%M:%S} UTC"
    if now < not_before:
        return (
            f"server.tls.cert_file: the certificate in {tls.cert_file} is not valid before "
            f"{not_before:%Y-%m-%d %H:%M:%S} UTC"
        )
    return None


def _no_passphrase(tls: TLSConfig) -> bytes:
    """What OpenSSL calls for an encrypted key. Without it, OpenSSL prompts for the passphrase and reads it from
    the terminal (else stdin), on the event loop, taking SIGTERM meanwhile: the service would freeze."""
    raise ConfigError([f"server.tls: the key {tls.key_file} is encrypted; give log-bridge an unencrypted key"])


UNUSABLE_CERTIFICATE = "TLS certificate unusable: clients will refuse every handshake"

LISTEN_BACKLOG = 1024

ADMIN_MAX_CONNECTIONS = 64
"""Connections the admin listener (`server.admin`) takes at once: probes and scrapes need few. One more is
closed unread, as on the stream listener, whose `server.max_connections` does not count these."""

MAX_HEADERS = 128
"""aiohttp's own limits, stated here because they bound what a request costs before its body is read: at most
MAX_HEADERS header fields of MAX_HEADER_LINE bytes each, else a 400."""


class HeadTooLarge(http_exceptions.BadHttpMessage):
    """A request head longer than MAX_HEAD."""


class TrailerTooLarge(HeadTooLarge):
    """A chunked body's framing longer than MAX_HEAD with no data: its trailer fields, most likely."""


_MALFORMED: tuple[tuple[type[BaseException], str], ...] = (
    (TrailerTooLarge, f"the chunked body's trailer fields are larger than {MAX_HEAD} bytes"),
    (HeadTooLarge, f"the request head is larger than {MAX_HEAD} bytes"),
    (http_exceptions.LineTooLong, f"a request line or header field is longer than {MAX_HEADER_LINE} bytes"),
    (http_exceptions.BadHttpMethod, "not an HTTP/1.x request (bad method; HTTPS sent to an HTTP port?)"),
    (http_exceptions.BadStatusLine, "malformed request line (lines must end in CRLF)"),
    (http_exceptions.InvalidURLError, "malformed request target"),
    (
        http_exceptions.BadHttpMessage,
        "malformed request headers (lines end in CRLF; no CR, LF or NUL inside a header; "
        f"at most {MAX_HEADERS} headers)",
    ),
)
"""What a malformed request is told: fixed texts, because aiohttp's own quote the offending line, secret and all."""


class _HeadLimit:
    """aiohttp's request parser, fed a piece at a time, refusing a request head that grows past MAX_HEAD, as the
    stream front does (a 400). aiohttp's own limits alone let a head of about 1 MiB arrive, each field kept as bytes
    and as text until the head ends: about 2 MiB held by each connection, from anyone, for header_timeout.
    What follows the end of a request in the piece it ended in is not counted: a head may reach twice
    MAX_HEAD before it is refused when it begins in the piece a request ended in. A chunked body's framing
    is counted alike while no data comes: its trailer fields are a second head, which aiohttp keeps as it keeps
    a head.

    The refusal is a message like the one aiohttp makes of a malformed head, after the requests read before it,
    and made without raising: a raised exception's traceback would keep the bytes being parsed. What the
    connection sends after it is dropped unparsed.

    aiohttp's parser stops between requests once 32 of them wait to be answered (`max_msg_queue_size`), keeping
    the rest of what it was fed, and parses that rest in one go when the queue drains, counting none of it.
    Once the parser may have stopped, it is fed nothing more than what it holds: the rest is kept here, and fed a
    piece at a time once the queue drains (aiohttp stops reading the connection meanwhile)."""

    def __init__(self, parser: Any, connection: web_protocol.RequestHandler) -> None:
        self._parser = parser
        self._connection = connection
        self._head = 0
        """Bytes read since the last request's head or body ended."""
        self._body: Any = None
        """The last request's body (a stream reader; None before the first request)."""
        self._stopped = False
        """The parser may have stopped between requests, with bytes of its own to parse."""
        self._held = b""
        """What was read beyond a full queue of requests."""
        self.refused = False

    def feed_data(self, data: bytes) -> tuple[Sequence[Any], bool, bytes]:
        """aiohttp's `feed_data`; a head past the limit ends the requests found with the refusal."""
        if self.refused:
            return (), False, b""
        if self._held:
            data, self._held = self._held + data, b""
        found: list[Any] = []
        queued = len(self._connection._messages)
        full = self._connection._max_msg_queue_size
        start = 0
        while True:
            # A head under way gets what it may still grow by: not ended there, it is past the limit, and refused.
            # A body is fed MAX_HEAD at a time. A parser that may have stopped gets nothing: it parses what
            # it holds.
            end = start if self._stopped else start + MAX_HEAD - self._head
            piece = data[start:end]
            body = self._body
            reading = body is not None and not body.is_eof()
            received = body.total_bytes if reading else 0
            messages, upgraded, tail = self._parser.feed_data(piece)
            if messages:
                found.extend(messages)
                self._head, self._body = 0, messages[-1][1]
            elif not reading:
                self._head += len(piece)
            elif body.is_eof() or body.total_bytes > received:
                self._head = 0  # what follows the body's end or data in the piece is not counted
            else:  # a body's framing and no data: a chunk's line, or the trailer fields, a second head
                self._head += len(piece)
            if self._head >= MAX_HEAD:  # and the head has not ended: it is longer
                self.refused = True
                if reading and not body.is_eof():
                    # The body fails, as aiohttp fails a body it cannot parse, and ends: a request reading it is
                    # refused, and no one reads on.
                    too_large: HeadTooLarge = TrailerTooLarge(f"trailer larger than {MAX_HEAD} bytes")
                    body.set_exception(web.RequestPayloadError(too_large.message))
                    body.feed_eof()
                else:
                    too_large = HeadTooLarge(f"request head larger than {MAX_HEAD} bytes")
                found.append(
                    (web_protocol._ErrInfo(status=400, exc=too_large, message=too_large.message), EMPTY_PAYLOAD)
                )
                return found, False, b""
            if upgraded:
                return found, True, tail + data[end:]
            # The parser stops once it counts `full` requests unanswered, one more than the queue holds when
            # aiohttp took one before its body ended. Parsing nothing, it had not stopped, or parsed all it held.
            self._stopped = bool(messages) and queued + len(found) >= full - 1
            if self._stopped and queued + len(found) >= full:
                self._held = data[end:]  # aiohttp stops reading until the queue drains, then parses on
                return found, False, b""
            if end >= len(data) and not self._stopped:
                return found, False, b""
            start = end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


LINGER_SECONDS = 2.0
"""After an answer given before the client has sent its whole request, how long what it still sends is read (and
dropped): a socket closed with bytes unread resets the connection, and the client, still sending, would see the
reset rather than the answer."""


class _Dropping(asyncio.Protocol):
    """A connection whose head was refused, once its answer is written: what the client still sends is dropped
    unread until it ends its stream, or LINGER_SECONDS pass (then the connection is aborted)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, among: set[Any]) -> None:
        self._transport = transport
        self._among = among
        """The server's connections in this state, aborted at its shutdown."""
        among.add(self)
        self._timer = loop.call_later(LINGER_SECONDS, transport.abort)
        if transport.can_write_eof():  # not over TLS
            transport.write_eof()  # once the answer is written: the client reads it to the end at once
        if not transport.is_reading():
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        self._timer.cancel()
        self._among.discard(self)

    def abort(self) -> None:
        self._transport.abort()


class _Connection(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering a request it cannot parse without quoting it, in logs or answers."""

    __slots__ = ("_refusals", "_malformed", "_unread", "_deadline", "_head_refused")

    def __init__(
        self,
        manager: web.Server,
        *,
        refusals: RateLimitedLog,
        malformed: Counter,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._refusals = refusals
        self._malformed = malformed
        self._unread: asyncio.TimerHandle | None = None
        self._deadline = deadline
        self._head_refused = False
        """The refusal of a head past MAX_HEAD is being answered."""
        super().__init__(manager, **kwargs)
        self._parser = cast(Any, _HeadLimit(self._parser, self))  # used through feed_data and what it passes on

    # A client that does not read its answers would hold its connection for ever: aiohttp waits for it to read
    # what is being written (keep-alive does not end a connection whose answer is being written), and asyncio
    # closes a connection only once what is left to write is flushed. It gets `keepalive_timeout`
    # (header_timeout) to read on, then the connection is aborted.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._deadline is not None and self._keepalive_handle is not None:
            # Handed over by the stream front, which held the connection since it was made or last answered:
            # aiohttp's timer for a whole head runs from then, not again from now (a head trickled in just before
            # header_timeout would otherwise get a second header_timeout). Past it, the check runs at once: after
            # the handler's first step, which starts waiting for a request unless one came whole with the bytes.
            self._keepalive_handle.cancel()
            self._next_keepalive_close_time = self._deadline
            self._keepalive_handle = self._loop.call_at(self._deadline, self._process_keepalive)
        if self._task_handler is not None:
            self._task_handler.add_done_callback(lambda _: self._abort_unless_read(transport))

    def pause_writing(self) -> None:
        super().pause_writing()
        self._abort_unless_read(self.transport)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._task_handler is not None and not self._task_handler.done():  # writing on: the client reads
            self._forget_unread()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._forget_unread()
        super().connection_lost(exc)

    def _abort_unless_read(self, transport: asyncio.BaseTransport | None) -> None:
        if self._unread is None and transport is not None and self._manager is not None:  # not lost yet
            self._unread = self._loop.call_later(self.keepalive_timeout, cast(asyncio.Transport, transport).abort)

    def _forget_unread(self) -> None:
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp refused, or to a handler that failed; the connection is closed."""
        headers: dict[str, str] = {}
        if status >= 500:  # a 5xx is only ever a 503 that WorkOS retries
            self.log_exception("error handling a request; answered 503", exc_info=exc)
            status, text, headers = 503, "internal error; retry later", {"Retry-After": RETRY_AFTER_BUSY}
        else:
            self._malformed.inc()
            self._head_refused = isinstance(exc, HeadTooLarge)
            text = next((text for kind, text in _MALFORMED if isinstance(exc, kind)), "malformed request")
            self._refusals.log(
                "malformed request refused", status=status, error=type(exc).__name__, client=request.remote
            )
        response = web.Response(
            status=status, body=orjson.dumps({"error": text}), content_type="application/json", headers=headers
        )
        response.force_close()
        return response

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, and after the refusal of a head too large, the connection dropping what still comes."""
        finished = await super().finish_response(request, resp, start_time)
        transport = self.transport
        server = self._manager
        if (
            self._head_refused
            and isinstance(server, _Server)
            and isinstance(transport, asyncio.Transport)
            and not transport.is_closing()
        ):
            # The rest of the head is most likely on its way. aiohttp would close the connection now, and the
            # client see a reset. It goes to `_Dropping`, and aiohttp is done with it as with a connection lost.
            self.transport = None
            transport.set_protocol(_Dropping(transport, self._loop, server.dropping))
            self.connection_lost(None)
        return finished

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's error lines, rate-limited and without their tracebacks (which may quote request bytes)."""
        exc = kwargs.get("exc_info")
        fields = {"error": type(exc).__name__, "where": where_raised(exc)} if isinstance(exc, BaseException) else {}
        self._refusals.log(str(args[0]) if args else "aiohttp error", **fields)


class _Server(web.Server):
    """aiohttp's low-level server, making `_Connection`s."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        refusals: RateLimitedLog,
        malformed: Counter,
        **connection: Any,
    ) -> None:
        super().__init__(handler, request_factory=request_factory, **connection)
        self._connection = {**connection, "refusals": refusals, "malformed": malformed}
        self.dropping: set[_Dropping] = set()
        """Connections refused for their head, read on after their answer (no longer aiohttp's)."""

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109  # aiohttp's signature
        for connection in list(self.dropping):
            connection.abort()
        await super().shutdown(timeout)

    def __call__(self) -> web_protocol.RequestHandler:
        return _Connection(self, loop=asyncio.get_running_loop(), **self._connection)

    def handed_off(self, deadline: float) -> web_protocol.RequestHandler:
        """A connection the stream front hands over, closed at `deadline` (loop time) unless a request has
        arrived whole by then."""
        return _Connection(self, loop=asyncio.get_running_loop(), deadline=deadline, **self._connection)


class _Runner(web.AppRunner):
    """aiohttp's application runner, serving through `_Server`."""

    def __init__(self, app: web.Application, *, refusals: RateLimitedLog, malformed: Counter, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._refusals = refusals
        self._malformed = malformed

    async def finish(self, grace: float) -> None:
        """aiohttp's cleanup, its handlers in flight given `grace` seconds (what the stop has left of its
        shutdown_timeout) instead of the whole timeout again."""
        # What BaseRunner.cleanup passes to its server's shutdown, where 0 would mean no limit at all.
        self._shutdown_timeout = max(grace, 0.05)
        await self.cleanup()

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts and freezes the application, as aiohttp does
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            refusals=self._refusals,
            malformed=self._malformed,
            **self._kwargs,
        )


def _bound_port(site: web.BaseSite | None, missing: str) -> int:
    """The port a started site listens on; RuntimeError(`missing`) when it is not listening."""
    server = site._server if site is not None else None
    if not isinstance(server, asyncio.Server):
        raise RuntimeError(missing)
    return int(server.sockets[0].getsockname()[1])


class Service:
    """One running log-bridge."""

    def __init__(self, config: Config, sinks: Mapping[str, Sink] | None = None, path: str | None = None) -> None:
        self.config = config
        self.path = path
        """The configuration file a reload reads again (None: the built-in default, nothing to reload)."""
        self.metrics = Metrics()
        self.state = State()
        self.journal = Journal(
            config.journal.path,
            max_bytes=config.journal.max_bytes,
            dedup_window=config.journal.dedup_window,
            dedup_max_keys=config.journal.dedup_max_keys,
            largest_body=config.server.max_body_bytes,
            max_dead_letter_bytes=config.journal.max_dead_letter_bytes,
        )
        if config.journal.dedup_store.type == "redis":
            from receiver.dedup_store import RedisDedupStore

            self.journal.shared = RedisDedupStore(
                config.journal.dedup_store, config.journal.dedup_window, self.metrics.dedup_store_errors.inc
            )
        self.journal.dedup_scopes = {stream.name: stream.path for stream in config.streams}
        self.sinks = dict(sinks) if sinks is not None else build_sinks(config)
        self.engine: DeliveryEngine | None = None
        self.tls: ServerTls | None = None
        self._runner: _Runner | None = None
        self._front: Front | None = None
        self._site: web.BaseSite | None = None
        self._listener: CappedListener | None = None
        self._pacer = HandshakePacer()
        self._admin: tuple[_Runner, web.SockSite] | None = None
        """The admin listener (`server.admin`): its runner and site."""
        self._fd_limit = 0
        self._loop_errors: tuple[asyncio.AbstractEventLoop, LoopErrors] | None = None
        """The loop whose exception handler the service replaced, and the service's handler."""
        self._housekeeping: list[asyncio.Task[None]] = []
        self._reloading = asyncio.Lock()
        self._settling: set[asyncio.Task[None]] = set()
        scrub.register(secret_values(config))
        self.workos: WorkosService | None = None
        self._workos_metrics: WorkosMetrics | None = None
        """The WorkOS stream watch and export archive (receiver.workos.WorkosService), with a `workos:` section."""

    @property
    def port(self) -> int:
        """The bound port (useful with `port: 0`)."""
        return _bound_port(self._site, "the service is not listening")

    @property
    def url(self) -> str:
        """Base URL of the listener."""
        return listen_url(self.config.server.host, self.port, tls=self.config.server.tls is not None)

    @property
    def admin_url(self) -> str:
        """Base URL of the admin listener (plain HTTP)."""
        port = _bound_port(self._admin[1] if self._admin is not None else None, "the service has no admin listener")
        return listen_url(self._admin_host(), port, tls=False)

    def _admin_host(self) -> str:
        admin = self.config.server.admin
        return admin.host if admin is not None and admin.host is not None else self.config.server.host

    async def start(self) -> None:
        """Open the journal, start delivery, then listen; on a failure, undo what was started."""
        server = self.config.server
        self.tls = ServerTls(server.tls, self._handshake_failed) if server.tls else None
        if self.tls is not None:
            self.metrics.watch_tls(self.tls.expiry, HANDSHAKE_FAILURES)
        if self.tls is not None and server.tls is not None:
            # Served all the same: the journal's backlog is still delivered, and a reload can bring a valid pair.
            problem = validity_problem(server.tls, self.tls.validity, datetime.datetime.now(datetime.UTC))
            if problem is not None:
                log.error(UNUSABLE_CERTIFICATE, extra={"problem": problem})
        await self.journal.open()
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        server = self.config.server
        loop = asyncio.get_running_loop()
        errors = LoopErrors(logging.getLogger("asyncio"), self.metrics.loop_errors.inc)
        errors.install(loop)
        self._loop_errors = (loop, errors)
        self._fd_limit = raise_fd_limit()
        self.metrics.watch_journal(
            lambda: self.journal.size_bytes,
            lambda: 1.0 if self.journal.over_cap else 0.0,
            lambda: self.journal.dedup.size,
            lambda: 1.0 if self.journal.disk_full else 0.0,
        )
        # The segments' directory: beside the database however journal.path reaches it (a symlink), and absolute.
        self.metrics.watch_journal_disk(self.journal.segments.directory)
        self.metrics.journal_max_bytes.set_function(lambda: self.journal.max_bytes)
        self.metrics.dead_letter_bytes.set_function(lambda: self.journal.dead_letter_bytes)
        self.metrics.dead_letter_max_bytes.set_function(lambda: self.journal.max_dead_letter_bytes)
        self.journal.dedup.on_evict = self.metrics.dedup_evicted.inc
        intake_dead = self.metrics.dead_lettered.labels("intake")  # damaged journal bytes are intake dead letters
        intake_dead.inc(self.journal.damage_kept)  # kept at open, before there was anyone to tell
        self.journal.on_damage = intake_dead.inc
        self.engine = DeliveryEngine(self.config, self.journal, self.metrics, self.sinks)
        owed = carried_over(
            await self.journal.load_meta(ROUTING),
            await self.journal.load_meta(OWED),
            self.config,
            self.journal.last_seq,
        )
        self.engine.carry(owed)
        await self._store_routing()
        await self.engine.start()
        self._housekeeping.append(asyncio.create_task(self._prune_dedup_forever(), name="dedup-prune"))
        if self.tls is not None:
            self._housekeeping.append(asyncio.create_task(self._watch_tls_forever(), name="tls-watch"))
        if self.config.workos is not None:
            from receiver.workos import WorkosService

            self.workos = WorkosService(self.config, self.metrics.registry, self.sinks)
            self._workos_metrics = self.workos.metrics
            self.workos.start()
        app = build_app(self.config, self.journal, self.metrics, self.state)
        self._runner = self._make_runner(app, shutdown_timeout=server.shutdown_timeout)
        await self._runner.setup()
        aiohttp_server = self._runner.server
        if not isinstance(aiohttp_server, _Server):
            raise RuntimeError("the runner is not set up")
        self._front = Front(self.state, aiohttp_server.handed_off, idle_timeout=server.header_timeout)
        sock = self._listener = listen_socket(server.host, server.port)
        sock.cap = connection_cap(server.max_connections, self._fd_limit)
        sock.on_refused = self._refuser(sock, "stream", "connection closed unread: server.max_connections are open")
        sock.on_unlisted = self._unlisted
        self._apply_allowlist(server)
        self.metrics.open_connections.labels("stream").set_function(lambda: sock.open)
        log.info("connection limits", extra={"fd_limit": self._fd_limit, "max_connections": sock.cap})
        self._site = _Site(
            self._runner,
            sock,
            protocol=self._front,
            pacer=self._pacer,
            ssl_context=self.tls.listening if self.tls else None,
            handshake_timeout=server.header_timeout,
            backlog=LISTEN_BACKLOG,
        )
        await self._site.start()
        self.metrics.last_reload.set(time.time())
        log.info("listening", extra={"url": self.url, "streams": [s.path for s in self.config.streams]})
        if server.admin is not None:
            await self._start_admin(server.admin)
        if self.journal.shared is not None and await self.journal.shared.probe():  # a failure is logged there
            log.info("dedup store reachable: deduplication is shared", extra={"store": self.journal.shared.where})
        self._warn_open_streams(self.config)

    def _make_runner(self, app: web.Application, *, shutdown_timeout: float) -> _Runner:
        """A runner for one of the listeners' applications, its connections held to the same limits."""
        return _Runner(
            app,
            refusals=self.state.refusals,
            malformed=self.metrics.malformed_requests,
            access_log=None,
            # The intake decompresses itself, with its own size limit; the admin routes read no body, and one
            # left unread is not inflated either.
            auto_decompress=False,
            keepalive_timeout=self.config.server.header_timeout,  # also closes a connection whose headers do not arrive
            shutdown_timeout=shutdown_timeout,
            lingering_time=LINGER_SECONDS,  # after an early answer, read at most this long what the client still sends
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
            max_headers=MAX_HEADERS,
        )

    async def _start_admin(self, admin: AdminConfig) -> None:
        """The admin listener: the operations routes over plain HTTP, with a small connection cap of its own."""
        # aiohttp's connections as on the stream listener: malformed requests answered alike
        runner = self._make_runner(
            build_admin_app(self.journal, self.metrics, self.state),
            shutdown_timeout=1.0,  # its answers take milliseconds
        )
        await runner.setup()
        try:
            sock = listen_socket(self._admin_host(), admin.port)
        except BaseException:
            await runner.cleanup()
            raise
        sock.cap = connection_cap(ADMIN_MAX_CONNECTIONS, self._fd_limit)
        sock.on_refused = self._refuser(sock, "admin", "admin connection closed unread: its cap is open")
        self.metrics.open_connections.labels("admin").set_function(lambda: sock.open)
        site = web.SockSite(runner, sock, backlog=LISTEN_BACKLOG)
        self._admin = (runner, site)
        await site.start()
        log.info("admin listening", extra={"url": self.admin_url, "paths": ["/healthz", "/readyz", "/metrics"]})

    def _apply_allowlist(self, server: ServerConfig) -> None:
        """Have the stream listener close connections from unlisted addresses at accept, or not, and serve the
        handshakes of listed ones first."""
        if self._listener is not None:
            policy = AddressPolicy(server.allowed_networks(), server.proxy_networks())
            self._listener.listed = policy.listed if server.refuse_unlisted else None
            self._pacer.listed = policy.listed

    def _handshake_failed(self, exc: ssl.SSLError) -> None:
        """A TLS handshake on the stream listener failed: counted by kind; a client refusing the certificate,
        which is what WorkOS does with a chain it cannot verify or a name it was not issued for, is logged too
        (a few a second: any client can send that alert, unless `server.refuse_unlisted`)."""
        kind = handshake_failure(exc.reason)
        self.metrics.tls_handshake_failures.labels(kind).inc()
        if kind == "certificate_refused":
            alert = (exc.reason or "").split("_ALERT_", 1)[-1].lower().replace("_", " ")
            self.state.refusals.log(
                "a TLS client refused the server's certificate: check server.tls.cert_file holds the whole chain "
                "and the name clients connect to",
                alert=alert,
            )

    def _unlisted(self, address: Any) -> None:
        self.metrics.connections_unlisted.inc()
        client = address[0] if isinstance(address, tuple) and address else None
        self.state.refusals.log("connection from an unlisted address closed at accept", client=client)

    def _refuser(self, sock: CappedListener, listener: str, message: str) -> Callable[[Any], None]:
        """What a listener calls for a connection over its cap: counted by listener, logged a few a second."""
        refused = self.metrics.connections_refused.labels(listener)

        def refuse(address: Any) -> None:
            refused.inc()
            client = address[0] if isinstance(address, tuple) and address else None
            self.state.refusals.log(message, client=client, listener=listener, max_connections=sock.cap)

        return refuse

    @staticmethod
    def _warn_open_streams(config: Config) -> None:
        for stream in config.streams:
            if stream.auth is None:
                log.warning("stream accepts requests without a secret header", extra={"stream": stream.name})

    async def reload(self) -> bool:
        """Read the configuration file again and apply it without dropping a connection or an acknowledged
        event; an invalid one changes nothing. Returns whether it was applied."""
        async with self._reloading:
            try:
                applied = await self._reload()
            except Exception as exc:  # a reload must never stop the service
                log.error(
                    "reload failed; still serving the previous configuration",
                    extra={"error": type(exc).__name__, "where": where_raised(exc)},
                )
                applied = False
            self._count_reload(applied)
            return applied

    def _count_reload(self, applied: bool) -> None:
        """A reload (of the configuration, or of TLS files by the watch) in the metrics."""
        self.metrics.reloads.labels("success" if applied else "failure").inc()
        if applied:
            self.metrics.last_reload.set(time.time())

    async def _reload(self) -> bool:
        if self.path is None:
            log.warning("reload asked, but no configuration file is in use (the built-in default): nothing to do")
            return False
        try:
            new = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            log.error(
                "reload refused: the configuration is invalid; still serving the previous one",
                extra={"path": self.path, "problems": exc.errors},
            )
            return False
        plan = plan_reload(self.config, new)
        config = plan.config
        built: dict[str, Sink] = {}
        fresh_tls: FreshTls | None = None
        try:
            if self.tls is not None and config.server.tls is not None:
                fresh_tls = self.tls.load(config.server.tls)  # loaded before anything changes
            built = build_sinks(config, plan.sinks_to_build)
        except (ConfigError, LogBridgeError, SinkError) as exc:
            for sink in built.values():
                await sink.close()
            problems = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
            log.error(
                "reload refused; still serving the previous configuration",
                extra={"path": self.path, "problems": problems},
            )
            return False
        scrub.register(secret_values(config))
        # Delivery first: a sink the new streams feed must exist (at the journal's end) before they are served.
        # A journal that refuses writes fails it before it changes anything (the added sinks' cursors), or not at all.
        if self.engine is not None:
            await self.engine.reconfigure(config, built)
        if self.tls is not None and fresh_tls is not None:
            self.tls.use(fresh_tls)
        self.journal.max_bytes = config.journal.max_bytes
        self.journal.max_dead_letter_bytes = config.journal.max_dead_letter_bytes
        if self._listener is not None:
            self._listener.cap = connection_cap(config.server.max_connections, self._fd_limit)
            self._apply_allowlist(config.server)
        self.journal.largest_body = config.server.max_body_bytes
        replaced = self.state.install(config, self.journal, self.metrics)
        if plan.moved and self.engine is not None:
            settle = asyncio.create_task(self._settle_streams(replaced, plan.moved))
            self._settling.add(settle)
            settle.add_done_callback(self._settling.discard)
        await self._restart_workos(config, built)
        self.config = config
        try:
            await self._store_routing()
        except JournalClosed:
            raise
        except JournalError as exc:  # applied all the same: the routing recorded before owes no less at a start
            log.error(
                "reload: the journal cannot record the new routing; the new configuration is in use",
                extra={"error": str(exc)},
            )
        for setting in plan.needs_restart:
            log.warning("reload: this setting changes only with a restart; kept as it was", extra={"setting": setting})
        log.info("configuration reloaded", extra={"path": self.path, **plan.summary()})
        self._warn_open_streams(config)
        return True

    async def _store_routing(self) -> None:
        """Record the routing in use and what sinks still owe from earlier ones (read at the next start)."""
        if self.engine is not None:
            await self.journal.store_meta(ROUTING, routing_of(self.config))
            await self.journal.store_meta(OWED, stored(self.engine.owed_elsewhere()))

    async def _settle_streams(self, replaced: Mapping[str, Intake], streams: frozenset[str]) -> None:
        """Once the requests in flight on streams a reload removed or re-routed have finished, their sinks of
        before owe their events up to the journal's end then, and no later ones."""
        waiting = [intake for intake in replaced.values() if intake.stream.name in streams]
        longest = self.config.server.body_timeout + self.config.server.header_timeout + 5
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(intake.idle.wait() for intake in waiting)), longest)
        if self.engine is not None:
            self.engine.close_legacy(streams, self.journal.last_seq)
            with contextlib.suppress(LogBridgeError):
                await self._store_routing()

    async def _restart_workos(self, config: Config, built: Mapping[str, Sink]) -> None:
        """After a reload: restart the WorkOS watch and export when their section or their sinks changed
        (an export in progress resumes where it was, from the journal)."""
        export = config.workos.export if config.workos is not None else None
        rebuilt = export is not None and any(name in built for name in export.sinks)
        if config.workos == self.config.workos and not rebuilt:
            return
        if self.workos is not None:
            await self.workos.stop()
            self.workos = None
        if config.workos is None and self._workos_metrics is not None:
            self._workos_metrics.watching(())  # the section is gone: so are its gauges
        if config.workos is not None and self.engine is not None:
            from receiver.workos import WorkosService

            self.workos = WorkosService(config, self.metrics.registry, self.engine.sinks, self._workos_metrics)
            self._workos_metrics = self.workos.metrics
            self.workos.start()

    async def _watch_tls_forever(self) -> None:
        """Load the TLS files once they changed and then stayed the same for a look (TLS_WATCH_INTERVAL), as a
        reload would, counted in the reloads; files that cannot be used are tried again when they change again,
        or, when their certificate was not valid yet, once it is."""
        last_look: tuple[object, ...] | None = None
        early: tuple[tuple[object, ...], float] | None = None
        """Files refused because their certificate was not valid yet: their stamp, and when it becomes valid."""
        while True:
            await asyncio.sleep(TLS_WATCH_INTERVAL)
            tls = self.config.server.tls
            if self.tls is None or tls is None:
                continue
            look = await asyncio.to_thread(tls_files_stamp, tls)
            settled, last_look = look == last_look, look
            due = early is not None and early[0] == look and time.time() >= early[1]
            if (look == self.tls.stamp and not due) or not settled:
                continue
            async with self._reloading:
                if self.config.server.tls is not tls or (self.tls.stamp == look and not due):
                    continue  # a reload came first
                early = None
                try:
                    fresh = await asyncio.to_thread(self.tls.load, tls)
                except Exception as exc:  # the watch goes on whatever the files hold
                    self.tls.stamp = look  # these files are not tried again (unless not valid yet)
                    if isinstance(exc, CertificateNotValidYet):  # a clock behind the issuer's: valid in a moment
                        early = (look, exc.not_before.timestamp())
                    problems = exc.errors if isinstance(exc, ConfigError) else [type(exc).__name__]
                    log.error(
                        "TLS files changed, but cannot be used; still serving the previous certificate",
                        extra={"problems": problems},
                    )
                    self._count_reload(False)
                    continue
                self.tls.use(fresh)
                self._count_reload(True)
                log.info("TLS files changed: the new certificate is in use", extra={"cert_file": str(tls.cert_file)})

    async def _prune_dedup_forever(self) -> None:
        while True:
            try:
                await self.journal.prune_dedup()
            except Exception:
                log.exception("pruning dedup keys failed")
            await asyncio.sleep(DEDUP_PRUNE_INTERVAL)

    def stopping(self) -> None:
        """A stop is asked for: refuse new batches (503, /readyz too) from now on, and cut short what a reload
        in progress waits for (a changed sink's send), so that `stop` follows within its own bound."""
        self.state.draining = True
        if self.engine is not None:
            self.engine.hurry()

    async def stop(self) -> bool:
        """Refuse new batches (503), let sinks drain up to the deadline, finish requests in flight, close.
        Returns whether every sink drained; what did not stays in the journal for the next start."""
        self.state.draining = True  # from now on /readyz answers 503 and the stream endpoints refuse batches
        for settle in list(self._settling):  # what a reload left settling is in the journal: the next start reads it
            settle.cancel()
        # The listener stays up while the sinks drain, so probes and scrapes see "shutting down", not a refusal.
        drained = True
        if self.workos is not None:
            await self.workos.stop()
        if self.engine is not None:
            left = await self.engine.stop(self.config.server.shutdown_timeout)
            if left:
                log.warning(
                    "shutdown_timeout ended before these sinks delivered everything; it stays in the journal for "
                    "the next start",
                    extra={"events_left": left},
                )
            drained = not left
        # No new connections; then the front's own finish (what it hands to aiohttp meanwhile, aiohttp's
        # shutdown then finishes too); then aiohttp's: a connection handed to aiohttp after its shutdown
        # began would be closed by nobody.
        # Requests in flight share one `shutdown_timeout`, the front's and aiohttp's together.
        loop = asyncio.get_running_loop()
        finish_by = loop.time() + self.config.server.shutdown_timeout
        if self._site is not None and self._runner is not None and self._site in self._runner.sites:
            await self._site.stop()
        if self._front is not None:
            await self._front.shutdown(max(0.0, finish_by - loop.time()))
        if self._runner is not None:
            await self._runner.finish(max(0.0, finish_by - loop.time()))
        if self._admin is not None:  # last: /readyz answers "shutting down" there until the rest has stopped
            await self._admin[0].cleanup()
            self._admin = None
        for task in self._housekeeping:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._housekeeping.clear()
        await self.journal.close()
        if self.journal.shared is not None:
            await self.journal.shared.close()
        if self._loop_errors is not None:
            loop, errors = self._loop_errors
            errors.uninstall(loop)
            self._loop_errors = None
        log.info("stopped", extra={"drained": drained})
        return drained


async def serve(
    config: Config,
    path: str | None = None,
    pid_file: str | None = None,
    early_hangups: list[int] | None = None,
    early_stops: list[int] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT, then stop cleanly; SIGHUP reloads `path`. Returns the exit status.
    `early_hangups` and `early_stops` hold the HUPs and TERMs that arrived before this was called."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hangups = asyncio.Event()
    # Installed before start-up, so a HUP that arrives early is a reload once started, never a kill.
    loop.add_signal_handler(signal.SIGHUP, hangups.set)
    service: Service | None = None

    def on_stop() -> None:
        if stop.is_set() and service is not None and service.engine is not None:  # Ctrl-C twice
            log.warning("second signal: stopping without waiting for the sinks; what they hold stays in the journal")
            service.engine.abandon()
        stop.set()
        if service is not None:  # at once, even while a reload runs: the stop itself comes after it
            service.stopping()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop)
    if early_stops:  # a TERM during start-up, before the handlers above: nothing is open yet
        log.info("stopping: SIGTERM during start-up, before serving")
        return 0
    service = Service(config, path=path)
    await service.start()
    if pid_file is not None:
        await asyncio.to_thread(Path(pid_file).write_text, f"{os.getpid()}\n")
    # What start-up built lives for the whole run: keep it out of the collector's scans, and collect the
    # young generation less often (the intake allocates many short-lived objects per request).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)
    if early_hangups:  # HUPs during start-up: the file may have changed meanwhile
        hangups.set()
    stopping = asyncio.create_task(stop.wait())
    while not stop.is_set():
        hangup = asyncio.create_task(hangups.wait())
        await asyncio.wait({stopping, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if hangups.is_set() and not stop.is_set():  # a HUP handled with a TERM: the next start reads the file
            hangups.clear()
            log.info("SIGHUP: reloading the configuration", extra={"path": path})
            await service.reload()
        hangup.cancel()
    log.info(
        "stopping: refusing new batches, draining sinks",
        extra={"shutdown_timeout_s": service.config.server.shutdown_timeout},
    )
    await service.stop()
    # From here the loop's handler goes away with the loop; a HUP must still not kill the process.
    loop.remove_signal_handler(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if pid_file is not None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(Path(pid_file).unlink)
    return 0

"""What keeps a flood of connections from exhausting the process: the file-descriptor limit raised to its hard
limit, a cap on the connections open at once (counted at `accept`, whatever then serves them: the stream front,
aiohttp, a TLS handshake), TLS handshakes run a slice at a time, and asyncio's own error reports through a rate
limit.

Without the cap, a client opening more idle connections than RLIMIT_NOFILE allows makes `accept` fail with EMFILE;
asyncio then logs an error with its traceback up to `backlog` times per readable event (thousands of lines a
second), and the journal, SQLite and the sinks find no descriptor left either.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
import sys
import time
from asyncio import constants, sslproto
from collections import deque
from collections.abc import Callable
from typing import Any

from receiver.app import RateLimitedLog, where_raised

log = logging.getLogger(__name__)

FD_RESERVE = 256
"""Descriptors kept out of the connection cap, for the journal's segments, SQLite, the sinks and the listener."""
LOOP_ERROR_KINDS = 32
"""Kinds of asyncio error report rate-limited apart; any further kind shares one limit (the messages of some
reports quote a callback, so their number is not bounded)."""


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as far as the system lets); returns the soft limit in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard
        if wanted == resource.RLIM_INFINITY:
            wanted = 1 << 20  # Linux refuses a soft limit above fs.nr_open (1,048,576 by default)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass  # the limit stays as it was: the cap follows it
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """The connections allowed open at once: `server.max_connections`, but never so many that the descriptors the
    journal, SQLite and the sinks need are taken (FD_RESERVE of them, or half the limit when it is below
    2 × FD_RESERVE)."""
    reserve = min(FD_RESERVE, fd_limit // 2)
    return max(1, min(max_connections, fd_limit - reserve))


UNLISTED_PER_ACCEPT = 64
"""Connections from unlisted addresses closed in one round of accepts before the loop runs again."""


ACCEPTS_PER_ROUND = 16
"""Connections accepted in one round before the loop runs again."""


class CappedListener(socket.socket):
    """A listening socket whose `accept` closes at once, unread, a connection over the cap; the connections it
    accepts count as open until their socket is closed."""

    def __init__(self, family: int, kind: int, proto: int) -> None:
        super().__init__(family, kind, proto)
        self.cap = 1
        self.open = 0
        """Connections accepted and not closed yet."""
        self.on_refused: Callable[[Any], None] = lambda address: None
        self.listed: Callable[[str], bool] | None = None
        """Whether a connection from an address may be served at all; one that may not is closed at once,
        before any TLS handshake or HTTP (None: every address may)."""
        self.on_unlisted: Callable[[Any], None] = lambda address: None
        self._in_round = 0

    def accept(self) -> tuple[socket.socket, Any]:
        """The next connection within the cap, from a listed address; one over the cap is closed and ends this
        round of accepts, as do UNLISTED_PER_ACCEPT unlisted ones in a row and ACCEPTS_PER_ROUND accepted."""
        try:
            if self._in_round >= ACCEPTS_PER_ROUND:
                raise BlockingIOError  # the loop runs in between: a flood of new connections does not hold it
            accepted = self._accept_listed()
        except BaseException:
            self._in_round = 0  # what asyncio takes for "nothing more to accept": it selects again
            raise
        self._in_round += 1
        return accepted

    def _accept_listed(self) -> tuple[socket.socket, Any]:
        for _ in range(UNLISTED_PER_ACCEPT):
            fd, address = self._accept()  # type: ignore[attr-defined]  # socket.socket's own accept does the same
            if self.listed is None or self.listed(address[0]):
                break
            socket.close(fd)
            self.on_unlisted(address)
        else:
            raise BlockingIOError  # the loop runs in between: a flood from elsewhere does not hold it
        if self.open >= self.cap:
            socket.close(fd)
            self.on_refused(address)
            raise BlockingIOError
        self.open += 1
        return _Accepted(self, self.family, self.type, self.proto, fileno=fd), address


class _Accepted(socket.socket):
    """An accepted connection's socket, counted open by its listener until closed."""

    __slots__ = ("_listener",)

    def __init__(self, listener: CappedListener | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listener = listener

    def _uncount(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.open -= 1

    def close(self) -> None:
        self._uncount()
        super().close()

    def detach(self) -> int:
        self._uncount()
        return super().detach()

    def __del__(self) -> None:
        self._uncount()  # a socket dropped unclosed is not open either
        super().__del__()  # type: ignore[misc]  # the base (C) finalizer closes the descriptor; typeshed omits it


class LoopErrors:
    """An event loop's exception handler: asyncio's reports logged at most a few a second per kind (message and
    exception type), without their traceback (which may quote request bytes), the rest counted. Also the
    process's `sys.unraisablehook`, for the exceptions Python cannot raise: the ssl module reports there a
    client's TLS server name it cannot decode, which the default hook prints to stderr, name and all, once per
    connection."""

    def __init__(self, logger: logging.Logger, count: Callable[[], None]) -> None:
        self._logger = logger
        self._count = count
        self._limits: dict[tuple[str, str], RateLimitedLog] = {}
        self._others = RateLimitedLog(logger, burst=3, level=logging.ERROR)
        self._previous: Any = None
        self._previous_unraisable: Callable[[Any], object] = sys.unraisablehook
        self._retired = False

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Become `loop`'s exception handler, and the process's unraisable hook."""
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)
        self._previous_unraisable = sys.unraisablehook
        sys.unraisablehook = self.unraisable

    def unraisable(self, unraisable: Any) -> None:
        """An exception Python could not raise, reported like asyncio's, without the object it came from."""
        exc = unraisable.exc_value
        self(None, {"message": "exception ignored (unraisable)", "exception": exc})

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give `loop` back the handler it had, skipping those of services stopped since (several services may
        share a loop, in tests, and stop in any order); the unraisable hook likewise."""
        self._retired = True
        if sys.unraisablehook == self.unraisable:
            hook = self._previous_unraisable
            while isinstance(owner := getattr(hook, "__self__", None), LoopErrors) and owner._retired:
                hook = owner._previous_unraisable
            sys.unraisablehook = hook
        if loop.get_exception_handler() is not self:
            return  # another service's handler came after: it puts back what it found, skipping this one
        previous = self._previous
        while isinstance(previous, LoopErrors) and previous._retired:
            previous = previous._previous
        loop.set_exception_handler(previous)

    def __call__(self, loop: asyncio.AbstractEventLoop | None, context: dict[str, Any]) -> None:
        self._count()
        message = str(context.get("message") or "unhandled exception in the event loop")
        exc = context.get("exception")
        error = type(exc).__name__ if isinstance(exc, BaseException) else ""
        kind = (message, error)
        limit = self._limits.get(kind)
        if limit is None:
            if len(self._limits) < LOOP_ERROR_KINDS:
                limit = self._limits[kind] = RateLimitedLog(self._logger, burst=3, level=logging.ERROR)
            else:
                limit = self._others
        fields: dict[str, object] = {"error": error} if error else {}
        if isinstance(exc, BaseException):
            fields["where"] = where_raised(exc)
        limit.log(message[:200], **fields)


HANDSHAKE_SLICE = 0.002
"""Seconds of TLS handshake work the event loop does before it runs its other callbacks and polls again."""
TLS_READ_BYTES = 32 * 1024
"""What a TLS connection reads from its socket at once, into a buffer of its own it keeps while open."""
QUEUED_READ_LIMIT = 256 * 1024
"""Bytes a connection whose handshake step is queued may have read and not handed to TLS yet; more wait in the
kernel's buffer. asyncio's own limit for what a TLS connection has read and not decrypted, once its handshake is
done (`asyncio.constants.FLOW_CONTROL_HIGH_WATER_SSL_READ` KiB in 3.11 to 3.13)."""
PACEABLE = hasattr(sslproto, "SSLProtocolState") and callable(getattr(sslproto.SSLProtocol, "_do_handshake", None))
"""Whether this Python's asyncio TLS protocol is the one `_PacedTLS` extends (that of 3.11 to 3.13); without it
the listener uses asyncio's own, unpaced."""


class HandshakePacer:
    """Runs the TLS handshakes of the stream listener a slice at a time, so that a flood of them cannot hold the
    event loop.

    asyncio runs a handshake's steps on the event loop, in the callback that reads the connection: a server
    flight costs the certificate key's signature and a key exchange (0.5-1.5 ms on one core of the machines
    measured, most for RSA keys), and every ClientHello that arrived during one poll is answered before any
    other callback runs. 1,000 connections sending a ClientHello at once from anywhere (no secret is needed
    before the handshake) held `/healthz` up to 0.6-1.1 s (ECDSA key) and 0.9-1.9 s (RSA), three runs each
    (docs/performance.md, 2026-12-08). Here a step is queued instead, and one callback a loop round runs queued
    steps for HANDSHAKE_SLICE seconds: the handshakes get the same CPU, the other callbacks run between slices.
    Connections from `listed` addresses (the allowlist and the trusted proxies) are served first, so WorkOS's
    handshakes do not wait behind a flood from elsewhere."""

    def __init__(self) -> None:
        self.listed: Callable[[str], bool] = lambda address: False
        self._first: deque[_PacedTLS] = deque()
        self._rest: deque[_PacedTLS] = deque()
        self._draining = False

    def queue(self, connection: _PacedTLS) -> None:
        (self._first if connection.listed else self._rest).append(connection)
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        until = time.perf_counter() + HANDSHAKE_SLICE
        first, rest = self._first, self._rest
        while first or rest:
            (first or rest).popleft().step()
            if time.perf_counter() >= until:
                break
        if first or rest:
            asyncio.get_running_loop().call_soon(self._drain)  # after the callbacks ready now, and a poll
        else:
            self._draining = False


class _PacedTLS(sslproto.SSLProtocol):
    """asyncio's TLS protocol (what `create_server(ssl=...)` makes for each connection), whose handshake steps
    go through a HandshakePacer, and which reads TLS_READ_BYTES at a time: asyncio's own buffer, 256 KiB made
    and filled for each connection, had 1,000 idle connections hold 276 MB."""

    max_size = TLS_READ_BYTES

    def __init__(self, pacer: HandshakePacer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pacer = pacer
        self._queued = False
        self.listed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.listed = isinstance(peer, tuple) and bool(peer) and self._pacer.listed(peer[0])
        super().connection_made(transport)

    def _do_handshake(self) -> None:
        if not self._queued:  # a step queued already takes whatever arrived since
            self._queued = True
            self._pacer.queue(self)
        # Until its step runs, the client's bytes pile up here unread by TLS, as fast as the loop reads them
        # (a step can wait a while behind a flood): past asyncio's own limit for this buffer they wait in the
        # kernel's, as they do once the handshake is done. (Reading goes on below it, so a connection closed
        # while queued is seen, and its step skipped.)
        pending = self._incoming.pending  # type: ignore[attr-defined]
        if pending >= QUEUED_READ_LIMIT and isinstance(self._transport, asyncio.ReadTransport):
            self._transport.pause_reading()

    def step(self) -> None:
        self._queued = False
        # Closed, timed out or reset while queued: nothing to do. (typeshed describes the SSLProtocol of Python
        # 3.10 and before; these are the attributes of 3.11 to 3.13's.)
        state = self._state  # type: ignore[attr-defined]
        if state != sslproto.SSLProtocolState.DO_HANDSHAKE or self._transport is None:
            return
        if isinstance(self._transport, asyncio.ReadTransport):
            # Paused by `_do_handshake`, maybe; resumed first, as the step that ends the handshake may pause it
            # again (asyncio's flow control once the handshake is done).
            self._transport.resume_reading()
        try:
            super()._do_handshake()  # type: ignore[misc]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # from the protocol over it (its connection_made): this connection's end only
            self._fatal_error(exc, "Fatal error: a TLS connection's handshake step failed")


def paced_tls(
    pacer: HandshakePacer,
    protocol: Callable[[], asyncio.Protocol],
    context: ssl.SSLContext,
    handshake_timeout: float,
) -> Callable[[], asyncio.BaseProtocol]:
    """A protocol factory for a listener without `ssl=`: each connection TLS as asyncio's own `ssl=context`
    would make it (`_make_ssl_transport`), with `protocol` over it and its handshake paced."""
    loop = asyncio.get_running_loop()

    def make() -> asyncio.BaseProtocol:
        return _PacedTLS(
            pacer,
            loop,
            protocol(),
            context,
            None,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,
            ssl_shutdown_timeout=constants.SSL_SHUTDOWN_TIMEOUT,
        )

    return make

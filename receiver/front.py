"""The stream endpoints' own HTTP/1.1 front, for the requests WorkOS sends.

Every connection starts here. A request this front takes whole — `POST` to a configured stream path, HTTP/1.1,
`Content-Length` (no `Transfer-Encoding`, no `Expect`, no `Upgrade`), printable ASCII headers ending in CRLF, a
body of at most `TAKEN_BYTES` — is served by the stream's `Intake` and answered with a fixed response head,
without aiohttp's request and response objects (about half of what a small request costs in aiohttp.web).
Anything else — another path or method, a malformed or unusual request, a body too large, a request still
incomplete after `STALL_SECONDS`, a client that stays silent — goes to aiohttp's own connection handler, with
the bytes read so far, and stays there for the rest of the connection: 100-continue, chunked bodies, malformed
headers, timeouts and the other endpoints keep aiohttp's behaviour. Both fronts share the intake, so the
allowlist, the secret, the body budget, the journal and the metrics are the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

from receiver.app import Answer, Intake, State, where_raised

TAKEN_BYTES = 256 * 1024
"""The largest body this front reads itself (larger ones stream through aiohttp, which pauses the reading)."""
MAX_HEAD = 16 * 1024
"""The longest request head this front reads; a longer one goes to aiohttp, which refuses a head past this length
too (`server._HeadLimit`)."""
MAX_FIELDS = 64
MAX_HEADER_LINE = 8190
"""The longest request line or header field, as aiohttp's parser is configured (`server.py`)."""
STALL_SECONDS = 1.0
"""How long an incomplete request may wait for its bytes here before aiohttp (and its timeouts) takes over."""
SWEEP_SECONDS = 0.5
SWEEP_SLICE_SECONDS = 0.002
"""The longest the sweep holds the loop before it lets the loop run: a hand-off to aiohttp costs about 35 µs, so
thousands of connections stalled at once would otherwise freeze every connection for a tenth of a second or more."""

_HEAD_BYTES = bytes(range(0x20, 0x7F)) + b"\t\r\n"
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_REFUSED_FIELDS = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
_SINGLETON_FIELDS = (
    b"content-length",
    b"content-location",
    b"content-range",
    b"content-type",
    b"etag",
    b"host",
    b"max-forwards",
    b"server",
    b"transfer-encoding",
    b"user-agent",
)
"""The fields aiohttp's (strict) request parser refuses to see twice: a request repeating one goes there."""
_DEFAULT_TYPE = "application/octet-stream"  # what aiohttp reports when a request has no Content-Type


class FrontHead:
    """A request this front parsed, as the intake reads it."""

    __slots__ = ("peer", "content_length", "content_type", "encoding", "_fields", "_body")

    gone = False  # its peer was read when the connection was made

    def __init__(self, peer: str | None, fields: dict[bytes, list[bytes]], length: int) -> None:
        self.peer = peer
        self._fields = fields
        self.content_length: int | None = length
        kind = fields.get(b"content-type")
        self.content_type = kind[0].decode("ascii") if kind else _DEFAULT_TYPE
        encoding = fields.get(b"content-encoding")
        self.encoding = encoding[0].decode("ascii").lower() if encoding else "identity"
        self._body = b""

    def header_bytes(self, name: str) -> bytes:
        # A name beyond ASCII (the configuration does not check auth.header) is no field this front parsed.
        values = self._fields.get(name.lower().encode("ascii", "replace"))
        return values[0] if values else b""

    def forwarded(self) -> list[str]:
        return [value.decode("ascii") for value in self._fields.get(b"x-forwarded-for", ())]

    async def body(self, max_body: int, within: float) -> bytes:
        return self._body


def parse_head(head: bytes, peer: str | None) -> tuple[str, FrontHead] | None:
    """The stream path and head of a request this front takes (`head` without its final CRLF CRLF), else None."""
    crlf = head.count(b"\r\n")
    if head.translate(None, _HEAD_BYTES) or head.count(b"\r") != crlf or head.count(b"\n") != crlf:
        return None  # a control character, a byte beyond ASCII, or a line not ending in CRLF
    lines = head.split(b"\r\n")
    request_line = lines[0]
    if len(lines) > MAX_FIELDS + 1 or not request_line.startswith(b"POST /") or request_line[-9:] != b" HTTP/1.1":
        return None
    if max(map(len, lines)) > MAX_HEADER_LINE:
        return None  # aiohttp refuses it, with its message
    target = request_line[5:-9]
    if b" " in target or b"\t" in target:
        return None
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN):
            return None  # not a field, or an obsolete line folding (a line starting with a space)
        fields.setdefault(name.lower(), []).append(value.strip(b" \t"))
    length = fields.get(b"content-length")
    if length is None or len(length) != 1 or not length[0].isdigit() or len(length[0]) > 12:
        return None
    if not _REFUSED_FIELDS.isdisjoint(fields):
        return None
    if b"host" not in fields or any(len(fields.get(name, ())) > 1 for name in _SINGLETON_FIELDS):
        return None  # aiohttp answers 400: an HTTP/1.1 request has exactly one Host (RFC 9112 3.2)
    connection = fields.get(b"connection")
    if connection is not None and any(value.lower() != b"keep-alive" for value in connection):
        return None
    return target.decode("ascii"), FrontHead(peer, fields, int(length[0]))


class _Clock:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


_STATUS_LINES = {status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode()) for status in HTTPStatus}


def response_bytes(answer: Answer, date: bytes) -> bytes:
    """An answer as the bytes of an HTTP/1.1 response."""
    extra = b"".join(b"%s: %s\r\n" % (k.encode("ascii"), v.encode("ascii")) for k, v in (answer.headers or {}).items())
    return b"%sContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\n%s%s\r\n%s" % (
        _STATUS_LINES[answer.status],
        len(answer.body),
        date,
        extra,
        b"Connection: close\r\n" if answer.close else b"",
        answer.body,
    )


class Front:
    """The connections this front serves, their timeouts, and what it hands to aiohttp."""

    def __init__(
        self,
        state: State,
        fallback: Callable[[float], asyncio.Protocol],
        *,
        idle_timeout: float,
        taken_bytes: int = TAKEN_BYTES,
    ) -> None:
        self.state = state
        self.fallback = fallback
        """aiohttp's connection handler, for a connection handed to it: made with the loop time by which a request
        must have arrived whole (as though aiohttp had served the connection from its start)."""
        self.budget = state.budget  # one for the process: a reload changes its limit, not the object
        self.idle_timeout = idle_timeout
        self.taken_bytes = taken_bytes
        self.clock = _Clock()
        self.connections: set[FrontConnection] = set()
        self.handed_off = 0
        """Connections given to aiohttp so far."""
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> FrontConnection:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="front-sweep")
        return FrontConnection(self)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            await self.sweep(time.monotonic())

    async def sweep(self, now: float) -> None:
        """Check every connection's timeouts as of `now`, letting the loop run every SWEEP_SLICE_SECONDS."""
        connections = self.connections
        clock = time.perf_counter
        until = clock() + SWEEP_SLICE_SECONDS
        for connection in list(connections):
            if connection not in connections:
                continue  # closed or handed off while the loop ran
            try:
                connection.sweep(now)
            except Exception as exc:  # one connection's failure must not end every connection's timeouts
                self.state.refusals.log(
                    "stream front: a connection failed its timeout check; closed",
                    error=type(exc).__name__,
                    where=where_raised(exc),
                )
                connections.discard(connection)
                connection.transport.abort()
            if clock() > until:
                await asyncio.sleep(0)
                until = clock() + SWEEP_SLICE_SECONDS

    async def shutdown(self, grace: float) -> None:
        """Let the requests being served finish (up to `grace` seconds), then close every connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for connection in list(self.connections):
            connection.close()


class FrontConnection(asyncio.Protocol):
    """One connection, while this front serves it."""

    __slots__ = (
        "front",
        "transport",
        "loop",
        "peer",
        "buffer",
        "task",
        "since",
        "idle_since",
        "paused",
        "eof",
        "waiting",
        "writing_paused",
    )

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport = cast(asyncio.Transport, None)  # set by connection_made, before any other call
        self.loop = cast(asyncio.AbstractEventLoop, None)
        """The connection's loop, taken once: `asyncio.get_running_loop` costs a `getpid` system call a request."""
        self.peer: str | None = None
        self.buffer = b""
        self.task: asyncio.Task[None] | None = None
        self.since = time.monotonic()
        """When the connection last became idle, or the request being read began."""
        self.idle_since = self.since
        """When the connection last became idle (made, or its last answer written): its next request's head must
        have arrived whole header_timeout after, here or in aiohttp."""
        self.paused = False
        self.eof = False
        self.waiting: tuple[Intake, FrontHead, int, int] | None = None
        """A request whose body is on its way: its intake, head, where its body starts and its length (the
        bytes it holds of the budget meanwhile)."""
        self.writing_paused = False
        """The transport's buffer of answers is full (the client does not read them): nothing more is served."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None
        self.front.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            self.buffer += data
        else:
            self.buffer = data
            self.since = time.monotonic()
        if self.task is None and not self.writing_paused:
            self._next()
        if (self.task is not None or self.writing_paused) and not self.paused and len(self.buffer) > self._ahead():
            self.paused = True  # a client sending ahead of its answers waits
            self.transport.pause_reading()

    def _ahead(self) -> int:
        """The most a client may send ahead of its answers before it is no longer read."""
        return self.front.taken_bytes + MAX_HEAD

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.task is None and not self.transport.is_closing():
            self._proceed()

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.task is not None:
            # The answer being made is still written; the connection closes after it. Not over TLS, where the
            # transport closes anyway and logs a warning for every True returned.
            return self.transport.get_extra_info("ssl_object") is None
        if self.buffer:
            return self._hand_off().eof_received()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.front.connections.discard(self)
        self._release()
        # A request being served is not cancelled: its events are committed, only the answer is lost.

    def _release(self) -> None:
        if self.waiting is not None:
            self.front.budget.give(self.waiting[3])
            self.waiting[0].release()
            self.waiting = None

    def _next(self) -> None:
        request = self.waiting or self._head()
        if request is None:
            return
        intake, head, start, length = request
        buffer = self.buffer
        if len(buffer) < start + length:  # the rest of the body is on its way: its bytes are held meanwhile
            if self.waiting is None:
                # Only a request from an allowed address with the secret may hold budget while its body comes;
                # any other goes to aiohttp, which refuses it at once (403, 401), or answers 503 "too many
                # requests in flight".
                if not intake.admits(head) or not self.front.budget.take(length):
                    self._hand_off()
                    return
                # In flight on this intake from now: a reload that moves its stream settles only after it.
                intake.hold()
                self.waiting = request
            return
        held = self.waiting is not None
        if held:  # the budget is given back; the request stays counted in flight until `serve` counts it
            self.front.budget.give(length)
            self.waiting = None
        head._body = buffer[start : start + length]
        self.buffer = buffer[start + length :]
        self.task = self.loop.create_task(self._serve(intake, head, held))

    def _head(self) -> tuple[Intake, FrontHead, int, int] | None:
        """The request the buffer starts with, when this front takes it: its intake, head, where its body starts
        and its length. None when its head is still on its way, or when the connection went to aiohttp."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
        if end < 0:
            if len(buffer) >= MAX_HEAD:
                self._hand_off()
            return None  # the head is on its way
        parsed = parse_head(buffer[:end], self.peer)
        intake = None if parsed is None else self.front.state.intakes.get(parsed[0])
        if parsed is None or intake is None:
            self._hand_off()
            return None
        head = parsed[1]
        length = head.content_length or 0
        if not length or length > self.front.taken_bytes or length > intake.max_body:
            self._hand_off()
            return None
        return intake, head, end + 4, length

    async def _serve(self, intake: Intake, head: FrontHead, held: bool = False) -> None:
        try:
            answer = await intake.serve(head)
        finally:
            if held:
                intake.release()
            self.task = None
            self.since = self.idle_since = time.monotonic()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(response_bytes(answer, self.front.clock.date()))
        if answer.close:
            self.close()
            return
        self._proceed()  # after the client's end of the stream too: the requests it sent before are answered

    def _proceed(self) -> None:
        """After an answer: serve the next request, and read on while what is read ahead stays within bounds,
        unless the client does not read its answers; once the client has ended its stream, close after the
        last request it sent."""
        transport = self.transport
        if self.writing_paused:
            if not self.paused:
                self.paused = True
                transport.pause_reading()
            return
        if self.buffer:
            self._next()
            if transport.get_protocol() is not self:
                # Handed to aiohttp, reading resumed. After the client's end of the stream its answer is lost:
                # aiohttp's eof_received returns None, so asyncio closes the transport (a request it read is
                # committed all the same, and the sender's retry is a duplicate).
                return
        if self.eof:
            if self.task is None:
                self.close()  # nothing more comes: what is left is an incomplete request
            return
        if self.paused and len(self.buffer) <= self._ahead():
            self.paused = False
            transport.resume_reading()

    def sweep(self, now: float) -> None:
        """Hand a stalled request to aiohttp; close a connection idle for longer than the keep-alive timeout."""
        if self.task is not None:
            return
        if self.buffer:
            if now - self.since > STALL_SECONDS:
                self._hand_off()
        elif now - self.since > self.front.idle_timeout:
            self.close()

    def close(self) -> None:
        """Close the connection once its answers are written; abort it if they are not read within the keep-alive
        timeout (a transport closes only once what it holds is written, which a client that reads nothing
        would put off for ever)."""
        self.front.connections.discard(self)
        self._release()
        transport = self.transport
        transport.close()
        if transport.get_write_buffer_size():
            self.loop.call_later(self.front.idle_timeout, transport.abort)

    def _hand_off(self) -> asyncio.Protocol:
        """Give the connection, and what was read of it, to aiohttp's handler."""
        front = self.front
        front.connections.discard(self)
        front.handed_off += 1
        self._release()
        transport = self.transport
        handler = front.fallback(self.loop.time() + self.idle_since + front.idle_timeout - time.monotonic())
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.writing_paused:  # the transport tells a protocol once; aiohttp's must know it is to wait
            handler.pause_writing()
        if self.paused:
            self.paused = False
            transport.resume_reading()
        buffer, self.buffer = self.buffer, b""
        if buffer:
            handler.data_received(buffer)
        return handler

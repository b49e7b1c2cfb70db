"""The HTTP side: stream endpoints (allowlist, secret, body limits, parse, durable commit, answer), plus
`/healthz`, `/readyz` and `/metrics`."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import orjson
from aiohttp import web

from receiver.config import Config, StreamConfig
from receiver.decoding import decode_body
from receiver.errors import BodyError, ClientDisconnected, JournalClosed, JournalError, JournalFull
from receiver.journal import Journal
from receiver.metrics import Metrics
from receiver.netaddr import AddressPolicy
from receiver.parsing import Parsed, parse_body

log = logging.getLogger(__name__)

RETRY_AFTER_FULL = "30"
RETRY_AFTER_DOWN = "5"
RETRY_AFTER_BUSY = "1"
_INLINE_PARSE_BYTES = 256 * 1024
"""Bodies up to this size are parsed on the event loop; larger ones in a thread, so the loop stays free."""
_INLINE_DECODE_BYTES = 16 * 1024
"""Compressed bodies up to this size are decompressed on the event loop (a few milliseconds at most)."""


class Answer:
    """What an endpoint answers, whichever front serves the connection: a status, a JSON body and extra
    headers; `refusal` labels a refused request for `log_bridge_requests_refused_total`, `close` ends the
    connection after the answer."""

    __slots__ = ("status", "body", "headers", "refusal", "close")

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        refusal: str | None = None,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.refusal = refusal
        self.close = close


def web_response(answer: Answer) -> web.Response:
    """An answer as aiohttp's response."""
    response = web.Response(
        status=answer.status, body=answer.body, content_type="application/json", headers=answer.headers
    )
    if answer.close:
        response.force_close()
    return response


def _answer(status: int, message: str, **headers: str) -> Answer:
    return Answer(status, orjson.dumps({"error": message}), headers or None)


def _refuse(reason: str, status: int, message: str, *, close: bool = False, retry_after: str | None = None) -> Answer:
    """A refusal, labelled with its reason for `log_bridge_requests_refused_total`."""
    headers = {"Retry-After": retry_after} if retry_after else None
    return Answer(status, orjson.dumps({"error": message}), headers, reason, close)


def _gone(exc: ClientDisconnected) -> Answer:
    """A client gone before its request was read whole: counted as client_disconnected, not logged (nobody
    reads the answer)."""
    return _refuse("client_disconnected", exc.status, exc.message, close=True)


NO_STREAM = Answer(404, orjson.dumps({"error": "no stream is configured at this path"}), close=True)

REFUSAL_REASONS = (
    "not_allowed",
    "unauthorised",
    "too_large",
    "bad_body",
    "unsupported",
    "timeout",
    "overloaded",
    "journal_full",
    "journal_error",
    "shutting_down",
    "client_disconnected",
    "internal_error",
)
"""The `reason` label values of refused requests."""


class RateLimitedLog:
    """Lines a client can provoke, at `level`, through one token bucket: `burst` at once, `rate` a second, the rest
    counted."""

    def __init__(
        self,
        logger: logging.Logger,
        rate: float = 2.0,
        burst: int = 10,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.WARNING,
    ) -> None:
        self._logger = logger
        self._level = level
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self.suppressed = 0

    def log(self, message: str, **extra: object) -> None:
        """Log `message` with `extra` fields at the limit's level, unless over the rate."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return
        self._tokens -= 1.0
        if self.suppressed:
            self._logger.log(
                self._level, f"{self.suppressed} similar messages suppressed", extra={"rate_limited": True}
            )
            self.suppressed = 0
        self._logger.log(self._level, message, extra=extra)


def where_raised(exc: BaseException) -> str:
    """The innermost frame an exception came from (`file:line in function`), without its message or values."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


class InflightBudget:
    """Body bytes held across all requests (compressed, decompressed and while parsed), never above `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        """Reserve `size` bytes if they fit."""
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        """Return bytes reserved with `take`."""
        self.used -= size


class RequestHead(Protocol):
    """What the intake reads of a request: where it came from, its headers, then its body."""

    peer: str | None
    """The connection's peer address."""
    gone: bool
    """Whether the connection had already closed when the request was read (its peer then unknown)."""
    content_length: int | None
    content_type: str
    encoding: str
    """Content-Encoding, stripped and lower-cased ("identity" when absent)."""

    def header_bytes(self, name: str) -> bytes:
        """A header's value as sent (the first, if repeated; empty when absent)."""

    def forwarded(self) -> list[str]:
        """Every X-Forwarded-For value, in order."""

    async def body(self, max_body: int, within: float) -> bytes:
        """The whole body; BodyError 400 (cut short), 408 (not within `within` seconds) or 413 (over `max_body`)."""


def _from_browser(head: RequestHead) -> bool:
    """Whether a web page sent the request: browsers name the page's origin on every POST (fetch or form, to
    another site or its own); WorkOS, curl and other servers send no Origin. Asked only on a stream without a
    secret, where a page open on an allowed machine could post forged events with a text/plain or form body (no
    CORS preflight); with a secret the page does not know it, and sending the header takes a preflight the
    receiver never approves."""
    return bool(head.header_bytes("Origin"))


class WebHead:
    """An aiohttp request, as the intake reads it."""

    __slots__ = ("_request", "peer", "gone", "content_length", "content_type", "encoding")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport else None
        self.peer: str | None = peer[0] if peer else None
        self.gone = transport is None or transport.is_closing()
        self.content_length = request.content_length
        self.content_type = request.content_type
        self.encoding = request.headers.get("Content-Encoding", "identity").strip().lower()

    def header_bytes(self, name: str) -> bytes:
        # aiohttp decodes header bytes that are not UTF-8 with surrogateescape; this gives the bytes back.
        return self._request.headers.get(name, "").encode("utf-8", "surrogateescape")

    def forwarded(self) -> list[str]:
        return self._request.headers.getall("X-Forwarded-For", [])

    async def body(self, max_body: int, within: float) -> bytes:
        request = self._request
        content = request.content
        if content.is_eof() and not content.exception():
            # The whole body came with the headers (the common case): no wait, so no timer to arm.
            body = content.read_nowait()
            if request.content_length is not None and len(body) != request.content_length:
                raise BodyError(400, "the body is shorter than its Content-Length")
            if len(body) > max_body:
                raise BodyError(413, f"body is larger than max_body_bytes ({max_body} bytes)")
            return body
        chunks = bytearray()
        try:
            async with asyncio.timeout(within):
                if request.content_length is not None:  # already checked against the limit
                    return await request.content.readexactly(request.content_length)
                async for chunk in request.content.iter_any():
                    chunks += chunk
                    if len(chunks) > max_body:
                        raise BodyError(413, f"body is larger than max_body_bytes ({max_body} bytes)")
        except TimeoutError:
            raise BodyError(408, "timed out reading the request body") from None
        except asyncio.IncompleteReadError:
            raise BodyError(400, "the body is shorter than its Content-Length") from None
        except web.RequestPayloadError:
            raise BodyError(400, "the body is malformed (chunked encoding) or was cut off") from None
        except ConnectionError:  # aiohttp's "Connection lost": the client went away mid-body, no defect here
            raise ClientDisconnected from None
        return bytes(chunks)


class Intake:
    """Accepts one stream's POSTs."""

    def __init__(
        self,
        stream: StreamConfig,
        config: Config,
        journal: Journal,
        metrics: Metrics,
        state: State,
        budget: InflightBudget,
    ) -> None:
        self.stream = stream
        self.journal = journal
        self.metrics = metrics
        self.state = state
        self.budget = budget
        self.max_body = config.server.max_body_bytes
        self.body_timeout = config.server.body_timeout
        self.max_events = config.server.max_events_per_request
        self.policy = AddressPolicy(config.server.allowed_networks(), config.server.proxy_networks())
        self.auth_header = stream.auth.header if stream.auth else None
        self.auth_values = [v.encode() for v in stream.auth.values] if stream.auth else []
        # Labelled metric children are looked up once, not on every request.
        name = stream.name
        self._requests: dict[int, Any] = {}
        self._seconds = metrics.request_seconds.labels(name)
        self._received = metrics.received.labels(name)
        self._duplicates = metrics.duplicates.labels(name)
        self._intake_dead = metrics.dead_lettered.labels("intake")
        self._last_event = metrics.last_event.labels(name)
        self._refused = {reason: metrics.refused.labels(name, reason) for reason in REFUSAL_REASONS}
        self.inflight = 0
        """Requests being handled (a reload waits for those on a stream it changed before settling its events)."""
        self.idle = asyncio.Event()
        self.idle.set()
        self._retired: Callable[[str], None] | None = None
        """Called with the stream's name once a reload removed it and no request is in flight on it any more."""

    def _authorised(self, head: RequestHead) -> bool:
        if self.auth_header is None:
            return True
        given = head.header_bytes(self.auth_header)
        # Compare against every accepted value so the time taken does not say which one nearly matched.
        matches = [hmac.compare_digest(given, value) for value in self.auth_values]
        return any(matches)

    def admits(self, head: RequestHead) -> bool:
        """Whether the request's address and secret are accepted (what `_screen` decides, without its log line)."""
        return (
            self.policy.check(head.peer, head.forwarded())[1]
            and not (self.auth_header is None and _from_browser(head))
            and self._authorised(head)
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The stream endpoint, for aiohttp."""
        return web_response(await self.serve(WebHead(request)))

    async def serve(self, head: RequestHead) -> Answer:
        """One stream POST, from either front: screened, read, parsed, committed, counted."""
        started = time.monotonic()
        self.hold()
        try:
            try:
                answer = await self._handle(head)
            except Exception as exc:  # a bug must not become a 500: WorkOS retries a 503, and the event is kept
                self.state.refusals.log(
                    "unexpected error handling a request; answered 503",
                    stream=self.stream.name,
                    error=type(exc).__name__,
                    where=where_raised(exc),
                )
                answer = _refuse(
                    "internal_error", 503, "internal error; retry later", close=True, retry_after=RETRY_AFTER_BUSY
                )
            self._count(answer, started)  # while still in flight: a removed stream's series go after its count
        finally:
            self.release()
        return answer

    def hold(self) -> None:
        """Count a request as in flight on this intake (the stream front also counts one whose body is still
        arriving, before `serve`)."""
        self.inflight += 1
        self.idle.clear()

    def release(self) -> None:
        """The end of a request `hold` counted."""
        self.inflight -= 1
        if not self.inflight:
            self.idle.set()
            self._forget_if_retired()

    def retire(self, forget: Callable[[str], None]) -> None:
        """A reload removed the stream: `forget` its series once no request is in flight on it."""
        self._retired = forget
        if not self.inflight:
            self._forget_if_retired()

    def _forget_if_retired(self) -> None:
        forget, self._retired = self._retired, None
        if forget is not None:
            forget(self.stream.name)

    def _count(self, answer: Answer, started: float) -> None:
        if answer.refusal is not None:
            self._refused[answer.refusal].inc()
        counter = self._requests.get(answer.status)
        if counter is None:
            counter = self._requests[answer.status] = self.metrics.requests.labels(self.stream.name, answer.status)
        counter.inc()
        self._seconds.observe(time.monotonic() - started)

    def _screen(self, head: RequestHead) -> Answer | None:
        """The refusal of a request from an address not allowed or without the secret, else None."""
        if head.peer is None and head.gone:  # a client gone before its request was read: not an address refused
            return _gone(ClientDisconnected())
        client, allowed = self.policy.check(head.peer, head.forwarded())
        if not allowed:
            self.state.refusals.log(
                "request from an address not on the allowlist", stream=self.stream.name, client=str(client)
            )
            return _refuse("not_allowed", 403, "client address is not allowed", close=True)
        if self.auth_header is None and _from_browser(head):
            self.state.refusals.log(
                "request from a web browser (it has an Origin)", stream=self.stream.name, client=str(client)
            )
            return _refuse(
                "not_allowed", 403, "requests from a web browser (with an Origin) are not accepted", close=True
            )
        if not self._authorised(head):
            self.state.refusals.log("request without the stream's secret", stream=self.stream.name, client=str(client))
            return _refuse("unauthorised", 401, f"missing or wrong {self.auth_header} header", close=True)
        return None

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: the client is invited to send its body only once its address and secret
        are accepted and the body would be taken; otherwise it gets the refusal at once."""
        started = time.monotonic()
        head = WebHead(request)
        refusal = self._screen(head) or self._precheck(head)
        if refusal is not None:
            self._count(refusal, started)
            return web_response(refusal)
        if request.version < (1, 1):  # HTTP/1.0 has no 1xx answers: the expectation is ignored (RFC 9110 10.1.1)
            return None
        if request.headers.get("Expect", "").lower() != "100-continue":
            answer = _answer(417, "the only expectation understood is 100-continue")
            answer.close = True
            self._count(answer, started)
            return web_response(answer)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    def _precheck(self, head: RequestHead) -> Answer | None:
        """Refusals decided from the headers alone, before the body is read."""
        if self.state.draining:
            return _refuse("shutting_down", 503, "shutting down", retry_after=RETRY_AFTER_DOWN)
        if head.content_length is not None and head.content_length > self.max_body:
            return _refuse("too_large", 413, f"body is larger than max_body_bytes ({self.max_body} bytes)", close=True)
        if head.encoding not in ("identity", "", "gzip", "x-gzip", "zstd"):
            return _refuse("unsupported", 415, "unsupported Content-Encoding; use identity, gzip or zstd", close=True)
        if self.journal.over_cap:
            return _refuse(
                "journal_full",
                503,
                "journal is over its size cap; delivery is behind",
                retry_after=RETRY_AFTER_FULL,
            )
        if head.content_length == 0:
            return _refuse("bad_body", 400, "empty body: expected a JSON array or NDJSON")
        return None

    async def _handle(self, head: RequestHead) -> Answer:
        refusal = self._screen(head) or self._precheck(head)
        if refusal is not None:
            return refusal
        encoding = head.encoding
        # The body's bytes are reserved before it is read, so however many requests arrive at once, what they
        # hold together stays within server.max_inflight_bytes.
        reserved = self.max_body if head.content_length is None else head.content_length
        if not self.budget.take(reserved):
            return self._busy()
        try:
            received_at = time.time()
            try:
                body = await head.body(self.max_body, self.body_timeout)
                if encoding not in ("identity", ""):
                    # The decompressed body may be up to max_body_bytes while the compressed one is still held.
                    if not self.budget.take(self.max_body):
                        return self._busy()
                    reserved += self.max_body
                    decoded = await self._decode(body, encoding)
                    del body
                    self.budget.give(reserved - len(decoded))
                    reserved = len(decoded)
                else:
                    decoded = body
                if len(decoded) <= _INLINE_PARSE_BYTES:
                    parsed = parse_body(decoded, head.content_type, received_at, max_events=self.max_events)
                else:
                    parsed = await asyncio.to_thread(
                        partial(parse_body, max_events=self.max_events), decoded, head.content_type, received_at
                    )
            except ClientDisconnected as exc:
                return _gone(exc)
            except BodyError as exc:
                reason = {408: "timeout", 413: "too_large", 415: "unsupported"}.get(exc.status, "bad_body")
                return _refuse(reason, exc.status, exc.message, close=exc.status in (408, 413))
            return await self._commit(parsed, received_at)
        finally:
            self.budget.give(reserved)

    def _busy(self) -> Answer:
        self.state.refusals.log("too many body bytes in flight; answered 503", stream=self.stream.name)
        return _refuse(  # closed: the body is not read
            "overloaded",
            503,
            "too many requests in flight (server.max_inflight_bytes)",
            close=True,
            retry_after=RETRY_AFTER_BUSY,
        )

    async def _decode(self, body: bytes, encoding: str) -> bytes:
        if len(body) <= _INLINE_DECODE_BYTES:
            return decode_body(body, encoding, self.max_body)
        return await asyncio.to_thread(decode_body, body, encoding, self.max_body)

    async def _commit(self, parsed: Parsed, received_at: float) -> Answer:
        name = self.stream.name
        try:
            result = await self.journal.append(name, parsed, received_at, scope=self.stream.path)
        except JournalFull as exc:  # while the journal is full every request meets it: a few lines a second
            self.state.journal_errors.log("journal full: refusing a batch", stream=name, error=str(exc))
            return _refuse("journal_full", 503, str(exc), retry_after=RETRY_AFTER_FULL)
        except JournalClosed:
            return _refuse("shutting_down", 503, "shutting down", retry_after=RETRY_AFTER_DOWN)
        except JournalError as exc:
            self.state.journal_errors.log("journal write failed: refusing a batch", stream=name, error=str(exc))
            return _refuse(
                "journal_error", 503, "the journal cannot take writes right now", retry_after=RETRY_AFTER_DOWN
            )
        if result.accepted or result.duplicates:  # WorkOS is sending: what silence alerts watch
            self._last_event.set(received_at)
        self._received.inc(result.accepted)
        if result.duplicates:
            self._duplicates.inc(result.duplicates)
        if result.dead_lettered:
            self._intake_dead.inc(result.dead_lettered)
            # Any client with the secret can send one bad element a request: through the refusals' rate limit.
            self.state.refusals.log(
                "elements dead-lettered at intake",
                stream=name,
                elements=result.dead_lettered,
                reason=parsed.rejected[0].reason,
            )
        return Answer(
            200,
            b'{"accepted":%d,"duplicates":%d,"dead_lettered":%d}'
            % (result.accepted, result.duplicates, result.dead_lettered),
        )


class State:
    """What the endpoints share about the process."""

    def __init__(self) -> None:
        self.draining = False
        self.refusals = RateLimitedLog(log)
        """The one rate limit for lines a client can provoke (refusals, malformed requests, unexpected errors)."""
        self.journal_errors = RateLimitedLog(log, level=logging.ERROR)
        """The rate limit for the journal's refusals (full, failing), which every request meets while they last."""
        self.intakes: dict[str, Intake] = {}
        """The stream endpoints by path; replaced whole by a reload, so each request sees one configuration."""
        self.budget = InflightBudget(0)
        self._ready_at = 0.0
        self._ready = False

    def install(self, config: Config, journal: Journal, metrics: Metrics) -> dict[str, Intake]:
        """Serve `config`'s streams from now on (requests in flight finish with the intake they started with);
        returns the intakes replaced."""
        self.budget.limit = config.server.max_inflight_bytes
        replaced = self.intakes
        self.intakes = {
            stream.path: Intake(stream, config, journal, metrics, self, self.budget) for stream in config.streams
        }
        kept = {stream.name for stream in config.streams}
        for intake in replaced.values():
            if intake.stream.name not in kept:  # a removed stream is not "silent": it is gone, with its series
                intake.retire(lambda name: self._forget_stream(name, metrics))
        return replaced

    def _forget_stream(self, name: str, metrics: Metrics) -> None:
        if all(intake.stream.name != name for intake in self.intakes.values()):  # unless a reload brought it back
            metrics.forget_stream(name)


def build_app(config: Config, journal: Journal, metrics: Metrics, state: State) -> web.Application:
    """The aiohttp application (the journal must be open before it serves)."""
    app = web.Application(client_max_size=config.server.max_body_bytes + 1)
    state.install(config, journal, metrics)
    metrics.watch_inflight(lambda: state.budget.used)

    def unknown(request: web.Request) -> web.Response:
        # A sender with a wrong path (a typo in the WorkOS endpoint) is otherwise seen nowhere but in the silence.
        metrics.unrouted.inc()
        state.refusals.log("request to a path no stream is configured at; answered 404", path=request.path[:200])
        return web_response(NO_STREAM)

    async def post(request: web.Request) -> web.StreamResponse:
        intake = state.intakes.get(request.path)
        return unknown(request) if intake is None else await intake.handle(request)

    async def expect(request: web.Request) -> web.StreamResponse | None:
        intake = state.intakes.get(request.path)
        return unknown(request) if intake is None else await intake.expect(request)

    app.router.add_post("/{path:.*}", post, expect_handler=expect)
    app.router.add_routes(operations_routes(journal, metrics, state))
    return app


def build_admin_app(journal: Journal, metrics: Metrics, state: State) -> web.Application:
    """The admin listener's application: the operations routes and nothing else (any other path is a 404)."""
    app = web.Application()
    app.router.add_routes(operations_routes(journal, metrics, state))
    return app


def operations_routes(journal: Journal, metrics: Metrics, state: State) -> list[web.RouteDef]:
    """GET /healthz, /readyz and /metrics, the same on both listeners."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        problems = []
        if state.draining:
            problems.append("shutting down")
        if journal.over_cap:
            problems.append(f"journal over its cap ({journal.size_bytes} of {journal.max_bytes} bytes)")
        if not problems:
            now = time.monotonic()
            if now - state._ready_at > 1.0:  # one probe write a second at most, however many ask at once
                state._ready_at = now
                state._ready = await journal.probe()
            if journal.disk_full:  # the last write to fail lacked space: not ready until one proves room
                problems.append("the journal's disk is full")
            elif not state._ready:
                problems.append("journal is not writable")
        if problems:
            return web.json_response({"status": "unavailable", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_endpoint(_: web.Request) -> web.Response:
        return web.Response(
            body=await metrics.exposition.text(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics_endpoint)]

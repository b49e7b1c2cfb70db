"""The HTTP side: stream endpoints (allowlist, secret, body limits, parse, durable commit, answer), plus
`/healthz`, `/readyz` and `/metrics`."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from receiver.config import Config, StreamConfig
from receiver.errors import BodyError, JournalClosed, JournalError, JournalFull
from receiver.journal import Journal
from receiver.metrics import Metrics
from receiver.netaddr import AddressPolicy
from receiver.parsing import Parsed, decode_body, parse_body

log = logging.getLogger(__name__)

RETRY_AFTER_FULL = "30"
RETRY_AFTER_DOWN = "5"
_INLINE_PARSE_BYTES = 256 * 1024
"""Bodies up to this size are parsed on the event loop; larger ones in a thread, so the loop stays free."""


def _answer(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": message}),
        content_type="application/json",
        headers=headers or None,
    )


class Intake:
    """Accepts one stream's POSTs."""

    def __init__(self, stream: StreamConfig, config: Config, journal: Journal, metrics: Metrics, state: State) -> None:
        self.stream = stream
        self.journal = journal
        self.metrics = metrics
        self.state = state
        self.max_body = config.server.max_body_bytes
        self.body_timeout = config.server.body_timeout
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

    def _authorised(self, request: web.Request) -> bool:
        if self.auth_header is None:
            return True
        given = request.headers.get(self.auth_header, "").encode()
        # Compare against every accepted value so the time taken does not say which one nearly matched.
        matches = [hmac.compare_digest(given, value) for value in self.auth_values]
        return any(matches)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The stream endpoint."""
        started = time.monotonic()
        response = await self._handle(request)
        counter = self._requests.get(response.status)
        if counter is None:
            counter = self._requests[response.status] = self.metrics.requests.labels(self.stream.name, response.status)
        counter.inc()
        self._seconds.observe(time.monotonic() - started)
        return response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client, allowed = self.policy.check(peer[0] if peer else None, request.headers.getall("X-Forwarded-For", []))
        if not allowed:
            log.warning(
                "request from an address not on the allowlist",
                extra={"stream": self.stream.name, "client": str(client)},
            )
            response = _answer(403, "client address is not allowed")
            response.force_close()
            return response
        if not self._authorised(request):
            log.warning(
                "request without the stream's secret", extra={"stream": self.stream.name, "client": str(client)}
            )
            response = _answer(401, f"missing or wrong {self.auth_header} header")
            response.force_close()
            return response
        if self.state.draining:
            return _answer(503, "shutting down", **{"Retry-After": RETRY_AFTER_DOWN})
        if request.content_length is not None and request.content_length > self.max_body:
            response = _answer(413, f"body is larger than max_body_bytes ({self.max_body} bytes)")
            response.force_close()
            return response
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "", "gzip", "x-gzip", "zstd"):
            response = _answer(415, "unsupported Content-Encoding; use identity, gzip or zstd")
            response.force_close()
            return response
        if self.journal.over_cap:
            return _answer(503, "journal is over its size cap; delivery is behind", **{"Retry-After": RETRY_AFTER_FULL})
        received_at = time.time()
        try:
            body = await self._read_body(request)
            decoded = decode_body(body, encoding, self.max_body)
            if len(decoded) <= _INLINE_PARSE_BYTES:
                parsed = parse_body(decoded, request.content_type, received_at)
            else:
                parsed = await asyncio.to_thread(parse_body, decoded, request.content_type, received_at)
        except BodyError as exc:
            response = _answer(exc.status, exc.message)
            if exc.status in (408, 413):
                response.force_close()
            return response
        return await self._commit(parsed, received_at)

    async def _read_body(self, request: web.Request) -> bytes:
        chunks = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                if request.content_length is not None:  # already checked against the limit
                    return await request.content.readexactly(request.content_length)
                async for chunk in request.content.iter_any():
                    chunks += chunk
                    if len(chunks) > self.max_body:
                        raise BodyError(413, f"body is larger than max_body_bytes ({self.max_body} bytes)")
        except TimeoutError:
            raise BodyError(408, "timed out reading the request body") from None
        except asyncio.IncompleteReadError:
            raise BodyError(400, "the body is shorter than its Content-Length") from None
        return bytes(chunks)

    async def _commit(self, parsed: Parsed, received_at: float) -> web.Response:
        name = self.stream.name
        try:
            result = await self.journal.append(name, parsed, received_at)
        except JournalFull as exc:
            log.error("journal full: refusing a batch", extra={"stream": name, "error": str(exc)})
            return _answer(503, str(exc), **{"Retry-After": RETRY_AFTER_FULL})
        except JournalClosed:
            return _answer(503, "shutting down", **{"Retry-After": RETRY_AFTER_DOWN})
        except JournalError as exc:
            log.error("journal write failed: refusing a batch", extra={"stream": name, "error": str(exc)})
            return _answer(503, "the journal cannot take writes right now", **{"Retry-After": RETRY_AFTER_DOWN})
        self._received.inc(result.accepted)
        if result.duplicates:
            self._duplicates.inc(result.duplicates)
        if result.dead_lettered:
            self._intake_dead.inc(result.dead_lettered)
            log.warning(
                "elements dead-lettered at intake",
                extra={"stream": name, "elements": result.dead_lettered, "reason": parsed.rejected[0].reason},
            )
        return web.Response(
            body=orjson.dumps(
                {"accepted": result.accepted, "duplicates": result.duplicates, "dead_lettered": result.dead_lettered}
            ),
            content_type="application/json",
        )


class State:
    """What the endpoints share about the process."""

    def __init__(self) -> None:
        self.draining = False
        self._ready_at = 0.0
        self._ready = False


def build_app(config: Config, journal: Journal, metrics: Metrics, state: State) -> web.Application:
    """The aiohttp application (the journal must be open before it serves)."""
    app = web.Application(client_max_size=config.server.max_body_bytes + 1)
    for stream in config.streams:
        intake = Intake(stream, config, journal, metrics, state)
        app.router.add_post(stream.path, intake.handle)

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
            if now - state._ready_at > 1.0:  # one probe write a second at most
                state._ready = await journal.probe()
                state._ready_at = now
            if not state._ready:
                problems.append("journal is not writable")
        if problems:
            return web.json_response({"status": "unavailable", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics_endpoint(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app

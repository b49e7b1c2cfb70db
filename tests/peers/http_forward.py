"""A local HTTP collector for the `http` sink (aiohttp on loopback) and the compliance `Harness`.

The collector reads JSON arrays or NDJSON (gzip; aiohttp's server refuses zstd itself), checks a bearer token,
stores the elements' bytes, and can be told to answer 503 (retry), 422 (permanent) or 400 to any request holding
a REJECT_ACTION event (so the sink must bisect). It can echo the request's headers in an error body, to prove
the sink scrubs them.
"""

from __future__ import annotations

import gzip
from typing import Any

import msgspec
import orjson
from aiohttp import web

from sinks.base import Sink
from sinks.http_forward import HttpForwardConfig, HttpForwardSink
from sinks.testing.compliance import REJECT_ACTION, Mode
from sinks.testing.exact import loads

TOKEN = "Bearer collector-secret-0123456789"


class Collector:
    """An HTTP collector on 127.0.0.1."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.mode: Mode = "ok"
        self.status: int | None = None
        """Answer every request with this status (and the request's headers as the body), when set."""
        self.answer_bytes = 0
        """With `status`: answer with a body of this many bytes instead (a peer that answers at length)."""
        self.answer_sent = 0
        """Bytes of such answers the collector got written before the sink hung up."""
        self.quote_credential = False
        """Name the refused credential (without its scheme) in the 401 answer, as some APIs do."""
        self.redirect: tuple[int, str] | None = None
        """Answer every request with this redirect (status, Location), as a proxy sending clients to sign in."""
        self.stored: list[bytes] = []
        self.requests: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        """Listen on a free port."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/ingest", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/ingest"

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer_at_length(self, request: web.Request, status: int, size: int) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=status)
        response.content_length = size
        await response.prepare(request)
        chunk = b"x" * (1 << 20)
        try:
            while self.answer_sent < size:
                part = chunk[: size - self.answer_sent]
                await response.write(part)
                self.answer_sent += len(part)
        except ConnectionError:  # the sink hung up: it had read enough
            pass
        return response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        if self.redirect is not None:
            await request.read()
            return web.Response(status=self.redirect[0], headers={"Location": self.redirect[1]})
        if request.method == "HEAD":
            return web.Response(status=405)
        if self.status is not None and self.answer_bytes:
            return await self._answer_at_length(request, self.status, self.answer_bytes)
        if self.status is not None:
            return web.Response(status=self.status, body=orjson.dumps({str(k): v for k, v in request.headers.items()}))
        if request.headers.get("Authorization") != self.token:
            presented = request.headers.get("Authorization", "").split(" ", 1)[-1]
            return web.Response(status=401, text=f"bad token {presented}" if self.quote_credential else "bad token")
        body = await request.read()  # aiohttp may have undone the Content-Encoding already: look at the bytes
        encoding = request.headers.get("Content-Encoding")
        if encoding == "gzip" and body.startswith(b"\x1f\x8b"):
            body = gzip.decompress(body)
        if request.headers.get("Content-Type") == "application/x-ndjson":
            elements = [line for line in body.split(b"\n") if line]
        else:
            elements = [bytes(raw) for raw in msgspec.json.decode(body, type=list[msgspec.Raw])]
        if self.mode == "retry":
            return web.Response(status=503, headers={"Retry-After": "1"}, text="busy")
        if self.mode == "permanent":
            return web.Response(status=422, text="unprocessable")
        if self.mode == "partial" and any(REJECT_ACTION.encode() in element for element in elements):
            return web.Response(status=400, text="an element is invalid")
        self.stored.extend(elements)
        return web.json_response({"accepted": len(elements)})


class Harness:
    """The http sink against the local collector; every failure mode is supported."""

    supports = frozenset({"retry", "permanent", "partial"})

    def __init__(self) -> None:
        self.collector = Collector()

    async def start(self) -> None:
        """Start the collector."""
        await self.collector.start()

    async def stop(self) -> None:
        """Stop the collector."""
        await self.collector.stop()

    def build(self) -> Sink:
        """An http sink pointed at the collector."""
        config = HttpForwardConfig.model_validate(
            {"url": self.collector.url, "headers": {"Authorization": TOKEN}, "compression": "gzip"}
        )
        return HttpForwardSink("forward", config)

    def set_mode(self, mode: Mode) -> None:
        """How the collector answers from now on."""
        self.collector.mode = mode

    async def received(self) -> list[dict[str, Any]]:
        """The bare events stored."""
        return [loads(element)["event"] for element in self.collector.stored]

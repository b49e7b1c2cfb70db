"""A local stand-in for the Datadog logs intake, and the compliance `Harness` of the Datadog sink.

`DatadogIntake` is an aiohttp server on loopback that behaves like `http-intake.logs.<site>` for what the
sink uses: `POST /api/v2/logs` (the `DD-API-KEY` header, gzip bodies, at most 1000 items and 5 MB
uncompressed per request, else 413; 202 when accepted) and `GET /api/v1/validate`. It reads any strict JSON
(numbers of any size) and keeps every item's `message` as the text that arrived. It can be told to fail:
answer a status for the next N requests, refuse every key, or answer 400 to any request holding an item whose
message contains a marker. Like Datadog, it accepts items over 1 MB and truncates them (counted in
`truncated`).

Run one by hand with `python -m tests.peers.datadog --port 9999 --api-key K`, then point a sink at it with
`endpoint: http://127.0.0.1:9999`.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import SecretStr

from sinks.base import Sink
from sinks.testing.compliance import REJECT_ACTION, Mode
from sinks.testing.exact import loads

__all__ = ["MAX_ITEMS", "MAX_ITEM_BYTES", "MAX_PAYLOAD_BYTES", "DatadogIntake", "Harness", "IntakeRequest", "main"]

MAX_ITEMS = 1000
"""Items per request the intake accepts."""
MAX_PAYLOAD_BYTES = 5_000_000
"""Uncompressed bytes per request the intake accepts."""
MAX_ITEM_BYTES = 1_000_000
"""Bytes of one log above which the intake truncates it (and still answers 2xx)."""

LOGS_PATH = "/api/v2/logs"
VALIDATE_PATH = "/api/v1/validate"
STATS_PATH = "/_intake/stats"


@dataclass(frozen=True, slots=True)
class IntakeRequest:
    """One request the intake answered."""

    status: int
    items: int
    body_bytes: int
    """Uncompressed size of the body."""
    gzip: bool


class DatadogIntake:
    """The fake intake. `start()` binds 127.0.0.1 (port 0 picks a free one); `url` is the base to configure."""

    def __init__(
        self,
        api_key: str = "test-api-key",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        store: bool = True,
        require_gzip: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.api_key = api_key
        self.ssl_context = ssl_context
        """Serve HTTPS with this server context (plain HTTP when None)."""
        self.host = host
        self.port = port
        self.store = store
        """Keep every accepted item (tests); off for benchmarks, which only need the counts."""
        self.require_gzip = require_gzip
        """Answer 400 to a logs request that is not gzip-compressed."""
        self.logs: list[dict[str, Any]] = []
        """Every accepted item, as sent (message truncated when over 1 MB)."""
        self.requests: list[IntakeRequest] = []
        self.accepted = 0
        """Items accepted so far (also counted when `store` is off)."""
        self.truncated = 0
        """Items over 1 MB that were accepted truncated, as Datadog does."""
        self.validations = 0
        self.reject_marker: str | None = None
        """When set, a logs request holding an item whose message contains it is answered 400."""
        self.refuse_keys = False
        """When set, every API key is refused (403), as for a revoked key."""
        self.fail_status = 503
        self.fail_retry_after: float | None = None
        self.fail_text: str | None = None
        """The error text of injected failures (an intake, or a proxy in front of it, may quote the request)."""
        self._fail_remaining = 0
        self._fail_after = 0
        self._runner: web.AppRunner | None = None

    # --- control ---------------------------------------------------------------------------------

    def fail_next(
        self,
        count: int,
        status: int = 503,
        *,
        after: int = 0,
        retry_after: float | None = None,
        text: str | None = None,
    ) -> None:
        """Answer `status` to `count` logs requests (count < 0: until told otherwise), once `after` more
        requests have been answered normally; with a `Retry-After` header when `retry_after` is given, and
        `text` as the error when given."""
        self._fail_remaining = count
        self._fail_after = after
        self.fail_status = status
        self.fail_retry_after = retry_after
        self.fail_text = text

    def reset(self) -> None:
        """Forget what was received and every failure instruction."""
        self.logs.clear()
        self.requests.clear()
        self.accepted = self.truncated = self.validations = 0
        self.reject_marker = None
        self.refuse_keys = False
        self.fail_next(0)

    def messages(self) -> list[Any]:
        """The accepted items' messages parsed as JSON (the bare WorkOS events, for the Datadog sink); for
        looking at: compare `logs[i]["message"]`, the text as it arrived, to check values exactly."""
        return [loads(item["message"]) for item in self.logs]

    @property
    def url(self) -> str:
        """Base URL of the intake, e.g. `http://127.0.0.1:41234` (`https://` when serving TLS)."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application (routes only; `start` serves it)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(LOGS_PATH, self._logs)
        app.router.add_get(VALIDATE_PATH, self._validate)
        app.router.add_get(STATS_PATH, self._stats)
        return app

    async def start(self) -> None:
        """Serve on `host:port`; with port 0 the chosen port is stored in `port`."""
        # The intake checks gzip itself, so aiohttp must hand over the body as sent.
        runner = web.AppRunner(self.app(), access_log=None, auto_decompress=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving; safe to call twice."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # --- handlers --------------------------------------------------------------------------------

    def _key_ok(self, request: web.Request) -> bool:
        return not self.refuse_keys and request.headers.get("DD-API-KEY") == self.api_key

    async def _validate(self, request: web.Request) -> web.Response:
        self.validations += 1
        if not self._key_ok(request):
            return web.json_response({"errors": ["Forbidden"]}, status=403)
        return web.json_response({"valid": True})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"accepted": self.accepted, "requests": len(self.requests), "truncated": self.truncated}
        )

    async def _logs(self, request: web.Request) -> web.Response:
        raw = await request.read()
        gzipped = request.headers.get("Content-Encoding", "").lower() == "gzip"
        status, items, size, errors = self._judge(request, raw, gzipped)
        self.requests.append(IntakeRequest(status, items, size, gzipped))
        if status != 202:
            headers = {}
            if status == self.fail_status and self.fail_retry_after is not None:
                headers["Retry-After"] = f"{self.fail_retry_after:g}"
            return web.json_response({"errors": errors}, status=status, headers=headers)
        return web.json_response({}, status=202)

    def _judge(self, request: web.Request, raw: bytes, gzipped: bool) -> tuple[int, int, int, list[str]]:
        """Status, item count, uncompressed size and error texts for one logs request; stores what it accepts."""
        if request.headers.get("DD-API-KEY") is None:
            return 401, 0, 0, ["Unauthorized"]
        if not self._key_ok(request):
            return 403, 0, 0, ["Forbidden"]
        if self._fail_remaining != 0 and self._fail_after > 0:
            self._fail_after -= 1
        elif self._fail_remaining != 0:
            self._fail_remaining -= 1 if self._fail_remaining > 0 else 0
            text = self.fail_text or ("Service Unavailable" if self.fail_status == 503 else "Injected failure")
            return self.fail_status, 0, 0, [text]
        if gzipped:
            try:
                body = _gunzip(raw, MAX_PAYLOAD_BYTES + 1)
            except zlib.error:
                return 400, 0, 0, ["Bad Request: body is not valid gzip"]
        elif self.require_gzip:
            return 400, 0, len(raw), ["Bad Request: expected Content-Encoding: gzip"]
        else:
            body = raw
        if len(body) > MAX_PAYLOAD_BYTES:
            return 413, 0, len(body), ["Payload too large: over 5 MB uncompressed"]
        try:
            parsed = loads(body)
        except ValueError:
            return 400, 0, len(body), ["Bad Request: body is not JSON"]
        items = parsed if isinstance(parsed, list) else [parsed]
        if len(items) > MAX_ITEMS:
            return 413, len(items), len(body), [f"Payload too large: {len(items)} items, at most {MAX_ITEMS}"]
        for item in items:
            if not isinstance(item, dict):
                return 400, len(items), len(body), ["Bad Request: every log must be a JSON object"]
            message = item.get("message")
            if self.reject_marker is not None and isinstance(message, str) and self.reject_marker in message:
                return 400, len(items), len(body), ["Bad Request: rejected log"]
        for item in items if len(body) > MAX_ITEM_BYTES else ():
            message = item.get("message")
            if isinstance(message, str) and len(message.encode()) > MAX_ITEM_BYTES:
                self.truncated += 1
                item["message"] = message[: MAX_ITEM_BYTES // 2]
        self.accepted += len(items)
        if self.store:
            self.logs.extend(items)
        return 202, len(items), len(body), []


def _gunzip(data: bytes, limit: int) -> bytes:
    """Inflate a gzip body, stopping a little past `limit` bytes (the caller answers 413 then)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = inflater.decompress(data, limit)
    if not inflater.eof and len(out) < limit:
        raise zlib.error("truncated gzip stream")
    return out


# --- the compliance harness ----------------------------------------------------------------------


class Harness:
    """The Datadog sink wired to a `DatadogIntake` (sinks.testing.compliance's `Harness` protocol)."""

    supports = frozenset({"retry", "permanent", "partial"})

    def __init__(self, *, api_key: str = "compliance-key", **sink_options: Any) -> None:
        self.intake = DatadogIntake(api_key)
        self._sink_options = sink_options

    async def start(self) -> None:
        """Start the intake on a free loopback port."""
        await self.intake.start()

    async def stop(self) -> None:
        """Stop the intake."""
        await self.intake.stop()

    def build(self) -> Sink:
        """A Datadog sink sending to the intake."""
        from sinks.datadog import DatadogSink

        config = DatadogSink.Config(
            api_key=SecretStr(self.intake.api_key), endpoint=self.intake.url, **self._sink_options
        )
        return DatadogSink("datadog", config)

    def set_mode(self, mode: Mode) -> None:
        """ok: 202; retry: 503 until told otherwise; permanent: 400 for everything; partial: 400 for any
        request holding an event whose action is REJECT_ACTION."""
        self.intake.fail_next(0)
        self.intake.reject_marker = None
        if mode == "retry":
            self.intake.fail_next(-1, 503)
        elif mode == "permanent":
            self.intake.fail_next(-1, 400)
        elif mode == "partial":
            self.intake.reject_marker = f'"action":"{REJECT_ACTION}"'

    async def received(self) -> list[dict[str, Any]]:
        """The bare WorkOS events the intake accepted."""
        return self.intake.messages()


# --- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tests.peers.datadog --port 9999 --api-key K`: serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m tests.peers.datadog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9999, help="port (0 picks a free one; default 9999)")
    parser.add_argument("--api-key", default="test-api-key", help="the only DD-API-KEY accepted")
    parser.add_argument("--fail-first", type=int, default=0, metavar="N", help="answer --fail-status to N requests")
    parser.add_argument("--fail-status", type=int, default=503, help="status for --fail-first (default 503)")
    parser.add_argument("--reject-marker", help="answer 400 to requests holding a message containing this text")
    parser.add_argument("--require-gzip", action="store_true", help="answer 400 to uncompressed logs requests")
    parser.add_argument("--no-store", action="store_true", help="only count accepted logs (for benchmarks)")
    args = parser.parse_args(argv)
    intake = DatadogIntake(
        args.api_key, host=args.host, port=args.port, store=not args.no_store, require_gzip=args.require_gzip
    )
    intake.fail_next(args.fail_first, args.fail_status)
    intake.reject_marker = args.reject_marker

    async def serve() -> None:
        await intake.start()
        print(f"Datadog intake listening on {intake.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await intake.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

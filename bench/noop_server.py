"""The baselines of the intake benchmark: an aiohttp handler that reads the body, parses it and answers 200
with a small JSON, nothing else (no journal, no fsync, no sink).

`--parser orjson` (the default) builds the whole document with `orjson.loads`; `--parser msgspec` only splits
the array into raw elements with `msgspec.json.Decoder(list[msgspec.Raw])`, the least any receiver that keeps
elements apart must do (the stricter ceiling).

`--front bare` serves the same handler without aiohttp's web framework: a bare `asyncio.Protocol` that feeds
aiohttp's C request parser and writes a fixed response head (keep-alive only; no routing, no request or
response objects, no middleware, no timeouts). It measures what the framework itself costs per request, which
every receiver built on `aiohttp.web` pays; it is a yardstick, not a server to deploy.

Run as its own process: `python -m bench.noop_server --port 0 [--parser msgspec] [--front bare]`; it prints
`listening on http://HOST:PORT` once bound, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

import msgspec
import orjson
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser

PARSERS = ("orjson", "msgspec")
FRONTS = ("aiohttp", "bare")
_split = msgspec.json.Decoder(list[msgspec.Raw]).decode
_COUNTERS: dict[str, Callable[[bytes], int]] = {
    "orjson": lambda body: len(parsed) if isinstance(parsed := orjson.loads(body), list) else 1,
    "msgspec": lambda body: len(_split(body)),
}


def _answer(count: int) -> web.Response:
    return web.Response(
        body=orjson.dumps({"accepted": count, "duplicates": 0, "dead_lettered": 0}),
        content_type="application/json",
    )


async def _handle_orjson(request: web.Request) -> web.Response:
    parsed = orjson.loads(await request.read())
    return _answer(len(parsed) if isinstance(parsed, list) else 1)


async def _handle_msgspec(request: web.Request) -> web.Response:
    return _answer(len(_split(await request.read())))


HANDLERS: dict[str, Callable[[web.Request], Awaitable[web.Response]]] = {
    "orjson": _handle_orjson,
    "msgspec": _handle_msgspec,
}


class _Bare(BaseProtocol):
    """The no-op without the web framework: parse with aiohttp's C parser, count the elements, answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: Callable[[bytes], int]) -> None:
        super().__init__(loop)
        self._count = count
        self._parser = HttpRequestParser(self, loop, 2**16, auto_decompress=False)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            messages, _, _ = self._parser.feed_data(data)
        except HttpProcessingError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()
            return
        for message, payload in messages:
            status = b"200 OK"
            if message.method == "GET":
                body = b'{"status":"ok"}'
            else:
                # Loopback bodies of a few dozen KiB arrive with their headers; a body still on its way is
                # beyond what this yardstick measures.
                try:
                    count = self._count(payload.read_nowait())
                except (ValueError, msgspec.DecodeError):
                    status, count = b"400 Bad Request", 0
                body = orjson.dumps({"accepted": count, "duplicates": 0, "dead_lettered": 0})
            self.transport.write(
                b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (status, len(body), body)
            )
            if message.should_close:
                self.transport.close()


async def _serve_bare(host: str, port: int, parser: str) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Bare(loop, _COUNTERS[parser]), host, port)
    return server, server.sockets[0].getsockname()[1]


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def serve(host: str, port: int, parser: str = "orjson", front: str = "aiohttp") -> None:
    """Serve until a signal; the same runner settings as the receiver (no access log, no auto-decompress)."""
    if front == "bare":
        bare, bound = await _serve_bare(host, port, parser)
        print(f"listening on http://{host}:{bound}", flush=True)
        await _until_signal()
        bare.close()
        return
    app = web.Application(client_max_size=10 * 1024 * 1024 + 1)
    app.router.add_post("/{tail:.*}", HANDLERS[parser])
    app.router.add_get("/healthz", _healthz)
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on http://{host}:{bound}", flush=True)
    try:
        await _until_signal()
    finally:
        await runner.cleanup()


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description="No-op aiohttp handler: read and parse the body, answer 200.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--parser", choices=PARSERS, default="orjson")
    parser.add_argument("--front", choices=FRONTS, default="aiohttp")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.parser, args.front))


if __name__ == "__main__":
    main()

"""The baselines of the intake benchmark: an aiohttp handler that reads the body, parses it and answers 200
with a small JSON, nothing else (no journal, no fsync, no sink).

`--parser orjson` (the default) builds the whole document with `orjson.loads`; `--parser msgspec` only splits
the array into raw elements with `msgspec.json.Decoder(list[msgspec.Raw])`, the least any receiver that keeps
elements apart must do (the stricter ceiling).

Run as its own process: `python -m bench.noop_server --port 0 [--parser msgspec]`; it prints
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

PARSERS = ("orjson", "msgspec")
_split = msgspec.json.Decoder(list[msgspec.Raw]).decode


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


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def serve(host: str, port: int, parser: str = "orjson") -> None:
    """Serve until a signal; the same runner settings as the receiver (no access log, no auto-decompress)."""
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description="No-op aiohttp handler: read and parse the body, answer 200.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--parser", choices=PARSERS, default="orjson")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.parser))


if __name__ == "__main__":
    main()

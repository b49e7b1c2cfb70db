"""Running the service: journal, sinks, delivery engine and HTTP listener, started and stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Mapping

from aiohttp import web

from receiver.app import State, build_app
from receiver.config import Config, TLSConfig
from receiver.delivery import DeliveryEngine, build_sinks
from receiver.errors import ConfigError
from receiver.journal import Journal
from receiver.metrics import Metrics
from sinks.base import Sink

log = logging.getLogger(__name__)

DEDUP_PRUNE_INTERVAL = 60.0


def server_tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS 1.2 or newer; with `client_ca_file`, clients must present a certificate that CA signed (mTLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
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
    return context


class Service:
    """One running log-bridge."""

    def __init__(self, config: Config, sinks: Mapping[str, Sink] | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.state = State()
        self.journal = Journal(
            config.journal.path,
            max_bytes=config.journal.max_bytes,
            dedup_window=config.journal.dedup_window,
            dedup_max_keys=config.journal.dedup_max_keys,
        )
        self.sinks = dict(sinks) if sinks is not None else build_sinks(config)
        self.engine: DeliveryEngine | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._housekeeping: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with `port: 0`)."""
        server = self._site._server if self._site is not None else None
        if not isinstance(server, asyncio.Server):
            raise RuntimeError("the service is not listening")
        return int(server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL of the listener."""
        scheme = "https" if self.config.server.tls else "http"
        host = self.config.server.host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        """Open the journal, start delivery, then listen; on a failure, undo what was started."""
        server = self.config.server
        context = server_tls_context(server.tls) if server.tls else None
        await self.journal.open()
        try:
            await self._start(context)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, context: ssl.SSLContext | None) -> None:
        server = self.config.server
        self.metrics.watch_journal(lambda: self.journal.size_bytes, lambda: 1.0 if self.journal.over_cap else 0.0)
        self.engine = DeliveryEngine(self.config, self.journal, self.metrics, self.sinks)
        await self.engine.start()
        self._housekeeping = asyncio.create_task(self._prune_dedup_forever(), name="dedup-prune")
        app = build_app(self.config, self.journal, self.metrics, self.state)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            auto_decompress=False,  # the intake decompresses itself, with its own size limit
            keepalive_timeout=server.header_timeout,  # also closes a connection whose headers do not arrive
            shutdown_timeout=server.shutdown_timeout,
            lingering_time=2.0,  # after an early answer, read at most this long what the client still sends
        )
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, server.host, server.port, ssl_context=context)
        await self._site.start()
        log.info("listening", extra={"url": self.url, "streams": [s.path for s in self.config.streams]})
        for stream in self.config.streams:
            if stream.auth is None:
                log.warning("stream accepts requests without a secret header", extra={"stream": stream.name})

    async def _prune_dedup_forever(self) -> None:
        while True:
            try:
                await self.journal.prune_dedup()
            except Exception:
                log.exception("pruning dedup keys failed")
            await asyncio.sleep(DEDUP_PRUNE_INTERVAL)

    async def stop(self) -> bool:
        """Refuse new batches (503), finish requests in flight, let sinks drain up to the deadline, close.
        Returns whether every sink drained; what did not stays in the journal for the next start."""
        self.state.draining = True
        if self._runner is not None:
            await self._runner.cleanup()
        drained = True
        if self.engine is not None:
            drained = await self.engine.stop(self.config.server.shutdown_timeout)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        await self.journal.close()
        log.info("stopped", extra={"drained": drained})
        return drained


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT, then stop cleanly. Returns the exit status."""
    service = Service(config)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping: refusing new batches, draining sinks")
    await service.stop()
    return 0

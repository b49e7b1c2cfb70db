"""The shared dedup store: a Redis that every replica asks, so a WorkOS retry landing on another replica is still
answered as a duplicate.

The journal stays the authority: a request's keys are looked up here before its batch is written, and marked
here only after the batch committed locally (`Journal.append`). A failure in between leaves a key unmarked, which
can cause a duplicate on another replica, never a loss. When Redis does not answer within `timeout` (or refuses
the marks: out of memory, a read-only replica), the request is deduplicated by the local index alone; the
failure is counted, logged once per outage (which only a mark that lands ends, after refused marks), and the next
tries are spaced out (`RETRY_INTERVAL`) so a dead store costs at most one timeout now and then, not one per
request.

Keys are `key_prefix` + the stream's path + a 128-bit BLAKE2b digest of the keySuffix: a fixed size in Redis
whatever the client sent, and nothing of the event in the store. Each expires with the dedup window (TTL).

The client is redis-py's asyncio one, on the event loop: the journal's writer thread serves every request's
commit, and a network round trip there would hold all of them up whenever Redis is slow.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from receiver.config import DedupStoreConfig
from receiver.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

RETRY_INTERVAL = 1.0
"""Seconds between tries while the store is down (requests in between use local dedup without waiting)."""

MAX_CONNECTIONS = 32
"""Connections to Redis one process opens at most."""

ROUND_KEYS = 1000
"""Keys in one round trip: a request's keys (up to `max_events_per_request`) are looked up and marked in rounds of
this many, each within `timeout`, with the event loop free in between (redis-py packs a round's commands at once:
about 8 ms for an MGET of 1000 keys, 30 ms for 1000 SETs, so that 100,000 keys in one round held the loop for 0.4 s
and 1 s and never fitted in the default timeout; in rounds they take about 1.2 s and 3.2 s on loopback, the loop
late by 30 ms at the 99th percentile)."""

PROBE_TTL_MS = 10_000
"""How long the key a probe writes (`<key_prefix>probe`, beside no dedup key: their stream paths start with `/`)
lives: a probe writes, since a Redis out of memory or a read-only replica answers a PING but takes no mark."""

INSTALL_HINT = "the redis dedup store needs the `redis` package: pip install 'log-bridge[redis]'"


def display_url(url: str) -> str:
    """The URL without its credentials, for logs and `check`."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisDedupStore:
    """Keys seen by any replica, in Redis, with the window as their TTL."""

    def __init__(self, config: DedupStoreConfig, window: float, on_error: Callable[[], object] = lambda: None) -> None:
        try:
            from redis.asyncio import BlockingConnectionPool, Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:
            raise ConfigError([f"journal.dedup_store.type: {INSTALL_HINT}"]) from None
        url = config.url_text()  # required with type redis by the config model
        self.where = display_url(url)
        self.prefix = config.key_prefix
        self.timeout = config.timeout
        self.ttl_ms = max(1, math.ceil(window * 1000))
        self.on_error = on_error
        options: dict[str, Any] = {
            "socket_timeout": config.timeout,
            "socket_connect_timeout": config.timeout,
            "retry": Retry(NoBackoff(), 0),  # the timeout bounds the whole call, so no retry inside it
        }
        if config.password is not None:
            options["password"] = config.password.get_secret_value()
        if url.startswith("rediss://"):
            options["ssl_check_hostname"] = True
            if config.ca_file is not None:
                config.load_ca_file()  # read now, so a wrong file fails the start instead of every connection
                options["ssl_ca_certs"] = str(config.ca_file)
        # At most MAX_CONNECTIONS connections however many requests run at once; a request that cannot get one in
        # `timeout` is deduplicated locally, like any other slow answer.
        pool = BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=config.timeout, **options)
        self._client: Redis = Redis.from_pool(pool)
        self.down = False
        self._writes_refused = False
        """Whether the outage is the store refusing writes while it answers reads (out of memory under
        `noeviction`, a read-only replica after a failover): only a write that lands ends it."""
        self._retry_at = 0.0
        self.errors = 0

    def _key(self, stream: str, key: str) -> str:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return f"{self.prefix}{stream}:{digest}"

    async def seen(self, stream: str, keys: Sequence[str | None]) -> frozenset[str]:
        """The keys another replica (or this one) marked within the window, one MGET per ROUND_KEYS keys; those
        found before the store stopped answering (none when it is down)."""
        wanted = list(dict.fromkeys(key for key in keys if key is not None))
        found: list[str] = []
        for start in range(0, len(wanted), ROUND_KEYS):
            if not self._may_try():
                break
            part = wanted[start : start + ROUND_KEYS]
            values = await self._call(self._client.mget([self._key(stream, key) for key in part]))
            if values is None:
                break
            found.extend(key for key, value in zip(part, values, strict=True) if value is not None)
        return frozenset(found)

    async def mark(self, stream: str, keys: Sequence[str]) -> bool:
        """Mark keys of a committed batch as seen, one pipelined round trip per ROUND_KEYS keys; whether the
        store took them all."""
        if not keys:
            return False
        for start in range(0, len(keys), ROUND_KEYS):
            if not self._may_try():
                return False
            pipe = self._client.pipeline(transaction=False)
            for key in keys[start : start + ROUND_KEYS]:
                pipe.set(self._key(stream, key), b"1", px=self.ttl_ms)
            if await self._call(pipe.execute(), writes=True) is None:
                return False
        return True

    async def ping(self) -> str | None:
        """None when the store takes a write, else why not (for `check`)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._write_probe()
        except Exception as exc:
            return _reason(exc, self.timeout)
        return None

    async def probe(self) -> bool:
        """Whether the store takes a write (start-up; a failure counts and logs like any other)."""
        return await self._call(self._write_probe(), writes=True) is not None

    async def _write_probe(self) -> object:
        return await self._client.set(f"{self.prefix}probe", b"1", px=PROBE_TTL_MS)

    async def close(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    def _may_try(self) -> bool:
        return not self.down or time.monotonic() >= self._retry_at

    async def _call(self, operation: Any, writes: bool = False) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                result = await operation
        except Exception as exc:  # any failure of the store only costs deduplication, never the request
            self.errors += 1
            self._writes_refused = writes
            self.on_error()
            self._retry_at = time.monotonic() + RETRY_INTERVAL
            if not self.down:
                self.down = True
                log.warning(
                    "dedup store unavailable: deduplicating locally only until it answers",
                    extra={"store": self.where, "error": _reason(exc, self.timeout)},
                )
            return None
        if self.down and (writes or not self._writes_refused):  # a read does not prove that writes land again
            self.down = False
            log.info("dedup store answers again: deduplication is shared again", extra={"store": self.where})
        return result


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    # redis-py's messages name the host and port, never the password; the type says what kind of failure.
    return f"{type(exc).__name__}: {exc}"[:300]

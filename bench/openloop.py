"""An open-loop load generator: requests are due at a fixed rate (request i at start + i / rate) whatever the
server does, and each one's latency runs from the moment it was due, not from when it was sent, so a server
that stalls is charged for the requests that queue behind the stall (no coordinated omission, as in wrk2).

Plain asyncio protocols over a pool of keep-alive HTTP/1.1 connections, one request in flight on each; a
request due while every connection is busy waits for one, and that wait counts in its latency. The generator
reports how late it dispatched requests (its own lag), so a run where the generator, not the server, fell
behind is visible.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_CRLF2 = b"\r\n\r\n"


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `request` sends one request and waits for its whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._need = -1
        self._status = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._need < 0:
            end = self._buffer.find(_CRLF2)
            if end < 0:
                return
            head = bytes(self._buffer[:end]).lower()
            self._status = int(head[9:12])
            start = head.find(b"content-length:")
            length = int(head[start + 15 : head.find(b"\r\n", start)]) if start >= 0 else 0
            self._need = end + 4 + length
        if len(self._buffer) >= self._need:
            del self._buffer[: self._need]
            self._need = -1
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(self._status)

    async def request(self, data: bytes) -> int:
        """Send one request; its status."""
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self._waiter


@dataclass
class OpenLoopResult:
    """What one fixed-rate run measured (latencies in ms, from each request's due time)."""

    rate: float
    """Requests per second asked for."""
    seconds: float
    latencies: list[float]
    errors: int
    max_lag_ms: float
    """How late the generator dispatched its latest request at worst (its own lag, included in latencies)."""
    notes: list[str] = field(default_factory=list)

    @property
    def achieved(self) -> float:
        """Requests per second answered."""
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        """A latency percentile (nearest rank), ms."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def open_loop(
    url: str,
    path: str,
    headers: dict[str, str],
    next_body: Callable[[], bytes],
    *,
    rate: float,
    duration: float,
    connections: int = 64,
) -> OpenLoopResult:
    """POST `next_body()` to `url + path` at `rate` requests per second for `duration` seconds."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    prefix = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}".encode()
    pool: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        _, protocol = await loop.create_connection(_Connection, host, port)
        pool.put_nowait(protocol)
    latencies: list[float] = []
    errors = 0
    max_lag = 0.0

    async def one(due: float, body: bytes) -> None:
        nonlocal errors
        conn = await pool.get()
        data = prefix + b"Content-Length: " + str(len(body)).encode() + _CRLF2 + body
        try:
            status = await conn.request(data)
        except ConnectionError:
            errors += 1
            _, conn = await loop.create_connection(_Connection, host, port)
        else:
            latencies.append((loop.time() - due) * 1000)
            if status != 200:
                errors += 1
        pool.put_nowait(conn)

    tasks: set[asyncio.Task[None]] = set()
    total = int(rate * duration)
    start = loop.time() + 0.05
    sent = 0
    while sent < total:
        now = loop.time()
        due_count = min(total, int((now - start) * rate) + 1) if now >= start else 0
        while sent < due_count:
            due = start + sent / rate
            max_lag = max(max_lag, now - due)
            task = asyncio.create_task(one(due, next_body()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        next_due = start + sent / rate
        await asyncio.sleep(max(0.0, next_due - loop.time()))
    unfinished = 0
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=30)
        unfinished = len(pending)
        for task in pending:
            task.cancel()
    elapsed = loop.time() - start
    while not pool.empty():
        conn = pool.get_nowait()
        if conn.transport is not None:
            conn.transport.close()
    return OpenLoopResult(rate, elapsed, latencies, errors + unfinished, max_lag * 1000)


def run_open_loop(
    url: str, path: str, headers: dict[str, str], next_body: Callable[[], bytes], *, rate: float, duration: float
) -> OpenLoopResult:
    """`open_loop` in a fresh event loop (for a worker thread)."""
    started = time.monotonic()
    result = asyncio.run(open_loop(url, path, headers, next_body, rate=rate, duration=duration))
    result.notes.append(f"wall {time.monotonic() - started:.1f}s")
    return result

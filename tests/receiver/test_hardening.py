"""What no client can do to a running receiver: grow its memory, freeze its loop, read a secret back from an answer
or a log line, flood its log, or get a 5xx other than a 503 to retry."""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import os
import re
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
import yaml
import zstandard

from receiver.logs import JsonFormatter
from receiver.samples import encode_body, sample_wrappers
from receiver.server import Service
from tests.conftest import TOKEN, StartService
from tests.receiver.test_process import TOKEN as PROCESS_TOKEN
from tests.receiver.test_process import Server, free_port

AUTH = {"Authorization": TOKEN}
AUTH_PROCESS = {"Authorization": PROCESS_TOKEN}
"""The secret a receiver process is started with."""
MiB = 1024 * 1024


# --- helpers -------------------------------------------------------------------------------------


async def exchange(port: int, request: bytes, source: str = "127.0.0.1", timeout: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> Any:
    return orjson.loads(answer.split(b"\r\n\r\n", 1)[1])


async def metric(service_url: str, line_start: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(service_url + "/metrics") as response:
        text = await response.text()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


def rendered(records: list[logging.LogRecord]) -> str:
    """Every captured record as the service would write it, traceback included."""
    formatter = JsonFormatter()
    return "\n".join(formatter.format(record) for record in records)


def vm(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory figure (VmRSS, VmHWM) in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match, field
    return int(match.group(1)) * 1024


def cpu_seconds(pid: int) -> float:
    """The CPU time a process's main thread (its event loop) has run: what the scheduler counts while the thread
    is on a core, so a busy machine's delays do not add to it."""
    task = Path(f"/proc/{pid}/task/{pid}")
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except FileNotFoundError:  # a kernel without schedstats: user + system time, in clock ticks
        return ticks(task / "stat")


def ticks(stat: Path) -> float:
    """User + system time from a /proc stat file, in seconds (10 ms steps)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Receiver:
    """A `log-bridge serve` process on loopback with a config of the test's making."""

    def __init__(self, tmp_path: Path, server: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "server": {"host": "127.0.0.1", "port": self.port, "allowlist": ["127.0.0.1/32"], **server},
            "journal": {"path": str(tmp_path / "journal.db")},
            "streams": [
                {"name": "workos", "path": "/workos", "auth": {"values": ["${STREAM_SECRET}"]}, "sinks": ["a"]}
            ],
            "sinks": {"a": {"type": "file", "path": str(tmp_path / "out" / "%Y-%m-%d.ndjson")}},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        self.process = Server(path, self.port, tmp_path)
        self.log_path = tmp_path / "serve.log"

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Any]:
    """Starts a receiver process with the given `server` settings; stops it at the end."""
    started: list[Receiver] = []

    async def start(**server: Any) -> Receiver:
        running = Receiver(tmp_path, server)
        started.append(running)
        if "admin" in server:  # asked over plain HTTP whatever `tls` says
            running.process.port = server["admin"]["port"]
        await running.process.ready()
        return running

    yield start
    for running in started:
        assert running.process.kill(signal.SIGTERM) == 0


def request_bytes(headers: list[tuple[str, str]], body: bytes = b"[]", path: str = "/workos") -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


# --- X-Forwarded-For -----------------------------------------------------------------------------


class TestForwardedFor:
    @pytest.mark.slow
    async def test_refused_requests_with_huge_forwarded_for_headers_do_not_grow_memory(self, receiver: Any) -> None:
        """1,000 refused requests, each with 100 unique 8 KB X-Forwarded-For headers, from a trusted proxy and from
        a plain client (neither on the allowlist): the receiver's RSS grows by less than 50 MiB. Each head (800 KB)
        is refused as too large (400) before its fields are read: the client, still sending, reads the answer."""
        running = await receiver(trusted_proxies=["127.0.0.3/32"])
        filler = ", ".join(["198.51.100.7"] * 570)  # about 8 KB

        def request(number: int) -> bytes:
            forwarded = [("X-Forwarded-For", f"{number}.{index}.{filler}") for index in range(100)]
            return request_bytes([*forwarded, ("Authorization", TOKEN)])

        async def send(numbers: range) -> list[int]:
            return [
                status_of(await exchange(running.port, request(n), source="127.0.0.2" if n % 2 else "127.0.0.3"))
                for n in numbers
            ]

        await send(range(-40, 0))  # warm up: the allocator's arenas, the log, the metrics children
        before = vm(running.pid, "VmRSS")
        statuses = [s for batch in await asyncio.gather(*(send(range(k, 1000, 4)) for k in range(4))) for s in batch]
        after = vm(running.pid, "VmRSS")
        assert set(statuses) == {400} and len(statuses) == 1000
        growth = (after - before) / MiB
        print(f"RSS {before / MiB:.0f} -> {after / MiB:.0f} MiB")
        assert growth < 50, f"RSS grew {growth:.0f} MiB ({before / MiB:.0f} -> {after / MiB:.0f} MiB)"

    @pytest.mark.slow
    async def test_heads_that_never_end_do_not_hold_memory(self, receiver: Any) -> None:
        """Was a defect: aiohttp reads a head of up to 128 fields of 8190 bytes, each kept as bytes and as text
        until the head ends. 200 connections, from anyone, each sending 120 fields of 8 KB and never the blank
        line, took RSS from 67 to 469 MB for header_timeout. Now a head is refused (400) once it passes 16 KiB
        and what follows is dropped unread: RSS grows by less than 50 MiB, and every client reads its answer."""
        running = await receiver(header_timeout="30s")
        head = b"POST /workos HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-Filler-%03d: %s\r\n" % (index, b"a" * 8000) for index in range(120)
        )
        before = vm(running.pid, "VmRSS")
        connections = [await asyncio.open_connection("127.0.0.1", running.port) for _ in range(200)]
        try:
            for _, writer in connections:
                writer.write(head)
            await asyncio.gather(*(writer.drain() for _, writer in connections))
            peak = before
            for _ in range(20):  # while the connections would still be held
                await asyncio.sleep(0.05)
                peak = max(peak, vm(running.pid, "VmRSS"))
            growth = (peak - before) / MiB
            print(f"RSS {before / MiB:.0f} -> {peak / MiB:.0f} MiB")
            assert growth < 50, f"RSS grew {growth:.0f} MiB ({before / MiB:.0f} -> {peak / MiB:.0f} MiB)"
            answers = await asyncio.gather(*(asyncio.wait_for(reader.read(), 10) for reader, _ in connections))
        finally:
            for _, writer in connections:
                writer.close()
        assert {status_of(answer) for answer in answers} == {400}
        assert all(b"the request head is larger than 16384 bytes" in answer for answer in answers)


class TestIdleTlsConnections:
    @pytest.mark.slow
    async def test_idle_tls_connections_hold_little_memory(self, receiver: Any, tmp_path: Path) -> None:
        """Was a defect: asyncio's TLS layer gives each connection a read buffer of 256 KiB, filled at once, kept
        while the connection is open: 1,000 idle TLS connections (anyone can open them: the handshake comes
        before the allowlist) took 276 MB of RSS, so the default `max_connections` (4,096) could hold 1.1 GB,
        twice the chart's memory limit. Now 32 KiB a connection (TLS_READ_BYTES; 52 kB each in all)."""
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "tls.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
        tls = {"cert_file": str(tmp_path / "tls.crt"), "key_file": str(tmp_path / "tls.key")}
        running = await receiver(tls=tls, admin={"port": free_port()}, header_timeout="60s")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        before = vm(running.pid, "VmRSS")
        writers = []
        try:
            for _ in range(1000):
                _, writer = await asyncio.open_connection("127.0.0.1", running.port, ssl=context)
                writers.append(writer)
            await asyncio.sleep(0.5)
            growth = (vm(running.pid, "VmRSS") - before) / MiB
        finally:
            for writer in writers:
                writer.close()
        print(f"RSS +{growth:.0f} MiB for 1,000 idle TLS connections")
        assert growth < 100, f"RSS grew {growth:.0f} MiB for 1,000 idle TLS connections"


# --- authentication and malformed requests -------------------------------------------------------


SECRET = "Bearer s3cr3t-that-must-not-leak"


class TestMalformedRequests:
    @pytest.fixture
    async def service(self, start_service: StartService) -> Service:
        return await start_service(
            {"streams": [{"name": "workos", "path": "/workos", "auth": {"values": [SECRET]}, "sinks": ["mem"]}]}
        )

    async def test_secret_that_is_not_utf8_is_401(self, service: Service) -> None:
        for value in (SECRET.encode() + b"\xff", b"\xff\xfe", b"Bearer \xc3"):
            request = (
                b"POST /workos HTTP/1.1\r\nHost: x\r\nAuthorization: " + value + b"\r\nContent-Length: 2\r\n\r\n[]"
            )
            answer = await exchange(service.port, request)
            assert status_of(answer) == 401, answer
        assert await metric(service.url, 'log_bridge_requests_total{code="401"') == 3

    @pytest.mark.parametrize(
        "line",
        [
            b"Authorization: " + SECRET.encode() + b"\rX-Other: 1",  # CR inside the line
            b"Authorization: " + SECRET.encode() + b"\x00",  # NUL
            b"Authorization: " + SECRET.encode() + b"\nX-Other: 1",  # bare LF
            b"Authorization: " + SECRET.encode() + b"x" * 9000,  # longer than a header may be
        ],
        ids=["cr", "nul", "bare-lf", "too-long"],
    )
    async def test_malformed_header_line_is_400_without_echo_or_log(
        self, service: Service, caplog: pytest.LogCaptureFixture, line: bytes
    ) -> None:
        caplog.set_level(logging.DEBUG)
        request = b"POST /workos HTTP/1.1\r\nHost: x\r\n" + line + b"\r\nContent-Length: 2\r\n\r\n[]"
        answer = await exchange(service.port, request)
        assert status_of(answer) == 400
        error = body_of(answer)["error"]
        assert "malformed" in error or "longer than" in error
        assert b"s3cr3t" not in answer and b"Authorization" not in answer
        logs = rendered(caplog.records)
        assert "s3cr3t" not in logs and "Authorization" not in logs and "Traceback" not in logs, logs
        assert not any(record.exc_info for record in caplog.records)
        assert any(record.getMessage() == "malformed request refused" for record in caplog.records)
        assert await metric(service.url, "log_bridge_malformed_requests_total") == 1

    async def test_bare_lf_request_line_is_400_without_echo(self, service: Service, caplog) -> None:
        caplog.set_level(logging.DEBUG)
        request = f"POST /workos HTTP/1.1\nHost: x\nAuthorization: {SECRET}\nContent-Length: 2\n\n[]".encode()
        answer = await exchange(service.port, request)
        assert status_of(answer) == 400 and b"s3cr3t" not in answer
        assert "s3cr3t" not in rendered(caplog.records)

    async def test_a_flood_of_refusals_is_counted_but_logged_a_few_lines_a_second(
        self, service: Service, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        malformed = b"POST /workos HTTP/1.1\r\nHost: x\r\nAuthorization: " + SECRET.encode() + b"\x00\r\n\r\n"
        no_secret = request_bytes([])
        started = time.monotonic()

        async def flood(request: bytes, source: str, count: int) -> list[int]:
            return [status_of(await exchange(service.port, request, source)) for _ in range(count)]

        statuses = await asyncio.gather(
            flood(malformed, "127.0.0.2", 500),  # malformed, from an address not on the allowlist
            flood(no_secret, "127.0.0.2", 250),  # 403
            flood(no_secret, "127.0.0.1", 250),  # 401
        )
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.6)  # the bucket refills: the next line logged says how many were suppressed
        assert status_of(await exchange(service.port, no_secret, "127.0.0.1")) == 401
        elapsed = time.monotonic() - started
        assert (set(statuses[0]), set(statuses[1]), set(statuses[2])) == ({400}, {403}, {401})
        assert await metric(service.url, "log_bridge_malformed_requests_total") == 500
        assert await metric(service.url, 'log_bridge_requests_total{code="403"') == 250
        lines = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("receiver", "aiohttp"))]
        refusals = [r for r in lines if r.getMessage() != "sink healthy"]
        # A burst of 10, then 2 a second, each possibly preceded by its "suppressed" summary.
        allowed = 2 * (10 + 2 * elapsed)
        assert len(refusals) <= allowed, f"{len(refusals)} lines for 1,000 refusals in {elapsed:.1f} s"
        assert any("similar messages suppressed" in r.getMessage() for r in refusals)
        assert "s3cr3t" not in rendered(caplog.records)


# --- bodies: compression, emptiness --------------------------------------------------------------


class TestBodies:
    @pytest.mark.slow
    async def test_many_gzip_members_are_refused_quickly_while_healthz_stays_responsive(self, receiver: Any) -> None:
        """10 MiB of 524,288 empty gzip members: refused within seconds at the first member past MAX_MEMBERS, and
        the event loop works less than 100 ms on the request all told, so it cannot freeze /healthz for 100 ms
        (the decompression runs off the loop; about 22 ms here, nearly all of it reading 10 MiB off the socket).

        The loop's work is its thread's CPU time, which a busy machine's scheduler cannot inflate. /healthz's
        wall-clock latency it can (161 ms once on a shared CI machine), so that only has to stay under a second."""
        running = await receiver()
        bomb = gzip.compress(b"", mtime=0) * 524_288
        assert len(bomb) == 10 * MiB
        latencies: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            async with aiohttp.ClientSession() as session:
                while not done.is_set():
                    started = time.monotonic()
                    async with session.get(running.url + "/healthz") as response:
                        assert response.status == 200
                        await response.read()
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(0.01)

        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.3)
        process = Path(f"/proc/{running.pid}/stat")
        loop_before, process_before = cpu_seconds(running.pid), ticks(process)
        started = time.monotonic()
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.post(
                running.url + "/workos", data=io.BytesIO(bomb), headers={**AUTH_PROCESS, "Content-Encoding": "gzip"}
            ) as response,
        ):
            status, payload = response.status, await response.json()
        took = time.monotonic() - started
        loop_cpu, process_cpu = cpu_seconds(running.pid) - loop_before, ticks(process) - process_before
        await asyncio.sleep(0.3)
        done.set()
        await prober
        assert (status, payload["error"]) == (400, "gzip body holds more than 1024 members; compress it as one")
        assert took < 15, f"took {took:.1f} s to refuse"
        worst = max(latencies)
        print(
            f"refused in {took:.2f} s; loop CPU {loop_cpu * 1000:.0f} ms, process CPU {process_cpu * 1000:.0f} ms; "
            f"/healthz max {worst * 1000:.0f} ms over {len(latencies)} probes"
        )
        assert loop_cpu < 0.1, f"the event loop ran {loop_cpu * 1000:.0f} ms for one request"
        assert worst < 1, f"/healthz max latency {worst * 1000:.0f} ms over {len(latencies)} probes"

    async def test_truncated_zstd_body_says_it_is_truncated(self, start_service: StartService, client) -> None:
        service = await start_service()
        body, content_type = encode_body(sample_wrappers(2000), "ndjson")
        compressed = zstandard.compress(body)
        for cut in (len(compressed) * 6 // 10, 8):
            async with client.post(
                service.url + "/workos",
                data=compressed[:cut],
                headers={**AUTH, "Content-Type": content_type, "Content-Encoding": "zstd"},
            ) as response:
                assert response.status == 400
                assert (await response.json())["error"] == "zstd body is truncated"

    async def test_content_length_zero_is_an_empty_body(self, start_service: StartService, client) -> None:
        service = await start_service()
        async with client.post(service.url + "/workos", data=b"", headers=AUTH) as response:
            assert response.request_info.headers.get("Content-Length") == "0"
            assert response.status == 400
            assert (await response.json())["error"] == "empty body: expected a JSON array or NDJSON"


# --- the in-flight budget ------------------------------------------------------------------------


class TestInflightBudget:
    async def test_over_budget_is_503_at_once_and_every_path_gives_the_bytes_back(
        self, start_service: StartService, client
    ) -> None:
        service = await start_service({"server": {"max_body_bytes": "1MiB", "max_inflight_bytes": "2MiB"}})
        head = b"POST /workos HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
        # Two slow senders hold 1.9 MiB: a Content-Length is reserved before the body is read.
        slow = []
        for length in (MiB, 900 * 1024):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(head + b"Content-Length: %d\r\n\r\n[" % length)
            await writer.drain()
            slow.append(writer)
        await asyncio.sleep(0.2)
        assert await metric(service.url, "log_bridge_inflight_body_bytes") == MiB + 900 * 1024
        # 200 KiB more do not fit: 503 with Retry-After, answered before the body is sent.
        answer = await exchange(service.port, head + b"Content-Length: 204800\r\n\r\n")
        assert status_of(answer) == 503 and int(re.search(rb"Retry-After: (\d+)", answer).group(1)) > 0
        # A chunked body reserves max_body_bytes, so it does not fit either.
        answer = await exchange(service.port, head + b"Transfer-Encoding: chunked\r\n\r\n")
        assert status_of(answer) == 503
        # A small one still does.
        async with client.post(service.url + "/workos", data=b"[]", headers=AUTH) as response:
            assert response.status == 200
        for writer in slow:
            writer.close()
            await writer.wait_closed()
        # Whatever the outcome (cut off, 200, 400, 413, 415, 503), nothing stays reserved.
        for body, headers in (
            (orjson.dumps(sample_wrappers(3)), {}),
            (b"not json", {}),
            (gzip.compress(b"[" + b" " * (2 * MiB) + b"]"), {"Content-Encoding": "gzip"}),
            (b"\x1f\x8bgarbage", {"Content-Encoding": "gzip"}),
            (zstandard.compress(orjson.dumps(sample_wrappers(3))), {"Content-Encoding": "zstd"}),
        ):
            async with client.post(service.url + "/workos", data=body, headers={**AUTH, **headers}) as response:
                assert response.status in (200, 400, 413)
        await asyncio.sleep(0.1)
        assert await metric(service.url, "log_bridge_inflight_body_bytes") == 0

    def test_budget_must_hold_a_compressed_body_and_its_decompressed_form(self) -> None:
        from receiver.config import parse_config
        from receiver.errors import ConfigError
        from tests.conftest import BASE_CONFIG, merge

        with pytest.raises(ConfigError) as raised:
            parse_config(merge(BASE_CONFIG, {"server": {"max_body_bytes": "50MiB"}}), {})
        assert raised.value.errors == [
            "server.max_inflight_bytes: must be at least twice max_body_bytes (104857600 bytes)"
        ]

    @pytest.mark.slow
    @pytest.mark.parametrize(
        "kind",
        [
            "realistic",
            "ones",  # 4.7 M one-byte elements: refused (413, over max_events_per_request) at little cost
        ],
    )
    async def test_32_concurrent_9_mib_bodies_stay_under_512_mib(self, receiver: Any, kind: str) -> None:
        running = await receiver()
        if kind == "realistic":
            wrappers = sample_wrappers(9 * MiB // 450)
            body = orjson.dumps(wrappers)
        else:
            body = b"[" + b"1," * (9 * MiB // 2 - 1) + b"1]"
        assert 8.5 * MiB < len(body) < 9.5 * MiB
        answers: list[tuple[int, str | None]] = []

        async def post(session: aiohttp.ClientSession) -> None:
            async with session.post(running.url + "/workos", data=io.BytesIO(body), headers=AUTH_PROCESS) as response:
                await response.read()
                answers.append((response.status, response.headers.get("Retry-After")))

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
            await asyncio.gather(*(post(session) for _ in range(32)))
        peak = vm(running.pid, "VmHWM")
        print(f"{kind}: peak RSS {peak / MiB:.0f} MiB, answers {sorted(s for s, _ in answers)}")
        answered = 200 if kind == "realistic" else 413
        assert {status for status, _ in answers} <= {answered, 503}
        assert all(retry for status, retry in answers if status == 503)
        assert any(status == answered for status, _ in answers)
        assert peak <= 512 * MiB, f"peak RSS {peak / MiB:.0f} MiB; answers {sorted(s for s, _ in answers)}"


# --- unexpected errors ---------------------------------------------------------------------------


class TestUnexpectedErrors:
    async def test_a_bug_is_a_counted_503_with_retry_after(
        self, start_service: StartService, client, caplog: pytest.LogCaptureFixture, monkeypatch
    ) -> None:
        service = await start_service()

        async def broken(*_: object, **__: object) -> None:
            raise RuntimeError("details that may quote the request: " + TOKEN)

        monkeypatch.setattr(service.journal, "append", broken)
        async with client.post(service.url + "/workos", data=b"[]", headers=AUTH) as response:
            assert response.status == 503 and int(response.headers["Retry-After"]) > 0
        assert await metric(service.url, 'log_bridge_requests_total{code="503"') == 1
        logs = rendered(caplog.records)
        assert "RuntimeError" in logs and TOKEN not in logs and "Traceback" not in logs

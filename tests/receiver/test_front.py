"""The stream endpoints' own HTTP front (receiver/front.py): which requests it serves, that its answers are
aiohttp's, and that whatever it does not serve reaches aiohttp intact."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import ssl
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import trustme

from receiver.front import STALL_SECONDS, parse_head
from receiver.samples import sample_wrappers
from receiver.server import Service
from tests.conftest import TOKEN, StartService, memory, scrape

AUTH = {"Authorization": TOKEN}


def post(body: bytes, *fields: str, path: str = "/workos", version: str = "HTTP/1.1", length: bool = True) -> bytes:
    """A request's bytes: the secret, `fields` (whole header lines) and, unless told not to, Content-Length."""
    lines = [f"POST {path} {version}", "Host: receiver", f"Authorization: {TOKEN}", *fields]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def batch(count: int, start: int = 0) -> bytes:
    wrappers = sample_wrappers(count)
    for index, wrapper in enumerate(wrappers, start):
        wrapper["keySuffix"] = f"front-{index}"
    return orjson.dumps(wrappers)


async def responses(port: int, data: bytes, count: int = 1, *, source: str = "127.0.0.1") -> list[bytes]:
    """Send `data` on a fresh connection and read `count` responses (fewer if the server closes first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    found: list[bytes] = []
    try:
        writer.write(data)
        await writer.drain()
        for _ in range(count):
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            except asyncio.IncompleteReadError:
                break
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            found.append(head + await asyncio.wait_for(reader.readexactly(length), 10))
    finally:
        await closed(writer)
    return found


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def tls_service(start_service: StartService, tmp_path: Path) -> tuple[Service, ssl.SSLContext]:
    """A service over TLS (a trustme certificate for 127.0.0.1), and a client context that trusts it."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    tls = {"cert_file": str(tmp_path / "tls.crt"), "key_file": str(tmp_path / "tls.key")}
    service = await start_service({"server": {"tls": tls}})
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return service, context


async def budget_returned(service: Service) -> bool:
    """Whether the body budget is all given back within a second."""
    for _ in range(50):
        if service.state.budget.used == 0:
            return True
        await asyncio.sleep(0.02)
    return service.state.budget.used == 0


def essence(response: bytes) -> tuple[int, bytes, dict[str, str]]:
    """What a client acts on: status, body, and the headers that matter (Date, Server and the like left out)."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    kept = {name.lower(): value for name, value in fields.items() if name.lower() in _COMPARED}
    return int(lines[0].split(" ", 2)[1]), body, kept


_COMPARED = ("content-type", "retry-after", "connection", "content-length")


@pytest.fixture
async def pair(start_service: StartService) -> tuple[Service, Service]:
    """Two services with the same configuration: the first as it runs, the second with its front serving
    nothing itself (every connection goes to aiohttp), as log-bridge answered before the front existed."""
    config = {"server": {"max_events_per_request": 50, "trusted_proxies": ["127.0.0.3/32"]}}
    served, aiohttp_only = await start_service(config), await start_service(config)
    assert aiohttp_only._front is not None
    aiohttp_only._front.taken_bytes = 0
    return served, aiohttp_only


# Every request both ways: whether the front serves it, and the request.
CASES: list[tuple[str, bool, bytes]] = [
    ("accepted", True, post(batch(3))),
    ("one-element", True, post(batch(1, 100))),
    (
        "ndjson",
        True,
        post(b"\n".join(orjson.dumps(w) for w in sample_wrappers(2)), "Content-Type: application/x-ndjson"),
    ),
    ("a bad element among good ones", True, post(b'[{"event":{"action":"a"},"keySuffix":"k1"},1]')),
    ("not JSON", True, post(b"[{")),
    ("gzip", True, post(gzip.compress(batch(2, 200)), "Content-Encoding: gzip")),
    ("unsupported encoding", True, post(b"[]", "Content-Encoding: br")),
    ("too many elements", True, post(batch(51, 300))),
    ("wrong secret", True, post(b"[]").replace(TOKEN.encode(), b"Bearer wrong-secret-000000000")),
    ("no secret", True, post(b"[]").replace(f"Authorization: {TOKEN}\r\n".encode(), b"")),
    ("lower-case names, no spaces", True, post(b"[]").replace(b"Authorization: ", b"authorization:")),
    ("keep-alive asked", True, post(b"[]", "Connection: keep-alive")),
    ("a secret with a byte beyond ASCII", False, post(b"[]").replace(TOKEN.encode(), b"Bearer \xff")),
    ("empty body", False, post(b"")),
    ("connection: close", False, post(b"[]", "Connection: close")),
    ("chunked", False, post(b"2\r\n[]\r\n0\r\n\r\n", "Transfer-Encoding: chunked", length=False)),
    ("two lengths", False, post(b"[]", "Content-Length: 2")),
    ("signed length", False, post(b"[]", length=False).replace(b"\r\n\r\n", b"\r\nContent-Length: +2\r\n\r\n")),
    ("no length", False, post(b"", length=False)),
    ("HTTP/1.0", False, post(b"[]", version="HTTP/1.0")),
    ("query string", False, post(b"[]", path="/workos?x=1")),
    ("escaped path", False, post(b"[]", path="/work%6Fs")),
    ("unknown path", False, post(b"[]", path="/elsewhere")),
    ("bare LF", False, post(b"[]").replace(b"Host: receiver\r\n", b"Host: receiver\n")),
    ("bare CR", False, post(b"[]").replace(b"Host: receiver\r\n", b"Host: re\rceiver\r\n")),
    ("NUL in a field", False, post(b"[]", "X-Note: a\x00b")),
    ("folded line", False, post(b"[]", "X-Note: a", " folded")),
    ("field name with a space", False, post(b"[]", "X Note: a")),
    ("line too long", False, post(b"[]", "X-Note: " + "a" * 9000)),
]


class TestAnswers:
    @pytest.mark.parametrize(("served_here", "request_bytes"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
    async def test_the_same_answer_as_aiohttp(
        self, pair: tuple[Service, Service], served_here: bool, request_bytes: bytes
    ) -> None:
        """Whichever front serves a request, the client gets the same status, body and headers."""
        served, aiohttp_only = pair
        assert served._front is not None
        before = served._front.handed_off
        mine = await responses(served.port, request_bytes)
        theirs = await responses(aiohttp_only.port, request_bytes)
        assert mine and theirs
        assert essence(mine[0]) == essence(theirs[0])
        assert (served._front.handed_off == before) is served_here

    async def test_not_allowed_and_forwarded_for(self, pair: tuple[Service, Service]) -> None:
        """The allowlist is the intake's, with X-Forwarded-For read from a trusted proxy only."""
        served, aiohttp_only = pair
        for source, forwarded, status in (
            ("127.0.0.2", None, 403),
            ("127.0.0.3", "127.0.0.1", 200),
            ("127.0.0.3", "203.0.113.9", 403),
            ("127.0.0.1", "203.0.113.9", 200),
        ):
            data = post(b"[]", *([f"X-Forwarded-For: {forwarded}"] if forwarded else []))
            mine = await responses(served.port, data, source=source)
            theirs = await responses(aiohttp_only.port, data, source=source)
            assert essence(mine[0]) == essence(theirs[0])
            assert essence(mine[0])[0] == status, (source, forwarded)

    async def test_draining_is_a_503_to_retry(self, pair: tuple[Service, Service]) -> None:
        served, aiohttp_only = pair
        served.state.draining = aiohttp_only.state.draining = True
        mine = await responses(served.port, post(batch(1)))
        theirs = await responses(aiohttp_only.port, post(batch(1)))
        served.state.draining = aiohttp_only.state.draining = False  # for the fixture to stop them
        assert essence(mine[0]) == essence(theirs[0])
        assert essence(mine[0])[0] == 503
        assert essence(mine[0])[2]["retry-after"] == "5"

    async def test_metrics_count_what_the_front_serves(self, start_service: StartService) -> None:
        service = await start_service()
        await responses(service.port, post(batch(2)) + post(b"[]").replace(TOKEN.encode(), b"Bearer nope"), 2)
        assert service._front is not None and service._front.handed_off == 0
        metrics = service.metrics.render().decode()
        assert 'log_bridge_requests_total{code="200",stream="workos"} 1.0' in metrics
        assert 'log_bridge_requests_total{code="401",stream="workos"} 1.0' in metrics
        assert 'log_bridge_requests_refused_total{reason="unauthorised",stream="workos"} 1.0' in metrics
        assert 'log_bridge_events_received_total{stream="workos"} 2.0' in metrics


class TestConnections:
    async def test_a_keep_alive_client_is_served_here_and_every_event_arrives(
        self, start_service: StartService, client: aiohttp.ClientSession
    ) -> None:
        service = await start_service()
        bodies = [batch(5, 5 * n) for n in range(20)]
        for body in bodies:
            async with client.post(service.url + "/workos", data=body, headers=AUTH) as response:
                assert response.status == 200
                assert await response.json() == {"accepted": 5, "duplicates": 0, "dead_lettered": 0}
        assert service._front is not None and service._front.handed_off == 0
        sent = [orjson.dumps(wrapper) for body in bodies for wrapper in orjson.loads(body)]
        for _ in range(100):
            if len(memory().events) >= len(sent):
                break
            await asyncio.sleep(0.05)
        assert [event.raw for event in memory().events] == sent

    async def test_pipelined_requests_are_answered_in_order(self, start_service: StartService) -> None:
        """Two stream POSTs and a GET in one write: the front answers the POSTs, then aiohttp the GET."""
        service = await start_service()
        data = post(batch(1, 1)) + post(batch(1, 1)) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        answers = await responses(service.port, data, 3)
        assert [essence(a)[:2] for a in answers] == [
            (200, b'{"accepted":1,"duplicates":0,"dead_lettered":0}'),
            (200, b'{"accepted":0,"duplicates":1,"dead_lettered":0}'),
            (200, b'{"status": "ok"}'),
        ]
        assert service._front is not None and service._front.handed_off == 1

    @pytest.mark.parametrize("then_aiohttp", [False, True], ids=["front only", "then aiohttp"])
    async def test_a_client_that_half_closes_after_pipelining_gets_every_answer(
        self, start_service: StartService, then_aiohttp: bool
    ) -> None:
        """Three POSTs in one write, then shutdown(SHUT_WR): the front answered the first and closed, so the
        client never learnt the others' fate (they were committed when read before the close). Every request
        read before the end of the stream is answered, then the connection closes."""
        service = await start_service()
        data = post(batch(1, 20)) + post(batch(1, 21)) + post(batch(1, 22))
        if then_aiohttp:
            data += b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        expected = [200] * (4 if then_aiohttp else 3)
        received = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                # The front closes after its last answer; aiohttp, given the GET, at its keep-alive timeout.
                while chunk := await reader.read(65536):
                    received += chunk
                    if then_aiohttp and len(re.findall(rb"HTTP/1\.1 (\d{3}) ", received)) == len(expected):
                        break
        ended = reader.at_eof()
        await closed(writer)
        statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]
        assert statuses == expected, received[-300:]
        assert ended or then_aiohttp
        for _ in range(100):
            if len(memory().events) == 3:
                break
            await asyncio.sleep(0.02)
        assert sorted(event.wrapper["keySuffix"] for event in memory().events) == ["front-20", "front-21", "front-22"]

    async def test_a_client_gone_before_its_head_was_read_is_no_address_refused(
        self, start_service: StartService
    ) -> None:
        """Was a defect: a POST cut short by the client's half-close (the front hands what it read to aiohttp at
        the end of the stream) was read by aiohttp with its transport closing, so with no peer address: the
        allowlist refused it, counted as not_allowed (403) and logged "request from an address not on the
        allowlist", a false allowlist alarm. A client gone before its request was read is client_disconnected."""
        service = await start_service()
        data = post(batch(1, 30))
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(data[:-5])
        await writer.drain()
        writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(5):
                while await reader.read(65536):
                    pass
        await closed(writer)
        refused = "log_bridge_requests_refused_total"
        async with aiohttp.ClientSession() as session:
            for _ in range(50):
                async with session.get(service.url + "/metrics") as response:
                    text = await response.text()
                if scrape(text, refused, reason="client_disconnected", stream="workos"):
                    break
                await asyncio.sleep(0.05)
        assert scrape(text, refused, reason="client_disconnected", stream="workos") == 1.0
        assert not scrape(text, refused, reason="not_allowed", stream="workos")
        assert not memory().events

    async def test_a_body_in_pieces_is_served_here(self, start_service: StartService) -> None:
        service = await start_service()
        data = post(batch(3))
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        for start in range(0, len(data), 100):
            writer.write(data[start : start + 100])
            await writer.drain()
            await asyncio.sleep(0.005)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        await closed(writer)
        assert service._front is not None and service._front.handed_off == 0
        assert service.state.budget.used == 0

    async def test_a_stalled_body_goes_to_aiohttp_and_times_out(self, start_service: StartService) -> None:
        """A body that stops arriving holds its bytes of the budget only while here; aiohttp then answers 408."""
        service = await start_service({"server": {"body_timeout": "500ms"}})
        data = post(batch(3))
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(data[:-20])
        await writer.drain()
        await asyncio.sleep(0.2)
        assert service.state.budget.used == len(data) - data.index(b"\r\n\r\n") - 4  # reserved while it waits
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 10)
        waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:60]
        assert STALL_SECONDS - 0.5 < waited < STALL_SECONDS + 5
        assert service._front is not None and service._front.handed_off == 1
        await closed(writer)
        assert await budget_returned(service)

    async def test_a_client_gone_mid_body_gives_its_budget_back(self, start_service: StartService) -> None:
        service = await start_service()
        data = post(batch(3))
        _, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(data[:-20])
        await writer.drain()
        await asyncio.sleep(0.1)
        assert service.state.budget.used > 0
        await closed(writer)
        assert await budget_returned(service)
        assert service._front is not None and not service._front.connections

    async def test_an_idle_connection_is_closed_after_the_header_timeout(self, start_service: StartService) -> None:
        service = await start_service({"server": {"header_timeout": "700ms"}})
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(post(batch(1)))
        await writer.drain()
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 5)  # the body, then the close
        assert rest.endswith(b"}")
        assert 0.5 < time.monotonic() - started < 2.5
        await closed(writer)

    async def test_stop_finishes_the_request_being_served(self, start_service: StartService) -> None:
        service = await start_service()
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(post(batch(200)))
        await writer.drain()
        await asyncio.sleep(0)  # the request is being served when the stop begins
        stopping = asyncio.create_task(service.stop())
        answer = await asyncio.wait_for(reader.read(), 10)
        await stopping
        assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 503 "))
        await closed(writer)

    async def test_tls_connections_are_served_here(self, start_service: StartService, tmp_path: Path) -> None:
        service, context = await tls_service(start_service, tmp_path)
        async with aiohttp.ClientSession() as session:
            for number in range(3):
                async with session.post(
                    service.url + "/workos", data=batch(2, 2 * number), headers=AUTH, ssl=context
                ) as response:
                    assert response.status == 200
            async with session.get(service.url + "/healthz", ssl=context) as response:
                assert response.status == 200
        assert service._front is not None and service._front.handed_off == 1  # the GET


class TestParseHead:
    def test_a_canonical_head(self) -> None:
        found = parse_head(
            b"POST /workos HTTP/1.1\r\nHost: r\r\nContent-Length: 12"
            b"\r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2",
            "127.0.0.1",
        )
        assert found is not None
        path, head = found
        assert path == "/workos"
        assert head.content_length == 12
        assert head.forwarded() == ["10.0.0.1", "10.0.0.2"]
        assert head.content_type == "application/octet-stream" and head.encoding == "identity"

    @pytest.mark.parametrize(
        "head",
        [
            b"GET /workos HTTP/1.1\r\nContent-Length: 2",
            b"POST /workos HTTP/1.1",
            b"POST /workos HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue",
            b"POST /workos HTTP/1.1\r\nContent-Length: 2\r\nUpgrade: h2c",
            b"POST /workos HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2",
            b"POST /workos HTTP/1.1\r\nContent-Length:  -2",
            b"POST /workos HTTP/1.1\r\nContent-Length: 9999999999999",
            b"POST /workos HTTP/1.1\r\nContent-Length: 2\r\nX: \x7f",
            b"POST /workos HTTP/1.1\r\nContent-Length: 2\r\n: empty name",
            b"POST /workos HTTP/1.1\r\nContent-Length: 2\r\nno colon",
            b"POST /a b HTTP/1.1\r\nContent-Length: 2",
            b"POST /workos HTTP/1.1\r\nContent-Length: 2" + b"\r\nX: y" * 64,
        ],
    )
    def test_what_goes_to_aiohttp(self, head: bytes) -> None:
        head = head.replace(b" HTTP/1.1", b" HTTP/1.1\r\nHost: r", 1)  # for a reason other than no Host
        assert parse_head(head, None) is None

    def test_fields_are_compared_as_sent(self) -> None:
        found = parse_head(
            b"POST /workos HTTP/1.1\r\nhost: r\r\nAUTHORIZATION:  Bearer x \t\r\nContent-Length: 2", None
        )
        assert found is not None
        assert found[1].header_bytes("Authorization") == b"Bearer x"
        assert found[1].header_bytes("X-Missing") == b""

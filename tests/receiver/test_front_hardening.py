"""What no client can do through the stream front (receiver/front.py): hold the body budget without the secret,
make it buffer without bound, get past it a head aiohttp refuses, outlive a stop, or flood the log."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

from receiver.front import STALL_SECONDS
from receiver.server import Service
from tests.conftest import TOKEN, StartService
from tests.receiver.test_front import batch, closed, essence, post, responses, tls_service
from tests.receiver.test_front import pair as pair  # the fixture


class TestBudgetBeforeScreening:
    async def test_a_stranger_cannot_take_the_body_budget(self, start_service: StartService) -> None:
        """Heads announcing a 256 KiB body, from an address not on the allowlist and without the secret, must
        not hold any of server.max_inflight_bytes: with the shipped defaults (64 MiB), 256 such connections
        would otherwise turn every request of the real sender into a 503 for as long as they are renewed."""
        service = await start_service()  # defaults: max_body_bytes 10 MiB, max_inflight_bytes 64 MiB
        limit = service.state.budget.limit
        head = b"POST /workos HTTP/1.1\r\nHost: receiver\r\nContent-Length: 262144\r\n\r\n"
        strangers: list[asyncio.StreamWriter] = []
        try:
            for _ in range(limit // 262144):
                _, writer = await asyncio.open_connection("127.0.0.1", service.port, local_addr=("127.0.0.2", 0))
                writer.write(head)
                strangers.append(writer)
            await asyncio.sleep(0.2)
            held = service.state.budget.used
            answer = await responses(service.port, post(batch(3)))  # the allowed sender, with its secret
        finally:
            for writer in strangers:
                await closed(writer)
        # (bytes of the budget held by the strangers, what the allowed sender is answered)
        assert (held, essence(answer[0])[0]) == (0, 200), answer[0][:200]


class TestPipelining:
    @pytest.mark.parametrize("front_serves", [True, False], ids=["front", "aiohttp-only"])
    async def test_a_client_sending_ahead_is_not_read_without_bound(
        self, start_service: StartService, front_serves: bool
    ) -> None:
        """A client that pipelines requests faster than they are answered (and does not read the answers) must
        be pushed back by TCP: what the server holds for the connection (requests read ahead, answers not yet
        sent) stays bounded. The front's own limit is TAKEN_BYTES + MAX_HEAD (272 KiB) of read-ahead."""
        service = await start_service()
        assert service._front is not None
        if not front_serves:
            service._front.taken_bytes = 0  # every connection goes to aiohttp: the behaviour before the front
        one = post(b"x")  # answered 400 (neither JSON nor NDJSON) without closing, and without the journal
        data = one * (16 * 1024 * 1024 // len(one))  # 16 MiB of requests in one write
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", service.port))
        _, writer = await asyncio.open_connection(sock=sock)
        writer.write(data)
        held = 0
        for _ in range(30):
            await asyncio.sleep(0.1)
            for connection in service._front.connections:
                held = max(held, len(connection.buffer) + connection.transport.get_write_buffer_size())
            for handler in service._runner.server._connections:  # type: ignore[union-attr]
                if handler.transport is not None:
                    held = max(held, handler.transport.get_write_buffer_size())
        writer.transport.abort()
        assert held < 1024 * 1024, f"{held} bytes held for one client"


class TestTlsCloseNotify:
    async def test_a_tls_client_closing_its_side_provokes_no_unlimited_log_line(
        self, start_service: StartService, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Any client (no secret needed) that sends a request and then TLS close_notify makes eof_received
        return True, which asyncio's SSL transport logs as a warning, once per connection, past the
        rate-limited log the service uses for lines a client can provoke."""
        service, context = await tls_service(start_service, tmp_path)
        port = service.port

        def send_and_close_notify() -> None:
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls_socket:
                    tls_socket.sendall(post(b"[]").replace(TOKEN.encode(), b"Bearer wrong-secret-000000000"))
                    with contextlib.suppress(OSError):
                        tls_socket.unwrap()  # close_notify, while the answer is being made

        caplog.set_level(logging.WARNING, logger="asyncio")
        for _ in range(30):
            await asyncio.to_thread(send_and_close_notify)
        await asyncio.sleep(0.3)
        lines = [r for r in caplog.records if r.name == "asyncio"]
        assert not lines, f"{len(lines)} asyncio warnings, e.g. {lines[0].getMessage()!r}"


class TestTlsServerName:
    async def test_a_server_name_beyond_ascii_provokes_no_unlimited_output(
        self,
        start_service: StartService,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Any client can send a ClientHello whose server name has bytes beyond ASCII. Python's ssl module, which
        decodes it for the listener's SNI callback, reports the UnicodeDecodeError to sys.unraisablehook, whose
        default prints it to stderr with the name, once per connection, outside the logs and their rate limit."""
        ignored: list[object] = []
        monkeypatch.setattr(sys, "unraisablehook", ignored.append)  # what the default hook would have printed
        service, _ = await tls_service(start_service, tmp_path)
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        with contextlib.suppress(ssl.SSLWantReadError):
            client.wrap_bio(incoming, outgoing, server_hostname="aaaa.example").do_handshake()
        hello = outgoing.read().replace(b"aaaa.example", b"SECRET.exam\xff")  # same length: the lengths hold
        caplog.set_level(logging.DEBUG)
        for _ in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(hello)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # refused
            writer.close()
        assert ignored == []
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 5
        assert all("SECRET" not in r.getMessage() and "SECRET" not in str(r.__dict__) for r in caplog.records)
        assert service.metrics.loop_errors._value.get() == 30


class TestSoundChecks:
    """Checks that pass: kept to show what was probed."""

    async def test_a_reload_is_seen_by_the_front(self, tmp_path: Path) -> None:
        import yaml

        from receiver.config import load_config
        from tests.conftest import BASE_CONFIG, merge

        tree = merge(BASE_CONFIG, {"journal": {"path": str(tmp_path / "j.db")}})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        service = Service(load_config(path), path=str(path))
        await service.start()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", service.port)  # a keep-alive connection
            assert essence((await responses(service.port, post(batch(1))))[0])[0] == 200
            new = "Bearer rotated-secret-9876543210"
            tree["streams"][0]["auth"]["values"] = [new]
            tree["streams"].append({"name": "two", "path": "/two", "sinks": ["mem"]})
            path.write_text(yaml.safe_dump(tree))
            assert await service.reload()
            assert essence((await responses(service.port, post(batch(1, 5))))[0])[0] == 401
            answer = await responses(service.port, post(batch(1, 6)).replace(TOKEN.encode(), new.encode()))
            assert essence(answer[0])[0] == 200
            assert essence((await responses(service.port, post(batch(1, 7), path="/two")))[0])[0] == 200
            assert service._front is not None and service._front.handed_off == 0
            await closed(writer)
        finally:
            await service.stop()

    async def test_many_pipelined_requests_are_all_answered_in_order(self, start_service: StartService) -> None:
        service = await start_service()
        data = post(b"x") * 5000 + post(batch(1)) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        answers = await responses(service.port, data, 5002)
        assert [essence(a)[0] for a in answers] == [400] * 5000 + [200, 200]
        assert essence(answers[-1])[1] == b'{"status": "ok"}'


_HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
_SECOND = {
    "chunked": post(b"2\r\n[]\r\n0\r\n\r\n", "Transfer-Encoding: chunked", length=False),
    "chunked and a length": post(b"0\r\n\r\n", "Transfer-Encoding: chunked"),
    "chunked, identity": post(b"2\r\n[]\r\n0\r\n\r\n", "Transfer-Encoding: chunked, identity", length=False),
    "two lengths in one field": post(b"[]", "Content-Length: 2, 2", length=False),
    "a space before the colon": post(b"[]", "Content-Length : 2", length=False),
    "a signed length": post(b"[]", "Content-Length: +2", length=False),
    "a huge length": post(b"[]", "Content-Length: 18446744073709551618", length=False),
    "a folded line": post(b"[]", "X-Note: a", " b"),
    "bare LF": post(b"[]").replace(b"\r\n", b"\n"),
    "HTTP/1.0": post(b"[]", version="HTTP/1.0"),
    "HEAD": b"HEAD /workos HTTP/1.1\r\nHost: x\r\n\r\n",
    "Expect": post(b"[]", "Expect: 100-continue"),
    "Connection: close": post(b"[]", "Connection: close"),
    "a body longer than its length": post(b"[]x"),
    "absolute form": post(b"[]", path="http://receiver/workos"),
}


async def test_what_follows_a_request_the_front_served_is_framed_as_aiohttp_frames_it(
    pair: tuple[Service, Service],
) -> None:
    """Request smuggling at the hand-off: after the front served a request, the rest of the connection (a request
    it does not take, then another) must get exactly what aiohttp alone answers to those bytes."""
    from tests.receiver.test_front_fuzz import everything

    served, aiohttp_only = pair
    differences = []
    for index, (name, second) in enumerate(_SECOND.items()):
        mine = await everything(served.port, post(batch(1, 1000 + index)) + second + _HEALTH)
        theirs = await everything(aiohttp_only.port, second + _HEALTH)
        head, _, rest = mine.partition(b"\r\n\r\n")
        first = rest[: int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])]
        if not head.startswith(b"HTTP/1.1 200 ") or rest[len(first) :] != theirs or b'"accepted":1' not in first:
            differences.append((name, mine[:400], theirs[:400]))
    assert not differences, differences


_BASE = post(batch(1, 900)).replace(f"Authorization: {TOKEN}\r\n".encode(), b"")
_AUTH_CASES = {
    "right then wrong": [f"Authorization: {TOKEN}", "Authorization: Bearer wrong"],
    "wrong then right": ["Authorization: Bearer wrong", f"Authorization: {TOKEN}"],
    "right then empty": [f"Authorization: {TOKEN}", "authorization:"],
    "padded with tabs": [f"Authorization:\t {TOKEN} \t"],
    "upper-case name": [f"AUTHORIZATION: {TOKEN}"],
    "secret then a comma": [f"Authorization: {TOKEN},"],
    "split over two fields": ["Authorization: Bearer", "Authorization: test-secret-0123456789"],
    "forwarded for, untrusted peer": [f"Authorization: {TOKEN}", "X-Forwarded-For: 127.0.0.1"],
    "empty forwarded for": [f"Authorization: {TOKEN}", "X-Forwarded-For:"],
}


@pytest.mark.parametrize("fields", list(_AUTH_CASES.values()), ids=list(_AUTH_CASES))
async def test_auth_edge_cases_answer_as_aiohttp(pair: tuple[Service, Service], fields: list[str]) -> None:
    served, aiohttp_only = pair
    head, _, body = _BASE.partition(b"\r\n\r\n")
    data = head + b"".join(b"\r\n" + f.encode() for f in fields) + b"\r\n\r\n" + body
    for source in ("127.0.0.1", "127.0.0.3"):
        mine = await responses(served.port, data, source=source)
        theirs = await responses(aiohttp_only.port, data, source=source)
        assert essence(mine[0])[:2] == essence(theirs[0])[:2], (source, mine[0][:80], theirs[0][:80])


_HOST_CASES = {
    "no Host": post(batch(1, 950)).replace(b"Host: receiver\r\n", b""),
    "two Hosts": post(batch(1, 951), "Host: elsewhere"),
    "two Content-Types": post(batch(1, 952), "Content-Type: application/json", "Content-Type: application/x-ndjson"),
    "two User-Agents": post(batch(1, 953), "User-Agent: a", "User-Agent: b"),
    "an empty Host": post(batch(1, 954)).replace(b"Host: receiver\r\n", b"Host:\r\n"),
    "a Host with a comma": post(batch(1, 955)).replace(b"Host: receiver\r\n", b"Host: a, b\r\n"),
}


@pytest.mark.parametrize("data", list(_HOST_CASES.values()), ids=list(_HOST_CASES))
async def test_heads_aiohttp_refuses_are_refused_by_the_front_too(pair: tuple[Service, Service], data: bytes) -> None:
    """aiohttp's strict request parser answers 400 to an HTTP/1.1 request without a Host, or with a singleton
    field (Host, Content-Type, User-Agent, ...) repeated (RFC 9112 3.2, RFC 9110 5.3); the front must not
    commit such a request's events instead."""
    served, aiohttp_only = pair
    mine = await responses(served.port, data)
    theirs = await responses(aiohttp_only.port, data)
    assert essence(mine[0])[:2] == essence(theirs[0])[:2], (mine[0][:300], theirs[0][:300])


async def test_a_head_trickled_a_byte_at_a_time_is_cut_off(start_service: StartService) -> None:
    """Sound: the front hands the slow head to aiohttp after STALL_SECONDS, whose keep-alive timer (from the
    hand-off) then closes it: a slowloris lasts at most about STALL_SECONDS + SWEEP_SECONDS + header_timeout."""
    import time

    service = await start_service({"server": {"header_timeout": "2s"}})
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    data = post(batch(1))
    started = time.monotonic()
    gone = None
    for index in range(40):
        try:
            writer.write(data[index : index + 1])
            await writer.drain()
        except ConnectionError:
            gone = time.monotonic() - started
            break
        if reader.at_eof() or writer.transport.is_closing():
            gone = time.monotonic() - started
            break
        with contextlib.suppress(TimeoutError):
            if await asyncio.wait_for(reader.read(1024), 0.9) == b"":
                gone = time.monotonic() - started
                break
    await closed(writer)
    assert gone is not None and gone < 5, gone


async def test_a_head_begun_just_before_the_header_timeout_gets_no_second_one(start_service: StartService) -> None:
    """A client (no secret needed) that stays silent for almost header_timeout and then trickles a head: the front
    hands it to aiohttp once it stalls, and aiohttp's timer for a whole head started again at the hand-off, so
    the connection was held for about twice header_timeout, where aiohttp alone closes it after one."""
    from receiver.front import SWEEP_SECONDS

    timeout = 4.0
    service = await start_service({"server": {"header_timeout": f"{timeout}s"}})
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    started = time.monotonic()
    await asyncio.sleep(timeout - 0.5)
    data = post(batch(1))
    gone = None
    for index in range(100):
        try:
            writer.write(data[index : index + 1])
            await writer.drain()
            if await asyncio.wait_for(reader.read(1024), 0.3) == b"":
                gone = time.monotonic() - started
                break
        except ConnectionError:
            gone = time.monotonic() - started
            break
        except TimeoutError:
            continue
    await closed(writer)
    # header_timeout, then at most the stall and a sweep or two before the hand-off, and some slack.
    assert gone is not None and gone < timeout + STALL_SECONDS + 2 * SWEEP_SECONDS + 1.0, gone


async def test_stop_leaves_no_connection_open(start_service: StartService) -> None:
    """A keep-alive connection of the front that sends a request for aiohttp while aiohttp's server is
    shutting down (Service.stop: runner.cleanup, which waits for a slow aiohttp request, then Front.shutdown) is
    handed to that server after its shutdown began; nobody closes it then: it outlives Service.stop."""
    service = await start_service({"server": {"shutdown_timeout": "2s"}})
    # A slow request on aiohttp's side, which aiohttp's shutdown waits for.
    _, slow = await asyncio.open_connection("127.0.0.1", service.port)
    slow.write(post(b"[]", "Transfer-Encoding: chunked", length=False).split(b"\r\n\r\n")[0] + b"\r\n\r\n1\r\n[\r\n")
    await slow.drain()
    # A keep-alive connection the front serves.
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(post(batch(1)))
    assert (await asyncio.wait_for(reader.readuntil(b"}"), 5)).startswith(b"HTTP/1.1 200 ")
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(service.stop())
    for _ in range(200):  # until aiohttp's shutdown has begun (the sinks drained, the site closed)
        if service._runner is not None and service._runner.server is not None and not service._runner.sites:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    with contextlib.suppress(ConnectionError):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
    await asyncio.wait_for(stopping, 15)
    with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)  # an answer to the GET, maybe
    rest = b"?"
    with contextlib.suppress(TimeoutError, ConnectionError):
        rest = await asyncio.wait_for(reader.read(), 1.5)
    open_after_stop = rest == b"?"
    await closed(writer)
    await closed(slow)
    assert not open_after_stop, "a connection is still open 1.5 s after Service.stop returned"


async def test_requests_in_flight_share_one_shutdown_timeout(start_service: StartService) -> None:
    """The front's requests in flight and aiohttp's get one `shutdown_timeout` between them, not one each: a
    pod's grace period is derived from it (Helm: twice it, delivery then requests, plus 15 s)."""
    service = await start_service({"server": {"shutdown_timeout": "2s"}})
    _, slow = await asyncio.open_connection("127.0.0.1", service.port)  # aiohttp's, its body never ends
    slow.write(post(b"[]", "Transfer-Encoding: chunked", length=False).split(b"\r\n\r\n")[0] + b"\r\n\r\n1\r\n[\r\n")
    await slow.drain()
    held = asyncio.ensure_future(service.journal._write(lambda conn: time.sleep(2.4)))  # commits wait
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)  # the front's, being served
    writer.write(post(batch(1)))
    await writer.drain()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await asyncio.wait_for(service.stop(), 15)
    took = time.monotonic() - started
    await held
    await closed(writer)
    await closed(slow)
    assert took < 3.3, f"stop took {took:.1f} s: the front's 2 s, then aiohttp's 2 s again"


async def test_a_connection_failing_its_timeout_check_does_not_stop_the_others(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep that closes idle connections outlives a connection whose check fails (that one is closed)."""
    from receiver import front

    service = await start_service({"server": {"header_timeout": "700ms"}})
    original = front.FrontConnection.sweep
    failing: list[object] = []

    def sweep(self: front.FrontConnection, now: float) -> None:
        if self in failing:
            raise RuntimeError("a bug")
        original(self, now)

    monkeypatch.setattr(front.FrontConnection, "sweep", sweep)
    broken_reader, broken = await asyncio.open_connection("127.0.0.1", service.port)
    await asyncio.sleep(0.05)
    assert service._front is not None
    failing.extend(service._front.connections)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    for stream in (broken_reader, reader):  # both closed: the failing one at once, the other when idle
        assert await asyncio.wait_for(stream.read(), 5) == b""
    await closed(writer)
    await closed(broken)


class TestSweep:
    async def test_handing_off_thousands_of_stalled_heads_does_not_freeze_the_loop(
        self, start_service: StartService
    ) -> None:
        """Connections (no secret needed) that sent a partial head all stall at once; the sweep handed them all to
        aiohttp in one callback, about 35 µs each: 3,000 froze every connection for 100 ms, 15,000 for half a
        second. In slices, no step holds the loop more than a few ms. The bound, 10 µs of the loop's CPU a
        connection (60 ms for 6,000), is far above what slicing gives (about 11 ms) and far below what one
        callback takes (170-330 ms)."""
        count = 6000
        service = await start_service({"server": {"max_connections": count + 100, "header_timeout": "30s"}})
        front = service._front
        assert front is not None
        loop = asyncio.get_running_loop()
        sockets: list[socket.socket] = []
        try:
            for _ in range(count):
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", service.port))
                sockets.append(sock)
            for _ in range(200):  # every connection accepted before the heads are sent
                if len(front.connections) >= count:
                    break
                await asyncio.sleep(0.02)
            for sock in sockets:  # within a few ms: they stall together, and one sweep finds them all
                sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            for _ in range(200):  # reading them is one long step of the loop too, whoever serves them: not timed
                if all(connection.buffer for connection in front.connections):
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
            assert front.handed_off == 0
            worst = 0.0
            deadline = time.monotonic() + STALL_SECONDS + 10
            # A full collection of this test's heap (12,000 sockets) takes 40-90 ms: not what is measured here
            # (the service freezes its start-up heap and collects the young generation less often).
            gc.disable()
            while front.handed_off < count and time.monotonic() < deadline:
                # The loop thread's CPU time across one short sleep: what the loop did in between, without the
                # time another process had this machine's cores (a wall-clock bound fails on a busy machine).
                started = time.thread_time()
                await asyncio.sleep(0.005)
                worst = max(worst, time.thread_time() - started)
        finally:
            gc.enable()
            for sock in sockets:
                sock.close()
        assert front.handed_off == count
        assert worst < count * 10e-6, f"the loop ran {worst * 1000:.0f} ms at once handing off {count} connections"


class TestUnreadAnswers:
    @pytest.mark.parametrize("last", [b"", post(b"[]", "Content-Encoding: br")], ids=["idle", "answer-closes"])
    async def test_a_client_that_stops_reading_its_answers_does_not_hold_its_connection(
        self, start_service: StartService, last: bytes
    ) -> None:
        """A client with the secret that sends requests, reads none of their answers and then sends nothing more:
        the front closes the connection (idle after header_timeout, or after an answer that closes it), but a
        transport closes only once its answers are written, which this client never lets happen. The connection
        outlived every timeout, counted against server.max_connections, until the client went away."""
        service = await start_service({"server": {"header_timeout": "1s"}})
        front = service._front
        assert front is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", service.port))
        try:
            for _ in range(200):
                if front.connections:
                    break
                await asyncio.sleep(0.01)
            (connection,) = front.connections
            transport = connection.transport
            # The kernel's buffers small, so that a few hundred answers fill them rather than megabytes.
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            one = post(b"x")  # answered 400 (neither JSON nor NDJSON) without closing, and without the journal
            for _ in range(5000):  # one request at a time, until an answer waits in the transport's own buffer
                if transport.get_write_buffer_size() > 0:
                    break
                sock.send(one)
                while connection.buffer or connection.task is not None:
                    await asyncio.sleep(0.001)
                await asyncio.sleep(0.002)
            assert transport.get_write_buffer_size() > 0 and not connection.writing_paused
            sock.send(last)
            for _ in range(300):  # header_timeout (1 s) to close, and as long again for the answers to be read
                if service._listener is not None and service._listener.open == 0:
                    break
                await asyncio.sleep(0.05)
            assert service._listener is not None and service._listener.open == 0
        finally:
            sock.close()


class TestHeadLimit:
    """aiohttp's limits (128 fields of 8190 bytes) let a head of about 1 MiB arrive, each field kept twice until the
    head ends: about 2 MiB held for header_timeout by each connection, from anyone (200 connections took 400 MB).
    A head is now refused once it grows past MAX_HEAD; what real senders send is not."""

    @pytest.mark.parametrize("before", [b"", post(batch(1, 1100))], ids=["first", "after-a-served-request"])
    async def test_a_head_that_does_not_end_is_refused_past_the_limit(
        self, start_service: StartService, before: bytes
    ) -> None:
        from receiver.front import MAX_HEAD

        service = await start_service({"server": {"header_timeout": "3s"}})
        fields = b"".join(b"X-Filler-%03d: %s\r\n" % (index, b"a" * 1000) for index in range(MAX_HEAD // 1000 + 4))
        source = "127.0.0.1" if before else "127.0.0.2"  # a stranger, or the sender once served
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port, local_addr=(source, 0))
        writer.write(before + b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields)  # and never the blank line
        answers = await asyncio.wait_for(reader.read(), 10)
        await closed(writer)
        assert answers.count(b"HTTP/1.") == (2 if before else 1), answers[:500]
        assert answers.rsplit(b"HTTP/1.", 1)[1][2:].startswith(b"400 "), answers[-300:]
        assert f"the request head is larger than {MAX_HEAD} bytes".encode() in answers

    async def test_the_limit_counts_the_whole_head_on_every_listener(self, start_service: StartService) -> None:
        """A head of MAX_HEAD bytes, its request line and final blank line counted, is read; one byte more is
        refused, as the stream front reads it and as aiohttp does (which took one byte more than the limit)."""
        from receiver.front import MAX_HEAD

        service = await start_service({"server": {"admin": {"port": 0}}})
        admin = int(service.admin_url.rsplit(":", 1)[1])

        def padded(start: bytes, size: int) -> bytes:
            fields = start + b"".join(b"X-Filler-%d: %s\r\n" % (index, b"a" * 4000) for index in range(3))
            head = fields + b"X-Last: " + b"a" * (size - len(fields) - len(b"X-Last: \r\n\r\n")) + b"\r\n\r\n"
            assert len(head) == size
            return head

        for size, status in ((MAX_HEAD, 200), (MAX_HEAD + 1, 400)):
            stream_post = padded(post(b"[]").split(b"\r\n\r\n")[0] + b"\r\n", size) + b"[]"  # the front's own
            health = padded(b"GET /healthz HTTP/1.1\r\nHost: x\r\n", size)  # aiohttp's
            for port, data in ((service.port, stream_post), (service.port, health), (admin, health)):
                answers = await responses(port, data)
                assert [essence(answer)[0] for answer in answers] == [status], (size, data[:40], answers)

    @pytest.mark.parametrize("listener", ["stream", "admin"])
    async def test_a_head_after_many_pipelined_requests_is_refused_past_the_limit(
        self, start_service: StartService, listener: str
    ) -> None:
        """Was a defect: aiohttp's parser stops between requests once 32 wait to be answered, and keeps what it
        was fed beyond them, to parse it whole once the queue drains. That rest went uncounted: after 48 requests
        in one write, a head of 40 KB was answered 200 (and one that never ended kept all of a read, up to
        256 KiB). The requests before it are answered, then the head is refused."""
        from receiver.front import MAX_HEAD

        service = await start_service({"server": {"admin": {"port": 0}}})
        port = service.port if listener == "stream" else int(service.admin_url.rsplit(":", 1)[1])
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        fields = b"".join(b"X-Filler-%03d: %s\r\n" % (index, b"a" * 8000) for index in range(5))
        answers = await responses(port, request * 48 + b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n", 49)
        assert [essence(answer)[0] for answer in answers] == [200] * 48 + [400], answers[-1:]
        assert f"the request head is larger than {MAX_HEAD} bytes".encode() in answers[-1], answers[-1]

    async def test_many_pipelined_requests_after_a_body_that_came_late_are_all_answered(
        self, start_service: StartService
    ) -> None:
        """aiohttp's parser counts a request taken before its body came as unanswered once the body has come: with
        31 requests queued after it, it stops between requests, and the queue, not full, never has it parse on
        (33 pipelined requests after a 100-continue POST were answered 31 times, then the connection waited for
        header_timeout)."""
        service = await start_service()
        body = batch(1, 1400)
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        try:
            writer.write(post(body, "Expect: 100-continue").removesuffix(body))
            await asyncio.wait_for(reader.readuntil(b"100 Continue\r\n\r\n"), 10)
            writer.write(body)
            first = await asyncio.wait_for(reader.readuntil(b"}"), 10)
            assert b" 200 " in first.split(b"\r\n", 1)[0], first
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 33)
            answers = [await asyncio.wait_for(reader.readuntil(b'{"status": "ok"}'), 10) for _ in range(33)]
        finally:
            await closed(writer)
        assert all(b"HTTP/1.1 200 " in answer for answer in answers), answers

    async def test_trailer_fields_that_do_not_end_are_refused_past_the_limit(self, start_service: StartService) -> None:
        """Was a defect: the fields after a chunked body's last chunk are a second head, which aiohttp keeps as
        it keeps a head (up to 128 fields of 8190 bytes, as bytes and as text), and which the limit did not
        count: 200 connections sending trailer fields that never end took RSS from 56 to 436 MiB, each held
        while its answer lingered. Past MAX_HEAD of a body's framing with no data, the body fails (a request
        reading it is answered 400) and the connection is refused."""
        from receiver.front import MAX_HEAD

        service = await start_service({"server": {"body_timeout": "3s"}})
        body = batch(1, 1500)
        fields = b"".join(b"X-Trailer-%03d: %s\r\n" % (index, b"a" * 8000) for index in range(100))
        request = post(b"%x\r\n%s\r\n0\r\n" % (len(body), body), "Transfer-Encoding: chunked", length=False)
        answers = await responses(service.port, request + fields, 2)  # and never the blank line
        assert [essence(answer)[:2] for answer in answers] == [
            (400, b'{"error":"the body is malformed (chunked encoding) or was cut off"}'),
            (400, f'{{"error":"the chunked body\'s trailer fields are larger than {MAX_HEAD} bytes"}}'.encode()),
        ], answers

    async def test_what_senders_send_is_not_refused(self, pair: tuple[Service, Service]) -> None:
        """A head just under the limit, a chunked body in a thousand small chunks, a body aiohttp streams with a
        request after it in the same write: the same answers as before the limit, from both fronts."""
        from receiver.front import MAX_HEAD

        half = "a" * (MAX_HEAD // 2 - 300)
        large = post(batch(1, 1200), f"X-Large-1: {half}", f"X-Large-2: {half}")
        body = batch(1, 1201)
        chunks = b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n"
        chunked = post(chunks, "Transfer-Encoding: chunked", length=False)
        padded = post(b"[" + b" " * (400 * 1024) + batch(1, 1202)[1:])
        health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        for service in pair:
            for data, count in ((large, 1), (chunked, 1), (padded + health, 2)):
                answers = await responses(service.port, data, count)
                assert [essence(a)[0] for a in answers] == [200] * count, answers
                assert b'"accepted":1' in answers[0], answers[0]

    @pytest.mark.parametrize("over_tls", [False, True], ids=["plain", "tls"])
    async def test_a_client_still_sending_its_head_reads_the_refusal(
        self, start_service: StartService, tmp_path: Path, over_tls: bool
    ) -> None:
        """The refusal comes while the client is still sending (here 800 KB of head, then a body): what it sends
        after is read and dropped, so that its writes end and it reads the answer, not a connection reset (a
        socket closed with bytes unread is reset)."""
        if over_tls:
            service, context = await tls_service(start_service, tmp_path)
        else:
            service, context = await start_service(), None
        fields = [f"X-Filler-{index:03d}: {'a' * 8000}" for index in range(100)]
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port, ssl=context)
        try:
            writer.write(post(batch(1, 1300), *fields))
            await asyncio.wait_for(writer.drain(), 10)
            answer = await asyncio.wait_for(reader.readuntil(b"}"), 10)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.0 400 "), answer  # as aiohttp answers any head it cannot parse
        assert answer.endswith(b'{"error":"the request head is larger than 16384 bytes"}'), answer

    async def test_a_connection_read_on_after_its_refusal_ends_with_the_service(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client that reads its refusal and keeps its connection open is read on for LINGER_SECONDS (here an
        hour); a stop meanwhile closes it rather than leave it to outlive the service: what the client sends then
        is answered with a reset."""
        monkeypatch.setattr("receiver.server.LINGER_SECONDS", 3600.0)
        service = await start_service({"server": {"header_timeout": "30s"}})
        fields = [f"X-Filler-{index:03d}: {'a' * 8000}" for index in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)

        async def reset() -> bool:
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b"more of the same\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
            return True

        try:
            writer.write(post(b"[]", *fields))
            answer = await asyncio.wait_for(reader.readuntil(b"}"), 10)
            assert b" 400 " in answer.split(b"\r\n", 1)[0], answer
            writer.write(b"more of the same\r\n")  # still read, and dropped
            await writer.drain()
            await service.stop()
            assert await asyncio.wait_for(reset(), 10)
        finally:
            writer.close()

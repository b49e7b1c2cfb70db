"""The HTTP intake against a real server on loopback: who may post, what bodies are accepted, what is stored."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.journal import list_dead_letters
from receiver.samples import encode_body, sample_wrappers
from receiver.server import Service, server_tls_context
from tests.conftest import TOKEN, StartService, memory, scrape

AUTH = {"Authorization": TOKEN}


async def post(
    client: aiohttp.ClientSession,
    service: Service,
    body: bytes,
    headers: dict[str, str] | None = None,
    path: str = "/workos",
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with client.post(service.url + path, data=body, headers={**AUTH, **(headers or {})}) as response:
        text = await response.read()
        try:
            payload = orjson.loads(text)
        except orjson.JSONDecodeError:
            payload = text
        return response.status, payload, response.headers


async def delivered(count: int, name: str = "mem", timeout: float = 5.0) -> list[dict[str, Any]]:
    """Wait until the memory sink holds `count` events; returns their wrappers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(memory(name).events) < count and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return [event.wrapper for event in memory(name).events]


class TestAccepting:
    async def test_json_array_is_committed_and_delivered_unchanged(self, start_service: StartService, client) -> None:
        service = await start_service()
        wrappers = sample_wrappers(5)
        wrappers[0]["unknownField"] = {"kept": [1, 2]}
        status, payload, _ = await post(client, service, orjson.dumps(wrappers), {"Content-Type": "application/json"})
        assert (status, payload) == (200, {"accepted": 5, "duplicates": 0, "dead_lettered": 0})
        assert await delivered(5) == wrappers

    async def test_ndjson_by_content_type(self, start_service: StartService, client) -> None:
        service = await start_service()
        wrappers = sample_wrappers(4)
        body, content_type = encode_body(wrappers, "ndjson")
        status, payload, _ = await post(client, service, body, {"Content-Type": content_type})
        assert (status, payload["accepted"]) == (200, 4)
        assert await delivered(4) == wrappers

    @pytest.mark.parametrize("content_type", ["", "text/plain", "application/json", "application/octet-stream"])
    async def test_ndjson_with_missing_or_wrong_content_type_is_sniffed(
        self, start_service: StartService, client, content_type: str
    ) -> None:
        service = await start_service()
        body, _ = encode_body(sample_wrappers(3), "ndjson")
        status, payload, _ = await post(client, service, body, {"Content-Type": content_type})
        assert (status, payload["accepted"]) == (200, 3)

    async def test_json_array_sent_as_ndjson_is_sniffed(self, start_service: StartService, client) -> None:
        service = await start_service()
        status, payload, _ = await post(
            client, service, orjson.dumps(sample_wrappers(2)), {"Content-Type": "application/x-ndjson"}
        )
        assert (status, payload["accepted"]) == (200, 2)

    async def test_bare_event_is_wrapped(self, start_service: StartService, client) -> None:
        service = await start_service()
        bare = sample_wrappers(1)[0]["event"]
        status, payload, _ = await post(client, service, orjson.dumps([bare]))
        assert (status, payload["accepted"]) == (200, 1)
        assert await delivered(1) == [{"event": bare}]

    async def test_mixed_batch_keeps_good_events_and_dead_letters_the_rest(
        self, start_service: StartService, client
    ) -> None:
        service = await start_service()
        good = sample_wrappers(3)
        body = orjson.dumps([good[0], 42, {"no": "event"}, good[1], {"event": "not an object"}, good[2], None])
        status, payload, _ = await post(client, service, body)
        assert (status, payload) == (200, {"accepted": 3, "duplicates": 0, "dead_lettered": 4})
        assert await delivered(3) == good
        letters = list_dead_letters(service.config.journal.path)
        assert [orjson.loads(letter.data) for letter in letters] == [
            42,
            {"no": "event"},
            {"event": "not an object"},
            None,
        ]
        assert all(letter.sink == "(intake)" and letter.reason for letter in letters)
        assert "number" in letters[0].reason and "no event" in letters[1].reason

    async def test_ndjson_line_that_is_not_json_is_kept_aside(self, start_service: StartService, client) -> None:
        service = await start_service()
        good = sample_wrappers(2)
        body = orjson.dumps(good[0]) + b"\n{broken json\n" + orjson.dumps(good[1]) + b"\n"
        status, payload, _ = await post(client, service, body, {"Content-Type": "application/x-ndjson"})
        assert (status, payload) == (200, {"accepted": 2, "duplicates": 0, "dead_lettered": 1})
        (letter,) = list_dead_letters(service.config.journal.path)
        assert letter.data == b"{broken json" and "line 2" in letter.reason

    async def test_a_flood_of_dead_letters_is_counted_but_logged_a_few_lines_a_second(
        self, start_service: StartService, client, caplog: pytest.LogCaptureFixture
    ) -> None:
        service = await start_service()
        caplog.set_level(logging.INFO)
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as keep_alive:  # one connection
            for _ in range(300):
                status, payload, _ = await post(keep_alive, service, b"[42]")
                assert (status, payload["dead_lettered"]) == (200, 1)
        elapsed = time.monotonic() - started
        lines = [r for r in caplog.records if r.name.startswith("receiver") and r.levelno >= logging.WARNING]
        dead = [r for r in lines if r.getMessage() == "elements dead-lettered at intake"]
        # The refusals' limit: a burst of 10, then 2 a second, each possibly after its "suppressed" summary.
        assert 0 < len(lines) <= 2 * (10 + 2 * elapsed), f"{len(lines)} lines for 300 requests in {elapsed:.1f} s"
        assert dead and all("number" in vars(r)["reason"] and vars(r)["elements"] == 1 for r in dead)
        async with client.get(service.url + "/metrics") as response:
            assert 'log_bridge_events_dead_lettered_total{stage="intake"} 300.0' in await response.text()

    async def test_empty_array_is_fine(self, start_service: StartService, client) -> None:
        service = await start_service()
        status, payload, _ = await post(client, service, b"[]")
        assert (status, payload["accepted"]) == (200, 0)


class TestDedup:
    async def test_retried_batch_is_acknowledged_but_not_delivered_again(
        self, start_service: StartService, client
    ) -> None:
        service = await start_service()
        body = orjson.dumps(sample_wrappers(5))
        assert (await post(client, service, body))[1] == {"accepted": 5, "duplicates": 0, "dead_lettered": 0}
        assert (await post(client, service, body))[1] == {"accepted": 0, "duplicates": 5, "dead_lettered": 0}
        await delivered(5)
        await asyncio.sleep(0.2)
        assert len(memory().events) == 5

    async def test_event_id_is_the_key_without_key_suffix(self, start_service: StartService, client) -> None:
        service = await start_service()
        bare = [w["event"] for w in sample_wrappers(2)]
        await post(client, service, orjson.dumps(bare))
        status, payload, _ = await post(client, service, orjson.dumps(bare + [sample_wrappers(1)[0]["event"]]))
        assert payload == {"accepted": 1, "duplicates": 2, "dead_lettered": 0}

    async def test_duplicate_inside_one_batch(self, start_service: StartService, client) -> None:
        service = await start_service()
        wrapper = sample_wrappers(1)[0]
        status, payload, _ = await post(client, service, orjson.dumps([wrapper, wrapper]))
        assert payload == {"accepted": 1, "duplicates": 1, "dead_lettered": 0}

    async def test_key_is_forgotten_after_the_window(self, start_service: StartService, client) -> None:
        service = await start_service({"journal": {"dedup_window": "200ms"}})
        body = orjson.dumps(sample_wrappers(2))
        await post(client, service, body)
        await asyncio.sleep(0.3)
        assert (await post(client, service, body))[1]["accepted"] == 2


class TestRefusing:
    async def test_wrong_or_missing_secret_is_401_without_echoing_it(self, start_service: StartService, client) -> None:
        service = await start_service()
        body = orjson.dumps(sample_wrappers(1))
        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}, {}):
            async with client.post(service.url + "/workos", data=body, headers=headers) as response:
                assert response.status == 401
                text = await response.text()
                assert "wrong" not in text.replace("wrong Authorization", "") and "test-secret" not in text
        assert memory().events == []

    async def test_any_of_several_secrets_is_accepted_for_rotation(self, start_service: StartService, client) -> None:
        service = await start_service(
            {
                "streams": [
                    {
                        "name": "workos",
                        "path": "/workos",
                        "auth": {"header": "X-Stream-Secret", "values": ["old", "new"]},
                        "sinks": ["mem"],
                    }
                ]
            }
        )
        for secret in ("old", "new"):
            async with client.post(service.url + "/workos", data=b"[]", headers={"X-Stream-Secret": secret}) as r:
                assert r.status == 200

    async def test_unknown_path_is_404(self, start_service: StartService, client) -> None:
        service = await start_service()
        status, _, _ = await post(client, service, b"[]", path="/other")
        assert status == 404

    @pytest.mark.parametrize(
        ("body", "where"),
        [
            (b"hello world", "must start with"),
            (b"[1, 2", "truncated"),
            (b'{"a": }', "not valid JSON"),
            (b"   ", "empty body"),
        ],
    )
    async def test_unparseable_body_is_400_saying_where(
        self, start_service: StartService, client, body: bytes, where: str
    ) -> None:
        service = await start_service()
        status, payload, _ = await post(client, service, body)
        assert status == 400 and where in payload["error"]
        assert list_dead_letters(service.config.journal.path) == []

    async def test_content_length_over_limit_is_413(self, start_service: StartService, client) -> None:
        service = await start_service({"server": {"max_body_bytes": 1000}})
        status, payload, _ = await post(client, service, b"[" + b" " * 2000 + b"]")
        assert status == 413 and "max_body_bytes" in payload["error"]

    async def test_chunked_body_over_limit_is_413(self, start_service: StartService, client) -> None:
        service = await start_service({"server": {"max_body_bytes": 1000}})

        async def chunks():  # no Content-Length: the limit must hold while reading
            for _ in range(10):
                yield b" " * 500

        async with client.post(service.url + "/workos", data=chunks(), headers=AUTH) as response:
            assert response.status == 413

    @pytest.mark.parametrize("encoding", ["gzip", "zstd"])
    async def test_compressed_bodies(self, start_service: StartService, client, encoding: str) -> None:
        service = await start_service()
        raw = orjson.dumps(sample_wrappers(20))
        body = gzip.compress(raw) if encoding == "gzip" else zstandard.compress(raw)
        status, payload, _ = await post(client, service, body, {"Content-Encoding": encoding})
        assert (status, payload["accepted"]) == (200, 20)

    @pytest.mark.parametrize("encoding", ["gzip", "zstd"])
    async def test_decompression_bomb_is_413(self, start_service: StartService, client, encoding: str) -> None:
        service = await start_service({"server": {"max_body_bytes": "1MiB"}})
        bomb_plain = b"[" + b" " * (50 * 1024 * 1024) + b"]"
        body = gzip.compress(bomb_plain) if encoding == "gzip" else zstandard.compress(bomb_plain)
        assert len(body) < 1024 * 1024
        status, payload, _ = await post(client, service, body, {"Content-Encoding": encoding})
        assert status == 413 and "decompressed" in payload["error"]

    async def test_corrupt_gzip_is_400(self, start_service: StartService, client) -> None:
        service = await start_service()
        status, _, _ = await post(client, service, b"\x1f\x8b\x08garbage", {"Content-Encoding": "gzip"})
        assert status == 400

    async def test_unknown_encoding_is_415(self, start_service: StartService, client) -> None:
        service = await start_service()
        status, _, _ = await post(client, service, b"[]", {"Content-Encoding": "br"})
        assert status == 415

    async def test_journal_over_cap_is_503_with_retry_after(self, start_service: StartService, client) -> None:
        service = await start_service({"journal": {"max_bytes": 4096}})
        statuses = []
        for _ in range(20):
            status, _, headers = await post(client, service, orjson.dumps(sample_wrappers(50)))
            statuses.append(status)
            if status == 503:
                assert int(headers["Retry-After"]) > 0
                break
        assert statuses[-1] == 503
        async with client.get(service.url + "/readyz") as response:
            assert response.status == 503

    async def test_a_journal_that_refuses_every_request_is_logged_a_few_lines_a_second(
        self, start_service: StartService, client, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Was a defect: "journal full: refusing a batch" was logged at ERROR for every refused request, so while
        the journal refused (over its cap, a full disk, dead letters at their cap) every retry and every client
        with the secret added a line. Now through a rate limit of its own (ERROR, a burst of 10, then 2 a
        second), with the count in log_bridge_requests_refused_total{reason="journal_full"}."""
        service = await start_service({"journal": {"max_dead_letter_bytes": "1KiB"}})
        caplog.set_level(logging.INFO)
        bad = b"[" + orjson.dumps("x" * 2048) + b"]"  # one element to dead-letter, past the dead letters' cap
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as keep_alive:
            assert (await post(keep_alive, service, bad))[0] == 200  # taken while there are no dead letters
            for _ in range(300):
                status, _, headers = await post(keep_alive, service, bad)
                assert status == 503 and int(headers["Retry-After"]) > 0
        elapsed = time.monotonic() - started
        full = [r for r in caplog.records if r.getMessage() == "journal full: refusing a batch"]
        assert full and all(r.levelno == logging.ERROR for r in full)
        lines = [r for r in caplog.records if r.name.startswith("receiver") and r.levelno >= logging.WARNING]
        assert len(lines) <= 2 * (10 + 2 * elapsed), f"{len(lines)} lines for 300 refusals in {elapsed:.1f} s"
        async with client.get(service.url + "/metrics") as response:
            assert 'log_bridge_requests_refused_total{reason="journal_full",stream="workos"} 300.0' in (
                await response.text()
            )

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        body=st.one_of(
            st.binary(max_size=300),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                max_leaves=12,
            ).map(lambda value: json.dumps(value).encode()),
        ),
        content_type=st.sampled_from(["application/json", "application/x-ndjson", "", "text/plain"]),
        encoding=st.sampled_from(["identity", "gzip", "zstd", "gzip-raw"]),
    )
    async def test_no_body_yields_a_5xx(self, shared_service: Service, body: bytes, content_type: str, encoding: str):
        headers = {**AUTH, "Content-Type": content_type}
        if encoding == "gzip":
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        elif encoding == "zstd":
            body, headers["Content-Encoding"] = zstandard.compress(body), "zstd"
        elif encoding == "gzip-raw":  # claims gzip, is not
            headers["Content-Encoding"] = "gzip"
        async with (
            aiohttp.ClientSession() as session,
            session.post(shared_service.url + "/workos", data=body, headers=headers) as response,
        ):
            assert response.status < 500, await response.text()
            assert response.status in (200, 400, 413, 415)


@pytest.fixture
async def shared_service(start_service: StartService) -> Service:
    return await start_service()


class TestAllowlist:
    async def post_from(self, service: Service, source: str, headers: dict[str, str] | None = None) -> int:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(service.url + "/workos", data=b"[]", headers={**AUTH, **(headers or {})}) as response,
        ):
            return response.status

    async def test_only_allowed_source_addresses(self, start_service: StartService) -> None:
        service = await start_service({"server": {"allowlist": ["127.0.0.1/32", "127.0.0.4/32"]}})
        assert await self.post_from(service, "127.0.0.1") == 200
        assert await self.post_from(service, "127.0.0.4") == 200
        assert await self.post_from(service, "127.0.0.2") == 403

    async def test_403_comes_before_authentication(self, start_service: StartService) -> None:
        service = await start_service()
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(service.url + "/workos", data=b"[]") as response,
        ):
            assert response.status == 403

    async def test_forwarded_for_is_believed_only_from_a_trusted_proxy(self, start_service: StartService) -> None:
        service = await start_service(
            {"server": {"allowlist": ["52.1.251.34/32", "127.0.0.1/32"], "trusted_proxies": ["127.0.0.3/32"]}}
        )
        # From the trusted proxy: the right-most untrusted hop is the client.
        assert await self.post_from(service, "127.0.0.3", {"X-Forwarded-For": "52.1.251.34"}) == 200
        assert await self.post_from(service, "127.0.0.3", {"X-Forwarded-For": "198.51.100.9"}) == 403
        # A spoofed left-most entry is never believed.
        assert await self.post_from(service, "127.0.0.3", {"X-Forwarded-For": "52.1.251.34, 198.51.100.9"}) == 403
        # From an untrusted peer the header is ignored: its own address decides.
        assert await self.post_from(service, "127.0.0.2", {"X-Forwarded-For": "52.1.251.34"}) == 403
        assert await self.post_from(service, "127.0.0.1", {"X-Forwarded-For": "198.51.100.9"}) == 200

    async def test_workos_keyword_and_ipv6(self, start_service: StartService) -> None:
        service = await start_service(
            {"server": {"host": "::1", "allowlist": ["workos"], "trusted_proxies": ["::1/128"]}}
        )
        connector = aiohttp.TCPConnector()
        async with aiohttp.ClientSession(connector=connector) as session:
            for forwarded, expected in (("174.129.36.47", 200), ("2001:db8::1", 403), ("::1", 403)):
                async with session.post(
                    service.url + "/workos", data=b"[]", headers={**AUTH, "X-Forwarded-For": forwarded}
                ) as response:
                    assert response.status == expected, forwarded


class TestBrowsers:
    """A web page open in a browser on the receiver's machine reaches a loopback receiver from an allowed address
    (a form or a fetch() to http://127.0.0.1:8080/workos needs no CORS preflight with a text/plain or form
    body): on a stream without a secret, as `serve` without a configuration runs, it could write forged audit
    events. A browser says where such a request comes from in `Origin`; WorkOS's servers never send one."""

    async def test_a_request_with_an_origin_is_refused_on_a_stream_without_a_secret(
        self, start_service: StartService, client: aiohttp.ClientSession
    ) -> None:
        service = await start_service({"streams": [{"name": "workos", "path": "/workos", "sinks": ["mem"]}]})
        forged = orjson.dumps(sample_wrappers(1))
        for extra in ({"Origin": "https://attacker.example"}, {"Origin": "null"}):
            headers = {"Content-Type": "text/plain", **extra}
            async with client.post(service.url + "/workos", data=forged, headers=headers) as response:
                assert response.status == 403, extra
                assert "web browser" in (await response.json())["error"]
        async with client.post(service.url + "/workos", data=forged) as response:
            assert response.status == 200  # the same request, as a server sends it
        assert len(await delivered(1)) == 1
        refused = scrape(service.metrics.render().decode(), "log_bridge_requests_refused_total", reason="not_allowed")
        assert refused == 2

    async def test_with_a_secret_the_secret_decides(
        self, start_service: StartService, client: aiohttp.ClientSession
    ) -> None:
        # A page cannot send the secret header without a CORS preflight the receiver never approves, and does not
        # know the secret: an Origin there refuses nothing (a sender that adds one is not cut off).
        service = await start_service()
        forged = orjson.dumps(sample_wrappers(1))
        headers = {"Content-Type": "text/plain", "Origin": "https://attacker.example"}
        async with client.post(service.url + "/workos", data=forged, headers=headers) as response:
            assert response.status == 401
        async with client.post(service.url + "/workos", data=forged, headers={**headers, **AUTH}) as response:
            assert response.status == 200


class TestTLS:
    @pytest.fixture
    def pki(self, tmp_path: Path) -> dict[str, Any]:
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client_ca = trustme.CA()
        client_cert = client_ca.issue_cert("workos-client")
        paths = {"cert": tmp_path / "tls.crt", "key": tmp_path / "tls.key", "client_ca": tmp_path / "client-ca.crt"}
        server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
        for pem in server.cert_chain_pems[1:]:
            pem.write_to_path(str(paths["cert"]), append=True)
        server.private_key_pem.write_to_path(str(paths["key"]))
        client_ca.cert_pem.write_to_path(str(paths["client_ca"]))
        return {"ca": ca, "client_ca": client_ca, "client_cert": client_cert, "paths": paths}

    async def test_https_with_tls12_minimum(self, start_service: StartService, pki: dict[str, Any]) -> None:
        p = pki["paths"]
        service = await start_service({"server": {"tls": {"cert_file": str(p["cert"]), "key_file": str(p["key"])}}})
        context = ssl.create_default_context()
        pki["ca"].configure_trust(context)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                service.url + "/workos", data=orjson.dumps(sample_wrappers(2)), headers=AUTH, ssl=context
            ) as response,
        ):
            assert response.status == 200
        # Clients cannot be made to offer TLS 1.1 here (OpenSSL refuses it first), so check the listener's own
        # floor, and what a real handshake negotiated.
        assert server_tls_context(service.config.server.tls).minimum_version is ssl.TLSVersion.TLSv1_2
        _, writer = await asyncio.open_connection("127.0.0.1", service.port, ssl=context, server_hostname="127.0.0.1")
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        writer.close()
        await writer.wait_closed()

    async def test_mutual_tls_requires_a_client_certificate(
        self, start_service: StartService, pki: dict[str, Any]
    ) -> None:
        p = pki["paths"]
        service = await start_service(
            {
                "server": {
                    "tls": {
                        "cert_file": str(p["cert"]),
                        "key_file": str(p["key"]),
                        "client_ca_file": str(p["client_ca"]),
                    }
                }
            }
        )
        anonymous = ssl.create_default_context()
        pki["ca"].configure_trust(anonymous)
        with pytest.raises(aiohttp.ClientError):
            async with (
                aiohttp.ClientSession() as session,
                session.post(service.url + "/workos", data=b"[]", headers=AUTH, ssl=anonymous) as response,
            ):
                await response.read()
        with_cert = ssl.create_default_context()
        pki["ca"].configure_trust(with_cert)
        pki["client_cert"].configure_cert(with_cert)
        async with (
            aiohttp.ClientSession() as session,
            session.post(service.url + "/workos", data=b"[]", headers=AUTH, ssl=with_cert) as response,
        ):
            assert response.status == 200


class TestSlowClients:
    async def test_headers_that_never_finish_close_the_connection(self, start_service: StartService) -> None:
        service = await start_service({"server": {"header_timeout": "300ms"}})
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(b"POST /workos HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        started = asyncio.get_running_loop().time()
        data = await asyncio.wait_for(reader.read(), timeout=5)
        assert data == b"" and asyncio.get_running_loop().time() - started < 3
        writer.close()

    async def test_body_that_never_finishes_gets_408(self, start_service: StartService) -> None:
        service = await start_service({"server": {"body_timeout": "300ms"}})
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(
            f"POST /workos HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\nContent-Length: 100\r\n\r\n[".encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=5)
        assert status_line.startswith(b"HTTP/1.1 408")
        writer.close()

    @pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
    async def test_a_client_gone_mid_body_is_no_internal_error(
        self, start_service: StartService, caplog: pytest.LogCaptureFixture, chunked: bool
    ) -> None:
        """A client that closes its connection mid-body (a body aiohttp reads: over the front's limit, or
        chunked) made the body read raise ConnectionResetError, counted as `internal_error` (a defect, which
        alerts) and logged as an unexpected error; it is `client_disconnected`, and its budget is given back."""
        service = await start_service()
        framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: 1000000"
        head = f"POST /workos HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n{framing}\r\n\r\n".encode()
        half = b"[" + b" " * 500_000
        body = b"%x\r\n%s\r\n" % (len(half), half) if chunked else half
        caplog.set_level(logging.WARNING)
        for _ in range(50):
            _, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(head + body)
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        text = service.metrics.render().decode()
        for _ in range(100):
            if service.state.budget.used == 0 and scrape(text, REFUSED, stream="workos", reason=GONE) == 50:
                break
            await asyncio.sleep(0.02)
            text = service.metrics.render().decode()
        counts = {reason: scrape(text, REFUSED, stream="workos", reason=reason) for reason in (GONE, "internal_error")}
        assert counts == {GONE: 50.0, "internal_error": 0.0}
        assert service.state.budget.used == 0
        assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


REFUSED = "log_bridge_requests_refused_total"
GONE = "client_disconnected"


class TestOperations:
    async def test_health_ready_metrics(self, start_service: StartService, client) -> None:
        service = await start_service()
        await post(client, service, orjson.dumps(sample_wrappers(3) + [7]))
        await post(client, service, b"[]", {"Authorization": "nope"})
        await delivered(3)
        async with client.get(service.url + "/healthz") as r:
            assert r.status == 200
        async with client.get(service.url + "/readyz") as r:
            assert r.status == 200
        async with client.get(service.url + "/metrics") as r:
            text = await r.text()
        assert 'log_bridge_requests_total{code="200",stream="workos"} 1.0' in text
        assert 'log_bridge_requests_total{code="401",stream="workos"} 1.0' in text
        assert 'log_bridge_events_received_total{stream="workos"} 3.0' in text
        assert 'log_bridge_events_dead_lettered_total{stage="intake"} 1.0' in text
        assert 'log_bridge_sink_events_delivered_total{sink="mem"} 3.0' in text
        assert "log_bridge_journal_bytes " in text and "log_bridge_request_duration_seconds_bucket" in text
        assert "test-secret" not in text and "nope" not in text

    async def test_draining_service_answers_503(self, start_service: StartService, client) -> None:
        service = await start_service()
        service.state.draining = True
        status, _, headers = await post(client, service, b"[]")
        assert status == 503 and headers["Retry-After"]
        service.state.draining = False

"""The Datadog sink against the local Datadog intake (tests.peers.datadog), through the real client."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from datadog_api_client.model_utils import data_to_dict
from datadog_api_client.v1.api.authentication_api import AuthenticationApi
from datadog_api_client.v2.api.logs_api import LogsApi
from datadog_api_client.v2.model.content_encoding import ContentEncoding
from datadog_api_client.v2.model.http_log import HTTPLog
from datadog_api_client.v2.model.http_log_item import HTTPLogItem
from pydantic import SecretStr, ValidationError

from sinks import http_client, registry
from sinks.base import Event, Outcome
from sinks.datadog import MAX_ITEM_BYTES, MAX_ITEMS, MAX_PAYLOAD_BYTES, SITES, DatadogConfig, DatadogSink
from sinks.errors import SinkError
from sinks.testing.compliance import make_events
from sinks.testing.exact import EXACT_LITERALS, exact_event, same_json
from tests.conftest import http_peer
from tests.peers.datadog import DatadogIntake

API_KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def intake() -> AsyncIterator[DatadogIntake]:
    """A running local intake that accepts API_KEY and insists on gzip."""
    server = DatadogIntake(API_KEY, require_gzip=True)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def make_sink(intake: DatadogIntake | None = None, **options: Any) -> DatadogSink:
    options.setdefault("api_key", API_KEY)
    if intake is not None:
        options.setdefault("endpoint", intake.url)
    return DatadogSink("datadog", DatadogSink.Config.model_validate(options))


@pytest.fixture
async def sink(intake: DatadogIntake) -> AsyncIterator[DatadogSink]:
    """A Datadog sink pointed at the intake."""
    built = make_sink(intake)
    try:
        yield built
    finally:
        await built.close()


def big_events(count: int, size: int, *, start_seq: int = 1) -> list[Event]:
    """Events whose metadata makes each about `size` bytes."""
    events = make_events(count, start_seq=start_seq)
    out = []
    for event in events:
        wrapper = orjson.loads(event.raw)
        wrapper["event"]["metadata"] = {"blob": "x" * size}
        out.append(
            Event(
                event.seq,
                event.stream,
                orjson.dumps(wrapper),
                action=event.action,
                time=event.time,
                received_at=event.received_at,
            )
        )
    return out


def ids(events: list[dict[str, Any]]) -> list[str]:
    return sorted(str(e["id"]) for e in events)


class TestConfig:
    def test_example_from_the_issue_validates(self) -> None:
        config = DatadogConfig.model_validate(
            {"api_key": "k", "site": "datadoghq.eu", "service": "audit-logs", "source": "workos"}
        )
        assert config.site == "datadoghq.eu"
        assert config.compression == "gzip"
        assert config.tags == ()
        assert config.endpoint is None

    def test_every_key(self) -> None:
        config = DatadogConfig.model_validate(
            {
                "api_key": "k",
                "site": "us5.datadoghq.com",
                "service": "s",
                "source": "workos",
                "tags": ["env:prod", "team:security"],
                "hostname": "log-bridge",
                "compression": "none",
                "endpoint": "http://127.0.0.1:9999/",
                "timeout": "5s",
            }
        )
        assert config.endpoint == "http://127.0.0.1:9999"
        assert config.timeout == 5.0
        assert config.tags == ("env:prod", "team:security")

    def test_tags_may_be_one_string(self) -> None:
        assert DatadogConfig.model_validate({"api_key": "k", "tags": "env:prod, team:sec"}).tags == (
            "env:prod",
            "team:sec",
        )

    def test_unknown_site_lists_the_valid_ones(self) -> None:
        with pytest.raises(ValidationError) as info:
            DatadogConfig.model_validate({"api_key": "k", "site": "datadoghq.moon"})
        text = str(info.value)
        assert "unknown Datadog site 'datadoghq.moon'" in text
        for site in SITES:
            assert site in text

    @pytest.mark.parametrize(
        "options",
        [
            {},
            {"api_key": ""},
            {"api_key": "k", "compression": "zstd"},
            {"api_key": "k", "endpoint": "ftp://x"},
            {"api_key": "k", "timeout": 0},
            {"api_key": "k", "tags": ["a,b"]},
            {"api_key": "k", "index": "main"},
        ],
    )
    def test_rejects(self, options: dict[str, Any]) -> None:
        with pytest.raises(ValidationError):
            DatadogConfig.model_validate(options)

    def test_key_is_secret(self) -> None:
        config = DatadogConfig.model_validate({"api_key": f" {API_KEY}\n"})
        assert isinstance(config.api_key, SecretStr) and config.api_key.get_secret_value() == API_KEY
        sink = DatadogSink("dd", config)
        assert API_KEY not in repr(config) and API_KEY not in repr(sink)

    def test_registry_loads_it(self) -> None:
        assert registry.load("datadog") is DatadogSink


class TestSites:
    @pytest.mark.parametrize("site", SITES)
    def test_site_maps_to_its_intake(self, site: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DD_SITE", "datadoghq.com" if site != "datadoghq.com" else "datadoghq.eu")
        sink = make_sink(site=site)
        assert sink.logs_url == f"https://http-intake.logs.{site}/api/v2/logs"
        assert sink.validate_url == f"https://api.{site}/api/v1/validate"
        seen: list[str] = []

        def capture(method: str, url: str, **_: Any) -> Any:
            seen.append(url)
            raise RuntimeError("captured")

        # The URLs the client's own calls would use, for the same client configuration.
        client = sink._client
        monkeypatch.setattr(client.rest_client, "request", capture)
        with pytest.raises(RuntimeError):
            LogsApi(client).submit_log(body=HTTPLog([HTTPLogItem(message="x")]))
        with pytest.raises(RuntimeError):
            AuthenticationApi(client).validate()
        assert seen == [sink.logs_url, sink.validate_url]

    def test_endpoint_overrides_the_site(self) -> None:
        sink = make_sink(site="datadoghq.eu", endpoint="http://127.0.0.1:9999/proxy")
        assert sink.logs_url == "http://127.0.0.1:9999/proxy/api/v2/logs"
        assert sink.validate_url == "http://127.0.0.1:9999/proxy/api/v1/validate"

    def test_our_sites_are_the_clients(self) -> None:
        client = make_sink()._client
        servers = LogsApi(client)._submit_log_endpoint.settings["servers"]
        assert set(SITES) == set(servers[0]["variables"]["site"]["enum_values"])


class TestEncoding:
    def test_item_is_what_the_client_models_serialise_to(self) -> None:
        sink = make_sink(source="workos", service="audit-logs", tags=["env:prod", "team:security"], hostname="h")
        event = make_events(1)[0]
        item = orjson.loads(sink.encode(event))
        model = HTTPLogItem(
            message=event.event_raw.decode(),
            ddsource="workos",
            service="audit-logs",
            ddtags="env:prod,team:security",
            hostname="h",
        )
        assert item == data_to_dict(model)
        assert orjson.loads(item["message"]) == event.event

    def test_defaults_follow_workos_native_format(self) -> None:
        event = make_events(1)[0]
        item = orjson.loads(make_sink().encode(event))
        assert item["ddsource"] == event.source == "compliance"
        assert item["service"] == "audit-logs"
        assert "ddtags" not in item and "hostname" not in item

    def test_source_falls_back_to_workos(self) -> None:
        event = make_events(1)[0]
        wrapper = orjson.loads(event.raw)
        del wrapper["source"]
        bare = Event(1, "s", orjson.dumps(wrapper), action=event.action, time=event.time, received_at=event.time)
        assert orjson.loads(make_sink().encode(bare))["ddsource"] == "workos"


class TestExactValues:
    async def test_the_message_datadog_receives_is_the_event_text_workos_sent(
        self, intake: DatadogIntake, sink: DatadogSink
    ) -> None:
        events = [make_events(1)[0], exact_event(2)]
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS and not result.failures, result
        assert [item["message"] for item in intake.logs] == [event.event_raw.decode() for event in events]
        message = intake.logs[1]["message"]
        assert all(literal.decode() in message for literal in EXACT_LITERALS)
        assert same_json(message, events[1].event_raw)  # strict JSON, values as sent
        assert intake.logs[1]["ddsource"] == "team-exact"

    async def test_the_client_models_carry_the_same_message(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        # Whoever builds the request (here datadog-api-client's own models and serialiser), the message is
        # the event's text as received.
        event = exact_event()
        api = LogsApi(sink._client)
        item = HTTPLogItem(message=event.event_raw.decode(), ddsource="team-exact", service="audit-logs")
        await asyncio.to_thread(api.submit_log, body=HTTPLog([item]), content_encoding=ContentEncoding.GZIP)
        assert [logged["message"] for logged in intake.logs] == [event.event_raw.decode()]


class TestDelivery:
    async def test_every_event_delivered_once(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        events = make_events(300)
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS and not result.failures
        assert ids(intake.messages()) == ids([e.event for e in events])
        assert [(r.status, r.items, r.gzip) for r in intake.requests] == [(202, 300, True)]

    async def test_2500_events_split_by_count(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        events = make_events(2500)
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS and not result.failures
        assert [r.items for r in intake.requests] == [MAX_ITEMS, MAX_ITEMS, 500]
        assert ids(intake.messages()) == ids([e.event for e in events])

    async def test_large_events_split_by_size(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        events = big_events(24, 600_000)
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS and not result.failures
        assert len(intake.requests) >= 3
        assert all(r.status == 202 and r.body_bytes <= MAX_PAYLOAD_BYTES for r in intake.requests)
        assert ids(intake.messages()) == ids([e.event for e in events])
        assert intake.truncated == 0

    async def test_oversize_event_dead_lettered(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        events = make_events(10)
        events[4] = big_events(1, MAX_ITEM_BYTES, start_seq=events[4].seq)[0]
        result = await sink.send(events)
        failure = result.outcome_of(events[4])
        assert failure is not None and failure.outcome is Outcome.PERMANENT
        assert "1 MB" in failure.reason
        assert all(result.outcome_of(e) is None for i, e in enumerate(events) if i != 4)
        assert ids(intake.messages()) == ids([e.event for i, e in enumerate(events) if i != 4])
        assert intake.truncated == 0

    async def test_only_oversize_events_sends_nothing(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        event = big_events(1, MAX_ITEM_BYTES + 10)[0]
        result = await sink.send([event])
        failure = result.outcome_of(event)
        assert failure is not None and failure.outcome is Outcome.PERMANENT
        assert intake.requests == []

    async def test_retries_through_503(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        events = make_events(50)
        intake.fail_next(2, 503, retry_after=3)
        for _ in range(2):
            result = await sink.send(events)
            assert result.outcome is Outcome.RETRY and "503" in result.reason
            assert result.retry_after == 3
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS and not result.failures
        assert ids(intake.messages()) == ids([e.event for e in events])

    @pytest.mark.parametrize("status", [408, 429, 500, 502, 504])
    async def test_retryable_statuses(self, intake: DatadogIntake, sink: DatadogSink, status: int) -> None:
        intake.fail_next(1, status)
        result = await sink.send(make_events(3))
        assert result.outcome is Outcome.RETRY and str(status) in result.reason

    async def test_a_2xx_that_is_not_the_intake_s_answer_is_not_delivered(self) -> None:
        # Was a defect: any 2xx counted the events delivered, so a proxy's sign-in page answering 200 took them
        # and nothing reached Datadog. The logs intake answers 202 with an empty JSON object.
        async def answer(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")

        async with http_peer(answer) as url:
            sink = DatadogSink("datadog", DatadogConfig.model_validate({"api_key": "k" * 32, "endpoint": url}))
            try:
                result = await sink.send(make_events(3))
            finally:
                await sink.close()
        assert result.outcome is Outcome.RETRY and result.config_problem and "200" in result.reason, result

    async def test_an_unsupported_media_type_is_a_configuration_problem(
        self, intake: DatadogIntake, sink: DatadogSink
    ) -> None:
        # Was a defect: a 415 (the intake, or a proxy before it, does not take the request's compression or
        # content type) dead-lettered every event of every batch; it says nothing about the events.
        intake.fail_next(1, 415)
        events = make_events(3)
        result = await sink.send(events)
        assert result.outcome is Outcome.RETRY and result.config_problem and "415" in result.reason
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS and ids(intake.messages()) == ids([e.event for e in events])

    async def test_later_request_failing_retries_only_the_undelivered(
        self, intake: DatadogIntake, sink: DatadogSink
    ) -> None:
        events = make_events(2500)
        intake.fail_next(1, 503, after=1)
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS
        assert all(result.outcome_of(e) is None for e in events[:MAX_ITEMS])
        for event in events[MAX_ITEMS:]:
            failure = result.outcome_of(event)
            assert failure is not None and failure.outcome is Outcome.RETRY and "503" in failure.reason
        assert ids(intake.messages()) == ids([e.event for e in events[:MAX_ITEMS]])
        assert len(intake.requests) == 2  # it stops at the first retryable failure

    async def test_400_bisected_to_the_bad_events(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        events = make_events(200, reject=(17, 150))
        intake.reject_marker = '"action":"compliance.reject"'
        result = await sink.send(events)
        bad = {events[17].seq, events[150].seq}
        assert set(result.failures) == bad
        assert all(f.outcome is Outcome.PERMANENT and "400" in f.reason for f in result.failures.values())
        assert ids(intake.messages()) == ids([e.event for e in events if e.seq not in bad])
        assert len(intake.requests) <= 1 + 4 * 8  # two searches of depth log2(200)

    async def test_413_splits_the_batch(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        events = make_events(10)
        intake.fail_next(1, 413)
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS and not result.failures
        assert [r.status for r in intake.requests] == [413, 202, 202]
        assert ids(intake.messages()) == ids([e.event for e in events])

    async def test_wrong_url_is_retried_not_dead_lettered(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        # A 404 means a misconfigured endpoint: fixing the config must not cost data.
        intake.fail_next(1, 404)
        result = await sink.send(make_events(4))
        assert result.outcome is Outcome.RETRY and "404" in result.reason
        assert (await sink.send(make_events(4))).outcome is Outcome.SUCCESS

    async def test_uncompressed(self, intake: DatadogIntake) -> None:
        intake.require_gzip = False
        sink = make_sink(intake, compression="none")
        try:
            assert (await sink.send(make_events(5))).outcome is Outcome.SUCCESS
            assert [r.gzip for r in intake.requests] == [False]
        finally:
            await sink.close()

    async def test_unreachable_intake_is_retried(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        sink = make_sink(endpoint=f"http://127.0.0.1:{port}", timeout=2)
        try:
            result = await sink.send(make_events(3))
            assert result.outcome is Outcome.RETRY and "cannot reach" in result.reason
            health = await sink.healthcheck()
            assert not health.ok and "cannot reach" in health.message
        finally:
            await sink.close()

    async def test_send_does_not_block_the_loop(
        self, intake: DatadogIntake, sink: DatadogSink, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Compressing a large body takes milliseconds: it must run on another thread than the event loop's.
        # Asserted on the threads themselves, not on loop ticks, which a busy machine thins out as well.
        threads: list[tuple[int, int]] = []
        real = http_client.compress

        def compress(body: bytes, *args: Any) -> bytes:
            threads.append((len(body), threading.get_ident()))
            return real(body, *args)

        monkeypatch.setattr(http_client, "compress", compress)
        result = await sink.send(make_events(3000))
        assert result.outcome is Outcome.SUCCESS and intake.accepted == 3000
        large = [thread for size, thread in threads if size >= http_client.THREAD_BYTES]
        assert large and threading.get_ident() not in large

    async def test_closed_sink_retries(self, sink: DatadogSink) -> None:
        await sink.close()
        await sink.close()
        assert (await sink.send(make_events(1))).outcome is Outcome.RETRY


class TestHealth:
    async def test_valid_key(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        health = await sink.healthcheck()
        assert health.ok and "valid" in health.message
        assert intake.validations == 1

    async def test_invalid_key(self, intake: DatadogIntake) -> None:
        sink = make_sink(intake, api_key="wrong-key-wrong-key")
        try:
            health = await sink.healthcheck()
            assert not health.ok and "refused the API key" in health.message and "403" in health.message
            assert "wrong-key" not in health.message
        finally:
            await sink.close()

    async def test_bad_key_on_send_retries_and_turns_health_red(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        events = make_events(5)
        intake.refuse_keys = True
        result = await sink.send(events)
        assert result.outcome is Outcome.RETRY and "403" in result.reason
        assert API_KEY not in result.reason
        health = await sink.healthcheck()
        assert not health.ok and "refused the API key" in health.message and API_KEY not in health.message
        assert result.config_problem  # the engine keeps the sink red until a send succeeds (tests/receiver)
        intake.refuse_keys = False
        assert (await sink.send(events)).outcome is Outcome.SUCCESS
        assert (await sink.healthcheck()).ok

    @pytest.mark.parametrize("offset", [0, 250])
    async def test_an_intake_quoting_the_key_never_puts_any_of_it_in_a_reason(
        self, intake: DatadogIntake, sink: DatadogSink, offset: int
    ) -> None:
        # An intake, or a proxy in front of it, may quote the request's key in its error text, anywhere in it:
        # not a character of the key may reach a reason (a dead letter, a log line, the health message).
        intake.fail_next(1, 503, text="x" * offset + f" refused: DD-API-KEY: {API_KEY}")
        result = await sink.send(make_events(1))
        assert result.outcome is Outcome.RETRY and "503" in result.reason
        assert API_KEY[:8] not in result.reason

    async def test_missing_key_header_is_401(self, intake: DatadogIntake, sink: DatadogSink) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.post(f"{intake.url}/api/v2/logs", data=b"[]") as r:
            assert r.status == 401


# The compliance suite runs this sink's Harness in tests/sinks/test_compliance.py with every other sink.


class TestIntakeCommand:
    async def test_serves_until_stopped(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.datadog", "--port", str(port), "--api-key", "K"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
            assert f"127.0.0.1:{port}" in line
            sink = make_sink(api_key="K", endpoint=f"http://127.0.0.1:{port}")
            try:
                assert (await sink.healthcheck()).ok
                assert (await sink.send(make_events(3))).outcome is Outcome.SUCCESS
            finally:
                await sink.close()
        finally:
            process.terminate()
            process.wait(10)
            if process.stdout is not None:
                process.stdout.close()


# --- HTTPS to the intake (a proxy or relay with a private CA under `endpoint`) --------------------------------------


@pytest.fixture
async def tls_intake(server_tls: ssl.SSLContext) -> AsyncIterator[DatadogIntake]:
    server = DatadogIntake(API_KEY, require_gzip=True, ssl_context=server_tls)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class TestTls:
    async def test_private_ca_delivers_and_validates_over_https(self, tls_intake: DatadogIntake, ca_file: str) -> None:
        assert tls_intake.url.startswith("https://")
        sink = make_sink(tls_intake, tls={"ca_file": ca_file})
        try:
            health = await sink.healthcheck()
            assert health.ok, health.message
            events = make_events(25)
            assert (await sink.send(events)).outcome is Outcome.SUCCESS
        finally:
            await sink.close()
        assert [m["id"] for m in tls_intake.messages()] == [e.event["id"] for e in events]

    async def test_an_unknown_ca_is_retried_with_a_hint_and_the_health_check_says_why(
        self, tls_intake: DatadogIntake
    ) -> None:
        sink = make_sink(tls_intake)  # the system store does not know the test CA
        try:
            result = await sink.send(make_events(3))
            health = await sink.healthcheck()
        finally:
            await sink.close()
        assert result.outcome is Outcome.RETRY
        assert "TLS verification of https://127.0.0.1" in result.reason and "tls.ca_file" in result.reason
        assert not health.ok and "CERTIFICATE_VERIFY_FAILED" in health.message and "tls.ca_file" in health.message
        assert API_KEY not in result.reason + health.message
        assert tls_intake.accepted == 0

    @pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
    async def test_verify_false_skips_the_check(self, tls_intake: DatadogIntake) -> None:
        sink = make_sink(tls_intake, tls={"verify": False})
        try:
            assert (await sink.send(make_events(2))).outcome is Outcome.SUCCESS
        finally:
            await sink.close()
        assert tls_intake.accepted == 2

    def test_an_unreadable_ca_file_names_its_yaml_path(self, tmp_path: Path) -> None:
        with pytest.raises(SinkError, match=r"sinks\.datadog\.tls\.ca_file: cannot load .*missing\.pem"):
            make_sink(endpoint="https://127.0.0.1:1", tls={"ca_file": str(tmp_path / "missing.pem")})

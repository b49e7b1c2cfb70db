"""The splunk_hec sink against the local HEC peer (tests.peers.hec), on loopback."""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pydantic
import pytest
import yaml
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from sinks import registry
from sinks.base import Event, Outcome, SendResult
from sinks.errors import SinkError
from sinks.splunk_hec import SplunkHecConfig, SplunkHecSink
from sinks.testing.compliance import CHECKS, REJECT_ACTION, make_events, run_check, settle
from sinks.testing.exact import EXACT_LITERALS, exact_event, same_json
from tests.conftest import TOKEN as SERVICE_TOKEN
from tests.conftest import StartService, http_peer
from tests.peers.hec import ENVELOPE_KEYS, Harness, HecPeer, parse_envelopes

TOKEN = "11111111-2222-3333-4444-555555555555"

DOCUMENTED_YAML = """
journal: {path: JOURNAL}
streams:
  - name: workos
    path: /workos
    auth: {values: ["Bearer 0123456789abcdef0123"]}
    sinks: [splunk]
sinks:
  splunk:
    type: splunk_hec
    url: https://splunk.example.com:8088
    token: ${SPLUNK_HEC_TOKEN}
    # endpoint: event | raw          (default event)
    index: audit
    sourcetype: workos:audit
    # source: workos                 (default: the wrapper's "source", else the stream's name)
    # host: ...
    # compression: gzip | none       (default gzip)
    tls: {verify: true, ca_file: /etc/ssl/splunk-ca.pem}
    indexer_ack: {enabled: false, poll_interval: 10s, timeout: 5m}
    batch: {max_events: 1000, max_bytes: 1048576, max_wait: 1s}
"""


def sink_for(peer: HecPeer, **overrides: Any) -> SplunkHecSink:
    options: dict[str, Any] = {"url": peer.url, "token": peer.token, "index": "audit", "sourcetype": "workos:audit"}
    options.update(overrides)
    return SplunkHecSink("splunk", SplunkHecConfig.model_validate(options))


def ids(events: list[Any]) -> list[str]:
    return sorted(event["id"] for event in events)


def stored_ids(peer: HecPeer) -> list[str]:
    return sorted(record.event["id"] for record in peer.events)


def event_with(seq: int, wrapper: dict[str, Any], *, stream: str = "workos", when: float = 1705314600.1234) -> Event:
    return Event(seq, stream, orjson.dumps(wrapper), action=wrapper["event"]["action"], time=when, received_at=when)


@pytest.fixture
async def peer() -> AsyncIterator[HecPeer]:
    server = HecPeer(token=TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def ack_peer() -> AsyncIterator[HecPeer]:
    server = HecPeer(token=TOKEN, ack=True)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def sink(peer: HecPeer) -> AsyncIterator[SplunkHecSink]:
    built = sink_for(peer)
    yield built
    await built.close()


class TestConfig:
    def test_the_documented_example_validates(self) -> None:
        config = SplunkHecConfig.model_validate(
            {
                "url": "https://splunk.example.com:8088",
                "token": "expanded-from-env",
                "index": "audit",
                "sourcetype": "workos:audit",
                "tls": {"verify": True, "ca_file": "/etc/ssl/splunk-ca.pem"},
                "indexer_ack": {"enabled": False, "poll_interval": "10s", "timeout": "5m"},
            }
        )
        assert config.endpoint == "event" and config.compression == "gzip"
        assert config.indexer_ack.poll_interval == 10.0 and config.indexer_ack.timeout == 300.0
        assert config.source is None and config.host is None

    def test_the_documented_yaml_loads_through_the_receiver(self, tmp_path: Path) -> None:
        from receiver.config import parse_config

        tree = yaml.safe_load(DOCUMENTED_YAML.replace("JOURNAL", str(tmp_path / "journal.db")))
        config = parse_config(tree, {"SPLUNK_HEC_TOKEN": "from-the-environment"})
        options = config.sinks["splunk"].options
        assert isinstance(options, SplunkHecConfig)
        assert options.token.get_secret_value() == "from-the-environment"
        assert (options.index, options.sourcetype, options.indexer_ack.timeout) == ("audit", "workos:audit", 300.0)

    def test_defaults(self) -> None:
        config = SplunkHecConfig.model_validate({"url": "http://127.0.0.1:8088/", "token": "t"})
        assert config.url == "http://127.0.0.1:8088"
        assert config.index is None and config.sourcetype is None
        assert config.tls.verify is True and config.tls.ca_file is None
        assert config.indexer_ack.enabled is False
        assert config.indexer_ack.poll_interval == 10.0 and config.indexer_ack.timeout == 300.0

    def test_registry_finds_the_sink(self) -> None:
        assert registry.load("splunk_hec") is SplunkHecSink
        assert SplunkHecSink.Config is SplunkHecConfig

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"url": "splunk:8088"}, "http"),
            ({"url": "https://splunk:8088/services/collector/event"}, "base URL"),
            ({"url": "https://splunk:8088?x=1"}, "query"),
            ({"url": "https://user:pw@splunk:8088"}, "token"),
            ({"token": "  "}, "empty"),
            ({"endpoint": "metrics"}, "endpoint"),
            ({"compression": "zstd"}, "compression"),
            ({"indexer_ack": {"poll_interval": 0}}, "poll_interval"),
            ({"indexer_ack": {"timeout": "soon"}}, "duration"),
            ({"batch": {"max_events": 10}}, "batch"),
            ({"tls": {"verify": True, "cafile": "x"}}, "cafile"),
        ],
    )
    def test_rejects(self, options: dict[str, Any], message: str) -> None:
        with pytest.raises(pydantic.ValidationError, match=message):
            SplunkHecConfig.model_validate({"url": "https://splunk:8088", "token": "t", **options})

    def test_the_token_never_shows(self) -> None:
        config = SplunkHecConfig.model_validate({"url": "https://splunk:8088", "token": "s3cret-token"})
        built = SplunkHecSink("splunk", config)
        assert "s3cret" not in repr(config) and "s3cret" not in str(config) and "s3cret" not in repr(built)

    def test_unreadable_ca_file_fails_at_build(self, tmp_path: Path) -> None:
        config = SplunkHecConfig.model_validate(
            {"url": "https://splunk:8088", "token": "t", "tls": {"ca_file": str(tmp_path / "missing.pem")}}
        )
        with pytest.raises(SinkError, match=r"sinks\.splunk\.tls\.ca_file"):
            SplunkHecSink("splunk", config)


class TestEncoding:
    async def test_event_envelope(self, peer: HecPeer) -> None:
        sink = sink_for(peer, host="bridge-1")
        wrapper = {
            "event": {"id": "e1", "action": "user.signed_in", "occurred_at": "2024-01-15T10:30:00.123Z"},
            "keySuffix": "k1",
            "timestamp": "2024-01-15T10:30:00.123Z",
            "source": "team-a",
        }
        try:
            assert (await sink.send([event_with(1, wrapper)])) == SendResult.success()
        finally:
            await sink.close()
        [record] = peer.events
        assert record.event == wrapper["event"]
        assert record.time == 1705314600.123
        assert (record.host, record.source, record.sourcetype, record.index) == (
            "bridge-1",
            "team-a",
            "workos:audit",
            "audit",
        )
        assert record.endpoint == "event" and record.fields is None

    async def test_source_falls_back_to_the_stream_and_can_be_fixed(self, peer: HecPeer) -> None:
        wrapper = {"event": {"id": "e1", "action": "a.b"}, "keySuffix": "k"}
        default = sink_for(peer)
        fixed = sink_for(peer, source="workos")
        try:
            await default.send([event_with(1, wrapper, stream="prod-stream")])
            await fixed.send([event_with(2, {**wrapper, "source": "team-a"})])
        finally:
            await default.close()
            await fixed.close()
        assert [record.source for record in peer.events] == ["prod-stream", "workos"]

    async def test_unset_metadata_is_left_to_the_token(self, peer: HecPeer) -> None:
        sink = SplunkHecSink("splunk", SplunkHecConfig.model_validate({"url": peer.url, "token": TOKEN}))
        try:
            await sink.send(make_events(1))
        finally:
            await sink.close()
        [record] = peer.events
        assert record.index is None and record.sourcetype is None and record.host is None

    async def test_raw_endpoint_sends_ndjson_with_metadata_in_the_query(self, peer: HecPeer) -> None:
        sink = sink_for(peer, endpoint="raw", host="bridge-1")
        events = make_events(3)
        other = [  # the same kind of event from another WorkOS team: different bytes, not a mutated view
            Event(
                e.seq,
                e.stream,
                e.raw.replace(b'"source":"compliance"', b'"source":"team-b"'),
                action=e.action,
                time=e.time,
                received_at=e.received_at,
            )
            for e in make_events(2, start_seq=10)
        ]
        assert [e.source for e in other] == ["team-b", "team-b"]
        try:
            assert (await sink.send(events + other)) == SendResult.success()
        finally:
            await sink.close()
        assert peer.requests == 2, "one request per source"
        assert ids([r.event for r in peer.events]) == ids([e.event for e in events + other])
        sources = sorted({(r.source, r.index, r.sourcetype, r.host, r.endpoint) for r in peer.events})
        assert sources == [
            ("compliance", "audit", "workos:audit", "bridge-1", "raw"),
            ("team-b", "audit", "workos:audit", "bridge-1", "raw"),
        ]

    async def test_an_event_that_cannot_be_encoded_is_dead_lettered_alone(self, sink: SplunkHecSink) -> None:
        good = make_events(2)
        broken = Event(99, "workos", b'{"keySuffix": "no event"}', action="", time=0.0, received_at=0.0)
        result = await sink.send([good[0], broken, good[1]])
        failure = result.outcome_of(broken)
        assert failure is not None and failure.outcome is Outcome.PERMANENT and "encode" in failure.reason
        assert result.outcome_of(good[0]) is None and result.outcome_of(good[1]) is None


class TestExactValues:
    @pytest.mark.parametrize("compression", ["gzip", "none"])
    @pytest.mark.parametrize("endpoint", ["event", "raw"])
    async def test_the_event_bytes_hec_receives_are_the_bytes_workos_sent(
        self, peer: HecPeer, endpoint: str, compression: str
    ) -> None:
        sink = sink_for(peer, endpoint=endpoint, compression=compression)
        events = [make_events(1)[0], exact_event(2)]
        try:
            assert (await sink.send(events)) == SendResult.success()
        finally:
            await sink.close()
        assert [record.raw for record in peer.events] == [event.event_raw for event in events]
        for literal in EXACT_LITERALS:
            assert literal in peer.events[1].raw
        assert peer.events[1].source == "team-exact"
        if endpoint == "event":
            assert peer.events[1].time == 1705314600.0

    async def test_the_peer_takes_what_orjson_refuses(self, peer: HecPeer) -> None:
        event = exact_event()
        body = b'{"time": 1, "event": ' + event.event_raw + b"}\n" + b'{"event":\n' + event.event_raw + b"}"
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Splunk {TOKEN}"}
            async with session.post(f"{peer.url}/services/collector/event", data=body, headers=headers) as answer:
                assert answer.status == 200, await answer.text()
        assert [record.raw for record in peer.events] == [event.event_raw] * 2
        assert peer.events[0].event["metadata"]["v0"] == 18446744073709551616
        values, broken = parse_envelopes(body)
        assert broken is None and values[1]["event"]["metadata"]["v3"] == 123456789012345678901234567890
        assert all(same_json(record.raw, event.event_raw) for record in peer.events)


class TestDelivery:
    async def test_every_event_once(self, peer: HecPeer, sink: SplunkHecSink) -> None:
        events = make_events(500)
        assert (await sink.send(events)) == SendResult.success()
        assert peer.requests == 1
        assert stored_ids(peer) == ids([e.event for e in events])
        assert len(set(stored_ids(peer))) == 500

    @pytest.mark.parametrize(("compression", "gzipped"), [("gzip", 1), ("none", 0)])
    async def test_compression(self, peer: HecPeer, compression: str, gzipped: int) -> None:
        sink = sink_for(peer, compression=compression)
        try:
            assert (await sink.send(make_events(2000))) == SendResult.success()
        finally:
            await sink.close()
        assert peer.gzip_requests == gzipped and peer.event_count == 2000

    async def test_headers_and_channel(self, peer: HecPeer) -> None:
        first, second = sink_for(peer), sink_for(peer)
        try:
            await first.send(make_events(1))
            await first.send(make_events(1))
            await second.send(make_events(1))
        finally:
            await first.close()
            await second.close()
        assert peer.channels == {first.channel, second.channel}
        assert first.channel != second.channel and uuid.UUID(first.channel)
        assert {record.channel for record in peer.events} == {first.channel, second.channel}

    async def test_a_path_prefix_is_kept(self) -> None:
        seen: list[str] = []

        async def handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
            seen.append(request.path)
            assert request.headers["Content-Encoding"] == "gzip"
            assert (await request.read()).count(b'"event"') == 2  # aiohttp has undone the gzip
            assert request.headers["Authorization"] == "Splunk prefix-token"
            return aiohttp.web.json_response({"text": "Success", "code": 0})

        app = aiohttp.web.Application()
        app.router.add_post("/splunk/services/collector/event", handler)
        runner = aiohttp.web.AppRunner(app)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        sink = SplunkHecSink(
            "splunk",
            SplunkHecConfig.model_validate({"url": f"http://127.0.0.1:{port}/splunk/", "token": "prefix-token"}),
        )
        try:
            assert (await sink.send(make_events(2))) == SendResult.success()
        finally:
            await sink.close()
            await runner.cleanup()
        assert seen == ["/splunk/services/collector/event"]

    async def test_closed_sink_retries(self, sink: SplunkHecSink) -> None:
        await sink.close()
        result = await sink.send(make_events(1))
        assert result.outcome is Outcome.RETRY and "closed" in result.reason
        await sink.close()


class TestClassification:
    async def test_retry_through_a_burst_of_503s(self, peer: HecPeer, sink: SplunkHecSink) -> None:
        peer.busy(count=3)
        events = make_events(20)
        outcomes = []
        for _ in range(4):  # the engine's retries, without its backoff
            result = await sink.send(events)
            outcomes.append(result.outcome)
            if result.outcome is Outcome.SUCCESS:
                break
        assert outcomes == [Outcome.RETRY] * 3 + [Outcome.SUCCESS]
        assert stored_ids(peer) == ids([e.event for e in events])

    async def test_busy_reason(self, peer: HecPeer, sink: SplunkHecSink) -> None:
        peer.busy(count=1)
        result = await sink.send(make_events(2))
        assert result.outcome is Outcome.RETRY and "code 9" in result.reason and "busy" in result.reason
        assert not result.failures

    @pytest.mark.parametrize(
        ("status", "code", "retry_after"), [(429, None, 7.0), (500, 8, None), (502, None, None), (408, None, None)]
    )
    async def test_retryable_statuses(
        self, peer: HecPeer, sink: SplunkHecSink, status: int, code: int | None, retry_after: float | None
    ) -> None:
        peer.fail(status, code, "nope", count=1, retry_after=retry_after)
        result = await sink.send(make_events(3))
        assert result.outcome is Outcome.RETRY and str(status) in result.reason
        assert result.retry_after == retry_after
        assert (await sink.send(make_events(3))) == SendResult.success()

    async def test_unreachable_is_retried(self) -> None:
        config = SplunkHecConfig.model_validate({"url": "http://127.0.0.1:9", "token": TOKEN})
        sink = SplunkHecSink("splunk", config)
        try:
            result = await sink.send(make_events(2))
        finally:
            await sink.close()
        assert result.outcome is Outcome.RETRY and "cannot reach" in result.reason

    async def test_a_silent_peer_times_out(self) -> None:
        hang = asyncio.Event()

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await hang.wait()
            writer.close()

        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = SplunkHecConfig.model_validate({"url": f"http://127.0.0.1:{port}", "token": TOKEN, "timeout": "200ms"})
        sink = SplunkHecSink("splunk", config)
        try:
            result = await sink.send(make_events(2))
        finally:
            await sink.close()
            hang.set()
            server.close()
            await server.wait_closed()
        assert result.outcome is Outcome.RETRY and "within 0.2s" in result.reason

    @pytest.mark.parametrize(("attribute", "code"), [("token", 4), ("token_disabled", 1)])
    async def test_token_problems_retry_with_health_red(
        self, peer: HecPeer, sink: SplunkHecSink, attribute: str, code: int
    ) -> None:
        if attribute == "token":
            peer.token = "rotated"
        else:
            peer.token_disabled = True
        result = await sink.send(make_events(3))
        assert result.outcome is Outcome.RETRY and f"code {code}" in result.reason and "token" in result.reason
        assert TOKEN not in result.reason
        health = await sink.healthcheck()
        assert not health.ok and "token" in health.message and TOKEN not in health.message
        # A configuration problem: the engine keeps the sink red until a send succeeds (tests/receiver).
        assert result.config_problem
        peer.token, peer.token_disabled = TOKEN, False
        assert (await sink.send(make_events(3))) == SendResult.success()
        assert (await sink.healthcheck()).ok

    async def test_incorrect_index_is_a_configuration_error(self, peer: HecPeer, sink: SplunkHecSink) -> None:
        peer.indexes = {"main"}
        events = make_events(4)
        result = await sink.send(events)
        assert result.outcome is Outcome.RETRY and "code 7" in result.reason and "'audit'" in result.reason
        assert result.config_problem
        assert peer.event_count == 0 and peer.requests == 1, "no bisection for a configuration error"
        peer.indexes = {"main", "audit"}
        assert (await sink.send(events)) == SendResult.success()
        assert (await sink.healthcheck()).ok

    async def test_a_wrong_url_is_retried_with_health_red(self, peer: HecPeer) -> None:
        sink = sink_for(peer, url=peer.url + "/not-hec")
        try:
            result = await sink.send(make_events(3))
            health = await sink.healthcheck()
        finally:
            await sink.close()
        assert result.outcome is Outcome.RETRY and "404" in result.reason and "url" in result.reason
        assert not health.ok and "404" in health.message

    @pytest.mark.parametrize("body", [b"<html><body>Sign in</body></html>", b"", b'{"ok": true}'])
    async def test_a_2xx_that_is_not_hec_s_answer_is_not_delivered(self, body: bytes) -> None:
        # Was a defect: any 2xx counted the batch delivered, so a proxy or a wrong host answering 200 (a sign-in
        # page, an empty body) took the events and nothing reached Splunk. HEC answers {"text":..., "code": 0}.
        async def answer(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=body, content_type="text/html")

        async with http_peer(answer) as url:
            sink = SplunkHecSink("splunk", SplunkHecConfig.model_validate({"url": url, "token": TOKEN}))
            try:
                result = await sink.send(make_events(3))
                health = await sink.healthcheck()
            finally:
                await sink.close()
        assert result.outcome is Outcome.RETRY and result.config_problem, result
        assert "200" in result.reason and "HEC" in result.reason
        assert not health.ok

    async def test_a_400_without_a_hec_code_costs_only_the_refused_events(self) -> None:
        # Was a defect: a 400 without HEC's code (a HEC-compatible receiver, or a proxy, refusing one event)
        # dead-lettered every event of the request, the good ones with it.
        async def answer(request: web.Request) -> web.Response:
            if REJECT_ACTION.encode() in await request.read():
                return web.Response(status=400, text="Bad Request")
            return web.json_response({"text": "Success", "code": 0})

        events = make_events(10, reject=(6,))
        async with http_peer(answer) as url:
            sink = SplunkHecSink("splunk", SplunkHecConfig.model_validate({"url": url, "token": TOKEN}))
            try:
                result = await sink.send(events)
            finally:
                await sink.close()
        assert set(result.failures) == {events[6].seq}, result
        assert result.failures[events[6].seq].outcome is Outcome.PERMANENT

    async def test_other_refusals_are_permanent(self, peer: HecPeer, sink: SplunkHecSink) -> None:
        peer.fail(400, 16, "refused", count=1)
        result = await sink.send(make_events(3))
        assert result.outcome is Outcome.PERMANENT and "400" in result.reason and "refused" in result.reason
        assert peer.requests == 1

    async def test_an_unsupported_media_type_is_a_configuration_problem(
        self, peer: HecPeer, sink: SplunkHecSink
    ) -> None:
        # Was a defect: a 415 (HEC, or a proxy before it, does not take the request's compression) dead-lettered
        # every event of every batch; it says nothing about the events.
        peer.fail(415, None, "unsupported media type", count=1)
        events = make_events(3)
        result = await sink.send(events)
        assert result.outcome is Outcome.RETRY and result.config_problem and "415" in result.reason
        assert (await sink.send(events)) == SendResult.success()

    async def test_partial_rejection_dead_letters_only_the_bad_event(self, peer: HecPeer, sink: SplunkHecSink) -> None:
        peer.reject_action(REJECT_ACTION)
        events = make_events(40, reject=(17,))
        result = await sink.send(events)
        failure = result.outcome_of(events[17])
        assert failure is not None and failure.outcome is Outcome.PERMANENT
        assert "code 6" in failure.reason and "Invalid data format" in failure.reason
        assert [e.seq for e in events if result.outcome_of(e) is not None] == [events[17].seq]
        good = {e.event["id"] for e in events} - {events[17].event["id"]}
        assert set(stored_ids(peer)) == good
        assert peer.requests == 2, "HEC's invalid-event-number points straight at the bad event"

    async def test_bisection_without_an_event_number(self) -> None:
        peer = HecPeer(token=TOKEN, report_event_number=False)
        await peer.start()
        sink = sink_for(peer)
        try:
            peer.reject_action(REJECT_ACTION)
            events = make_events(64, reject=(3, 40, 41))
            result = await sink.send(events)
        finally:
            await sink.close()
            await peer.stop()
        bad = {events[i].seq for i in (3, 40, 41)}
        assert set(result.failures) == bad
        assert all(
            f.outcome is Outcome.PERMANENT and "HEC refused this event" in f.reason for f in result.failures.values()
        )
        assert set(stored_ids(peer)) == {e.event["id"] for e in events if e.seq not in bad}
        assert peer.requests <= 2 * 3 * 7, "bisection stays logarithmic per bad event"

    async def test_every_event_bad_is_permanent_for_all(self, peer: HecPeer, sink: SplunkHecSink) -> None:
        peer.reject = lambda event: True
        events = make_events(6)
        result = await sink.send(events)
        assert result.outcome is Outcome.PERMANENT and "code 6" in result.reason
        assert peer.event_count == 0

    async def test_a_busy_answer_during_bisection_retries_the_rest(self, monkeypatch: pytest.MonkeyPatch) -> None:
        peer = HecPeer(token=TOKEN, report_event_number=False)
        await peer.start()
        sink = sink_for(peer)
        peer.reject_action(REJECT_ACTION)
        take_fault = peer._take_fault
        calls = 0

        def busy_from_the_second_request() -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:
                peer.busy(count=1)
            return take_fault()

        monkeypatch.setattr(peer, "_take_fault", busy_from_the_second_request)
        events = make_events(8, reject=(6,))
        try:
            result = await sink.send(events)
        finally:
            await sink.close()
            await peer.stop()
        assert peer.requests == 2, "no more requests once HEC is busy"
        assert result.outcome is Outcome.RETRY and "busy" in result.reason and not result.failures, result
        assert peer.event_count == 6, "the refused request indexed what preceded the bad event; it is resent"


class TestIndexerAck:
    async def test_delivered_once_acknowledged(self, ack_peer: HecPeer) -> None:
        sink = sink_for(ack_peer, indexer_ack={"enabled": True, "poll_interval": "10ms", "timeout": "2s"})
        try:
            events = make_events(30)
            assert (await settle(sink, events)) == SendResult.success()
        finally:
            await sink.close()
        assert ack_peer.ack_queries >= 1
        assert stored_ids(ack_peer) == ids([e.event for e in events])

    async def test_unacknowledged_batches_are_resent(self, ack_peer: HecPeer) -> None:
        sink = sink_for(ack_peer, indexer_ack={"enabled": True, "poll_interval": "20ms", "timeout": "150ms"})
        events = make_events(10)
        try:
            ack_peer.hold_acks = True
            started = time.monotonic()
            result = await settle(sink, events)
            waited = time.monotonic() - started
            assert result.outcome is Outcome.RETRY and "did not acknowledge" in result.reason
            assert 0.15 <= waited < 1.5
            assert ack_peer.ack_queries >= 3
            ack_peer.hold_acks = False
            assert (await settle(sink, events)) == SendResult.success()
        finally:
            await sink.close()
        # At-least-once: the unconfirmed first copy may have been indexed too.
        assert sorted(set(stored_ids(ack_peer))) == ids([e.event for e in events])
        assert ack_peer.event_count == 20

    async def test_an_ack_id_handed_out_again_is_no_confirmation_of_the_old_batch(self, ack_peer: HecPeer) -> None:
        # Was a defect: HEC keeps its acknowledgement state in memory. After a restart (or from another instance
        # behind a load balancer) the channel's ackIds start again at 0, and a batch lost in the restart was
        # counted delivered when a later batch, given the same ackId, was indexed.
        sink = sink_for(ack_peer, indexer_ack={"enabled": True, "poll_interval": "10ms", "timeout": "30s"})
        lost, later = make_events(3), make_events(3, start_seq=100)
        try:
            ack_peer.hold_acks = True
            assert (await sink.send(lost)).outcome is Outcome.PENDING  # ackId 0
            ack_peer.restart()  # the events and the ackIds are gone
            assert (await sink.send(later)).outcome is Outcome.PENDING  # ackId 0 again
            ack_peer.release_acks()
            result = await sink.send(lost)
            assert result.outcome is Outcome.RETRY and "ackId 0" in result.reason, result
            assert (await settle(sink, later)) == SendResult.success()
            assert (await settle(sink, lost)) == SendResult.success()
        finally:
            await sink.close()
        assert sorted(stored_ids(ack_peer)) == ids([e.event for e in lost + later])

    async def test_late_acknowledgement_within_the_timeout(self, ack_peer: HecPeer) -> None:
        sink = sink_for(ack_peer, indexer_ack={"enabled": True, "poll_interval": "20ms", "timeout": "3s"})
        ack_peer.hold_acks = True
        asyncio.get_running_loop().call_later(0.1, ack_peer.release_acks)
        try:
            assert (await settle(sink, make_events(5))) == SendResult.success()
        finally:
            await sink.close()

    async def test_ack_with_partial_rejection(self, ack_peer: HecPeer) -> None:
        sink = sink_for(ack_peer, indexer_ack={"enabled": True, "poll_interval": "10ms", "timeout": "2s"})
        ack_peer.reject_action(REJECT_ACTION)
        events = make_events(12, reject=(7,))
        try:
            result = await settle(sink, events)
        finally:
            await sink.close()
        assert set(result.failures) == {events[7].seq}

    async def test_token_without_ack_counts_accepted_batches(
        self, peer: HecPeer, caplog: pytest.LogCaptureFixture
    ) -> None:
        sink = sink_for(peer, indexer_ack={"enabled": True, "poll_interval": "10ms", "timeout": "1s"})
        try:
            with caplog.at_level(logging.WARNING, logger="sinks.splunk_hec"):
                assert (await settle(sink, make_events(3))) == SendResult.success()
                assert (await settle(sink, make_events(3))) == SendResult.success()
        finally:
            await sink.close()
        assert len([r for r in caplog.records if "no ackId" in r.getMessage()]) == 1

    async def test_channel_is_always_sent(self, ack_peer: HecPeer) -> None:
        sink = sink_for(ack_peer)  # ack off in the sink: the channel still goes along
        try:
            assert (await settle(sink, make_events(2))) == SendResult.success()
        finally:
            await sink.close()
        assert ack_peer.channels == {sink.channel}


class TestSecrets:
    async def test_the_token_stays_out_of_logs_reasons_and_health(
        self, peer: HecPeer, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        sink = sink_for(peer, indexer_ack={"enabled": True, "poll_interval": "10ms", "timeout": "1s"})
        try:
            texts = [repr(sink), (await sink.healthcheck()).message, repr(await sink.send(make_events(2)))]
            peer.token = "rotated"
            texts += [repr(await sink.send(make_events(2))), (await sink.healthcheck()).message]
        finally:
            await sink.close()
        assert all(TOKEN not in text for text in texts)
        assert TOKEN not in caplog.text

    @pytest.mark.parametrize("offset", [0, 260])
    async def test_a_peer_quoting_the_token_never_puts_any_of_it_in_a_reason(self, peer: HecPeer, offset: int) -> None:
        # A proxy in front of HEC (or HEC itself) may quote the request's credential in its error text, anywhere
        # in it: not a character of the token may reach a reason, a dead letter or the health message.
        peer.fail(503, 9, text="x" * offset + f" refused: Authorization: Splunk {TOKEN}")
        sink = sink_for(peer)
        try:
            result = await sink.send(make_events(1))
            health = await sink.healthcheck()
        finally:
            await sink.close()
        assert result.outcome is Outcome.RETRY
        for text in (result.reason, health.message):
            assert TOKEN[:8] not in text


class TestHealth:
    async def test_healthy(self, sink: SplunkHecSink) -> None:
        health = await sink.healthcheck()
        assert health.ok and "healthy" in health.message and "accepts the token" in health.message

    async def test_unreachable(self) -> None:
        sink = SplunkHecSink("splunk", SplunkHecConfig.model_validate({"url": "http://127.0.0.1:9", "token": TOKEN}))
        try:
            health = await sink.healthcheck()
        finally:
            await sink.close()
        assert not health.ok and "cannot reach HEC at http://127.0.0.1:9" in health.message

    async def test_bad_token(self, peer: HecPeer) -> None:
        sink = sink_for(peer, token="wrong-token-value")
        try:
            health = await sink.healthcheck()
        finally:
            await sink.close()
        assert not health.ok and "refused the token" in health.message and "wrong-token-value" not in health.message

    async def test_busy(self, peer: HecPeer, sink: SplunkHecSink) -> None:
        peer.busy()
        health = await sink.healthcheck()
        assert not health.ok and "unhealthy" in health.message and "queues are full" in health.message

    async def test_closed(self, sink: SplunkHecSink) -> None:
        await sink.close()
        assert not (await sink.healthcheck()).ok


@pytest.fixture
async def tls_peer(server_tls: ssl.SSLContext) -> AsyncIterator[HecPeer]:
    server = HecPeer(token=TOKEN, ssl_context=server_tls)
    await server.start()
    yield server
    await server.stop()


class TestTls:
    async def test_private_ca(self, tls_peer: HecPeer, ca_file: str) -> None:
        assert tls_peer.url.startswith("https://")
        sink = sink_for(tls_peer, tls={"ca_file": ca_file})
        try:
            assert (await sink.healthcheck()).ok
            assert (await sink.send(make_events(5))) == SendResult.success()
        finally:
            await sink.close()
        assert tls_peer.event_count == 5

    async def test_unknown_ca_is_refused_clearly(self, tls_peer: HecPeer) -> None:
        sink = sink_for(tls_peer)
        try:
            health = await sink.healthcheck()
            result = await sink.send(make_events(2))
        finally:
            await sink.close()
        assert not health.ok and "TLS verification of" in health.message and "tls.ca_file" in health.message
        assert result.outcome is Outcome.RETRY and "TLS" in result.reason
        assert tls_peer.event_count == 0

    async def test_verify_off(self, tls_peer: HecPeer) -> None:
        sink = sink_for(tls_peer, tls={"verify": False})
        try:
            assert (await sink.send(make_events(2))) == SendResult.success()
        finally:
            await sink.close()


class TestPeer:
    def test_parses_concatenated_envelopes(self) -> None:
        body = b'{"event":"a"}{"event":{"x":1}}  \n{"event":\n "c"}\n\n{"event":"d"}'
        assert parse_envelopes(body) == ([{"event": "a"}, {"event": {"x": 1}}, {"event": "c"}, {"event": "d"}], None)
        assert parse_envelopes(b'{"event":"a"}\n{"event":') == ([{"event": "a"}], 1)
        assert parse_envelopes(b"") == ([], None)

    @given(
        envelopes=st.lists(
            st.dictionaries(
                st.sampled_from(sorted(ENVELOPE_KEYS)),
                st.recursive(
                    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
                    max_leaves=8,
                ),
            ),
            max_size=6,
        ),
        separators=st.lists(st.sampled_from(["", " ", "\n", "\r\n", "\t", "\n\n"]), min_size=7, max_size=7),
        pretty=st.booleans(),
    )
    def test_parses_any_concatenation(
        self, envelopes: list[dict[str, Any]], separators: list[str], pretty: bool
    ) -> None:
        option = orjson.OPT_INDENT_2 if pretty else 0
        body = b"".join(
            separators[i].encode() + orjson.dumps(envelope, option=option) for i, envelope in enumerate(envelopes)
        )
        assert parse_envelopes(body + separators[-1].encode()) == (envelopes, None)

    @pytest.fixture
    async def client(self, peer: HecPeer) -> AsyncIterator[aiohttp.ClientSession]:
        async with aiohttp.ClientSession(base_url=peer.url) as session:
            yield session

    async def post(
        self, client: aiohttp.ClientSession, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        sent = {"Authorization": f"Splunk {TOKEN}"} if headers is None else headers
        async with client.post("/services/collector/event", data=body, headers=sent) as response:
            return response.status, orjson.loads(await response.read())

    @pytest.mark.parametrize(
        ("body", "status", "code", "number"),
        [
            (b"", 400, 5, None),
            (b"  \n", 400, 5, None),
            (b'{"time": 1}', 400, 12, 0),
            (b'{"event": "  "}', 400, 13, 0),
            (b'{"event": null}', 400, 13, 0),
            (b'{"event": "a", "time": "soon"}', 400, 6, 0),
            (b'{"event": "a", "time": true}', 400, 6, 0),
            (b'{"event": "a", "colour": "red"}', 400, 6, 0),
            (b'{"event": "a", "index": 3}', 400, 6, 0),
            (b'{"event": "a", "fields": {"n": {"deep": 1}}}', 400, 15, 0),
            (b"[1, 2]", 400, 6, 0),
            (b'{"event": "a"} not json', 400, 6, 1),
            (b'{"event": {"x": NaN}}', 400, 6, 0),
            (b'{"event": "a"}\n{"event": [Infinity]}', 400, 6, 1),
            (b'{"event": "a", "time": "1705314600.5"}', 200, 0, None),
            (b'{"event": {"k": "v"}, "time": 1705314600.5, "fields": {"n": 1}}', 200, 0, None),
        ],
    )
    async def test_envelope_rules(
        self, client: aiohttp.ClientSession, body: bytes, status: int, code: int, number: int | None
    ) -> None:
        expected: dict[str, Any] = {"text": ANY_TEXT, "code": code}
        if number is not None:
            expected["invalid-event-number"] = number
        assert await self.post(client, body) == (status, expected)

    @pytest.mark.parametrize(
        ("headers", "status", "code"),
        [
            ({}, 401, 2),
            ({"Authorization": f"Bearer {TOKEN}"}, 401, 3),
            ({"Authorization": "Splunk nope"}, 403, 4),
        ],
    )
    async def test_token_rules(
        self, client: aiohttp.ClientSession, headers: dict[str, str], status: int, code: int
    ) -> None:
        got_status, body = await self.post(client, b'{"event": "a"}', headers)
        assert (got_status, body["code"]) == (status, code)

    async def test_the_event_before_a_bad_one_is_kept(self, peer: HecPeer, client: aiohttp.ClientSession) -> None:
        status, body = await self.post(client, b'{"event": "a"}{"event": ""}{"event": "c"}')
        assert (status, body) == (400, {"text": "Event field cannot be blank", "code": 13, "invalid-event-number": 1})
        assert [record.event for record in peer.events] == ["a"]

    async def test_channel_rules_with_ack(self, ack_peer: HecPeer) -> None:
        auth = {"Authorization": f"Splunk {TOKEN}"}
        channel = str(uuid.uuid4())
        async with aiohttp.ClientSession(base_url=ack_peer.url) as client:
            async with client.post("/services/collector/event", data=b'{"event":"a"}', headers=auth) as response:
                assert (response.status, (await response.json())["code"]) == (400, 10)
            bad = {**auth, "X-Splunk-Request-Channel": "not-a-uuid"}
            async with client.post("/services/collector/event", data=b'{"event":"a"}', headers=bad) as response:
                assert (response.status, (await response.json())["code"]) == (400, 11)
            good = {**auth, "X-Splunk-Request-Channel": channel}
            async with client.post("/services/collector/event", data=b'{"event":"a"}', headers=good) as response:
                assert await response.json() == {"text": "Success", "code": 0, "ackId": 0}
            async with client.post(
                "/services/collector/ack", params={"channel": channel}, data=b'{"acks":[0,5]}', headers=auth
            ) as response:
                assert await response.json() == {"acks": {"0": True, "5": False}}

    async def test_ack_disabled(self, client: aiohttp.ClientSession) -> None:
        headers = {"Authorization": f"Splunk {TOKEN}", "X-Splunk-Request-Channel": str(uuid.uuid4())}
        async with client.post("/services/collector/ack", data=b'{"acks":[0]}', headers=headers) as response:
            assert (response.status, (await response.json())["code"]) == (400, 14)

    async def test_health(self, peer: HecPeer, client: aiohttp.ClientSession) -> None:
        async with client.get("/services/collector/health/1.0") as response:
            assert (response.status, await response.json()) == (200, {"text": "HEC is healthy", "code": 17})
        peer.busy()
        async with client.get("/services/collector/health") as response:
            assert (response.status, (await response.json())["code"]) == (503, 18)

    async def test_gzip_body(self, peer: HecPeer, client: aiohttp.ClientSession) -> None:
        headers = {"Authorization": f"Splunk {TOKEN}", "Content-Encoding": "gzip"}
        body = gzip.compress(b'{"event": "zipped"}')
        async with client.post("/services/collector/event", data=body, headers=headers) as response:
            assert response.status == 200
        assert [r.event for r in peer.events] == ["zipped"] and peer.gzip_requests == 1


class _AnyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_TEXT: Any = _AnyText()


HARNESSES: dict[str, dict[str, Any]] = {
    "event-gzip": {},
    "raw-plain": {"endpoint": "raw", "compression": "none"},
    "event-ack": {"ack": True},
}


@pytest.fixture(params=sorted(HARNESSES))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    built = Harness(**HARNESSES[request.param])
    await built.start()
    yield built
    await built.stop()


class TestCompliance:
    @pytest.mark.parametrize("check", CHECKS)
    async def test_check(self, harness: Harness, check: str) -> None:
        await run_check(check, harness)

    def test_default_harness_supports_every_mode(self) -> None:
        assert Harness().supports == {"retry", "permanent", "partial"}


@pytest.fixture
def free_port() -> Iterator[int]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port


class TestCommandLine:
    async def test_python_dash_m_serves_hec(self, free_port: int) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.hec", "--port", str(free_port), "--token", "cli-token", "--print"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            config = SplunkHecConfig.model_validate({"url": f"http://127.0.0.1:{free_port}", "token": "cli-token"})
            sink = SplunkHecSink("splunk", config)
            try:
                for _ in range(100):
                    if (await sink.healthcheck()).ok:
                        break
                    await asyncio.sleep(0.05)
                assert (await sink.send(make_events(3))) == SendResult.success()
            finally:
                await sink.close()
        finally:
            process.terminate()
            out, err = process.communicate(timeout=10)
        assert process.returncode == 0, err
        assert len(out.splitlines()) == 3 and b"'events': 3" in err


class TestThroughTheService:
    """WorkOS -> intake -> journal -> delivery engine -> this sink -> the HEC peer."""

    async def test_delivers_retries_and_dead_letters_only_the_refused_event(
        self, peer: HecPeer, start_service: StartService
    ) -> None:
        from receiver.journal import list_dead_letters

        splunk = {
            "type": "splunk_hec",
            "url": peer.url,
            "token": "${HEC_TOKEN}",
            "index": "audit",
            "sourcetype": "workos:audit",
            "batch": {"max_wait": "20ms"},
            "retry": {"initial": "10ms", "max": "50ms"},
        }
        service = await start_service(
            {
                "streams": [
                    {"name": "workos", "path": "/workos", "auth": {"values": [SERVICE_TOKEN]}, "sinks": ["splunk"]}
                ],
                "sinks": {"splunk": splunk},
            },
            environ={"HEC_TOKEN": TOKEN},
        )
        peer.busy(count=2)
        peer.reject_action("user.deleted")
        wrappers = [
            {
                "event": {
                    "id": f"evt_{i}",
                    "action": "user.deleted" if i == 13 else "user.signed_in",
                    "occurred_at": "2024-01-15T10:30:00.000Z",
                },
                "keySuffix": f"k{i}",
                "timestamp": "2024-01-15T10:30:00.123Z",
                "source": "team-a",
            }
            for i in range(30)
        ]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                service.url + "/workos", data=orjson.dumps(wrappers), headers={"Authorization": SERVICE_TOKEN}
            ) as response,
        ):
            assert response.status == 200, await response.text()
        path = service.config.journal.path
        deadline = time.monotonic() + 10
        while not (len(set(stored_ids(peer))) == 29 and list_dead_letters(path, "splunk")):
            assert time.monotonic() < deadline, (peer.stats(), list_dead_letters(path, "splunk"))
            await asyncio.sleep(0.02)
        assert set(stored_ids(peer)) == {f"evt_{i}" for i in range(30) if i != 13}
        assert {record.time for record in peer.events} == {1705314600.0}
        assert {record.source for record in peer.events} == {"team-a"}
        (letter,) = list_dead_letters(path, "splunk")
        assert orjson.loads(letter.data)["keySuffix"] == "k13"
        assert "code 6" in letter.reason and "Invalid data format" in letter.reason

    async def test_indexer_acknowledgement_is_awaited_by_the_engine(
        self, ack_peer: HecPeer, start_service: StartService
    ) -> None:
        """The sink answers PENDING until the indexers confirm; the engine asks again without using attempts."""
        from receiver.journal import list_dead_letters

        splunk = {
            "type": "splunk_hec",
            "url": ack_peer.url,
            "token": "${HEC_TOKEN}",
            "indexer_ack": {"enabled": True, "poll_interval": "30ms", "timeout": "10s"},
            "batch": {"max_wait": "20ms"},
            "retry": {"initial": "10ms", "max": "50ms", "max_attempts": 1},
        }
        stream = {"name": "workos", "path": "/workos", "auth": {"values": [SERVICE_TOKEN]}, "sinks": ["splunk"]}
        service = await start_service({"streams": [stream], "sinks": {"splunk": splunk}}, environ={"HEC_TOKEN": TOKEN})
        ack_peer.hold_acks = True

        async def release_once_asked_twice() -> None:  # not on a timer: a loaded machine may not have asked yet
            while ack_peer.ack_queries < 2:
                await asyncio.sleep(0.01)
            ack_peer.release_acks()

        release = asyncio.create_task(release_once_asked_twice())
        wrappers = [{"event": {"id": f"evt_{i}", "action": "a"}, "keySuffix": f"k{i}"} for i in range(20)]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                service.url + "/workos", data=orjson.dumps(wrappers), headers={"Authorization": SERVICE_TOKEN}
            ) as response,
        ):
            assert response.status == 200
        deadline = time.monotonic() + 10
        text = ""
        while 'log_bridge_sink_events_delivered_total{sink="splunk"} 20.0' not in text:
            assert time.monotonic() < deadline, (ack_peer.stats(), text)
            await asyncio.sleep(0.02)
            text = service.metrics.render().decode()
        await release
        assert ack_peer.ack_queries >= 3  # asked while held, and once after the release
        assert ack_peer.event_count == 20  # posted once: PENDING events are not sent again
        assert 'outcome="retry",sink="splunk"' not in text
        assert list_dead_letters(service.config.journal.path) == []

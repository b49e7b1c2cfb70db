"""The syslog sink against real syslog servers started on loopback: rsyslog (imtcp, gtls) and syslog-ng
(`syslog()` and `network()` sources), TLS with a trustme CA. What each server parsed is read from its file."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pydantic
import pytest
import yaml

from receiver.config import parse_config
from sinks import registry
from sinks.base import Event, Outcome
from sinks.syslog import SyslogConfig, SyslogSink
from sinks.testing.compliance import make_events
from sinks.testing.exact import exact_event, same_json
from tests.peers.syslog import Certificates, Rsyslog, SyslogNg, SyslogServer, SyslogUnavailable, rsyslogd, syslog_ng

REQUIRED = os.environ.get("LOG_BRIDGE_REQUIRE_SYSLOG") == "1"


def need(finder: Any) -> None:
    try:
        finder()
    except SyslogUnavailable as exc:
        if REQUIRED:
            pytest.fail(f"LOG_BRIDGE_REQUIRE_SYSLOG=1 but {exc}")
        pytest.skip(str(exc))


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


def started(server: SyslogServer) -> Iterator[SyslogServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rsyslog(tmp_path: Path, certs: Certificates) -> Iterator[SyslogServer]:
    need(rsyslogd)
    yield from started(Rsyslog(tmp_path, tls=certs))


@pytest.fixture
def rsyslog_tcp(tmp_path: Path) -> Iterator[SyslogServer]:
    need(rsyslogd)
    yield from started(Rsyslog(tmp_path))


@pytest.fixture
def syslog_ng_tls(tmp_path: Path, certs: Certificates) -> Iterator[SyslogServer]:
    need(syslog_ng)
    yield from started(SyslogNg(tmp_path, tls=certs))


@pytest.fixture
def syslog_ng_lf(tmp_path: Path, certs: Certificates) -> Iterator[SyslogServer]:
    need(syslog_ng)
    yield from started(SyslogNg(tmp_path, tls=certs, framing="non-transparent"))


async def written(server: SyslogServer, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The server's parsed messages once it has written at least `count` (servers write asynchronously)."""
    deadline = time.monotonic() + timeout
    while len(messages := server.messages()) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return messages


async def delivered(sink: SyslogSink, batch: list[Event]) -> None:
    result = await sink.send(batch)
    assert result.outcome is Outcome.SUCCESS and not result.failures, result


# An event whose targets, actor.id and organization_id a re-serialising CEF encoder would change or refuse:
# integers beyond 64 bits, numbers beyond any double, more digits than a double holds, string escapes (and
# whitespace between the tokens, the only thing CEF's "compact JSON" may take out).
CEF_TARGETS = (
    rb'[ {"id": "team_1", "n": 123456789012345678901234567890, "x": 1e999, "d": 0.10000000000000000000001,'
    rb' "e": -1E+400, "s": "\u00e9\ud83d\ude00 a\"b\\c\/d = \u0000"}, {"id": 18446744073709551616} ]'
)
CEF_TARGETS_COMPACT = (
    rb'[{"id":"team_1","n":123456789012345678901234567890,"x":1e999,"d":0.10000000000000000000001,'
    rb'"e":-1E+400,"s":"\u00e9\ud83d\ude00 a\"b\\c\/d = \u0000"},{"id":18446744073709551616}]'
)
CEF_EXACT_EVENT_RAW = (
    b'{"id":"01HYCEFEXACT000000000001","action":"user.signed_in","occurred_at":"2024-01-15T10:30:00.000Z",'
    b'"actor":{"id":123456789012345678901234567890,"type":"user"},"targets":' + CEF_TARGETS + b","
    b'"context":{"location":"192.0.2.10","user_agent":"Chrome/124.0"},"organization_id":1.000000000000000000001}'
)


def cef_fields(cef: str) -> dict[str, str]:
    """A CEF line's extension as its keys and unescaped values."""
    extension = cef.rsplit("|", 1)[1]
    pairs = re.findall(r"(\w+)=((?:[^\\=]|\\.)*?)(?= \w+=|$)", extension)
    unescape = {"n": "\n", "r": "\r"}
    return {key: re.sub(r"\\(.)", lambda m: unescape.get(m[1], m[1]), value) for key, value in pairs}


def assert_cef_exact(fields: dict[str, str]) -> None:
    """The fields of CEF_EXACT_EVENT_RAW's CEF line carry every value as it was sent."""
    assert fields["cs2Label"] == "targets" and fields["cs2"].encode() == CEF_TARGETS_COMPACT
    assert fields["suid"] == fields["suser"] == "123456789012345678901234567890"
    assert fields["duid"] == "team_1" and fields["externalId"] == "01HYCEFEXACT000000000001"
    assert fields["cs5Label"] == "organizationId" and fields["cs5"] == "1.000000000000000000001"


def sd_params(sd: str) -> dict[str, str]:
    assert sd.startswith("[workos@32473 "), sd
    return {key: re.sub(r"\\(.)", r"\1", value) for key, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', sd)}


class TestConfig:
    def test_the_documented_example_works_as_written(self) -> None:
        tree = yaml.safe_load(
            """
            streams: [{name: workos, path: /workos, auth: {values: [s3cr3t-token-value]}, sinks: [siem]}]
            sinks:
              siem:
                type: syslog
                host: qradar.example.com
                port: 6514
                transport: tls              # tcp | tls (no UDP: it loses data silently)
                # framing: octet-counting   # octet-counting | non-transparent
                # format: json              # json | cef
            """
        )
        options = parse_config(tree, {}).sinks["siem"].options
        assert isinstance(options, SyslogConfig)
        assert (options.framing, options.format, options.app_name) == ("octet-counting", "json", "workos-audit")
        assert (options.facility, options.severity, options.hostname) == ("authpriv", "info", None)
        assert options.tls.verify is True and registry.load("syslog") is SyslogSink

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"transport": "udp"}, "transport"),
            ({"port": True}, "port"),
            ({"port": 70000}, "port"),
            ({"framing": "lf"}, "framing"),
            ({"format": "leef"}, "format"),
            ({"facility": "local9"}, "facility"),
            ({"app_name": "has space"}, "app_name"),
            ({"host": "tcp://siem:514"}, "host"),
            ({"timeout": 0}, "timeout"),
            ({"tls": {"cert_file": "c.pem"}}, "key_file"),
            ({"max_message_size": 479}, "max_message_size"),
        ],
    )
    def test_rejects(self, options: dict[str, Any], message: str) -> None:
        with pytest.raises(pydantic.ValidationError, match=message):
            SyslogConfig.model_validate({"host": "siem.example.com", **options})

    def test_default_ports(self) -> None:
        assert "6514" in repr(SyslogSink("s", SyslogConfig(host="h", tls={"verify": False})))
        assert "601" in repr(SyslogSink("s", SyslogConfig(host="h", transport="tcp")))


class TestCef:
    """The CEF line itself, without a server (the servers' tests below check what they parsed of it)."""

    @pytest.mark.parametrize("framing", ["octet-counting", "non-transparent"])
    def test_values_keep_the_text_they_were_sent_with(self, framing: str) -> None:
        sink = SyslogSink("siem", SyslogConfig(host="127.0.0.1", transport="tcp", format="cef", framing=framing))
        message = sink.frame(exact_event(event_raw=CEF_EXACT_EVENT_RAW)).decode()
        assert_cef_exact(cef_fields(message.rstrip("\n")))

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            (b'"actor":{"id":123456789012345678901234567890}', "suid=123456789012345678901234567890"),
            (b'"actor":{"id":-1e999,"name":"n"}', "suid=-1e999"),
            (b'"id":18446744073709551616', "externalId=18446744073709551616"),
            (b'"context":{"location":{"lat": 1e999}}', 'cs3={"lat":1e999}'),
            (b'"targets":[{"id":1.000000000000000000001}]', "duid=1.000000000000000000001"),
        ],
    )
    def test_a_number_in_any_field_keeps_its_text(self, field: bytes, value: str) -> None:
        sink = SyslogSink("siem", SyslogConfig(host="127.0.0.1", transport="tcp", format="cef"))
        raw = b'{"id":"e1","action":"user.signed_in",' + field + b"}"
        assert f" {value} " in sink.frame(exact_event(event_raw=raw)).decode() + " "

    @pytest.mark.parametrize("framing", ["octet-counting", "non-transparent"])
    @pytest.mark.parametrize("form", ["cef", "json"])
    def test_a_line_break_in_a_value_never_breaks_the_line(self, framing: str, form: str) -> None:
        """Was a defect: the CEF header escaped only '\\' and '|', and the structured data only '"', '\\' and ']',
        so an `action` (or `keySuffix`, or `id`) holding a line feed went out raw: with octet counting a SIEM
        that reads lines saw a record of the sender's making (`CEF:0|Evil|Injected|1|pwn|pwn|10|src=6.6.6.6`),
        and with non-transparent framing the valid event was dead-lettered for good ("the message holds a line
        feed"). The header now writes line breaks as `\\n` / `\\r` (as the extension does), and a value with a
        control character is left out of the structured data (the message carries it whole)."""
        action = "user.signed_in\nCEF:0|Evil|Injected|1|pwn|pwn|10|src=6.6.6.6\r"
        key = "k\n2"
        raw = orjson.dumps({"event": {"id": "e\n2", "action": action}, "keySuffix": key})
        sink = SyslogSink("siem", SyslogConfig(host="127.0.0.1", transport="tcp", format=form, framing=framing))
        message = sink.frame(Event(1, "workos", raw, action=action, time=1705314600.0, received_at=1705314600.5))
        line = message.removesuffix(b"\n") if framing == "non-transparent" else message
        assert b"\n" not in line and b"\r" not in line, message
        assert b"CEF:0|Evil" not in message.split(b"] ", 1)[0]
        if form == "cef":
            cef = message.decode().split("] ", 1)[1].rstrip("\n")
            name = re.findall(r"((?:[^|\\]|\\.)*)\|", cef)[4]  # the header's fields end at a '|' not escaped
            assert re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), name) == action
            assert cef_fields(cef)["cs4"] == key
        else:
            assert message.split(b"] ", 1)[1].rstrip(b"\n") == raw


class TestRsyslog:
    async def test_every_event_arrives_once_with_its_fields_parsed(self, rsyslog: SyslogServer) -> None:
        sink = rsyslog.sink(hostname="bridge-1", facility="local4", severity="notice", app_name="audit")
        events = make_events(200) + [exact_event(500)]
        try:
            await delivered(sink, events[:120])
            await delivered(sink, events[120:])
        finally:
            await sink.close()
        messages = await written(rsyslog, len(events))
        assert len(messages) == len(events)
        by_key = {sd_params(m["sd"])["keySuffix"]: m for m in messages}
        assert len(by_key) == len(events)  # once each
        for event in events:
            message = by_key[event.key_suffix or ""]
            assert message["msg"].encode() == event.raw  # the wrapper, byte for byte
            assert (message["pri"], message["facility"], message["severity"]) == (str(20 * 8 + 5), "local4", "notice")
            assert (message["host"], message["app"], message["msgid"]) == ("bridge-1", "audit", event.action)
            assert sd_params(message["sd"]) == {
                "id": event.event_id,
                "action": event.action,
                "keySuffix": event.key_suffix,
            }
            assert message["time"].startswith(event.timestamp[:19])

    @pytest.mark.parametrize("framing", ["octet-counting", "non-transparent"])
    async def test_a_tab_between_tokens_does_not_reach_the_server(
        self, rsyslog_tcp: SyslogServer, framing: str
    ) -> None:
        """Was a defect: a wrapper with a tab between its tokens (valid JSON whitespace, kept as received) went
        out in MSG as it was, and rsyslog escapes by default every control character it receives (`#011`):
        it wrote `"n":#011123456789…`, no longer JSON, the number run into the escape. Whitespace outside
        strings (the only place JSON text can hold a raw tab) is now taken out of such a wrapper; every value
        keeps its bytes."""
        raw = (
            b'{"event":{"id":"e1",\t"action":"a","n":\t123456789012345678901234567890,"s":"t\\tb"},\t"keySuffix":"k1"}'
        )
        sink = rsyslog_tcp.sink(framing=framing)
        try:
            await delivered(sink, [Event(1, "workos", raw, action="a", time=1705314600.0, received_at=1705314600.5)])
        finally:
            await sink.close()
        [message] = await written(rsyslog_tcp, 1)
        assert message["msg"].encode() == raw.replace(b"\t", b""), message["msg"]
        assert same_json(message["msg"].encode(), raw)

    async def test_non_transparent_framing_over_tcp(self, rsyslog_tcp: SyslogServer) -> None:
        sink = rsyslog_tcp.sink(framing="non-transparent")
        events = make_events(50)
        try:
            await delivered(sink, events)
        finally:
            await sink.close()
        messages = await written(rsyslog_tcp, 50)
        assert sorted(m["msg"].encode() for m in messages) == sorted(e.raw for e in events)

    @pytest.mark.parametrize(
        ("app_name", "hostname"), [("audit%d", "bridge-1"), ("audit", "bridge%1"), ("100%%", "bridge-1")]
    )
    async def test_a_percent_sign_in_app_name_or_hostname_is_sent_as_configured(
        self, rsyslog_tcp: SyslogServer, app_name: str, hostname: str
    ) -> None:
        """Was a defect: the header was a %-format string with the configured APP-NAME and HOSTNAME in it, so a
        `%` in either (printable ASCII, which both allow) broke it: `audit%d` failed every event PERMANENT
        ("not enough arguments for format string", all dead-lettered) and `100%%` went out as `100%`."""
        sink = rsyslog_tcp.sink(app_name=app_name, hostname=hostname)
        events = make_events(3)
        try:
            await delivered(sink, events)
        finally:
            await sink.close()
        messages = await written(rsyslog_tcp, 3)
        assert [(m["app"], m["host"]) for m in messages] == [(app_name, hostname)] * 3
        assert sorted(m["msg"].encode() for m in messages) == sorted(e.raw for e in events)

    async def test_cef_fields_parse(self, rsyslog: SyslogServer) -> None:
        sink = rsyslog.sink(format="cef", severity="warning")
        events = make_events(3)
        try:
            await delivered(sink, events)
        finally:
            await sink.close()
        messages = await written(rsyslog, 3)
        by_key = {sd_params(m["sd"])["keySuffix"]: m["msg"] for m in messages}
        for event in events:
            cef = by_key[event.key_suffix or ""]
            header, extension = cef.rsplit("|", 1)
            assert header == f"CEF:0|WorkOS|Audit Logs|1|{event.action}|{event.action}|6"
            fields = dict(re.findall(r"(\w+)=((?:[^\\=]|\\.)*?)(?= \w+=|$)", extension))
            data = event.event
            assert fields["act"] == data["action"] and fields["externalId"] == data["id"]
            assert fields["suid"] == data["actor"]["id"] and fields["duid"] == data["targets"][0]["id"]
            assert fields["src"] == data["context"]["location"]
            assert fields["requestClientApplication"] == data["context"]["user_agent"]
            assert fields["rt"] == str(int(event.time * 1000))
            assert fields["cs4Label"] == "keySuffix" and fields["cs4"] == event.key_suffix

    async def test_cef_carries_every_value_as_sent(self, rsyslog_tcp: SyslogServer) -> None:
        sink = rsyslog_tcp.sink(format="cef")
        events = [make_events(1)[0], exact_event(2, event_raw=CEF_EXACT_EVENT_RAW)]
        try:
            await delivered(sink, events)
        finally:
            await sink.close()
        messages = await written(rsyslog_tcp, 2)
        by_key = {sd_params(m["sd"])["keySuffix"]: m["msg"] for m in messages}
        assert_cef_exact(cef_fields(by_key["exact0001"]))

    async def test_mutual_tls(self, tmp_path: Path, certs: Certificates) -> None:
        need(rsyslogd)
        server = Rsyslog(tmp_path, tls=certs, client_auth=True)
        server.start()
        try:
            sink = server.sink()
            await delivered(sink, make_events(5))
            await sink.close()
            assert len(await written(server, 5)) == 5
        finally:
            server.stop()

    async def test_an_unknown_ca_is_a_configuration_problem(self, rsyslog: SyslogServer) -> None:
        sink = SyslogSink("siem", SyslogConfig(host="127.0.0.1", port=rsyslog.port, timeout=5))
        try:
            result = await sink.send(make_events(2))
            health = await sink.healthcheck()
        finally:
            await sink.close()
        assert result.outcome is Outcome.RETRY and result.config_problem and "tls.ca_file" in result.reason
        assert not health.ok and "CERTIFICATE_VERIFY_FAILED" in health.message

    async def test_nothing_listening_is_retry(self, tmp_path: Path) -> None:
        sink = SyslogSink("siem", SyslogConfig(host="127.0.0.1", port=9, transport="tcp", timeout=2))
        result = await sink.send(make_events(2))
        await sink.close()
        assert result.outcome is Outcome.RETRY and "127.0.0.1:9" in result.reason


class TestMessageSize:
    """Against rsyslog with its default `maxMessageSize` (8k)."""

    FORGED = "<34>1 2024-01-15T10:30:00.000Z dc01 sshd - - - FORGED: root login accepted from 203.0.113.9"

    @pytest.fixture
    def rsyslog_8k(self, tmp_path: Path) -> Iterator[SyslogServer]:
        need(rsyslogd)
        yield from started(Rsyslog(tmp_path, max_message_size="8k"))

    def event_with_name(self, seq: int, name: str) -> Event:
        raw = orjson.dumps({"event": {"id": f"e{seq}", "action": "a", "actor": {"name": name}}, "keySuffix": f"k{seq}"})
        return Event(seq, "workos", raw, action="a", time=1705314600.0, received_at=1705314600.5)

    @pytest.mark.parametrize("framing", ["octet-counting", "non-transparent"])
    async def test_an_event_over_the_limit_cannot_forge_a_record(self, rsyslog_8k: SyslogServer, framing: str) -> None:
        """Was a defect: an event longer than the receiver's limit was sent whole, and rsyslog kept its first
        8 KiB as one record and parsed the rest as a record of its own: an actor name padded so that a syslog
        header starts at byte 8193 became a record from host `dc01`, app `sshd`, severity crit, saying
        "root login accepted". Such an event is now refused before sending (PERMANENT, naming
        `max_message_size`, 8 KiB by default); the rest of the batch is delivered."""
        sink = rsyslog_8k.sink(framing=framing, hostname="bridge-1")
        probe = sink.frame(self.event_with_name(1, self.FORGED))
        message = probe.split(b" ", 1)[1] if framing == "octet-counting" else probe.removesuffix(b"\n")
        padding = 8193 - message.index(b"<34>1")  # where rsyslog's first record ends
        crafted, plain = self.event_with_name(1, "x" * padding + self.FORGED), self.event_with_name(2, "alice")
        try:
            result = await sink.send([crafted, plain])
        finally:
            await sink.close()
        await written(rsyslog_8k, 1)
        await asyncio.sleep(0.5)  # anything more would have been written by now
        messages = rsyslog_8k.messages()
        records = [(m["host"], m["app"], m["severity"]) for m in messages]
        assert records == [("bridge-1", "workos-audit", "info")], records
        assert messages[0]["msg"].encode() == plain.raw
        assert result.outcome is Outcome.SUCCESS and set(result.failures) == {1}, result
        failure = result.failures[1]
        assert failure.outcome is Outcome.PERMANENT and "max_message_size" in failure.reason, failure

    async def test_a_message_of_exactly_the_limit_arrives_whole(self, rsyslog_8k: SyslogServer) -> None:
        sink = rsyslog_8k.sink()
        size = len(sink.frame(self.event_with_name(1, "")).split(b" ", 1)[1])
        event = self.event_with_name(1, "y" * (8192 - size))
        try:
            assert len(sink.frame(event).split(b" ", 1)[1]) == 8192
            await delivered(sink, [event])
        finally:
            await sink.close()
        [message] = await written(rsyslog_8k, 1)
        assert message["msg"].encode() == event.raw


class TestSyslogNg:
    async def test_syslog_source_over_tls_parses_every_field(self, syslog_ng_tls: SyslogServer) -> None:
        sink = syslog_ng_tls.sink(hostname="bridge-2")
        events = make_events(100) + [exact_event(500)]
        try:
            await delivered(sink, events)
        finally:
            await sink.close()
        messages = await written(syslog_ng_tls, len(events))
        assert len(messages) == len(events)
        by_key = {m["sd_key"]: m for m in messages}
        for event in events:
            message = by_key[event.key_suffix or ""]
            assert message["msg"].encode() == event.raw
            assert (message["host"], message["app"], message["facility"], message["severity"]) == (
                "bridge-2",
                "workos-audit",
                "authpriv",
                "info",
            )
            assert message["sd_id"] == event.event_id and message["msgid"] == event.action

    async def test_cef_carries_every_value_as_sent(self, syslog_ng_tls: SyslogServer) -> None:
        sink = syslog_ng_tls.sink(format="cef")
        events = [make_events(1)[0], exact_event(2, event_raw=CEF_EXACT_EVENT_RAW)]
        try:
            await delivered(sink, events)
        finally:
            await sink.close()
        messages = await written(syslog_ng_tls, 2)
        assert_cef_exact(cef_fields({m["sd_key"]: m["msg"] for m in messages}["exact0001"]))

    async def test_an_occurred_at_outside_four_digit_years_is_delivered_and_parsed(
        self, syslog_ng_tls: SyslogServer
    ) -> None:
        """Was a defect: the TIMESTAMP was written with strftime's `%Y`, which does not pad a year before 1000,
        so an event that occurred in 0999 went out as `999-01-15T…`: syslog-ng refused the header and stored
        the whole message as its own "Error processing log message" record. An event in year 10000 UTC (9999
        at -14:00) could not be written at all: PERMANENT, dead-lettered. Years are now written with four
        digits, and a time no RFC 5424 TIMESTAMP can hold is sent as NILVALUE (`-`): MSG carries the event."""
        events = []
        for seq, occurred in enumerate(["0999-01-15T10:30:00.000Z", "9999-12-31T23:59:59-14:00"], 1):
            raw = orjson.dumps(
                {"event": {"id": f"e{seq}", "action": "a", "occurred_at": occurred}, "keySuffix": f"k{seq}"}
            )
            moment = datetime.fromisoformat(occurred.replace("Z", "+00:00")).timestamp()
            events.append(Event(seq, "workos", raw, action="a", time=moment, received_at=1705314600.5))
        sink = syslog_ng_tls.sink()
        try:
            await delivered(sink, events)
        finally:
            await sink.close()
        messages = {m["sd_key"]: m for m in await written(syslog_ng_tls, 2)}
        assert [messages[f"k{seq}"]["msg"].encode() for seq in (1, 2)] == [e.raw for e in events]
        assert messages["k1"]["time"].lstrip("0").startswith("999-01-15T10:30:00.000")  # syslog-ng's own format
        assert all(m["app"] == "workos-audit" and m["msgid"] == "a" for m in messages.values())

    async def test_network_source_with_lf_framing(self, syslog_ng_lf: SyslogServer) -> None:
        sink = syslog_ng_lf.sink(framing="non-transparent")
        events = make_events(40)
        try:
            await delivered(sink, events)
        finally:
            await sink.close()
        messages = await written(syslog_ng_lf, 40)
        assert sorted(m["msg"].encode() for m in messages) == sorted(e.raw for e in events)


def padded_events(first: int, count: int) -> list[Event]:
    """`count` events of about 4 KB each, seq (and `keySuffix` `k<seq>`) from `first`."""
    pad = "x" * 4000
    return [
        Event(n, "workos", orjson.dumps({"event": {"id": f"e{n}", "action": "a", "pad": pad}, "keySuffix": f"k{n}"}),
              action="a", time=1705314600.0, received_at=1705314600.5)
        for n in range(first, first + count)
    ]  # fmt: skip


async def test_a_batch_counted_delivered_has_left_the_process(rsyslog: SyslogServer) -> None:
    """Was a defect: a batch counted as delivered once the socket's send queue was empty (SIOCOUTQ 0), but
    over TLS the bytes pass through two buffers in the process first (the TLS layer's and the TCP transport's
    under it), and with a server that reads in bursts the kernel queue empties while the transport still holds
    megabytes: rsyslog over TLS, 20 MB batches, 14 sends of 20 returned SUCCESS with up to 13 MB not yet
    written to the socket. A server that stalled then, with the sink closed (as a shutdown does after the
    last send), lost them, counted delivered (3049 of 20000). A batch now counts as delivered only once no
    buffer in the process holds any of it either."""
    sent: list[Event] = []
    for round_ in range(4):
        sink = rsyslog.sink()
        events = padded_events(1 + 5000 * round_, 5000)
        assert rsyslog.process is not None
        try:
            await delivered(sink, events)
            sent += events
            rsyslog.process.send_signal(signal.SIGSTOP)  # the server stalls right after, and the sink is closed
        finally:
            await sink.close()
            rsyslog.process.send_signal(signal.SIGCONT)
    messages = await written(rsyslog, len(sent), timeout=30)
    arrived = {sd_params(m["sd"])["keySuffix"] for m in messages}
    missing = [e.key_suffix for e in sent if e.key_suffix not in arrived]
    assert not missing, f"{len(missing)} of {len(sent)} events counted as delivered never arrived"


def client_sockets(port: int) -> int:
    """This machine's TCP sockets connected to `port`, on the client's side, still holding a connection (any
    state but TIME_WAIT and CLOSE: an orphan in FIN_WAIT1 keeps its send queue too)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                count += fields[2].endswith(f":{port:04X}") and fields[3] not in ("06", "07")
    return count


async def test_a_server_that_stops_reading_holds_no_connection_per_retry(tmp_path: Path) -> None:
    """Was a defect: rsyslog stopped (SIGSTOP, as when its queues are full and it stops reading) made every
    send time out and RETRY, as it should, but the connection given up was only closed, and a transport closed
    with unsent data waits to flush it, here forever. Each retry opened a new connection and left the old one
    open holding the batch (13 MB batches: 4 connections and 40 MB after 4 sends). A connection that failed a
    write is now reset (SO_LINGER 0 and abort), so neither the process nor the kernel keeps it."""
    need(rsyslogd)
    server = Rsyslog(tmp_path)
    server.start()
    assert server.process is not None
    sink = server.sink(timeout=0.5)
    events = padded_events(1, 3000)
    try:
        await delivered(sink, events[:2])
        server.process.send_signal(signal.SIGSTOP)
        for _ in range(3):
            result = await sink.send(events)
            assert result.outcome is Outcome.RETRY, result
        assert client_sockets(server.port) <= 1
    finally:
        server.process.send_signal(signal.SIGCONT)
        await sink.close()
        server.stop()


@pytest.mark.parametrize("kind", ["syslog-ng", "rsyslog"])
async def test_a_server_restart_loses_nothing_counted_as_delivered(
    kind: str, tmp_path: Path, certs: Certificates
) -> None:
    """syslog-ng is stopped (SIGTERM) and started again in the middle of a run, right after a batch was counted
    delivered. rsyslog discards on SIGTERM what it has not yet read from its sockets although its TCP stack has
    acknowledged it (docs/sinks/syslog.md), so it is stopped once it has written what it acknowledged: what is
    checked there is that the sink notices the closed connection and counts nothing written into it."""
    need(rsyslogd if kind == "rsyslog" else syslog_ng)
    server: SyslogServer = Rsyslog(tmp_path, tls=certs) if kind == "rsyslog" else SyslogNg(tmp_path, tls=certs)
    server.start()
    sink = server.sink(timeout=5)
    batches = [make_events(50, start_seq=1 + 50 * n) for n in range(20)]
    before_restart: list[Event] = []
    retries = 0
    try:
        for number, batch in enumerate(batches):
            if number == 8:
                if kind == "rsyslog":
                    await written(server, len(before_restart))
                server.stop()  # with the sink's connection open
                server.start()
            while (await sink.send(batch)).outcome is not Outcome.SUCCESS:  # the engine's retry, without backoff
                retries += 1
                await asyncio.sleep(0.05)
            if number < 8:
                before_restart.extend(batch)
    finally:
        await sink.close()
        await written(server, 1000)
        server.stop()
    arrived = {m.get("sd_key") or sd_params(m["sd"])["keySuffix"] for m in server.messages()}
    missing = [e.key_suffix for e in before_restart if e.key_suffix not in arrived]
    assert not missing, f"{len(missing)} events counted as delivered before the restart were lost"
    # Nothing written into the closed connection was counted as delivered: every event arrived in the end.
    assert arrived >= {e.key_suffix for batch in batches for e in batch}

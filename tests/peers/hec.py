"""A local stand-in for a Splunk HTTP Event Collector, and the compliance `Harness` of the `splunk_hec` sink.

`HecPeer` is an aiohttp server on loopback that speaks the HEC protocol the way Splunk documents it: it
enforces the token (`Authorization: Splunk <token>`) and, when indexer acknowledgement is on, the request
channel; it parses concatenated JSON envelopes and applies the envelope rules (`event` required and not
blank, `time` numeric, known keys only); it answers with HEC's `{"text", "code"}` bodies and codes, serves
`/services/collector/ack` and `/services/collector/health/1.0`, and can be told to fail: busy for N
requests, any status/code, a changed or disabled token, a refused index, refused events (by action or
predicate), withheld acknowledgements. Like Splunk, it keeps the envelopes before the one it refuses.
It takes numbers of any size and keeps each event's bytes as they arrived (`StoredEvent.raw`).

Run one by hand:  python -m tests.peers.hec --port 8088 --token T  [--ack] [--tls-cert C --tls-key K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
from aiohttp import web

from sinks.splunk_hec import SplunkHecConfig, SplunkHecSink
from sinks.testing.compliance import REJECT_ACTION, Mode
from sinks.testing.exact import loads

__all__ = ["Harness", "HecPeer", "StoredEvent", "parse_envelopes", "split_envelopes"]

ENVELOPE_KEYS = frozenset({"time", "host", "source", "sourcetype", "index", "event", "fields"})
_MAX_CONTENT_LENGTH = 800 * 1024 * 1024
"""Splunk's default `max_content_length` for HEC."""


HEC_TEXT = {
    0: "Success",
    1: "Token disabled",
    2: "Token is required",
    3: "Invalid authorization",
    4: "Invalid token",
    5: "No data",
    6: "Invalid data format",
    7: "Incorrect index",
    8: "Internal server error",
    9: "Server is busy",
    10: "Data channel is missing",
    11: "Invalid data channel",
    12: "Event field is required",
    13: "Event field cannot be blank",
    14: "ACK is disabled",
    15: "Error in handling indexed fields",
    17: "HEC is healthy",
    18: "HEC is unhealthy, queues are full",
}
_STATUS = {0: 200, 1: 403, 2: 401, 3: 401, 4: 403, 8: 500, 9: 503, 17: 200, 18: 503}
"""HTTP status of each code; the others are 400."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event the peer indexed, with its metadata."""

    event: Any
    """The event parsed (`sinks.testing.exact.loads`: for looking at; compare `raw`)."""
    time: float | None
    host: str | None
    source: str | None
    sourcetype: str | None
    index: str | None
    fields: dict[str, Any] | None
    endpoint: str
    channel: str | None
    raw: bytes
    """The event's bytes exactly as they arrived: the envelope's `event` member, or the raw endpoint's line."""


@dataclass(slots=True)
class _Fault:
    status: int
    code: int | None
    text: str
    remaining: int | None
    retry_after: float | None


class _Refusal(Exception):
    """An HEC error answer."""

    def __init__(self, code: int, *, text: str | None = None, event_number: int | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.text = text or HEC_TEXT.get(code, "Error")
        self.event_number = event_number

    def response(self, *, numbered: bool = True) -> web.Response:
        body: dict[str, Any] = {"text": self.text, "code": self.code}
        if numbered and self.event_number is not None:
            body["invalid-event-number"] = self.event_number
        return _json(body, _STATUS.get(self.code, 400))


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def split_envelopes(body: bytes) -> tuple[list[bytes], int | None]:
    """The JSON texts concatenated in `body` (whitespace between them allowed), each as the bytes that arrived,
    and the index of the first one that is not JSON (None when all are). Numbers of any size are taken."""
    texts: list[bytes] = []
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        try:
            texts.append(bytes(_raw_value.decode(line)))
        except msgspec.DecodeError:
            break
    else:
        return texts, None
    # Slow path: envelopes that share a line or span lines. json finds where each ends; msgspec then checks
    # it is strict JSON (json's decoder also takes NaN and Infinity).
    texts = []
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return texts, 0
    decoder = json.JSONDecoder()
    position, end = 0, len(text)
    while True:
        while position < end and text[position] in " \t\r\n":
            position += 1
        if position >= end:
            return texts, None
        start = position
        try:
            _, position = decoder.raw_decode(text, position)
            texts.append(bytes(_raw_value.decode(text[start:position].encode())))
        except ValueError:  # msgspec.DecodeError is one
            return texts, len(texts)


def parse_envelopes(body: bytes) -> tuple[list[Any], int | None]:
    """The JSON values concatenated in `body`, parsed (see `split_envelopes`; `loads` for the values)."""
    texts, broken = split_envelopes(body)
    return [loads(text) for text in texts], broken


_UNSET: Any = msgspec.UNSET
_NO_EVENT = msgspec.Raw(b"")
"""Stands in for an absent `event` (told apart by identity)."""
_NO_FIELDS = msgspec.Raw(b"null")


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """One envelope with its event kept as bytes; an unknown key or a non-object refuses it (code 6)."""

    event: msgspec.Raw = msgspec.field(default_factory=lambda: _NO_EVENT)
    time: Any = msgspec.UNSET
    host: Any = msgspec.UNSET
    source: Any = msgspec.UNSET
    sourcetype: Any = msgspec.UNSET
    index: Any = msgspec.UNSET
    fields: msgspec.Raw = msgspec.field(default_factory=lambda: _NO_FIELDS)


_raw_value = msgspec.json.Decoder(msgspec.Raw)
_envelope = msgspec.json.Decoder(_Envelope)


def _given(value: Any) -> Any:
    return None if value is _UNSET else value


def _record(envelope: _Envelope, channel: str | None) -> StoredEvent:
    """What the peer keeps of an envelope it accepted (see `_check`)."""
    raw = bytes(envelope.event)
    when = _given(envelope.time)
    return StoredEvent(
        loads(raw),
        float(when) if when is not None else None,
        _given(envelope.host),
        _given(envelope.source),
        _given(envelope.sourcetype),
        _given(envelope.index),
        loads(bytes(envelope.fields)),
        "event",
        channel,
        raw,
    )


def _is_time(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


class HecPeer:
    """A Splunk HTTP Event Collector on loopback, for tests, benchmarks and trying the bridge out."""

    def __init__(
        self,
        *,
        token: str = "peer-hec-token",  # noqa: S107 - a stand-in's made-up token
        ack: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        indexes: set[str] | None = None,
        keep_events: bool = True,
        report_event_number: bool = True,
        on_store: Callable[[StoredEvent], None] | None = None,
    ) -> None:
        self.token = token
        """The accepted token; change it to make the sink's token invalid (403, code 4)."""
        self.token_disabled = False
        """When true the token is refused as disabled (403, code 1)."""
        self.ack = ack
        """Indexer acknowledgement on the token: the channel becomes mandatory and answers carry an ackId."""
        self.indexes = indexes
        """Indexes the token may write to (None: any); others are refused with code 7."""
        self.reject: Callable[[Any], bool] | None = None
        """Events (the `event` value) for which this is true are refused with code 6."""
        self.hold_acks = False
        """While true, new ackIds stay unacknowledged (until `release_acks`)."""
        self.keep_events = keep_events
        self.report_event_number = report_event_number
        """Whether refusals name the refused envelope (`invalid-event-number`), as Splunk does."""
        self.events: list[StoredEvent] = []
        self.event_count = 0
        self.requests = 0
        self.gzip_requests = 0
        self.ack_queries = 0
        self.channels: set[str] = set()
        self._on_store = on_store
        self._fault: _Fault | None = None
        self._acks: dict[str, dict[int, bool]] = {}
        self._next_ack: dict[str, int] = {}
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- control --

    def fail(
        self,
        status: int = 503,
        code: int | None = 9,
        text: str | None = None,
        *,
        count: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next `count` data requests (all, when None) with this status and HEC code."""
        message = text if text is not None else HEC_TEXT.get(code, "Error") if code is not None else "Error"
        self._fault = _Fault(status, code, message, count, retry_after)

    def busy(self, count: int | None = None) -> None:
        """Answer 503 "Server is busy" (code 9) to the next `count` data requests."""
        self.fail(503, 9, count=count)

    def reject_action(self, action: str) -> None:
        """Refuse (code 6) every event whose `action` is `action`."""
        self.reject = lambda event: isinstance(event, dict) and event.get("action") == action

    def release_acks(self) -> None:
        """Acknowledge every ackId handed out so far, and stop holding new ones."""
        self.hold_acks = False
        for pending in self._acks.values():
            for ack_id in pending:
                pending[ack_id] = True

    def restart(self) -> None:
        """What a HEC restart does: the acknowledgement state is gone (every channel's ackIds start again at
        0) and so are the events it stored."""
        self._next_ack.clear()
        self._acks.clear()
        self.clear()

    def recover(self) -> None:
        """Answer normally again: no fault, no refused events, acknowledgements flowing."""
        self._fault = None
        self.reject = None
        self.token_disabled = False
        self.release_acks()

    def clear(self) -> None:
        """Forget the stored events and counters."""
        self.events.clear()
        self.event_count = self.requests = self.gzip_requests = self.ack_queries = 0

    def stats(self) -> dict[str, float]:
        """Counters, also served at GET /_peer/stats (with the CPU time of the peer's process)."""
        return {
            "events": self.event_count,
            "requests": self.requests,
            "gzip_requests": self.gzip_requests,
            "ack_queries": self.ack_queries,
            "cpu_seconds": time.process_time(),
        }

    # -- lifecycle --

    @property
    def url(self) -> str:
        """The base URL to configure a sink with."""
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        """Listen on loopback (a free port unless one was given)."""
        app = web.Application(client_max_size=_MAX_CONTENT_LENGTH)
        for path in ("/services/collector", "/services/collector/event", "/services/collector/event/1.0"):
            app.router.add_post(path, self._handle_event)
        for path in ("/services/collector/raw", "/services/collector/raw/1.0"):
            app.router.add_post(path, self._handle_raw)
        app.router.add_route("*", "/services/collector/ack", self._handle_ack)
        for path in ("/services/collector/health", "/services/collector/health/1.0"):
            app.router.add_get(path, self._handle_health)
        app.router.add_get("/_peer/stats", self._handle_stats)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl)
        await self._site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- protocol --

    def _authorise(self, request: web.Request) -> None:
        header = request.headers.get("Authorization")
        if header is None:
            raise _Refusal(2)
        scheme, _, token = header.partition(" ")
        if scheme != "Splunk" or not token.strip():
            raise _Refusal(3)
        if token.strip() != self.token:
            raise _Refusal(4)
        if self.token_disabled:
            raise _Refusal(1)

    def _channel(self, request: web.Request) -> str | None:
        channel = request.headers.get("X-Splunk-Request-Channel") or request.query.get("channel")
        if channel is None:
            if self.ack:
                raise _Refusal(10)
            return None
        try:
            uuid.UUID(channel)
        except ValueError:
            raise _Refusal(11) from None
        self.channels.add(channel)
        return channel

    def _take_fault(self) -> web.Response | None:
        fault = self._fault
        if fault is None:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._fault = None
        body: dict[str, Any] = {"text": fault.text}
        if fault.code is not None:
            body["code"] = fault.code
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        return _json(body, fault.status, headers)

    async def _data_request(self, request: web.Request) -> tuple[bytes, str | None] | web.Response:
        self.requests += 1
        if request.headers.get("Content-Encoding", "").lower() == "gzip":
            self.gzip_requests += 1
        self._authorise(request)
        failed = self._take_fault()
        if failed is not None:
            return failed
        channel = self._channel(request)
        return await request.read(), channel  # aiohttp has already undone Content-Encoding: gzip

    def _store(self, records: list[StoredEvent], count: int | None = None) -> None:
        self.event_count += len(records) if count is None else count
        if self.keep_events:
            self.events.extend(records)
        if self._on_store is not None:
            for record in records:
                self._on_store(record)

    def _accepted(self, channel: str | None) -> web.Response:
        if not self.ack or channel is None:
            return _json({"text": "Success", "code": 0})
        ack_id = self._next_ack.get(channel, 0)
        self._next_ack[channel] = ack_id + 1
        self._acks.setdefault(channel, {})[ack_id] = not self.hold_acks
        return _json({"text": "Success", "code": 0, "ackId": ack_id})

    def _check(self, text: bytes) -> tuple[int, _Envelope | None]:
        """(0, the envelope) when HEC would index it, else (the code it refuses it with, None)."""
        try:
            envelope = _envelope.decode(text)
        except msgspec.DecodeError:  # not an object, a key HEC does not know, a number out of range
            return 6, None
        if envelope.event is _NO_EVENT:
            return 12, None
        event = bytes(envelope.event)
        if event == b"null" or (event.startswith(b'"') and not loads(event).strip()):
            return 13, None
        if envelope.time is not _UNSET and not _is_time(envelope.time):
            return 6, None
        index = envelope.index
        if any(
            value is not _UNSET and type(value) is not str
            for value in (envelope.host, envelope.source, envelope.sourcetype, index)
        ):
            return 6, None
        fields = loads(bytes(envelope.fields))
        if fields is not None and (not isinstance(fields, dict) or any(isinstance(v, dict) for v in fields.values())):
            return 15, None
        if self.indexes is not None and index is not _UNSET and index not in self.indexes:
            return 7, None
        if self.reject is not None and self.reject(loads(event)):
            return 6, None
        return 0, envelope

    async def _handle_event(self, request: web.Request) -> web.Response:
        try:
            got = await self._data_request(request)
            if isinstance(got, web.Response):
                return got
            body, channel = got
            texts, broken = split_envelopes(body)
            if not texts and broken is None:
                raise _Refusal(5)
            keep = self.keep_events or self._on_store is not None
            records: list[StoredEvent] = []
            accepted = 0
            refusal = None
            for number, text in enumerate(texts):
                code, envelope = self._check(text)
                if envelope is None:
                    refusal = _Refusal(code, event_number=number)
                    break
                accepted += 1
                if keep:
                    records.append(_record(envelope, channel))
            if refusal is None and broken is not None:
                refusal = _Refusal(6, event_number=broken)
            self._store(records, accepted)  # like Splunk, what precedes a refused envelope is indexed
            if refusal is not None:
                raise refusal
            return self._accepted(channel)
        except _Refusal as refusal:
            return refusal.response(numbered=self.report_event_number)

    async def _handle_raw(self, request: web.Request) -> web.Response:
        try:
            got = await self._data_request(request)
            if isinstance(got, web.Response):
                return got
            body, channel = got
            query = request.query
            index = query.get("index")
            if self.indexes is not None and index is not None and index not in self.indexes:
                raise _Refusal(7)
            lines = [line for line in body.split(b"\n") if line.strip()]
            if not lines:
                raise _Refusal(5)
            records: list[StoredEvent] = []
            for number, line in enumerate(lines):
                line = line.strip()
                try:
                    event: Any = loads(line)
                except ValueError:
                    event = line.decode("utf-8", "replace")
                if self.reject is not None and self.reject(event):
                    self._store(records)
                    raise _Refusal(6, event_number=number)
                stamp = query.get("time")
                records.append(
                    StoredEvent(
                        event,
                        float(stamp) if stamp and _is_time(stamp) else None,
                        query.get("host"),
                        query.get("source"),
                        query.get("sourcetype"),
                        index,
                        None,
                        "raw",
                        channel,
                        line,
                    )
                )
            self._store(records)
            return self._accepted(channel)
        except _Refusal as refusal:
            return refusal.response(numbered=self.report_event_number)

    async def _handle_ack(self, request: web.Request) -> web.Response:
        try:
            self._authorise(request)
            if not self.ack:
                raise _Refusal(14)
            channel = self._channel(request)
            if channel is None:
                raise _Refusal(10)
            self.ack_queries += 1
            try:
                asked = orjson.loads(await request.read())["acks"]
                if not isinstance(asked, list) or not all(isinstance(a, int) for a in asked):
                    raise TypeError
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise _Refusal(6) from None
            pending = self._acks.get(channel, {})
            answer: dict[str, bool] = {}
            for ack_id in asked:
                done = pending.get(ack_id, False)
                if done:
                    del pending[ack_id]  # an acknowledged ackId is reported once
                answer[str(ack_id)] = done
            return _json({"acks": answer})
        except _Refusal as refusal:
            return refusal.response()

    async def _handle_health(self, request: web.Request) -> web.Response:
        if "Authorization" in request.headers:
            try:
                self._authorise(request)
            except _Refusal as refusal:
                return _json({"text": refusal.text, "code": refusal.code}, 400)
        if self._fault is not None and self._fault.status == 503:
            return _Refusal(18).response()
        return _json({"text": "HEC is healthy", "code": 17})

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return _json(self.stats())


# --- compliance ----------------------------------------------------------------------------------


class Harness:
    """The `splunk_hec` sink wired to a `HecPeer` (compliance.Harness)."""

    supports = frozenset({"retry", "permanent", "partial"})

    def __init__(self, *, endpoint: str = "event", ack: bool = False, compression: str = "gzip") -> None:
        self.peer = HecPeer(ack=ack)
        self.endpoint = endpoint
        self.ack = ack
        self.compression = compression

    async def start(self) -> None:
        """Start the peer."""
        await self.peer.start()

    async def stop(self) -> None:
        """Stop the peer."""
        await self.peer.stop()

    def config(self, **overrides: Any) -> SplunkHecConfig:
        """A sink config pointed at the peer."""
        options: dict[str, Any] = {
            "url": self.peer.url,
            "token": self.peer.token,
            "endpoint": self.endpoint,
            "compression": self.compression,
            "index": "audit",
            "sourcetype": "workos:audit",
            "indexer_ack": {"enabled": self.ack, "poll_interval": "10ms", "timeout": "5s"},
            "timeout": "10s",
        }
        options.update(overrides)
        return SplunkHecConfig.model_validate(options)

    def build(self) -> SplunkHecSink:
        """A new sink pointed at the peer."""
        return SplunkHecSink("compliance", self.config())

    def set_mode(self, mode: Mode) -> None:
        """ok; retry = busy (503, code 9); permanent = every event refused (code 6); partial = REJECT_ACTION."""
        self.peer.recover()
        if mode == "retry":
            self.peer.busy()
        elif mode == "permanent":
            self.peer.reject = lambda event: True
        elif mode == "partial":
            self.peer.reject_action(REJECT_ACTION)

    async def received(self) -> list[dict[str, Any]]:
        """The bare events the peer stored."""
        return [record.event for record in self.peer.events]


# --- command line --------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)

    def show(record: StoredEvent) -> None:
        sys.stdout.buffer.write(record.raw + b"\n")

    peer = HecPeer(
        token=args.token,
        ack=args.ack,
        host=args.host,
        port=args.port,
        ssl_context=context,
        indexes=set(args.index) if args.index else None,
        keep_events=False,
        on_store=show if args.print else None,
    )
    if args.busy:
        peer.busy(args.busy)
    if args.reject_action:
        peer.reject_action(args.reject_action)
    await peer.start()
    print(f"HEC peer listening on {peer.url} (indexer ack {'on' if args.ack else 'off'})", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await peer.stop()
    print(f"HEC peer stopped: {peer.stats()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.peers.hec --port 8088 --token T`: a local HEC to point a splunk_hec sink at."""
    parser = argparse.ArgumentParser(prog="python -m tests.peers.hec", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8088)
    parser.add_argument("--token", required=True, help="the HEC token the peer accepts")
    parser.add_argument("--ack", action="store_true", help="turn indexer acknowledgement on")
    parser.add_argument("--index", action="append", help="an index the token may write to (repeatable)")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--busy", type=int, metavar="N", help="answer 503 (code 9) to the first N data requests")
    parser.add_argument("--reject-action", metavar="ACTION", help="refuse (code 6) events with this action")
    parser.add_argument("--print", action="store_true", help="write every stored event to stdout as NDJSON")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

"""The Splunk HTTP Event Collector sink (`type: splunk_hec`), spoken directly over aiohttp.

splunk-sdk is not used: it has no HEC client (it talks to the management port) and its current release
needs Python >= 3.13.

One `send` is one classified delivery of one batch: a POST of every envelope in one body, a bisection of the
batch when HEC rejects an event (so only the bad events are dead-lettered), and, with indexer acknowledgement
on, the wait for the indexers to confirm what was accepted. Retries, backoff and dead-lettering are the
delivery engine's.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp
import orjson
from pydantic import Field, SecretStr, field_validator, model_validator
from yarl import URL

from sinks.base import (
    Duration,
    Event,
    Health,
    Outcome,
    SendResult,
    SinkConfig,
    TlsOptions,
    classify_http_status,
    parse_retry_after,
)
from sinks.splitting import Answer, Part, Tally, send_in_parts

__all__ = ["IndexerAckOptions", "SplunkHecConfig", "SplunkHecSink", "TlsOptions"]

log = logging.getLogger(__name__)

EVENT_PATH = "services/collector/event"
RAW_PATH = "services/collector/raw"
ACK_PATH = "services/collector/ack"
HEALTH_PATH = "services/collector/health/1.0"

SPLIT_CODES = frozenset({5, 6, 12, 13, 15})
"""HEC codes that blame the data of a request (no data, invalid format, event missing or blank, bad fields)."""

_GZIP_LEVEL = 1
"""Level 1: 12x smaller WorkOS batches at a third of the CPU time of level 6 (13.7x)."""
_THREAD_COMPRESS_BYTES = 64 * 1024
"""Bodies at least this big are compressed in a worker thread (zlib releases the GIL)."""
_TEXT_LIMIT = 300


# --- configuration -------------------------------------------------------------------------------


class IndexerAckOptions(SinkConfig):
    """Indexer acknowledgement: a batch counts as delivered only once the indexers confirm it."""

    enabled: bool = False
    poll_interval: Duration = 10.0
    timeout: Duration = 300.0

    @model_validator(mode="after")
    def _positive(self) -> IndexerAckOptions:
        if self.poll_interval <= 0:
            raise ValueError("poll_interval must be greater than zero")
        if self.timeout <= 0:
            raise ValueError("timeout must be greater than zero")
        return self


class SplunkHecConfig(SinkConfig):
    """The options of a `splunk_hec` sink."""

    url: str
    """Base URL of the collector, e.g. `https://splunk.example.com:8088` (a path prefix is kept)."""
    token: SecretStr
    endpoint: Literal["event", "raw"] = "event"
    index: str | None = Field(default=None, min_length=1)
    sourcetype: str | None = Field(default=None, min_length=1)
    source: str | None = Field(default=None, min_length=1)
    """Fixed `source`; by default the wrapper's `source` (the WorkOS team), else the stream's name."""
    host: str | None = Field(default=None, min_length=1)
    compression: Literal["gzip", "none"] = "gzip"
    tls: TlsOptions = TlsOptions()
    indexer_ack: IndexerAckOptions = IndexerAckOptions()
    timeout: Duration = 30.0
    """Limit on one HTTP request (not on the wait for indexer acknowledgement)."""

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        try:
            url = URL(value.strip())
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("expected an http:// or https:// URL such as https://splunk.example.com:8088")
        if url.query_string or url.fragment:
            raise ValueError("the URL takes no query string or fragment")
        if url.user or url.password:
            raise ValueError("put credentials in `token`, not in the URL")
        if "/services/collector" in url.path:
            raise ValueError("give the base URL (https://host:8088), without /services/collector/...")
        return str(url).rstrip("/")

    @field_validator("token")
    @classmethod
    def _token_given(cls, value: SecretStr) -> SecretStr:
        token = value.get_secret_value().strip()  # a secret file's trailing newline is not part of it
        if not token:
            raise ValueError("the token is empty (is the environment variable set?)")
        return SecretStr(token)

    @field_validator("timeout")
    @classmethod
    def _timeout_positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("timeout must be greater than zero")
        return value


# --- classification of one HTTP answer -----------------------------------------------------------


class _Verdict(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    CONFIG = "config"
    """Retried, and the health check turns red: a token or index fix must not cost data."""
    SPLIT = "split"
    """The request's data was refused: bisect to find the bad events."""
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class _Reply:
    verdict: _Verdict
    reason: str = ""
    retry_after: float | None = None
    ack_id: int | None = None
    bad_index: int | None = None
    """HEC's `invalid-event-number`: which envelope of the request it refused."""


def _describe(status: int, code: int | None, text: str) -> str:
    detail = f"code {code}" if code is not None else ""
    if text:
        detail = f"{detail}: {text}" if detail else text
    return f"HEC answered {status} ({detail})" if detail else f"HEC answered {status}"


def _classify_reply(status: int, body: bytes, retry_after_header: str | None, *, index: str | None) -> _Reply:
    """What one HEC answer means for the events it carried."""
    code: int | None = None
    text = ""
    ack_id: int | None = None
    bad_index: int | None = None
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
        text = body[:_TEXT_LIMIT].decode("utf-8", "replace").strip()
    if isinstance(parsed, dict):
        if isinstance(parsed.get("code"), int):
            code = parsed["code"]
        if isinstance(parsed.get("text"), str):
            text = parsed["text"][:_TEXT_LIMIT]
        if isinstance(parsed.get("ackId"), int):
            ack_id = parsed["ackId"]
        if isinstance(parsed.get("invalid-event-number"), int):
            bad_index = parsed["invalid-event-number"]
    retry_after = parse_retry_after(retry_after_header)
    what = _describe(status, code, text)

    if 200 <= status < 300:
        return _Reply(_Verdict.OK, ack_id=ack_id)
    if status in (401, 403):
        return _Reply(_Verdict.CONFIG, f"{what}: HEC refused the token; fix the token (events are kept)")
    if code == 7:
        target = f"index {index!r}" if index else "the token's default index"
        return _Reply(
            _Verdict.CONFIG, f"{what}: HEC refused {target}; check it exists and the token may write to it", retry_after
        )
    if code in (10, 11, 14):
        # The sink always sends a valid channel and polls /ack only when configured: a setup problem, not the data's.
        return _Reply(_Verdict.CONFIG, f"{what}: check indexer acknowledgement on the token and the sink", retry_after)
    if code == 9 or status == 503:
        return _Reply(_Verdict.RETRY, f"{what}: HEC is busy", retry_after)
    if (status == 400 and code in SPLIT_CODES) or status == 413:
        return _Reply(_Verdict.SPLIT, what, bad_index=bad_index)
    if classify_http_status(status) is Outcome.PERMANENT:
        return _Reply(_Verdict.PERMANENT, what)
    if status in (408, 429) or status >= 500:
        return _Reply(_Verdict.RETRY, what, retry_after)
    # 404, 405, 3xx...: not HEC's answer about the data; most likely the url (or a proxy in front) is wrong.
    return _Reply(_Verdict.CONFIG, f"{what}: is the url right (a HEC base URL such as https://host:8088)?", retry_after)


# --- the sink ------------------------------------------------------------------------------------


class SplunkHecSink:
    """Delivers events to a Splunk HTTP Event Collector, one request body per batch."""

    Config = SplunkHecConfig

    def __init__(self, name: str, config: SplunkHecConfig) -> None:
        self.name = name
        self.config = config
        self.channel = str(uuid.uuid4())
        """The `X-Splunk-Request-Channel` of this sink instance, sent with every request."""
        self._base = URL(config.url + "/")
        self._ssl = config.tls.client_context(name) if self._base.scheme == "https" else None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._config_problem: str | None = None
        self._warned_no_ack = False
        self._headers = {
            "Authorization": f"Splunk {config.token.get_secret_value()}",
            "X-Splunk-Request-Channel": self.channel,
            "User-Agent": "log-bridge",
        }
        if config.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._fixed_meta: dict[str, str] = {
            key: value
            for key, value in (("host", config.host), ("sourcetype", config.sourcetype), ("index", config.index))
            if value is not None
        }

    def __repr__(self) -> str:
        return f"SplunkHecSink(name={self.name!r}, url={self.config.url!r}, endpoint={self.config.endpoint!r})"

    # -- public interface --

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Deliver one batch; bisect on refused data; with indexer ack on, wait for the indexers' confirmation."""
        if not batch:
            return SendResult.success()
        if self._closed:
            return SendResult.retry("the sink is closed")
        tally = Tally()
        awaiting: dict[int, list[Event]] = {}

        async def post(part: Part) -> Answer:
            return await self._send_part(part, awaiting)

        await send_in_parts(self._encode(batch, tally), post, tally, peer="HEC")
        if awaiting:
            await self._await_acks(awaiting, tally)
        return tally.result(batch)

    async def healthcheck(self) -> Health:
        """HEC's health endpoint, a token check, and the last token/index failure of a send."""
        if self._closed:
            return Health(False, f"sink {self.name!r} is closed")
        where = f"HEC at {self.config.url}"
        try:
            session = self._client()
            async with session.get(self._base / HEALTH_PATH, headers=self._auth_headers()) as response:
                body = await response.read()
                status = response.status
            if status != 200:
                reply = _classify_reply(status, body, None, index=self.config.index)
                if status in (400, 401, 403):
                    return Health(False, f"{where} refused the token: {reply.reason or status}")
                return Health(False, f"{where} is unhealthy: {reply.reason or status}")
            # A POST without data is refused with code 5 ("No data") by a valid token, 401/403 by a bad one.
            async with session.post(self._base / EVENT_PATH, data=b"", headers=self._auth_headers()) as response:
                body = await response.read()
                status = response.status
            reply = _classify_reply(status, body, None, index=self.config.index)
            if reply.verdict is _Verdict.CONFIG:
                return Health(False, f"{where}: {reply.reason}")
            if status >= 500 or status in (408, 429):
                return Health(False, f"{where} is unhealthy: {reply.reason}")
        except aiohttp.ClientSSLError as exc:
            return Health(False, f"{where}: TLS verification failed ({_short(exc)}); {_TLS_HINT}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Health(False, f"cannot reach {where}: {_short(exc)}")
        if self._config_problem is not None:
            return Health(False, f"last send to {where} failed: {self._config_problem} (red until a send succeeds)")
        ack = "on" if self.config.indexer_ack.enabled else "off"
        return Health(True, f"{where} is healthy and accepts the token (indexer acknowledgement {ack})")

    async def close(self) -> None:
        """Close the HTTP connections; safe to call twice."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- encoding --

    def _encode(self, batch: Sequence[Event], tally: Tally) -> list[Part]:
        """Each event's bytes: one part for the event endpoint; for raw, one part per `source` (a query parameter).

        The bare event goes out as the bytes WorkOS sent (an `orjson.Fragment` inside the envelope, or the line
        itself on the raw endpoint), never re-serialised from parsed values."""
        groups: dict[str | None, Part] = {}
        raw = self.config.endpoint == "raw"
        meta = self._fixed_meta
        for event in batch:
            try:
                source = self._source(event)
                bare = event.event_raw  # embedded as received: numbers and escapes keep their text
                if raw:
                    groups.setdefault(source, []).append((event, bare))
                else:
                    envelope = {"time": round(event.time, 3), **meta, "source": source, "event": orjson.Fragment(bare)}
                    groups.setdefault(None, []).append((event, orjson.dumps(envelope)))
            except (TypeError, ValueError) as exc:  # no event, raw not JSON (msgspec.DecodeError is a ValueError)
                tally.fail([event], Outcome.PERMANENT, f"cannot encode the event for HEC: {_short(exc)}")
        return list(groups.values())

    def _source(self, event: Event) -> str:
        return self.config.source or event.source or event.stream

    async def _body(self, items: Part) -> bytes:
        body = b"\n".join(encoded for _, encoded in items)
        if self.config.compression != "gzip":
            return body
        if len(body) >= _THREAD_COMPRESS_BYTES:
            return await asyncio.to_thread(_gzip, body)
        return _gzip(body)

    # -- one request --

    async def _send_part(self, part: Part, awaiting: dict[int, list[Event]]) -> Answer:
        """Post one part; remember its ackId (indexer acknowledgement) and any token/index problem."""
        reply = await self._post(part)
        if reply.verdict is _Verdict.OK:
            self._config_problem = None
            if self.config.indexer_ack.enabled:
                if reply.ack_id is None:
                    self._warn_no_ack()
                else:
                    awaiting[reply.ack_id] = [event for event, _ in part]
            return Answer.ok()
        if reply.verdict is _Verdict.CONFIG:
            self._config_problem = reply.reason
        if reply.verdict in (_Verdict.RETRY, _Verdict.CONFIG):
            return Answer.retry(reply.reason, reply.retry_after)
        if reply.verdict is _Verdict.SPLIT:
            return Answer.refused(reply.reason, reply.bad_index)
        return Answer.permanent(reply.reason)

    async def _post(self, part: Part) -> _Reply:
        raw = self.config.endpoint == "raw"
        url = self._base / (RAW_PATH if raw else EVENT_PATH)
        if raw:
            # every event of a raw part has the same source (see _encode)
            url = url.with_query({"channel": self.channel, **self._fixed_meta, "source": self._source(part[0][0])})
        headers = {**self._headers, "Content-Type": "text/plain" if raw else "application/json"}
        try:
            body = await self._body(part)
            async with self._client().post(url, data=body, headers=headers) as response:
                answer = await response.read()
                return _classify_reply(
                    response.status, answer, response.headers.get("Retry-After"), index=self.config.index
                )
        except aiohttp.ClientSSLError as exc:
            return _Reply(_Verdict.CONFIG, f"TLS verification of {self.config.url} failed ({_short(exc)}); {_TLS_HINT}")
        except TimeoutError:
            return _Reply(_Verdict.RETRY, f"no answer from HEC within {self.config.timeout:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            return _Reply(_Verdict.RETRY, f"cannot reach HEC at {self.config.url}: {_short(exc)}")

    # -- indexer acknowledgement --

    async def _await_acks(self, waiting: dict[int, list[Event]], tally: Tally) -> None:
        """Poll /ack every poll_interval until every ackId is confirmed or `timeout` passes; what is left
        unconfirmed is RETRY, so the engine sends it again (at-least-once)."""
        options = self.config.indexer_ack
        loop = asyncio.get_running_loop()
        deadline = loop.time() + options.timeout
        last_problem = ""
        while waiting:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(options.poll_interval, remaining))
            confirmed, problem = await self._query_acks(list(waiting))
            last_problem = problem or last_problem
            for ack_id in confirmed:
                waiting.pop(ack_id, None)
        for ack_id, events in waiting.items():
            reason = f"HEC indexers did not acknowledge ackId {ack_id} within {options.timeout:g}s"
            if last_problem:
                reason += f" (last /ack problem: {last_problem})"
            tally.fail(events, Outcome.RETRY, reason + "; sending again")
        waiting.clear()

    async def _query_acks(self, ack_ids: list[int]) -> tuple[list[int], str]:
        url = (self._base / ACK_PATH).with_query({"channel": self.channel})
        payload = orjson.dumps({"acks": ack_ids})
        headers = {**self._auth_headers(), "Content-Type": "application/json"}
        try:
            async with self._client().post(url, data=payload, headers=headers) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return [], f"cannot reach HEC: {_short(exc)}"
        reply = _classify_reply(status, body, None, index=self.config.index)
        if reply.verdict is not _Verdict.OK:
            if reply.verdict is _Verdict.CONFIG:
                self._config_problem = reply.reason
            return [], reply.reason
        try:
            acks = orjson.loads(body).get("acks", {})
            return [ack_id for ack_id in ack_ids if acks.get(str(ack_id)) is True], ""
        except (orjson.JSONDecodeError, AttributeError):
            return [], "unreadable /ack answer"

    def _warn_no_ack(self) -> None:
        if not self._warned_no_ack:
            self._warned_no_ack = True
            log.warning(
                "sink %s: indexer_ack is enabled but HEC returned no ackId (indexer acknowledgement is off on the "
                "token); accepted batches are counted as delivered without confirmation",
                self.name,
            )

    # -- plumbing --

    def _auth_headers(self) -> dict[str, str]:
        return {key: self._headers[key] for key in ("Authorization", "X-Splunk-Request-Channel", "User-Agent")}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            )
        return self._session


_TLS_HINT = "set tls.ca_file to the CA that signed the HEC certificate (or tls.verify: false to skip the check)"


def _gzip(body: bytes) -> bytes:
    compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
    return compressor.compress(body) + compressor.flush()


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:_TEXT_LIMIT]

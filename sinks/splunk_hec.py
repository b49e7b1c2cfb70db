"""The Splunk HTTP Event Collector sink (`type: splunk_hec`), spoken directly over aiohttp.

splunk-sdk is not used: it has no HEC client (it talks to the management port) and its current release
needs Python >= 3.13.

One `send` is one classified delivery of one batch: a POST of every envelope in one body and a bisection of the
batch when HEC rejects an event (so only the bad events are dead-lettered). With indexer acknowledgement on,
accepted events are PENDING: the engine calls `send` again with them after `poll_interval`, and the sink then
asks `/ack` instead of posting them twice; what is not confirmed within `timeout` is sent again. Retries,
backoff, waiting and dead-lettering are the delivery engine's.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Literal

import orjson
from pydantic import Field, field_validator
from yarl import URL

from sinks.base import Event, Health, SendResult, SinkConfig
from sinks.fields import HttpUrl, PositiveDuration, Secret, TlsOptions
from sinks.http_client import HttpClient, Reply
from sinks.outcome import Outcome, Verdict
from sinks.splitting import Part, Verdicts, fail, send_in_parts

__all__ = ["IndexerAckOptions", "SplunkHecConfig", "SplunkHecSink", "TlsOptions"]

log = logging.getLogger(__name__)

EVENT_PATH = "services/collector/event"
RAW_PATH = "services/collector/raw"
ACK_PATH = "services/collector/ack"
HEALTH_PATH = "services/collector/health/1.0"

SPLIT_CODES = frozenset({5, 6, 12, 13, 15})
"""HEC codes that blame the data of a request (no data, invalid format, event missing or blank, bad fields)."""


# --- configuration -------------------------------------------------------------------------------


class IndexerAckOptions(SinkConfig):
    """Indexer acknowledgement: a batch counts as delivered only once the indexers confirm it."""

    enabled: bool = False
    poll_interval: PositiveDuration = 10.0
    timeout: PositiveDuration = 300.0


class SplunkHecConfig(SinkConfig):
    """The options of a `splunk_hec` sink."""

    url: HttpUrl
    """Base URL of the collector, e.g. `https://splunk.example.com:8088` (a path prefix is kept)."""
    token: Secret
    endpoint: Literal["event", "raw"] = "event"
    index: str | None = Field(default=None, min_length=1)
    sourcetype: str | None = Field(default=None, min_length=1)
    source: str | None = Field(default=None, min_length=1)
    """Fixed `source`; by default the wrapper's `source` (the WorkOS team), else the stream's name."""
    host: str | None = Field(default=None, min_length=1)
    compression: Literal["gzip", "none"] = "gzip"
    tls: TlsOptions = TlsOptions()
    indexer_ack: IndexerAckOptions = IndexerAckOptions()
    timeout: PositiveDuration = 30.0
    """Limit on one HTTP request (not on the wait for indexer acknowledgement)."""

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if "?" in value:
            raise ValueError("the URL takes no query string or fragment")
        if "/services/collector" in value:
            raise ValueError("give the base URL (https://host:8088), without /services/collector/...")
        return value


# --- classification of one HTTP answer -----------------------------------------------------------


def _classify_reply(
    reply: Reply, *, index: str | None, http: HttpClient, data: bool = True
) -> tuple[Verdict, int | None]:
    """What one HEC answer means for the events it carried, and the ackId it gave. The answer's text goes
    through `http`'s scrubbing: HEC, or a proxy in front of it, may quote the token. `data`: the answer to a
    POST of events, whose 2xx HEC gives only with code 0 (its /ack and health answers carry none, or another)."""
    code: int | None = None
    text = ""
    ack_id: int | None = None
    bad_index: int | None = None
    try:
        parsed = orjson.loads(reply.body) if reply.body else None
    except orjson.JSONDecodeError:
        parsed = None
        text = http.peer_text(reply)
    if isinstance(parsed, dict):
        code = parsed["code"] if isinstance(parsed.get("code"), int) else None
        text = http.scrub(parsed["text"]) if isinstance(parsed.get("text"), str) else text
        ack_id = parsed["ackId"] if isinstance(parsed.get("ackId"), int) else None
        bad = parsed.get("invalid-event-number")
        bad_index = bad if isinstance(bad, int) else None
    status, retry_after = reply.status, reply.retry_after
    detail = ": ".join(part for part in (f"code {code}" if code is not None else "", text) if part)
    what = f"HEC answered {status}" + (f" ({detail})" if detail else "")

    if 200 <= status < 300:
        if data and code != 0:
            # Not HEC's answer: a proxy, a sign-in page or another service answered; the events may be nowhere.
            reason = f'{what} without HEC\'s answer ({{"code": 0}}): is the url a HEC base URL (or a proxy for one)?'
            return Verdict.retry(reason, retry_after, config_problem=True), None
        return Verdict.ok(), ack_id
    if status in (401, 403):
        return Verdict.retry(
            f"{what}: HEC refused the token; fix the token (events are kept)", config_problem=True
        ), None
    if code == 7:
        target = f"index {index!r}" if index else "the token's default index"
        reason = f"{what}: HEC refused {target}; check it exists and the token may write to it"
        return Verdict.retry(reason, retry_after, config_problem=True), None
    if code in (10, 11, 14):
        # The sink always sends a valid channel and polls /ack only when configured: a setup problem, not the data's.
        reason = f"{what}: check indexer acknowledgement on the token and the sink"
        return Verdict.retry(reason, retry_after, config_problem=True), None
    if code == 9 or status == 503:
        return Verdict.retry(f"{what}: HEC is busy", retry_after), None
    if (status == 400 and (code in SPLIT_CODES or code is None)) or status == 413:
        # Without a code the answer is not HEC's own (a HEC-compatible receiver, a proxy): split all the same,
        # so only the events it refuses are dead-lettered.
        return Verdict.refused(what, bad_index), None
    if status == 415:  # the request's form, not its events: a compression fix must not cost data
        reason = f"{what}: check the sink's compression (HEC, or a proxy before it, does not take it)"
        return Verdict.retry(reason, retry_after, config_problem=True), None
    if status in (400, 422):
        return Verdict.permanent(what), None
    if status in (408, 429) or status >= 500:
        return Verdict.retry(what, retry_after), None
    # 404, 405, 3xx...: not HEC's answer about the data; most likely the url (or a proxy in front) is wrong.
    reason = f"{what}: is the url right (a HEC base URL such as https://host:8088)?"
    return Verdict.retry(reason, retry_after, config_problem=True), None


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
        token = config.token.get_secret_value()
        self._http = HttpClient(
            name,
            peer="HEC",
            timeout=config.timeout,
            tls=config.tls,
            https=self._base.scheme == "https",
            secrets=[token],
        )
        self._warned_no_ack = False
        self._awaiting: dict[int, tuple[int, float, bool]] = {}
        """Per Event.seq: the ackId that carried it, when to stop waiting for it (monotonic), and whether HEC has
        handed that ackId out again since (it then no longer tells of this batch)."""
        self._auth = {"Authorization": f"Splunk {token}", "X-Splunk-Request-Channel": self.channel}
        self._fixed_meta: dict[str, str] = {
            key: value
            for key, value in (("host", config.host), ("sourcetype", config.sourcetype), ("index", config.index))
            if value is not None
        }

    def __repr__(self) -> str:
        return f"SplunkHecSink(name={self.name!r}, url={self.config.url!r}, endpoint={self.config.endpoint!r})"

    # -- public interface --

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Deliver one batch and bisect on refused data; with indexer ack on, answer PENDING for what HEC
        accepted, and, when called again with those events, what the indexers confirmed."""
        if not batch:
            return SendResult.success()
        verdicts: Verdicts = {}
        fresh = [event for event in batch if event.seq not in self._awaiting]
        if len(fresh) < len(batch):
            await self._confirm([event for event in batch if event.seq in self._awaiting], verdicts)

        async def post(part: Part) -> Verdict:
            return await self._send_part(part)

        if fresh:
            await send_in_parts(self._encode(fresh, verdicts), post, verdicts, peer="HEC")
        return SendResult.collect(batch, verdicts)

    async def healthcheck(self) -> Health:
        """HEC's health endpoint and a token check (a POST without data)."""
        if self._http.closed:
            return Health(False, f"sink {self.name!r} is closed")
        where = f"HEC at {self.config.url}"
        reply = await self._http.request("GET", self._base / HEALTH_PATH, None, self._auth)
        if isinstance(reply, Verdict):
            return Health(False, reply.reason)
        verdict, _ = _classify_reply(reply, index=self.config.index, http=self._http, data=False)
        if reply.status != 200:
            refused = "refused the token" if reply.status in (400, 401, 403) else "is unhealthy"
            return Health(False, f"{where} {refused}: {verdict.reason or reply.status}")
        # A POST without data is refused with code 5 ("No data") by a valid token, 401/403 by a bad one.
        reply = await self._http.request("POST", self._base / EVENT_PATH, b"", self._auth)
        if isinstance(reply, Verdict):
            return Health(False, reply.reason)
        verdict, _ = _classify_reply(reply, index=self.config.index, http=self._http)
        if verdict.config_problem:
            return Health(False, f"{where}: {verdict.reason}")
        if reply.status >= 500 or reply.status in (408, 429):
            return Health(False, f"{where} is unhealthy: {verdict.reason}")
        ack = "on" if self.config.indexer_ack.enabled else "off"
        return Health(True, f"{where} is healthy and accepts the token (indexer acknowledgement {ack})")

    async def close(self) -> None:
        """Close the HTTP connections; safe to call twice."""
        await self._http.close()

    # -- encoding --

    def _encode(self, batch: Sequence[Event], verdicts: Verdicts) -> list[Part]:
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
                reason = f"cannot encode the event for HEC: {self._http.scrub(exc)}"
                fail(verdicts, [event], Verdict.permanent(reason))
        return list(groups.values())

    def _source(self, event: Event) -> str:
        return self.config.source or event.source or event.stream

    # -- one request --

    async def _send_part(self, part: Part) -> Verdict:
        """Post one part; with indexer ack on, its events become PENDING on their ackId."""
        raw = self.config.endpoint == "raw"
        url = self._base / (RAW_PATH if raw else EVENT_PATH)
        if raw:
            # every event of a raw part has the same source (see _encode)
            url = url.with_query({"channel": self.channel, **self._fixed_meta, "source": self._source(part[0][0])})
        headers = {
            **self._auth,
            "User-Agent": "log-bridge",
            "Content-Type": "text/plain" if raw else "application/json",
        }
        body = b"\n".join(encoded for _, encoded in part)
        reply = await self._http.post(url, body, headers, compression=self.config.compression)
        if isinstance(reply, Verdict):
            return reply
        verdict, ack_id = _classify_reply(reply, index=self.config.index, http=self._http)
        options = self.config.indexer_ack
        if verdict.outcome is not Outcome.SUCCESS or not options.enabled:
            return verdict
        if ack_id is None:
            self._warn_no_ack()
            return verdict
        # HEC keeps its acknowledgement state in memory: after a restart (or from another instance behind a load
        # balancer) the channel's ackIds start again, and an ackId handed out again says nothing of the batch
        # that held it before, which may be lost. That batch is sent again (a duplicate at worst).
        for seq, (held, until, _) in self._awaiting.items():
            if held == ack_id:
                self._awaiting[seq] = (held, until, True)
        deadline = time.monotonic() + options.timeout
        for event, _ in part:
            self._awaiting[event.seq] = (ack_id, deadline, False)
        return Verdict.pending(f"HEC accepted ackId {ack_id}; awaiting the indexers", options.poll_interval)

    # -- indexer acknowledgement --

    async def _confirm(self, events: list[Event], verdicts: Verdicts) -> None:
        """Ask /ack about the events HEC accepted earlier: confirmed ones are delivered, unconfirmed ones stay
        PENDING until `timeout`, then are RETRY (sent again: at-least-once)."""
        options = self.config.indexer_ack
        held = [self._awaiting[event.seq] for event in events]
        ack_ids = sorted({ack_id for ack_id, _, again in held if not again})
        confirmed, problem = await self._query_acks(ack_ids) if ack_ids else (set(), "")
        now = time.monotonic()
        for event in events:
            ack_id, deadline, again = self._awaiting[event.seq]
            if again:
                del self._awaiting[event.seq]
                reason = f"HEC handed out ackId {ack_id} again (it restarted, or another instance answered)"
                verdicts[event.seq] = Verdict.retry(reason + "; sending again")
            elif ack_id in confirmed:
                del self._awaiting[event.seq]
            elif now >= deadline:
                del self._awaiting[event.seq]
                reason = f"HEC indexers did not acknowledge ackId {ack_id} within {options.timeout:g}s"
                reason += f" (last /ack problem: {problem})" if problem else ""
                verdicts[event.seq] = Verdict.retry(reason + "; sending again")
            else:
                reason = f"awaiting the indexers' acknowledgement of ackId {ack_id}" + (
                    f" ({problem})" if problem else ""
                )
                verdicts[event.seq] = Verdict.pending(reason, options.poll_interval)

    async def _query_acks(self, ack_ids: list[int]) -> tuple[set[int], str]:
        url = (self._base / ACK_PATH).with_query({"channel": self.channel})
        headers = {**self._auth, "Content-Type": "application/json"}
        reply = await self._http.request("POST", url, orjson.dumps({"acks": ack_ids}), headers)
        if isinstance(reply, Verdict):
            return set(), reply.reason
        verdict, _ = _classify_reply(reply, index=self.config.index, http=self._http, data=False)
        if verdict.outcome is not Outcome.SUCCESS:
            return set(), verdict.reason
        try:
            acks = orjson.loads(reply.body).get("acks", {})
            return {ack_id for ack_id in ack_ids if acks.get(str(ack_id)) is True}, ""
        except (orjson.JSONDecodeError, AttributeError):
            return set(), "unreadable /ack answer"

    def _warn_no_ack(self) -> None:
        if not self._warned_no_ack:
            self._warned_no_ack = True
            log.warning(
                "sink %s: indexer_ack is enabled but HEC returned no ackId (indexer acknowledgement is off on the "
                "token); accepted batches are counted as delivered without confirmation",
                self.name,
            )

"""The HTTP forward sink (`type: http`): POSTs batches to any HTTP(S) collector — Cribl, a Sumo Logic HTTP
source, a Logstash or Vector http input, another log-bridge — as a JSON array or NDJSON of the WorkOS wrappers
(or of the bare events), exactly the bytes WorkOS sent.

Answers (sinks.http_client.classify_status): 2xx delivered; 408, 429, 5xx and connection errors retried (with
`Retry-After`); 400 and 413 split through the shared bisection until the refused events stand alone (the first
400 with compression on is sent again uncompressed first: see `_uncompressed`); 401, 403,
404, 405, 407, 415, 421 and 3xx retried as a configuration problem (a token, URL or compression fix must not cost
data), a redirect never followed; any other 4xx permanent.

With `url_path_secret` (an endpoint whose URL path is its credential, as a Sumo Logic HTTP source's) the URL is
shown as its origin and `/…` wherever the sink describes it, and its path is a secret the logs mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, Self

from pydantic import SecretStr, field_validator, model_validator
from yarl import URL

from sinks.base import Event, Health, SendResult, SinkConfig
from sinks.fields import HEADER_NAME, Compression, HttpUrl, PositiveDuration, TlsOptions, has_control_character
from sinks.http_client import HttpClient, classify_status, header_secrets
from sinks.outcome import Outcome, Verdict
from sinks.splitting import Item, Part, Verdicts, fail, send_in_parts

__all__ = ["HttpForwardConfig", "HttpForwardSink"]

log = logging.getLogger(__name__)

_RESERVED = frozenset({"content-length", "content-encoding", "content-type", "host", "transfer-encoding"})
_CONTENT_TYPES = {"json_array": "application/json", "ndjson": "application/x-ndjson"}


class HttpForwardConfig(SinkConfig):
    """The options of an `http` sink."""

    url: HttpUrl
    url_path_secret: bool = False
    """The URL's path (and query) is a credential: never shown, masked in logs."""
    encoding: Literal["json_array", "ndjson"] = "json_array"
    payload: Literal["wrapper", "event"] = "wrapper"
    """`wrapper`: `{"event": ..., "keySuffix": ..., ...}` as WorkOS sent it; `event`: the bare WorkOS event."""
    headers: dict[str, SecretStr] = {}
    """Extra request headers; values are secrets (kept out of logs, reasons and health messages)."""
    compression: Compression = "none"
    timeout: PositiveDuration = 30.0
    """Limit on one HTTP request."""
    tls: TlsOptions = TlsOptions()

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _RESERVED:
                raise ValueError(f"{name} is set by the sink (see encoding and compression)")
            text = secret.get_secret_value()
            if not text.strip():
                raise ValueError(f"the value of {name} is empty (is its variable set?)")
            if has_control_character(text.strip()):
                raise ValueError(f"the value of {name} holds a line break, a tab or another control character")
        return {name: SecretStr(secret.get_secret_value().strip()) for name, secret in value.items()}

    @model_validator(mode="after")
    def _secret_path(self) -> Self:
        if self.url_path_secret and not self.secrets():
            raise ValueError("url_path_secret: the url has no path to keep secret")
        return self

    @property
    def origin(self) -> str:
        """`scheme://host[:port]` of the url."""
        return str(URL(self.url).origin())

    def secrets(self) -> list[str]:
        """The URL's path and query, with `url_path_secret`."""
        return [path] if self.url_path_secret and (path := self.url[len(self.origin) :]).strip("/") else []

    @property
    def shown_url(self) -> str:
        """The url as reasons, health messages and `repr` show it."""
        return f"{self.origin}/…" if self.url_path_secret else self.url


class HttpForwardSink:
    """Posts each batch as one request (split only when the endpoint refuses its data)."""

    Config = HttpForwardConfig

    def __init__(self, name: str, config: HttpForwardConfig) -> None:
        self.name = name
        self.config = config
        secrets = [
            secret
            for name, value in config.headers.items()
            for secret in header_secrets(name, value.get_secret_value())
        ]
        self._http = HttpClient(
            name,
            peer="the HTTP endpoint",
            timeout=config.timeout,
            tls=config.tls,
            https=config.url.startswith("https:"),
            secrets=secrets + config.secrets(),
        )
        self._headers = {name: value.get_secret_value() for name, value in config.headers.items()}
        self._headers["Content-Type"] = _CONTENT_TYPES[config.encoding]
        self._headers.setdefault("User-Agent", "log-bridge")
        self._compression = config.compression
        """What request bodies are sent as: `compression`, or none once the endpoint showed it cannot decode it."""
        self._compression_checked = config.compression == "none"

    def __repr__(self) -> str:
        return f"HttpForwardSink(name={self.name!r}, url={self.config.shown_url!r}, encoding={self.config.encoding!r})"

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Post the batch; split a refused request down to the events at fault."""
        verdicts: Verdicts = {}
        items: list[Item] = []
        for event in batch:
            try:
                bare = event.event_raw  # refuses a wrapper without an event: nothing is sent as if WorkOS had
                items.append((event, bare if self.config.payload == "event" else event.raw))
            except (TypeError, ValueError) as exc:
                fail(verdicts, [event], Verdict.permanent(f"cannot encode the event: {self._http.scrub(exc)}"))
        if items:
            await send_in_parts([items], self._post, verdicts, peer="the HTTP endpoint")
        return SendResult.collect(batch, verdicts)

    async def healthcheck(self) -> Health:
        """A HEAD request: the endpoint is reachable over TLS, answers at this URL (no redirect) and does not
        refuse the credentials."""
        reply = await self._http.request("HEAD", self.config.url, None, self._headers)
        if isinstance(reply, Verdict):
            return Health(False, reply.reason)
        if reply.status in (401, 403, 407):
            return Health(False, f"{self._http.describe(reply, self.config.shown_url)}; check the headers")
        if 300 <= reply.status < 400:  # not followed (a send is not either): the endpoint is elsewhere
            where = self._http.scrub(reply.headers.get("Location", "elsewhere"))
            return Health(False, f"{self._http.describe(reply, self.config.shown_url)} (to {where}); is the url right?")
        return Health(
            True, f"{self.config.shown_url} answers ({reply.status}); credentials are checked by the first send"
        )

    async def close(self) -> None:
        """Close the connections; safe to call twice."""
        await self._http.close()

    async def _post(self, part: Part) -> Verdict:
        if self.config.encoding == "ndjson":
            body = b"\n".join(encoded for _, encoded in part) + b"\n"
        else:
            body = b"[" + b",".join(encoded for _, encoded in part) + b"]"
        reply = await self._http.post(self.config.url, body, self._headers, compression=self._compression)
        if isinstance(reply, Verdict):
            return reply
        verdict = classify_status(reply.status, self._http.describe(reply, self.config.shown_url), reply.retry_after)
        if reply.status == 400 and not self._compression_checked:
            return await self._uncompressed(body, verdict)
        return verdict

    async def _uncompressed(self, body: bytes, refused: Verdict) -> Verdict:
        """The first request refused with 400 is sent again as it is, uncompressed. An endpoint that
        cannot decode a Content-Encoding often answers 400 (aiohttp's server does for zstd without its module),
        which reads as refused events: bisected, every event of every batch would be dead-lettered. Taken
        uncompressed, it was the compression: the sink sends uncompressed from then on (until it is built again,
        at a reload or restart), and says so; refused again, the events are at fault, and are split as before."""
        reply = await self._http.post(self.config.url, body, self._headers, compression="none")
        if isinstance(reply, Verdict):  # no answer: the check is made again with the next refusal
            return refused
        self._compression_checked = True
        verdict = classify_status(reply.status, self._http.describe(reply, self.config.shown_url), reply.retry_after)
        if verdict.outcome is Outcome.SUCCESS:
            log.warning(
                "sink %s: the endpoint refused a %s-compressed request (%s) and took it uncompressed: the sink "
                "sends uncompressed from now on; set its compression to none",
                self.name,
                self._compression,
                refused.reason,
            )
            self._compression = "none"
        return verdict

"""The Datadog sink (`type: datadog`): events go to the Datadog logs intake in WorkOS's native format.

Each event becomes one log item: `message` is the JSON text of the bare WorkOS event exactly as WorkOS sent
it (Datadog parses it into attributes; numbers of any size and every escape arrive unchanged), with
`ddsource`, `service`, and when configured `ddtags` and `hostname`, so facets and pipelines built on
WorkOS's own Datadog stream keep working.

datadog-api-client supplies the site handling (the `submit_log` operation's server list picks
`https://http-intake.logs.<site>`), the authentication header, the validate call of the health check and the
HTTP transport (its urllib3 pool, with its TLS and proxy settings). The request body is built here with orjson
and zlib rather than through `HTTPLog`/`HTTPLogItem` models: building and serialising 1000 models costs about
20 ms of pure Python, four times the sink's own encoding; through `LogsApi.submit_log` a send costs ~30 ms of
CPU per 1000 events against ~9 ms here, which keeps the model path around the 30 k events/s target on two
cores (bench/datadog.py, docs/sinks/datadog.md). The body holds the same JSON value the models serialise to
(written compactly, in UTF-8); whichever builds it, `message` is `event_raw.decode()`.

Blocking work (encoding, compression, HTTP) runs on a small executor owned by the sink.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import orjson
import urllib3
from datadog_api_client import ApiClient, Configuration
from datadog_api_client.exceptions import ApiException
from datadog_api_client.v1.api.authentication_api import AuthenticationApi
from datadog_api_client.v2.api.logs_api import LogsApi
from pydantic import BeforeValidator, Field, SecretStr, field_validator

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
from sinks.splitting import Answer, Item, Part, Tally, send_in_parts

__all__ = ["MAX_ITEMS", "MAX_ITEM_BYTES", "MAX_PAYLOAD_BYTES", "SITES", "DatadogConfig", "DatadogSink"]

SITES: tuple[str, ...] = (
    "datadoghq.com",
    "us3.datadoghq.com",
    "us5.datadoghq.com",
    "datadoghq.eu",
    "ap1.datadoghq.com",
    "ap2.datadoghq.com",
    "uk1.datadoghq.com",
    "ddog-gov.com",
    "us2.ddog-gov.com",
)
"""The Datadog sites the client's `submit_log` operation knows."""

MAX_ITEMS = 1000
"""Log items per request (intake limit)."""
MAX_PAYLOAD_BYTES = 5_000_000
"""Uncompressed bytes per request (intake limit: 5 MB)."""
MAX_ITEM_BYTES = 1_000_000
"""Bytes of one encoded log item; the intake truncates larger ones, so they are dead-lettered instead."""
GZIP_LEVEL = 6
"""The Datadog Agent's default; level 1 saves ~1 ms per 1000 events for ~20 % larger bodies."""
WORKERS = 4
"""Threads doing blocking work, and connections kept to the intake (the client's pool holds 4)."""

_SUBMIT_LOG = "submit_log"
_SPLIT_STATUSES = frozenset({400, 413})
_AUTH_STATUSES = frozenset({401, 403})
_REASON_LIMIT = 300
_TLS_HINT = "set tls.ca_file to the CA that signed the intake's certificate (or tls.verify: false to skip the check)"


def _tag_list(value: object) -> object:
    """Tags as YAML may give them: a list, or one comma-separated string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class DatadogConfig(SinkConfig):
    """The Datadog sink's own keys."""

    api_key: SecretStr
    """Datadog API key (sent as `DD-API-KEY`)."""
    site: str = "datadoghq.com"
    """Datadog site; picks `https://http-intake.logs.<site>`."""
    service: str = Field("audit-logs", min_length=1)
    """The `service` of every log item."""
    source: str | None = None
    """The `ddsource` of every item; unset: the event's WorkOS `source` (team name, as WorkOS sends), else `workos`."""
    tags: Annotated[tuple[str, ...], BeforeValidator(_tag_list)] = ()
    """`ddtags`, e.g. `["env:prod", "team:security"]`."""
    hostname: str | None = None
    """The `hostname` of every item; unset: none is sent."""
    compression: Literal["gzip", "none"] = "gzip"
    """Request body encoding."""
    endpoint: str | None = None
    """Base URL replacing `https://http-intake.logs.<site>` (and `https://api.<site>` for the health check)."""
    timeout: Duration = 30.0
    """Seconds one HTTP request may take."""
    tls: TlsOptions = TlsOptions()
    """How the intake's certificate is checked (a private CA for a proxy under `endpoint`)."""

    @field_validator("api_key")
    @classmethod
    def _key_present(cls, value: SecretStr) -> SecretStr:
        key = value.get_secret_value().strip()  # a key read from a file often ends with a newline
        if not key:
            raise ValueError("the API key is empty")
        return SecretStr(key)

    @field_validator("site", mode="before")
    @classmethod
    def _known_site(cls, value: object) -> object:
        site = value.strip().lower() if isinstance(value, str) else value
        if site not in SITES:
            raise ValueError(f"unknown Datadog site {value!r}; valid sites: {', '.join(SITES)}")
        return site

    @field_validator("tags")
    @classmethod
    def _clean_tags(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for tag in value:
            if not tag or "," in tag:
                raise ValueError(f"a tag may not be empty or hold a comma: {tag!r}")
        return value

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError("expected an http:// or https:// URL, e.g. http://127.0.0.1:9999")
        return value.rstrip("/")

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("the timeout must be more than 0")
        return value


_T = TypeVar("_T")


class DatadogSink:
    """Sends batches to the Datadog logs intake (`POST /api/v2/logs`)."""

    Config: ClassVar[type[DatadogConfig]] = DatadogConfig

    def __init__(self, name: str, config: DatadogConfig) -> None:
        self.name = name
        self.config = config
        self._key = config.api_key.get_secret_value()
        config.tls.client_context(name)  # a CA file that cannot be loaded fails here, naming its YAML path
        self._client = ApiClient(_client_configuration(config))
        self.logs_url = _submit_log_host(self._client) + "/api/v2/logs"
        """Where log batches go (`https://http-intake.logs.<site>/api/v2/logs`, or under `endpoint`)."""
        self.validate_url = self._client.configuration.host + "/api/v1/validate"
        """Where the health check validates the key (`https://api.<site>/api/v1/validate`, or under `endpoint`)."""
        self._headers = self._request_headers()
        self._timeout = urllib3.Timeout(total=config.timeout)
        self._retries = _no_retries()
        self._item_head = self._fixed_fields()
        self._executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"datadog-{name}")
        self._auth_refusal: str | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"DatadogSink(name={self.name!r}, url={self.logs_url!r})"

    # --- the sink interface ----------------------------------------------------------------------

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Deliver one batch in as many requests as the intake limits need, and classify every event."""
        if self._closed:
            return SendResult.retry("the Datadog sink is closed")
        if not batch:
            return SendResult.success()
        tally = Tally()
        items = await self._off_loop(self._encode_all, batch, tally)
        await send_in_parts(_chunks(items), self._send_part, tally, peer="Datadog")
        return tally.result(batch)

    async def healthcheck(self) -> Health:
        """Red while the last sends met a refused key; else validate the key against the site."""
        if self._auth_refusal is not None:
            return Health(False, self._auth_refusal)
        if self._closed:
            return Health(False, "the Datadog sink is closed")
        return await self._off_loop(self._validate_key)

    async def close(self) -> None:
        """Stop the executor and drop pooled connections; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        # Sends already handed to the executor finish (bounded by `timeout`); new ones are refused.
        self._executor.shutdown(wait=False)
        self._client.close()

    # --- encoding --------------------------------------------------------------------------------

    def _fixed_fields(self) -> dict[str, str]:
        fields = {"service": self.config.service}
        if self.config.tags:
            fields["ddtags"] = ",".join(self.config.tags)
        if self.config.hostname:
            fields["hostname"] = self.config.hostname
        return fields

    def encode(self, event: Event) -> bytes:
        """One log item: `{"ddsource", "service", ["ddtags",] ["hostname",] "message": <event JSON>}`."""
        item = dict(self._item_head)
        item["ddsource"] = self.config.source or event.source or "workos"
        # The event's JSON text exactly as WorkOS sent it: re-serialising parsed values would round integers
        # beyond 64 bits and turn 1e999 into null.
        item["message"] = event.event_raw.decode()
        return orjson.dumps(item)

    def _encode_all(self, batch: Sequence[Event], tally: Tally) -> list[Item]:
        items: list[Item] = []
        for event in batch:
            try:
                item = self.encode(event)
            except (TypeError, ValueError) as exc:  # no event, raw not JSON or not UTF-8
                tally.fail([event], Outcome.PERMANENT, f"cannot encode the event for Datadog: {exc}")
                continue
            if len(item) > MAX_ITEM_BYTES:
                reason = (
                    f"the event is {len(item)} bytes once encoded, over Datadog's 1 MB per-log limit "
                    f"({MAX_ITEM_BYTES} bytes); Datadog would truncate it"
                )
                tally.fail([event], Outcome.PERMANENT, reason)
                continue
            items.append((event, item))
        return items

    # --- delivery ------------------------------------------------------------------------------

    async def _send_part(self, chunk: Part) -> Answer:
        """Post one request on the executor; a refused key turns the health check red until a send succeeds."""
        status, answer = await self._off_loop(self._post, chunk)
        if answer.outcome is Outcome.SUCCESS:
            self._auth_refusal = None
        elif status in _AUTH_STATUSES:
            self._auth_refusal = f"Datadog refused the API key: {answer.reason}; check api_key and site"
        return answer

    def _post(self, chunk: Part) -> tuple[int | None, Answer]:
        """One blocking POST of a JSON array of items, and what the answer means (runs on the executor)."""
        body = b"[" + b",".join(item for _, item in chunk) + b"]"
        if self.config.compression == "gzip":
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            body = compressor.compress(body) + compressor.flush()
        try:
            response = self._client.rest_client.pool_manager.request(
                "POST",
                self.logs_url,
                body=body,
                headers=dict(self._headers),
                timeout=self._timeout,
                retries=self._retries,
                preload_content=True,
            )
        except urllib3.exceptions.HTTPError as exc:
            if _tls_failure(exc):
                return None, Answer.retry(self._tls_reason(self.logs_url, exc))
            return None, Answer.retry(f"cannot reach the Datadog intake at {self.logs_url}: {self._safe(exc)}")
        status = int(response.status)
        if 200 <= status < 300:
            return status, Answer.ok()
        text = self._safe(response.data.decode("utf-8", "replace").strip())
        reason = f"HTTP {status} from {self.logs_url}" + (f": {text}" if text else "")
        if status in _AUTH_STATUSES:
            return status, Answer.retry(reason)
        if status in _SPLIT_STATUSES:
            # The intake names no item: halve until the offending events stand alone.
            return status, Answer.refused(reason)
        if classify_http_status(status) is Outcome.PERMANENT:
            return status, Answer.permanent(reason)
        retry_after = parse_retry_after(response.headers.get("Retry-After")) or parse_retry_after(
            response.headers.get("X-Ratelimit-Reset")
        )
        return status, Answer.retry(reason, retry_after)

    def _validate_key(self) -> Health:
        api = AuthenticationApi(self._client)  # type: ignore[no-untyped-call]
        try:
            answer = api.validate()
        except ApiException as exc:
            if not exc.status:  # the client's wrapping of a TLS failure
                return Health(False, f"cannot reach Datadog at {self.validate_url}: {self._safe(exc.reason)}")
            if exc.status in _AUTH_STATUSES:
                return Health(
                    False,
                    f"Datadog refused the API key (HTTP {exc.status} from {self.validate_url}); check api_key and site",
                )
            return Health(False, f"Datadog key validation failed: HTTP {exc.status} from {self.validate_url}")
        except urllib3.exceptions.HTTPError as exc:
            if _tls_failure(exc):
                return Health(False, self._tls_reason(self.validate_url, exc))
            return Health(False, f"cannot reach Datadog at {self.validate_url}: {self._safe(exc)}")
        if not getattr(answer, "valid", False):
            return Health(False, f"Datadog did not confirm the API key at {self.validate_url}")
        return Health(True, f"API key valid for Datadog site {self.config.site}; logs go to {self.logs_url}")

    # --- helpers ---------------------------------------------------------------------------------

    def _request_headers(self) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": f"log-bridge {self._client.user_agent}",
        }
        # The client's own auth settings name the header (DD-API-KEY) and carry the key.
        auth = self._client.configuration.auth_settings()["apiKeyAuth"]  # type: ignore[no-untyped-call]
        headers[auth["key"]] = auth["value"]
        if self.config.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
        return headers

    def _tls_reason(self, url: str, exc: Exception) -> str:
        cause = getattr(exc, "reason", None) or exc  # urllib3 wraps the SSL error when it gives up
        return f"TLS verification of {url} failed ({self._safe(cause)}); {_TLS_HINT}"

    def _safe(self, value: object) -> str:
        """Text for a reason or message: shortened, and never holding the key."""
        text = str(value).replace(self._key, "***")
        return text if len(text) <= _REASON_LIMIT else text[:_REASON_LIMIT] + "…"

    async def _off_loop(self, function: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)


# --- module helpers ------------------------------------------------------------------------------


def _client_configuration(config: DatadogConfig) -> Configuration:
    """The client's configuration for this sink: the key, the site or endpoint, no retries of its own."""
    configuration = Configuration(  # type: ignore[no-untyped-call]
        api_key={"apiKeyAuth": config.api_key.get_secret_value()},
        server_variables={"site": config.site},
        request_timeout=config.timeout,
        enable_retry=False,
    )
    # Set after construction: the constructor reads DD_SITE from the environment over server_variables.
    configuration.server_variables["site"] = config.site
    configuration.retry_policy = _no_retries()
    if config.endpoint is not None:
        configuration.host = config.endpoint
    configuration.verify_ssl = config.tls.verify
    configuration.ssl_ca_cert = config.tls.ca_file
    return configuration


def _tls_failure(exc: urllib3.exceptions.HTTPError) -> bool:
    """Whether the request failed on the server's certificate (urllib3 wraps it when it gives up)."""
    return isinstance(exc, urllib3.exceptions.SSLError) or isinstance(
        getattr(exc, "reason", None), urllib3.exceptions.SSLError
    )


def _no_retries() -> urllib3.Retry:
    """One attempt per request: retrying belongs to the delivery engine."""
    return urllib3.Retry(total=0, redirect=0, raise_on_redirect=False, raise_on_status=False)


def _submit_log_host(client: ApiClient) -> str:
    """The base URL the client's `LogsApi.submit_log` would post to, resolved the way the client does."""
    configuration = client.configuration
    servers = LogsApi(client)._submit_log_endpoint.settings["servers"]  # type: ignore[no-untyped-call]
    index = configuration.server_operation_index.get(_SUBMIT_LOG, configuration.server_index)
    variables = configuration.server_operation_variables.get(_SUBMIT_LOG, configuration.server_variables)
    host: str = configuration.get_host_from_settings(index, variables=variables, servers=servers)  # type: ignore[no-untyped-call]
    return host


def _chunks(items: Sequence[Item]) -> list[Part]:
    """Requests within the intake limits: at most MAX_ITEMS items and MAX_PAYLOAD_BYTES per JSON array."""
    chunks: list[Part] = []
    current: Part = []
    size = 2  # the brackets
    for entry in items:
        extra = len(entry[1]) + (1 if current else 0)
        if current and (len(current) >= MAX_ITEMS or size + extra > MAX_PAYLOAD_BYTES):
            chunks.append(current)
            current, size, extra = [], 2, len(entry[1])
        current.append(entry)
        size += extra
    if current:
        chunks.append(current)
    return chunks

"""The Datadog sink (`type: datadog`): events go to the Datadog logs intake in WorkOS's native format.

Each event becomes one log item: `message` is the JSON text of the bare WorkOS event exactly as WorkOS sent
it (Datadog parses it into attributes; numbers of any size and every escape arrive unchanged), with
`ddsource`, `service`, and when configured `ddtags` and `hostname`, so facets and pipelines built on
WorkOS's own Datadog stream keep working.

datadog-api-client supplies the site handling (the `submit_log` operation's server list picks
`https://http-intake.logs.<site>`), the authentication header and the validate call of the health check (run on
a small executor: the client blocks). Log batches go through the HTTP helper the HTTP sinks share
(sinks.http_client: aiohttp, TLS options, compression, status classification). The request body is built here
with orjson rather than through `HTTPLog`/`HTTPLogItem` models: building and serialising 1000 models costs about
20 ms of pure Python, four times the sink's own encoding; through `LogsApi.submit_log` a send costs ~30 ms of
CPU per 1000 events against ~9 ms here, which keeps the model path around the 30 k events/s target on two
cores (bench/datadog.py, docs/sinks/datadog.md). The body holds the same JSON value the models serialise to
(written compactly, in UTF-8); whichever builds it, `message` is `event_raw.decode()`.

Large bodies are compressed in a worker thread; the key validation runs on the sink's executor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import orjson
import urllib3
from datadog_api_client import ApiClient, Configuration
from datadog_api_client.exceptions import ApiException
from datadog_api_client.v1.api.authentication_api import AuthenticationApi
from datadog_api_client.v2.api.logs_api import LogsApi
from pydantic import BeforeValidator, Field, field_validator

from sinks.base import Event, Health, SendResult, SinkConfig
from sinks.fields import HttpUrl, PositiveDuration, Secret, TlsOptions
from sinks.http_client import HttpClient, classify_status, parse_retry_after
from sinks.outcome import Verdict
from sinks.splitting import Item, Part, Verdicts, fail, send_in_parts

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
WORKERS = 2
"""Threads for the client's blocking key validation."""

_SUBMIT_LOG = "submit_log"
_AUTH_STATUSES = frozenset({401, 403})


def _tag_list(value: object) -> object:
    """Tags as YAML may give them: a list, or one comma-separated string."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class DatadogConfig(SinkConfig):
    """The Datadog sink's own keys."""

    api_key: Secret
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
    endpoint: HttpUrl | None = None
    """Base URL replacing `https://http-intake.logs.<site>` (and `https://api.<site>` for the health check)."""
    timeout: PositiveDuration = 30.0
    """Seconds one HTTP request may take."""
    tls: TlsOptions = TlsOptions()
    """How the intake's certificate is checked (a private CA for a proxy under `endpoint`)."""

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


_T = TypeVar("_T")


class DatadogSink:
    """Sends batches to the Datadog logs intake (`POST /api/v2/logs`)."""

    Config: ClassVar[type[DatadogConfig]] = DatadogConfig

    def __init__(self, name: str, config: DatadogConfig) -> None:
        self.name = name
        self.config = config
        self._client = ApiClient(_client_configuration(config))
        self.logs_url = _submit_log_host(self._client) + "/api/v2/logs"
        """Where log batches go (`https://http-intake.logs.<site>/api/v2/logs`, or under `endpoint`)."""
        self.validate_url = self._client.configuration.host + "/api/v1/validate"
        """Where the health check validates the key (`https://api.<site>/api/v1/validate`, or under `endpoint`)."""
        self._http = HttpClient(
            name,
            peer="the Datadog intake",
            timeout=config.timeout,
            tls=config.tls,  # a CA file that cannot be loaded fails here, naming its YAML path
            https=self.logs_url.startswith("https:"),
            secrets=[config.api_key.get_secret_value()],
        )
        self._headers = self._request_headers()
        self._item_head = self._fixed_fields()
        self._executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"datadog-{name}")
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
        verdicts: Verdicts = {}
        items = self._encode_all(batch, verdicts)
        await send_in_parts(_chunks(items), self._post, verdicts, peer="Datadog")
        return SendResult.collect(batch, verdicts)

    async def healthcheck(self) -> Health:
        """Validate the key against the site."""
        if self._closed:
            return Health(False, "the Datadog sink is closed")
        return await self._off_loop(self._validate_key)

    async def close(self) -> None:
        """Close the connections and stop the executor; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._http.close()
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

    def _encode_all(self, batch: Sequence[Event], verdicts: Verdicts) -> list[Item]:
        items: list[Item] = []
        for event in batch:
            try:
                item = self.encode(event)
            except (TypeError, ValueError) as exc:  # no event, raw not JSON or not UTF-8
                fail(verdicts, [event], Verdict.permanent(f"cannot encode the event for Datadog: {exc}"))
                continue
            if len(item) > MAX_ITEM_BYTES:
                reason = (
                    f"the event is {len(item)} bytes once encoded, over Datadog's 1 MB per-log limit "
                    f"({MAX_ITEM_BYTES} bytes); Datadog would truncate it"
                )
                fail(verdicts, [event], Verdict.permanent(reason))
                continue
            items.append((event, item))
        return items

    # --- delivery ------------------------------------------------------------------------------

    async def _post(self, chunk: Part) -> Verdict:
        """One POST of a JSON array of items, and what the answer means."""
        body = b"[" + b",".join(item for _, item in chunk) + b"]"
        reply = await self._http.post(
            self.logs_url, body, self._headers, compression=self.config.compression, level=GZIP_LEVEL
        )
        if isinstance(reply, Verdict):
            return reply
        what = f"HTTP {reply.status} from {self.logs_url}"
        text = self._http.peer_text(reply)
        what += f": {text}" if text else ""
        if reply.status in _AUTH_STATUSES:
            return Verdict.retry(f"Datadog refused the API key: {what}; check api_key and site", config_problem=True)
        if 200 <= reply.status < 300 and not _intake_answer(reply.body):
            # Not the intake's answer: a proxy, a sign-in page or another service answered; the events may be nowhere.
            reason = f"{what}: not the logs intake's answer (a JSON object); is the endpoint (or site) right?"
            return Verdict.retry(reason, config_problem=True)
        retry_after = reply.retry_after or parse_retry_after(reply.headers.get("X-Ratelimit-Reset"))
        return classify_status(reply.status, what, retry_after)

    def _validate_key(self) -> Health:
        api = AuthenticationApi(self._client)  # type: ignore[no-untyped-call]
        safe = self._http.scrub
        try:
            answer = api.validate()
        except ApiException as exc:
            if not exc.status:  # the client's wrapping of a TLS failure
                return Health(False, f"cannot reach Datadog at {self.validate_url}: {safe(exc.reason)}")
            if exc.status in _AUTH_STATUSES:
                return Health(
                    False,
                    f"Datadog refused the API key (HTTP {exc.status} from {self.validate_url}); check api_key and site",
                )
            return Health(False, f"Datadog key validation failed: HTTP {exc.status} from {self.validate_url}")
        except urllib3.exceptions.HTTPError as exc:
            if _tls_failure(exc):
                cause = getattr(exc, "reason", None) or exc  # urllib3 wraps the SSL error when it gives up
                reason = f"TLS verification of {self.validate_url} failed ({safe(cause)}); {self._http.tls_hint()}"
                return Health(False, reason)
            return Health(False, f"cannot reach Datadog at {self.validate_url}: {safe(exc)}")
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
        return headers

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
    configuration.cert_file = config.tls.cert_file
    configuration.key_file = config.tls.key_file
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


def _intake_answer(body: bytes) -> bool:
    """Whether a 2xx body is the logs intake's: empty, or a JSON object (Datadog answers 202 with `{}`)."""
    if not body.strip():
        return True
    try:
        return isinstance(orjson.loads(body), dict)
    except orjson.JSONDecodeError:
        return False

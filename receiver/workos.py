"""The WorkOS side, through the official `workos` SDK: the API client with one retry policy, the stream-state
watch, and the service part that runs the watch and the export archive (receiver.workos_export) beside the
intake. Nothing here can touch the intake or `/readyz`: every failure is counted, logged and retried.

The SDK's async client is used (no blocking call on the event loop); its own retries are off, so every failed
call is counted once in `log_bridge_workos_api_errors_total{operation, reason}` and retried here. Its HTTP
transport is ours (`BoundedBackend`): httpx's timeout applies to each read, not to the request, and the SDK holds
the whole answer in memory, so an answer that trickles or never ends would hold the call, and the memory, forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import httpx2
from prometheus_client import CollectorRegistry
from workos import (
    AsyncWorkOSClient,
    AuthenticationError,
    AuthorizationError,
    NotFoundError,
    RateLimitExceededError,
    ServerError,
    WorkOSError,
)
from workos._errors import APIError, WorkOSConnectionError, WorkOSTimeoutError  # not re-exported by the package
from workos._http import HTTPResponse, TransportConnectError, TransportError, TransportTimeout

from receiver.config import Config, WorkosConfig
from receiver.errors import LogBridgeError
from receiver.metrics import WorkosMetrics
from sinks.base import Sink

log = logging.getLogger(__name__)

# httpx2 (the SDK's HTTP client) logs every request at INFO; the URLs are ours, but the lines are noise.
logging.getLogger("httpx2").setLevel(logging.WARNING)

T = TypeVar("T")

STREAM_STATES = ("active", "inactive", "error", "invalid")
GENERIC_HTTPS = "GenericHttps"
API_ATTEMPTS = 4
"""Tries of one API call (the first and three retries) for transient failures: 429, 5xx, timeouts, connection."""
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 120.0
MAX_ANSWER_BYTES = 1 << 20
"""Cap on one API answer; the ones used here are a few hundred bytes of JSON."""

_SECRET_KEY = re.compile(r"sk_[A-Za-z0-9_\-]{4,}")


class WorkosApiError(LogBridgeError):
    """A WorkOS API call failed (after its retries); the message names no secret."""

    def __init__(self, operation: str, reason: str, message: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"WorkOS {operation}: {message}")


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    retry: bool
    message: str
    retry_after: float | None = None


class AnswerTooLarge(TransportError):
    """An API answer over MAX_ANSWER_BYTES (the SDK wraps it in a WorkOSError)."""


class BoundedBackend:
    """The SDK's HTTP transport (workos.AsyncHTTPBackend): httpx2, as the SDK's own, but the time limit is one
    for the whole request, and an answer over MAX_ANSWER_BYTES is refused while it arrives."""

    def __init__(self, timeout: float) -> None:
        self._client = httpx2.AsyncClient(timeout=timeout, follow_redirects=True)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        content: bytes | None,
        timeout: float,  # noqa: ASYNC109 - the SDK's AsyncHTTPBackend protocol passes it
    ) -> HTTPResponse:
        """One request; network failures raised as the SDK's Transport errors, so it classifies them."""
        try:
            async with (
                asyncio.timeout(timeout),
                self._client.stream(method, url, headers=headers, content=content, timeout=timeout) as response,
            ):
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_ANSWER_BYTES:
                        raise AnswerTooLarge(f"an answer over {MAX_ANSWER_BYTES} bytes")
                    chunks.append(chunk)
        except (TimeoutError, httpx2.TimeoutException):
            raise TransportTimeout(f"no complete answer within {timeout:g}s") from None
        except httpx2.ConnectError as exc:
            raise TransportConnectError(str(exc)) from None
        except httpx2.HTTPError as exc:
            raise TransportError(str(exc)) from None
        return HTTPResponse(
            status_code=response.status_code,
            headers=response.headers,
            content=b"".join(chunks),
            request_method=method,
            request_url=str(response.request.url),
        )

    async def close(self) -> None:
        """Close the connections."""
        await self._client.aclose()


def _classify(exc: Exception) -> _Failure:
    """(reason label, worth retrying, message, Retry-After) of an exception the SDK raised."""
    if isinstance(exc.__cause__, AnswerTooLarge):
        return _Failure("bad_response", False, str(exc.__cause__))
    if isinstance(exc, AuthenticationError):
        return _Failure("unauthorized", False, "WorkOS refused the API key (401): check workos.api_key")
    if isinstance(exc, AuthorizationError):
        return _Failure("forbidden", False, f"the API key may not do this (403): {exc}")
    if isinstance(exc, NotFoundError):
        return _Failure("not_found", False, f"not found (404): {exc}")
    if isinstance(exc, RateLimitExceededError):
        return _Failure("rate_limited", True, f"rate limited (429): {exc}", exc.retry_after)
    if isinstance(exc, ServerError):
        return _Failure("server_error", True, str(exc))
    if isinstance(exc, APIError):
        status = exc.status_code or 0
        return _Failure("server_error" if status >= 500 else "client_error", status >= 500, str(exc))
    if isinstance(exc, WorkOSTimeoutError):
        return _Failure("timeout", True, "no answer in time")
    if isinstance(exc, WorkOSConnectionError):
        return _Failure("connection", True, f"cannot connect: {exc}")
    if isinstance(exc, WorkOSError):
        bad = str(exc).startswith("Unexpected API response")
        return _Failure("bad_response" if bad else "network", not bad, str(exc))
    return _Failure("error", False, f"{type(exc).__name__}: {exc}")


class WorkosApi:
    """The SDK's async client pointed at `workos.base_url`, with the retry policy and the error counting."""

    def __init__(self, config: WorkosConfig, metrics: WorkosMetrics | None = None, *, backoff: float = 1.0) -> None:
        self._key = config.api_key.get_secret_value()
        self.base_url = config.base_url
        self.metrics = metrics
        self.backoff = backoff
        self._backend = BoundedBackend(config.timeout)
        self.client = AsyncWorkOSClient(
            api_key=self._key,
            base_url=config.base_url,
            request_timeout=max(1, round(config.timeout)),
            max_retries=0,  # one retry policy: ours, which counts every failure
            http_client=self._backend,
        )

    def scrub(self, text: str) -> str:
        """`text` without the API key (or anything shaped like a WorkOS secret key), at most 500 characters."""
        return _SECRET_KEY.sub("sk_***", text.replace(self._key, "sk_***"))[:500]

    async def call(self, operation: str, request: Callable[[], Awaitable[T]], *, attempts: int = API_ATTEMPTS) -> T:
        """Run one SDK call; transient failures are retried with backoff (Retry-After honoured), every failure
        is counted, and the last one raises WorkosApiError."""
        for attempt in range(attempts):
            try:
                result = await request()
                if result is None:  # what the SDK makes of a 2xx answer that is empty or not JSON
                    raise WorkOSError("Unexpected API response: no JSON body")
                return result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = _classify(exc)
                if self.metrics is not None:
                    self.metrics.api_errors.labels(operation, failure.reason).inc()
                if not failure.retry or attempt == attempts - 1:
                    raise WorkosApiError(operation, failure.reason, self.scrub(failure.message)) from None
                delay = min(self.backoff * 2**attempt, MAX_BACKOFF) * (0.5 + random.random() / 2)  # noqa: S311
                if failure.retry_after is not None:
                    delay = max(delay, min(failure.retry_after, MAX_RETRY_AFTER))
                log.info(
                    "WorkOS API call failed; retrying",
                    extra={"operation": operation, "reason": failure.reason, "retry_in": round(delay, 2)},
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """Close the SDK's HTTP connections (the SDK does not close a transport it was given)."""
        await self.client.close()
        await self._backend.close()


# --- stream state ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamStatus:
    """One organization's audit-log configuration, as the watch and `workos status` report it."""

    organization: str
    audit_logs: str
    """The organization's audit-log state: active, inactive or disabled."""
    stream_type: str | None
    """None when the organization has no log stream."""
    state: str | None
    last_synced_at: str | None

    @property
    def broken(self) -> bool:
        """Whether WorkOS has stopped delivering (error or invalid)."""
        return self.state in ("error", "invalid")

    def advice(self) -> str:
        """What the state means and what to check, in one line."""
        if self.stream_type is None:
            return "no log stream: WorkOS sends nothing (set one up with `log-bridge workos portal-link`)"
        if self.stream_type != GENERIC_HTTPS:
            return f"streams to {self.stream_type}, not to an HTTPS endpoint such as this receiver"
        return {
            "active": "delivering",
            "inactive": "not set up completely, or paused",
            "error": "WorkOS gets errors delivering and retries: check that this receiver is reachable from "
            "WorkOS's egress addresses and answers 2xx (log_bridge_requests_total by code)",
            "invalid": "WorkOS stopped sending (authentication failed): the stream's auth header must equal one of "
            "the stream's auth.values here (a rotated secret?); WorkOS sets it active again once that is fixed",
        }.get(self.state or "", f"state {self.state!r}")


async def stream_status(api: WorkosApi, organization: str) -> StreamStatus:
    """Read one organization's audit-log configuration."""
    found = await api.call(
        "get_audit_log_configuration", lambda: api.client.organizations.get_audit_log_configuration(organization)
    )
    stream = found.log_stream
    return StreamStatus(
        organization=organization,
        audit_logs=str(found.state.value),
        stream_type=str(stream.type.value) if stream is not None else None,
        state=str(stream.state.value) if stream is not None else None,
        last_synced_at=stream.last_synced_at if stream is not None else None,
    )


def parse_time(text: str) -> float | None:
    """Epoch seconds of an ISO-8601 time, or None."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class StreamWatch:
    """Reads each organization's stream state every `watch.every`, into metrics; a change is logged once."""

    def __init__(self, config: WorkosConfig, api: WorkosApi, metrics: WorkosMetrics) -> None:
        self.config = config
        self.api = api
        self.metrics = metrics
        self.last: dict[str, StreamStatus] = {}
        self._failing: dict[str, str] = {}
        self._types: dict[str, str] = {}
        self._unlisted: dict[str, tuple[str, str]] = {}
        """Organization -> (type, state) of the series a state not in STREAM_STATES got (the SDK passes unknown
        states through): removed once the stream is in another state, or it would still read 1."""

    async def run(self) -> None:
        """Watch until cancelled."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.config.watch.every)

    async def check_all(self) -> None:
        """One round over every organization; failures are counted and logged, never raised."""
        for organization in self.config.organizations:
            try:
                status = await stream_status(self.api, organization)
            except WorkosApiError as exc:
                if self._failing.get(organization) != exc.reason:
                    log.warning(
                        "cannot read the organization's log stream state",
                        extra={"organization": organization, "reason": exc.reason, "error": str(exc)},
                    )
                self._failing[organization] = exc.reason
                continue
            except Exception as exc:  # a bug here must not stop the watch
                log.error("stream watch failed", extra={"organization": organization, "error": repr(exc)[:300]})
                continue
            if self._failing.pop(organization, None) is not None:
                log.info("log stream state readable again", extra={"organization": organization})
            self.record(status)

    def record(self, status: StreamStatus) -> None:
        """Update the metrics and log a change of state."""
        organization = status.organization
        self.metrics.stream_checked.labels(organization).set(time.time())
        previous_type = self._types.pop(organization, None)
        if previous_type is not None and previous_type != status.stream_type:
            for state in STREAM_STATES:
                with contextlib.suppress(KeyError):
                    self.metrics.stream_state.remove(organization, previous_type, state)
        unlisted = None if status.stream_type is None or status.state in STREAM_STATES else status.state or ""
        previous_unlisted = self._unlisted.pop(organization, None)
        if previous_unlisted is not None and previous_unlisted != (status.stream_type, unlisted):
            with contextlib.suppress(KeyError):
                self.metrics.stream_state.remove(organization, *previous_unlisted)
        if status.stream_type is not None:
            self._types[organization] = status.stream_type
            states: tuple[str, ...] = STREAM_STATES
            if unlisted is not None:
                self._unlisted[organization] = (status.stream_type, unlisted)
                states = (*STREAM_STATES, unlisted)
            for state in states:
                value = 1.0 if state == status.state else 0.0
                self.metrics.stream_state.labels(organization, status.stream_type, state).set(value)
        synced = parse_time(status.last_synced_at) if status.last_synced_at else None
        if synced is not None:
            self.metrics.last_synced.labels(organization).set(synced)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.last_synced.remove(organization)
        before = self.last.get(organization)
        self.last[organization] = status
        if before is not None and (before.stream_type, before.state) == (status.stream_type, status.state):
            return
        level = logging.WARNING if status.broken and status.stream_type == GENERIC_HTTPS else logging.INFO
        log.log(
            level,
            f"WorkOS log stream: {status.advice()}",
            extra={
                "organization": organization,
                "stream_type": status.stream_type,
                "state": status.state,
                "previous_state": before.state if before is not None else None,
                "last_synced_at": status.last_synced_at,
            },
        )


# --- running beside the intake ---------------------------------------------------------------------


class WorkosService:
    """The watch and the export schedule of a running service, as background tasks."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry,
        sinks: Mapping[str, Sink],
        metrics: WorkosMetrics | None = None,
    ) -> None:
        from receiver.workos_export import ExportSchedule, ExportState

        if config.workos is None:
            raise ValueError("no workos section")
        self.config = config.workos
        self.metrics = metrics or WorkosMetrics(registry)  # a restarted service (reload) keeps its series
        self.metrics.watching(self.config.organizations)
        self.api = WorkosApi(self.config, self.metrics)
        self.watch = StreamWatch(self.config, self.api, self.metrics)
        self.schedule: ExportSchedule | None = None
        if self.config.export is not None:
            stores = {name: sinks[name] for name in self.config.export.sinks}
            state = ExportState(config.journal.path)
            self.schedule = ExportSchedule(self.config, self.api, state, stores, self.metrics)  # type: ignore[arg-type]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the watch and the schedule."""
        self._tasks.append(asyncio.create_task(_guarded("workos-watch", self.watch.run), name="workos-watch"))
        if self.schedule is not None:
            run = self.schedule.run
            self._tasks.append(asyncio.create_task(_guarded("workos-export", run), name="workos-export"))

    async def stop(self) -> None:
        """Cancel the tasks (an export in progress resumes at the next start), close the clients."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.schedule is not None:
            await self.schedule.close()
        await self.api.close()


async def _guarded(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run a background loop; should it ever fail, log it and start it again a minute later."""
    while True:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "WorkOS background task failed; restarting it in 60s", extra={"task": name, "error": repr(exc)[:300]}
            )
        await asyncio.sleep(60.0)

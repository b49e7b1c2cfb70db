"""The S3 sink: writes events to any S3-compatible object store (AWS S3, Ceph RGW, MinIO, GCS interop).

Two layouts:

- `workos` writes exactly what WorkOS's own S3 destination writes: one pretty-printed JSON file per event
  holding the bare event (its bytes as received, re-indented: no value is parsed or converted), key
  `{prefix}YYYY-MM-DD/{timestamp}_{keySuffix}.json`. The key is a function of the event alone, so a retried
  event overwrites (or, in a versioned bucket, re-versions) the same key.
- `batch` writes one object per delivery batch: NDJSON of the WorkOS wrappers as received, optionally gzip
  or zstd compressed, key `{prefix}{unix_ts}-{uuid}.ndjson[.gz|.zst]`.

Every PutObject carries `Content-MD5`, so Object Lock buckets accept it whatever botocore's checksum defaults
are. boto3 calls run on an executor owned by the sink, `concurrency` threads wide; botocore's own retries are
off because the delivery engine owns retries.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import queue
import re
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import boto3
import botocore.session
import msgspec
import orjson
from botocore.config import Config as BotoConfig
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    CredentialResolver,
    Credentials,
    DeferredRefreshableCredentials,
)
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from pydantic import Field, SecretStr, field_validator, model_validator

from sinks.base import Event, Health, SendResult, SinkConfig
from sinks.errors import SinkError
from sinks.fields import Compression, HttpUrl, PositiveDuration, Secret
from sinks.http_client import compress, parse_retry_after, scrub
from sinks.outcome import Outcome, Verdict

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["MAX_KEY_BYTES", "ObjectLock", "S3Config", "S3Sink", "classify_error"]

MAX_KEY_BYTES = 1024
"""The longest object key S3 (and GCS, MinIO, Ceph RGW) stores, in UTF-8 bytes."""

_T = TypeVar("_T")

# S3 error codes that concern one object only: retrying the same object can never succeed, and no
# configuration change would make it succeed either. Everything else is RETRY (see classify_error).
_OBJECT_ERRORS = frozenset(
    {
        "KeyTooLongError",
        "InvalidObjectName",  # Ceph RGW: key too long or not UTF-8
        "XMinioInvalidObjectName",
        "EntityTooLarge",
        "MetadataTooLarge",
    }
)

# Errors that say nothing about the rest of a batch: after one of these the other objects are still sent.
# After any other failure the remaining puts of the batch are not attempted (the bucket, credentials or
# service are the problem and every put would fail the same way).
_LOCAL_ERRORS = _OBJECT_ERRORS | {"BadDigest", "InvalidDigest", "RequestTimeout"}

# Errors a configuration fix cures: retried, and the sink is unhealthy until a send succeeds.
_CONFIG_ERRORS = frozenset(
    {
        "AccessDenied",
        "NoSuchBucket",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
    }
)

_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})")

_STORAGE_CLASS = re.compile(r"^[A-Z][A-Z0-9_]*$")


# --- configuration -------------------------------------------------------------------------------


class ObjectLock(SinkConfig):
    """Per-object Object Lock retention: each object is locked until `retain_days` after it is written."""

    mode: Literal["GOVERNANCE", "COMPLIANCE"]
    retain_days: int = Field(ge=1, le=36500)


class S3Config(SinkConfig):
    """The `s3` sink's own keys."""

    bucket: str = Field(min_length=1, max_length=255)
    prefix: str = ""
    """Key prefix; strftime fields (`%Y/%m/%d/`) are filled from the event time (workos) or write time (batch)."""
    layout: Literal["workos", "batch"] = "workos"
    compression: Compression = "gzip"
    """Batch layout only."""
    region: str | None = None
    endpoint_url: HttpUrl | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    role_arn: str | None = None
    external_id: str | None = None
    role_session_name: str = Field(default="log-bridge", min_length=2, max_length=64)
    role_duration: PositiveDuration = 3600.0
    sts_endpoint_url: HttpUrl | None = None
    server_side_encryption: Literal["AES256", "aws:kms", "aws:kms:dsse"] | None = None
    kms_key_id: str | None = None
    storage_class: str | None = None
    object_lock: ObjectLock | None = None
    concurrency: int = Field(default=16, ge=1, le=256)
    timeout: PositiveDuration = 30.0
    """Connect timeout, and the longest wait for each read of an answer (not a limit on a whole request)."""

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if "/" in value or any(ch.isspace() for ch in value):
            raise ValueError("a bucket name has no '/' or whitespace (put key paths in `prefix`)")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value.startswith("/"):
            raise ValueError("prefix must not start with '/' (S3 keys have no leading slash)")
        sample = render_prefix(value, datetime(2000, 12, 31, 23, 59, 59, tzinfo=UTC))
        if len(sample.encode()) > MAX_KEY_BYTES - 200:
            raise ValueError(f"prefix is too long: keys are limited to {MAX_KEY_BYTES} bytes")
        return value

    @field_validator("storage_class")
    @classmethod
    def _storage_class(cls, value: str | None) -> str | None:
        if value is not None and not _STORAGE_CLASS.match(value):
            raise ValueError("expected a storage class name such as STANDARD or STANDARD_IA")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> S3Config:
        problems: list[str] = []  # every inconsistency at once, not one a run
        if (self.access_key_id is None) != (self.secret_access_key is None):
            problems.append("access_key_id and secret_access_key go together")
        if self.session_token is not None and self.access_key_id is None:
            problems.append("session_token needs access_key_id and secret_access_key")
        if self.kms_key_id is not None and self.server_side_encryption not in ("aws:kms", "aws:kms:dsse"):
            problems.append("kms_key_id needs server_side_encryption: aws:kms")
        if self.layout == "workos" and self.prefix and not self.prefix.endswith("/"):
            # WorkOS's bucket path is a folder: `{bucketPath}/YYYY-MM-DD/...`; say so rather than guess.
            problems.append(f"in the workos layout the prefix is a folder: end it with '/' ({self.prefix}/)")
        if self.layout == "workos" and "compression" in self.model_fields_set and self.compression != "none":
            problems.append("compression applies to layout: batch only (the workos layout writes plain JSON)")
        if self.role_arn is None and (self.external_id is not None or self.sts_endpoint_url is not None):
            problems.append("external_id and sts_endpoint_url need role_arn")
        # botocore refreshes assumed-role credentials 15 minutes before they expire: shorter sessions would be
        # renewed on every request.
        if not 1800 <= self.role_duration <= 43200:
            problems.append("role_duration must be between 30m and 12h")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def render_prefix(prefix: str, moment: datetime) -> str:
    """The prefix with its strftime fields filled in for `moment`."""
    return moment.strftime(prefix) if "%" in prefix else prefix


# --- classification ------------------------------------------------------------------------------


def classify_error(exc: BaseException) -> Verdict:
    """The verdict on an exception raised by a boto3 call.

    Only errors specific to one object are PERMANENT. Throttling, 5xx, timeouts, connection problems and the
    errors a configuration fix cures (AccessDenied, NoSuchBucket, bad or expired credentials, wrong region)
    are RETRY: the data stays in the journal while someone fixes the cause, and the health check shows it.
    Unknown error codes are RETRY too; the engine's attempt limit dead-letters what never succeeds.
    """
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(error.get("Code") or "")
        status = int(meta.get("HTTPStatusCode") or 0)
        message = str(error.get("Message") or "").strip()
        operation = exc.operation_name
        retry_after = parse_retry_after(meta.get("HTTPHeaders", {}).get("retry-after"))
        label = code or f"HTTP {status}"
        reason = f"{operation}: {label} ({status})" + (f": {message}" if message else "")
        if code in _OBJECT_ERRORS:
            return Verdict.permanent(reason)
        fixable = code in _CONFIG_ERRORS or status in (301, 401, 403)
        return Verdict.retry(reason, retry_after, config_problem=fixable)
    if isinstance(exc, NoCredentialsError):
        reason = "no AWS credentials found (set access_key_id/secret_access_key or the AWS chain)"
        return Verdict.retry(reason, config_problem=True)
    if isinstance(exc, BotoCoreError):
        return Verdict.retry(f"{type(exc).__name__}: {exc}")
    return Verdict.retry(f"unexpected {type(exc).__name__}: {exc}")


def _error_code(exc: BaseException) -> str | None:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "") or None
    return None


# --- the sink ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Put:
    """One object to write."""

    key: str
    body: bytes
    content_type: str
    content_encoding: str | None = None


class _StaticProvider(CredentialProvider):
    """Hands botocore a fixed (refreshable) credentials object."""

    METHOD = "log-bridge"
    CANONICAL_NAME = "custom-log-bridge"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


class S3Sink:
    """Delivers events to an S3 bucket in the WorkOS layout (one object per event) or as NDJSON batches."""

    Config = S3Config
    max_key_bytes: int | None = MAX_KEY_BYTES
    """Keys longer than this fail PERMANENT before any request; None leaves the check to the store."""

    def __init__(self, name: str, config: S3Config) -> None:
        self.name = name
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix=f"s3-{name}")
        self._client: S3Client | None = None
        self._client_lock = asyncio.Lock()
        self._closed = False
        self._secrets = [
            secret.get_secret_value()
            for secret in (config.access_key_id, config.secret_access_key, config.session_token)
            if secret is not None
        ]
        where = config.endpoint_url or (f"AWS S3 ({config.region})" if config.region else "AWS S3")
        self._where = f"bucket {config.bucket!r} at {where}"
        self._suffix = {"none": ".ndjson", "gzip": ".ndjson.gz", "zstd": ".ndjson.zst"}[config.compression]

    def __repr__(self) -> str:
        return f"S3Sink(name={self.name!r}, {self._where}, layout={self.config.layout!r})"

    # --- the boto3 client ---

    def _make_client(self) -> S3Client:
        cfg = self.config
        core = botocore.session.Session()
        if cfg.role_arn is not None:
            core.register_component(
                "credential_provider", CredentialResolver([_StaticProvider(self._role_credentials(cfg.role_arn))])
            )
        session = boto3.session.Session(
            aws_access_key_id=_reveal(cfg.access_key_id) if cfg.role_arn is None else None,
            aws_secret_access_key=_reveal(cfg.secret_access_key) if cfg.role_arn is None else None,
            aws_session_token=_reveal(cfg.session_token) if cfg.role_arn is None else None,
            region_name=cfg.region,
            botocore_session=core,
        )
        client: S3Client = session.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            config=self._boto_config(),
        )
        return client

    def _boto_config(self) -> BotoConfig:
        cfg = self.config
        return BotoConfig(
            region_name=cfg.region,
            s3={"addressing_style": cfg.addressing_style},
            connect_timeout=cfg.timeout,
            read_timeout=cfg.timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},  # the delivery engine owns retries
            max_pool_connections=cfg.concurrency,
            # We send Content-MD5 on every put; extra CRC checksums would only cost CPU, and the aws-chunked
            # encoding they bring over HTTPS is refused by some S3-compatible stores (Ceph RGW 16: 411).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="log-bridge",
        )

    def _role_credentials(self, role_arn: str) -> Credentials:
        """Assume-role credentials that botocore refreshes before they expire."""
        cfg = self.config
        source = boto3.session.Session(
            aws_access_key_id=_reveal(cfg.access_key_id),
            aws_secret_access_key=_reveal(cfg.secret_access_key),
            aws_session_token=_reveal(cfg.session_token),
            region_name=cfg.region,
        )
        source_credentials = source.get_credentials()
        if source_credentials is None:
            raise NoCredentialsError()

        def sts_client(service_name: str, **kwargs: Any) -> Any:
            kwargs.setdefault("region_name", cfg.region or "us-east-1")
            return source.client(  # type: ignore[call-overload]
                service_name,
                endpoint_url=cfg.sts_endpoint_url,
                config=BotoConfig(connect_timeout=cfg.timeout, read_timeout=cfg.timeout),
                **kwargs,
            )

        extra: dict[str, Any] = {"RoleSessionName": cfg.role_session_name, "DurationSeconds": int(cfg.role_duration)}
        if cfg.external_id is not None:
            extra["ExternalId"] = cfg.external_id
        fetcher = AssumeRoleCredentialFetcher(sts_client, source_credentials, role_arn, extra_args=extra)
        credentials: Credentials = DeferredRefreshableCredentials(
            refresh_using=fetcher.fetch_credentials, method="assume-role"
        )
        return credentials

    async def _get_client(self) -> S3Client:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await self._run(self._make_client)
        return self._client

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # --- encoding ---

    def _event_put(self, event: Event) -> _Put:
        """The WorkOS-layout object of one event."""
        stamp = event.timestamp
        match = _DATE.match(stamp)
        moment = _parse_time(stamp, event.time)
        date = match.group(1) if match else moment.strftime("%Y-%m-%d")
        bare = event.event_raw
        if not bare.startswith(b"{"):
            raise ValueError("the wrapper's `event` is not a JSON object")
        # Without a keySuffix or an id, the digest of the event's bytes: a function of the event alone, as the rest
        # of the key is (a journal's seq is not: every replica numbers from 1, and two events would share a key).
        suffix = event.key_suffix or event.event_id or f"sha256-{hashlib.sha256(bare).hexdigest()}"
        key = f"{render_prefix(self.config.prefix, moment)}{date}/{stamp}_{suffix}.json"
        # Re-indents the bytes as received without converting a value: numbers and escapes keep their text.
        body = msgspec.json.format(bare, indent=2)
        return _Put(key, body, "application/json")

    def _batch_put(self, batch: Sequence[Event]) -> _Put:
        """The batch-layout object of a whole batch."""
        now = time.time()
        prefix = render_prefix(self.config.prefix, datetime.fromtimestamp(now, UTC))
        key = f"{prefix}{int(now)}-{uuid.uuid4()}{self._suffix}"
        body = b"\n".join(event.raw for event in batch) + b"\n"
        encoding = self.config.compression
        body = compress(body, encoding, 6 if encoding == "gzip" else None)
        return _Put(key, body, "application/x-ndjson", None if encoding == "none" else encoding)

    def content_md5(self, body: bytes) -> str:
        """The Content-MD5 header value for `body` (tests override this to prove the store checks it)."""
        return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()

    def _put(self, client: S3Client, put: _Put) -> None:
        """One blocking PutObject with Content-MD5 and the configured options."""
        cfg = self.config
        if self.max_key_bytes is not None and len(put.key.encode()) > self.max_key_bytes:
            raise _KeyTooLong(put.key, self.max_key_bytes)
        args: dict[str, Any] = {
            "Bucket": cfg.bucket,
            "Key": put.key,
            "Body": put.body,
            "ContentMD5": self.content_md5(put.body),
            "ContentType": put.content_type,
        }
        if put.content_encoding:
            args["ContentEncoding"] = put.content_encoding
        if cfg.storage_class:
            args["StorageClass"] = cfg.storage_class
        if cfg.server_side_encryption:
            args["ServerSideEncryption"] = cfg.server_side_encryption
            if cfg.kms_key_id:
                args["SSEKMSKeyId"] = cfg.kms_key_id
        if cfg.object_lock is not None:
            args["ObjectLockMode"] = cfg.object_lock.mode
            args["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(days=cfg.object_lock.retain_days)
        client.put_object(**args)

    # --- sending ---

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Write the batch: one object per event (workos) or one object for the batch (batch)."""
        if not batch:
            return SendResult.success()
        if self._closed:
            return SendResult.retry(f"sink {self.name!r} is closed")
        try:
            client = await self._get_client()
        except Exception as exc:  # credentials or session setup: fixable, so RETRY
            verdict = classify_error(exc)
            reason = self._scrub(f"{self._where}: {verdict.reason}")
            return SendResult.retry(reason, verdict.retry_after, config_problem=verdict.config_problem)
        if self.config.layout == "batch":
            return await self._run(self._send_batch, client, batch)
        return await self._send_events(client, batch)

    def _send_batch(self, client: S3Client, batch: Sequence[Event]) -> SendResult:
        put = self._batch_put(batch)
        try:
            self._put(client, put)
        except Exception as exc:
            return SendResult.of(self._classify(exc, put.key))
        return SendResult.success()

    async def _send_events(self, client: S3Client, batch: Sequence[Event]) -> SendResult:
        # Each event keeps its own verdict: a reason names only that event's key, never another's.
        todo: queue.SimpleQueue[Event] = queue.SimpleQueue()
        for event in batch:
            todo.put(event)
        failures: dict[int, Verdict] = {}
        stop: list[Verdict] = []
        workers = min(self.config.concurrency, len(batch))
        await asyncio.gather(*(self._run(self._events_worker, client, todo, stop, failures) for _ in range(workers)))
        return SendResult.collect(batch, failures)

    def _events_worker(
        self, client: S3Client, todo: queue.SimpleQueue[Event], stop: list[Verdict], failures: dict[int, Verdict]
    ) -> None:
        """Put events until none are left; after a failure that is not about one object, stop putting: the
        events left are RETRY `not attempted: <why>` (a reason that names no other event's key)."""
        while True:
            try:
                event = todo.get_nowait()
            except queue.Empty:
                return
            if stop:
                failures[event.seq] = stop[0]
                continue
            try:
                put = self._event_put(event)
            except (TypeError, ValueError) as exc:  # no event object, or raw that is not JSON
                failures[event.seq] = Verdict.permanent(f"cannot encode event: {type(exc).__name__}: {exc}")
                continue
            try:
                self._put(client, put)
            except Exception as exc:
                failures[event.seq] = self._classify(exc, put.key)
                if failures[event.seq].outcome is Outcome.RETRY and _error_code(exc) not in _LOCAL_ERRORS:
                    why = self._classify(exc, "")
                    stop.append(
                        Verdict.retry(
                            f"not attempted: {why.reason}", why.retry_after, config_problem=why.config_problem
                        )
                    )

    def _classify(self, exc: BaseException, key: str) -> Verdict:
        if isinstance(exc, _KeyTooLong):
            return Verdict.permanent(str(exc))
        verdict = classify_error(exc)
        where = f"{self._where}, key {key!r}" if key else self._where
        return Verdict(
            verdict.outcome,
            self._scrub(f"{where}: {verdict.reason}"),
            verdict.retry_after,
            config_problem=verdict.config_problem,
        )

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets, limit=None)  # a reason names a whole key (up to 1024 bytes)

    async def store_object(self, name: str, data: bytes, *, moment: datetime) -> None:
        """Put one file (sinks.objects.ObjectStore) at `{prefix}{name}`, with Content-MD5 and the configured
        encryption, storage class and Object Lock; the prefix's strftime fields are filled from `moment`."""
        if self._closed:
            raise SinkError(f"sink {self.name!r} is closed")
        put = _Put(f"{render_prefix(self.config.prefix, moment)}{name}", data, "text/csv")
        try:
            client = await self._get_client()
            await self._run(self._put, client, put)
        except Exception as exc:
            raise SinkError(self._classify(exc, put.key).reason or "the put failed") from None

    # --- health and shutdown ---

    async def healthcheck(self) -> Health:
        """Put (with Content-MD5) and then delete a small probe object: proves the bucket is reachable and
        writable with these credentials. The delete is best effort (a writer may lack DeleteObject)."""
        if self._closed:
            return Health(False, f"sink {self.name!r} is closed")
        started = time.monotonic()
        key = f"{render_prefix(self.config.prefix, datetime.now(UTC))}.log-bridge-healthcheck"
        probe = _Put(key, orjson.dumps({"sink": self.name, "at": time.time()}), "application/json")
        try:
            client = await self._get_client()
            await self._run(self._put, client, probe)
        except Exception as exc:
            return Health(False, f"cannot write to {self._classify(exc, key).reason}")
        elapsed = time.monotonic() - started
        try:
            await self._run(lambda: client.delete_object(Bucket=self.config.bucket, Key=key))
        except Exception:  # noqa: S110 - the writer may lawfully lack DeleteObject; the put proved what matters
            pass
        return Health(True, f"{self._where} is writable (probe put took {elapsed * 1000:.0f} ms)")

    async def close(self) -> None:
        """Close the HTTP connections and stop the executor, without waiting for the requests in progress: one
        an endpoint does not answer ends by its own `timeout`, and what it was sending stays at the sink's
        cursor (a stop or a reload is not held up by it). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        client, self._client = self._client, None
        if client is not None:  # not on the executor, whose threads may all be waiting on the endpoint
            await asyncio.to_thread(client.close)


class _KeyTooLong(Exception):
    def __init__(self, key: str, limit: int) -> None:
        size = len(key.encode())
        super().__init__(f"object key is {size} bytes, over the {limit}-byte limit of S3: {key[:120]!r}...")


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


def _parse_time(stamp: str, fallback: float) -> datetime:
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return datetime.fromtimestamp(fallback, UTC)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

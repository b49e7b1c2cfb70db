"""The `s3` sink against real S3 servers on loopback: moto's server (fast cases, compliance) and Ceph RGW
(Object Lock, end-to-end Content-MD5 checking; marked `rgw`)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.credentials
import orjson
import pydantic
import pytest
import yaml
import zstandard
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from sinks import registry
from sinks.base import Event, Outcome
from sinks.s3 import MAX_KEY_BYTES, S3Config, S3Sink, classify_error
from sinks.testing.compliance import CHECKS, make_events, run_with_peer, unsupported
from sinks.testing.exact import EXACT_LITERALS, exact_event, same_json
from tests.peers.s3 import Harness, MotoS3, decode_batch_object, delete_bucket, read_objects, s3_client
from tests.peers.s3 import sink_for as make_s3_sink

SECRET = "s3cr3t-value-never-logged"

EXAMPLE = """
sinks:
  archive-s3:
    type: s3
    bucket: audit-archive
    prefix: workos/
    layout: workos
    region: us-east-1
    endpoint_url: http://127.0.0.1:7480
"""


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    """moto's S3 server on a free loopback port."""
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def moto_client(moto: MotoS3) -> Iterator[Any]:
    """A plain boto3 client to moto (no checksums of its own)."""
    client = s3_client(moto)
    yield client
    client.close()


@pytest.fixture
def bucket(moto_client: Any) -> Iterator[str]:
    """A fresh empty bucket on moto."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    moto_client.create_bucket(Bucket=name)
    yield name
    delete_bucket(moto_client, name)


@pytest.fixture
def lock_bucket(moto_client: Any) -> Iterator[str]:
    """An Object Lock bucket with default retention (GOVERNANCE, 1 day) on moto."""
    name = f"lock-{uuid.uuid4().hex[:12]}"
    create_lock_bucket(moto_client, name)
    yield name
    delete_bucket(moto_client, name)


def create_lock_bucket(client: Any, name: str) -> None:
    client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    client.put_object_lock_configuration(
        Bucket=name,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
        },
    )


def sink_for(server: Any, bucket: str, cls: type[S3Sink] = S3Sink, **options: Any) -> S3Sink:
    return make_s3_sink(server, bucket, cls, **{"timeout": 10, **options})


@pytest.fixture
async def make_sink(moto: MotoS3) -> AsyncIterator[Any]:
    """Builds sinks pointed at moto and closes them afterwards."""
    sinks: list[S3Sink] = []

    def make(bucket: str, cls: type[S3Sink] = S3Sink, **options: Any) -> S3Sink:
        sink = sink_for(moto, bucket, cls, **options)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.close()


def wrapper_event(**wrapper: Any) -> Event:
    """One event from a hand-written wrapper."""
    raw = orjson.dumps(wrapper)
    return Event(7, "workos", raw, action="user.signed_in", time=1705314600.0, received_at=time.time())


def md5_b64(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


async def capture_puts(sink: S3Sink) -> list[Any]:
    """Records every PutObject request the sink's client sends (headers and body as sent)."""
    requests: list[Any] = []
    client = await sink._get_client()
    client.meta.events.register("before-send.s3.PutObject", lambda request, **_: requests.append(request))
    return requests


# --- configuration -------------------------------------------------------------------------------


class TestConfig:
    def test_issue_example_validates(self) -> None:
        options = dict(yaml.safe_load(EXAMPLE)["sinks"]["archive-s3"])
        assert options.pop("type") == "s3"
        config = S3Config.model_validate(options)
        assert (config.layout, config.prefix, config.concurrency, config.compression) == (
            "workos",
            "workos/",
            16,
            "gzip",
        )

    def test_registry_finds_the_sink(self) -> None:
        assert registry.load("s3") is S3Sink

    def test_every_documented_key(self) -> None:
        config = S3Config.model_validate(
            {
                "bucket": "b",
                "prefix": "logs/%Y/%m/%d/",
                "layout": "batch",
                "compression": "zstd",
                "region": "eu-west-1",
                "endpoint_url": "https://storage.googleapis.com",
                "addressing_style": "virtual",
                "access_key_id": "AKIA",
                "secret_access_key": SECRET,
                "role_arn": "arn:aws:iam::123:role/x",
                "external_id": "ext",
                "server_side_encryption": "aws:kms",
                "kms_key_id": "alias/audit",
                "storage_class": "STANDARD_IA",
                "object_lock": {"mode": "COMPLIANCE", "retain_days": 365},
                "concurrency": 32,
                "timeout": "5s",
            }
        )
        assert config.object_lock is not None and config.object_lock.retain_days == 365
        assert config.timeout == 5.0
        assert SECRET not in repr(config) and SECRET not in str(config.model_dump())

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"color": "red"}, "extra"),
            ({"layout": "workos", "compression": "gzip"}, "batch only"),
            ({"access_key_id": "AKIA"}, "go together"),
            ({"kms_key_id": "k"}, "aws:kms"),
            ({"prefix": "/logs/"}, "leading slash"),
            ({"prefix": "workos"}, "end it with '/'"),
            ({"prefix": "x" * 1000}, "too long"),
            ({"bucket": "a/b"}, "bucket"),
            ({"endpoint_url": "127.0.0.1:7480"}, "URL"),
            ({"storage_class": "standard ia"}, "storage class"),
            ({"object_lock": {"mode": "GOVERNANCE", "retain_days": 0}}, "retain_days"),
            ({"access_key_id": "", "secret_access_key": ""}, "empty"),
            ({"external_id": "x"}, "role_arn"),
            ({"concurrency": 0}, "concurrency"),
        ],
    )
    def test_rejects(self, options: dict[str, Any], message: str) -> None:
        with pytest.raises(pydantic.ValidationError, match=re.escape(message)):
            S3Config.model_validate({"bucket": "audit-archive", **options})

    def test_secrets_stay_out_of_repr(self) -> None:
        sink = S3Sink("s", S3Config(bucket="b", access_key_id="AKIAEXAMPLE", secret_access_key=SECRET))
        assert SECRET not in repr(sink) and "AKIAEXAMPLE" not in repr(sink)


# --- the workos layout ---------------------------------------------------------------------------


class TestWorkosLayout:
    async def test_one_pretty_json_file_per_event_with_the_workos_key(
        self, make_sink: Any, moto_client: Any, bucket: str
    ) -> None:
        sink = make_sink(bucket, prefix="workos/")
        events = make_events(20)
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS and not result.failures
        objects = read_objects(moto_client, bucket)
        assert len(objects) == 20
        for event in events:
            key = f"workos/{event.timestamp[:10]}/{event.timestamp}_{event.key_suffix}.json"
            assert objects[key]["body"] == orjson.dumps(event.event, option=orjson.OPT_INDENT_2)
            assert objects[key]["content_type"] == "application/json"
            assert orjson.loads(objects[key]["body"]) == event.event

    async def test_the_stored_file_holds_the_values_workos_sent(
        self, make_sink: Any, moto_client: Any, bucket: str
    ) -> None:
        event = exact_event()
        result = await make_sink(bucket).send([event])
        assert result.outcome is Outcome.SUCCESS and not result.failures, result
        stored = read_objects(moto_client, bucket)["2024-01-15/2024-01-15T10:30:00.123Z_exact0001.json"]["body"]
        assert same_json(stored, event.event_raw)  # strict JSON, every value and escape as sent ...
        assert stored.startswith(b'{\n  "id": "01HYEXACT0000000000000001",\n  "action"')  # ... pretty-printed
        for literal in EXACT_LITERALS:
            assert literal in stored
        assert b"18446744073709551616" in stored and b"1e999" in stored

    async def test_key_from_the_docs_example(self, make_sink: Any, moto_client: Any, bucket: str) -> None:
        event = wrapper_event(
            event={"id": "01HY1", "action": "user.signed_in", "occurred_at": "2024-01-15T10:30:00.000Z"},
            keySuffix="abc123def456",
            timestamp="2024-01-15T10:30:00.123Z",
            source="team-name",
        )
        assert (await make_sink(bucket).send([event])).outcome is Outcome.SUCCESS
        body = read_objects(moto_client, bucket)["2024-01-15/2024-01-15T10:30:00.123Z_abc123def456.json"]["body"]
        assert (
            body
            == b'{\n  "id": "01HY1",\n  "action": "user.signed_in",\n  "occurred_at": "2024-01-15T10:30:00.000Z"\n}'
        )

    async def test_occurred_at_when_the_wrapper_has_no_timestamp(
        self, make_sink: Any, moto_client: Any, bucket: str
    ) -> None:
        event = wrapper_event(event={"id": "e1", "occurred_at": "2024-02-29T23:59:59.999Z"}, keySuffix="k1")
        assert (await make_sink(bucket, prefix="p/").send([event])).outcome is Outcome.SUCCESS
        assert list(read_objects(moto_client, bucket)) == ["p/2024-02-29/2024-02-29T23:59:59.999Z_k1.json"]

    async def test_strftime_prefix_uses_the_event_time(self, make_sink: Any, moto_client: Any, bucket: str) -> None:
        event = wrapper_event(event={"id": "e1"}, keySuffix="k1", timestamp="2023-07-04T01:02:03.004Z")
        assert (await make_sink(bucket, prefix="audit/%Y/%m/").send([event])).outcome is Outcome.SUCCESS
        assert list(read_objects(moto_client, bucket)) == ["audit/2023/07/2023-07-04/2023-07-04T01:02:03.004Z_k1.json"]

    async def test_a_retried_event_rewrites_the_same_key(self, make_sink: Any, moto_client: Any, bucket: str) -> None:
        sink = make_sink(bucket)
        events = make_events(3)
        await sink.send(events)
        await sink.send(events)
        assert len(read_objects(moto_client, bucket)) == 3

    async def test_events_without_key_suffix_or_id_from_two_replicas_never_share_a_key(
        self, make_sink: Any, moto_client: Any, bucket: str
    ) -> None:
        """Was a defect: an event with neither a `keySuffix` nor a string `id` (a bare event, or a numeric id) was
        stored under `{timestamp}_seq-{seq}.json`, and every replica's journal numbers its events from 1: two
        replicas taking two different such events with the same `occurred_at` wrote the same key, the second
        put overwriting the first (one object left, one event lost). The key now ends with the SHA-256 of the
        event's bytes as received: the same for a retry of the event, different for any other event."""
        occurred = "2024-01-15T10:30:00.000Z"
        first, second = (
            Event(1, "workos", orjson.dumps({"event": {"action": "user.signed_in", "occurred_at": occurred, "n": n}}),
                  action="user.signed_in", time=1705314600.0, received_at=time.time())
            for n in (1, 2)
        )  # fmt: skip
        for replica, event in (("replica-0", first), ("replica-1", second)):
            result = await make_sink(bucket).send([event])
            assert result.outcome is Outcome.SUCCESS and not result.failures, (replica, result)
        objects = read_objects(moto_client, bucket)
        assert sorted(orjson.loads(o["body"])["n"] for o in objects.values()) == [1, 2], list(objects)
        digest = hashlib.sha256(first.event_raw).hexdigest()
        assert f"2024-01-15/{occurred}_sha256-{digest}.json" in objects
        assert (await make_sink(bucket).send([first])).outcome is Outcome.SUCCESS  # a retry rewrites its key
        assert len(read_objects(moto_client, bucket)) == 2

    async def test_an_over_long_key_fails_that_event_only(self, make_sink: Any, moto_client: Any, bucket: str) -> None:
        events = make_events(6)
        wrapper = events[2].wrapper | {"keySuffix": "x" * MAX_KEY_BYTES}
        events[2] = Event(events[2].seq, "workos", orjson.dumps(wrapper), action="a", time=0, received_at=0)
        result = await make_sink(bucket).send(events)
        assert result.outcome is Outcome.SUCCESS and set(result.failures) == {events[2].seq}
        failure = result.failures[events[2].seq]
        assert failure.outcome is Outcome.PERMANENT and "1024" in failure.reason
        assert len(read_objects(moto_client, bucket)) == 5

    async def test_a_wrapper_without_event_is_permanent(self, make_sink: Any, bucket: str) -> None:
        events = [*make_events(2), wrapper_event(keySuffix="k")]
        result = await make_sink(bucket).send(events)
        assert set(result.failures) == {7}
        assert result.failures[7].outcome is Outcome.PERMANENT and "encode" in result.failures[7].reason


# --- the batch layout ----------------------------------------------------------------------------


class TestBatchLayout:
    @pytest.mark.parametrize(
        ("compression", "suffix", "encoding"),
        [("none", ".ndjson", None), ("gzip", ".ndjson.gz", "gzip"), ("zstd", ".ndjson.zst", "zstd")],
    )
    async def test_one_ndjson_object_per_batch(
        self, make_sink: Any, moto_client: Any, bucket: str, compression: str, suffix: str, encoding: str | None
    ) -> None:
        sink = make_sink(bucket, layout="batch", compression=compression, prefix="batches/%Y-%m-%d/")
        events = make_events(50)
        before = int(time.time())
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS
        (key, item), *others = read_objects(moto_client, bucket).items()
        assert not others
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        match = re.fullmatch(rf"batches/{day}/(\d+)-[0-9a-f-]{{36}}{re.escape(suffix)}", key)
        assert match and before <= int(match.group(1)) <= time.time()
        assert item["content_type"] == "application/x-ndjson"
        assert item["content_encoding"] == encoding
        wrappers = decode_batch_object(item["body"], encoding)
        assert [orjson.dumps(w) for w in wrappers] == [e.raw for e in events]
        if compression == "gzip":
            assert gzip.decompress(item["body"]) == b"".join(e.raw + b"\n" for e in events)

    @pytest.mark.parametrize("compression", ["gzip", "zstd"])
    async def test_concurrent_sends(self, make_sink: Any, moto_client: Any, bucket: str, compression: str) -> None:
        sink = make_sink(bucket, layout="batch", compression=compression, concurrency=4)
        batches = [make_events(300, start_seq=i * 300) for i in range(8)]
        results = await asyncio.gather(*(sink.send(b) for b in batches))
        assert all(r.outcome is Outcome.SUCCESS for r in results)
        stored = [
            w
            for item in read_objects(moto_client, bucket).values()
            for w in decode_batch_object(item["body"], item["content_encoding"])
        ]
        assert sorted(orjson.dumps(w) for w in stored) == sorted(e.raw for b in batches for e in b)

    async def test_the_stored_lines_are_the_wrappers_workos_sent(
        self, make_sink: Any, moto_client: Any, bucket: str
    ) -> None:
        events = [make_events(1)[0], exact_event(2)]
        result = await make_sink(bucket, layout="batch", compression="gzip").send(events)
        assert result.outcome is Outcome.SUCCESS and not result.failures, result
        (item,) = read_objects(moto_client, bucket).values()
        assert gzip.decompress(item["body"]).splitlines() == [event.raw for event in events]

    async def test_each_batch_is_a_new_object(self, make_sink: Any, moto_client: Any, bucket: str) -> None:
        sink = make_sink(bucket, layout="batch")
        await sink.send(make_events(3))
        await sink.send(make_events(3))
        assert len(read_objects(moto_client, bucket)) == 2


# --- Content-MD5 and Object Lock -----------------------------------------------------------------


class TestContentMD5:
    @pytest.mark.parametrize("layout", ["workos", "batch"])
    async def test_every_put_carries_the_md5_of_the_bytes_sent(self, make_sink: Any, bucket: str, layout: str) -> None:
        sink = make_sink(bucket, layout=layout)
        requests = await capture_puts(sink)
        await sink.send(make_events(5))
        assert len(requests) == (5 if layout == "workos" else 1)
        for request in requests:
            body = request.body.getvalue() if hasattr(request.body, "getvalue") else request.body
            assert body and request.headers["Content-MD5"].decode() == md5_b64(body)
            assert not any(name.lower().startswith("x-amz-checksum") for name in request.headers)

    async def test_object_lock_bucket_needs_it_and_gets_it(
        self, make_sink: Any, moto_client: Any, lock_bucket: str
    ) -> None:
        # boto3 with request_checksum_calculation=when_required adds no checksum: without MD5 moto refuses ...
        with pytest.raises(ClientError, match="MissingUploadObjectWithObjectLockHeaders"):
            moto_client.put_object(Bucket=lock_bucket, Key="plain", Body=b"{}")
        # ... and the sink's puts go through, in both layouts.
        events = make_events(4)
        assert (await make_sink(lock_bucket).send(events)).outcome is Outcome.SUCCESS
        assert (await make_sink(lock_bucket, layout="batch").send(events)).outcome is Outcome.SUCCESS
        assert len(read_objects(moto_client, lock_bucket)) == 5

    async def test_per_object_retention(self, make_sink: Any, moto_client: Any, lock_bucket: str) -> None:
        sink = make_sink(lock_bucket, object_lock={"mode": "GOVERNANCE", "retain_days": 30})
        await sink.send(make_events(2))
        for key in read_objects(moto_client, lock_bucket):
            head = moto_client.head_object(Bucket=lock_bucket, Key=key)  # moto's GetObjectRetention answers 500
            assert head["ObjectLockMode"] == "GOVERNANCE"
            until = head["ObjectLockRetainUntilDate"]
            assert abs((until - datetime.now(UTC) - timedelta(days=30)).total_seconds()) < 120

    async def test_storage_class_and_encryption_are_sent(self, make_sink: Any, moto_client: Any, bucket: str) -> None:
        sink = make_sink(bucket, storage_class="STANDARD_IA", server_side_encryption="AES256")
        await sink.send(make_events(1))
        (key,) = read_objects(moto_client, bucket)
        head = moto_client.head_object(Bucket=bucket, Key=key)
        assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"


# --- classification ------------------------------------------------------------------------------


def client_error(code: str, status: int, headers: dict[str, str] | None = None) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": f"{code} happened"},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}},
    }
    return ClientError(response, "PutObject")


class TestClassification:
    @pytest.mark.parametrize(
        ("error", "outcome"),
        [
            (client_error("SlowDown", 503), Outcome.RETRY),
            (client_error("InternalError", 500), Outcome.RETRY),
            (client_error("ServiceUnavailable", 503), Outcome.RETRY),
            (client_error("RequestTimeout", 400), Outcome.RETRY),
            (client_error("AccessDenied", 403), Outcome.RETRY),
            (client_error("NoSuchBucket", 404), Outcome.RETRY),
            (client_error("ExpiredToken", 400), Outcome.RETRY),
            (client_error("InvalidAccessKeyId", 403), Outcome.RETRY),
            (client_error("SignatureDoesNotMatch", 403), Outcome.RETRY),
            (client_error("PermanentRedirect", 301), Outcome.RETRY),
            (client_error("BadDigest", 400), Outcome.RETRY),
            (client_error("SomethingNew", 400), Outcome.RETRY),
            (client_error("KeyTooLongError", 400), Outcome.PERMANENT),
            (client_error("InvalidObjectName", 400), Outcome.PERMANENT),
            (client_error("EntityTooLarge", 400), Outcome.PERMANENT),
            (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), Outcome.RETRY),
            (ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), Outcome.RETRY),
            (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), Outcome.RETRY),
            (NoCredentialsError(), Outcome.RETRY),
        ],
    )
    def test_table(self, error: Exception, outcome: Outcome) -> None:
        verdict = classify_error(error)
        assert verdict.outcome is outcome and verdict.reason

    def test_retry_after_is_kept(self) -> None:
        assert classify_error(client_error("SlowDown", 503, {"retry-after": "7"})).retry_after == 7.0

    async def test_missing_bucket_is_retry_and_stops_the_batch(self, make_sink: Any, moto: MotoS3) -> None:
        sink = make_sink("no-such-bucket-here", access_key_id="AKIAID", secret_access_key=SECRET, concurrency=4)
        requests = await capture_puts(sink)
        events = make_events(40)
        result = await sink.send(events)
        verdicts = [result.outcome_of(event) for event in events]
        assert all(v is not None and v.outcome is Outcome.RETRY for v in verdicts)
        reasons = [v.reason for v in verdicts if v is not None]
        assert all("NoSuchBucket" in r and "no-such-bucket-here" in r for r in reasons)
        assert all(moto.endpoint_url in r and SECRET not in r for r in reasons)
        assert len(requests) <= 4  # the puts after the first failure are not attempted

    async def test_each_dead_letter_reason_names_its_own_key_or_says_not_attempted(
        self, make_sink: Any, moto: MotoS3
    ) -> None:
        sink = make_sink("no-such-bucket-here", concurrency=4)
        events = make_events(40)
        result = await sink.send(events)
        tried = untried = 0
        for event in events:
            verdict = result.outcome_of(event)
            assert verdict is not None and verdict.outcome is Outcome.RETRY
            others = [e.key_suffix for e in events if e is not event]
            assert not [suffix for suffix in others if suffix and suffix in verdict.reason], verdict.reason
            if verdict.reason.startswith("not attempted: "):
                untried += 1
                assert "key " not in verdict.reason
            else:
                tried += 1
                assert event.key_suffix is not None and event.key_suffix in verdict.reason
        assert 1 <= tried <= 4 and tried + untried == 40

    async def test_batch_layout_missing_bucket_is_retry(self, make_sink: Any) -> None:
        result = await make_sink("no-such-bucket-here", layout="batch").send(make_events(3))
        assert result.outcome is Outcome.RETRY and "NoSuchBucket" in result.reason

    async def test_unreachable_endpoint_is_retry(self, moto: MotoS3, bucket: str) -> None:
        sink = sink_for(moto, bucket, endpoint_url="http://127.0.0.1:9", timeout=2)
        try:
            events = make_events(3)
            result = await sink.send(events)
            verdicts = [result.outcome_of(event) for event in events]
            assert all(v is not None and v.outcome is Outcome.RETRY and "127.0.0.1:9" in v.reason for v in verdicts)
            health = await sink.healthcheck()
            assert not health.ok and "127.0.0.1:9" in health.message
        finally:
            await sink.close()

    async def test_no_credentials_is_retry(
        self, make_sink: Any, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        sink = make_sink(bucket, access_key_id=None, secret_access_key=None)
        events = make_events(2)
        result = await sink.send(events)
        verdicts = [result.outcome_of(event) for event in events]
        assert all(v is not None and v.outcome is Outcome.RETRY and "credentials" in v.reason for v in verdicts)


# --- health, credentials, close ------------------------------------------------------------------


class TestHealth:
    async def test_healthy_bucket(self, make_sink: Any, moto_client: Any, bucket: str) -> None:
        health = await make_sink(bucket, prefix="workos/").healthcheck()
        assert health.ok and bucket in health.message
        assert read_objects(moto_client, bucket) == {}  # the probe was removed

    async def test_health_on_an_object_lock_bucket(self, make_sink: Any, lock_bucket: str) -> None:
        assert (await make_sink(lock_bucket).healthcheck()).ok

    async def test_missing_bucket(self, make_sink: Any, moto: MotoS3) -> None:
        sink = make_sink("absent-bucket", access_key_id="AKIAID", secret_access_key=SECRET)
        health = await sink.healthcheck()
        assert not health.ok
        assert "absent-bucket" in health.message and moto.endpoint_url in health.message
        assert "NoSuchBucket" in health.message and SECRET not in health.message


class TestAssumeRole:
    async def test_assumes_the_role_and_refreshes_before_expiry(
        self, make_sink: Any, moto: MotoS3, moto_client: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sink = make_sink(
            bucket,
            role_arn="arn:aws:iam::123456789012:role/audit-writer",
            external_id="ext-1",
            sts_endpoint_url=moto.endpoint_url,
        )
        assert (await sink.send(make_events(2))).outcome is Outcome.SUCCESS
        credentials = (await sink._get_client())._request_signer._credentials
        assert credentials.method == "assume-role"
        first = credentials.get_frozen_credentials()
        assert first.access_key.startswith("ASIA") and first.token
        later = datetime.now(UTC) + timedelta(minutes=50)  # 10 minutes before the 1-hour session ends
        monkeypatch.setattr(botocore.credentials, "_local_now", lambda: later)
        credentials._time_fetcher = lambda: later
        assert (await sink.send(make_events(2))).outcome is Outcome.SUCCESS
        assert credentials.get_frozen_credentials().access_key != first.access_key
        assert len(read_objects(moto_client, bucket)) == 4


class TestClose:
    async def test_close_twice_and_send_after_close(self, make_sink: Any, bucket: str) -> None:
        sink = make_sink(bucket)
        await sink.send(make_events(1))
        await sink.close()
        await sink.close()
        assert (await sink.send(make_events(1))).outcome is Outcome.RETRY
        assert not (await sink.healthcheck()).ok

    async def test_close_without_use(self) -> None:
        sink = S3Sink("s", S3Config(bucket="b"))
        await sink.close()


# --- compliance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS)
async def test_compliance_batch_layout(check: str) -> None:
    # The workos layout on moto runs in tests/sinks/test_compliance.py with every other sink.
    harness = Harness("batch")
    if unsupported(check, harness):
        pytest.skip(f"the S3 harness cannot produce {check!r} (see tests/peers/s3.py)")
    await run_with_peer(check, harness)


# --- Ceph RGW ------------------------------------------------------------------------------------


class WrongDigestSink(S3Sink):
    """Sends a Content-MD5 that does not match the body (the digest of the body plus one byte)."""

    def content_md5(self, body: bytes) -> str:
        return super().content_md5(body + b"!")


class ServerKeyCheckSink(S3Sink):
    """Leaves the key-length check to the store, to see what the store answers."""

    max_key_bytes = None


@pytest.fixture
def rgw_bucket(rgw_server: Any, rgw_s3_client: Any) -> Iterator[str]:
    """An Object Lock bucket with default retention (GOVERNANCE, 1 day) on RGW."""
    name = f"lock-{uuid.uuid4().hex[:12]}"
    create_lock_bucket(rgw_s3_client, name)
    yield name
    delete_bucket(rgw_s3_client, name)


@pytest.mark.rgw
class TestRGW:
    async def test_workos_layout_on_an_object_lock_bucket(
        self, rgw_server: Any, rgw_s3_client: Any, rgw_bucket: str
    ) -> None:
        sink = sink_for(rgw_server, rgw_bucket, prefix="workos/")
        try:
            events = make_events(30)
            result = await sink.send(events)
            assert result.outcome is Outcome.SUCCESS and not result.failures, result
            objects = read_objects(rgw_s3_client, rgw_bucket)
            assert len(objects) == 30
            for event in events:
                key = f"workos/{event.timestamp[:10]}/{event.timestamp}_{event.key_suffix}.json"
                assert objects[key]["body"] == orjson.dumps(event.event, option=orjson.OPT_INDENT_2)
            assert (await sink.healthcheck()).ok
        finally:
            await sink.close()

    @pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
    async def test_batch_layout_on_an_object_lock_bucket(
        self, rgw_server: Any, rgw_s3_client: Any, rgw_bucket: str, compression: str
    ) -> None:
        sink = sink_for(rgw_server, rgw_bucket, layout="batch", compression=compression, prefix="b/")
        try:
            events = make_events(200)
            assert (await sink.send(events)).outcome is Outcome.SUCCESS
            ((key, item),) = read_objects(rgw_s3_client, rgw_bucket).items()
            assert item["content_type"] == "application/x-ndjson"
            raw = b"".join(e.raw + b"\n" for e in events)
            decompress = {"none": bytes, "gzip": gzip.decompress, "zstd": zstandard.ZstdDecompressor().decompress}
            assert decompress[compression](item["body"]) == raw
            assert item["content_encoding"] == (None if compression == "none" else compression)
            assert key.endswith({"none": ".ndjson", "gzip": ".ndjson.gz", "zstd": ".ndjson.zst"}[compression])
        finally:
            await sink.close()

    async def test_object_lock_retention_per_object(self, rgw_server: Any, rgw_s3_client: Any, rgw_bucket: str) -> None:
        sink = sink_for(rgw_server, rgw_bucket, object_lock={"mode": "GOVERNANCE", "retain_days": 2})
        try:
            assert (await sink.send(make_events(2))).outcome is Outcome.SUCCESS
            for key in read_objects(rgw_s3_client, rgw_bucket):
                retention = rgw_s3_client.get_object_retention(Bucket=rgw_bucket, Key=key)["Retention"]
                assert retention["Mode"] == "GOVERNANCE"
                assert retention["RetainUntilDate"] > datetime.now(UTC) + timedelta(days=1)
        finally:
            await sink.close()

    @pytest.mark.parametrize("layout", ["workos", "batch"])
    async def test_rgw_checks_the_digest_end_to_end(
        self, rgw_server: Any, rgw_s3_client: Any, rgw_bucket: str, layout: str
    ) -> None:
        events = make_events(5)
        wrong = sink_for(rgw_server, rgw_bucket, WrongDigestSink, layout=layout)
        try:
            result = await wrong.send(events)
        finally:
            await wrong.close()
        # BadDigest means the bytes that arrived are not the bytes sent: nothing wrong with the event, so
        # RETRY (per object) — a resend normally cures it, and the engine's attempt limit ends a stubborn case.
        for event in events:
            failure = result.outcome_of(event)
            assert failure is not None and failure.outcome is Outcome.RETRY and "BadDigest" in failure.reason
        assert read_objects(rgw_s3_client, rgw_bucket) == {}
        right = sink_for(rgw_server, rgw_bucket, layout=layout)
        try:
            assert (await right.send(events)).outcome is Outcome.SUCCESS
        finally:
            await right.close()
        assert len(read_objects(rgw_s3_client, rgw_bucket)) == (5 if layout == "workos" else 1)

    async def test_rgw_refuses_an_over_long_key_for_that_event_only(
        self, rgw_server: Any, rgw_s3_client: Any, rgw_bucket: str
    ) -> None:
        events = make_events(6)
        wrapper = events[3].wrapper | {"keySuffix": "x" * MAX_KEY_BYTES}
        events[3] = Event(events[3].seq, "workos", orjson.dumps(wrapper), action="a", time=0, received_at=0)
        sink = sink_for(rgw_server, rgw_bucket, ServerKeyCheckSink)
        try:
            result = await sink.send(events)
        finally:
            await sink.close()
        assert result.outcome is Outcome.SUCCESS and set(result.failures) == {events[3].seq}, result
        failure = result.failures[events[3].seq]
        assert failure.outcome is Outcome.PERMANENT and "InvalidObjectName" in failure.reason
        assert len(read_objects(rgw_s3_client, rgw_bucket)) == 5

    async def test_wrong_keys_are_retry_and_fail_the_health_check(self, rgw_server: Any, rgw_bucket: str) -> None:
        sink = sink_for(rgw_server, rgw_bucket, secret_access_key=SECRET)
        try:
            events = make_events(3)
            result = await sink.send(events)
            for event in events:
                verdict = result.outcome_of(event)
                assert verdict is not None and verdict.outcome is Outcome.RETRY and verdict.config_problem
                assert re.search("SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId", verdict.reason)
            health = await sink.healthcheck()
            assert not health.ok and rgw_bucket in health.message and SECRET not in health.message
        finally:
            await sink.close()

    @pytest.mark.parametrize("layout", ["workos", "batch"])
    @pytest.mark.parametrize("check", CHECKS)
    async def test_compliance_on_rgw(self, rgw_server: Any, check: str, layout: str) -> None:
        harness = Harness(layout, server=rgw_server)  # type: ignore[arg-type]
        if unsupported(check, harness):
            pytest.skip(f"the S3 harness cannot produce {check!r} (see tests/peers/s3.py)")
        await run_with_peer(check, harness)


async def test_concurrency_is_bounded(make_sink: Any, bucket: str) -> None:
    """Never more than `concurrency` puts in flight at once."""
    sink = make_sink(bucket, concurrency=3)
    lock = threading.Lock()
    in_flight = peak = 0

    def before(**_: Any) -> None:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.01)

    def after(**_: Any) -> None:
        nonlocal in_flight
        with lock:
            in_flight -= 1

    client = await sink._get_client()
    client.meta.events.register("before-send.s3.PutObject", before)
    client.meta.events.register("after-call.s3.PutObject", after)
    assert (await sink.send(make_events(30))).outcome is Outcome.SUCCESS
    assert 1 < peak <= 3

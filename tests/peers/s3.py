"""A local S3 peer for the `s3` sink: moto's S3 server on loopback, plus the compliance `Harness`.

The harness can also drive any other S3-compatible server (e.g. the Ceph RGW of `tests.peers.rgw`):
pass it an object with `endpoint_url`, `access_key`, `secret_key` and `region`.

Modes: "retry" removes the bucket, so puts get `NoSuchBucket` (a configuration problem, hence RETRY) until
"ok" creates it again. "permanent" and "partial" are not supported: S3 never refuses an object for its
content, and neither moto nor RGW has a per-object refusal the peer could be told to give for one action.
The sink's per-object PERMANENT path (a key over 1024 bytes) is covered by tests/sinks/test_s3.py instead.
"""

from __future__ import annotations

import asyncio
import gzip
import uuid
from typing import TYPE_CHECKING, Any, Literal, Protocol

import boto3
import zstandard
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from sinks.s3 import S3Config, S3Sink
from sinks.testing.exact import loads

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

    from sinks.testing.compliance import Mode

__all__ = ["Harness", "MotoS3", "S3Server", "delete_bucket", "read_objects", "s3_client"]

ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret"  # moto does not check signatures
REGION = "us-east-1"


class S3Server(Protocol):
    """What the harness needs to know about an S3 server."""

    @property
    def endpoint_url(self) -> str: ...
    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    @property
    def region(self) -> str: ...


class MotoS3:
    """moto's S3 (and STS) server on 127.0.0.1 and a free port, in a thread of this process.

    moto keeps its state per process, so two servers in one process see the same buckets: use unique names.
    """

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer  # moto is a test dependency only

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._url: str | None = None

    def start(self) -> None:
        """Start serving (about 0.1 s)."""
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._url = f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving."""
        if self._url is not None:
            self._server.stop()
            self._url = None

    @property
    def endpoint_url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        if self._url is None:
            raise RuntimeError("MotoS3 is not started")
        return self._url

    def __enter__(self) -> MotoS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sink_for(
    server: S3Server, bucket: str, cls: type[S3Sink] = S3Sink, name: str = "archive", **options: Any
) -> S3Sink:
    """An S3 sink writing to `bucket` on `server` (path-style, the server's keys); `options` add or override keys."""
    config: dict[str, Any] = {
        "bucket": bucket,
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "addressing_style": "path",
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        **options,
    }
    return cls(name, S3Config.model_validate(config))


def s3_client(server: S3Server, *, max_pool_connections: int = 10, max_attempts: int = 2) -> S3Client:
    """A plain boto3 client for `server` that adds no checksum of its own (so Content-MD5 is all there is)."""
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=BotoConfig(
            s3={"addressing_style": "path"},
            max_pool_connections=max_pool_connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
        ),
    )
    return client


def read_objects(client: S3Client, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every object under `prefix`: key -> {"body": bytes, "content_type", "content_encoding"}."""
    objects: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            answer = client.get_object(Bucket=bucket, Key=item["Key"])
            objects[item["Key"]] = {
                "body": answer["Body"].read(),
                "content_type": answer.get("ContentType"),
                "content_encoding": answer.get("ContentEncoding"),
            }
    return objects


def decode_batch_object(body: bytes, content_encoding: str | None) -> list[dict[str, Any]]:
    """The wrappers of a batch-layout object."""
    if content_encoding == "gzip":
        body = gzip.decompress(body)
    elif content_encoding == "zstd":
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    return [loads(line) for line in body.splitlines() if line]


def delete_bucket(client: S3Client, bucket: str) -> None:
    """Remove every object version and the bucket itself (ignores a bucket that is already gone)."""
    try:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for version in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                client.delete_object(
                    Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"], BypassGovernanceRetention=True
                )
        for listing in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in listing.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise


class Harness:
    """The compliance harness of the `s3` sink: moto by default, or any S3 server passed in."""

    supports = frozenset({"retry"})

    def __init__(
        self,
        layout: Literal["workos", "batch"] = "workos",
        server: S3Server | None = None,
        **options: Any,
    ) -> None:
        self.layout = layout
        self.options = options
        self.bucket = f"compliance-{uuid.uuid4().hex[:12]}"
        self.prefix = "workos/"
        self._given = server
        self._moto: MotoS3 | None = None
        self._client: S3Client | None = None

    @property
    def server(self) -> S3Server:
        """The server the sink writes to."""
        server = self._given or self._moto
        if server is None:
            raise RuntimeError("Harness is not started")
        return server

    @property
    def client(self) -> S3Client:
        """A plain boto3 client for the server."""
        if self._client is None:
            raise RuntimeError("Harness is not started")
        return self._client

    async def start(self) -> None:
        """Start moto (unless a server was given) and create the bucket."""
        if self._given is None:
            self._moto = MotoS3()
            await asyncio.to_thread(self._moto.start)
        self._client = await asyncio.to_thread(s3_client, self.server)
        await asyncio.to_thread(self.client.create_bucket, Bucket=self.bucket)

    async def stop(self) -> None:
        """Remove the bucket and stop moto."""
        if self._client is not None:
            await asyncio.to_thread(delete_bucket, self._client, self.bucket)
            self._client.close()
            self._client = None
        if self._moto is not None:
            await asyncio.to_thread(self._moto.stop)
            self._moto = None

    def build(self) -> S3Sink:
        """A sink writing to the harness bucket."""
        options: dict[str, Any] = {"concurrency": 8, "timeout": 10, **self.options}
        return sink_for(
            self.server, self.bucket, name="s3-compliance", prefix=self.prefix, layout=self.layout, **options
        )

    def set_mode(self, mode: Mode) -> None:
        """ok: the bucket exists; retry: it does not (NoSuchBucket)."""
        if mode == "ok":
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError:
                self.client.create_bucket(Bucket=self.bucket)
        elif mode == "retry":
            delete_bucket(self.client, self.bucket)
        else:
            raise ValueError(f"the S3 harness cannot produce {mode!r} (see the module docstring)")

    async def received(self) -> list[dict[str, Any]]:
        """The bare events stored in the bucket."""
        objects = await asyncio.to_thread(read_objects, self.client, self.bucket, self.prefix)
        if self.layout == "workos":
            return [loads(item["body"]) for item in objects.values()]
        return [
            wrapper["event"]
            for item in objects.values()
            for wrapper in decode_batch_object(item["body"], item["content_encoding"])
        ]

"""The Ceph RGW test server: a real S3 endpoint (Object Lock, Content-MD5, signatures) that starts and stops cleanly."""

from __future__ import annotations

import base64
import datetime as dt
import errno
import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.peers import rgw
from tests.peers.rgw import RGWServer, RGWUnavailable, missing_binaries, reap_stale_daemons

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.rgw

botocore_exceptions = pytest.importorskip("botocore.exceptions")
ClientError = botocore_exceptions.ClientError


def content_md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 - the S3 integrity header


def error_code(exc: pytest.ExceptionInfo[Any]) -> str:
    return str(exc.value.response["Error"]["Code"])


def live_pids(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still name a process (a zombie counts: it was not reaped)."""
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def pids_using(directory: Path) -> list[int]:
    """Processes whose command line mentions ``directory``: found through /proc, no psutil."""
    found = []
    needle = str(directory).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def lock_bucket(rgw_s3_client: S3Client) -> str:
    """A bucket with Object Lock on and a default retention rule of GOVERNANCE for 1 day."""
    name = f"lock-{uuid.uuid4().hex[:12]}"
    rgw_s3_client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    rgw_s3_client.put_object_lock_configuration(
        Bucket=name,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
        },
    )
    return name


@pytest.fixture
def sent_headers(rgw_s3_client: S3Client) -> Iterator[list[dict[str, str]]]:
    """Headers of every request the session client sends during the test, as they went on the wire."""
    seen: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        seen.append({k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})

    events = rgw_s3_client.meta.events
    events.register("before-send.s3", record)
    yield seen
    events.unregister("before-send.s3", record)


class TestObjectLockBucket:
    def test_default_retention_rule_is_stored(self, rgw_s3_client: S3Client, lock_bucket: str) -> None:
        config = rgw_s3_client.get_object_lock_configuration(Bucket=lock_bucket)["ObjectLockConfiguration"]
        assert config["ObjectLockEnabled"] == "Enabled"
        assert config["Rule"]["DefaultRetention"] == {"Mode": "GOVERNANCE", "Days": 1}

    def test_put_with_correct_md5_reads_back_identical(self, rgw_s3_client: S3Client, lock_bucket: str) -> None:
        body = os.urandom(4096) + b'{"event":"user.signed_in"}\n' * 100
        put = rgw_s3_client.put_object(Bucket=lock_bucket, Key="good", Body=body, ContentMD5=content_md5(body))
        got = rgw_s3_client.get_object(Bucket=lock_bucket, Key="good")
        assert got["Body"].read() == body
        assert got["ETag"] == put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'  # noqa: S324
        assert got["ObjectLockMode"] == "GOVERNANCE"
        retain = got["ObjectLockRetainUntilDate"] - dt.datetime.now(dt.UTC)
        assert dt.timedelta(hours=23) < retain <= dt.timedelta(days=1)

    def test_put_with_wrong_md5_is_refused_with_bad_digest(self, rgw_s3_client: S3Client, lock_bucket: str) -> None:
        with pytest.raises(ClientError) as refused:
            rgw_s3_client.put_object(Bucket=lock_bucket, Key="bad", Body=b"payload", ContentMD5=content_md5(b"other"))
        assert error_code(refused) == "BadDigest"
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        with pytest.raises(ClientError) as missing:
            rgw_s3_client.head_object(Bucket=lock_bucket, Key="bad")
        assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    def test_put_without_md5_or_checksum_is_accepted_by_rgw16(
        self, rgw_s3_client: S3Client, lock_bucket: str, sent_headers: list[dict[str, str]]
    ) -> None:
        """RGW 16 does not demand an integrity header on Object Lock buckets (AWS S3 and moto do): sinks must
        send Content-MD5 themselves, this server will not catch its absence."""
        rgw_s3_client.put_object(Bucket=lock_bucket, Key="no-md5", Body=b"payload")
        (put_headers,) = [h for h in sent_headers if "content-length" in h]
        assert "content-md5" not in put_headers
        assert not [name for name in put_headers if name.startswith("x-amz-checksum-")]
        assert rgw_s3_client.get_object(Bucket=lock_bucket, Key="no-md5")["Body"].read() == b"payload"

    def test_locked_version_cannot_be_deleted(self, rgw_s3_client: S3Client, lock_bucket: str) -> None:
        put = rgw_s3_client.put_object(Bucket=lock_bucket, Key="kept", Body=b"x", ContentMD5=content_md5(b"x"))
        with pytest.raises(ClientError) as refused:
            rgw_s3_client.delete_object(Bucket=lock_bucket, Key="kept", VersionId=put["VersionId"])
        assert error_code(refused) == "AccessDenied"


class TestAuthentication:
    def test_wrong_secret_key_is_refused(self, rgw_server: RGWServer, lock_bucket: str) -> None:
        forged = rgw_server.s3_client(secret_key="not-" + rgw_server.secret_key)
        with pytest.raises(ClientError) as listing:
            forged.list_objects_v2(Bucket=lock_bucket)
        with pytest.raises(ClientError) as putting:
            forged.put_object(Bucket=lock_bucket, Key="forged", Body=b"x", ContentMD5=content_md5(b"x"))
        assert error_code(listing) in {"SignatureDoesNotMatch", "AccessDenied"}
        assert error_code(putting) in {"SignatureDoesNotMatch", "AccessDenied"}
        assert putting.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    def test_unknown_access_key_is_refused(self, rgw_server: RGWServer, lock_bucket: str) -> None:
        stranger = rgw_server.s3_client(access_key="AKNOBODYKNOWS0000000")
        with pytest.raises(ClientError) as refused:
            stranger.list_objects_v2(Bucket=lock_bucket)
        assert error_code(refused) == "InvalidAccessKeyId"


class TestLifecycle:
    def test_second_server_runs_beside_the_session_one_and_stops_without_trace(self, rgw_server: RGWServer) -> None:
        with RGWServer() as other:
            directory = other.directory
            assert directory is not None
            pids = other.pids
            assert len(pids) == 3
            assert live_pids(pids) == pids
            assert other.endpoint_url != rgw_server.endpoint_url
            assert other.s3_client().list_buckets()["Buckets"] == []
        assert other.start_seconds is not None and other.start_seconds < 30
        assert other.stop_seconds is not None and other.stop_seconds < 10
        assert live_pids(pids) == []
        assert pids_using(directory) == []
        assert not directory.exists()
        assert rgw_server.s3_client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200
        other.stop()  # idempotent

    def test_stale_daemons_of_a_dead_owner_are_reaped(self, rgw_server: RGWServer, tmp_path: Path) -> None:
        """Also runs a server in a long workdir, where admin socket paths would not fit and are turned off."""
        orphan = RGWServer(tmp_path)
        orphan.start()
        try:
            assert orphan.directory is not None and orphan.directory.parent == tmp_path.resolve()
            assert orphan.s3_client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200
            assert reap_stale_daemons() == []  # a live owner's daemons are left alone
            (orphan.directory / rgw.OWNER_FILE).write_text("999999999 1")  # as if its pytest session had died
            killed = reap_stale_daemons(tmp_path)
            assert sorted(killed) == sorted(orphan.pids)
            assert not orphan.directory.exists()
        finally:
            orphan.stop()
        assert live_pids(orphan.pids) == []
        assert rgw_server.s3_client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200

    @pytest.mark.usefixtures("rgw_server")  # skipped (or failed) with it where RGW cannot run
    def test_port_taken_by_someone_else_is_retried_with_new_ports(self, monkeypatch: pytest.MonkeyPatch) -> None:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            taken = squatter.getsockname()[1]
            free_ports = rgw._free_ports
            calls: list[int] = []

            def first_rgw_port_taken(count: int) -> list[int]:
                calls.append(count)
                ports = free_ports(count)
                return ports if len(calls) > 1 else [ports[0], taken]

            monkeypatch.setattr(rgw, "_free_ports", first_rgw_port_taken)
            with RGWServer() as server:
                assert len(calls) == 2
                assert server.endpoint_url != f"http://127.0.0.1:{taken}"
                assert server.s3_client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200

    @pytest.mark.usefixtures("rgw_server")
    def test_start_failure_names_the_daemon_and_its_log_tail(self, monkeypatch: pytest.MonkeyPatch) -> None:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            taken = squatter.getsockname()[1]
            free_ports = rgw._free_ports
            monkeypatch.setattr(rgw, "_free_ports", lambda count: [free_ports(1)[0], taken])
            monkeypatch.setattr(rgw, "START_ATTEMPTS", 1)
            server = RGWServer()
            began = time.monotonic()
            with pytest.raises(RGWUnavailable) as failed:
                server.start(timeout=30)
        message = str(failed.value)
        assert "client.rgw.a exited" in message
        # the log line ("failed to bind address ...") is not always written before radosgw exits; the status is
        assert "Address already in use" in message
        assert f"127.0.0.1:{taken}" in message
        assert server.secret_key not in message
        assert time.monotonic() - began < 30
        assert server.directory is None and server.pids == []

    def test_a_daemon_that_exits_with_eaddrinuse_before_logging_counts_as_a_lost_port(self, tmp_path: Path) -> None:
        server = RGWServer()
        exits = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({errno.EADDRINUSE})"])  # noqa: S603
        exits.wait(timeout=30)
        server._daemons.append(rgw._Daemon(rgw.RGW_NAME, exits, tmp_path / "empty.log", tmp_path / "empty.out"))
        with pytest.raises(rgw._PortTaken, match=r"status 98 \(Address already in use\)"):
            server._wait_for(lambda: False, time.monotonic() + 30, "RGW to answer", server._daemons[0])

    def test_a_daemon_that_exits_otherwise_is_not_retried(self, tmp_path: Path) -> None:
        server = RGWServer()
        exits = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])  # noqa: S603
        exits.wait(timeout=30)
        server._daemons.append(rgw._Daemon(rgw.RGW_NAME, exits, tmp_path / "empty.log", tmp_path / "empty.out"))
        with pytest.raises(RGWUnavailable, match="exited with status 1 while") as failed:
            server._wait_for(lambda: False, time.monotonic() + 30, "RGW to answer", server._daemons[0])
        assert not isinstance(failed.value, rgw._PortTaken)

    def test_missing_programs_are_named(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PATH", str(tmp_path))
        assert missing_binaries() == list(rgw.BINARIES)
        with pytest.raises(RGWUnavailable, match=r"ceph-mon, ceph-osd, radosgw.*apt-get install"):
            RGWServer().start()

"""`store_object` (sinks.objects): which sink types have it, the file sink's durable write, and the S3 sink on the
real Ceph RGW (Content-MD5 checked by the store, Object Lock bucket); then the WorkOS export schedule end to end
from the fake WorkOS API into RGW and a file sink, bytes compared with what the fake served."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from receiver.config import WorkosConfig
from receiver.workos import WorkosApi
from receiver.workos_export import ExportSchedule, ExportState, iso
from sinks.errors import SinkError
from sinks.file import FileSink
from sinks.objects import ObjectStore, stores_objects
from sinks.s3 import S3Sink
from tests.conftest import ORGANIZATION
from tests.peers.s3 import delete_bucket, read_objects
from tests.peers.s3 import sink_for as make_s3_sink
from tests.receiver.test_workos import Metrics
from tests.workos_fake import API_KEY, FakeWorkOS

MOMENT = datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
NAME = "exports/org_1/2024-01-14T00:00:00Z_2024-01-15T00:00:00Z.csv"
CSV = b'"id","action"\r\n"01HX1","user.signed_in \xc3\xa9"\r\n'


class TestCapability:
    @pytest.mark.parametrize(
        ("kind", "expected"),
        [("file", True), ("s3", True), ("splunk_hec", False), ("datadog", False), ("memory", False), ("nope", False)],
    )
    def test_which_types_store_files(self, kind: str, expected: bool) -> None:
        assert stores_objects(kind) is expected

    def test_the_sinks_satisfy_the_protocol(self, tmp_path: Path) -> None:
        assert isinstance(FileSink("f", FileSink.Config(path=str(tmp_path / "x.ndjson"))), ObjectStore)


class TestFileSink:
    @pytest.mark.parametrize(
        ("path", "directory"),
        [
            ("{tmp}/events/%Y-%m-%d.ndjson", "{tmp}/events"),
            ("{tmp}/logs/%Y/%m/%d.ndjson", "{tmp}/logs"),
            ("{tmp}/a.ndjson", "{tmp}"),
            ("{tmp}/100%%/%Y.ndjson", "{tmp}/100%"),  # a literal %: was {tmp}, where the events are not
            ("{tmp}/at-100%%.ndjson", "{tmp}"),
        ],
    )
    async def test_stores_under_the_sinks_directory(self, tmp_path: Path, path: str, directory: str) -> None:
        sink = FileSink("f", FileSink.Config(path=path.format(tmp=tmp_path)))
        await sink.store_object(NAME, CSV, moment=MOMENT)
        target = Path(directory.format(tmp=tmp_path)) / NAME
        assert target.read_bytes() == CSV
        assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left behind
        await sink.store_object(NAME, CSV + b"more", moment=MOMENT)  # the same name again replaces it
        assert target.read_bytes() == CSV + b"more"

    async def test_a_write_that_fails_raises_and_stores_nothing(self, tmp_path: Path) -> None:
        (tmp_path / "blocked").write_text("a file, not a directory")
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "blocked" / "%Y.ndjson")))
        with pytest.raises(SinkError, match="cannot write"):
            await sink.store_object(NAME, CSV, moment=MOMENT)
        assert (tmp_path / "blocked").read_text() == "a file, not a directory"


class WrongDigestSink(S3Sink):
    """Sends a Content-MD5 that does not match the body."""

    def content_md5(self, body: bytes) -> str:
        return super().content_md5(body + b"!")


@pytest.fixture
def lock_bucket(rgw_server: Any, rgw_s3_client: Any) -> Iterator[str]:
    """An Object Lock bucket on RGW (it refuses a put without Content-MD5)."""
    name = f"exports-{uuid.uuid4().hex[:12]}"
    rgw_s3_client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    rgw_s3_client.put_object_lock_configuration(
        Bucket=name,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
        },
    )
    yield name
    delete_bucket(rgw_s3_client, name)


@pytest.mark.rgw
class TestS3OnRGW:
    async def test_stores_the_bytes_with_content_md5_under_the_prefix(
        self, rgw_server: Any, rgw_s3_client: Any, lock_bucket: str
    ) -> None:
        sink = make_s3_sink(rgw_server, lock_bucket, prefix="archive/%Y/", timeout=10)
        try:
            await sink.store_object(NAME, CSV, moment=MOMENT)
        finally:
            await sink.close()
        objects = read_objects(rgw_s3_client, lock_bucket)
        assert list(objects) == [f"archive/2024/{NAME}"]
        assert objects[f"archive/2024/{NAME}"]["body"] == CSV
        assert objects[f"archive/2024/{NAME}"]["content_type"] == "text/csv"

    async def test_the_store_checks_the_digest(self, rgw_server: Any, rgw_s3_client: Any, lock_bucket: str) -> None:
        sink = make_s3_sink(rgw_server, lock_bucket, WrongDigestSink, timeout=10)
        try:
            with pytest.raises(SinkError, match="BadDigest"):
                await sink.store_object(NAME, CSV, moment=MOMENT)
        finally:
            await sink.close()
        assert read_objects(rgw_s3_client, lock_bucket) == {}

    async def test_the_schedule_end_to_end_into_rgw_and_a_file_sink(
        self, rgw_server: Any, rgw_s3_client: Any, lock_bucket: str, workos_fake: FakeWorkOS, tmp_path: Path
    ) -> None:
        workos_fake.polls_until_ready = 2
        day = 86400
        now = float(int(datetime.now(UTC).timestamp()) // day * day + 900)
        config = WorkosConfig(
            api_key=API_KEY,
            base_url=workos_fake.url,
            organizations=[ORGANIZATION],
            export={"every": "24h", "first_range": "24h", "sinks": ["s3", "file"]},
        )
        sinks = {
            "s3": make_s3_sink(rgw_server, lock_bucket, prefix="workos/", timeout=10),
            "file": FileSink("file", FileSink.Config(path=str(tmp_path / "files" / "%Y-%m-%d.ndjson"))),
        }
        metrics = Metrics()
        api = WorkosApi(config, metrics, backoff=0.01)
        clock = [now]
        workos_fake.clock = lambda: clock[0]  # WorkOS's clock moves with the schedule's: each range has settled there
        schedule = ExportSchedule(
            config, api, ExportState(tmp_path / "journal.db"), sinks, metrics, clock=lambda: clock[0], poll_initial=0.01
        )  # type: ignore[arg-type]
        try:
            await schedule.run_due()
            clock[0] += 2 * day
            await schedule.run_due()
        finally:
            await schedule.close()
            await api.close()
            await sinks["s3"].close()
        bounds = [int(now - day), int(now - 900), int(now - 900 + day), int(now - 900 + 2 * day)]
        names = [f"exports/{ORGANIZATION}/{iso(a)}_{iso(b)}.csv" for a, b in zip(bounds, bounds[1:], strict=False)]
        objects = read_objects(rgw_s3_client, lock_bucket)
        assert sorted(objects) == [f"workos/{name}" for name in names]
        served = {workos_fake.exports[export_id].range_start: data for export_id, data in workos_fake.served}
        assert len(served) == 3
        for k, name in enumerate(names):
            data = served[iso(bounds[k]).replace("Z", ".000Z")]
            assert objects[f"workos/{name}"]["body"] == data
            assert (tmp_path / "files" / name).read_bytes() == data

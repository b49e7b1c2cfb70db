"""The `workos:` section, and the real `workos` SDK against the fake WorkOS API (tests/workos_fake.py): stream
states, errors and their retries, exports (pending -> ready, error, expiring URLs, size cap), the portal link,
and that the API key never shows in a log line or an error."""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from receiver.config import WorkosConfig, parse_config
from receiver.errors import ConfigError
from receiver.logs import JsonFormatter
from receiver.metrics import WorkosMetrics
from receiver.workos import StreamWatch, WorkosApi, WorkosApiError, stream_status
from receiver.workos_export import Exporter, ExportFailed, Filters
from tests.conftest import ORGANIZATION
from tests.workos_fake import API_KEY, FakeWorkOS, stream

ISSUE_EXAMPLE = """
streams:
  - name: workos
    path: /workos
    sinks: [archive-s3]
sinks:
  archive-s3:
    type: s3
    bucket: audit-archive
workos:
  api_key: ${WORKOS_API_KEY}            # starts with sk_; validate says so when it does not
  # base_url: https://api.workos.com    # default
  organizations: [org_01EHZNVPK3SFK441A1RGBFSHRT]
  watch:
    every: 5m                           # poll each organization's audit-log configuration
  export:
    every: 24h                          # one export per organization per period
    first_range: 24h                    # how far back the very first export reaches (at most 90 days)
    settle: 15m                         # a range ends this long before "now", so late events are in it
    sinks: [archive-s3]                 # where the CSV files are stored: sinks of type s3 or file
    # actions: ["user.*"]               # optional filters passed to the export (actions, actor_names, targets)
"""

SINKS = {
    "archive": {"type": "file", "path": "/tmp/log-bridge-test/%Y-%m-%d.ndjson"},
    "splunk": {"type": "splunk_hec", "url": "https://hec.example:8088", "token": "t"},
    "dd": {"type": "datadog", "api_key": "k"},
}


def tree(workos: dict[str, Any]) -> dict[str, Any]:
    return {"streams": [{"name": "w", "path": "/w", "sinks": ["archive"]}], "sinks": SINKS, "workos": workos}


def errors_of(workos: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(tree(workos), environ or {})
    return caught.value.errors


def api_for(fake: FakeWorkOS, metrics: WorkosMetrics | None = None, **changes: Any) -> WorkosApi:
    config = WorkosConfig(
        **{"api_key": API_KEY, "base_url": fake.url, "organizations": [ORGANIZATION], "timeout": 5, **changes}
    )
    return WorkosApi(config, metrics, backoff=0.01)


class Metrics(WorkosMetrics):
    """The WorkOS metrics in a registry of their own, readable by name."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        super().__init__(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.value(name, **labels)


def new_metrics() -> Metrics:
    return Metrics()


class TestConfig:
    def test_the_issue_example_validates_as_written(self) -> None:
        config = parse_config(yaml.safe_load(ISSUE_EXAMPLE), {"WORKOS_API_KEY": API_KEY})
        assert config.workos is not None and config.workos.export is not None
        assert config.workos.api_key.get_secret_value() == API_KEY
        assert config.workos.base_url == "https://api.workos.com"
        assert config.workos.organizations == ("org_01EHZNVPK3SFK441A1RGBFSHRT",)
        assert config.workos.watch.every == 300
        export = config.workos.export
        assert (export.every, export.first_range, export.settle, export.sinks) == (86400, 86400, 900, ("archive-s3",))
        assert export.timeout == 1800

    def test_the_section_is_optional(self) -> None:
        config = parse_config({k: v for k, v in tree({}).items() if k != "workos"}, {})
        assert config.workos is None

    def test_an_api_key_that_is_not_sk_is_refused_without_being_shown(self) -> None:
        errors = errors_of({"api_key": "pk_live_secretvalue123", "organizations": [ORGANIZATION]})
        assert errors == ["workos.api_key: a WorkOS API key starts with sk_ (Dashboard > API Keys)"]
        assert "secretvalue123" not in str(errors)

    @pytest.mark.parametrize(
        "key", ["sk_test_abc\x00SECRETPART", "sk_test_abc\x7fSECRETPART", "sk_test_abc\u00e9SECRETPART"]
    )
    def test_a_key_that_cannot_be_a_header_is_refused_without_being_shown(self, key: str) -> None:
        """httpx would send the request, and h11 would refuse the header quoting it whole in its error: a NUL
        ends the part that looks like a key, so the rest was in the error and the log line."""
        errors = errors_of({"api_key": key, "organizations": [ORGANIZATION]})
        assert errors == ["workos.api_key: a WorkOS API key starts with sk_ (Dashboard > API Keys)"]
        assert "SECRETPART" not in str(errors)

    def test_an_unset_key_variable_is_the_one_problem(self) -> None:
        errors = errors_of({"api_key": "${WORKOS_API_KEY}", "organizations": [ORGANIZATION]})
        assert errors == ["workos.api_key: environment variable WORKOS_API_KEY is not set"]

    @pytest.mark.parametrize(("sink", "kind"), [("splunk", "splunk_hec"), ("dd", "datadog")])
    def test_a_sink_that_cannot_store_files_names_its_path(self, sink: str, kind: str) -> None:
        errors = errors_of(
            {"api_key": API_KEY, "organizations": [ORGANIZATION], "export": {"sinks": ["archive", sink]}}
        )
        assert errors == [
            f"workos.export.sinks[1]: sink {sink!r} (type {kind}) cannot store files; use a sink of type s3 or file"
        ]

    def test_an_undefined_export_sink(self) -> None:
        errors = errors_of({"api_key": API_KEY, "organizations": [ORGANIZATION], "export": {"sinks": ["nope"]}})
        assert errors == ["workos.export.sinks[0]: sink 'nope' is not defined under sinks"]

    @pytest.mark.parametrize(
        ("workos", "expected"),
        [
            ({"organizations": ["acme"]}, "workos.organizations[0]: not a WorkOS organization id"),
            ({"organizations": []}, "workos.organizations: needs at least 1 entry, not 0"),
            ({"organizations": [ORGANIZATION, ORGANIZATION]}, "workos.organizations: [1]"),
            (
                {"export": {"sinks": ["archive"], "first_range": "91d"}},
                "workos.export.first_range: must be at most 90d",
            ),
            ({"export": {"sinks": ["archive"], "every": "100d"}}, "workos.export.every: must be at most 90d"),
            ({"export": {"sinks": []}}, "workos.export.sinks: needs at least 1 entry, not 0"),
            ({"watch": {"every": "1s"}}, "workos.watch.every: Input should be greater than or equal to 10"),
            ({"base_url": "ftp://x"}, "workos.base_url: String should match pattern"),
            ({"extra": 1}, "workos.extra: unknown key"),
        ],
    )
    def test_rejects(self, workos: dict[str, Any], expected: str) -> None:
        errors = errors_of({"api_key": API_KEY, "organizations": [ORGANIZATION], **workos})
        assert any(error.startswith(expected) for error in errors), errors


class TestStreamState:
    @pytest.mark.parametrize("state", ["active", "inactive", "error", "invalid"])
    async def test_each_state_through_the_sdk_into_the_metrics(self, workos_fake: FakeWorkOS, state: str) -> None:
        workos_fake.organizations[ORGANIZATION] = stream(state, last_synced_at="2024-01-15T10:30:00.000Z")
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        try:
            await StreamWatch(_config(workos_fake), api, metrics).check_all()
        finally:
            await api.close()
        for each in ("active", "inactive", "error", "invalid"):
            value = sample(
                metrics, "log_bridge_workos_stream_state", organization=ORGANIZATION, type="GenericHttps", state=each
            )
            assert value == (1.0 if each == state else 0.0)
        synced = sample(metrics, "log_bridge_workos_stream_last_synced_timestamp_seconds", organization=ORGANIZATION)
        assert synced == 1705314600.0

    async def test_a_change_of_state_is_logged_once_with_what_to_check(
        self, workos_fake: FakeWorkOS, caplog: pytest.LogCaptureFixture
    ) -> None:
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        watch = StreamWatch(_config(workos_fake), api, metrics)
        caplog.set_level(logging.INFO, logger="receiver.workos")
        try:
            await watch.check_all()
            workos_fake.organizations[ORGANIZATION] = stream("invalid")
            await watch.check_all()
            await watch.check_all()
            workos_fake.organizations[ORGANIZATION] = stream("error")
            await watch.check_all()
        finally:
            await api.close()
        lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "receiver.workos"]
        assert [level for level, _ in lines] == ["INFO", "WARNING", "WARNING"]
        assert "auth header must equal one of the stream's auth.values" in lines[1][1]
        assert "reachable from WorkOS's egress addresses" in lines[2][1]

    async def test_a_state_the_sdk_does_not_know_is_not_left_at_1_after_it_passes(
        self, workos_fake: FakeWorkOS
    ) -> None:
        """The SDK passes a state it does not list through (its enum's _missing_): it gets a series of its own,
        which must say 0 once the stream is in another state, or two states read 1 at once."""
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        watch = StreamWatch(_config(workos_fake), api, metrics)
        labels = {"organization": ORGANIZATION, "type": "GenericHttps"}
        try:
            workos_fake.organizations[ORGANIZATION] = stream("paused")
            await watch.check_all()
            assert sample(metrics, "log_bridge_workos_stream_state", **labels, state="paused") == 1
            assert sample(metrics, "log_bridge_workos_stream_state", **labels, state="active") == 0
            workos_fake.organizations[ORGANIZATION] = stream("active")
            await watch.check_all()
        finally:
            await api.close()
        assert sample(metrics, "log_bridge_workos_stream_state", **labels, state="active") == 1
        assert sample(metrics, "log_bridge_workos_stream_state", **labels, state="paused") in (0, None)

    async def test_a_stream_that_goes_away_leaves_no_stale_series(self, workos_fake: FakeWorkOS) -> None:
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        watch = StreamWatch(_config(workos_fake), api, metrics)
        labels = {"organization": ORGANIZATION, "type": "GenericHttps", "state": "active"}
        try:
            await watch.check_all()
            assert sample(metrics, "log_bridge_workos_stream_state", **labels) == 1
            workos_fake.organizations[ORGANIZATION] = stream("active", type_="Splunk")
            await watch.check_all()
            assert sample(metrics, "log_bridge_workos_stream_state", **labels) is None
            assert sample(metrics, "log_bridge_workos_stream_state", **{**labels, "type": "Splunk"}) == 1
            workos_fake.organizations[ORGANIZATION] = None
            await watch.check_all()
        finally:
            await api.close()
        assert sample(metrics, "log_bridge_workos_stream_state", **{**labels, "type": "Splunk"}) is None
        assert (
            sample(metrics, "log_bridge_workos_stream_last_synced_timestamp_seconds", organization=ORGANIZATION) is None
        )

    async def test_the_time_of_the_last_read_tells_a_stale_state(self, workos_fake: FakeWorkOS) -> None:
        """While WorkOS cannot be asked, stream_state keeps the last state read; the read time shows its age."""
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        watch = StreamWatch(_config(workos_fake), api, metrics)
        checked = "log_bridge_workos_stream_checked_timestamp_seconds"
        try:
            before = time.time()
            await watch.check_all()
            first = sample(metrics, checked, organization=ORGANIZATION)
            assert first is not None and before <= first <= time.time()
            workos_fake.fail("configuration", 503, times=4)
            await watch.check_all()
            assert sample(metrics, checked, organization=ORGANIZATION) == first
            labels = {"organization": ORGANIZATION, "type": "GenericHttps", "state": "active"}
            assert sample(metrics, "log_bridge_workos_stream_state", **labels) == 1  # the last state read
            await watch.check_all()  # WorkOS answers again
            later = sample(metrics, checked, organization=ORGANIZATION)
            assert later is not None and later > first
        finally:
            await api.close()

    def test_a_watch_that_never_reads_shows_as_unread_since_its_start(self) -> None:
        metrics = new_metrics()
        checked = "log_bridge_workos_stream_checked_timestamp_seconds"
        before = time.time()
        metrics.watching([ORGANIZATION, "org_2"])
        started = sample(metrics, checked, organization="org_2")
        assert started is not None and before <= started <= time.time()
        metrics.stream_checked.labels(ORGANIZATION).set(1.0)  # read once, long ago
        metrics.watching([ORGANIZATION])  # a reload: the time of the last read stays, org_2's series go
        assert sample(metrics, checked, organization=ORGANIZATION) == 1.0
        assert sample(metrics, checked, organization="org_2") is None

    async def test_no_stream_and_other_destinations_are_reported_not_errors(
        self, workos_fake: FakeWorkOS, caplog: pytest.LogCaptureFixture
    ) -> None:
        workos_fake.organizations["org_2"] = None
        workos_fake.organizations["org_3"] = stream("error", type_="Datadog")
        metrics = new_metrics()
        api = api_for(workos_fake, metrics, organizations=["org_2", "org_3"])
        caplog.set_level(logging.INFO, logger="receiver.workos")
        try:
            none = await stream_status(api, "org_2")
            datadog = await stream_status(api, "org_3")
            await StreamWatch(_config(workos_fake, organizations=["org_2", "org_3"]), api, metrics).check_all()
        finally:
            await api.close()
        assert none.stream_type is None and none.state is None and "no log stream" in none.advice()
        assert datadog.stream_type == "Datadog" and "not to an HTTPS endpoint" in datadog.advice()
        assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "receiver.workos")
        assert (
            sample(metrics, "log_bridge_workos_stream_state", organization="org_2", type="GenericHttps", state="active")
            is None
        )
        assert (
            sample(
                metrics,
                "log_bridge_workos_api_errors_total",
                operation="get_audit_log_configuration",
                reason="not_found",
            )
            is None
        )


def _config(fake: FakeWorkOS, **changes: Any) -> WorkosConfig:
    return WorkosConfig(**{"api_key": API_KEY, "base_url": fake.url, "organizations": [ORGANIZATION], **changes})


class TestApiFailures:
    async def test_a_wrong_key_is_401_unauthorized_not_retried(self, workos_fake: FakeWorkOS) -> None:
        metrics = new_metrics()
        api = api_for(workos_fake, metrics, api_key="sk_test_wrongwrongwrong")
        try:
            with pytest.raises(WorkosApiError) as caught:
                await stream_status(api, ORGANIZATION)
        finally:
            await api.close()
        assert caught.value.reason == "unauthorized" and "check workos.api_key" in str(caught.value)
        assert workos_fake.count("GET", "/organizations/") == 1
        labels = {"operation": "get_audit_log_configuration", "reason": "unauthorized"}
        assert sample(metrics, "log_bridge_workos_api_errors_total", **labels) == 1

    async def test_an_unknown_organization_is_404(self, workos_fake: FakeWorkOS) -> None:
        api = api_for(workos_fake)
        try:
            with pytest.raises(WorkosApiError) as caught:
                await stream_status(api, "org_unknown")
        finally:
            await api.close()
        assert caught.value.reason == "not_found" and "Organization not found" in str(caught.value)

    async def test_429_waits_for_retry_after_and_is_counted(self, workos_fake: FakeWorkOS) -> None:
        workos_fake.fail("configuration", 429, retry_after="1")
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        started = time.monotonic()
        try:
            status = await stream_status(api, ORGANIZATION)
        finally:
            await api.close()
        assert status.state == "active"
        assert time.monotonic() - started >= 1.0
        assert workos_fake.count("GET", "/organizations/") == 2
        labels = {"operation": "get_audit_log_configuration", "reason": "rate_limited"}
        assert sample(metrics, "log_bridge_workos_api_errors_total", **labels) == 1

    async def test_500_is_retried_with_backoff_then_given_up(self, workos_fake: FakeWorkOS) -> None:
        workos_fake.fail("configuration", 500, times=2)
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        try:
            assert (await stream_status(api, ORGANIZATION)).state == "active"
            workos_fake.fail("configuration", 500, times=10)
            with pytest.raises(WorkosApiError) as caught:
                await stream_status(api, ORGANIZATION)
        finally:
            await api.close()
        assert caught.value.reason == "server_error"
        labels = {"operation": "get_audit_log_configuration", "reason": "server_error"}
        assert sample(metrics, "log_bridge_workos_api_errors_total", **labels) == 2 + 4
        assert workos_fake.count("GET", "/organizations/") == 3 + 4

    async def test_timeouts_and_connection_failures(self, workos_fake: FakeWorkOS) -> None:
        workos_fake.hang_seconds = 2.5
        api = api_for(workos_fake, timeout=1)
        try:
            with pytest.raises(WorkosApiError) as caught:
                await api.call(
                    "probe", lambda: api.client.organizations.get_audit_log_configuration(ORGANIZATION), attempts=1
                )
        finally:
            await api.close()
        assert caught.value.reason == "timeout"
        closed = WorkosApi(WorkosConfig(api_key=API_KEY, base_url="http://127.0.0.1:9", organizations=[ORGANIZATION]))
        try:
            with pytest.raises(WorkosApiError) as caught:
                await closed.call(
                    "probe", lambda: closed.client.organizations.get_audit_log_configuration("org_1"), attempts=1
                )
        finally:
            await closed.close()
        assert caught.value.reason == "connection"

    async def test_an_answer_that_trickles_is_a_timeout_of_the_whole_request(self, workos_fake: FakeWorkOS) -> None:
        """httpx's timeout is per read: a byte every 0.2 s would hold the call (and the watch) forever."""
        workos_fake.misbehave("configuration", "trickle")
        metrics = new_metrics()
        api = api_for(workos_fake, metrics, timeout=1)
        started = time.monotonic()
        try:
            with pytest.raises(WorkosApiError) as caught:
                request = lambda: api.client.organizations.get_audit_log_configuration(ORGANIZATION)  # noqa: E731
                await asyncio.wait_for(api.call("probe", request, attempts=1), 10)
        finally:
            await api.close()
        assert caught.value.reason == "timeout" and time.monotonic() - started < 5
        assert sample(metrics, "log_bridge_workos_api_errors_total", operation="probe", reason="timeout") == 1

    async def test_an_answer_that_never_ends_is_refused_in_bounded_memory(self, workos_fake: FakeWorkOS) -> None:
        workos_fake.misbehave("configuration", "endless")
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        tracemalloc.start()
        try:
            with pytest.raises(WorkosApiError) as caught:
                await asyncio.wait_for(stream_status(api, ORGANIZATION), 3)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            await api.close()
        assert caught.value.reason == "bad_response" and peak < 16 * 2**20, peak
        assert workos_fake.count("GET", "/organizations/") == 1  # not retried
        labels = {"operation": "get_audit_log_configuration", "reason": "bad_response"}
        assert sample(metrics, "log_bridge_workos_api_errors_total", **labels) == 1

    async def test_an_empty_answer_is_a_counted_bad_response(
        self, workos_fake: FakeWorkOS, caplog: pytest.LogCaptureFixture
    ) -> None:
        workos_fake.misbehave("configuration", "empty", times=2)
        workos_fake.misbehave("create_export", "empty")
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        caplog.set_level(logging.INFO, logger="receiver.workos")
        exporter = Exporter(api, timeout=10, max_bytes=1 << 20, poll_initial=0.01)
        try:
            with pytest.raises(WorkosApiError) as caught:
                await stream_status(api, ORGANIZATION)
            await StreamWatch(_config(workos_fake), api, metrics).check_all()
            with pytest.raises(WorkosApiError) as created:
                await exporter.create(ORGANIZATION, 1_700_000_000, 1_700_086_400, Filters())
        finally:
            await exporter.close()
            await api.close()
        assert caught.value.reason == created.value.reason == "bad_response"
        assert "no JSON body" in str(caught.value)
        labels = {"operation": "get_audit_log_configuration", "reason": "bad_response"}
        assert sample(metrics, "log_bridge_workos_api_errors_total", **labels) == 2
        lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "receiver.workos"]
        assert lines == [("WARNING", "cannot read the organization's log stream state")]


class TestExport:
    async def test_pending_then_ready_after_n_polls_then_the_bytes(self, workos_fake: FakeWorkOS) -> None:
        workos_fake.polls_until_ready = 3
        api = api_for(workos_fake)
        exporter = Exporter(api, timeout=10, max_bytes=1 << 20, poll_initial=0.01)
        try:
            export_id, _ = await exporter.create(ORGANIZATION, 1_700_000_000, 1_700_086_400, Filters(("user.*",)))
            url = await exporter.wait_ready(export_id)
            data = await exporter.download(export_id, url)
        finally:
            await exporter.close()
            await api.close()
        export = workos_fake.exports[export_id]
        assert export.polls == 3 and export.state == "ready"
        assert (export.range_start, export.range_end) == ("2023-11-14T22:13:20.000Z", "2023-11-15T22:13:20.000Z")
        assert export.filters == {"actions": ["user.*"]}
        assert workos_fake.served == [(export_id, data)] and data == export.data
        downloads = [auth for method, path, auth in workos_fake.requests if path.startswith("/downloads/")]
        assert downloads == [None]  # the API key never goes to the file's host

    async def test_an_export_in_error(self, workos_fake: FakeWorkOS) -> None:
        workos_fake.failing_exports.add(ORGANIZATION)
        api = api_for(workos_fake)
        exporter = Exporter(api, timeout=10, max_bytes=1 << 20, poll_initial=0.01)
        try:
            export_id, _ = await exporter.create(ORGANIZATION, 1_700_000_000, 1_700_086_400, Filters())
            with pytest.raises(ExportFailed) as caught:
                await exporter.wait_ready(export_id)
        finally:
            await exporter.close()
            await api.close()
        assert caught.value.result == "error"

    async def test_a_url_answers_403_after_its_first_use(self, workos_fake: FakeWorkOS) -> None:
        workos_fake.polls_until_ready = 1
        api = api_for(workos_fake)
        exporter = Exporter(api, timeout=10, max_bytes=1 << 20, poll_initial=0.01)
        try:
            export_id, _ = await exporter.create(ORGANIZATION, 1_700_000_000, 1_700_086_400, Filters())
            url = await exporter.wait_ready(export_id)
            first = await exporter.download(export_id, url)
            async with aiohttp.ClientSession() as session, session.get(url) as again:
                assert again.status == 403
            gets = workos_fake.count("GET", "/audit_logs/exports/")
            # The same spent URL given to the exporter: it fetches a fresh one through get_export.
            second = await exporter.download(export_id, url)
        finally:
            await exporter.close()
            await api.close()
        assert first == second == workos_fake.exports[export_id].data
        assert workos_fake.count("GET", "/audit_logs/exports/") == gets + 1

    async def test_an_expired_url_is_fetched_again_and_gives_up_after_a_few(self, workos_fake: FakeWorkOS) -> None:
        workos_fake.polls_until_ready = 1
        workos_fake.expire_next_urls = 2
        api = api_for(workos_fake)
        exporter = Exporter(api, timeout=10, max_bytes=1 << 20, poll_initial=0.01)
        try:
            export_id, _ = await exporter.create(ORGANIZATION, 1_700_000_000, 1_700_086_400, Filters())
            url = await exporter.wait_ready(export_id)
            assert await exporter.download(export_id, url) == workos_fake.exports[export_id].data
            workos_fake.expire_next_urls = 100
            with pytest.raises(ExportFailed) as caught:
                await exporter.download(export_id, await exporter.wait_ready(export_id))
        finally:
            await exporter.close()
            await api.close()
        assert caught.value.result == "download_failed" and "403" in str(caught.value)

    async def test_the_size_cap_and_the_poll_timeout(self, workos_fake: FakeWorkOS) -> None:
        workos_fake.polls_until_ready = 1
        api = api_for(workos_fake)
        small = Exporter(api, timeout=10, max_bytes=100, poll_initial=0.01)
        try:
            export_id, _ = await small.create(ORGANIZATION, 1_700_000_000, 1_700_086_400, Filters())
            with pytest.raises(ExportFailed) as caught:
                await small.download(export_id, await small.wait_ready(export_id))
            assert caught.value.result == "too_large"
            workos_fake.polls_until_ready = 10_000
            slow, _ = await small.create(ORGANIZATION, 1_700_000_000, 1_700_086_400, Filters())
            small.timeout = 0.2
            with pytest.raises(ExportFailed) as caught:
                await small.wait_ready(slow)
            assert caught.value.result == "timeout"
        finally:
            await small.close()
            await api.close()


class TestPortalLink:
    async def test_generate_link(self, workos_fake: FakeWorkOS) -> None:
        api = api_for(workos_fake)
        try:
            found = await api.call(
                "generate_link",
                lambda: api.client.admin_portal.generate_link(organization=ORGANIZATION, intent="log_streams"),
            )
        finally:
            await api.close()
        assert found.link.startswith("https://setup.workos.test/portal/launch?secret=")


class TestNoSecretInLogs:
    async def test_the_key_is_in_no_log_line_and_no_error(
        self, workos_fake: FakeWorkOS, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        formatter = JsonFormatter()
        texts: list[str] = []
        workos_fake.fail("configuration", 500, times=2)
        workos_fake.fail("configuration", 429, retry_after="0")
        metrics = new_metrics()
        api = api_for(workos_fake, metrics)
        wrong_key = "sk_test_Wr0ngKeyThatMustNotLeak"
        wrong = api_for(workos_fake, metrics, api_key=wrong_key)
        try:
            await StreamWatch(_config(workos_fake), api, metrics).check_all()
            await StreamWatch(_config(workos_fake, api_key=wrong_key), wrong, metrics).check_all()
            for bad in (wrong, api):
                try:
                    await stream_status(bad, "org_missing")
                except WorkosApiError as exc:
                    texts.append(str(exc))
            exporter = Exporter(api, timeout=10, max_bytes=1 << 20, poll_initial=0.01)
            workos_fake.expire_next_urls = 1
            export_id, _ = await exporter.create(ORGANIZATION, 1_700_000_000, 1_700_086_400, Filters())
            await exporter.download(export_id, await exporter.wait_ready(export_id))
            await exporter.close()
        finally:
            await api.close()
            await wrong.close()
        texts += [formatter.format(record) for record in caplog.records]
        assert len(texts) > 5
        for text in texts:
            assert API_KEY not in text and wrong_key not in text and "Wr0ngKey" not in text


async def test_the_sdk_calls_do_not_block_the_event_loop(workos_fake: FakeWorkOS) -> None:
    """While WorkOS takes 1.5 s to answer, the loop keeps running other work."""
    workos_fake.hang_seconds = 1.5
    api = api_for(workos_fake)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        await stream_status(api, ORGANIZATION)
    finally:
        ticker.cancel()
        await api.close()
    assert ticks >= 20

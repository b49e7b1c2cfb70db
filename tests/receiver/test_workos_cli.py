"""`log-bridge workos status | export | portal-link`, `check` and `validate` with a workos section, against the
fake WorkOS API; and a running service whose WorkOS side fails while the intake and /readyz carry on."""

from __future__ import annotations

import asyncio
import http.server
import io
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from receiver.cli import main
from receiver.workos_export import iso
from tests.conftest import BASE_CONFIG, ORGANIZATION, TOKEN, StartService, merge
from tests.receiver.test_reload import running, wait_for
from tests.workos_fake import API_KEY, FakeWorkOS, stream

__all__ = ["running"]  # the fixture, from test_reload

DAY = 86400
MIDNIGHT = int(time.time()) // DAY * DAY
D1, D2 = iso(MIDNIGHT - 2 * DAY), iso(MIDNIGHT - DAY)
"""Two recent midnights (exports reach 90 days back)."""
EVENT = b'[{"event": {"id": "1", "action": "user.signed_in", "occurred_at": "2024-01-15T10:30:00Z"}, "keySuffix": "k"}]'


def write_config(tmp_path: Path, fake: FakeWorkOS, **workos: Any) -> str:
    tree = {
        "journal": {"path": str(tmp_path / "journal.db")},
        "streams": [{"name": "w", "path": "/w", "auth": {"values": ["s"]}, "sinks": ["archive"]}],
        "sinks": {"archive": {"type": "file", "path": str(tmp_path / "files" / "%Y-%m-%d.ndjson")}},
        "workos": {
            "api_key": API_KEY,
            "base_url": fake.url,
            "organizations": [ORGANIZATION],
            "export": {"sinks": ["archive"]},
            **workos,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


class TestStatus:
    def test_active_is_exit_0(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["workos", "status", "--config", write_config(tmp_path, workos_fake)]) == 0
        out = capsys.readouterr().out
        assert f"{ORGANIZATION}  GenericHttps  active  last synced 2024-01-15T10:30:00.000Z" in out

    @pytest.mark.parametrize("state", ["error", "invalid"])
    def test_a_broken_stream_is_exit_1_with_what_to_check(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str
    ) -> None:
        workos_fake.organizations[ORGANIZATION] = stream(state)
        assert main(["workos", "status", "--config", write_config(tmp_path, workos_fake)]) == 1
        out = capsys.readouterr().out
        assert f"GenericHttps  {state}  last synced never" in out
        assert ("auth.values" if state == "invalid" else "reachable") in out

    def test_no_stream_is_reported_not_an_error(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        workos_fake.organizations[ORGANIZATION] = None
        assert main(["workos", "status", "--config", write_config(tmp_path, workos_fake)]) == 0
        assert "no log stream" in capsys.readouterr().out

    def test_key_and_configuration_problems_are_exit_2(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        wrong = "sk_test_NotTheRightKey000"
        assert main(["workos", "status", "--config", write_config(tmp_path, workos_fake, api_key=wrong)]) == 2
        out = capsys.readouterr()
        assert "refused the API key (401)" in out.out and wrong not in out.out + out.err
        unknown = write_config(tmp_path, workos_fake, organizations=["org_nothere"])
        assert main(["workos", "status", "--config", unknown]) == 2
        assert "not found (404)" in capsys.readouterr().out
        bad = write_config(tmp_path, workos_fake, api_key="not-a-key")
        assert main(["workos", "status", "--config", bad]) == 2
        err = capsys.readouterr().err
        assert "workos.api_key: a WorkOS API key starts with sk_" in err and "not-a-key" not in err

    def test_without_a_workos_section(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "plain.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "streams": [{"name": "w", "path": "/w", "sinks": ["f"]}],
                    "sinks": {"f": {"type": "file", "path": str(tmp_path / "x")}},
                }
            )
        )
        assert main(["workos", "status", "--config", str(path)]) == 2
        assert "no workos: section" in capsys.readouterr().err

    def test_workos_unavailable_is_exit_3(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path, workos_fake, base_url="http://127.0.0.1:9")
        assert main(["workos", "status", "--config", config]) == 3
        assert "cannot connect" in capsys.readouterr().out

    @pytest.mark.parametrize("how", ["empty", "trickle"])
    def test_an_empty_or_trickling_answer_is_exit_3(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
    ) -> None:
        workos_fake.misbehave("configuration", how, times=4)
        config = write_config(tmp_path, workos_fake, timeout="1s")
        started = time.monotonic()
        assert main(["workos", "status", "--config", config]) == 3
        assert f"{ORGANIZATION}  cannot read: WorkOS get_audit_log_configuration: " in capsys.readouterr().out
        assert time.monotonic() - started < 20


class TestExport:
    def test_to_a_file_without_moving_the_schedule(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        workos_fake.polls_until_ready = 1
        output = tmp_path / "out.csv"
        code = main(
            [
                "workos", "export", "--config", write_config(tmp_path, workos_fake), "--organization", ORGANIZATION,
                "--from", D1, "--to", D2,
                "--action", "user.signed_in", "--action", "user.signed_out", "--output", str(output),
            ]
        )  # fmt: skip
        assert code == 0, capsys.readouterr()
        ((export_id, data),) = workos_fake.served
        assert output.read_bytes() == data
        export = workos_fake.exports[export_id]
        assert export.filters == {"actions": ["user.signed_in", "user.signed_out"]}
        assert (export.range_start, export.range_end) == (D1.replace("Z", ".000Z"), D2.replace("Z", ".000Z"))
        assert capsys.readouterr().err == ""  # no progress bar when stderr is not a terminal
        if (tmp_path / "journal.db").exists():
            conn = sqlite3.connect(tmp_path / "journal.db")
            try:
                tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
                rows = conn.execute("SELECT * FROM workos_exports").fetchall() if "workos_exports" in tables else []
            finally:
                conn.close()
            assert rows == []

    def test_through_the_export_sinks(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        workos_fake.polls_until_ready = 1
        code = main(
            [
                "workos", "export", "--config", write_config(tmp_path, workos_fake), "--organization", ORGANIZATION,
                "--from", D1, "--to", iso(MIDNIGHT - DAY - 12 * 3600),
            ]
        )  # fmt: skip
        assert code == 0
        name = f"exports/{ORGANIZATION}/{D1}_{iso(MIDNIGHT - DAY - 12 * 3600)}.csv"
        assert f"archive: {name}" in capsys.readouterr().out
        assert (tmp_path / "files" / name).read_bytes() == workos_fake.served[0][1]

    def test_a_range_not_settled_by_workos_s_clock_is_not_stored_under_the_schedule_s_name(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Was a defect: a range ending in the future (or within `settle` of WorkOS's now) was exported and stored
        through the export sinks under the name the schedule uses, though its export could not hold the events still
        to come: the schedule later wrote the whole range under the same name (a second content, which an Object
        Lock bucket keeps beside the first). To a file of one's own it is written, with a warning."""
        workos_fake.polls_until_ready = 1
        config = write_config(tmp_path, workos_fake)
        args = ["workos", "export", "-c", config, "--organization", ORGANIZATION, "--from", D2, "--to", iso(MIDNIGHT)]
        workos_fake.clock = lambda: MIDNIGHT + 600  # after the range's end, before it settled (15 minutes)
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"WorkOS made the export at {iso(MIDNIGHT + 600)}" in err and "not stored" in err
        assert workos_fake.served == [] and not (tmp_path / "files" / "exports").exists()
        output = tmp_path / "today.csv"
        assert main([*args, "--output", str(output)]) == 0
        assert output.read_bytes() == workos_fake.served[0][1]
        assert "warning: WorkOS made the export" in capsys.readouterr().err
        workos_fake.clock = lambda: MIDNIGHT + 901  # settled
        assert main(args) == 0
        assert (tmp_path / "files" / f"exports/{ORGANIZATION}/{D2}_{iso(MIDNIGHT)}.csv").exists()

    def test_a_download_cut_short_is_no_export(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # Was a defect: a file host answering without Content-Length or chunks (HTTP/1.0 framing: the body ends when
        # the connection does) that closed halfway had half the CSV stored as the whole export, exit 0.
        class HalfAFile(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/csv")
                self.end_headers()
                self.wfile.write(b'"id","action","occurred_at"\n"01HX1","user.signed_in","2024-01-15T10:30:00Z"\n"01H')

            def log_message(self, *args: Any) -> None:
                pass

        host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HalfAFile)
        threading.Thread(target=host.serve_forever, daemon=True).start()
        workos_fake.polls_until_ready = 1
        workos_fake.download_base = f"http://127.0.0.1:{host.server_address[1]}"
        output = tmp_path / "out.csv"
        try:
            code = main(
                [
                    "workos", "export", "--config", write_config(tmp_path, workos_fake),
                    "--organization", ORGANIZATION, "--from", D1, "--to", D2, "--output", str(output),
                ]
            )  # fmt: skip
        finally:
            host.shutdown()
            host.server_close()
        assert code == 1
        assert "with neither a Content-Length nor chunks" in capsys.readouterr().err
        assert not output.exists()

    @pytest.mark.parametrize(
        ("start", "end", "message"),
        [
            ("yesterday", D2, "--from: expected an ISO-8601 time"),
            (D2, D1, "--from must be before --to"),
            ("2020-01-01", "2020-01-02", "more than 90 days ago"),
        ],
    )
    def test_bad_times(
        self,
        workos_fake: FakeWorkOS,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        start: str,
        end: str,
        message: str,
    ) -> None:
        config = write_config(tmp_path, workos_fake)
        args = ["workos", "export", "-c", config, "--organization", ORGANIZATION, "--from", start, "--to", end]
        assert main(args) == 2
        assert message in capsys.readouterr().err
        assert not workos_fake.exports

    def test_an_export_in_error_is_exit_1(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        workos_fake.failing_exports.add(ORGANIZATION)
        workos_fake.polls_until_ready = 1
        config = write_config(tmp_path, workos_fake)
        output = str(tmp_path / "x.csv")
        args = [
            "workos",
            "export",
            "-c",
            config,
            "--organization",
            ORGANIZATION,
            "--from",
            D1,
            "--to",
            D2,
            "-o",
            output,
        ]
        assert main(args) == 1
        assert "as error" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()


class TestPortalLink:
    def test_prints_the_link(self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path, workos_fake)
        assert main(["workos", "portal-link", "-c", config, "--organization", ORGANIZATION]) == 0
        assert capsys.readouterr().out.startswith("https://setup.workos.test/portal/launch?secret=")

    def test_unknown_organization(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path, workos_fake)
        assert (
            main(["workos", "portal-link", "-c", config, "--organization", "org_nope", "--return-url", "https://x"])
            == 2
        )
        assert "not found" in capsys.readouterr().err


class TestCheck:
    def test_one_line_each(self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        workos_fake.organizations["org_2"] = None
        config = write_config(tmp_path, workos_fake, organizations=[ORGANIZATION, "org_2"])
        assert main(["check", "--config", config]) == 0
        out = capsys.readouterr().out
        assert "ok     workos api_key" in out
        assert "ok     workos API " in out and "accepts the API key" in out
        assert f"ok     workos {ORGANIZATION}  exists; GenericHttps stream, active" in out
        assert "ok     workos org_2 " in out and "no log stream" in out
        assert "4 of 4 workos check(s) passed" in out

    def test_a_refused_key_and_an_unknown_organization(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["check", "--config", write_config(tmp_path, workos_fake, api_key="sk_test_refused0000")]) == 1
        out = capsys.readouterr().out
        assert "FAILED workos API" in out and "refused the API key (401)" in out and "sk_test_refused0000" not in out
        config = write_config(tmp_path, workos_fake, organizations=[ORGANIZATION, "org_gone"])
        assert main(["check", "--config", config]) == 1
        out = capsys.readouterr().out
        assert "FAILED workos org_gone" in out and "not found" in out and "ok     workos API" in out

    def test_validate_summarises_the_section(
        self, workos_fake: FakeWorkOS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["validate", "--config", write_config(tmp_path, workos_fake)]) == 0
        assert "workos: 1 organization(s), watch every 300s, export every 86400s to archive" in capsys.readouterr().out


class TestService:
    async def test_a_failing_workos_api_never_touches_the_intake_or_readyz(
        self, workos_fake: FakeWorkOS, start_service: StartService, client: aiohttp.ClientSession, tmp_path: Path
    ) -> None:
        workos_fake.fail("configuration", 500, times=1000)
        workos_fake.fail("create_export", 500, times=1000)
        service = await start_service(
            {
                "sinks": {"files": {"type": "file", "path": str(tmp_path / "files" / "x.ndjson")}},
                "workos": {
                    "api_key": API_KEY,
                    "base_url": workos_fake.url,
                    "organizations": [ORGANIZATION],
                    "export": {"sinks": ["files"]},
                },
            }
        )
        for _ in range(100):
            if workos_fake.count("POST", "/audit_logs/exports") and workos_fake.count("GET", "/organizations/"):
                break
            await asyncio.sleep(0.05)
        async with client.get(f"{service.url}/readyz") as ready:
            assert ready.status == 200
        headers = {"Authorization": TOKEN, "Content-Type": "application/json"}
        async with client.post(f"{service.url}/workos", data=EVENT, headers=headers) as posted:
            assert posted.status == 200
        async with client.get(f"{service.url}/metrics") as metrics:
            text = await metrics.text()
        assert (
            'log_bridge_workos_api_errors_total{operation="get_audit_log_configuration",reason="server_error"}' in text
        )
        assert API_KEY not in text
        await service.stop()  # cancels the watch and the export in progress cleanly

    async def test_the_watch_state_is_in_metrics(
        self, workos_fake: FakeWorkOS, start_service: StartService, client: aiohttp.ClientSession
    ) -> None:
        workos_fake.organizations[ORGANIZATION] = stream("invalid")
        service = await start_service(
            {"workos": {"api_key": API_KEY, "base_url": workos_fake.url, "organizations": [ORGANIZATION]}}
        )
        line = (
            f'log_bridge_workos_stream_state{{organization="{ORGANIZATION}",state="invalid",type="GenericHttps"}} 1.0'
        )
        for _ in range(100):
            async with client.get(f"{service.url}/metrics") as metrics:
                text = await metrics.text()
            if line in text:
                break
            await asyncio.sleep(0.05)
        assert line in text
        assert (
            f'log_bridge_workos_stream_state{{organization="{ORGANIZATION}",state="active",type="GenericHttps"}} 0.0'
            in text
        )

    async def test_a_reload_leaves_no_series_of_an_organization_no_longer_watched(
        self, workos_fake: FakeWorkOS, running: Any
    ) -> None:
        """Gauges kept for an organization taken out of workos.organizations (or with the section) would keep
        its last state, and the alerts on it, alive until the process restarts."""
        workos_fake.organizations["org_other"] = stream("invalid", last_synced_at="2024-01-15T10:30:00.000Z")
        workos = {"api_key": API_KEY, "base_url": workos_fake.url, "organizations": [ORGANIZATION, "org_other"]}
        service, file = await running(merge(BASE_CONFIG, {"workos": workos}))
        registry = service.metrics.registry
        labels = {"organization": "org_other", "type": "GenericHttps", "state": "invalid"}
        checked = "log_bridge_workos_stream_checked_timestamp_seconds"
        await wait_for(lambda: registry.get_sample_value("log_bridge_workos_stream_state", labels) == 1)
        file.change({"workos": {"organizations": [ORGANIZATION]}})
        assert await service.reload()
        await wait_for(lambda: registry.get_sample_value(checked, {"organization": ORGANIZATION}) is not None)
        assert registry.get_sample_value("log_bridge_workos_stream_state", labels) is None
        assert registry.get_sample_value(checked, {"organization": "org_other"}) is None
        without = dict(file.tree)
        del without["workos"]
        file.write(without)
        assert await service.reload()
        text = scrape_text(registry)
        assert "log_bridge_workos_stream_state{" not in text and f"{checked}{{" not in text


def scrape_text(registry: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


class TerminalStream(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_export_shows_progress_on_a_terminal(
    workos_fake: FakeWorkOS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workos_fake.polls_until_ready = 2
    terminal = TerminalStream()
    monkeypatch.setattr(sys, "stderr", terminal)
    config = write_config(tmp_path, workos_fake)
    output = str(tmp_path / "out.csv")
    assert (
        main(["workos", "export", "-c", config, "--organization", ORGANIZATION, "--from", D1, "--to", D2, "-o", output])
        == 0
    )
    shown = terminal.getvalue()
    assert "\rwaiting for WorkOS to prepare the export ... 0s" in shown
    size = len(workos_fake.served[0][1])
    assert f"\rdownloading [{'#' * 30}] {size / 2**20:.1f} of {size / 2**20:.1f} MiB" in shown
    assert shown.endswith("\n")

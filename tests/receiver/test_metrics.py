"""`/metrics`: the Prometheus text, rendered off the event loop one render at a time, each after its request."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver.metrics import Exposition, Metrics, WorkosMetrics
from tests.conftest import TOKEN, StartService, scrape

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DOCS = Path(__file__).resolve().parents[2] / "docs"


class RenderSpy:
    """Wraps `Metrics.render` (before a service is built): which threads render, how many at once, and a pause
    in the first render so scrapes can arrive while it runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, first_takes: float = 0.0) -> None:
        self.threads: list[int] = []
        self.most_at_once = 0
        self.started = threading.Event()
        self._at_once = 0
        self._lock = threading.Lock()
        real = Metrics.render

        def render(metrics: Metrics) -> bytes:
            with self._lock:
                self.threads.append(threading.get_ident())
                self._at_once += 1
                self.most_at_once = max(self.most_at_once, self._at_once)
                first = len(self.threads) == 1
            self.started.set()
            try:
                if first:
                    time.sleep(first_takes)
                return real(metrics)
            finally:
                with self._lock:
                    self._at_once -= 1

        monkeypatch.setattr(Metrics, "render", render)


async def get_metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        return await response.text()


class TestMetricsEndpoint:
    async def test_scrapes_arriving_during_a_render_share_the_next_one_and_see_what_came_before(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spy = RenderSpy(monkeypatch, first_takes=0.3)
        service = await start_service()
        loop_thread = threading.get_ident()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            first = asyncio.create_task(get_metrics(session, service.url))
            while not spy.started.is_set():
                await asyncio.sleep(0.005)
            # While the first render runs: an element is dead-lettered, then 50 scrapes arrive.
            async with session.post(service.url + "/workos", data=b"[42]", headers={"Authorization": TOKEN}) as r:
                assert r.status == 200
            texts = await asyncio.gather(*(get_metrics(session, service.url) for _ in range(50)))
            await first
        assert len(spy.threads) == 2, f"{len(spy.threads)} renders for 51 scrapes"
        assert loop_thread not in spy.threads and spy.most_at_once == 1
        assert all(scrape(text, "log_bridge_events_dead_lettered_total", stage="intake") == 1.0 for text in texts)

    async def test_a_flood_of_scrapes_renders_off_the_loop_one_at_a_time(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spy = RenderSpy(monkeypatch)
        service = await start_service()
        loop_thread = threading.get_ident()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            texts = await asyncio.gather(*(get_metrics(session, service.url) for _ in range(200)))
        assert loop_thread not in spy.threads and spy.most_at_once == 1
        assert len(spy.threads) <= 20, f"{len(spy.threads)} renders for 200 scrapes"
        assert all({f.name for f in text_string_to_metric_families(text)} >= {"log_bridge_requests"} for text in texts)


class TestExposition:
    async def test_a_render_that_fails_after_every_scrape_gave_up_is_logged_once(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Was a defect: when a render raised after every scrape waiting for it had been cancelled, nothing
        read the exception it left on the shared future, and asyncio logged "Future exception was never
        retrieved" when the future was collected (noise, with no word of what failed). Now the failure is logged
        once, by the exposition, and nothing else."""
        release = threading.Event()

        def render() -> bytes:
            release.wait(5)
            raise RuntimeError("render failed")

        exposition = Exposition(render)
        scrape_task = asyncio.create_task(exposition.text())
        await asyncio.sleep(0.05)
        scrape_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await scrape_task
        release.set()
        while exposition._renderer is not None:
            await asyncio.sleep(0.01)
        del scrape_task
        gc.collect()
        await asyncio.sleep(0)
        messages = [record.getMessage() for record in caplog.records]
        assert not [m for m in messages if "never retrieved" in m], messages
        assert messages.count("metrics: the page could not be rendered") == 1, messages


class TestUnroutedRequests:
    """A sender posting to a path no stream has (a typo in the WorkOS endpoint) is seen: counted, without the
    path as a label (it is the client's to choose), and logged with it, a few lines a second."""

    async def test_counted_and_logged(self, start_service: StartService, caplog: pytest.LogCaptureFixture) -> None:
        service = await start_service()
        caplog.set_level("WARNING", logger="receiver.app")
        headers = {"Authorization": TOKEN, "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:
            for path in ("/workos/", "/work0s", "/workos"):
                async with session.post(service.url + path, data=b"[]", headers=headers) as response:
                    assert response.status == (200 if path == "/workos" else 404)
            text = await get_metrics(session, service.url)
        assert scrape(text, "log_bridge_requests_unrouted_total") == 2
        assert "path" not in {
            label
            for family in text_string_to_metric_families(text)
            for s in family.samples
            for label in s.labels
            if family.name == "log_bridge_requests_unrouted"
        }
        lines = [r for r in caplog.records if "no stream is configured" in r.getMessage()]
        assert [getattr(r, "path", None) for r in lines] == ["/workos/", "/work0s"]


class TestJournalDisk:
    async def test_the_journal_s_file_system_free_space_and_size(
        self, start_service: StartService, tmp_path: Path
    ) -> None:
        """What a filling-up alert reads: the free bytes and size of the file system the journal is on (here a
        12 MiB tmpfs), followed as something else fills it; NaN once it cannot be read."""
        from tests.receiver.test_unattended import small_disk

        with small_disk(tmp_path / "disk", "12m") as disk:
            service = await start_service({"journal": {"path": str(disk / "journal.db")}})
            async with aiohttp.ClientSession() as session:

                async def disk_bytes() -> tuple[float, float]:
                    async with session.get(service.url + "/metrics") as response:
                        text = await response.text()
                    return (
                        scrape(text, "log_bridge_journal_disk_free_bytes"),
                        scrape(text, "log_bridge_journal_disk_size_bytes"),
                    )

                free, size = await disk_bytes()
                assert size == 12 * 1024 * 1024
                stats = os.statvfs(disk)
                assert abs(free - stats.f_bavail * stats.f_frsize) <= 256 * 1024  # the journal may write meanwhile
                (disk / "filler").write_bytes(b"\1" * (3 * 1024 * 1024))
                later, size = await disk_bytes()
                assert 3 * 1024 * 1024 <= free - later <= 3.25 * 1024 * 1024 and size == 12 * 1024 * 1024
            await service.stop()
        shutil.rmtree(tmp_path / "disk")
        metrics = Metrics()
        metrics.watch_journal_disk(tmp_path / "disk")
        text = metrics.render().decode()
        assert math.isnan(scrape(text, "log_bridge_journal_disk_free_bytes"))
        assert math.isnan(scrape(text, "log_bridge_journal_disk_size_bytes"))

    async def test_through_a_symlinked_journal_path_the_file_system_the_journal_is_on(
        self, start_service: StartService, tmp_path: Path
    ) -> None:
        """Was a defect: the gauges read the file system of the directory `journal.path` names, though the journal
        (its database, its segments) lives beside the file a symlink there points at: a journal moved to a volume of
        its own by a symlink had the old volume's free space watched, and the filling-up alert never fired."""
        from tests.receiver.test_unattended import small_disk

        with small_disk(tmp_path / "disk", "12m") as disk:
            (tmp_path / "journal.db").symlink_to(disk / "journal.db")
            service = await start_service({"journal": {"path": str(tmp_path / "journal.db")}})
            async with aiohttp.ClientSession() as session, session.get(service.url + "/metrics") as response:
                text = await response.text()
            assert (disk / "journal.db.segments").is_dir()
            assert scrape(text, "log_bridge_journal_disk_size_bytes") == 12 * 1024 * 1024
            await service.stop()

    async def test_a_hung_file_system_leaves_the_scrape_answering(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Was a defect: the gauges called statvfs in the render, so a file system that never answers (a hard NFS
        mount whose server is gone) hung every /metrics scrape for ever. Now a scrape waits for it a second at most
        and shows NaN, only one read is outstanding however many scrapes come, and the gauges are back once the
        file system answers."""
        service = await start_service({"server": {"admin": {"port": 0}}})
        directory = service.journal.segments.directory
        answer = threading.Event()
        reads: list[Path] = []
        real = os.statvfs

        def statvfs(path: Path) -> os.statvfs_result:
            if Path(path) == directory:
                reads.append(directory)
                answer.wait()
            return real(path)

        monkeypatch.setattr(os, "statvfs", statvfs)
        async with aiohttp.ClientSession() as session:
            try:
                for _ in range(3):
                    async with asyncio.timeout(10):  # before: no answer at all
                        text = await get_metrics(session, service.admin_url)
                    assert math.isnan(scrape(text, "log_bridge_journal_disk_free_bytes") or 0.0)
                    assert math.isnan(scrape(text, "log_bridge_journal_disk_size_bytes") or 0.0)
                    assert scrape(text, "log_bridge_journal_max_bytes") == service.journal.max_bytes
                assert len(reads) == 1  # the first still hangs: no other was started
            finally:
                answer.set()
            for _ in range(10):  # the read that hung answers, then the next scrape reads afresh
                async with asyncio.timeout(10):
                    text = await get_metrics(session, service.admin_url)
                if not math.isnan(scrape(text, "log_bridge_journal_disk_size_bytes") or 0.0):
                    break
        stats = real(directory)
        assert scrape(text, "log_bridge_journal_disk_size_bytes") == stats.f_blocks * stats.f_frsize
        assert (scrape(text, "log_bridge_journal_disk_free_bytes") or 0.0) > 0

    async def test_one_scrape_reads_the_file_system_once(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Was a defect: each of the two gauges called statvfs itself, two system calls a scrape (and two hung
        threads on a volume that does not answer)."""
        service = await start_service()
        directory = service.journal.segments.directory
        reads: list[Path] = []
        real = os.statvfs

        def statvfs(path: Path) -> os.statvfs_result:
            reads.append(Path(path))
            return real(path)

        monkeypatch.setattr(os, "statvfs", statvfs)
        async with aiohttp.ClientSession() as session:
            text = await get_metrics(session, service.url)
        assert reads.count(directory) == 1
        stats = real(directory)
        assert scrape(text, "log_bridge_journal_disk_size_bytes") == stats.f_blocks * stats.f_frsize


def documented_metrics() -> list[tuple[str, str, set[str]]]:
    """(page, metric, labels) of every row of the metric tables in docs/configuration.md and docs/monitoring.md
    (a row may name two metrics; a label's values in parentheses are left out)."""
    rows: list[tuple[str, str, set[str]]] = []
    row = re.compile(r"^\|\s*`(log_bridge_[a-z_]+)`(?:,\s*`(log_bridge_[a-z_]+)`)?\s*\|([^|]*)\|")
    for page in ("configuration.md", "monitoring.md"):
        for line in (DOCS / page).read_text().splitlines():
            if match := row.match(line):
                labels = set(re.findall(r"[a-z_]+", re.sub(r"\(.*?\)", "", match.group(3))))
                rows += [(page, name, labels) for name in match.group(1, 2) if name]
    return rows


class TestDocumentedMetrics:
    """What users read in the reference tables and alert on is what the service exports."""

    def test_every_metric_the_docs_name_is_exported_with_the_labels_they_give(self) -> None:
        metrics = Metrics()
        WorkosMetrics(metrics.registry)
        metrics.watch_tls(lambda: 0.0, ())
        exported = {
            getattr(collector, "_name", ""): set(getattr(collector, "_labelnames", ()))
            for collector in metrics.registry._collector_to_names
        }
        rows = documented_metrics()
        assert len(rows) > 40
        wrong = [
            (page, name, labels, exported.get(name.removesuffix("_total")))
            for page, name, labels in rows
            if exported.get(name.removesuffix("_total")) != labels
        ]
        assert not wrong

    def test_help_texts_say_what_the_series_count(self) -> None:
        """Were defects: the backlog's help said "journal rows the sink has not passed yet", where it counts the
        events the sink still has to deliver, read and in flight included (docs/configuration.md), and the refused
        connections' help said the cap "was open" where it was reached, the journal's bytes were "compressed" where
        the first 32 MiB of a backlog are stored as received, and the event loop's errors left out the unraisable
        exceptions they count."""
        text = Metrics().render().decode()
        helps = dict(line.split(" ", 3)[2:] for line in text.splitlines() if line.startswith("# HELP "))
        assert helps["log_bridge_sink_backlog_events"].startswith("Events the sink still has to deliver")
        assert "because the listener's cap was reached" in helps["log_bridge_connections_refused_total"]
        assert "compressed past the first 32 MiB of a backlog" in helps["log_bridge_journal_bytes"]
        assert "sys.unraisablehook" in helps["log_bridge_event_loop_errors_total"]

"""The scheduled export archive against the fake WorkOS API, with file sinks and a controllable clock: the first
range, one range per period, catch-up after downtime, a restart in the middle of an export, a failing sink,
WorkOS's 90-day reach, a local clock ahead of or behind WorkOS's, and no duplicate or missing range (checked by the
stored file names)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from receiver.config import WorkosConfig
from receiver.journal import connect
from receiver.workos import WorkosApi
from receiver.workos_export import ExportSchedule, ExportState, OrgState, iso, plan_range
from sinks.file import FileSink
from tests.conftest import ORGANIZATION
from tests.receiver.test_workos import Metrics
from tests.workos_fake import API_KEY, FakeWorkOS

HOUR = 3600
DAY = 24 * HOUR
T0 = 1_760_000_000 - 1_760_000_000 % DAY  # a midnight; the tests' "now" is T0 + 15 minutes (the settle time)
FIRST = T0 + 900 - DAY
"""Where the first range starts: now - first_range (it ends at now - settle = T0)."""


class Clock:
    """Time that moves only when told."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def workos_config(fake: FakeWorkOS, **export: Any) -> WorkosConfig:
    return WorkosConfig(
        api_key=API_KEY,
        base_url=fake.url,
        organizations=[ORGANIZATION],
        export={"every": "24h", "first_range": "24h", "settle": "15m", "sinks": ["a", "b"], **export},
    )


class Setup:
    """A schedule over two file sinks `a` and `b` under tmp_path, its state in tmp_path/journal.db."""

    def __init__(self, fake: FakeWorkOS, tmp_path: Path, clock: Clock, **export: Any) -> None:
        self.fake = fake
        self.tmp = tmp_path
        self.clock = clock
        fake.clock = clock  # WorkOS's clock agrees with the bridge's unless a test sets it apart
        self.config = workos_config(fake, **export)
        self.metrics = Metrics()
        self.state = ExportState(tmp_path / "journal.db")
        self.sinks = {
            name: FileSink(name, FileSink.Config(path=str(tmp_path / name / "events-%Y-%m-%d.ndjson")))
            for name in ("a", "b")
        }
        self.api = WorkosApi(self.config, self.metrics, backoff=0.01)
        self.schedule = self.new_schedule()

    def new_schedule(self) -> ExportSchedule:
        return ExportSchedule(
            self.config, self.api, self.state, self.sinks, self.metrics, clock=self.clock, poll_initial=0.01
        )

    def stored(self, sink: str = "a") -> list[str]:
        folder = self.tmp / sink / "exports" / ORGANIZATION
        return sorted(path.name for path in folder.glob("*.csv")) if folder.exists() else []

    def ranges(self, sink: str = "a") -> list[tuple[str, str]]:
        return [tuple(name.removesuffix(".csv").split("_")) for name in self.stored(sink)]  # type: ignore[misc]

    def contents(self, sink: str = "a") -> bytes:
        return b"".join((self.tmp / sink / "exports" / ORGANIZATION / name).read_bytes() for name in self.stored(sink))

    def result(self, result: str) -> float:
        return self.metrics.value("log_bridge_workos_exports_total", organization=ORGANIZATION, result=result) or 0.0

    async def close(self) -> None:
        await self.schedule.close()
        await self.api.close()


@pytest.fixture
async def setup(workos_fake: FakeWorkOS, tmp_path: Path) -> Any:
    workos_fake.polls_until_ready = 2
    made: list[Setup] = []

    def make(now: float = T0 + 900, **export: Any) -> Setup:
        made.append(Setup(workos_fake, tmp_path, Clock(now), **export))
        return made[-1]

    yield make
    for each in made:
        await each.close()


def assert_contiguous(ranges: list[tuple[str, str]]) -> None:
    """Each range starts where the one before ended: nothing twice, nothing missing."""
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert start == end, ranges


class TestPlan:
    def test_the_first_range_then_one_per_period(self, workos_fake: FakeWorkOS) -> None:
        export = workos_config(workos_fake).export
        assert export is not None
        now = T0 + 900
        assert plan_range(OrgState(), now, export) == ((FIRST, T0), None)
        assert plan_range(OrgState(archived_end=T0), now + DAY - 1, export) == (None, None)
        assert plan_range(OrgState(archived_end=T0), now + DAY, export) == ((T0, T0 + DAY), None)
        # A pending range is resumed with its own bounds, whatever the time.
        assert plan_range(OrgState(archived_end=T0, pending=(T0, T0 + 7)), now + 5 * DAY, export) == (
            (T0, T0 + 7),
            None,
        )

    def test_never_older_than_90_days(self, workos_fake: FakeWorkOS) -> None:
        export = workos_config(workos_fake).export
        assert export is not None
        now = T0 + 900
        plan, lost = plan_range(OrgState(archived_end=T0 - 100 * DAY), now, export)
        assert plan is not None and lost == (T0 - 100 * DAY, plan[0])
        assert plan[0] >= now - 90 * DAY and plan[1] - plan[0] == DAY


class TestSchedule:
    async def test_the_first_range_is_stored_by_every_sink_as_downloaded(self, setup: Any) -> None:
        s = setup()
        wait = await s.schedule.run_due()
        name = f"{iso(FIRST)}_{iso(T0)}.csv"
        assert s.stored("a") == s.stored("b") == [name]
        ((export_id, data),) = s.fake.served
        for sink in ("a", "b"):
            assert (s.tmp / sink / "exports" / ORGANIZATION / name).read_bytes() == data
        assert s.fake.exports[export_id].range_start == iso(FIRST).replace("Z", ".000Z")
        assert (await s.state.get(ORGANIZATION)) == OrgState(archived_end=T0)
        assert s.result("archived") == 1
        assert s.metrics.value(
            "log_bridge_workos_export_archived_until_timestamp_seconds", organization=ORGANIZATION
        ) == float(T0)
        assert s.metrics.value("log_bridge_workos_export_stored_bytes_total", sink="b") == len(data)
        assert (
            s.metrics.value("log_bridge_workos_export_last_success_timestamp_seconds", organization=ORGANIZATION) or 0
        ) > 0
        assert wait == pytest.approx(DAY)  # the next range is due one period later

    async def test_one_export_per_period(self, setup: Any) -> None:
        s = setup()
        await s.schedule.run_due()
        s.clock.now += DAY - 60
        await s.schedule.run_due()
        assert len(s.fake.exports) == 1
        s.clock.now += 60
        await s.schedule.run_due()
        assert s.ranges() == [(iso(FIRST), iso(T0)), (iso(T0), iso(T0 + DAY))]

    async def test_catch_up_after_downtime_in_ranges_of_at_most_every(self, setup: Any) -> None:
        s = setup()
        await s.schedule.run_due()
        await s.close()
        # Down for three and a half days; a new process starts.
        s = setup(now=T0 + 900 + 3 * DAY + 12 * HOUR)
        await s.schedule.run_due()
        ranges = s.ranges()
        assert ranges == [(iso(FIRST), iso(T0))] + [(iso(T0 + k * DAY), iso(T0 + (k + 1) * DAY)) for k in range(3)]
        assert_contiguous(ranges)
        assert s.stored("a") == s.stored("b")
        assert len(s.fake.exports) == 4

    async def test_a_restarted_process_reports_where_the_archive_stands(self, setup: Any) -> None:
        """A new process has nothing due for up to a period: the gauge must not wait for its next archive."""
        s = setup()
        await s.schedule.run_due()
        await s.close()
        s = setup(now=T0 + 900 + HOUR)  # a new process, its own metrics
        await s.schedule.run_due()
        assert len(s.fake.exports) == 1
        until = s.metrics.value("log_bridge_workos_export_archived_until_timestamp_seconds", organization=ORGANIZATION)
        assert until == float(T0)

    async def test_a_restart_in_the_middle_of_an_export_resumes_it(self, setup: Any) -> None:
        s = setup()
        s.fake.polls_until_ready = 1000
        running = asyncio.create_task(s.schedule.run_due())
        while not s.fake.exports or next(iter(s.fake.exports.values())).polls < 2:
            await asyncio.sleep(0.01)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert s.stored() == []
        pending = await s.state.get(ORGANIZATION)
        assert pending.pending == (FIRST, T0) and pending.pending_export in s.fake.exports
        # The next process starts two hours later: the same export, the same range, the same name.
        s.fake.polls_until_ready = 1
        s.clock.now += 2 * HOUR
        await s.schedule.close()
        s.schedule = s.new_schedule()
        await s.schedule.run_due()
        assert len(s.fake.exports) == 1 and s.fake.count("POST", "/audit_logs/exports") == 1
        assert s.stored("a") == s.stored("b") == [f"{iso(FIRST)}_{iso(T0)}.csv"]
        assert (await s.state.get(ORGANIZATION)) == OrgState(archived_end=T0)

    async def test_a_failing_sink_stores_nothing_and_the_range_is_retried(self, setup: Any) -> None:
        s = setup()
        (s.tmp / "b").write_text("a file where sink b's directory should be")
        wait = await s.schedule.run_due()
        assert s.stored("a") == [f"{iso(FIRST)}_{iso(T0)}.csv"]
        assert not (s.tmp / "b").is_dir()
        assert s.result("sink_failed") == 1 and s.result("archived") == 0
        assert (await s.state.get(ORGANIZATION)).archived_end is None
        assert wait == pytest.approx(60)
        await s.schedule.run_due()  # not before the retry time
        assert s.result("sink_failed") == 1
        (s.tmp / "b").unlink()
        s.clock.now += 61
        await s.schedule.run_due()
        assert s.stored("a") == s.stored("b") == [f"{iso(FIRST)}_{iso(T0)}.csv"]
        assert s.result("archived") == 1
        # The retry used the same WorkOS export (a fresh URL), and b got the bytes a got.
        assert s.fake.count("POST", "/audit_logs/exports") == 1
        name = s.stored("a")[0]
        assert (s.tmp / "a" / "exports" / ORGANIZATION / name).read_bytes() == (
            s.tmp / "b" / "exports" / ORGANIZATION / name
        ).read_bytes()

    async def test_a_sink_that_stored_the_range_is_not_given_another_export_of_it(self, setup: Any) -> None:
        """Was a defect: sink a stored the range, sink b failed, and the export expired before b was back; the
        retry's new export (another file: WorkOS makes it anew) was stored through every sink, so a's file was
        written a second time with other bytes (on an Object Lock bucket, two versions under one name)."""
        s = setup()
        (s.tmp / "b").write_text("a file where sink b's directory should be")
        await s.schedule.run_due()
        first = s.contents("a")
        assert s.result("sink_failed") == 1 and s.stored("b") == [] and first
        ((expired, _),) = s.fake.served
        s.fake.exports[expired].state = "expired"
        s.clock.now += 61
        await s.schedule.run_due()
        assert s.result("expired") == 1
        (s.tmp / "b").unlink()
        s.clock.now += 121
        await s.schedule.run_due()
        assert s.result("archived") == 1 and s.stored("a") == s.stored("b") == [f"{iso(FIRST)}_{iso(T0)}.csv"]
        (_, second), *_ = [served for served in s.fake.served if served[0] != expired]
        assert s.contents("a") == first and s.contents("b") == second != first
        assert (await s.state.get(ORGANIZATION)) == OrgState(archived_end=T0)

    async def test_a_table_without_the_stored_sinks_column_gets_it(self, setup: Any) -> None:
        """A pending range an earlier version left (its table without `pending_stored`) is resumed."""
        s = setup()
        conn = connect(s.tmp / "journal.db")  # a journal's database, as that version left it
        conn.execute(
            "CREATE TABLE workos_exports (organization TEXT PRIMARY KEY, archived_end INTEGER, pending_start INTEGER,"
            " pending_end INTEGER, pending_export TEXT, updated_at REAL NOT NULL)"
        )
        conn.execute("INSERT INTO workos_exports VALUES (?, NULL, ?, ?, NULL, 0)", (ORGANIZATION, FIRST, T0))
        conn.close()
        await s.schedule.run_due()
        assert s.stored("a") == s.stored("b") == [f"{iso(FIRST)}_{iso(T0)}.csv"]
        assert (await s.state.get(ORGANIZATION)) == OrgState(archived_end=T0)

    async def test_an_export_in_error_is_counted_and_retried_with_a_new_export(self, setup: Any) -> None:
        s = setup()
        s.fake.failing_exports.add(ORGANIZATION)
        await s.schedule.run_due()
        assert s.result("error") == 1 and s.stored() == []
        s.fake.failing_exports.clear()
        s.clock.now += 61
        await s.schedule.run_due()
        assert s.result("archived") == 1 and len(s.stored()) == 1
        assert s.fake.count("POST", "/audit_logs/exports") == 2

    async def test_a_retry_is_not_put_off_by_a_clock_stepped_back(self, setup: Any) -> None:
        """Was a defect: a failure just before the clock was stepped back a day (it ran ahead, NTP set it right)
        put the retry a day away: every look skipped it until the clock caught up."""
        s = setup(now=T0 + 900 + DAY)
        s.fake.clock = lambda: T0 + 900 + 61  # WorkOS's clock is right all along
        await s.state.archived(ORGANIZATION, T0 - DAY)  # so the range due, [T0 - DAY, T0], has settled there
        s.fake.failing_exports.add(ORGANIZATION)
        await s.schedule.run_due()
        assert s.result("error") == 1
        s.fake.failing_exports.clear()
        s.clock.now = T0 + 900 + 61  # stepped back a day, then past the first retry's wait
        await s.schedule.run_due()
        assert s.result("archived") == 1 and s.ranges() == [(iso(T0 - DAY), iso(T0))]

    async def test_a_local_clock_ahead_of_workos_archives_no_range_before_it_settled_there(
        self, setup: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Was a defect: with the local clock an hour ahead of WorkOS's, the first range ended 45 minutes in WorkOS's
        future; its export could not hold the events still to come in it, yet it was stored and the range marked
        archived, so those events were in no file (the next range starts after it)."""
        s = setup()
        s.fake.clock = lambda: s.clock.now - HOUR
        s.fake.events.append((T0 - 600, "01HXLATEEVENT"))  # inside the range, after WorkOS's "now" at the first try
        caplog.set_level(logging.WARNING, "receiver.workos_export")
        wait = await s.schedule.run_due()
        # The export was made before the range had settled by WorkOS's clock: dropped, nothing stored.
        assert s.stored("a") == s.stored("b") == [] and s.fake.served == []
        assert (await s.state.get(ORGANIZATION)) == OrgState(pending=(FIRST, T0))
        assert s.result("clock_ahead") == 1 and s.result("archived") == 0
        (line,) = [r for r in caplog.records if "clock" in r.getMessage()]
        assert "ahead of WorkOS's by about 3600 s" in line.getMessage() and API_KEY not in line.getMessage()
        # Tried again once the range has settled by WorkOS's clock, with the same bounds.
        assert wait == pytest.approx(HOUR + 1, abs=2)
        s.clock.now += wait
        await s.schedule.run_due()
        assert s.ranges() == [(iso(FIRST), iso(T0))] and s.stored("b") == s.stored("a")
        assert b"01HXLATEEVENT" in s.contents("a") and b"01HXLATEEVENT" in s.contents("b")
        assert (await s.state.get(ORGANIZATION)) == OrgState(archived_end=T0)
        assert s.fake.count("POST", "/audit_logs/exports") == 2 and s.result("clock_ahead") == 1
        # The next period: tried when the local clock says, archived when WorkOS's clock says.
        s.fake.events.append((T0 + DAY - 60, "01HXLATEEVENT2"))
        s.clock.now += DAY - HOUR
        wait = await s.schedule.run_due()
        assert s.ranges() == [(iso(FIRST), iso(T0))] and s.result("clock_ahead") == 2
        s.clock.now += wait
        await s.schedule.run_due()
        assert s.ranges() == [(iso(FIRST), iso(T0)), (iso(T0), iso(T0 + DAY))]
        assert b"01HXLATEEVENT2" in s.contents("a")

    async def test_a_pending_export_made_before_its_range_settled_is_dropped_when_resumed(self, setup: Any) -> None:
        """Was a defect: an export an earlier version made while the local clock ran an hour ahead (before the
        range had settled by WorkOS's clock), left pending by a restart or a failing sink, was resumed as it was:
        stored and the range marked archived, without the events that came after it was made."""
        s = setup()
        s.fake.clock = lambda: s.clock.now - HOUR
        s.fake.events.append((T0 - 600, "01HXLATEEVENT"))
        early, _ = await s.schedule.exporter.create(ORGANIZATION, FIRST, T0, s.schedule.filters)
        await s.state.begin(ORGANIZATION, FIRST, T0)
        await s.state.set_export(ORGANIZATION, early)  # as that version left it
        s.fake.clock = s.clock  # the clocks agree again
        await s.schedule.run_due()
        assert s.ranges() == [(iso(FIRST), iso(T0))] and s.stored("b") == s.stored("a")
        assert b"01HXLATEEVENT" in s.contents("a") and b"01HXLATEEVENT" in s.contents("b")
        (served,) = [export for export, _ in s.fake.served]
        assert served != early and s.fake.count("POST", "/audit_logs/exports") == 2
        assert s.result("clock_ahead") == 1 and (await s.state.get(ORGANIZATION)) == OrgState(archived_end=T0)

    async def test_a_local_clock_behind_workos_archives_at_once(self, setup: Any) -> None:
        """The mirror case: the range has settled by WorkOS's clock even sooner than by the local one."""
        s = setup()
        s.fake.clock = lambda: s.clock.now + HOUR
        await s.schedule.run_due()
        assert s.ranges() == [(iso(FIRST), iso(T0))] and s.result("clock_ahead") == 0

    async def test_api_errors_are_counted_and_retried(self, setup: Any) -> None:
        s = setup()
        s.fake.fail("create_export", 500, times=10)
        await s.schedule.run_due()
        assert s.result("api_error") == 1
        s.fake.failures.clear()
        s.clock.now += 61
        await s.schedule.run_due()
        assert s.result("archived") == 1

    async def test_a_range_beyond_the_reach_is_reported_and_skipped(self, setup: Any) -> None:
        s = setup(every="30d")
        await s.state.archived(ORGANIZATION, T0 - 100 * DAY)
        await s.schedule.run_due()
        assert s.result("out_of_reach") == 1
        ranges = s.ranges()
        assert len(ranges) == 2  # 90 days less the margin: two whole periods of 30 days
        assert all(datetime.fromisoformat(start).timestamp() >= T0 + 900 - 90 * DAY for start, _ in ranges)
        assert_contiguous(ranges)

    async def test_the_state_is_a_table_of_the_journal(self, setup: Any) -> None:
        s = setup()
        await s.schedule.run_due()
        conn = sqlite3.connect(s.tmp / "journal.db")
        try:
            rows = conn.execute("SELECT organization, archived_end, pending_start FROM workos_exports").fetchall()
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
        assert rows == [(ORGANIZATION, T0, None)]
        assert {"cursors", "workos_exports"} <= tables

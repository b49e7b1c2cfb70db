"""The scheduled export archive: for each organization, WorkOS's CSV export of each time range, stored through
the sinks of `workos.export.sinks` as `{prefix}exports/{organization}/{range_start}_{range_end}.csv`.

The flow is the one WorkOS documents: `create_export`, poll `get_export` until `ready` (backoff, up to
`export.timeout`), download the `url` (valid 10 minutes; a refused or expired URL is fetched again through
`get_export`) with a size cap, store. The CSV is stored exactly as downloaded; its columns are not documented,
so it is not parsed into events.

State lives in the journal's database, table `workos_exports`, one row per organization: the end of the last
archived range, and the range being exported (with its export id) so that a restart resumes it with the same
bounds, and so the same object keys, and the sinks that have stored it already, which a retry skips: an export
made again (the first one expired) is another file, and a name is never written with two contents (an Object
Lock bucket would keep both). A range counts as archived only once every export sink has stored it.
The first range is `[now - first_range, now - settle]`; the next ones are `every` long from there; after a
downtime the missed periods are archived one after the other; nothing older than WorkOS's 90 days is asked for.

"Now" is the local clock, but what counts is WorkOS's: an export made before the range's end plus `settle` by
WorkOS's clock (its `created_at`) cannot hold the events still to come in the range, so it is dropped unread (an
Object Lock bucket could not take a better file under the same name later) and the range is asked for again once it
has settled there. A local clock ahead of WorkOS's thus delays the ranges instead of cutting them short.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from receiver.app import RateLimitedLog
from receiver.config import WORKOS_EXPORT_MAX_AGE, WorkosConfig, WorkosExportConfig
from receiver.errors import LogBridgeError
from receiver.journal import connect
from receiver.metrics import WorkosMetrics
from receiver.workos import WorkosApi, WorkosApiError
from sinks.errors import SinkError
from sinks.objects import ObjectStore

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS workos_exports (
    organization TEXT PRIMARY KEY,
    archived_end INTEGER,
    pending_start INTEGER,
    pending_end INTEGER,
    pending_export TEXT,
    pending_stored TEXT,
    updated_at REAL NOT NULL
);
"""
PENDING = "pending_start, pending_end, pending_export, pending_stored"
"""The columns of the range being exported, cleared together once it is archived or dropped."""
NO_PENDING = (None,) * len(PENDING.split(","))
STORED_COLUMN = "pending_stored"
"""Added after the table's first version: a table made by that version gets it at first use."""

REACH_MARGIN = 3600
"""Seconds kept between the oldest range start asked for and WorkOS's 90-day limit."""
POLL_INITIAL = 1.0
POLL_MAX = 30.0
URL_REFRESHES = 3
"""Times a refused or expired download URL is fetched again before the attempt is given up."""
RETRY_FIRST = 60.0
"""Wait after a failed attempt; it doubles with each failure of the same organization, up to `every`."""

Progress = Callable[[str, int, int | None], None]
"""`progress(phase, done, total)`: phase `pending` (seconds waited) or `download` (bytes, total if known)."""


class ExportFailed(LogBridgeError):
    """One export attempt did not give a file; `result` is the metric label (error, expired, timeout, ...)."""

    def __init__(self, result: str, message: str) -> None:
        self.result = result
        super().__init__(message)


def iso(epoch: int) -> str:
    """`2024-01-15T10:30:00Z`."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(moment: datetime) -> float:
    """Unix time of a moment the SDK parsed (WorkOS's times are UTC: one without a zone is taken as UTC)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def object_name(organization: str, start: int, end: int) -> str:
    """The file's name below a sink's prefix or directory."""
    return f"exports/{organization}/{iso(start)}_{iso(end)}.csv"


# --- one export ------------------------------------------------------------------------------------


class Exporter:
    """create_export -> poll get_export -> download, for one organization and range."""

    def __init__(
        self,
        api: WorkosApi,
        *,
        timeout: float,
        max_bytes: int,
        poll_initial: float = POLL_INITIAL,
        request_timeout: float = 300.0,
    ) -> None:
        self.api = api
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.poll_initial = poll_initial
        self.request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the download connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def create(self, organization: str, start: int, end: int, filters: Filters) -> tuple[str, float]:
        """Ask WorkOS for the export; returns its id and when WorkOS made it, by WorkOS's clock."""
        created = await self.api.call(
            "create_export",
            lambda: self.api.client.audit_logs.create_export(
                organization_id=organization,
                range_start=iso(start).replace("Z", ".000Z"),
                range_end=iso(end).replace("Z", ".000Z"),
                actions=list(filters.actions) or None,
                actor_names=list(filters.actor_names) or None,
                targets=list(filters.targets) or None,
            ),
        )
        return created.id, epoch(created.created_at)

    async def made(self, export_id: str) -> float:
        """When WorkOS made an export, by WorkOS's clock; ExportFailed `expired` once WorkOS has forgotten it."""
        try:
            found = await self.api.call("get_export", lambda: self.api.client.audit_logs.get_export(export_id))
        except WorkosApiError as exc:
            if exc.reason != "not_found":
                raise
            raise ExportFailed("expired", f"the export {export_id} is gone") from None
        return epoch(found.created_at)

    async def _get(self, export_id: str) -> tuple[str, str | None]:
        found = await self.api.call("get_export", lambda: self.api.client.audit_logs.get_export(export_id))
        return str(found.state.value), found.url

    async def wait_ready(self, export_id: str, progress: Progress | None = None) -> str:
        """Poll until `ready`; returns the download URL. ExportFailed on error, expiry or the timeout."""
        started = time.monotonic()
        delay = self.poll_initial
        while True:
            state, url = await self._get(export_id)
            if state == "ready" and url:
                return url
            if state in ("error", "expired"):
                raise ExportFailed(state, f"WorkOS reports the export {export_id} as {state}")
            if state not in ("pending", "ready"):
                raise ExportFailed("error", f"the export {export_id} is in an unknown state {state!r}")
            waited = time.monotonic() - started
            if progress is not None:
                progress("pending", int(waited), None)
            if waited + delay > self.timeout:
                raise ExportFailed("timeout", f"the export {export_id} is still pending after {waited:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)

    async def download(self, export_id: str, url: str, progress: Progress | None = None) -> bytes:
        """The CSV's bytes, at most `max_bytes`; a refused or expired URL is fetched again (get_export)."""
        if self._session is None:
            # No credentials go to the file's host: the URL carries its own signature.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.request_timeout))
        last = ""
        for attempt in range(URL_REFRESHES + 1):
            if attempt:
                url = await self.wait_ready(export_id)
            try:
                async with self._session.get(url, allow_redirects=True) as response:
                    if response.status == 200 and framed(response):
                        return await self._read(response, progress)
                    last = f"the download URL answered {response.status}"
                    if response.status == 200:
                        last += " with neither a Content-Length nor chunks: a cut file could not be told from a whole"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"download failed: {type(exc).__name__}"
            if self.api.metrics is not None:
                self.api.metrics.api_errors.labels("download", "refused" if "answered" in last else "network").inc()
            log.info("export download refused; fetching a fresh URL", extra={"export": export_id, "detail": last})
        raise ExportFailed("download_failed", f"cannot download the export {export_id}: {last}")

    async def _read(self, response: aiohttp.ClientResponse, progress: Progress | None) -> bytes:
        total = response.content_length
        if total is not None and total > self.max_bytes:
            raise ExportFailed("too_large", f"the export is {total} bytes, over export.max_bytes ({self.max_bytes})")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self.max_bytes:
                raise ExportFailed("too_large", f"the export is over export.max_bytes ({self.max_bytes} bytes)")
            chunks.append(chunk)
            if progress is not None:
                progress("download", size, total)
        return await asyncio.to_thread(b"".join, chunks)  # up to max_bytes: copied off the event loop


def framed(response: aiohttp.ClientResponse) -> bool:
    """Whether the answer's body has an end HTTP can check (a Content-Length, or chunks, whose last one says it is
    the last), so a connection closed before it is an error, not the end of the file (aiohttp does not check that a
    gzip body is whole either)."""
    coding = response.headers.get("Transfer-Encoding", "")
    return response.content_length is not None or coding.rsplit(",", 1)[-1].strip().lower() == "chunked"


@dataclass(frozen=True, slots=True)
class Filters:
    """Optional filters of an export."""

    actions: Sequence[str] = ()
    actor_names: Sequence[str] = ()
    targets: Sequence[str] = ()

    @classmethod
    def of(cls, export: WorkosExportConfig) -> Filters:
        """The filters configured under `workos.export`."""
        return cls(export.actions, export.actor_names, export.targets)


# --- state -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrgState:
    """One organization's row of `workos_exports`."""

    archived_end: int | None = None
    pending: tuple[int, int] | None = None
    pending_export: str | None = None
    stored: frozenset[str] = frozenset()
    """The sinks that have stored the pending range."""


class ExportState:
    """The `workos_exports` table of the journal's database (its own short-lived connections: SQLite's
    busy timeout orders them with the journal's writer)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._columns_checked = False

    def _run(self, sql: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
        conn = connect(self.path)
        try:
            conn.executescript(SCHEMA)
            if not self._columns_checked:
                if STORED_COLUMN not in {row[1] for row in conn.execute("PRAGMA table_info(workos_exports)")}:
                    conn.execute(f"ALTER TABLE workos_exports ADD COLUMN {STORED_COLUMN} TEXT")
                self._columns_checked = True
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
        return rows

    async def _do(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        return await asyncio.to_thread(self._run, sql, params)

    async def get(self, organization: str) -> OrgState:
        """The organization's state (empty before its first export)."""
        rows = await self._do(
            f"SELECT archived_end, {PENDING} FROM workos_exports "  # noqa: S608 - fixed column names
            "WHERE organization = ?",
            organization,
        )
        if not rows:
            return OrgState()
        end, start, stop, export, stored = rows[0]
        pending = (int(start), int(stop)) if isinstance(start, int) and isinstance(stop, int) else None
        return OrgState(
            end if isinstance(end, int) else None,
            pending,
            export if isinstance(export, str) else None,
            frozenset(json.loads(stored)) if isinstance(stored, str) else frozenset(),
        )

    async def _upsert(self, organization: str, columns: str, *values: object) -> None:
        names = [name.strip() for name in columns.split(",")]
        updates = ", ".join(f"{name} = excluded.{name}" for name in names)
        await self._do(
            f"INSERT INTO workos_exports (organization, {columns}, updated_at) "  # noqa: S608 - fixed column names
            f"VALUES (?, {', '.join('?' * len(names))}, ?) "
            f"ON CONFLICT (organization) DO UPDATE SET {updates}, updated_at = excluded.updated_at",
            organization,
            *values,
            time.time(),
        )

    async def begin(self, organization: str, start: int, end: int) -> None:
        """Record the range about to be exported."""
        await self._upsert(organization, PENDING, start, end, None, None)

    async def set_export(self, organization: str, export_id: str | None) -> None:
        """Record (or forget) the WorkOS export of the pending range."""
        await self._upsert(organization, "pending_export", export_id)

    async def set_stored(self, organization: str, sinks: frozenset[str]) -> None:
        """Record the sinks that have stored the pending range."""
        await self._upsert(organization, "pending_stored", json.dumps(sorted(sinks)))

    async def archived(self, organization: str, end: int) -> None:
        """The pending range is stored by every sink: move the mark, clear the pending range."""
        await self._upsert(organization, f"archived_end, {PENDING}", end, *NO_PENDING)

    async def drop_pending(self, organization: str) -> None:
        """Forget a pending range that can no longer be exported (older than WorkOS's reach)."""
        await self._upsert(organization, PENDING, *NO_PENDING)


def plan_range(
    state: OrgState, now: float, export: WorkosExportConfig
) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(the range to export now or None, a range given up because it is beyond WorkOS's reach or None)."""
    horizon = int(now - export.settle)
    oldest = int(now - WORKOS_EXPORT_MAX_AGE) + REACH_MARGIN
    every = int(export.every)
    if state.pending is not None:
        if state.pending[0] >= oldest:
            return state.pending, None
        return None, state.pending
    if state.archived_end is None:
        start = max(int(now - export.first_range), oldest)
        return ((start, horizon) if start < horizon else None), None
    start = state.archived_end
    lost = None
    if start < oldest:
        lost, start = (start, oldest), oldest
    if horizon - start < every:
        return None, lost
    return (start, start + every), lost


# --- the schedule ----------------------------------------------------------------------------------


class ExportSchedule:
    """Archives each organization's due ranges, one export at a time."""

    def __init__(
        self,
        config: WorkosConfig,
        api: WorkosApi,
        state: ExportState,
        sinks: Mapping[str, ObjectStore],
        metrics: WorkosMetrics,
        *,
        clock: Callable[[], float] = time.time,
        poll_initial: float = POLL_INITIAL,
    ) -> None:
        if config.export is None:
            raise ValueError("the schedule needs workos.export")
        self.config = config
        self.export = config.export
        self.state = state
        self.sinks = dict(sinks)
        self.metrics = metrics
        self.clock = clock
        self.exporter = Exporter(
            api, timeout=self.export.timeout, max_bytes=self.export.max_bytes, poll_initial=poll_initial
        )
        self.filters = Filters.of(self.export)
        self._retry_at: dict[str, tuple[float, float]] = {}
        """Organization -> (when its range is tried again, the wait that was put off)."""
        self._failures: dict[str, int] = {}
        self._clock_warnings = RateLimitedLog(log, rate=1 / 600, burst=3)
        """A clock ahead of WorkOS's is met by every organization each period: a few lines, then one in 10 minutes."""

    async def close(self) -> None:
        """Close the download connections."""
        await self.exporter.close()

    async def run(self) -> None:
        """Archive due ranges until cancelled."""
        while True:
            wait = await self.run_due()
            await asyncio.sleep(wait)

    async def run_due(self) -> float:
        """Archive every range due now; returns the seconds until the next one is due (at least 1)."""
        dues: list[float] = []
        for organization in self.config.organizations:
            retry_at, waited = self._retry_at.get(organization, (0.0, 0.0))
            # Further away than the wait it was given: the clock was stepped back, so it is tried now.
            if self.clock() < retry_at <= self.clock() + waited:
                dues.append(retry_at)
                continue
            while True:
                found = await self.state.get(organization)
                if found.archived_end is not None:  # a new process reports it before its first archive
                    self.metrics.archived_until.labels(organization).set(found.archived_end)
                plan, lost = plan_range(found, self.clock(), self.export)
                if lost is not None:
                    self.metrics.exports.labels(organization, "out_of_reach").inc()
                    log.error(
                        "a range was never archived and is now beyond WorkOS's 90-day export reach; it is skipped",
                        extra={"organization": organization, "range_start": iso(lost[0]), "range_end": iso(lost[1])},
                    )
                    if found.pending is not None:
                        await self.state.drop_pending(organization)
                        continue
                if plan is None:
                    if found.archived_end is not None:
                        dues.append(found.archived_end + self.export.every + self.export.settle)
                    break
                wait = await self.archive(organization, plan, found)
                if wait is not None:
                    self._retry_at[organization] = (self.clock() + wait, wait)
                    dues.append(self.clock() + wait)
                    break
                self._failures.pop(organization, None)
        wait = min(dues, default=self.clock() + 60.0) - self.clock()
        return max(1.0, min(wait, self.export.every))

    def _failed(self, organization: str) -> float:
        """The wait before the next attempt after a failure: RETRY_FIRST, doubling with each one, up to `every`."""
        failures = self._failures[organization] = self._failures.get(organization, 0) + 1
        return min(RETRY_FIRST * 2.0 ** (failures - 1), self.export.every)

    async def archive(self, organization: str, plan: tuple[int, int], found: OrgState) -> float | None:
        """Export one range and store it through every sink; None once all stored it (and the mark moved), else the
        seconds until it is tried again."""
        start, end = plan
        context = {"organization": organization, "range_start": iso(start), "range_end": iso(end)}
        export_id = found.pending_export if found.pending == plan else None
        if found.pending != plan:
            await self.state.begin(organization, start, end)
        try:
            if export_id is not None and (made := await self.exporter.made(export_id)) < end + self.export.settle:
                # Saved by a version that did not check: made before the range had settled, it may lack events.
                self.metrics.exports.labels(organization, "clock_ahead").inc()
                log.warning(
                    "the range had not settled by WorkOS's clock when its pending export was made (by a version "
                    "that did not check): the export is dropped unread and a new one is asked for",
                    extra={**context, "export": export_id, "workos_time": iso(int(made))},
                )
                await self.state.set_export(organization, None)
                export_id = None
            if export_id is None:
                export_id, made = await self.exporter.create(organization, start, end, self.filters)
                if (early := end + self.export.settle - made) > 0:
                    return self._unsettled(organization, context, made, early)
                await self.state.set_export(organization, export_id)
            try:
                url = await self.exporter.wait_ready(export_id)
            except WorkosApiError as exc:
                if exc.reason != "not_found":
                    raise
                raise ExportFailed("expired", f"the export {export_id} is gone") from None
            data = await self.exporter.download(export_id, url)
        except ExportFailed as exc:
            if exc.result in ("error", "expired", "timeout"):
                await self.state.set_export(organization, None)  # the next attempt asks for a new export
            self.metrics.exports.labels(organization, exc.result).inc()
            log.warning("export attempt failed; retried later", extra={**context, "error": str(exc)})
            return self._failed(organization)
        except WorkosApiError as exc:
            self.metrics.exports.labels(organization, "api_error").inc()
            log.warning("export attempt failed; retried later", extra={**context, "error": str(exc)})
            return self._failed(organization)
        stored = found.stored if found.pending == plan else frozenset()
        failed = await self.store(organization, start, end, data, stored)
        if failed:
            await self.state.set_stored(organization, frozenset(self.sinks).difference(failed) | stored)
            self.metrics.exports.labels(organization, "sink_failed").inc()
            log.warning(
                "export not stored by every sink; the range is retried later", extra={**context, "errors": failed}
            )
            return self._failed(organization)
        await self.state.archived(organization, end)
        self.metrics.exports.labels(organization, "archived").inc()
        self.metrics.export_last_success.labels(organization).set(time.time())
        self.metrics.archived_until.labels(organization).set(end)
        log.info("export range archived", extra={**context, "bytes": len(data), "sinks": list(self.sinks)})
        return None

    def _unsettled(self, organization: str, context: dict[str, str], made: float, early: float) -> float:
        """The export was made `early` seconds before the range had settled by WorkOS's clock: it is left unread
        (the pending range keeps its bounds, and so its file names) and asked for again once the range has settled."""
        wait = min(early + 1.0, self.export.every)
        self.metrics.exports.labels(organization, "clock_ahead").inc()
        self._clock_warnings.log(
            f"the range had not settled by WorkOS's clock when its export was made: the export is dropped and asked "
            f"for again in {wait:.0f} s (the local clock runs ahead of WorkOS's by about {self.clock() - made:.0f} s, "
            "or did when the range was planned)",
            **context,
            workos_time=iso(int(made)),
        )
        return wait

    async def store(
        self, organization: str, start: int, end: int, data: bytes, stored: frozenset[str] = frozenset()
    ) -> dict[str, str]:
        """Store the file through every sink but those in `stored`; returns the failures by sink name."""
        sinks = {name: sink for name, sink in self.sinks.items() if name not in stored}
        return await store_everywhere(sinks, object_name(organization, start, end), data, start, self.metrics)


async def store_everywhere(
    sinks: Mapping[str, ObjectStore], name: str, data: bytes, start: int, metrics: WorkosMetrics | None = None
) -> dict[str, str]:
    """Store one file through each sink in turn; returns the failures by sink name."""
    failed: dict[str, str] = {}
    moment = datetime.fromtimestamp(start, UTC)
    for sink_name, sink in sinks.items():
        try:
            await sink.store_object(name, data, moment=moment)
        except SinkError as exc:
            failed[sink_name] = str(exc)
        except Exception as exc:  # a sink's bug must not pass for success
            failed[sink_name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            if metrics is not None:
                metrics.stored_bytes.labels(sink_name).inc(len(data))
    return failed

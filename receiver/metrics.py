"""Prometheus metrics, all named `log_bridge_*`. Labels carry stream and sink names, never secrets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)


def file_system_bytes(directory: Path) -> tuple[float, float]:
    """The bytes an unprivileged process may still write on `directory`'s file system, and its size (NaN, NaN
    when it cannot be read: the directory gone, the mount lost)."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return math.nan, math.nan
    return float(stats.f_bavail * stats.f_frsize), float(stats.f_blocks * stats.f_frsize)


STATVFS_WAIT = 1.0
"""Seconds a scrape waits for the journal's file system to answer (a local one answers in microseconds)."""


class FileSystemWatch:
    """`file_system_bytes` of one directory, read for each scrape in a thread of its own and waited for
    STATVFS_WAIT at most (then NaN, NaN); while a read is still outstanding no other is started."""

    # A hung network volume (NFS, hard-mounted) blocks statvfs for ever: read in the render it hung every
    # /metrics scrape, just when the metrics were needed. The thread is a daemon so that a hung read does not
    # hold the process at exit. NaN rather than the last value read: a number would look alive while the
    # volume is not.

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._read: concurrent.futures.Future[tuple[float, float]] | None = None

    def bytes(self) -> tuple[float, float]:
        """The free bytes and size of the file system, or NaN, NaN when it does not answer in time."""
        with self._lock:
            read = self._read
            if read is None or read.done():
                read = self._read = concurrent.futures.Future()
                threading.Thread(target=self._statvfs, args=(read,), name="journal-statvfs", daemon=True).start()
        try:
            return read.result(STATVFS_WAIT)
        except TimeoutError:
            return math.nan, math.nan

    def _statvfs(self, read: concurrent.futures.Future[tuple[float, float]]) -> None:
        answer = math.nan, math.nan
        try:
            answer = file_system_bytes(self._directory)
        finally:  # a read left undone would keep every later scrape waiting on it
            read.set_result(answer)


class Metrics:
    """The metrics of one running service, in their own registry."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only add scrape noise
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "log_bridge_requests",
            "HTTP requests to stream endpoints, by stream and status code",
            ["stream", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "log_bridge_request_duration_seconds",
            "Time from request start to answer on stream endpoints",
            ["stream"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.received = Counter(
            "log_bridge_events_received", "Events accepted into the journal", ["stream"], registry=r
        )
        self.duplicates = Counter(
            "log_bridge_events_duplicate",
            "Events acknowledged but not journaled again (seen within the dedup window)",
            ["stream"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "log_bridge_events_dead_lettered",
            "Elements put in the dead-letter store, by stage (intake or a sink)",
            ["stage"],
            registry=r,
        )
        self.delivered = Counter("log_bridge_sink_events_delivered", "Events a sink delivered", ["sink"], registry=r)
        self.failed = Counter(
            "log_bridge_sink_events_failed",
            "Events a send failed for, by outcome (retry or permanent)",
            ["sink", "outcome"],
            registry=r,
        )
        self.send_seconds = Histogram(
            "log_bridge_sink_send_duration_seconds",
            "Time one batch send took",
            ["sink"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.backlog = Gauge(
            "log_bridge_sink_backlog_events",
            "Events the sink still has to deliver: unread in the journal, read and waiting, being sent or retried",
            ["sink"],
            registry=r,
        )
        self.sink_up = Gauge(
            "log_bridge_sink_up",
            "1 when the sink's last health check or send succeeded, else 0",
            ["sink"],
            registry=r,
        )
        self.journal_bytes = Gauge(
            "log_bridge_journal_bytes",
            "Bytes the journal stores for undelivered events (compressed past the first 32 MiB of a backlog; what "
            "journal.max_bytes caps)",
            registry=r,
        )
        self.dead_letter_bytes = Gauge(
            "log_bridge_dead_letter_bytes",
            "Bytes the journal's dead letters take (what journal.max_dead_letter_bytes caps)",
            registry=r,
        )
        self.dead_letter_max_bytes = Gauge(
            "log_bridge_dead_letter_max_bytes", "journal.max_dead_letter_bytes", registry=r
        )
        self.dedup_keys = Gauge("log_bridge_dedup_keys", "Keys in the dedup index (all streams)", registry=r)
        self.dedup_evicted = Counter(
            "log_bridge_dedup_evicted_keys",
            "Keys forgotten before their dedup window ended because journal.dedup_max_keys was reached",
            registry=r,
        )
        self.journal_over_cap = Gauge(
            "log_bridge_journal_over_cap",
            "1 while the journal is over journal.max_bytes (intake answers 503)",
            registry=r,
        )
        self.journal_disk_full = Gauge(
            "log_bridge_journal_disk_full",
            "1 while the journal's disk is full: the last write to fail did so for lack of space and none has "
            "committed since (intake answers 503 and /readyz is not ready, however far below journal.max_bytes the "
            "journal is)",
            registry=r,
        )
        self.journal_disk_free = Gauge(
            "log_bridge_journal_disk_free_bytes",
            "Bytes the service may still write on the journal's file system (NaN when it cannot be read or does not "
            "answer within a second)",
            registry=r,
        )
        self.journal_disk_size = Gauge(
            "log_bridge_journal_disk_size_bytes",
            "Size of the journal's file system in bytes (NaN as log_bridge_journal_disk_free_bytes)",
            registry=r,
        )

        self.malformed_requests = Counter(
            "log_bridge_malformed_requests",
            "Requests refused before routing because they are not valid HTTP/1.1 (answered 400, not logged each)",
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "log_bridge_inflight_body_bytes",
            "Body bytes reserved by requests in flight (at most server.max_inflight_bytes; beyond it, 503)",
            registry=r,
        )
        self.dedup_store_errors = Counter(
            "log_bridge_dedup_store_errors",
            "Calls to the shared dedup store (journal.dedup_store) that failed or timed out; the request was "
            "deduplicated locally only",
            registry=r,
        )

        self.refused = Counter(
            "log_bridge_requests_refused",
            "Requests to stream endpoints refused, by stream and reason (not_allowed, unauthorised, too_large, "
            "bad_body, unsupported, timeout, overloaded, journal_full, journal_error, shutting_down, "
            "client_disconnected: the client closed the connection mid-body, internal_error: a defect)",
            ["stream", "reason"],
            registry=r,
        )
        self.unrouted = Counter(
            "log_bridge_requests_unrouted",
            "POSTs to a path no stream is configured at, answered 404 (the path, the client's to choose, is logged, "
            "not a label)",
            registry=r,
        )
        self.last_event = Gauge(
            "log_bridge_stream_last_event_timestamp_seconds",
            "When the stream's last request with events was acknowledged (Unix time; alert on silence)",
            ["stream"],
            registry=r,
        )
        self.journal_max_bytes = Gauge(
            "log_bridge_journal_max_bytes", "journal.max_bytes: the cap of log_bridge_journal_bytes", registry=r
        )
        self.reloads = Counter(
            "log_bridge_config_reloads",
            "Configuration reloads (SIGHUP, log-bridge reload) and loads of changed TLS files, by result",
            ["result"],
            registry=r,
        )
        self.last_reload = Gauge(
            "log_bridge_config_last_reload_success_timestamp_seconds",
            "When the configuration in use was loaded (start or last successful reload; Unix time)",
            registry=r,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.open_connections = Gauge(
            "log_bridge_open_connections",
            "Client connections open, by listener: stream (TLS handshakes included; at most server.max_connections)"
            " or admin (its own cap)",
            ["listener"],
            registry=r,
        )
        self.connections_unlisted = Counter(
            "log_bridge_connections_unlisted",
            "Connections from an address neither allowlisted nor a trusted proxy, closed at accept before any TLS "
            "handshake or HTTP (server.refuse_unlisted)",
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "log_bridge_tls_handshake_failures",
            "Failed TLS handshakes on the stream listener, by reason: certificate_refused (the client refused the "
            "server's certificate), client_certificate (mutual TLS: missing or refused), not_tls, "
            "no_common_protocol, other",
            ["reason"],
            registry=r,
        )
        self.connections_refused = Counter(
            "log_bridge_connections_refused",
            "Connections closed unread on arrival because the listener's cap was reached, by listener (stream, admin)",
            ["listener"],
            registry=r,
        )
        self.loop_errors = Counter(
            "log_bridge_event_loop_errors",
            "Errors asyncio reported to the event loop's exception handler, and exceptions Python could not raise "
            "(sys.unraisablehook); logged a few a second per kind",
            registry=r,
        )
        self._journal_disk: FileSystemWatch | None = None
        self.exposition = Exposition(self.render)
        """What `/metrics` answers, rendered off the event loop."""

    def forget_stream(self, name: str) -> None:
        """A stream a reload removed: its series go (else every stream the process ever had stays exported)."""
        for metric in (
            self.requests,
            self.request_seconds,
            self.received,
            self.duplicates,
            self.refused,
            self.last_event,
        ):
            metric.remove_by_labels({"stream": name})

    def forget_sink(self, name: str) -> None:
        """A sink a reload removed: its series go, the dead letters it left counted no more."""
        for metric in (self.delivered, self.failed, self.send_seconds, self.backlog, self.sink_up):
            metric.remove_by_labels({"sink": name})
        self.dead_lettered.remove_by_labels({"stage": name})

    def watch_tls(self, expiry: Callable[[], float], failures: Iterable[str]) -> None:
        """With server.tls: the certificate's expiry read at scrape time, and the handshake failures of each kind
        at 0 until one happens (neither is exported without TLS)."""
        Gauge(
            "log_bridge_tls_certificate_expiry_timestamp_seconds",
            "When the certificate the stream listener presents expires (Unix time; NaN when it cannot be read "
            "from server.tls.cert_file)",
            registry=self.registry,
        ).set_function(expiry)
        for kind in failures:
            self.tls_handshake_failures.labels(kind)

    def watch_inflight(self, used: Callable[[], float]) -> None:
        """Read the in-flight body bytes at scrape time."""
        self.inflight_bytes.set_function(used)

    def watch_journal(
        self,
        size: Callable[[], float],
        over_cap: Callable[[], float],
        dedup_keys: Callable[[], float],
        disk_full: Callable[[], float],
    ) -> None:
        """Read the journal gauges at scrape time."""
        self.journal_bytes.set_function(size)
        self.journal_over_cap.set_function(over_cap)
        self.dedup_keys.set_function(dedup_keys)
        self.journal_disk_full.set_function(disk_full)

    def watch_journal_disk(self, directory: Path) -> None:
        """Read the journal's file system's free space and size at each render, both from one `statvfs`."""
        self._journal_disk = FileSystemWatch(directory)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        if self._journal_disk is not None:
            free, size = self._journal_disk.bytes()
            self.journal_disk_free.set(free)
            self.journal_disk_size.set(size)
        return generate_latest(self.registry)


class Exposition:
    """The Prometheus text for `/metrics`, rendered in a worker thread one render at a time; a scrape that arrives
    while a render runs waits for the next one and shares it with every other scrape that arrived meanwhile."""

    # Rendering takes about 1.3 ms of Python: on the event loop, a flood of scrapes from anyone (/metrics has no
    # allowlist) froze everything else for seconds. Each answer is still rendered after its request arrived, so a
    # scrape right after an action sees it. A thread may render: prometheus_client guards its values and children
    # with locks, and the gauges' callbacks read plain attributes.

    def __init__(self, render: Callable[[], bytes]) -> None:
        self._render = render
        self._wanted: asyncio.Future[bytes] | None = None
        """The render the scrapes that arrived since the last one began wait for (None when none arrived)."""
        self._renderer: asyncio.Task[None] | None = None

    async def text(self) -> bytes:
        """A render that began after this call."""
        if self._wanted is None:
            self._wanted = asyncio.get_running_loop().create_future()
            if self._renderer is None:
                self._renderer = asyncio.create_task(self._render_while_wanted())
        # Shielded: a scrape that gives up must not cancel the render the others wait for.
        return await asyncio.shield(self._wanted)

    async def _render_while_wanted(self) -> None:
        try:
            while self._wanted is not None:
                wanted, self._wanted = self._wanted, None
                try:
                    wanted.set_result(await asyncio.to_thread(self._render))
                except asyncio.CancelledError:
                    wanted.cancel()
                    raise
                except Exception as exc:  # the scrapes waiting for this render answer 500, as they did before
                    log.exception("metrics: the page could not be rendered")
                    wanted.set_exception(exc)
                    wanted.exception()  # logged above: no "never retrieved" when every scrape gave up waiting
        finally:
            if self._wanted is not None:
                self._wanted.cancel()
                self._wanted = None
            self._renderer = None


class WorkosMetrics:
    """The metrics of the WorkOS stream watch and export archive (`workos:`), in the service's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.stream_state = Gauge(
            "log_bridge_workos_stream_state",
            "1 for the current state of the organization's WorkOS log stream, 0 for the other states",
            ["organization", "type", "state"],
            registry=r,
        )
        self.last_synced = Gauge(
            "log_bridge_workos_stream_last_synced_timestamp_seconds",
            "When WorkOS last synced events to the organization's log stream (its last_synced_at)",
            ["organization"],
            registry=r,
        )
        self.stream_checked = Gauge(
            "log_bridge_workos_stream_checked_timestamp_seconds",
            "When the organization's audit-log configuration was last read from WorkOS (stream_state is as of then); "
            "before the first read, when the process started watching it",
            ["organization"],
            registry=r,
        )
        self.api_errors = Counter(
            "log_bridge_workos_api_errors",
            "Failed WorkOS API calls, by operation and reason",
            ["operation", "reason"],
            registry=r,
        )
        self.exports = Counter(
            "log_bridge_workos_exports",
            "Scheduled export attempts of an organization's range, by result",
            ["organization", "result"],
            registry=r,
        )
        self.export_last_success = Gauge(
            "log_bridge_workos_export_last_success_timestamp_seconds",
            "When an export range of the organization was last archived by every export sink",
            ["organization"],
            registry=r,
        )
        self.archived_until = Gauge(
            "log_bridge_workos_export_archived_until_timestamp_seconds",
            "End of the organization's last archived export range",
            ["organization"],
            registry=r,
        )
        self.stored_bytes = Counter(
            "log_bridge_workos_export_stored_bytes",
            "Bytes of export CSV files stored, by sink",
            ["sink"],
            registry=r,
        )
        self.organizations: set[str] = set()
        """The organizations the gauges are kept for (across reloads)."""

    def watching(self, organizations: Iterable[str]) -> None:
        """The configured organizations, at each (re)start of the WorkOS side: the gauges of the others go; an
        organization new to the process gets stream_checked set to now, so that a watch that never manages to
        read it is seen, as for one that stopped reading."""
        wanted = set(organizations)
        for organization in self.organizations - wanted:
            for gauge in (
                self.stream_state,
                self.last_synced,
                self.stream_checked,
                self.export_last_success,
                self.archived_until,
            ):
                gauge.remove_by_labels({"organization": organization})
        now = time.time()
        for organization in wanted - self.organizations:
            self.stream_checked.labels(organization).set(now)
        self.organizations = wanted

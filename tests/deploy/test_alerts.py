"""The chart's PrometheusRule: rendered by Helm, checked by `promtool check rules`, and evaluated by
`promtool test rules` on series written here, so that each alert is seen firing when it should and staying quiet
when it should not.

Series carry the labels the chart's ServiceMonitor gives them (namespace, job, pod, instance); a series of another
job checks that the rules only look at their own release.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from receiver.cli import main
from receiver.samples import sample_wrappers
from tests.conftest import TOKEN, StartService, scrape

from .prometheus import known_metric, metric_names, run_promtool, write_rules
from .support import FIXTURES, NAMESPACE, REPO, Manifest, Render, kinds, only

JOB = "log-bridge"
HTTPS = "GenericHttps"
ALERTS = {
    "LogBridgeSinkDown": "sinkDown",
    "LogBridgeSinkFlapping": "sinkFlapping",
    "LogBridgeSinkBacklogGrowing": "sinkBacklogGrowing",
    "LogBridgeEventsDeadLettered": "deadLetters",
    "LogBridgeJournalNearlyFull": "journalNearlyFull",
    "LogBridgeJournalDiskFull": "journalDiskFull",
    "LogBridgeJournalDiskFillingUp": "journalDiskFillingUp",
    "LogBridgeDedupStoreFailing": "dedupStoreFailing",
    "LogBridgeDeadLettersNearlyFull": "deadLettersNearlyFull",
    "LogBridgeStreamSilent": "streamSilent",
    "LogBridgeRequestsUnauthorised": "requestsUnauthorised",
    "LogBridgeRequestsRefused": "requestsRefused",
    "LogBridgeConfigReloadFailed": "configReloadFailed",
    "LogBridgeTlsCertificateExpiring": "tlsCertificateExpiring",
    "LogBridgeWorkosStreamBroken": "workosStreamBroken",
    "LogBridgeWorkosStreamInactive": "workosStreamInactive",
    "LogBridgeWorkosStreamUnchecked": "workosStreamUnchecked",
    "LogBridgeWorkosExportBehind": "workosExportBehind",
}


def enabled(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Values with the PrometheusRule on (and the extra prometheusRule values)."""
    return {"metrics": {"prometheusRule": {"enabled": True, **(extra or {})}}}


def groups(manifests: list[Manifest]) -> list[dict[str, Any]]:
    """The rule groups of the rendered PrometheusRule."""
    found: list[dict[str, Any]] = only(manifests, "PrometheusRule")["spec"]["groups"]
    return found


def rules(manifests: list[Manifest]) -> list[dict[str, Any]]:
    """Every rule of the rendered PrometheusRule."""
    return [rule for group in groups(manifests) for rule in group["rules"]]


def series(metric: str, value: str, **labels: str) -> dict[str, str]:
    """An input series of a pod of this release (pod log-bridge-0 unless given)."""
    labels = {"namespace": NAMESPACE, "job": JOB, "pod": "log-bridge-0", "instance": "10.0.0.1:8443", **labels}
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{inner}}}", "values": value}


def target(**labels: str) -> dict[str, str]:
    """The labels of a series of a pod of this release, as an alert carries them."""
    return {"namespace": NAMESPACE, "job": JOB, "pod": "log-bridge-0", "instance": "10.0.0.1:8443", **labels}


def stream_target(**labels: str) -> dict[str, str]:
    """The labels a per-stream alert carries (summed or maxed over the pods)."""
    return {"namespace": NAMESPACE, "job": JOB, **labels}


def fires(alert: str, at: str, *expected: tuple[dict[str, str], str]) -> dict[str, Any]:
    """An alert_rule_test: at `at` exactly these alerts fire (labels, summary); none if none given."""
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [
            {"exp_labels": {"severity": SEVERITY[alert], **labels}, "exp_annotations": {"summary": summary}}
            for labels, summary in expected
        ],
    }


SEVERITY = {
    "LogBridgeSinkDown": "critical",
    "LogBridgeSinkFlapping": "warning",
    "LogBridgeSinkBacklogGrowing": "warning",
    "LogBridgeEventsDeadLettered": "warning",
    "LogBridgeJournalNearlyFull": "warning",
    "LogBridgeJournalDiskFull": "critical",
    "LogBridgeJournalDiskFillingUp": "warning",
    "LogBridgeDedupStoreFailing": "warning",
    "LogBridgeDeadLettersNearlyFull": "warning",
    "LogBridgeStreamSilent": "critical",
    "LogBridgeRequestsUnauthorised": "warning",
    "LogBridgeRequestsRefused": "critical",
    "LogBridgeConfigReloadFailed": "warning",
    "LogBridgeTlsCertificateExpiring": "warning",
    "LogBridgeWorkosStreamBroken": "critical",
    "LogBridgeWorkosStreamInactive": "warning",
    "LogBridgeWorkosStreamUnchecked": "warning",
    "LogBridgeWorkosExportBehind": "warning",
}


def sawtooth(low: int, high: int, count: int) -> str:
    """A gauge that swings between two values every sample (a healthy sink's backlog between batches)."""
    return " ".join(str(low if i % 2 else high) for i in range(count))


# One promtool test group per alert: the series, then evaluations where it must and must not fire.
CASES: dict[str, dict[str, Any]] = {
    "LogBridgeSinkDown": {
        "interval": "1m",
        "input_series": [
            series("log_bridge_sink_up", "1x4 0x14 1x20", sink="splunk"),  # down from 5m to 18m
            series("log_bridge_sink_up", "1x40", sink="archive"),
            series("log_bridge_sink_up", "0x40", sink="splunk", job="other-release"),
        ],
        "alert_rule_test": [
            fires("LogBridgeSinkDown", "14m"),  # down 9 minutes: not yet
            fires("LogBridgeSinkDown", "16m", (target(sink="splunk"), "Sink splunk of log-bridge-0 is down")),
            fires("LogBridgeSinkDown", "25m"),  # back up
        ],
    },
    "LogBridgeSinkFlapping": {
        "interval": "1m",
        "input_series": [
            # splunk is down 8 minutes in every 10 for 2h, then up: LogBridgeSinkDown never fires for it.
            series("log_bridge_sink_up", " ".join(["0 0 0 0 0 0 0 0 1 1"] * 12 + ["1"] * 60), sink="splunk"),
            # datadog is throttled for one minute in every 10 (a retry cures it): down 10 % of the time.
            series("log_bridge_sink_up", " ".join(["1 1 1 1 1 1 1 1 1 0"] * 18), sink="datadog"),
            # archive has one 5-minute outage; s3 goes down at 10m and stays down (LogBridgeSinkDown's case).
            series("log_bridge_sink_up", "1x19 0x4 1x155", sink="archive"),
            series("log_bridge_sink_up", "1x9 0x170", sink="s3"),
            series("log_bridge_sink_up", " ".join(["0 1"] * 90), sink="splunk", job="other-release"),
        ],
        "alert_rule_test": [
            fires(
                "LogBridgeSinkFlapping",
                "1h",
                (target(sink="splunk"), "Sink splunk of log-bridge-0 keeps going down (down 80.33% of the last 1h)"),
            ),
            fires("LogBridgeSinkFlapping", "3h"),  # up for the last hour
        ],
    },
    "LogBridgeSinkBacklogGrowing": {
        "interval": "1m",
        "input_series": [
            series("log_bridge_sink_backlog_events", "0+10x90", sink="s3"),  # 10 more events every minute
            series("log_bridge_sink_backlog_events", sawtooth(400, 600, 91), sink="splunk"),  # busy but keeping up
            series("log_bridge_sink_backlog_events", "0x10 10000-1000x10 0x70", sink="datadog"),  # a burst, drained
            series("log_bridge_sink_backlog_events", "5000x90", sink="archive"),  # stuck but not growing
            series("log_bridge_sink_backlog_events", "0+10x90", sink="s3", job="other-release"),
        ],
        "alert_rule_test": [
            fires("LogBridgeSinkBacklogGrowing", "30m"),
            fires(
                "LogBridgeSinkBacklogGrowing",
                "60m",
                (target(sink="s3"), "Backlog of sink s3 on log-bridge-0 grew by 300 events in 30m"),
            ),
        ],
    },
    "LogBridgeEventsDeadLettered": {
        "interval": "1m",
        "input_series": [
            series("log_bridge_events_dead_lettered_total", "0x5 3x40", stage="intake"),  # 3 at 6m
            series("log_bridge_events_dead_lettered_total", "_x20 1x30", stage="s3"),  # first appears at 20m, with 1
            # A restarted pod: its counter starts again at 0 under a new instance.
            series("log_bridge_events_dead_lettered_total", "0x50", stage="intake", instance="10.0.0.2:8443"),
            series("log_bridge_events_dead_lettered_total", "0x5 3x40", stage="intake", job="other-release"),
        ],
        "alert_rule_test": [
            fires("LogBridgeEventsDeadLettered", "5m"),
            fires(
                "LogBridgeEventsDeadLettered",
                "8m",
                (target(stage="intake"), "Events dead-lettered by intake on log-bridge-0"),
            ),
            fires(
                "LogBridgeEventsDeadLettered",
                "22m",
                (target(stage="s3"), "Events dead-lettered by s3 on log-bridge-0"),
            ),
            fires("LogBridgeEventsDeadLettered", "35m"),  # nothing added in the last 10 minutes
        ],
    },
    "LogBridgeJournalNearlyFull": {
        "interval": "1m",
        "input_series": [
            series("log_bridge_journal_bytes", "50+2x30"),  # over 80 % from 16m
            series("log_bridge_journal_max_bytes", "100x30"),
            series("log_bridge_journal_bytes", "70x30", pod="log-bridge-1", instance="10.0.0.3:8443"),
            series("log_bridge_journal_max_bytes", "100x30", pod="log-bridge-1", instance="10.0.0.3:8443"),
        ],
        "alert_rule_test": [
            fires("LogBridgeJournalNearlyFull", "20m"),  # over 80 % for 4 minutes: not yet
            fires("LogBridgeJournalNearlyFull", "22m", (target(), "Journal of log-bridge-0 is 94% full")),
        ],
    },
    "LogBridgeJournalDiskFull": {
        "interval": "1m",
        "input_series": [
            series("log_bridge_journal_disk_full", "0x5 1x10 0x20"),  # full from 5m to 15m
            series("log_bridge_journal_disk_full", "0 1 0 1 0 1 0x25", pod="log-bridge-1", instance="10.0.0.3:8443"),
            series("log_bridge_journal_disk_full", "1x30", job="other-release"),
        ],
        "alert_rule_test": [
            fires("LogBridgeJournalDiskFull", "9m"),  # full 4 minutes: not yet; pod 1 only flickered
            fires("LogBridgeJournalDiskFull", "11m", (target(), "The journal's disk of log-bridge-0 is full")),
            fires("LogBridgeJournalDiskFull", "20m"),  # room again
        ],
    },
    "LogBridgeJournalDiskFillingUp": {
        "interval": "5m",
        "input_series": [
            # Pod 0's volume (2,000 bytes) loses 60 bytes an hour from 60 % free: under 40 % from 6h45m on.
            series("log_bridge_journal_disk_free_bytes", "1200-5x120"),
            series("log_bridge_journal_disk_size_bytes", "2000x120"),
            # Pod 1 has 20 % free, steady; pod 2 35 % and losing 12 bytes an hour: full in 58 hours, not 24.
            series("log_bridge_journal_disk_free_bytes", "400x120", pod="log-bridge-1", instance="10.0.0.3:8443"),
            series("log_bridge_journal_disk_size_bytes", "2000x120", pod="log-bridge-1", instance="10.0.0.3:8443"),
            series("log_bridge_journal_disk_free_bytes", "700-1x120", pod="log-bridge-2", instance="10.0.0.4:8443"),
            series("log_bridge_journal_disk_size_bytes", "2000x120", pod="log-bridge-2", instance="10.0.0.4:8443"),
            series("log_bridge_journal_disk_free_bytes", "600-10x120", job="other-release"),
            series("log_bridge_journal_disk_size_bytes", "2000x120", job="other-release"),
        ],
        "alert_rule_test": [
            fires("LogBridgeJournalDiskFillingUp", "5h"),  # filling, but 45 % free
            fires("LogBridgeJournalDiskFillingUp", "7h30m"),  # under 40 % for 45 minutes: not yet
            fires(
                "LogBridgeJournalDiskFillingUp",
                "8h",
                (target(), "The journal's volume of log-bridge-0 is filling up (36% free)"),
            ),
        ],
    },
    "LogBridgeDedupStoreFailing": {
        "interval": "1m",
        "input_series": [
            series("log_bridge_dedup_store_errors_total", "0x5 0+30x20 600x20"),  # Redis down from 5m to 25m
            series("log_bridge_dedup_store_errors_total", "0x5 1x35", pod="log-bridge-1", instance="10.0.0.3:8443"),
            series("log_bridge_dedup_store_errors_total", "0+30x40", job="other-release"),
        ],
        "alert_rule_test": [
            fires("LogBridgeDedupStoreFailing", "14m"),  # failing 9 minutes: not yet; pod 1 had one blip
            fires("LogBridgeDedupStoreFailing", "17m", (target(), "The dedup store fails for log-bridge-0")),
            fires("LogBridgeDedupStoreFailing", "35m"),  # Redis back at 25m
        ],
    },
    "LogBridgeDeadLettersNearlyFull": {
        "interval": "1m",
        "input_series": [
            series("log_bridge_dead_letter_bytes", "50+2x30"),  # over 80 % from 16m
            series("log_bridge_dead_letter_max_bytes", "100x30"),
            series("log_bridge_dead_letter_bytes", "70x30", pod="log-bridge-1", instance="10.0.0.3:8443"),
            series("log_bridge_dead_letter_max_bytes", "100x30", pod="log-bridge-1", instance="10.0.0.3:8443"),
        ],
        "alert_rule_test": [
            fires("LogBridgeDeadLettersNearlyFull", "20m"),  # over 80 % for 4 minutes: not yet
            fires(
                "LogBridgeDeadLettersNearlyFull", "22m", (target(), "Dead letters of log-bridge-0 are 94% of their cap")
            ),
        ],
    },
    "LogBridgeStreamSilent": {
        "interval": "10m",
        "input_series": [
            # Events until 1h, then silence.
            series("log_bridge_stream_last_event_timestamp_seconds", "600+600x5 3600x60", stream="quiet"),
            # Events until 2h on pod 0; the pod then restarts (new instance) and reports 0 (none since it started).
            series("log_bridge_stream_last_event_timestamp_seconds", "600+600x11", stream="restarted"),
            series(
                "log_bridge_stream_last_event_timestamp_seconds",
                "_x12 0x60",
                stream="restarted",
                instance="10.0.0.4:8443",
            ),
            # WorkOS reaches pod 1 only: pod 0 has never seen an event on this stream.
            series("log_bridge_stream_last_event_timestamp_seconds", "0x72", stream="busy"),
            series(
                "log_bridge_stream_last_event_timestamp_seconds",
                "0+600x72",
                stream="busy",
                pod="log-bridge-1",
                instance="10.0.0.5:8443",
            ),
            series("log_bridge_stream_last_event_timestamp_seconds", "0x72", stream="quiet", job="other-release"),
            # A stream first served at 6h10m (a fresh install, or added by a reload): 0, as a started service
            # reports it. It has been silent only since then: that is not yet `after` (time() is far past 6h).
            series("log_bridge_stream_last_event_timestamp_seconds", "_x36 0x40", stream="new"),
        ],
        "alert_rule_test": [
            fires("LogBridgeStreamSilent", "6h20m"),
            fires("LogBridgeStreamSilent", "6h50m"),  # quiet: 5h50m without an event
            fires(
                "LogBridgeStreamSilent",
                "7h10m",
                (stream_target(stream="quiet"), "No event on stream quiet for more than 6h"),
            ),
            fires(
                "LogBridgeStreamSilent",
                "8h10m",
                (stream_target(stream="quiet"), "No event on stream quiet for more than 6h"),
                (stream_target(stream="restarted"), "No event on stream restarted for more than 6h"),
            ),
            fires(  # the new stream too, once it has been silent for 6h
                "LogBridgeStreamSilent",
                "12h20m",
                (stream_target(stream="quiet"), "No event on stream quiet for more than 6h"),
                (stream_target(stream="restarted"), "No event on stream restarted for more than 6h"),
                (stream_target(stream="new"), "No event on stream new for more than 6h"),
            ),
        ],
    },
    "LogBridgeRequestsUnauthorised": {
        "interval": "1m",
        "input_series": [
            series("log_bridge_requests_refused_total", "0+2x40", stream="workos", reason="unauthorised"),
            series(
                "log_bridge_requests_refused_total",
                "0+1x40",
                stream="workos",
                reason="unauthorised",
                pod="log-bridge-1",
                instance="10.0.0.3:8443",
            ),
            series("log_bridge_requests_refused_total", "0 5x40", stream="workos", reason="not_allowed"),  # a burst
            series("log_bridge_requests_refused_total", "0+1x40", stream="workos", reason="too_large"),
            series("log_bridge_requests_refused_total", "0+2x40", stream="workos", reason="unauthorised", job="x"),
        ],
        "alert_rule_test": [
            fires("LogBridgeRequestsUnauthorised", "10m"),
            fires(
                "LogBridgeRequestsUnauthorised",
                "20m",
                (
                    stream_target(stream="workos", reason="unauthorised"),
                    "Requests to stream workos refused as unauthorised",
                ),
            ),
        ],
    },
    "LogBridgeRequestsRefused": {
        "interval": "1m",
        "input_series": [
            series("log_bridge_requests_refused_total", "0+1x40", stream="workos", reason="too_large"),
            series("log_bridge_requests_refused_total", "0 4x40", stream="workos", reason="journal_full"),  # a burst
            series("log_bridge_requests_refused_total", "0+2x40", stream="workos", reason="unauthorised"),
            series("log_bridge_requests_refused_total", "0+1x40", stream="workos", reason="bad_body", job="x"),
        ],
        "alert_rule_test": [
            fires("LogBridgeRequestsRefused", "10m"),
            fires(
                "LogBridgeRequestsRefused",
                "20m",
                (stream_target(stream="workos", reason="too_large"), "Requests to stream workos refused as too_large"),
            ),
        ],
    },
    "LogBridgeConfigReloadFailed": {
        "interval": "1m",
        "input_series": [
            # Pod 0: started at 1m (load counted as a success), reloaded fine at 5m, failed at 8m, fixed at 30m.
            series("log_bridge_config_reloads_total", "0x40", result="success"),
            series("log_bridge_config_reloads_total", "0x7 1x40", result="failure"),
            series("log_bridge_config_last_reload_success_timestamp_seconds", "60x4 300x25 1800x20"),
            # Pod 1: its first reload fails; the failure series appears with it and there is no success time.
            series(
                "log_bridge_config_reloads_total",
                "_x9 1x40",
                result="failure",
                pod="log-bridge-1",
                instance="10.0.0.3:8443",
            ),
            # Pod 2: a failed reload, then a good one, a minute later.
            series("log_bridge_config_reloads_total", "0x9 1x40", result="failure", pod="log-bridge-2", instance="i2"),
            series(
                "log_bridge_config_last_reload_success_timestamp_seconds",
                "60x10 660x40",
                pod="log-bridge-2",
                instance="i2",
            ),
            # Pod 3: a failed reload at 8m, then a restart at 20m on the fixed config (a new instance, its load a
            # success): the process that failed is gone.
            series("log_bridge_config_reloads_total", "0x7 1x11", result="failure", pod="log-bridge-3", instance="i3"),
            series(
                "log_bridge_config_last_reload_success_timestamp_seconds", "60x18", pod="log-bridge-3", instance="i3"
            ),
            series("log_bridge_config_reloads_total", "_x19 0x30", result="failure", pod="log-bridge-3", instance="j3"),
            series(
                "log_bridge_config_last_reload_success_timestamp_seconds",
                "_x19 1200x30",
                pod="log-bridge-3",
                instance="j3",
            ),
            series("log_bridge_config_reloads_total", "0x7 1x40", result="failure", job="other-release"),
        ],
        "alert_rule_test": [
            fires("LogBridgeConfigReloadFailed", "7m"),  # the good reload at 5m does not alert
            fires(
                "LogBridgeConfigReloadFailed",
                "12m",
                (target(), "Config reload failed on log-bridge-0"),
                (target(pod="log-bridge-1", instance="10.0.0.3:8443"), "Config reload failed on log-bridge-1"),
                (target(pod="log-bridge-3", instance="i3"), "Config reload failed on log-bridge-3"),
            ),
            fires(
                "LogBridgeConfigReloadFailed",
                "35m",
                (target(pod="log-bridge-1", instance="10.0.0.3:8443"), "Config reload failed on log-bridge-1"),
            ),
        ],
    },
    "LogBridgeWorkosStreamBroken": {
        "interval": "1m",
        "input_series": [
            # WorkOS's view of org_1's stream: invalid from 5m to 19m, then active again.
            series("log_bridge_workos_stream_state", "1x4 0x15 1x20", organization="org_1", type=HTTPS, state="active"),
            series(
                "log_bridge_workos_stream_state", "0x4 1x15 0x20", organization="org_1", type=HTTPS, state="invalid"
            ),
            # The other replica's watch reads the same.
            series(
                "log_bridge_workos_stream_state",
                "0x4 1x15 0x20",
                organization="org_1",
                type=HTTPS,
                state="invalid",
                pod="log-bridge-1",
                instance="10.0.0.3:8443",
            ),
            # A stream to another destination is not this receiver's stream.
            series("log_bridge_workos_stream_state", "1x40", organization="org_2", state="error", type="Datadog"),
            series("log_bridge_workos_stream_state", "1x40", organization="org_1", type=HTTPS, state="error", job="x"),
        ],
        "alert_rule_test": [
            fires("LogBridgeWorkosStreamBroken", "14m"),  # invalid for 9 minutes: not yet
            fires(
                "LogBridgeWorkosStreamBroken",
                "16m",
                (
                    stream_target(organization="org_1", type="GenericHttps", state="invalid"),
                    "WorkOS reports the log stream of org_1 as invalid",
                ),
            ),
            fires("LogBridgeWorkosStreamBroken", "25m"),  # active again
        ],
    },
    "LogBridgeTlsCertificateExpiring": {
        "interval": "1m",
        "input_series": [
            # log-bridge-0 serves a certificate with 20 days left, then its renewal (90 days) from 1h.
            series("log_bridge_tls_certificate_expiry_timestamp_seconds", "1728000x59 7776000x120"),
            # log-bridge-1 restarts at 1h onto an older certificate, 10 days left; log-bridge-2 cannot read its dates.
            series("log_bridge_tls_certificate_expiry_timestamp_seconds", "1728000x59 864000x120", pod="log-bridge-1"),
            series("log_bridge_tls_certificate_expiry_timestamp_seconds", " ".join(["NaN"] * 180), pod="log-bridge-2"),
            series("log_bridge_tls_certificate_expiry_timestamp_seconds", "0x179", job="other-release"),
        ],
        "alert_rule_test": [
            fires("LogBridgeTlsCertificateExpiring", "30m"),  # 20 days left everywhere: quiet
            fires(
                "LogBridgeTlsCertificateExpiring",
                "1h30m",
                (target(pod="log-bridge-1"), "The TLS certificate log-bridge-1 serves expires within 14d"),
            ),
        ],
    },
    "LogBridgeWorkosStreamInactive": {
        "interval": "1m",
        "input_series": [
            # org_1's stream is paused from 1h to 3h; org_2 is inactive for 30 minutes only (set up meanwhile).
            series(
                "log_bridge_workos_stream_state", "0x59 1x120 0x60", organization="org_1", type=HTTPS, state="inactive"
            ),
            series(
                "log_bridge_workos_stream_state", "1x59 0x120 1x60", organization="org_1", type=HTTPS, state="active"
            ),
            series("log_bridge_workos_stream_state", "1x29 0x210", organization="org_2", type=HTTPS, state="inactive"),
            series("log_bridge_workos_stream_state", "1x240", organization="org_3", type="Datadog", state="inactive"),
        ],
        "alert_rule_test": [
            fires("LogBridgeWorkosStreamInactive", "1h50m"),  # inactive for 50 minutes: not yet
            fires(
                "LogBridgeWorkosStreamInactive",
                "2h30m",
                (
                    stream_target(organization="org_1", type="GenericHttps", state="inactive"),
                    "WorkOS reports the log stream of org_1 as inactive",
                ),
            ),
            fires("LogBridgeWorkosStreamInactive", "3h50m"),  # active again
        ],
    },
    "LogBridgeWorkosStreamUnchecked": {
        "interval": "10m",
        "input_series": [
            # org_1's configuration read every 10 minutes until 1h, then never again (the API refuses the key).
            series("log_bridge_workos_stream_checked_timestamp_seconds", "0+600x6 3600x20", organization="org_1"),
            series("log_bridge_workos_stream_checked_timestamp_seconds", "0+600x26", organization="org_2"),
            # org_3: pod 0 restarts at 1h; its new instance (started at 1h10m) never reads: the watch's start.
            series("log_bridge_workos_stream_checked_timestamp_seconds", "0+600x6", organization="org_3"),
            series(
                "log_bridge_workos_stream_checked_timestamp_seconds",
                "_x7 4200x19",
                organization="org_3",
                instance="10.0.0.4:8443",
            ),
            # org_4: a pod restarts at 1h and reads again from its start.
            series("log_bridge_workos_stream_checked_timestamp_seconds", "0+600x6", organization="org_4"),
            series(
                "log_bridge_workos_stream_checked_timestamp_seconds",
                "_x7 4200+600x19",
                organization="org_4",
                instance="10.0.0.4:8443",
            ),
            # org_5 is taken out of the configuration at 1h: its series goes.
            series("log_bridge_workos_stream_checked_timestamp_seconds", "0+600x6", organization="org_5"),
            series(
                "log_bridge_workos_stream_checked_timestamp_seconds", "0x26", organization="org_1", job="other-release"
            ),
        ],
        "alert_rule_test": [
            fires("LogBridgeWorkosStreamUnchecked", "1h50m"),  # org_1 last read 50 minutes ago
            fires(
                "LogBridgeWorkosStreamUnchecked",
                "2h10m",
                (stream_target(organization="org_1"), "WorkOS's view of org_1's log stream not read for more than 1h"),
            ),
            fires(
                "LogBridgeWorkosStreamUnchecked",
                "2h30m",
                (stream_target(organization="org_1"), "WorkOS's view of org_1's log stream not read for more than 1h"),
                (stream_target(organization="org_3"), "WorkOS's view of org_3's log stream not read for more than 1h"),
            ),
        ],
    },
    "LogBridgeWorkosExportBehind": {
        "interval": "1h",
        "input_series": [
            # org_1: one range a day (ending at 0h, 24h, 48h), then the range ending at 72h keeps failing.
            series(
                "log_bridge_workos_export_archived_until_timestamp_seconds",
                "0x23 86400x23 172800x60",
                organization="org_1",
            ),
            # org_2 keeps up; a restarted pod (new instance) reports the same mark.
            series(
                "log_bridge_workos_export_archived_until_timestamp_seconds",
                "0x23 86400x23 172800x23 259200x23",
                organization="org_2",
            ),
            series(
                "log_bridge_workos_export_archived_until_timestamp_seconds",
                "_x80 259200x20",
                organization="org_2",
                instance="10.0.0.4:8443",
            ),
            series("log_bridge_workos_export_archived_until_timestamp_seconds", "0x90", organization="org_1", job="x"),
        ],
        "alert_rule_test": [
            fires("LogBridgeWorkosExportBehind", "96h"),  # org_1's mark 48h old: not yet
            fires(
                "LogBridgeWorkosExportBehind",
                "99h",
                (stream_target(organization="org_1"), "WorkOS export archive of org_1 more than 50h behind"),
            ),
        ],
    },
}


def only_summaries(groups_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups with each alert's annotations cut to its summary (promtool compares annotations exactly)."""
    cut = copy.deepcopy(groups_)
    for group in cut:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["annotations"] = {"summary": rule["annotations"]["summary"]}
    return cut


class TestPrometheusRule:
    """What the chart renders for the alerts."""

    def test_off_by_default(self, render: Render) -> None:
        assert "PrometheusRule" not in kinds(render())

    def test_every_alert_with_severity_and_runbook(self, render: Render) -> None:
        alerts = {rule["alert"]: rule for rule in rules(render(enabled())) if "alert" in rule}
        assert set(alerts) == set(ALERTS)
        for name, rule in alerts.items():
            assert rule["labels"]["severity"] == SEVERITY[name]
            assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
            assert len(rule["annotations"]["runbook"]) > 40, name
            assert "runbook_url" not in rule["annotations"]

    def test_a_runbook_that_grows_the_volume_says_how(self, render: Render) -> None:
        """Was a defect: three runbooks said to raise persistence.size, which `helm upgrade` cannot change on a
        StatefulSet (its volumeClaimTemplates are immutable: the upgrade is refused), and to raise journal.max_bytes
        with it, which on an ungrown volume turns a nearly full journal into a full disk. They now grow the
        claims first and point at the whole procedure."""
        growing = 0
        for rule in rules(render(enabled())):
            runbook = rule.get("annotations", {}).get("runbook", "")
            if "persistence.size" in runbook or "volume size" in runbook:
                growing += 1
                assert "kubectl patch pvc" in runbook and "docs/deploy.md" in runbook, rule["alert"]
        assert growing == 4
        deploy = (REPO / "docs" / "deploy.md").read_text()
        assert "## Growing the journal volumes" in deploy and "--cascade=orphan" in deploy

    def test_only_log_bridge_metrics(self, render: Render) -> None:
        """Every series a rule reads is one the receiver exposes (or a rule of the group records)."""
        all_rules = rules(render(enabled()))
        recorded = {rule["record"] for rule in all_rules if "record" in rule}
        for rule in all_rules:
            names = metric_names(rule["expr"])
            assert names, rule["expr"]
            unknown = {n for n in names if n not in recorded and not known_metric(n)}
            assert unknown == set(), rule.get("alert", rule.get("record"))

    def test_alerts_can_be_turned_off_and_tuned(self, render: Render) -> None:
        values = enabled(
            {
                "alerts": {"sinkDown": {"enabled": False}, "streamSilent": {"after": "90m", "severity": "page"}},
                "alertLabels": {"team": "security"},
                "runbookUrl": "https://wiki.example.com/log-bridge/",
                "labels": {"release": "kube-prometheus-stack"},
                "namespace": "monitoring",
                "selector": 'cluster="prod"',
            }
        )
        manifests = render(values)
        rule = only(manifests, "PrometheusRule")
        assert rule["metadata"]["namespace"] == "monitoring"
        assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        alerts = {r["alert"]: r for r in rules(manifests) if "alert" in r}
        assert "LogBridgeSinkDown" not in alerts
        silent = alerts["LogBridgeStreamSilent"]
        assert "[90m]) ) > 5400 and" in " ".join(silent["expr"].split()) and "[90m] offset 90m" in silent["expr"]
        assert silent["labels"] == {"severity": "page", "team": "security"}
        assert silent["annotations"]["runbook_url"] == "https://wiki.example.com/log-bridge#logbridgestreamsilent"
        for r in rules(manifests):
            assert 'namespace="audit"' not in r["expr"]
            assert 'cluster="prod"' in r["expr"]

    @pytest.mark.parametrize(
        "values",
        [
            {"alerts": {"streamSilent": {"after": "6 hours"}}},
            {"alerts": {"journalNearlyFull": {"ratio": 80}}},
            {"alerts": {"sinkDown": {"for": "10"}}},
            {"alerts": {"silence": {}}},
        ],
    )
    def test_schema_refuses(self, helm: Any, chart: Any, values: dict[str, Any]) -> None:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(enabled(values))


class TestPromtool:
    """The rules as Prometheus reads and evaluates them."""

    def test_check_rules(self, render: Render, tmp_path: Path) -> None:
        path = write_rules(tmp_path / "rules.yaml", groups(render(enabled())))
        result = run_promtool("check", "rules", path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(rules(render(enabled())))} rules found" in result.stdout

    def test_check_rules_refuses_a_broken_rule(self, render: Render, tmp_path: Path) -> None:
        """promtool really checks: a rule with a PromQL syntax error is refused."""
        broken = copy.deepcopy(groups(render(enabled())))
        broken[0]["rules"][0]["expr"] = "log_bridge_sink_up{ == 0"
        result = run_promtool("check", "rules", write_rules(tmp_path / "rules.yaml", broken))
        assert result.returncode != 0

    @pytest.mark.parametrize("alert", list(CASES))
    def test_fires_and_stays_quiet(self, render: Render, tmp_path: Path, alert: str) -> None:
        write_rules(tmp_path / "rules.yaml", only_summaries(groups(render(enabled()))))
        (tmp_path / "tests.yaml").write_text(
            yaml.safe_dump(
                {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [CASES[alert]]}, sort_keys=False
            )
        )
        result = run_promtool("test", "rules", tmp_path / "tests.yaml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_a_wrong_expectation_fails(self, render: Render, tmp_path: Path) -> None:
        """promtool really evaluates: expecting the sink-down alert while the sink is up fails."""
        case = copy.deepcopy(CASES["LogBridgeSinkDown"])
        case["alert_rule_test"] = [
            fires("LogBridgeSinkDown", "16m", (target(sink="archive"), "Sink archive of log-bridge-0 is down"))
        ]
        write_rules(tmp_path / "rules.yaml", only_summaries(groups(render(enabled()))))
        (tmp_path / "tests.yaml").write_text(
            yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [case]}, sort_keys=False)
        )
        assert run_promtool("test", "rules", tmp_path / "tests.yaml").returncode != 0

    def test_every_alert_is_tested(self) -> None:
        tested = {t["alertname"] for case in CASES.values() for t in case["alert_rule_test"]}
        assert tested == set(ALERTS)
        for case in CASES.values():
            expectations = [bool(t["exp_alerts"]) for t in case["alert_rule_test"]]
            assert True in expectations and False in expectations  # each fires at one time and not at another


class TestPrometheusRuleSchema:
    """The rendered resource is what the Prometheus Operator accepts (its CRD's fields, nothing else)."""

    SCHEMA = FIXTURES / "prometheusrule-v1.schema.json"

    def test_valid(self, render: Render, kubernetes_validate: Any) -> None:
        rule = only(render(enabled({"runbookUrl": "https://wiki.example.com/lb"})), "PrometheusRule")
        kubernetes_validate.utils.jsonschema.validate(rule, json.loads(self.SCHEMA.read_text()))

    def test_a_misspelt_field_is_refused(self, render: Render, kubernetes_validate: Any) -> None:
        rule = copy.deepcopy(only(render(enabled()), "PrometheusRule"))
        rule["spec"]["groups"][0]["rules"][0]["expression"] = rule["spec"]["groups"][0]["rules"][0].pop("expr")
        with pytest.raises(kubernetes_validate.utils.jsonschema.ValidationError):
            kubernetes_validate.utils.jsonschema.validate(rule, json.loads(self.SCHEMA.read_text()))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects an object with these labels."""
    if not selector["matchLabels"].items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        matched = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not matched:
            return False
    return True


class TestScrapedOnce:
    """The ServiceMonitor scrapes the pods through one Service: through both, every series (and every sum in the
    alerts and the dashboard) would count twice, under job=<name> and job=<name>-headless."""

    @pytest.mark.parametrize("admin", [False, True])
    def test_one_service_only(self, render: Render, admin: bool) -> None:
        """The main Service, or with admin.enabled the headless one (the admin port is only there, so that a
        LoadBalancer never exposes it), whose scrapes are relabelled job=<name> as through the main Service."""
        manifests = render({"serviceMonitor": {"enabled": True}, "admin": {"enabled": admin}})
        monitor = only(manifests, "ServiceMonitor")["spec"]
        services = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Service"}
        selected = [m for m in services.values() if selects(monitor["selector"], m["metadata"]["labels"])]
        assert [m["metadata"]["name"] for m in selected] == [JOB + "-headless" if admin else JOB]
        assert JOB + "-headless" in services and JOB in services
        (endpoint,) = monitor["endpoints"]
        assert endpoint["port"] in [p["name"] for p in selected[0]["spec"]["ports"]]
        relabelled = [r for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"]
        assert relabelled == ([{"action": "replace", "targetLabel": "job", "replacement": JOB}] if admin else [])

    def test_the_matcher_matches(self) -> None:
        selector = {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "NotIn", "values": ["x"]}]}
        assert selects(selector, {"a": "1"}) and selects(selector, {"a": "1", "b": "y"})
        assert not selects(selector, {"a": "1", "b": "x"}) and not selects(selector, {"a": "2"})


class TestDeadLetterRunbook:
    """What the dead-letter alert tells the on-call engineer to run finds the dead letters it fired for: `stage`
    is `intake` for bad input, whose `dlq` selector is `(intake)`, else the sink's name."""

    RUNBOOK = {
        "intake": (
            "Elements the sender got wrong, kept as received for inspection; they cannot be replayed. List them with "
            "their reasons (kubectl exec -n audit log-bridge-0 -- log-bridge dlq list --sink '(intake)'), save what "
            "you need and delete them (log-bridge dlq purge --sink '(intake)' --yes)."
        ),
        "s3": (
            "List them with their reasons (kubectl exec -n audit log-bridge-0 -- log-bridge dlq list --sink s3), "
            "fix what the sink refused them for, then put them back with log-bridge dlq replay --sink s3."
        ),
    }

    @pytest.mark.parametrize("stage", list(RUNBOOK))
    def test_the_runbook_promtool_renders(self, render: Render, tmp_path: Path, stage: str) -> None:
        cut = copy.deepcopy(groups(render(enabled())))
        for group in cut:
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["annotations"] = {"runbook": rule["annotations"]["runbook"]}
        write_rules(tmp_path / "rules.yaml", cut)
        case = {
            "interval": "1m",
            "input_series": [series("log_bridge_events_dead_lettered_total", "0x5 3x10", stage=stage)],
            "alert_rule_test": [
                {
                    "eval_time": "8m",
                    "alertname": "LogBridgeEventsDeadLettered",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", **target(stage=stage)},
                            "exp_annotations": {"runbook": self.RUNBOOK[stage]},
                        }
                    ],
                }
            ],
        }
        (tmp_path / "tests.yaml").write_text(
            yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": [case]}, sort_keys=False)
        )
        result = run_promtool("test", "rules", tmp_path / "tests.yaml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_the_cap_alert_says_how_to_free_intake_dead_letters(self, render: Render) -> None:
        """At the cap, replay frees nothing of bad input: the runbook gives the purge that does."""
        alerts = {rule["alert"]: rule for rule in rules(render(enabled())) if "alert" in rule}
        runbook = alerts["LogBridgeDeadLettersNearlyFull"]["annotations"]["runbook"]
        assert "log-bridge dlq purge --sink '(intake)' --yes" in runbook
        assert "dlq list --sink '(intake)'" in runbook

    async def test_its_intake_command_lists_what_a_real_service_counted(
        self, start_service: StartService, client: aiohttp.ClientSession, tmp_path: Path, capsys: Any
    ) -> None:
        service = await start_service()
        body = orjson.dumps([sample_wrappers(1)[0], 42, {"no": "event"}])
        headers = {"Authorization": TOKEN, "Content-Type": "application/json"}
        async with client.post(service.url + "/workos", data=body, headers=headers) as response:
            assert response.status == 200
        async with client.get(service.url + "/metrics") as response:
            text = await response.text()
        assert scrape(text, "log_bridge_events_dead_lettered_total", stage="intake") == 2
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"journal": {"path": str(service.config.journal.path)}}))
        found = re.search(r"-- (log-bridge dlq list --sink \S+)\)", self.RUNBOOK["intake"])
        assert found is not None
        command = shlex.split(found[1])
        capsys.readouterr()
        assert main([*command[1:], "--config", str(config)]) == 0
        listed = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [letter["element"] for letter in listed] == [42, {"no": "event"}]
        # `--sink intake`, the stage's label as it is, names a sink called intake: it lists nothing.
        assert main(["dlq", "list", "--sink", "intake", "--config", str(config)]) == 0
        assert capsys.readouterr().out == ""

"""promtool (Debian package `prometheus`) for the alert and dashboard checks, and the metric names log-bridge exposes.

Without promtool the checks skip here, and FAIL when LOG_BRIDGE_REQUIRE_PROMTOOL=1 (as on CI): a CI run must not go
green without having evaluated the rules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import REPO

REQUIRE_PROMTOOL = "LOG_BRIDGE_REQUIRE_PROMTOOL"

# Metrics the receiver exposes that the alerts and the dashboard read, beyond those receiver/metrics.py names.
# Counters are listed without their _total suffix, as prometheus_client declares them.
DECLARED_METRICS = {
    "log_bridge_sink_up",
    "log_bridge_sink_backlog_events",
    "log_bridge_events_dead_lettered",
    "log_bridge_journal_bytes",
    "log_bridge_journal_max_bytes",
    "log_bridge_stream_last_event_timestamp_seconds",
    "log_bridge_requests_refused",
    "log_bridge_requests",
    "log_bridge_config_reloads",
    "log_bridge_config_last_reload_success_timestamp_seconds",
    "log_bridge_request_duration_seconds",
}
# What prometheus_client appends to a metric's name in the exposition, by metric type.
SUFFIXES = ("_total", "_bucket", "_sum", "_count")
# A PromQL word that is not a metric: functions, aggregations, keywords (a metric is a word not followed by "(").
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
# Aggregations may come before their `by (...)`/`without (...)`, away from their parenthesis.
KEYWORDS |= {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk"}
KEYWORDS |= {"quantile"}


def promtool() -> str:
    """Path of promtool; skips without it, or fails when LOG_BRIDGE_REQUIRE_PROMTOOL=1."""
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found: apt-get install prometheus (Debian) or put promtool on PATH"
        if os.environ.get(REQUIRE_PROMTOOL) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; its output is returned (the caller asserts on the exit status)."""
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def write_rules(path: Path, groups: list[dict[str, Any]]) -> Path:
    """A Prometheus rule file holding the groups."""
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def receiver_metrics() -> set[str]:
    """Names of the metrics receiver/metrics.py declares (as written there, counters without _total)."""
    source = (REPO / "receiver" / "metrics.py").read_text()
    return set(re.findall(r'"(log_bridge_[a-z0-9_]+)"', source))


def known_metric(name: str) -> bool:
    """A log_bridge_* series name the receiver exposes (the suffixes its types add allowed)."""
    known = receiver_metrics() | DECLARED_METRICS
    return name in known or any(name.endswith(s) and name.removesuffix(s) in known for s in SUFFIXES)


def metric_names(expr: str) -> set[str]:
    """Every metric an expression selects: the words that are not functions, keywords, labels or durations."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_groupings = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", without_matchers
    )
    without_ranges = re.sub(r"\[[^\]]*\]", "[]", without_groupings)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(?!\w)(\s*\()?", without_ranges):
        word, call = match[1], match[2]
        if call or word in KEYWORDS or re.fullmatch(r"[0-9.]+[smhdwy]?|Inf|NaN", word):
            continue
        names.add(word)
    return names

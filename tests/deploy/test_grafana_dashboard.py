"""The Grafana dashboard (docs/grafana-dashboard.json): what Grafana needs to load it from its sidecar, the chart's
ConfigMap carrying the same file, and queries that read only log-bridge's metrics and parse as PromQL (promtool)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from .prometheus import known_metric, metric_names, run_promtool, write_rules
from .support import CHART, NAMESPACE, REPO, Render, kinds, only

DOCS_COPY = REPO / "docs" / "grafana-dashboard.json"
CHART_COPY = CHART / "files" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's query variables and macros, replaced by what they stand for so promtool can parse the query.
GRAFANA_MACROS = {"$__rate_interval": "2m", "$__interval": "1m", "$__range": "1h"}
GRID_WIDTH = 24


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"namespace": NAMESPACE, "job": "log-bridge", "pod": "log-bridge-0", "instance": "10.0.0.1:8443", **labels}
    return {"series": metric + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


# What one pod exposes, over ten minutes of traffic.
POD_SERIES = [
    _series("log_bridge_events_received_total", "0+10x10", stream="workos"),
    _series("log_bridge_requests_refused_total", "0+1x10", stream="workos", reason="unauthorised"),
    _series("log_bridge_requests_total", "0+5x10", stream="workos", code="200"),
    *[
        _series("log_bridge_request_duration_seconds_bucket", f"0+{n}x10", stream="workos", le=le)
        for le, n in [("0.01", 3), ("0.1", 5), ("+Inf", 5)]
    ],
    _series("log_bridge_stream_last_event_timestamp_seconds", "0+60x10", stream="workos"),
    _series("log_bridge_sink_backlog_events", "0+3x10", sink="archive"),
    _series("log_bridge_sink_events_delivered_total", "0+10x10", sink="archive"),
    _series("log_bridge_sink_events_failed_total", "0+1x10", sink="archive", outcome="retry"),
    _series("log_bridge_sink_up", "1x10", sink="archive"),
    _series("log_bridge_events_dead_lettered_total", "0+1x10", stage="archive"),
    *[
        _series("log_bridge_sink_send_duration_seconds_bucket", f"0+{n}x10", sink="archive", le=le)
        for le, n in [("0.1", 1), ("1.0", 2), ("+Inf", 2)]
    ],
    _series("log_bridge_journal_bytes", "0+1000x10"),
    _series("log_bridge_journal_max_bytes", "1073741824x10"),
    _series("log_bridge_config_reloads_total", "0x4 1x6", result="success"),
]


# The label values in POD_SERIES, for the legends.
LABEL_VALUES = {
    "stream": "workos",
    "reason": "unauthorised",
    "code": "200",
    "sink": "archive",
    "outcome": "retry",
    "stage": "archive",
    "pod": "log-bridge-0",
    "result": "success",
}


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana reads it."""
    loaded: dict[str, Any] = json.loads(DOCS_COPY.read_text())
    return loaded


def graph_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows only group them), nested ones included."""
    found = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def exprs(board: dict[str, Any]) -> list[str]:
    """Every query of the dashboard's panels."""
    return [target["expr"] for panel in graph_panels(board) for target in panel["targets"]]


def as_promql(expr: str) -> str:
    """A panel's query with Grafana's macros and the template variables filled in."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return re.sub(r"\$\{?(namespace|job)\}?", ".*", expr)


class TestDashboard:
    """The JSON is a dashboard Grafana can provision."""

    def test_one_copy_in_the_chart(self) -> None:
        assert CHART_COPY.read_bytes() == DOCS_COPY.read_bytes(), (
            "helm/log-bridge/files/grafana-dashboard.json must equal docs/grafana-dashboard.json: copy it over"
        )

    def test_top_level(self) -> None:
        board = dashboard()
        assert board["title"] == "log-bridge"
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"])  # Grafana's limit on uid
        assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
        assert "id" not in board or board["id"] is None  # provisioned dashboards get their id from Grafana
        assert "__inputs" not in board  # that is import-only: the sidecar would leave ${DS_...} unresolved

    def test_datasource_variable(self) -> None:
        variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for name in ("namespace", "job"):
            assert variables[name]["type"] == "query"
            assert variables[name]["datasource"] == DATASOURCE
            assert variables[name]["includeAll"] is True

    def test_panels_use_the_variable(self) -> None:
        panels = graph_panels(dashboard())
        assert len(panels) >= 8
        ids = [p["id"] for p in dashboard()["panels"]] + [p["id"] for p in panels if p not in dashboard()["panels"]]
        assert len(ids) == len(set(ids)), "panel ids must be unique"
        for panel in panels:
            assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}, panel["title"]
            assert panel["datasource"] == DATASOURCE, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, panel["title"]
                assert re.fullmatch(r"[A-Z]", target["refId"]), panel["title"]
                assert 'namespace=~"$namespace"' in target["expr"] and 'job=~"$job"' in target["expr"], panel["title"]

    def test_grid_positions(self) -> None:
        """Every panel has a place in Grafana's 24-column grid and no two overlap."""
        cells: dict[tuple[int, int], str] = {}
        for panel in dashboard()["panels"] + [p for p in graph_panels(dashboard()) if p not in dashboard()["panels"]]:
            pos = panel["gridPos"]
            assert {"h", "w", "x", "y"} <= set(pos), panel["title"]
            assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= GRID_WIDTH, panel["title"]
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = panel["title"]

    def test_shows_what_an_operator_needs(self) -> None:
        """Intake and refusals per stream, backlog and delivery per sink, dead letters, journal use, latency."""
        queries = exprs(dashboard())
        wanted = {
            "log_bridge_events_received_total": "stream",
            "log_bridge_requests_refused_total": "stream",
            "log_bridge_sink_backlog_events": "sink",
            "log_bridge_sink_events_delivered_total": "sink",
            "log_bridge_events_dead_lettered_total": "stage",
            "log_bridge_journal_max_bytes": "",
            "log_bridge_request_duration_seconds_bucket": "stream",
        }
        for metric, label in wanted.items():
            using = [q for q in queries if metric in q]
            assert using, metric
            assert any(f"by ({label}" in q or f", {label}" in q for q in using) or not label, metric

    def test_only_log_bridge_metrics(self) -> None:
        board = dashboard()
        variable_queries = [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
        for expr in exprs(board) + variable_queries:
            names = metric_names(as_promql(re.sub(r"label_values\((.*), \w+\)", r"\1", expr)))
            assert names, expr
            assert {n for n in names if not known_metric(n)} == set(), expr

    def test_queries_parse(self, tmp_path: Path) -> None:
        """promtool parses every query (as the expression of a recording rule)."""
        records = [{"record": f"panel:query{i}", "expr": as_promql(e)} for i, e in enumerate(exprs(dashboard()))]
        path = write_rules(tmp_path / "dashboard.yaml", [{"name": "dashboard", "rules": records}])
        result = run_promtool("check", "rules", path)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_queries_return_data(self, tmp_path: Path) -> None:
        """On series shaped like a pod's /metrics, every query has a result, with the labels its legend shows."""
        write_rules(tmp_path / "none.yaml", [{"name": "none", "rules": []}])
        checks = []
        for panel in graph_panels(dashboard()):
            for target in panel["targets"]:
                legend = re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"])
                expected = "{" + ", ".join(f'{label}="{LABEL_VALUES[label]}"' for label in legend) + "}"
                by = ", ".join(legend)
                expr = f"group by ({by}) ({as_promql(target['expr'])})"
                checks.append({"expr": expr, "eval_time": "5m", "exp_samples": [{"labels": expected, "value": 1}]})
        tests = {
            "rule_files": ["none.yaml"],
            "tests": [{"interval": "1m", "input_series": POD_SERIES, "promql_expr_test": checks}],
        }
        (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
        result = run_promtool("test", "rules", tmp_path / "tests.yaml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_a_bad_query_is_caught(self, tmp_path: Path) -> None:
        path = write_rules(tmp_path / "bad.yaml", [{"name": "d", "rules": [{"record": "a:b", "expr": "sum by (x"}]}])
        assert run_promtool("check", "rules", path).returncode != 0
        assert metric_names("rate(node_cpu_seconds_total[5m])") == {"node_cpu_seconds_total"}
        assert not known_metric("node_cpu_seconds_total")


class TestDashboardConfigMap:
    """The chart ships the dashboard for Grafana's sidecar."""

    def values(self, **extra: Any) -> dict[str, Any]:
        return {"metrics": {"grafanaDashboard": {"enabled": True, **extra}}}

    def test_off_by_default(self, render: Render) -> None:
        assert [m for m in render() if m["kind"] == "ConfigMap" and m["metadata"]["name"].endswith("-dashboard")] == []

    def test_holds_the_dashboard(self, render: Render, kubernetes_validate: Any) -> None:
        manifests = render(self.values())
        config_map = only(manifests, "ConfigMap", name="log-bridge-dashboard")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == NAMESPACE
        assert json.loads(config_map["data"]["log-bridge.json"]) == dashboard()
        assert config_map["data"]["log-bridge.json"] == DOCS_COPY.read_text().rstrip("\n")
        kubernetes_validate.validate(config_map, "1.30.0", strict=True)
        assert kinds(manifests).count("ConfigMap") == 2

    def test_labels_namespace_annotations(self, render: Render) -> None:
        values = self.values(
            labels={"grafana_dashboard": None, "dashboards": "audit"},
            namespace="grafana",
            annotations={"grafana_folder": "Audit"},
        )
        config_map = only(render(values), "ConfigMap", name="log-bridge-dashboard")
        assert config_map["metadata"]["namespace"] == "grafana"
        assert config_map["metadata"]["labels"]["dashboards"] == "audit"
        assert "grafana_dashboard" not in config_map["metadata"]["labels"]  # null drops a default label
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "Audit"}

    @pytest.mark.parametrize("values", [{"labels": {"grafana_dashboard": 1}}, {"enabled": "yes"}, {"folder": "x"}])
    def test_schema_refuses(self, helm: Any, chart: Any, values: dict[str, Any]) -> None:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"metrics": {"grafanaDashboard": values}})

"""The config each scenario renders into the ConfigMap is one log-bridge accepts: `log-bridge validate` on it.

The pod's environment is reproduced (one dummy value per secret variable the chart injects), so `${VAR}`
references resolve exactly as they would in the cluster.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from .support import REPO, SCENARIOS, Render, load_values, only, scenario_id, tool_path

SCENARIO_IDS = [scenario_id(p) for p in SCENARIOS]


def pod_environment(render: Render, values: dict[str, object]) -> tuple[str, dict[str, str]]:
    """The rendered config text, and the environment the container would get (secrets as dummies)."""
    manifests = render(values)
    text: str = only(manifests, "ConfigMap")["data"]["config.yaml"]
    environ = {key: value for key, value in os.environ.items() if not key.startswith("LOG_BRIDGE")}
    sts = only(manifests, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    for entry in container["env"]:
        if entry["name"].endswith("REDIS_URL"):  # a URL the config checks the shape of
            environ[entry["name"]] = "rediss://:dummy-password@redis.audit.svc:6380/0"
        elif "valueFrom" in entry:
            environ[entry["name"]] = f"dummy-{entry['name'].lower()}-0123456789"
        elif entry["name"] != "LOG_BRIDGE_CONFIG":
            environ[entry["name"]] = entry["value"]
    return text, environ


def validate(config: Path, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `log-bridge validate --config FILE`, without the TLS files (the pod's Secret volume holds them)."""
    return subprocess.run(
        [tool_path("log-bridge"), "validate", "--skip-tls-files", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**environ, "PYTHONPATH": str(REPO)},  # this checkout's code, wherever the package is installed from
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("path", SCENARIOS, ids=SCENARIO_IDS)
def test_log_bridge_accepts_the_rendered_config(render: Render, path: Path, tmp_path: Path) -> None:
    text, environ = pod_environment(render, load_values(path))
    config = tmp_path / "config.yaml"
    config.write_text(text)
    result = validate(config, environ)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration OK" in result.stdout


def test_validate_refuses_a_broken_config(render: Render, tmp_path: Path) -> None:
    """The check is real: the same rendered config with a misspelt key is refused."""
    text, environ = pod_environment(render, {})
    tree = yaml.safe_load(text)
    tree["journal"]["max_byte"] = tree["journal"].pop("max_bytes")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    result = validate(config, environ)
    assert result.returncode != 0
    assert "journal.max_byte" in result.stdout + result.stderr


def test_validate_needs_the_secret_variables(render: Render, tmp_path: Path) -> None:
    """Without the Secret's variables the config is refused, naming the variable (what a pod would log)."""
    text, environ = pod_environment(render, {})
    environ.pop("LOG_BRIDGE_TOKEN")
    config = tmp_path / "config.yaml"
    config.write_text(text)
    result = validate(config, environ)
    assert result.returncode != 0
    assert "LOG_BRIDGE_TOKEN" in result.stdout + result.stderr


def test_every_sink_of_the_scenario_is_checked(render: Render, tmp_path: Path) -> None:
    """Each sink's own options are validated: a misspelt key in any of them is refused, by its YAML path."""
    values = load_values(next(p for p in SCENARIOS if scenario_id(p) == "all-sinks-existing-secret"))
    text, environ = pod_environment(render, values)
    sinks = yaml.safe_load(text)["sinks"]
    assert {section["type"] for section in sinks.values()} >= {"file", "splunk_hec", "datadog", "s3"}
    for name in sinks:
        tree = yaml.safe_load(text)
        tree["sinks"][name]["no_such_option"] = 1
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(tree))
        result = validate(config, environ)
        assert result.returncode != 0, name
        assert f"sinks.{name}.no_such_option" in result.stdout + result.stderr

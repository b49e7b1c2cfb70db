"""The sink registry: built-in types, plugins through the entry-point group, friendly errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from receiver.config import parse_config
from receiver.errors import ConfigError
from sinks import registry
from sinks.errors import SinkTypeError


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path holding an installed plugin distribution and a sink whose dependency is missing."""
    (tmp_path / "acme_sink.py").write_text(
        "from sinks.memory import MemorySink\n\nclass AcmeSink(MemorySink):\n    pass\n"
    )
    (tmp_path / "needs_missing.py").write_text("import log_bridge_missing_dependency  # noqa\n")
    info = tmp_path / "acme_sink-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sink\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[log_bridge.sinks]\nacme = acme_sink:AcmeSink\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


class TestRegistry:
    def test_builtin_types_load(self) -> None:
        for name in ("file", "memory"):
            assert hasattr(registry.load(name), "Config")

    def test_unknown_type_lists_known_ones(self) -> None:
        with pytest.raises(SinkTypeError, match="unknown sink type 'kafka'; known types: .*file.*splunk_hec"):
            registry.load("kafka")

    def test_plugin_from_the_entry_point_group(self, plugin_path: Path) -> None:
        assert "acme" in registry.known_types()
        config = parse_config(
            {"streams": [{"name": "s", "path": "/s", "sinks": ["x"]}], "sinks": {"x": {"type": "acme"}}}, {}
        )
        assert config.sinks["x"].type == "acme"
        assert registry.load("acme").__name__ == "AcmeSink"

    def test_missing_optional_dependency_names_the_extra(
        self, plugin_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(registry.BUILTIN, "needs", "needs_missing:Sink")
        monkeypatch.setitem(registry.EXTRAS, "needs", "needs")
        with pytest.raises(SinkTypeError) as caught:
            registry.load("needs")
        assert "log_bridge_missing_dependency" in str(caught.value)
        assert "pip install 'log-bridge[needs]'" in str(caught.value)
        with pytest.raises(ConfigError) as config_error:
            parse_config({"streams": [{"name": "s", "path": "/s", "sinks": ["x"]}], "sinks": {"x": {"type": "needs"}}})
        assert config_error.value.errors[0].startswith("sinks.x.type: sink type 'needs' needs a package")
        sys.modules.pop("needs_missing", None)

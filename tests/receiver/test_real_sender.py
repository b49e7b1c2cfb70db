"""A real HTTP sender that is not this project's: syslog-ng's http() destination posting WorkOS wrappers.

syslog-ng tails a file of wrappers (one per line) and posts them in batches, as NDJSON or as a JSON array, with
the stream's secret header, to a running log-bridge. Its HTTP client (libcurl) brings its own framing, keep-alive
and headers, so this checks the intake against a sender that shares none of the test suite's code.

Needs Debian's `syslog-ng-core` and `syslog-ng-mod-http`; the tests skip without them, except on CI
(`LOG_BRIDGE_REQUIRE_SYSLOG_NG=1`, set by `.ci/run`), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from receiver.journal import INTAKE, list_dead_letters
from receiver.samples import sample_wrappers
from receiver.server import Service
from tests.conftest import TOKEN, StartService, memory

REQUIRE_ENV = "LOG_BRIDGE_REQUIRE_SYSLOG_NG"
PACKAGES = "syslog-ng-core syslog-ng-mod-http"
BATCH_LINES = 50


def _http_module_missing() -> str:
    program = shutil.which("syslog-ng")
    if program is None:
        return "syslog-ng is not installed"
    shown = subprocess.run([program, "-V"], capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    modules = next((line for line in shown.stdout.splitlines() if line.startswith("Available-Modules:")), "")
    if "http" not in modules.split(":", 1)[-1].split(","):
        return "syslog-ng's http module is not installed"
    return ""


@pytest.fixture(scope="module")
def syslog_ng() -> str:
    """The syslog-ng program, with its http() destination."""
    missing = _http_module_missing()
    if missing:
        message = f"{missing} (apt-get install -y {PACKAGES})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)
    program = shutil.which("syslog-ng")
    assert program is not None
    return program


class Sender:
    """One syslog-ng process posting the lines of `input` to `url`."""

    def __init__(self, program: str, workdir: Path, url: str, *, json_array: bool, token: str = TOKEN) -> None:
        self.workdir = workdir
        self.input = workdir / "wrappers.ndjson"
        self.input.touch()
        framing = (
            'body-prefix("[") delimiter(",") body-suffix("]")\n    headers("Content-Type: application/json"'
            if json_array
            else 'delimiter("\\n")\n    headers("Content-Type: application/x-ndjson"'
        )
        config = workdir / "syslog-ng.conf"
        config.write_text(
            f"""@version: 3.38
options {{ stats_freq(0); }};
source s_wrappers {{ file("{self.input}" follow-freq(0.05) flags(no-parse)); }};
destination d_log_bridge {{
  http(
    url("{url}")
    method("POST")
    {framing}, "Authorization: {token}")
    body("${{MSG}}")
    batch-lines({BATCH_LINES})
    batch-timeout(200)
    workers(1)
  );
}};
log {{ source(s_wrappers); destination(d_log_bridge); }};
"""
        )
        self.output = (workdir / "syslog-ng.out").open("wb")
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [program, "-F", "-e", "--no-caps", "-f", str(config), "-R", str(workdir / "persist"),
             "-p", str(workdir / "pid"), "-c", str(workdir / "ctl")],
            stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def write(self, lines: list[bytes]) -> None:
        with self.input.open("ab") as f:
            f.write(b"".join(line + b"\n" for line in lines))

    def stop(self) -> str:
        """Stop syslog-ng (it flushes what it holds) and return what it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.output.close()
        return (self.workdir / "syslog-ng.out").read_text(errors="replace")


@pytest.fixture
def senders(syslog_ng: str, tmp_path: Path) -> Iterator[list[Sender]]:
    """Senders started by a test; all stopped at the end."""
    started: list[Sender] = []
    yield started
    for one in started:
        one.stop()


async def wait_for_events(count: int, sender: Sender, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(memory().events) < count:
        if sender.proc.poll() is not None:
            pytest.fail(f"syslog-ng exited with status {sender.proc.returncode}:\n{sender.stop()}")
        if loop.time() > deadline:
            pytest.fail(f"{len(memory().events)} of {count} events arrived; syslog-ng said:\n{sender.stop()}")
        await asyncio.sleep(0.05)


def requests_answered(service: Service, code: str) -> float:
    """`log_bridge_requests_total` of the stream for one status code."""
    value = service.metrics.registry.get_sample_value("log_bridge_requests_total", {"stream": "workos", "code": code})
    return value or 0.0


class TestSyslogNgSender:
    @pytest.mark.parametrize("json_array", [False, True], ids=["ndjson", "json-array"])
    async def test_every_wrapper_arrives_once_in_order(
        self, start_service: StartService, syslog_ng: str, senders: list[Sender], tmp_path: Path, json_array: bool
    ) -> None:
        service = await start_service()
        wrappers = sample_wrappers(3 * BATCH_LINES + 7)
        one = Sender(syslog_ng, tmp_path, service.url + "/workos", json_array=json_array)
        senders.append(one)
        one.write([orjson.dumps(w) for w in wrappers])
        await wait_for_events(len(wrappers), one)
        assert [e.wrapper for e in memory().events] == wrappers
        assert requests_answered(service, "200") >= 4  # syslog-ng's batches of 50, not one request
        assert requests_answered(service, "400") == 0
        await asyncio.sleep(0.3)  # nothing more trickles in
        assert len(memory().events) == len(wrappers)

    async def test_a_broken_line_is_kept_aside_and_its_neighbours_delivered(
        self, start_service: StartService, syslog_ng: str, senders: list[Sender], tmp_path: Path
    ) -> None:
        service = await start_service()
        wrappers = sample_wrappers(20)
        lines = [orjson.dumps(w) for w in wrappers]
        lines.insert(10, b'{"event": {"action": "user.signed_in"')  # cut off mid-object
        one = Sender(syslog_ng, tmp_path, service.url + "/workos", json_array=False)
        senders.append(one)
        one.write(lines)
        await wait_for_events(len(wrappers), one)
        assert [e.wrapper for e in memory().events] == wrappers
        (letter,) = list_dead_letters(service.config.journal.path, INTAKE)
        assert letter.data == lines[10] and "not valid JSON" in letter.reason

    async def test_the_wrong_secret_is_refused_and_nothing_is_stored(
        self, start_service: StartService, syslog_ng: str, senders: list[Sender], tmp_path: Path
    ) -> None:
        service = await start_service()
        one = Sender(syslog_ng, tmp_path, service.url + "/workos", json_array=False, token="Bearer wrong")  # noqa: S106
        senders.append(one)
        one.write([orjson.dumps(w) for w in sample_wrappers(5)])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while requests_answered(service, "401") < 1 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert requests_answered(service, "401") >= 1
        assert memory().events == []
        assert not service.metrics.registry.get_sample_value("log_bridge_events_received_total", {"stream": "workos"})

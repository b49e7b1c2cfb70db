"""Defects found by trying to break reload, 100-continue, TLS rotation, the backlog gauge and log scrubbing.
Each test fails on the code it was written against; the one-line docstring says what goes wrong."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from receiver.config import parse_config
from receiver.samples import encode_body, sample_wrappers
from receiver.server import Service
from tests.conftest import BASE_CONFIG, TOKEN, http_peer, merge, scrape
from tests.receiver.test_reload import reloads, running, wait_for

__all__ = ["running"]  # the fixture, shared with test_reload


ROOT = Path(__file__).resolve().parents[2]
THIS_TREE = {**os.environ, "PYTHONPATH": str(ROOT)}
"""The environment that makes a `python -m receiver.cli` child run this checkout's code."""


def serve_command(config: Path, *extra: str) -> list[str]:
    """`log-bridge serve` of this checkout, on `config`."""
    return [sys.executable, "-m", "receiver.cli", "serve", "--config", str(config), *extra]


def memory_config(tmp_path: Path, host: str = "127.0.0.1", port: int = 0, **server: Any) -> Path:
    """A configuration with one stream into a memory sink, journal under `tmp_path`; its path."""
    config = {
        "server": {"host": host, "port": port, "allowlist": ["127.0.0.1/32"], **server},
        "journal": {"path": str(tmp_path / "journal.db")},
        "streams": [{"name": "w", "path": "/w", "auth": {"values": [TOKEN]}, "sinks": ["m"]}],
        "sinks": {"m": {"type": "memory"}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def post(session: aiohttp.ClientSession, url: str, wrappers: list[dict[str, Any]]) -> int:
    body, content_type = encode_body(wrappers, "json")
    async with session.post(url, data=body, headers={"Authorization": TOKEN, "Content-Type": content_type}) as r:
        await r.read()
        return r.status


def two_streams() -> dict[str, Any]:
    """BASE_CONFIG with a second stream, "other" at /other, feeding the same memory sink."""
    tree = merge(BASE_CONFIG, {})
    tree["streams"] = [
        {**BASE_CONFIG["streams"][0]},
        {"name": "other", "path": "/other", "auth": {"values": [TOKEN]}, "sinks": ["mem"]},
    ]
    return tree


async def start_post(port: int, *, close: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A POST of 4 events to /workos of which only the head and the body's first 10 bytes are sent."""
    body, content_type = encode_body(sample_wrappers(4), "json")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connection = "Connection: close\r\n" if close else ""
    head = (
        f"POST /workos HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{connection}\r\n"
    ).encode()
    writer.write(head + body[:10])
    await writer.drain()
    return reader, writer, body


async def finish_post(
    service: Service, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
) -> None:
    """Send the rest of a `start_post` request; it may be refused, but answered 200 only once its 4 events reach
    the memory sink `mem`."""
    writer.write(body[10:])
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    runner = service.engine.runners["mem"]  # type: ignore[union-attr]
    await asyncio.sleep(0.5)
    await wait_for(lambda: runner.cursor == service.journal.last_seq)
    delivered = len(runner.sink.events)  # type: ignore[attr-defined]
    assert status != 200 or delivered == 4, f"answered {status}, {delivered} of 4 events delivered"


def actions(count: int, action: str) -> list[dict[str, Any]]:
    wrappers = sample_wrappers(count)
    for wrapper in wrappers:
        wrapper["event"]["action"] = action
    return wrappers


class TestStreamChangesLoseBacklog:
    async def test_renaming_a_stream_keeps_its_acknowledged_backlog_owed(self, running) -> None:
        """Renaming a stream (same path, same sink) while its sink is behind silently drops the events already
        acknowledged under the old name: the sink skips them as another stream's, no log line says so."""
        tree = merge(BASE_CONFIG, {"sinks": {"mem": {"fail": "retry"}}})
        service, file = await running(tree)
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                assert await post(session, service.url + "/workos", sample_wrappers(10)) == 200
        acknowledged = service.journal.last_seq
        assert acknowledged == 50
        renamed = merge(file.tree, {"sinks": {"mem": {"fail": "none"}}})  # the sink recovers in the same reload
        renamed["streams"] = [{**file.tree["streams"][0], "name": "workos-prod"}]
        file.write(renamed)
        assert await service.reload()
        runner = service.engine.runners["mem"]  # type: ignore[union-attr]
        await wait_for(lambda: runner.cursor == service.journal.last_seq)
        delivered = len(runner.sink.events)  # type: ignore[attr-defined]
        assert delivered == acknowledged, f"{acknowledged} events acknowledged, {delivered} delivered"

    async def test_a_request_in_flight_on_a_removed_stream_is_not_acknowledged_and_dropped(self, running) -> None:
        """A request that started before a reload removed its stream is answered 200, yet its events are
        delivered to no sink (the sink stays, fed by another stream): acknowledged and lost."""
        tree = two_streams()
        service, file = await running(tree)
        reader, writer, body = await start_post(service.port, close=True)
        await asyncio.sleep(0.2)  # the request has started with /workos's intake
        removed = merge(file.tree, {})
        removed["streams"] = [tree["streams"][1]]
        file.write(removed)
        assert await service.reload()
        await finish_post(service, reader, writer, body)


class TestBacklogGauge:
    async def test_excluded_actions_are_not_counted_as_owed(self, start_service, client) -> None:
        """With exclude_actions, log_bridge_sink_backlog_events counts events the sink will never be given
        (while it retries, 300 excluded events show as owed beside the 1 it really owes)."""
        service = await start_service(
            {"sinks": {"mem": {"fail": "retry", "exclude_actions": ["noise.*"], "retry": {"initial": "5s"}}}}
        )
        url = service.url + "/workos"
        assert await post(client, url, actions(1, "user.signed_in")) == 200
        runner = service.engine.runners["mem"]
        await wait_for(lambda: runner._in_flight == 1)  # being retried
        for _ in range(3):
            assert await post(client, url, actions(100, "noise.heartbeat")) == 200
        await asyncio.sleep(2.5)  # the gauge is recounted every second
        text = (await (await client.get(service.url + "/metrics")).read()).decode()
        gauge = scrape(text, "log_bridge_sink_backlog_events", sink="mem")
        assert gauge == 1, f"backlog gauge {gauge}; the sink owes 1 event"

    async def test_a_removed_stream_stops_being_reported_as_silent(self, running, client) -> None:
        """After a reload removes a stream, its log_bridge_stream_last_event_timestamp_seconds stays exported and
        frozen, so a "no event for 6 h" alert fires for a stream that no longer exists (until a restart)."""
        tree = merge(BASE_CONFIG, {})
        tree["streams"] = [
            {**BASE_CONFIG["streams"][0]},
            {"name": "other", "path": "/other", "auth": {"values": [TOKEN]}, "sinks": ["mem"]},
        ]
        service, file = await running(tree)
        assert await post(client, service.url + "/workos", sample_wrappers(2)) == 200
        removed = merge(file.tree, {})
        removed["streams"] = [file.tree["streams"][1]]
        file.write(removed)
        assert await service.reload()
        text = (await (await client.get(service.url + "/metrics")).read()).decode()
        stale = scrape(text, "log_bridge_stream_last_event_timestamp_seconds", stream="workos")
        assert stale is None, "the removed stream's last-event time is still exported"


class TestExpect:
    async def test_http10_expect_is_ignored(self, start_service) -> None:
        """An HTTP/1.0 request with `Expect: 100-continue` is sent an interim `HTTP/1.1 100 Continue` (HTTP/1.0
        has no 1xx; RFC 9110 10.1.1: the expectation MUST be ignored), where aiohttp's own handler ignores it."""
        service = await start_service()
        body, content_type = encode_body(sample_wrappers(1), "json")
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(
            (
                f"POST /workos HTTP/1.0\r\nAuthorization: {TOKEN}\r\nContent-Type: {content_type}\r\n"
                f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), answer[:60]


class TestProcess:
    def test_a_hangup_during_start_up_does_not_kill_the_process(self, tmp_path: Path) -> None:
        """SIGHUP while `log-bridge serve` is still starting (its own code running, before serve() installs
        the handler) kills it with no log line (exit -SIGHUP): a HUP must never stop the service."""
        import signal
        import subprocess
        import time

        config = memory_config(tmp_path, shutdown_timeout="2s")
        proc = subprocess.Popen(
            serve_command(config),
            cwd=tmp_path,
            env=THIS_TREE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 20
            # Once the process has loaded orjson, log-bridge's own modules are being imported.
            while "orjson" not in Path(f"/proc/{proc.pid}/maps").read_text():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.002)
            proc.send_signal(signal.SIGHUP)
            time.sleep(3)
            assert proc.poll() is None, f"log-bridge exited with {proc.returncode} on a SIGHUP during start-up"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
            if proc.stderr:
                proc.stderr.close()


class TestReloadCommand:
    @staticmethod
    def reload(pid_file: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "receiver.cli", "reload", "--pid-file", str(pid_file)],
            capture_output=True,
            text=True,
            timeout=60,
            env=THIS_TREE,
        )

    def test_a_pid_file_naming_another_program_signals_nothing(self, tmp_path: Path) -> None:
        """A pid file left by a serve that was killed names whatever process has that id now: `reload` sent it a
        SIGHUP, which kills most programs (a shell, an editor)."""
        other = subprocess.Popen(["sleep", "60"])  # noqa: S607 - a program that a SIGHUP ends
        try:
            pid_file = tmp_path / "serve.pid"
            pid_file.write_text(f"{other.pid}\n")
            result = self.reload(pid_file)
            assert result.returncode == 1 and other.poll() is None, result.stderr
            assert f"process {other.pid} is not a log-bridge serve" in result.stderr
        finally:
            other.kill()
            other.wait()

    @pytest.mark.parametrize("pid", ["0", "-1"])
    def test_a_pid_that_is_no_process_id_is_refused(self, tmp_path: Path, pid: str) -> None:
        """`0` sent the SIGHUP to reload's own process group, `-1` to every process it may signal."""
        pid_file = tmp_path / "serve.pid"
        pid_file.write_text(f"{pid}\n")
        result = self.reload(pid_file)
        assert result.returncode == 1
        assert (
            result.stderr == f"log-bridge reload: cannot signal the process in {pid_file}: {pid} is not a process id\n"
        )

    @pytest.mark.parametrize("content", [b"abc\n", b"", b"\xff\xfe"])
    def test_a_pid_file_without_a_number_is_refused_in_words(self, tmp_path: Path, content: bytes) -> None:
        """Was a defect: the error was int()'s own (`invalid literal for int() with base 10: 'abc'`), or a
        codec's for bytes that are not UTF-8."""
        pid_file = tmp_path / "serve.pid"
        pid_file.write_bytes(content)
        result = self.reload(pid_file)
        assert result.returncode == 1
        assert result.stderr == f"log-bridge reload: cannot signal the process in {pid_file}: it holds no process id\n"

    def test_a_running_serve_is_signalled(self, tmp_path: Path) -> None:
        config, pid_file = memory_config(tmp_path), tmp_path / "serve.pid"
        log = tmp_path / "serve.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(serve_command(config, "--pid-file", str(pid_file)), env=THIS_TREE, stderr=out)
        try:
            deadline = time.monotonic() + 20
            while "listening" not in log.read_text():
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.05)
            result = self.reload(pid_file)
            assert result.returncode == 0, result.stderr
            while "configuration reloaded" not in log.read_text():
                assert time.monotonic() < deadline + 20 and proc.poll() is None, log.read_text()
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)


class TestRemovedSinkLog:
    async def test_the_removal_line_counts_what_the_sink_still_owed(
        self, running, client, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Removing a sink that never delivered (retrying since start-up, so it has no cursor row yet) logs
        "undelivered_events": 0 while 30 acknowledged events are abandoned: the audit trail understates the loss."""
        tree = merge(BASE_CONFIG, {"sinks": {"mem": {"fail": "retry"}, "keep": {"type": "memory"}}})
        tree["streams"] = [{**BASE_CONFIG["streams"][0], "sinks": ["mem", "keep"]}]
        service, file = await running(tree)
        for _ in range(3):
            assert await post(client, service.url + "/workos", sample_wrappers(10)) == 200
        await asyncio.sleep(0.3)
        removed = merge(file.tree, {})
        removed["streams"] = [{**file.tree["streams"][0], "sinks": ["keep"]}]
        file.write(removed)
        assert await service.reload()
        line = next(r for r in caplog.records if r.getMessage().startswith("sink removed"))
        assert line.undelivered_events == 30, f"logged {line.undelivered_events} undelivered; 30 were owed"


class TestConfigFiles:
    def test_a_recursive_anchor_is_a_clear_error(self, tmp_path: Path) -> None:
        """A YAML anchor that refers to itself makes `validate`/`serve` die with a RecursionError traceback
        (in the duplicate-key check) instead of one error naming the file."""
        from receiver.config import load_config
        from receiver.errors import ConfigError

        path = tmp_path / "config.yaml"
        path.write_text(
            "server: &a {allowlist: [127.0.0.1/32], again: *a}\n"
            "streams: [{name: w, path: /w, sinks: [m]}]\nsinks: {m: {type: memory}}\n"
        )
        with pytest.raises(ConfigError):
            load_config(path, {})

    @pytest.mark.parametrize("value", ["!!int abc", "!!float abc", "!!timestamp 2020-99-99", "!!timestamp abc"])
    def test_a_bad_yaml_tag_is_a_clear_error(self, tmp_path: Path, value: str) -> None:
        """An explicit YAML tag whose value does not convert (`port: !!int abc`) escapes as a ValueError
        traceback from `validate`/`serve`, quoting the value, instead of an error naming the YAML path."""
        from receiver.config import load_config
        from receiver.errors import ConfigError

        path = tmp_path / "config.yaml"
        path.write_text(
            f"server: {{port: {value}, allowlist: [127.0.0.1/32]}}\n"
            "streams: [{name: w, path: /w, sinks: [m]}]\nsinks: {m: {type: memory}}\n"
        )
        with pytest.raises(ConfigError):
            load_config(path, {})

    async def test_a_reload_of_a_file_that_is_not_utf8_is_refused_naming_it(
        self, running, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A file saved as Latin-1 made the reload fail with a bare `UnicodeDecodeError` ("reload failed"), not the
        refusal that says what is wrong with the file."""
        service, file = await running(BASE_CONFIG)
        data = yaml.safe_dump(file.tree).encode() + b"# caf\xe9\n"
        file.path.write_bytes(data)
        assert not await service.reload()
        line = next(r for r in caplog.records if r.getMessage().startswith("reload refused"))
        where = f"line {len(data.splitlines())}, byte {data.index(0xE9) + 1}"
        assert line.problems == [f"{file.path}: not UTF-8 text ({where}); save it as UTF-8"]
        assert reloads(service, "failure") == 1


class TestRemovedSinkFreesTheJournal:
    async def test_removing_the_stuck_sink_lets_the_intake_accept_again(self, running, client) -> None:
        """The journal is over its cap because one sink is stuck; removing that sink by reload frees nothing
        (rows are freed only when a sink commits, and the healthy sink is idle since intake is refused), so
        every request keeps getting 503 journal_full and /readyz stays 503: the intake is stuck for good."""
        tree = merge(
            BASE_CONFIG,
            {"journal": {"max_bytes": "64KiB"}, "sinks": {"mem": {"fail": "retry"}, "keep": {"type": "memory"}}},
        )
        tree["streams"] = [{**BASE_CONFIG["streams"][0], "sinks": ["mem", "keep"]}]
        service, file = await running(tree)
        url = service.url + "/workos"
        for _ in range(200):
            if await post(client, url, sample_wrappers(50)) == 503:
                break
        assert service.journal.over_cap
        await asyncio.sleep(3)  # `keep` has delivered everything and is idle
        removed = merge(file.tree, {})
        removed["streams"] = [{**file.tree["streams"][0], "sinks": ["keep"]}]
        file.write(removed)
        assert await service.reload()
        statuses = []
        for _ in range(10):
            await asyncio.sleep(0.5)
            statuses.append(await post(client, url, sample_wrappers(5)))
            if statuses[-1] == 200:
                break
        assert statuses[-1] == 200, (
            f"after removing the stuck sink: {statuses}, journal {service.journal.size_bytes} bytes"
        )


def serve_once(tmp_path: Path, host: str, port: int, seconds: float = 20) -> tuple[int | None, str]:
    """Run `log-bridge serve` (this tree's code) on host:port; its exit status (None: still running after
    `seconds`, then stopped) and stderr."""
    import signal
    import subprocess

    proc = subprocess.Popen(
        serve_command(memory_config(tmp_path, host, port, shutdown_timeout="1s")),
        cwd=tmp_path,
        env=THIS_TREE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=seconds)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        return None, err


class TestListenErrors:
    def test_a_taken_port_is_named(self, tmp_path: Path) -> None:
        """With the port taken, start-up says only "cannot start: Address already in use" (the address and port
        are gone; before dual-stack listening aiohttp's message named ('127.0.0.1', port))."""
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            status, err = serve_once(tmp_path, "127.0.0.1", port)
        last = err.strip().splitlines()[-1]
        assert status == 2, err
        assert str(port) in last and "127.0.0.1" in last, last

    def test_an_empty_host_still_listens_on_every_interface(self, tmp_path: Path) -> None:
        """`server.host: ""` passes validation and used to listen on every interface; now start-up fails with
        "Name or service not known" (getaddrinfo of an empty name)."""
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        status, err = serve_once(tmp_path, "", port, seconds=6)
        assert status is None, f"exited {status}: {err.strip().splitlines()[-1:]}"


class TestReadinessOnAFullDisk:
    async def test_a_housekeeping_write_does_not_make_a_full_disk_ready(self, start_service, tmp_path: Path) -> None:
        """On a full disk, the dedup prune (every 60 s) or any sink's cursor update commits and clears the
        "disk full" mark, so /readyz answers 200 again (its small probe fits) while every request still gets
        503 journal_full: readiness flaps, the defect the PROBE_ROOM write was meant to prevent."""

        from tests.receiver.test_unattended import small_disk

        with small_disk(tmp_path / "disk", "12m") as disk:  # 4 MiB of it the journal's spare room
            service = await start_service(
                {
                    "server": {"max_body_bytes": "1MiB"},  # readiness needs room for one: 1 MiB of the disk's 8 left
                    "journal": {"path": str(disk / "journal.db")},
                    "sinks": {"mem": {"fail": "retry"}},
                }
            )
            async with aiohttp.ClientSession() as session:
                (disk / "filler").write_bytes(os.urandom(1024) * (1024 * 7))
                for _ in range(2000):
                    if await post(session, service.url + "/workos", sample_wrappers(50)) == 503:
                        break
                assert service.journal.disk_full
                await service.journal.prune_dedup()  # what the housekeeping task does every minute
                await asyncio.sleep(1.1)  # the next probe may write
                async with session.get(service.url + "/readyz") as response:
                    ready = response.status
                refused = await post(session, service.url + "/workos", sample_wrappers(50))
                assert (ready, refused) != (200, 503), "ready while requests are refused for lack of space"
            await service.stop()


class TestJournalLock:
    async def test_a_second_service_on_the_same_journal_through_a_symlink_is_refused(
        self, start_service, tmp_path: Path
    ) -> None:
        """The lock is `<path>.lock` beside the path as written, so a second service reaching the same database
        through a symlinked path takes its own lock and serves from the same journal (two sequences, two dedup
        indexes: the case the lock exists to refuse)."""
        from receiver.errors import LogBridgeError

        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        await start_service({"journal": {"path": str(tmp_path / "a" / "journal.db")}})
        (tmp_path / "b" / "journal.db").symlink_to(tmp_path / "a" / "journal.db")
        with pytest.raises(LogBridgeError):
            await start_service({"journal": {"path": str(tmp_path / "b" / "journal.db")}})

    def test_a_journal_file_owned_by_another_user_is_named(self, tmp_path: Path) -> None:
        """In a writable directory, a journal (and lock file) left by a root run makes start-up as another UID
        say "it needs to write in <dir>", the one thing that is already writable, instead of naming the files."""
        import shutil
        import subprocess

        if os.getuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv to run as another user")
        import tempfile

        tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp_path is readable by root alone
        os.chmod(tmp_path, 0o755)  # noqa: S103 - another user must reach the files
        data = tmp_path / "data"
        data.mkdir()
        os.chmod(data, 0o777)  # noqa: S103 - a directory anyone may write in
        (data / "journal.db").write_bytes(b"")
        (data / "journal.db.lock").write_bytes(b"")
        config = memory_config(tmp_path)
        tree = yaml.safe_load(config.read_text())
        tree["journal"]["path"] = str(data / "journal.db")
        config.write_text(yaml.safe_dump(tree))
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *serve_command(config)],
            cwd=tmp_path,
            env=THIS_TREE,
            capture_output=True,
            text=True,
            timeout=30,
        )
        shutil.rmtree(tmp_path, ignore_errors=True)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert "journal.db" in last.split("permission denied", 1)[-1], last


class TestAssumedRoleCredentialsInDebugLogs:
    TEMP_SECRET = "TmpSecretKeyFromStsDoNotLog0123456789abcd"
    TEMP_TOKEN = "IQoJb3JpZ2luX2VjTEMPSESSIONTOKENfromSTSdoNotLog0123456789"
    REPLY = (
        '<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult>'
        "<AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/audit-writer/log-bridge</Arn>"
        "<AssumedRoleId>AROAEXAMPLE:log-bridge</AssumedRoleId></AssumedRoleUser>"
        "<Credentials><AccessKeyId>ASIAEXAMPLETEMPKEY01</AccessKeyId>"
        f"<SecretAccessKey>{TEMP_SECRET}</SecretAccessKey><SessionToken>{TEMP_TOKEN}</SessionToken>"
        "<Expiration>2099-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleResult>"
        "<ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></AssumeRoleResponse>"
    )

    async def test_sts_credentials_are_masked_with_the_botocore_debug_logger(self, tmp_path: Path) -> None:
        """With `--debug-logger botocore` and `role_arn`, botocore prints the STS reply body; its XML
        <SecretAccessKey> and <SessionToken> are not credential-shaped to the scrubber (no `name: value`), so
        the assumed role's secret key and session token appear in the log."""
        import signal
        import subprocess
        import time

        from aiohttp import web

        async def answer(request: web.Request) -> web.Response:
            body = await request.read()
            if b"Action=AssumeRole" in body:
                return web.Response(text=self.REPLY, content_type="text/xml")
            return web.Response(status=500, text="<Error><Code>InternalError</Code></Error>")

        async with http_peer(answer) as endpoint:
            config = {
                "server": {"host": "127.0.0.1", "port": 0, "allowlist": ["127.0.0.1/32"], "shutdown_timeout": "1s"},
                "journal": {"path": str(tmp_path / "journal.db")},
                "streams": [{"name": "w", "path": "/w", "auth": {"values": [TOKEN]}, "sinks": ["s3"]}],
                "sinks": {
                    "s3": {
                        "type": "s3",
                        "bucket": "audit",
                        "endpoint_url": endpoint,
                        "sts_endpoint_url": endpoint,
                        "region": "us-east-1",
                        "role_arn": "arn:aws:iam::123456789012:role/audit-writer",
                        "access_key_id": "${AWS_ACCESS_KEY_ID}",
                        "secret_access_key": "${AWS_SECRET_ACCESS_KEY}",
                    }
                },
            }
            (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
            log_path = tmp_path / "serve.log"
            env = {
                **THIS_TREE,
                "AWS_ACCESS_KEY_ID": "AKIAZZZZEXAMPLE12345",
                "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIexamplesecretkey0123456789",
            }
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    serve_command(tmp_path / "config.yaml", "--log-level", "debug", "--debug-logger", "botocore"),
                    cwd=tmp_path,
                    stdout=log,
                    stderr=log,
                    env=env,
                )
                try:
                    deadline = time.monotonic() + 20
                    while "AssumeRoleResponse" not in log_path.read_text() and time.monotonic() < deadline:
                        assert proc.poll() is None, log_path.read_text()[-2000:]
                        await asyncio.sleep(0.1)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(proc.wait, 30)
        text = log_path.read_text()
        assert "AssumeRoleResponse" in text  # botocore did print the STS reply
        leaked = [
            name for name, value in (("secret key", self.TEMP_SECRET), ("token", self.TEMP_TOKEN)) if value in text
        ]
        where = {
            line.split('"logger":"', 1)[-1].split('"', 1)[0] for line in text.splitlines() if self.TEMP_SECRET in line
        }
        assert leaked == [], f"the assumed role's {' and '.join(leaked)} appear in the log (from {sorted(where)})"


class TestValidationAllAtOnce:
    def test_a_required_key_that_fails_does_not_hide_the_multi_key_checks(self) -> None:
        """With an invalid (required) `bucket`, the S3 checks spanning several keys (an access key without its
        secret, `compression` with `layout: workos`) are not reported: re-validating without `bucket` fails as
        "missing" before they run, so they appear only on the next run."""
        from receiver.errors import ConfigError

        tree = {
            "streams": [{"name": "a", "path": "/a", "sinks": ["s3"]}],
            "sinks": {
                "s3": {
                    "type": "s3",
                    "bucket": "a b",
                    "access_key_id": "AKIAIOSFODNN7EXAMPLE",
                    "compression": "zstd",
                    "layout": "workos",
                }
            },
        }
        with pytest.raises(ConfigError) as caught:
            parse_config(tree, {})
        problems = caught.value.errors
        assert any(p.startswith("sinks.s3.bucket:") for p in problems), problems
        assert any("access_key_id and secret_access_key go together" in p for p in problems), problems


class TestProcessShutdown:
    def test_a_hangup_during_shutdown_does_not_kill_the_process(self, tmp_path: Path) -> None:
        """HUPs arriving while `log-bridge serve` finishes a SIGTERM: once the event loop closes, SIGHUP is back
        to its default action and the process dies of it (exit -SIGHUP / 129) instead of exiting 0."""
        import signal
        import subprocess
        import time

        config = memory_config(tmp_path, shutdown_timeout="2s")
        log_path = tmp_path / "serve.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                serve_command(config),
                cwd=tmp_path,
                env=THIS_TREE,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            deadline = time.monotonic() + 20
            while '"listening"' not in log_path.read_text():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGHUP)  # a reload asked for while it stops
                time.sleep(0.002)
        assert proc.wait(10) == 0, f"exit status {proc.returncode}"

    def test_a_hangup_right_after_a_sigterm_is_no_reload(self, tmp_path: Path) -> None:
        """SIGTERM then SIGHUP, back to back (a pod deleted as its ConfigMap changes): both were handled in one
        turn of the loop and `serve` ran the reload before it stopped, in 6 of 10 tries, rebuilding and
        restarting sinks the process was about to stop (the next start reads the file anyway)."""
        import signal
        import subprocess
        import time

        config = memory_config(tmp_path, shutdown_timeout="2s")
        tree = yaml.safe_load(config.read_text())
        reloads = 0
        for attempt in range(6):
            tree["sinks"]["m"]["batch"] = {"max_events": 100 + attempt}  # the sink changes at every HUP
            config.write_text(yaml.safe_dump(tree))
            log_path = tmp_path / f"serve{attempt}.log"
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    serve_command(config), cwd=tmp_path, env=THIS_TREE, stdout=subprocess.DEVNULL, stderr=log
                )
                deadline = time.monotonic() + 20
                while '"listening"' not in log_path.read_text():
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
                tree["sinks"]["m"]["batch"] = {"max_events": 200 + attempt}
                config.write_text(yaml.safe_dump(tree))
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGHUP)
                assert proc.wait(10) == 0, f"exit status {proc.returncode}"
            reloads += "SIGHUP: reloading" in log_path.read_text()
        assert reloads == 0, f"{reloads} of 6 stops ran a reload first"


class TestDedupAcrossRename:
    async def test_a_retry_after_a_stream_rename_is_a_duplicate(self, running, client) -> None:
        """Dedup keys are kept per stream *name*: after a reload renames a stream (same path, same secret),
        WorkOS's retry of a batch already acknowledged is accepted again and delivered twice."""
        service, file = await running(merge(BASE_CONFIG, {}))
        wrappers = sample_wrappers(3)
        assert await post(client, service.url + "/workos", wrappers) == 200
        renamed = merge(file.tree, {})
        renamed["streams"] = [{**file.tree["streams"][0], "name": "workos-prod"}]
        file.write(renamed)
        assert await service.reload()
        body, content_type = encode_body(wrappers, "json")
        headers = {"Authorization": TOKEN, "Content-Type": content_type}
        async with client.post(service.url + "/workos", data=body, headers=headers) as response:
            answer = await response.json()
        assert answer["duplicates"] == 3, f"the retry after the rename was answered {answer}"


class TestNewStreamDuringReload:
    async def test_events_on_a_new_stream_accepted_while_the_reload_runs_reach_its_new_sink(
        self, running, client
    ) -> None:
        """The new streams are served (State.install) before the delivery engine is reconfigured; while a
        rebuilt sink's send in progress is waited for, requests on a new stream are acknowledged, and the new
        sink then starts at the journal's end, past them: acknowledged events that reach no sink."""
        from aiohttp import web

        async def slow_hec(request: web.Request) -> web.Response:
            await request.read()
            if request.path.endswith("/health"):
                return web.json_response({"text": "HEC is healthy", "code": 17})
            await asyncio.sleep(3)  # a slow indexer: the send in progress holds the reload
            return web.json_response({"text": "Success", "code": 0})

        async with http_peer(slow_hec) as url:
            tree = merge(
                BASE_CONFIG,
                {
                    "sinks": {
                        "hec": {
                            "type": "splunk_hec",
                            "url": url,
                            "token": "hec-token-1234",
                            "batch": {"max_wait": "10ms"},
                        }
                    }
                },
            )
            tree["sinks"].pop("mem")
            tree["streams"] = [{**BASE_CONFIG["streams"][0], "sinks": ["hec"]}]
            service, file = await running(tree)
            assert await post(client, service.url + "/workos", sample_wrappers(1)) == 200
            await asyncio.sleep(0.3)  # the HEC send is in progress
            changed = merge(
                file.tree,
                {
                    "sinks": {
                        "hec": {"batch": {"max_events": 9}},
                        "late": {"type": "memory", "batch": {"max_wait": "50ms"}},
                    }
                },
            )
            changed["streams"] = [
                file.tree["streams"][0],
                {"name": "new", "path": "/new", "auth": {"values": [TOKEN]}, "sinks": ["late"]},
            ]
            file.write(changed)
            reloading = asyncio.create_task(service.reload())
            await asyncio.sleep(0.5)
            assert not reloading.done()
            status = await post(client, service.url + "/new", sample_wrappers(5))
            assert status in (200, 404)  # not served yet (404) is fine: WorkOS retries; acknowledged must arrive
            assert await reloading
            late = service.engine.runners["late"]  # type: ignore[union-attr]
            await asyncio.sleep(1)
            expected = 5 if status == 200 else 0
            assert len(late.sink.events) == expected, f"answered {status}, {len(late.sink.events)} delivered"  # type: ignore[attr-defined]


class TestRequestInFlightOnTheFront:
    @pytest.mark.parametrize("change", ["removed", "renamed"])
    async def test_a_body_on_its_way_when_its_stream_is_removed_or_renamed_reaches_its_sink(
        self, running, change: str
    ) -> None:
        """A keep-alive POST whose body is still arriving is held by the stream front with the intake it
        started on, but that intake does not count it in flight, so the reload settles the stream at once; the
        request then commits under the old stream after the settle point and is answered 200, and no sink owns
        its events: acknowledged and lost (the aiohttp path, `Connection: close`, was fixed before)."""
        tree = two_streams()
        service, file = await running(tree)
        reader, writer, body = await start_post(service.port, close=False)
        await asyncio.sleep(0.2)  # the front holds the request, with /workos's intake (it stalls only after 1s)
        changed = merge(file.tree, {})
        if change == "removed":
            changed["streams"] = [tree["streams"][1]]
        else:
            changed["streams"] = [{**tree["streams"][0], "name": "workos-prod"}, tree["streams"][1]]
        file.write(changed)
        assert await service.reload()
        await asyncio.sleep(0.2)  # the reload's settling of the streams it moved runs
        await finish_post(service, reader, writer, body)


class TestAliasBomb:
    async def test_a_reload_of_a_file_whose_aliases_expand_to_millions_of_values_is_refused_at_once(
        self, running, client
    ) -> None:
        """A few lines of nested aliases (a 'billion laughs') expand to 10 million values: the reload spent 27 s
        and 270 MB in the duplicate-key check and the environment expansion, holding the reload (and, in
        `serve`, SIGTERM) meanwhile; 10 levels would take hours and more memory than the pod has."""
        service, file = await running(BASE_CONFIG)
        levels = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
        for previous, name in zip("abcdef", "bcdefg", strict=True):
            levels.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]")
        file.path.write_text("\n".join(levels) + "\n" + yaml.safe_dump(file.tree))
        started = asyncio.get_running_loop().time()
        applied = await asyncio.wait_for(service.reload(), 20)
        took = asyncio.get_running_loop().time() - started
        assert (applied, took < 2) == (False, True), f"reload applied={applied} after {took:.1f}s"
        assert (await post(client, service.url + "/workos", sample_wrappers(1))) == 200


class TestReloadStorm:
    async def test_reloads_that_rebuild_a_sink_leave_nothing_behind(self, running, client) -> None:
        """Every rebuilt sink's runner subscribed to the journal's "new rows" signal and none unsubscribed: the
        journal kept one event per reload for ever and set every one of them on each commit, so a config
        manager that reloads every minute with a changed sink made each commit cost more, without bound."""
        service, file = await running(BASE_CONFIG)
        for attempt in range(1, 101):
            file.change({"sinks": {"mem": {"batch": {"max_events": 1000 + attempt}}}})
            assert await service.reload()
        assert (await post(client, service.url + "/workos", sample_wrappers(3))) == 200
        runners = len(service.engine.runners)  # type: ignore[union-attr]
        assert len(service.journal._new_data) == runners, f"{len(service.journal._new_data)} signals, {runners} sink"


class TestReloadFailingOnTheJournal:
    @staticmethod
    def full_disk_while(service: Any, failing: list[bool], write: str = "_write") -> None:
        """The journal's writes other than requests' batches (cursors, routing, progress; or only `write`) fail
        as on a full disk while `failing[0]` is true."""
        from receiver.journal.schema import DiskFull

        original = getattr(service.journal, write)

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            if failing[0]:
                raise DiskFull("the journal's disk is full")
            return await original(*args, **kwargs)

        setattr(service.journal, write, guarded)

    @staticmethod
    async def hec_and_memory(running: Any, url: str) -> tuple[Any, Any]:
        hec = {"type": "splunk_hec", "url": url, "token": "hec-token-1234", "batch": {"max_wait": "10ms"}}
        tree = merge(BASE_CONFIG, {"sinks": {"hec": {**hec, "retry": {"initial": "10ms", "max": "50ms"}}}})
        tree["streams"] = [{**BASE_CONFIG["streams"][0], "sinks": ["hec", "mem"]}]
        return await running(tree)

    @staticmethod
    def changed(tree: dict[str, Any]) -> dict[str, Any]:
        """`tree` with sink "hec" changed and a sink "extra" added to the stream."""
        changed = merge(tree, {"sinks": {"hec": {"batch": {"max_events": 9}}, "extra": {"type": "memory"}}})
        changed["streams"] = [{**tree["streams"][0], "sinks": ["hec", "mem", "extra"]}]
        return changed

    @pytest.mark.parametrize("then", ["same file", "previous file"])
    async def test_every_sink_delivers_after_a_reload_the_journal_refused(self, running, client, then: str) -> None:
        """A reload that changes sink "hec" and adds "extra" while the journal cannot write (a full disk) failed,
        and the log said the previous configuration was still served, yet "hec"'s runner had been retired before
        the write that failed (the added sink's cursor) and none replaced it: events acknowledged from then on
        reached no HEC, and nothing counted them owed. The next reload of the same file took the runner-less
        sink for an added one and started it at the journal's end, past them; one of the previous file failed
        (the sink object was gone)."""
        from tests.peers.hec import HecPeer

        peer = HecPeer(token="hec-token-1234")  # noqa: S106 - the local peer's made-up token
        await peer.start()
        try:
            service, file = await self.hec_and_memory(running, peer.url)
            before = file.tree
            assert await post(client, service.url + "/workos", sample_wrappers(3)) == 200
            await wait_for(lambda: peer.event_count == 3)
            failing = [True]
            self.full_disk_while(service, failing)
            file.write(self.changed(before))
            assert not await service.reload()
            failing[0] = False  # room again
            assert await post(client, service.url + "/workos", sample_wrappers(4)) == 200
            with contextlib.suppress(AssertionError):
                await wait_for(lambda: peer.event_count >= 7, timeout=5)
            after_failure = peer.event_count
            file.write(self.changed(before) if then == "same file" else before)
            assert await service.reload()
            assert await post(client, service.url + "/workos", sample_wrappers(2)) == 200
            with contextlib.suppress(AssertionError):
                await wait_for(lambda: peer.event_count >= 9, timeout=5)
            assert (after_failure, peer.event_count) == (7, 9), "events acknowledged that reached no HEC"
            await wait_for(lambda: len(memory_sink(service, "mem").events) == 9)
        finally:
            await peer.stop()

    async def test_a_reload_whose_routing_the_journal_refused_says_what_is_in_use(
        self, running, client, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The last write of a reload, the routing it records, failed after the new configuration was in use:
        the reload was counted failed and logged "still serving the previous configuration", which was not so."""
        from tests.peers.hec import HecPeer

        peer = HecPeer(token="hec-token-1234")  # noqa: S106 - the local peer's made-up token
        await peer.start()
        try:
            service, file = await self.hec_and_memory(running, peer.url)
            failing = [True]
            self.full_disk_while(service, failing, "store_meta")
            file.write(self.changed(file.tree))
            applied = await service.reload()
            failing[0] = False
            assert "still serving the previous configuration" not in caplog.text
            assert applied and "extra" in service.engine.runners  # type: ignore[union-attr]
            assert await post(client, service.url + "/workos", sample_wrappers(4)) == 200
            await wait_for(lambda: peer.event_count == 4 and len(memory_sink(service, "extra").events) == 4)
        finally:
            await peer.stop()


def memory_sink(service: Any, name: str) -> Any:
    return service.engine.runners[name].sink

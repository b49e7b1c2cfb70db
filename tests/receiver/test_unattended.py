"""Left running unattended: SIGHUP, dual-stack listening, truthful backlog, no credential in any log line,
one-line start-up errors, every validation problem at once, bounded TLS handshakes, 100-continue after the
checks, readiness while the disk is full, journal-only commands without the sinks' credentials."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web

from receiver.journal import connect
from receiver.journal.segments import ROOM_FILE
from receiver.samples import encode_body, sample_wrappers
from receiver.server import Service
from tests.conftest import TOKEN, StartService, http_peer, scrape
from tests.receiver.test_process import SCRIPT, Server, free_port, run_cli, write_config
from tests.receiver.test_process import TOKEN as PROCESS_TOKEN

AUTH = {"Authorization": TOKEN}


def body(count: int = 3) -> tuple[bytes, dict[str, str]]:
    data, content_type = encode_body(sample_wrappers(count), "json")
    return data, {**AUTH, "Content-Type": content_type}


async def post_until_refused(session: aiohttp.ClientSession, url: str) -> None:
    """Post 50 events a request until the journal refuses one (503): its disk is full. Each request stores a few
    KiB (zstd), so a MiB of room takes hundreds."""
    for _ in range(2000):
        data, headers = body(50)
        async with session.post(url + "/workos", data=data, headers=headers) as response:
            if response.status == 503:
                return
    raise AssertionError("the disk never filled")


async def metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        return await response.text()


class TestSighup:
    async def test_hangup_reloads_and_never_stops_the_process(self, tmp_path: Path) -> None:
        port = free_port()
        config = write_config(tmp_path, port)
        pid_file = tmp_path / "serve.pid"
        log = (tmp_path / "serve.log").open("ab")
        proc = subprocess.Popen(
            [str(SCRIPT), "serve", "--config", str(config), "--pid-file", str(pid_file)],
            cwd=tmp_path,
            stdout=log,
            stderr=log,
            env={**os.environ, "STREAM_SECRET": PROCESS_TOKEN},
        )
        try:
            server = Server.__new__(Server)
            server.proc, server.port = proc, port
            await server.ready()
            url = f"http://127.0.0.1:{port}"
            for _ in range(3):
                proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.3)
                assert proc.poll() is None, "SIGHUP stopped log-bridge"
            # `log-bridge reload` with a new secret in the file: the new one is accepted from then on.
            tree = yaml.safe_load(config.read_text())
            tree["streams"][0]["auth"]["values"] = ["Bearer after-reload-secret"]
            config.write_text(yaml.safe_dump(tree))
            assert run_cli("reload", "--pid-file", str(pid_file)).returncode == 0
            data, _ = encode_body(sample_wrappers(2), "json")
            async with aiohttp.ClientSession() as session:
                for _ in range(50):
                    async with session.post(
                        url + "/workos", data=data, headers={"Authorization": "Bearer after-reload-secret"}
                    ) as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.1)
                assert response.status == 200
            text = await metrics_text(url)
            assert scrape(text, "log_bridge_config_reloads_total", result="success") == 4
            assert (scrape(text, "log_bridge_config_last_reload_success_timestamp_seconds") or 0) > time.time() - 60
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            log.close()
        lines = (tmp_path / "serve.log").read_text()
        assert lines.count("SIGHUP: reloading the configuration") == 4
        assert not pid_file.exists()


class TestDualStack:
    @pytest.fixture
    def ipv6(self) -> None:
        if not socket.has_ipv6:
            pytest.skip("no IPv6 on this machine")
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")

    async def test_unspecified_ipv6_takes_both_families(self, ipv6: None, start_service: StartService) -> None:
        service = await start_service({"server": {"host": "::", "allowlist": ["127.0.0.1/32", "::1/128"]}})
        data, headers = body()
        async with aiohttp.ClientSession() as session:
            for host in ("127.0.0.1", "[::1]"):
                async with session.post(f"http://{host}:{service.port}/workos", data=data, headers=headers) as r:
                    assert r.status == 200, host
        assert service.url == f"http://[::]:{service.port}"

    async def test_ipv4_mapped_peers_are_checked_as_ipv4(self, ipv6: None, start_service: StartService) -> None:
        service = await start_service({"server": {"host": "::", "allowlist": ["10.0.0.0/8"]}})
        data, headers = body()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{service.port}/workos", data=data, headers=headers) as r:
                assert r.status == 403
        allowed = await start_service({"server": {"host": "::", "allowlist": ["127.0.0.0/8"]}})
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{allowed.port}/workos", data=data, headers=headers) as r:
                assert r.status == 200  # ::ffff:127.0.0.1 is 127.0.0.1

    async def test_ipv4_any_stays_ipv4_only(self, ipv6: None, start_service: StartService) -> None:
        service = await start_service({"server": {"host": "0.0.0.0"}})
        with pytest.raises(OSError):
            await asyncio.open_connection("::1", service.port)

    def test_validate_prints_a_bracketed_ipv6_url(self, tmp_path: Path) -> None:
        config = write_config(tmp_path, 8443)
        tree = yaml.safe_load(config.read_text())
        tree["server"]["host"] = "::"
        config.write_text(yaml.safe_dump(tree))
        result = run_cli("validate", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert "listen: http://[::]:8443 (IPv4 and IPv6)" in result.stdout


class TestBacklogWhileRetrying:
    async def test_the_gauge_counts_what_the_sink_still_owes(self, start_service: StartService) -> None:
        service = await start_service({"sinks": {"mem": {"fail": "retry", "retry": {"initial": "1s", "max": "2s"}}}})
        async with aiohttp.ClientSession() as session:
            for count in (60, 200):
                data, headers = body(count)
                async with session.post(service.url + "/workos", data=data, headers=headers) as response:
                    assert response.status == 200
                await asyncio.sleep(1.5)  # the sink is backing off meanwhile
            for _ in range(50):  # recounted every second
                text = await metrics_text(service.url)
                if scrape(text, "log_bridge_sink_backlog_events", sink="mem") == 260:
                    break
                await asyncio.sleep(0.2)
        assert scrape(text, "log_bridge_sink_backlog_events", sink="mem") == 260
        assert service.engine is not None and service.engine.runners["mem"]._in_flight > 0  # still retrying
        # Another stream's events are not this sink's backlog.
        assert service.journal.last_seq == 260


class TestNoSecretInLogs:
    SECRETS = {
        "AWS_ACCESS_KEY_ID": "AKIAZZZZEXAMPLE12345",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIexamplesecretkey0123456789",
        "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLESESSIONTOKENvalue0123456789abcdef",
    }

    @pytest.fixture
    async def s3_endpoint(self) -> Iterator[str]:
        """An HTTP server that answers every S3 request 500 (botocore still logs what it sent)."""

        async def refuse(_: web.Request) -> web.Response:
            return web.Response(status=500, text="<Error><Code>InternalError</Code></Error>")

        async with http_peer(refuse) as url:
            yield url

    @pytest.mark.parametrize("named", [False, True], ids=["debug", "debug-botocore-named"])
    async def test_debug_logs_hold_no_credential(self, tmp_path: Path, s3_endpoint: str, named: bool) -> None:
        port = free_port()
        config = write_config(tmp_path, port)
        tree = yaml.safe_load(config.read_text())
        tree["sinks"]["archive"] = {
            "type": "s3",
            "bucket": "audit",
            "endpoint_url": s3_endpoint,
            "region": "us-east-1",
            "access_key_id": "${AWS_ACCESS_KEY_ID}",
            "secret_access_key": "${AWS_SECRET_ACCESS_KEY}",
            "session_token": "${AWS_SESSION_TOKEN}",
            "retry": {"initial": "100ms", "max": "200ms"},
        }
        config.write_text(yaml.safe_dump(tree))
        extra = ["--debug-logger", "botocore", "--debug-logger", "urllib3"] if named else []
        log_path = tmp_path / "serve.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [str(SCRIPT), "serve", "--config", str(config), "--log-level", "debug", *extra],
                cwd=tmp_path,
                stdout=log,
                stderr=log,
                env={**os.environ, "STREAM_SECRET": PROCESS_TOKEN, **self.SECRETS},
            )
            server = Server.__new__(Server)
            server.proc, server.port = proc, port
            try:
                await server.ready()
                data, content_type = encode_body(sample_wrappers(2), "json")
                async with aiohttp.ClientSession() as session:
                    async with session.post(
                        f"http://127.0.0.1:{port}/workos",
                        data=data,
                        headers={"Authorization": PROCESS_TOKEN, "Content-Type": content_type},
                    ) as response:
                        assert response.status == 200
                    unauthorised = {"Authorization": PROCESS_TOKEN + "x"}
                    async with session.post(f"http://127.0.0.1:{port}/workos", data=data, headers=unauthorised):
                        pass
                deadline = time.monotonic() + 20
                while "send failed, will retry" not in log_path.read_text() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
            finally:
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 30)  # the loop keeps serving the S3 endpoint meanwhile
        text = log_path.read_text()
        assert "send failed, will retry" in text
        if named:
            assert '"logger":"botocore' in text  # the named library did print its debug lines
        for secret in [*self.SECRETS.values(), PROCESS_TOKEN, PROCESS_TOKEN.split(" ", 1)[1]]:
            assert secret not in text


class TestStartupFailures:
    @staticmethod
    def serve(config: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "STREAM_SECRET": PROCESS_TOKEN},
            **kwargs,
        )

    @staticmethod
    def with_journal(tmp_path: Path, journal: Path) -> Path:
        config = write_config(tmp_path, free_port())
        tree = yaml.safe_load(config.read_text())
        tree["journal"]["path"] = str(journal)
        config.write_text(yaml.safe_dump(tree))
        return config

    @staticmethod
    def one_line(result: subprocess.CompletedProcess[str]) -> str:
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if '"level"' not in line]
        assert len(lines) == 1, result.stderr
        return lines[0]

    def test_a_path_under_a_file(self, tmp_path: Path) -> None:
        (tmp_path / "afile").write_text("x")
        line = self.one_line(self.serve(self.with_journal(tmp_path, tmp_path / "afile" / "journal.db")))
        assert line.startswith(f"log-bridge: cannot start: cannot open the journal {tmp_path}/afile/journal.db")

    def test_a_corrupt_database(self, tmp_path: Path) -> None:
        journal = tmp_path / "journal.db"
        journal.write_bytes(b"this is not an sqlite database" * 200)
        line = self.one_line(self.serve(self.with_journal(tmp_path, journal)))
        assert str(journal) in line
        assert "not a log-bridge journal or is damaged" in line

    def test_a_directory_it_may_not_write(self, tmp_path: Path) -> None:
        if os.getuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv to run the service without the right to override permissions")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o700)
        os.chown(locked, 65534, 65534)  # another user's directory
        config = self.with_journal(tmp_path, locked / "journal.db")
        result = subprocess.run(
            [
                "setpriv",
                "--bounding-set",
                "-dac_override,-dac_read_search",
                str(SCRIPT),
                "serve",
                "--config",
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "STREAM_SECRET": PROCESS_TOKEN},
        )
        line = self.one_line(result)
        assert str(locked / "journal.db") in line
        assert f"permission denied (log-bridge runs as UID {os.getuid()}; it needs to write in {locked}" in line

    async def test_a_journal_another_process_serves(self, tmp_path: Path) -> None:
        journal = tmp_path / "shared.db"
        first_config = self.with_journal(tmp_path, journal)
        server = Server(first_config, yaml.safe_load(first_config.read_text())["server"]["port"], tmp_path)
        try:
            await server.ready()
            second = tmp_path / "second"
            second.mkdir()
            line = self.one_line(await asyncio.to_thread(self.serve, self.with_journal(second, journal)))
            assert "another log-bridge process is serving from it" in line
        finally:
            assert server.kill(signal.SIGTERM) == 0


class TestValidateEverythingAtOnce:
    def test_one_run_lists_every_problem(self, tmp_path: Path) -> None:
        config = tmp_path / "config.yaml"
        config.write_text(
            """
server:
  port: 8443
  header_timeout: 0
  body_timeout: .inf
streams:
  - {name: a, path: /a, sinks: [archive, missing]}
  - {name: b, path: /a, sinks: [archive]}
sinks:
  archive:
    type: s3
    bucket: audit
    timeout: .nan
    access_key_id: AKIAEXAMPLEEXAMPLE12
    layout: workos
    compression: gzip
"""
        )
        result = run_cli("validate", "--config", str(config))
        assert result.returncode == 1
        for expected in (
            "server.header_timeout: must be more than 0",
            "server.body_timeout: a duration must be a finite number of seconds",
            "sinks.archive.timeout: a duration must be a finite number of seconds",
            "streams[0].sinks[1]: sink 'missing' is not defined under sinks",
            "streams[1].path: '/a' is already used by 'a'",
            "sinks.archive: access_key_id and secret_access_key go together",
            "compression applies to layout: batch only",
        ):
            assert expected in result.stderr, (expected, result.stderr)
        assert "AKIAEXAMPLEEXAMPLE12" not in result.stderr

    @pytest.mark.parametrize(
        ("server", "expected"),
        [
            ("header_timeout: 0", "server.header_timeout: must be more than 0"),
            ("header_timeout: .nan", "server.header_timeout: a duration must be a finite number"),
            ("body_timeout: 0", "server.body_timeout: must be more than 0"),
            ("body_timeout: .inf", "server.body_timeout: a duration must be a finite number"),
            ("port: true", "server.port: expected a number, not a boolean"),
            ("max_events_per_request: yes", "server.max_events_per_request: expected a number, not a boolean"),
            ("port: 70000", "server.port: Input should be less than or equal to 65535"),
            ("port: 1\n  port: 2", "server.port: duplicate key (line 4; first given at line 3)"),
        ],
    )
    def test_values_that_turn_protections_off_are_refused(self, tmp_path: Path, server: str, expected: str) -> None:
        config = tmp_path / "config.yaml"
        config.write_text(
            f"\nserver:\n  {server}\nstreams: [{{name: a, path: /a, sinks: [s]}}]\n"
            f"sinks: {{s: {{type: file, path: {tmp_path}/out.ndjson}}}}\n"
        )
        result = run_cli("validate", "--config", str(config))
        assert result.returncode == 1
        assert expected in result.stderr, result.stderr


class TestTlsHandshake:
    async def test_a_stalled_handshake_is_closed_after_header_timeout(
        self, start_service: StartService, tmp_path: Path
    ) -> None:
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        service = await start_service(
            {"server": {"header_timeout": "1s", "tls": {"cert_file": str(cert), "key_file": str(key)}}}
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)  # TCP only: no ClientHello
        started = time.monotonic()
        closed = await asyncio.wait_for(reader.read(1), timeout=20)
        took = time.monotonic() - started
        writer.close()
        assert closed == b""
        assert took < 5, f"held a silent TLS connection {took:.1f} s"
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with aiohttp.ClientSession() as session, session.get(service.url + "/healthz", ssl=context) as r:
            assert r.status == 200


class TestExpectContinue:
    @staticmethod
    async def exchange(port: int, headers: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data, _ = encode_body(sample_wrappers(2), "json")
        writer.write(
            f"POST /workos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Expect: 100-continue\r\n{headers}\r\n".encode()
        )
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        if first.startswith(b"HTTP/1.1 100"):
            writer.write(data)
            first += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        writer.close()
        return first

    async def test_refused_clients_are_not_invited_to_upload(self, start_service: StartService) -> None:
        service = await start_service()
        wrong = await self.exchange(service.port, "Authorization: Bearer wrong\r\n")
        assert wrong.startswith(b"HTTP/1.1 401"), wrong
        right = await self.exchange(service.port, f"Authorization: {TOKEN}\r\n")
        assert right.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), right
        elsewhere = await start_service({"server": {"allowlist": ["10.0.0.0/8"]}})
        refused = await self.exchange(elsewhere.port, f"Authorization: {TOKEN}\r\n")
        assert refused.startswith(b"HTTP/1.1 403"), refused
        text = await metrics_text(elsewhere.url)
        assert scrape(text, "log_bridge_requests_refused_total", stream="workos", reason="not_allowed") == 1


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("LOG_BRIDGE_REQUIRE_TMPFS"):
            raise
        pytest.skip(f"cannot mount a small tmpfs here: {exc}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def service_on(disk: Path, start_service: StartService) -> Service:
    """A service whose journal is on `disk`, taking requests of up to 1 MiB, its sink never delivering (what it
    journals is never freed)."""
    return await start_service(
        {
            "server": {"max_body_bytes": "1MiB"},
            "journal": {"path": str(disk / "journal.db")},
            "sinks": {"mem": {"fail": "retry"}},
        }
    )


class TestReadinessWhileTheDiskIsFull:
    async def test_not_ready_from_the_first_failed_write_until_one_commits(
        self, start_service: StartService, tmp_path: Path
    ) -> None:
        with small_disk(tmp_path / "disk", "12m") as disk:  # 4 MiB of it the journal's spare room (SPARE_BYTES)
            filler = disk / "filler"
            # Readiness needs room for a largest request: 1 MiB of the disk's 8 left.
            service = await service_on(disk, start_service)
            async with aiohttp.ClientSession() as session:
                assert (await session.get(service.url + "/readyz")).status == 200
                filler.write_bytes(os.urandom(1024) * (1024 * 7))  # most of the room
                await post_until_refused(session, service.url)
                probes = []
                for _ in range(27):
                    async with session.get(service.url + "/readyz") as response:
                        probes.append((response.status, (await response.json()).get("problems")))
                    await asyncio.sleep(0.05)
                assert {status for status, _ in probes} == {503}, probes
                assert probes[0][1] == ["the journal's disk is full"]
                # What the alerts read says so too: the journal is far below journal.max_bytes.
                async with session.get(service.url + "/metrics") as response:
                    text = await response.text()
                assert scrape(text, "log_bridge_journal_disk_full") == 1
                assert scrape(text, "log_bridge_journal_over_cap") == 0
                filler.unlink()
                for _ in range(30):  # one probe write a second at most
                    await asyncio.sleep(0.2)
                    async with session.get(service.url + "/readyz") as response:
                        if response.status == 200:
                            break
                assert response.status == 200, await response.text()
                async with session.get(service.url + "/metrics") as response:
                    assert scrape(await response.text(), "log_bridge_journal_disk_full") == 0
                data, headers = body(5)
                async with session.post(service.url + "/workos", data=data, headers=headers) as response:
                    assert response.status == 200
            await service.stop()

    async def test_a_full_disk_is_logged_once_not_once_a_refused_request(
        self, start_service: StartService, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Was a defect: each group of requests the full disk refused logged "journal write failed" at ERROR,
        unlimited (WorkOS retrying, tens of lines a second, on a disk that may hold the logs too). The journal
        says it once when the disk fills, and again only after a write has gone through; the intake's line for
        each refused request is rate-limited."""
        with small_disk(tmp_path / "disk", "12m") as disk:
            filler = disk / "filler"
            service = await service_on(disk, start_service)
            caplog.set_level(logging.INFO)
            async with aiohttp.ClientSession() as session:
                filler.write_bytes(os.urandom(1024) * (1024 * 7))
                await post_until_refused(session, service.url)
                for _ in range(60):  # WorkOS retrying
                    data, headers = body(50)
                    async with session.post(service.url + "/workos", data=data, headers=headers) as response:
                        assert response.status == 503
                failed = [r for r in caplog.records if r.getMessage() == "journal write failed"]
                assert len(failed) == 1, f"{len(failed)} lines"
                refusals = [r for r in caplog.records if r.getMessage() == "journal full: refusing a batch"]
                assert 1 <= len(refusals) <= 15, f"{len(refusals)} lines"
                filler.unlink()  # room again: a write goes through, and the next full disk is said again
                for _ in range(30):
                    await asyncio.sleep(0.2)
                    async with session.get(service.url + "/readyz") as response:
                        if response.status == 200:
                            break
                data, headers = body(5)
                async with session.post(service.url + "/workos", data=data, headers=headers) as response:
                    assert response.status == 200
                with contextlib.suppress(OSError), filler.open("wb") as filling:  # what is left of the room
                    while True:
                        filling.write(os.urandom(256 * 1024))
                await post_until_refused(session, service.url)
                failed = [r for r in caplog.records if r.getMessage() == "journal write failed"]
                assert len(failed) == 2, f"{len(failed)} lines"
            await service.stop()

    async def test_a_full_disk_refusing_dead_letters_is_logged_once_not_once_a_refused_request(
        self, start_service: StartService, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Was a defect: requests holding a bad element (its dead letter is committed in SQLite before their
        events are appended) met the full disk in the commit, and each refused group logged "journal commit
        failed" at ERROR, unlimited, as segment appends had."""
        with small_disk(tmp_path / "disk", "12m") as disk:
            service = await service_on(disk, start_service)
            caplog.set_level(logging.INFO)
            (disk / "filler").write_bytes(os.urandom(1024) * (1024 * 7))
            data, content_type = encode_body([*sample_wrappers(50), 7], "json")
            refused = 0
            async with aiohttp.ClientSession() as session:
                for _ in range(600):
                    async with session.post(
                        service.url + "/workos", data=data, headers={**AUTH, "Content-Type": content_type}
                    ) as response:
                        refused += response.status == 503
            failed = [r for r in caplog.records if r.getMessage() == "journal commit failed"]
            # Said again only after a commit went through (the journal's upkeep may make one now and then).
            assert refused >= 100 and 1 <= len(failed) <= refused / 10, f"{len(failed)} lines, {refused} refused"
            await service.stop()

    async def test_ready_again_only_once_the_largest_request_fits(
        self, start_service: StartService, tmp_path: Path
    ) -> None:
        """After a full disk, a little room freed (enough for the probe's own write, not for a request of
        max_body_bytes) keeps the service not ready: ready, it would take a large request only to refuse it."""
        with small_disk(tmp_path / "disk", "12m") as disk:  # 4 MiB of it the journal's spare room
            filler = disk / "filler"
            service = await service_on(disk, start_service)
            async with aiohttp.ClientSession() as session:
                filler.write_bytes(os.urandom(1024) * (1024 * 7))
                await post_until_refused(session, service.url)
                assert service.journal.disk_full
                os.truncate(filler, filler.stat().st_size - 600 * 1024)  # 600 KiB: under the 1 MiB a request may take
                await asyncio.sleep(1.1)  # the next probe may write
                probes = []
                for _ in range(3):
                    async with session.get(service.url + "/readyz") as response:
                        probes.append((response.status, (await response.json()).get("problems")))
                    await asyncio.sleep(1.05)
                assert probes == [(503, ["the journal's disk is full"])] * 3, probes
                room = os.statvfs(disk)
                assert room.f_bavail * room.f_frsize >= 600 * 1024  # the room was there: the probe saw too little
                filler.unlink()
                for _ in range(30):
                    await asyncio.sleep(0.2)
                    async with session.get(service.url + "/readyz") as response:
                        if response.status == 200:
                            break
                assert response.status == 200, await response.text()
            await service.stop()

    async def test_a_later_failure_not_for_lack_of_space_is_said_as_what_it_is(
        self, start_service: StartService, tmp_path: Path
    ) -> None:
        """Was a defect: once a write had failed for lack of space, the journal said its disk was full through
        every later failure (`/readyz`, log_bridge_journal_disk_full), though what failed then was something else
        (an I/O error, a volume turned read-only), and the operator was sent freeing space. Now the latest failure
        says; and the probe still reserves room for the largest request until a write proves it, so readiness
        does not return while the disk is short of room."""
        with small_disk(tmp_path / "disk", "12m") as disk:  # 4 MiB of it the journal's spare room
            filler = disk / "filler"
            service = await service_on(disk, start_service)
            async with aiohttp.ClientSession() as session:

                async def readiness() -> tuple[int, list[str] | None]:
                    await asyncio.sleep(1.05)  # one probe write a second at most
                    async with session.get(service.url + "/readyz") as response:
                        return response.status, (await response.json()).get("problems")

                async def disk_full() -> float | None:
                    async with session.get(service.url + "/metrics") as response:
                        return scrape(await response.text(), "log_bridge_journal_disk_full")

                filler.write_bytes(os.urandom(1024) * (1024 * 7))
                await post_until_refused(session, service.url)
                assert await readiness() == (503, ["the journal's disk is full"])
                os.truncate(filler, filler.stat().st_size - 600 * 1024)  # room for the probe, not for a request
                # Where the probe reserves its room, a directory: its write fails, and not for lack of space.
                (service.journal.segments.directory / ROOM_FILE).mkdir()
                assert await readiness() == (503, ["journal is not writable"])
                assert await disk_full() == 0
                (service.journal.segments.directory / ROOM_FILE).rmdir()
                assert await readiness() == (503, ["the journal's disk is full"])  # still too little room
                assert await disk_full() == 1
                filler.unlink()
                for _ in range(10):
                    if (ready := await readiness())[0] == 200:
                        break
                assert ready == (200, None)
                assert await disk_full() == 0
            await service.stop()


class TestReadinessProbe:
    async def test_concurrent_readiness_checks_make_one_probe_a_second(self, start_service: StartService) -> None:
        # After a full disk each probe allocates room for the largest request: forty /readyz at once must not
        # make forty of them.
        service = await start_service()
        reserved: list[int] = []
        reserve = service.journal.segments.reserve
        service.journal.segments.reserve = lambda size: (reserved.append(size), reserve(size))[1]  # type: ignore[method-assign]
        await asyncio.sleep(1.1)  # past the probe start-up made
        service.journal.room_owed = True
        async with aiohttp.ClientSession() as session:

            async def ready() -> int:
                async with session.get(service.url + "/readyz") as response:
                    return response.status

            statuses = await asyncio.gather(*(ready() for _ in range(40)))
        assert set(statuses) <= {200, 503}
        assert reserved == [service.journal.room]


class TestJournalOnlyCommands:
    def test_dlq_list_needs_no_sink_credentials(self, tmp_path: Path) -> None:
        config = write_config(tmp_path, free_port())
        tree = yaml.safe_load(config.read_text())
        tree["sinks"]["archive"] = {
            "type": "s3",
            "bucket": "audit",
            "access_key_id": "${UNSET_ACCESS_KEY_FOR_TEST}",
            "secret_access_key": "${UNSET_SECRET_KEY_FOR_TEST}",
        }
        config.write_text(yaml.safe_dump(tree))
        connect(Path(tree["journal"]["path"])).close()  # an empty journal (none at all is an error)
        result = run_cli("dlq", "list", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        # The journal section itself is still checked.
        tree["journal"]["path"] = "${UNSET_JOURNAL_FOR_TEST}"
        config.write_text(yaml.safe_dump(tree))
        result = run_cli("dlq", "list", "--config", str(config))
        assert result.returncode == 2
        assert "journal.path: environment variable UNSET_JOURNAL_FOR_TEST is not set" in result.stderr


class TestStreamMetrics:
    async def test_last_event_time_and_refusals_by_reason(self, start_service: StartService) -> None:
        service = await start_service()
        before = time.time()
        async with aiohttp.ClientSession() as session:
            data, headers = body()
            async with session.post(service.url + "/workos", data=data, headers=headers) as response:
                assert response.status == 200
            for extra, status in (
                ({"Authorization": "Bearer nope"}, 401),
                ({"Content-Encoding": "br"}, 415),
            ):
                async with session.post(service.url + "/workos", data=data, headers={**headers, **extra}) as r:
                    assert r.status == status
            async with session.post(service.url + "/workos", data=b"not json at all", headers=headers) as response:
                assert response.status == 400
            text = await metrics_text(service.url)
        last = scrape(text, "log_bridge_stream_last_event_timestamp_seconds", stream="workos")
        assert last is not None and before - 1 <= last <= time.time()
        for reason, count in (("unauthorised", 1), ("unsupported", 1), ("bad_body", 1), ("not_allowed", 0)):
            assert scrape(text, "log_bridge_requests_refused_total", stream="workos", reason=reason) == count
        assert scrape(text, "log_bridge_journal_max_bytes") == 1024**3

"""The real `log-bridge` process: the CLI commands, SIGTERM, and SIGKILL under load losing nothing acknowledged."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
import yaml
from aiohttp import web

from receiver.samples import sample_wrappers
from tests.conftest import http_peer, scrape
from tests.peers.hec import HecPeer

TOKEN = "Bearer process-test-secret"
SCRIPT = Path(sys.executable).with_name("log-bridge")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp_path: Path, port: int, **sink: Any) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": port, "allowlist": ["127.0.0.1/32"], "shutdown_timeout": "3s"},
        "journal": {"path": str(tmp_path / "journal.db")},
        "streams": [
            {"name": "workos", "path": "/workos", "auth": {"values": ["${STREAM_SECRET}"]}, "sinks": ["archive"]}
        ],
        "sinks": {"archive": {"type": "file", "path": str(tmp_path / "out" / "%Y-%m-%d.ndjson"), **sink}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "STREAM_SECRET": TOKEN, **(env or {})},
    )


class Server:
    def __init__(self, config: Path, port: int, cwd: Path, command: list[str] | None = None) -> None:
        self.port = port
        self.log = (cwd / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [*(command or [str(SCRIPT)]), "serve", "--config", str(config)],
            cwd=cwd,
            stdout=self.log,
            stderr=self.log,
            env={**os.environ, "STREAM_SECRET": TOKEN},
        )

    async def ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, "log-bridge serve exited"
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("log-bridge serve did not become ready")

    @staticmethod
    async def wait_until(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> None:
        """Until `url` answers 200 (the process started listening)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, "log-bridge serve exited"
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("log-bridge serve did not start")

    def kill(self, signum: int) -> int:
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code


def delivered_keys(tmp_path: Path) -> list[str]:
    keys = []
    for path in sorted((tmp_path / "out").glob("*.ndjson")):
        for line in path.read_bytes().splitlines():
            keys.append(orjson.loads(line)["keySuffix"])
    return keys


class TestCommands:
    @pytest.mark.parametrize(
        "command",
        [[], ["serve"], ["validate"], ["check"], ["send-test"], ["dlq"], ["dlq", "list"], ["dlq", "replay"]],
    )
    def test_help(self, command: list[str]) -> None:
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and "usage: log-bridge" in result.stdout

    def test_version(self) -> None:
        """What a bug report starts with (`vector --version`, `fluent-bit --version`)."""
        result = run_cli("--version")
        assert result.returncode == 0 and re.fullmatch(r"log-bridge \d+\.\d+\.\d+\S*\n", result.stdout)

    @pytest.mark.parametrize("command", [["check"], ["drain"], ["send-test", "http://127.0.0.1:1/workos"]])
    @pytest.mark.parametrize("timeout", ["0", "-5", "nan"])
    def test_a_timeout_that_is_not_positive_is_refused(self, command: list[str], timeout: str) -> None:
        result = run_cli(*command, "--timeout", timeout, env={"LOG_BRIDGE_CONFIG": "unused.yaml"})
        assert result.returncode == 2 and "--timeout: must be a number of seconds above 0" in result.stderr

    def test_validate(self, tmp_path: Path) -> None:
        good = write_config(tmp_path, 8080)
        result = run_cli("validate", "--config", str(good))
        assert (
            result.returncode == 0
            and "configuration OK" in result.stdout
            and "sink archive: type file" in result.stdout
        )
        assert TOKEN not in result.stdout
        bad = tmp_path / "bad.yaml"
        bad.write_text("server: {port: x, colour: red}\nstreams: []\nsinks: {a: {type: nope}}\n")
        result = run_cli("validate", "--config", str(bad))
        assert result.returncode == 1
        for fragment in ("server.port:", "server.colour: unknown key", "streams:", "sinks.a.type: unknown sink type"):
            assert fragment in result.stderr
        assert "Traceback" not in result.stderr

    def test_validate_reports_an_unset_variable(self, tmp_path: Path) -> None:
        config = write_config(tmp_path, 8080)
        result = subprocess.run(
            [str(SCRIPT), "validate", "--config", str(config)],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "STREAM_SECRET"},
        )
        assert result.returncode == 1
        assert "streams[0].auth.values[0]: environment variable STREAM_SECRET is not set" in result.stderr

    @pytest.mark.parametrize(
        "command", [["validate"], ["check"], ["drain"], ["dlq", "list"], ["dlq", "replay"], ["dlq", "purge", "--all"]]
    )
    def test_no_configuration_is_one_line(self, command: list[str]) -> None:
        """Was two lines calling a configuration nobody gave 'invalid (1 problem(s))'."""
        result = run_cli(*command, env={"LOG_BRIDGE_CONFIG": ""})
        assert result.returncode == 2 and result.stdout == ""
        assert (
            result.stderr == f"log-bridge {command[0]}: no configuration: pass --config FILE or set LOG_BRIDGE_CONFIG\n"
        )

    def test_config_from_environment_variable(self, tmp_path: Path) -> None:
        config = write_config(tmp_path, 8080)
        result = run_cli("validate", env={"LOG_BRIDGE_CONFIG": str(config)})
        assert result.returncode == 0


class TestCheck:
    """`log-bridge check`: every sink's health check, from a real process, against real peers."""

    HEC_TOKEN = "hec-token-0123456789"  # noqa: S105 - the local peer's made-up token

    @staticmethod
    def config(tmp_path: Path, sinks: dict[str, Any]) -> Path:
        path = write_config(tmp_path, 8080)
        tree = yaml.safe_load(path.read_text())
        tree["sinks"].update(sinks)
        path.write_text(yaml.safe_dump(tree))
        return path

    @staticmethod
    async def run(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "STREAM_SECRET": TOKEN},
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def test_each_sink_is_reported_and_a_failure_is_exit_1(self, tmp_path: Path) -> None:
        peer = HecPeer(token=self.HEC_TOKEN)
        await peer.start()
        try:
            config = self.config(
                tmp_path,
                {
                    "splunk": {"type": "splunk_hec", "url": peer.url, "token": self.HEC_TOKEN},
                    "splunk-old-token": {"type": "splunk_hec", "url": peer.url, "token": "revoked-token-42"},
                },
            )
            code, out, err = await self.run("check", "--config", str(config))
            only, only_out, _ = await self.run("check", "--config", str(config), "--sink", "splunk")
        finally:
            await peer.stop()
        assert code == 1, err
        lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("ok", "FAILED"))}
        assert lines["archive"].startswith("ok") and "(file)" in lines["archive"]
        assert lines["splunk"].startswith("ok") and "accepts the token" in lines["splunk"]
        assert lines["splunk-old-token"].startswith("FAILED") and "refused the token" in lines["splunk-old-token"]
        assert "2 of 3 sink(s) healthy" in out
        for secret in (self.HEC_TOKEN, "revoked-token-42", TOKEN):
            assert secret not in out + err
        assert only == 0 and "1 of 1 sink(s) healthy" in only_out and "archive" not in only_out

    async def test_an_unreachable_sink_is_reported_within_the_timeout(self, tmp_path: Path) -> None:
        port = free_port()  # nothing listens there
        config = self.config(
            tmp_path, {"dd": {"type": "datadog", "api_key": "k" * 32, "endpoint": f"http://127.0.0.1:{port}"}}
        )
        code, out, _ = await self.run("check", "--config", str(config), "--sink", "dd", "--timeout", "10")
        assert code == 1
        assert out.startswith("FAILED dd") and f"cannot reach Datadog at http://127.0.0.1:{port}" in out
        assert "k" * 32 not in out

    async def test_unknown_sink_and_unbuildable_sink_are_exit_2(self, tmp_path: Path) -> None:
        """Was a defect: a sink that could not be built stopped the whole check at it, with no word on the
        other sinks (examples/all-sinks.yaml on a laptop: its syslog CA file missing hid five results)."""
        config = self.config(
            tmp_path,
            {
                "splunk": {
                    "type": "splunk_hec",
                    "url": "https://127.0.0.1:1",
                    "token": "t",
                    "tls": {"ca_file": "/nope.pem"},
                }
            },
        )
        code, _, err = await self.run("check", "--config", str(config), "--sink", "missing")
        assert code == 2 and "no sink named 'missing'" in err
        code, out, err = await self.run("check", "--config", str(config))
        assert code == 2 and "Traceback" not in err
        # The sink that cannot be built does not hide the others' results: every sink has its line.
        lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(("ok", "FAILED"))}
        assert lines["archive"].startswith("ok")
        assert lines["splunk"].startswith("FAILED") and "(splunk_hec) cannot be built: " in lines["splunk"]
        assert "sinks.splunk.tls.ca_file: cannot load '/nope.pem'" in lines["splunk"]
        assert "1 of 2 sink(s) healthy" in out


class TestRunningProcess:
    async def test_send_test_dlq_and_sigterm(self, tmp_path: Path) -> None:
        port = free_port()
        config = write_config(tmp_path, port)
        server = Server(config, port, tmp_path)
        try:
            await server.ready()
            url = f"http://127.0.0.1:{port}/workos"
            for extra in ([], ["--format", "ndjson", "--gzip"]):
                result = await asyncio.to_thread(
                    run_cli, "send-test", url, "--header", f"Authorization: {TOKEN}", "--count", "4", *extra
                )
                assert result.returncode == 0, result.stderr
                assert result.stdout.startswith('200 {"accepted":4')
            refused = await asyncio.to_thread(run_cli, "send-test", url, "-H", "Authorization: Bearer wrong")
            assert refused.returncode == 1 and refused.stdout.startswith("401")
            async with (
                aiohttp.ClientSession() as session,
                session.post(url, data=b'[{"event": 5}]', headers={"Authorization": TOKEN}) as response,
            ):
                assert (await response.json())["dead_lettered"] == 1
            listing = await asyncio.to_thread(run_cli, "dlq", "list", "--config", str(config))
            (line,) = listing.stdout.splitlines()
            entry = orjson.loads(line)
            assert (
                entry["element"] == {"event": 5} and entry["sink"] == "(intake)" and "not an object" in entry["reason"]
            )
            deadline = time.monotonic() + 10
            while len(delivered_keys(tmp_path)) < 8 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(delivered_keys(tmp_path)) == 8
        finally:
            code = server.kill(signal.SIGTERM)
        assert code == 0
        log = (tmp_path / "serve.log").read_text()
        assert '"message":"stopped"' in log and "process-test-secret" not in log

    async def test_segments_removed_after_a_sigkill_with_every_sink_down_are_reported(self, tmp_path: Path) -> None:
        """Was a defect: the segments removed (or an older copy put back) while the service was stopped lost
        its backlog in silence. With every sink down no progress is committed, and SIGKILL leaves no close:
        what the database knows was appended is kept within a second all the same."""
        port = free_port()
        (tmp_path / "out").write_bytes(b"")  # where the sink's directory goes: every write fails (retried)
        config = write_config(tmp_path, port)
        server = Server(config, port, tmp_path)
        try:
            await server.ready()
            url = f"http://127.0.0.1:{port}/workos"
            result = await asyncio.to_thread(run_cli, "send-test", url, "-H", f"Authorization: {TOKEN}", "-n", "3")
            assert result.stdout.startswith('200 {"accepted":3'), result
            database = sqlite3.connect(tmp_path / "journal.db")
            try:
                deadline = time.monotonic() + 30
                query = "SELECT value FROM meta WHERE key = 'last_seq'"
                while database.execute(query).fetchone() != (3,) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert database.execute(query).fetchone() == (3,)
            finally:
                database.close()
        finally:
            server.kill(signal.SIGKILL)
        shutil.rmtree(tmp_path / "journal.db.segments")
        env = {**os.environ, "STREAM_SECRET": TOKEN}
        drained = subprocess.run(
            [str(SCRIPT), "drain", "--config", str(config), "--timeout", "1"], capture_output=True, text=True, env=env
        )
        assert drained.returncode == 0 and "journal events missing" in drained.stderr, drained  # nothing to deliver
        listing = subprocess.run([str(SCRIPT), "dlq", "list", "--config", str(config)], capture_output=True, env=env)
        (line,) = listing.stdout.splitlines()
        assert "missing from the segments (seqs 1-3)" in orjson.loads(line)["reason"]

    async def test_serve_without_config_uses_the_local_default(self, tmp_path: Path) -> None:
        proc = subprocess.Popen([str(SCRIPT), "serve"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            async with aiohttp.ClientSession() as session:
                while True:
                    try:
                        async with session.post(
                            "http://127.0.0.1:8080/workos", data=orjson.dumps(sample_wrappers(2))
                        ) as response:
                            assert response.status == 200
                            break
                    except aiohttp.ClientConnectionError:
                        assert time.monotonic() < deadline and proc.poll() is None
                        await asyncio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert "no configuration given" in stderr and "without a secret" in stderr
        assert (tmp_path / "log-bridge-data" / "journal.db").exists()

    async def test_a_stop_that_leaves_events_says_which_sink_holds_them(self, tmp_path: Path) -> None:
        """Was a defect: a stop with a sink down waited out shutdown_timeout, logged `"drained": false` and
        nothing about which sink held what, or for how long it would wait."""
        port = free_port()
        config = write_config(tmp_path, port)
        tree = yaml.safe_load(config.read_text())
        tree["sinks"]["fwd"] = {"type": "http", "url": f"http://127.0.0.1:{free_port()}/ingest"}  # nothing there
        tree["streams"][0]["sinks"].append("fwd")
        config.write_text(yaml.safe_dump(tree))
        server = Server(config, port, tmp_path)
        try:
            await server.ready()
            sent = await asyncio.to_thread(
                run_cli, "send-test", f"http://127.0.0.1:{port}/workos", "-H", f"Authorization: {TOKEN}"
            )
            assert sent.returncode == 0, sent.stderr
        finally:
            code = server.kill(signal.SIGTERM)
        assert code == 0
        lines = [orjson.loads(line) for line in (tmp_path / "serve.log").read_bytes().splitlines()]
        stopping = next(line for line in lines if line["message"].startswith("stopping"))
        assert stopping["shutdown_timeout_s"] == 3
        (left,) = [line for line in lines if "events_left" in line]
        assert left["level"] == "warning" and set(left["events_left"]) == {"fwd"} and left["events_left"]["fwd"] > 0
        assert "stays in the journal" in left["message"]

    async def test_a_second_signal_stops_without_waiting_for_the_sinks(self, tmp_path: Path) -> None:
        """Ctrl-C, then Ctrl-C again (as with Vector or Fluent Bit): the second one does not wait out
        shutdown_timeout for a sink that is down; its events stay in the journal, a restart delivers them."""
        port = free_port()
        config = write_config(tmp_path, port)
        tree = yaml.safe_load(config.read_text())
        tree["server"]["shutdown_timeout"] = "1h"
        tree["sinks"]["fwd"] = {"type": "http", "url": f"http://127.0.0.1:{free_port()}/ingest"}  # nothing there
        tree["streams"][0]["sinks"].append("fwd")
        config.write_text(yaml.safe_dump(tree))
        server = Server(config, port, tmp_path)
        log = tmp_path / "serve.log"
        try:
            await server.ready()
            sent = await asyncio.to_thread(
                run_cli, "send-test", f"http://127.0.0.1:{port}/workos", "-H", f"Authorization: {TOKEN}"
            )
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 20
            while len(delivered_keys(tmp_path)) < 3:  # the sink that is up delivers them first (within max_wait)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGINT)
            while b'"stopping' not in log.read_bytes():
                assert time.monotonic() < deadline and server.proc.poll() is None
                await asyncio.sleep(0.05)
        finally:
            try:
                code = server.kill(signal.SIGINT)  # within the 30 s it waits, not the hour
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
                raise
        assert code == 0
        lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
        assert any("second signal" in line["message"] for line in lines)
        (left,) = [line for line in lines if "events_left" in line]
        assert left["events_left"]["fwd"] > 0
        assert len(delivered_keys(tmp_path)) == 3  # the sink that was up had delivered them


async def test_sigkill_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    """20 SIGKILLs under load, at random moments: every event that got a 200 reaches the sink after the last
    restart, and every one of them is still known to dedup, so WorkOS retrying those batches after the restarts
    delivers nothing twice."""
    port = free_port()
    config = write_config(tmp_path, port)
    acknowledged: list[str] = []
    acknowledged_batches: list[list[dict[str, Any]]] = []
    chance = random.Random(20)

    async def client(number: int, round_: int, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as session:
            batch = 0
            while not stop.is_set():
                wrappers = sample_wrappers(10)
                for index, wrapper in enumerate(wrappers):
                    wrapper["keySuffix"] = f"r{round_}-c{number}-b{batch}-{index}"
                batch += 1
                try:
                    async with session.post(
                        f"http://127.0.0.1:{port}/workos", data=orjson.dumps(wrappers), headers={"Authorization": TOKEN}
                    ) as response:
                        if response.status == 200:
                            acknowledged.extend(w["keySuffix"] for w in wrappers)
                            acknowledged_batches.append(wrappers)
                except aiohttp.ClientError:
                    return  # the server died under us: this batch was never acknowledged

    for round_ in range(20):
        server = Server(config, port, tmp_path)
        await server.ready()
        stop = asyncio.Event()
        clients = [asyncio.create_task(client(n, round_, stop)) for n in range(8)]
        await asyncio.sleep(0.2 + chance.random() * 0.6)
        server.kill(signal.SIGKILL)
        stop.set()
        await asyncio.gather(*clients)
    assert len(acknowledged) > 2000, "the load was too light to prove anything"

    restarted = Server(config, port, tmp_path)
    try:
        await restarted.ready()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            missing = set(acknowledged) - set(delivered_keys(tmp_path))
            if not missing:
                break
            await asyncio.sleep(0.1)
        assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
        async with aiohttp.ClientSession() as session:
            # Events journaled whose answer the kill cut off may still be on their way to the file: the count
            # to compare with is the one once the sink owes nothing (the gauge is the sink's own count, live).
            while True:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    owed = scrape(await response.text(), "log_bridge_sink_backlog_events", sink="archive")
                if owed == 0:
                    break
                assert time.monotonic() < deadline, f"the sink still owes {owed} events"
                await asyncio.sleep(0.1)
        delivered_before_retries = len(delivered_keys(tmp_path))
        answers = []
        async with aiohttp.ClientSession() as session:
            for wrappers in acknowledged_batches:
                async with session.post(
                    f"http://127.0.0.1:{port}/workos", data=orjson.dumps(wrappers), headers={"Authorization": TOKEN}
                ) as response:
                    assert response.status == 200
                    answers.append(await response.json())
        assert sum(a["duplicates"] for a in answers) == len(acknowledged)
        assert sum(a["accepted"] for a in answers) == 0
        await asyncio.sleep(0.5)
        assert len(delivered_keys(tmp_path)) == delivered_before_retries
    finally:
        assert restarted.kill(signal.SIGTERM) == 0


class TestReloadOfTls:
    async def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(self, tmp_path: Path) -> None:
        # OpenSSL's own answer to an encrypted key is to prompt for its passphrase and read it from the terminal,
        # or from stdin without one: on the event loop, which then serves nothing until a line comes.
        from cryptography.hazmat.primitives import serialization

        issued = trustme.CA().issue_cert("127.0.0.1")
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        port, admin = free_port(), free_port()
        config = write_config(tmp_path, port)
        tree = yaml.safe_load(config.read_text())
        tree["server"].update(tls={"cert_file": str(cert), "key_file": str(key)}, admin={"port": admin})
        config.write_text(yaml.safe_dump(tree))
        log = tmp_path / "serve.log"
        with log.open("ab") as output:
            proc = subprocess.Popen(
                [str(SCRIPT), "serve", "--config", str(config)],
                stdin=subprocess.PIPE,  # open, as under a supervisor that keeps it so: nothing ever comes
                stdout=output,
                stderr=output,
                env={**os.environ, "STREAM_SECRET": TOKEN},
                start_new_session=True,  # no controlling terminal: the prompt would go to stdin
            )
        try:
            url = f"http://127.0.0.1:{admin}/healthz"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                await Server.wait_until(session, url, proc)
                private = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
                key.write_bytes(
                    private.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.BestAvailableEncryption(b"passphrase"),
                    )
                )
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while b"reload refused" not in log.read_bytes():
                    assert time.monotonic() < deadline, "no reload refused line"
                    await asyncio.sleep(0.05)
                async with session.get(url) as response:  # the loop runs: not waiting for a passphrase
                    assert response.status == 200
            text = log.read_text()
            assert "pass phrase" not in text.lower() and "encrypted" in text
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # OpenSSL's prompt takes SIGTERM while it reads: it is lost
                proc.kill()
                proc.wait(timeout=15)


class TestSendTest:
    """`log-bridge send-test` pointed where a newcomer may point it by mistake: one line that says what to try."""

    @staticmethod
    async def accepted(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"accepted": 3, "duplicates": 0, "dead_lettered": 0})

    @staticmethod
    async def send(*args: str) -> subprocess.CompletedProcess[str]:
        result = await asyncio.to_thread(run_cli, "send-test", *args, "--timeout", "20")
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 1, result.stderr
        return result

    async def test_https_to_a_plain_http_server_says_it_is_not_tls(self) -> None:
        async with http_peer(self.accepted) as url:
            result = await self.send(url.replace("http://", "https://") + "/workos")
        assert result.returncode == 1 and "the server does not speak TLS there: is it http://?" in result.stderr

    async def test_a_certificate_not_trusted_says_how_to_trust_it(self, tmp_path: Path) -> None:
        ca = trustme.CA()
        served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(served)
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        async with http_peer(self.accepted, tls=served) as url:
            untrusted = await self.send(url + "/workos")
            trusted = await self.send(url + "/workos", "--cafile", str(bundle))
            plain = await self.send(url.replace("https://", "http://") + "/workos")
        assert untrusted.returncode == 1 and "pass --cafile with the CA that issued its certificate" in untrusted.stderr
        assert trusted.returncode == 0 and trusted.stdout.startswith("200 ")
        assert plain.returncode == 1 and "closed the connection without answering: is it https://" in plain.stderr

    async def test_a_ca_bundle_that_cannot_be_loaded_is_exit_2(self, tmp_path: Path) -> None:
        result = await self.send("https://127.0.0.1:1/workos", "--cafile", str(tmp_path / "nope.pem"))
        assert result.returncode == 2
        assert f"cannot load the CA bundle {tmp_path / 'nope.pem'}: No such file or directory" in result.stderr

    async def test_a_header_without_a_colon_is_not_quoted_back(self) -> None:
        result = await self.send("http://127.0.0.1:1/workos", "-H", "Authorization Bearer s3cr3t-given-wrong")
        assert result.returncode == 2 and "--header must look like 'Name: value'" in result.stderr
        assert "s3cr3t" not in result.stderr


class TestStartFailures:
    def test_port_in_use_is_a_clear_error(self, tmp_path: Path) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            config = write_config(tmp_path, taken.getsockname()[1])
            result = run_cli("serve", "--config", str(config))
        assert result.returncode == 2 and "cannot start" in result.stderr and "Traceback" not in result.stderr

    def test_missing_certificate_is_a_clear_error(self, tmp_path: Path) -> None:
        config = write_config(tmp_path, free_port())
        tree = yaml.safe_load(config.read_text())
        tree["server"]["tls"] = {"cert_file": str(tmp_path / "nope.crt"), "key_file": str(tmp_path / "nope.key")}
        config.write_text(yaml.safe_dump(tree))
        result = run_cli("serve", "--config", str(config))
        assert result.returncode == 2 and "nope.crt" in result.stderr and "Traceback" not in result.stderr

"""No stranded journals: SIGTERM keeps delivering (readiness 503 at once), and `log-bridge drain` empties a journal
left behind, against a real Splunk HEC peer on loopback and real `log-bridge` processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from receiver.samples import sample_wrappers
from tests.peers.hec import HecPeer

from .redis_server import free_port

TOKEN = "Bearer drain-test-secret"
HEC_TOKEN = "drain-hec-token-0123456789"  # noqa: S105 - the local peer's made-up token
SCRIPT = Path(sys.executable).with_name("log-bridge")
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "STREAM_SECRET": TOKEN, "PYTHONPATH": str(REPO)}
"""The checkout under test goes first on the processes' path, ahead of wherever the package is installed from."""


def write_config(tmp_path: Path, port: int, hec_url: str, shutdown_timeout: str) -> Path:
    fast_retry = {"initial": "50ms", "max": "200ms"}
    config = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "allowlist": ["127.0.0.1/32"],
            "shutdown_timeout": shutdown_timeout,
        },
        "journal": {"path": str(tmp_path / "journal.db")},
        "streams": [
            {
                "name": "workos",
                "path": "/workos",
                "auth": {"values": ["${STREAM_SECRET}"]},
                "sinks": ["archive", "splunk"],
            }
        ],
        "sinks": {
            "archive": {"type": "file", "path": str(tmp_path / "out" / "events.ndjson"), "batch": {"max_wait": "20ms"}},
            "splunk": {
                "type": "splunk_hec",
                "url": hec_url,
                "token": HEC_TOKEN,
                "batch": {"max_wait": "20ms"},
                "retry": fast_retry,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def run_cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Serve:
    """A `log-bridge serve` process."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [str(SCRIPT), "serve", "--config", str(config)], stdout=self.log, stderr=self.log, env=ENV
        )

    async def ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "log-bridge serve exited"
            try:
                async with session.get(self.base + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("log-bridge serve did not become ready")

    async def post(self, session: aiohttp.ClientSession, wrappers: list[dict[str, Any]]) -> tuple[int, Any]:
        async with session.post(
            self.base + "/workos", data=orjson.dumps(wrappers), headers={"Authorization": TOKEN}
        ) as response:
            return response.status, await response.json()

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "log-bridge serve did not exit"
            await asyncio.sleep(0.05)
        self.log.close()
        return self.proc.returncode


async def peer_holds(peer: HecPeer, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while peer.event_count < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def serving_with_splunk_down(
    tmp_path: Path, shutdown_timeout: str = "1s"
) -> AsyncIterator[tuple[HecPeer, Path, Serve, aiohttp.ClientSession]]:
    """A `log-bridge serve` (file and Splunk sinks), ready, with its HEC peer busy; the peer is stopped at the
    end."""
    peer = HecPeer(token=HEC_TOKEN)
    await peer.start()
    port = free_port()
    config = write_config(tmp_path, port, peer.url, shutdown_timeout)
    serve = Serve(config, port, tmp_path / "serve.log")
    try:
        async with aiohttp.ClientSession() as session:
            await serve.ready(session)
            peer.busy()
            yield peer, config, serve, session
    finally:
        await peer.stop()


class TestSigterm:
    async def test_readiness_is_503_at_once_and_delivery_goes_on_after_intake_stops(self, tmp_path: Path) -> None:
        # Splunk is down when the pod is told to stop: the backlog is still there.
        async with serving_with_splunk_down(tmp_path, "10s") as (peer, _, serve, session):
            status, _ = await serve.post(session, sample_wrappers(20))
            assert status == 200
            serve.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.3)
            async with session.get(serve.base + "/readyz") as ready:
                assert ready.status == 503
                assert (await ready.json())["problems"] == ["shutting down"]
            async with session.get(serve.base + "/healthz") as health:
                assert health.status == 200
            status, answer = await serve.post(session, sample_wrappers(1))
            assert status == 503 and answer == {"error": "shutting down"}
            await asyncio.sleep(0.5)
            assert serve.proc.poll() is None  # still delivering
            peer.recover()
            code = await serve.wait(15)
            stopped_after = time.monotonic() - signalled
        assert code == 0
        assert peer.event_count == 20
        assert stopped_after < 10  # it left as soon as the backlog was delivered, within shutdown_timeout
        assert b'"drained":true' in (tmp_path / "serve.log").read_bytes()


class TestDrain:
    async def test_drain_delivers_what_a_stopped_replica_left(self, tmp_path: Path) -> None:
        async with serving_with_splunk_down(tmp_path) as (peer, config, serve, session):
            for _ in range(3):
                assert (await serve.post(session, sample_wrappers(10)))[0] == 200
            serve.proc.send_signal(signal.SIGTERM)
            assert await serve.wait(15) == 0  # gave up after shutdown_timeout: the backlog stays on the volume
            assert peer.event_count == 0

            code, out, err = await run_cli("drain", "--config", str(config), "--timeout", "1")
            assert code == 1, out + err
            assert out.splitlines()[0] == f"not drained within 1s; left in {tmp_path / 'journal.db'}:"
            (left,) = out.splitlines()[1:]  # the file sink delivered everything: only Splunk is listed
            assert left.startswith("  splunk: 30 event(s) (send failed, retrying: ")
            assert HEC_TOKEN not in out + err and "Traceback" not in err

            peer.recover()
            started = time.monotonic()
            code, out, err = await run_cli("drain", "--config", str(config), "--timeout", "30")
            assert code == 0, out + err
            assert out.startswith("drained: every event in") and time.monotonic() - started < 15
            assert peer.event_count == 30
            code, out, _ = await run_cli("drain", "--config", str(config), "--timeout", "5")
            assert code == 0 and peer.event_count == 30  # nothing is sent twice
        lines = (tmp_path / "out" / "events.ndjson").read_bytes().splitlines()
        assert len(lines) == 30

    async def test_drain_without_a_journal_is_a_clear_error(self, tmp_path: Path) -> None:
        config = write_config(tmp_path, 8080, "http://127.0.0.1:1", "1s")
        code, _, err = await run_cli("drain", "--config", str(config))
        assert code == 2 and err.strip() == f"log-bridge drain: no journal at {tmp_path / 'journal.db'}"
        assert not (tmp_path / "journal.db").exists()

    async def test_drain_of_a_file_that_is_not_a_journal_is_a_clear_error(self, tmp_path: Path) -> None:
        """Was a defect: the JournalError that says why it cannot be opened came as a traceback."""
        config = write_config(tmp_path, 8080, "http://127.0.0.1:1", "1s")
        (tmp_path / "journal.db").write_text("not a database\n")
        code, out, err = await run_cli("drain", "--config", str(config))
        assert code == 2 and out == "", err
        assert err.startswith(f"log-bridge drain: cannot start: cannot open the journal {tmp_path / 'journal.db'}: ")
        assert "not a log-bridge journal" in err and err.count("\n") == 1


class TestDrainAfterReroute:
    async def test_drain_delivers_what_a_stream_renamed_by_a_reload_left(self, tmp_path: Path) -> None:
        """A reload renamed the stream while Splunk was down: Splunk still owes the events of the old name
        (docs/configuration.md, Reloading), and `drain` of the claim must deliver them, not call it drained."""
        async with serving_with_splunk_down(tmp_path) as (peer, config, serve, session):
            assert (await serve.post(session, sample_wrappers(10)))[0] == 200
            renamed = yaml.safe_load(config.read_text())
            renamed["streams"][0]["name"] = "audit"
            config.write_text(yaml.safe_dump(renamed))
            serve.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while b"configuration reloaded" not in (tmp_path / "serve.log").read_bytes():
                assert time.monotonic() < deadline, "the reload was not applied"
                await asyncio.sleep(0.05)
            serve.proc.send_signal(signal.SIGTERM)
            assert await serve.wait(15) == 0
            assert peer.event_count == 0

            code, out, err = await run_cli("drain", "--config", str(config), "--timeout", "1")
            assert code == 1, out + err  # Splunk is still down: not "drained"
            assert out.splitlines()[1].startswith("  splunk: 10 event(s) (send failed, retrying: ")
            peer.recover()
            code, out, err = await run_cli("drain", "--config", str(config), "--timeout", "10")
            assert peer.event_count == 10, out + err
            assert code == 0, out + err


class TestSigtermDuringReload:
    async def test_readiness_turns_503_at_once_and_the_exit_is_bounded(self, tmp_path: Path) -> None:
        """A SIGTERM that arrives while a reload waits for changed sinks' sends in progress (each for up to
        shutdown_timeout, one after the other) must still turn /readyz 503 and refuse batches at once, and the
        process must leave within the stop's own bound (shutdown_timeout for delivery, then for requests)."""
        from aiohttp import web

        from tests.conftest import http_peer

        async def hung(request: web.Request) -> web.Response:
            await request.read()
            await asyncio.sleep(20)  # a destination that takes the request and does not answer
            return web.json_response({})

        async with http_peer(hung) as url:
            port = free_port()
            sinks = {f"fwd{i}": {"type": "http", "url": url, "timeout": "60s"} for i in range(3)}
            tree = {
                "server": {"host": "127.0.0.1", "port": port, "allowlist": ["127.0.0.1/32"], "shutdown_timeout": "2s"},
                "journal": {"path": str(tmp_path / "journal.db")},
                "streams": [
                    {"name": "workos", "path": "/workos", "auth": {"values": ["${STREAM_SECRET}"]}, "sinks": [*sinks]}
                ],
                "sinks": sinks,
            }
            config = tmp_path / "config.yaml"
            config.write_text(yaml.safe_dump(tree))
            serve = Serve(config, port, tmp_path / "serve.log")
            async with aiohttp.ClientSession() as session:
                await serve.ready(session)
                assert (await serve.post(session, sample_wrappers(5)))[0] == 200
                await asyncio.sleep(1.5)  # every sink's send is in progress, and hangs
                for sink in tree["sinks"].values():
                    sink["timeout"] = "59s"  # every sink changed: the reload waits for each send in progress
                config.write_text(yaml.safe_dump(tree))
                serve.proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.5)
                serve.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.3)
                async with session.get(serve.base + "/readyz") as ready:
                    readiness = ready.status
                status, _ = await serve.post(session, sample_wrappers(1))
                code = await serve.wait(30)
                took = time.monotonic() - signalled
        assert (readiness, status, code) == (503, 503, 0), f"exited {took:.1f}s after SIGTERM"
        assert took < 2 * 2 + 1, f"exited {took:.1f}s after SIGTERM"


class TestSigtermWithAHungS3:
    @pytest.mark.parametrize("when", ["serving", "during a reload"])
    async def test_the_exit_is_bounded_and_the_events_stay_in_the_journal(self, tmp_path: Path, when: str) -> None:
        """An S3 endpoint that takes connections and never answers: the S3 sink's close waited for its executor's
        threads, each until its request's `timeout` (30 s here), and so did the interpreter's exit, so SIGTERM
        took about 30 s with shutdown_timeout 2s (a reload rebuilding the sink was held up as long, and the stop
        after it); the chart's grace period is 2 x shutdown_timeout + 15 s. What the hung requests were sending
        is still in the journal: `drain` delivers it to a working S3."""
        from tests.peers.s3 import MotoS3, read_objects, s3_client

        held: list[asyncio.StreamWriter] = []

        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            while await reader.read(65536):
                pass

        hole = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = free_port()
        bucket = f"audit-{uuid.uuid4().hex[:12]}"  # moto keeps its buckets for the whole test process
        s3 = {
            "type": "s3",
            "bucket": bucket,
            "endpoint_url": f"http://127.0.0.1:{hole.sockets[0].getsockname()[1]}",
            "region": "us-east-1",
            "addressing_style": "path",
            "access_key_id": "testing",
            "secret_access_key": "testing-secret",
            "timeout": "30s",
            "batch": {"max_wait": "10ms"},
        }
        tree = {
            "server": {"host": "127.0.0.1", "port": port, "allowlist": ["127.0.0.1/32"], "shutdown_timeout": "2s"},
            "journal": {"path": str(tmp_path / "journal.db")},
            "streams": [
                {"name": "workos", "path": "/workos", "auth": {"values": ["${STREAM_SECRET}"]}, "sinks": ["s3"]}
            ],
            "sinks": {"s3": s3},
        }
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(tree))
        serve = Serve(config, port, tmp_path / "serve.log")
        wrappers = sample_wrappers(5)
        try:
            async with aiohttp.ClientSession() as session:
                await serve.ready(session)
                assert (await serve.post(session, wrappers))[0] == 200
                while len(held) < 2:  # the health check's put and the events' hang
                    await asyncio.sleep(0.05)
                if when == "during a reload":
                    s3["timeout"] = "29s"  # the sink changed: the reload rebuilds it
                    config.write_text(yaml.safe_dump(tree))
                    serve.proc.send_signal(signal.SIGHUP)
                    await asyncio.sleep(0.5)
                serve.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                code = await serve.wait(60)
                took = time.monotonic() - signalled
            if when == "serving":  # `drain` against the same endpoint ends with its --timeout too, not the sink's
                started = time.monotonic()
                status, out, err = await run_cli("drain", "--config", str(config), "--timeout", "2")
                drained_in = time.monotonic() - started
                assert status == 1 and "s3: 5 event(s)" in out, out + err
                assert drained_in < 2 + 4, f"drain --timeout 2 exited after {drained_in:.1f}s"
        finally:
            hole.close()
            for writer in held:
                writer.close()
        assert code == 0
        assert took < 2 * 2 + 1, f"exited {took:.1f}s after SIGTERM"
        with MotoS3() as moto:
            s3_client(moto).create_bucket(Bucket=bucket)
            s3["endpoint_url"] = moto.endpoint_url
            config.write_text(yaml.safe_dump(tree))
            status, out, err = await run_cli("drain", "--config", str(config), "--timeout", "20")
            assert status == 0, out + err
            objects = read_objects(s3_client(moto), bucket)
        delivered = sorted(orjson.loads(item["body"])["id"] for key, item in objects.items() if "health" not in key)
        assert delivered == sorted(w["event"]["id"] for w in wrappers), sorted(objects)

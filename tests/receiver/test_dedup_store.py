"""Shared deduplication (journal.dedup_store: redis): replicas that behave as one, against a real redis-server.

Every figure printed here (batches sent to both, events delivered, duplicates) is measured from the memory sinks of
two real services on loopback.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import trustme
import yaml

from receiver import dedup_store
from receiver.config import parse_config, secret_values
from receiver.errors import ConfigError
from receiver.reload import plan_reload
from receiver.samples import sample_wrappers
from receiver.server import Service
from tests.conftest import BASE_CONFIG, TOKEN, StartService, memory

from .redis_server import RedisServer

PASSWORD = "redis-test-password-7f3a"  # noqa: S105 - the local server's made-up password
WINDOW = 3600.0
QUERY = (
    "takes no query string or fragment (`?`, `#`): its options are keys of journal.dedup_store, and a `?` or `#` in"
    " the password is written %3F or %23"
)
REPO = Path(__file__).resolve().parents[2]
"""The checkout under test: put first on the CLI's path, ahead of wherever the package is installed from."""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A password-protected redis-server on loopback."""
    server = RedisServer(tmp_path / "redis", password=PASSWORD)
    server.start()
    yield server
    server.stop()


def replica_changes(name: str, store: dict[str, Any] | None) -> dict[str, Any]:
    """Config changes for one replica: its own memory sink, and the dedup store (None: the journal alone)."""
    journal: dict[str, Any] = {"dedup_window": WINDOW}
    if store is not None:
        journal["dedup_store"] = {"type": "redis", "timeout": "250ms", **store}
    return {
        "journal": journal,
        "streams": [{"name": "workos", "path": "/workos", "auth": {"values": [TOKEN]}, "sinks": [name]}],
        "sinks": {name: {"type": "memory", "batch": {"max_wait": "20ms"}}},
    }


async def post(client: aiohttp.ClientSession, service: Service, wrappers: list[dict[str, Any]]) -> dict[str, Any]:
    """POST a batch as WorkOS does; the answer must be a 200."""
    async with client.post(
        service.url + "/workos", data=orjson.dumps(wrappers), headers={"Authorization": TOKEN}
    ) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def delivered(names: list[str], expected: int, timeout: float = 10) -> Counter[str]:
    """keySuffix -> how many times the replicas' sinks got it, once they hold `expected` events in total."""
    deadline = time.monotonic() + timeout
    while True:
        events = [event for name in names for event in memory(name).events]
        if len(events) >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # anything beyond `expected` arrives too
    events = [event for name in names for event in memory(name).events]
    return Counter(orjson.loads(event.raw)["keySuffix"] for event in events)


def store_errors(service: Service) -> float:
    value = service.metrics.registry.get_sample_value("log_bridge_dedup_store_errors_total")
    assert value is not None
    return value


def report(title: str, **figures: object) -> None:
    """Print measured figures (pytest -s shows them; -rA keeps them in the summary)."""
    print(f"\n[two replicas] {title}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), file=sys.stderr)


class TestConfig:
    def tree(self, store: dict[str, Any], **journal: Any) -> dict[str, Any]:
        return {**BASE_CONFIG, "journal": {"dedup_store": store, **journal}}

    def errors(self, tree: dict[str, Any]) -> list[str]:
        with pytest.raises(ConfigError) as caught:
            parse_config(tree, {})
        return caught.value.errors

    def test_default_is_the_journal_alone(self) -> None:
        config = parse_config(BASE_CONFIG, {})
        assert config.journal.dedup_store.type == "journal"
        assert Service(config).journal.shared is None

    def test_redis_needs_a_url(self) -> None:
        assert self.errors(self.tree({"type": "redis"})) == ["journal.dedup_store.url: field required with type redis"]

    def test_a_wrong_scheme_is_named_without_repeating_the_url(self) -> None:
        (error,) = self.errors(self.tree({"type": "redis", "url": f"http://:{PASSWORD}@cache:6379"}))
        assert error == "journal.dedup_store.url: must start with redis:// or rediss:// (TLS)"

    @pytest.mark.parametrize(
        ("url", "message"),
        [
            (f"redis://:{PASSWORD}@cache:63790000", "the port is not a number from 1 to 65535"),
            (f"rediss://:{PASSWORD}@:6380", "names no host"),
            (f"redis://:{PASSWORD}@cache/zero", "the database (the path) must be a number"),
            # redis-py would take options from the query: these turned off the TLS certificate check
            (f"rediss://:{PASSWORD}@cache:6380/0?ssl_cert_reqs=none", QUERY),
            ("rediss://cache:6380/0?ssl_check_hostname=false", QUERY),
            (f"redis://cache/0?password={PASSWORD}", QUERY),  # a password no log line would have scrubbed
            ("redis://cache/0?socket_timeout=abc", QUERY),  # `serve` and `check` stopped with a traceback
            ("redis://:pass?word@cache/0", QUERY),
            ("redis://:pass#word@cache/0", QUERY),
        ],
    )
    def test_a_malformed_url_is_refused_at_load(self, url: str, message: str) -> None:
        (error,) = self.errors(self.tree({"type": "redis", "url": url}))
        assert error == f"journal.dedup_store.url: {message}"

    def test_url_without_redis_and_unknown_keys(self) -> None:
        errors = self.errors(self.tree({"url": "redis://cache", "db": 2}))
        assert errors == ["journal.dedup_store.url: only used with type redis", "journal.dedup_store.db: unknown key"]

    def test_the_store_needs_a_window(self) -> None:
        errors = self.errors(self.tree({"type": "redis", "url": "redis://cache"}, dedup_window=0))
        assert errors == [
            "journal: dedup_window must be above 0 with dedup_store type redis (its keys expire with the window)"
        ]

    def test_url_from_the_environment(self) -> None:
        tree = self.tree({"type": "redis", "url": "${LOG_BRIDGE_REDIS_URL}"})
        config = parse_config(tree, {"LOG_BRIDGE_REDIS_URL": "rediss://cache:6380/1"})
        assert config.journal.dedup_store.url_text() == "rediss://cache:6380/1"
        assert "cache:6380" not in repr(config)  # a SecretStr: the URL may carry the password

    def test_the_password_is_scrubbed_from_logs(self) -> None:
        url = f"rediss://user:{PASSWORD}@cache:6380/1"
        config = parse_config(self.tree({"type": "redis", "url": url, "password": "other-password-42"}), {})
        secrets = secret_values(config, {})
        assert {PASSWORD, url, "other-password-42"} <= set(secrets)

    def test_an_unreadable_ca_file_fails_the_start(self, tmp_path: Path) -> None:
        tree = self.tree({"type": "redis", "url": "rediss://cache:6380", "ca_file": str(tmp_path / "nope.pem")})
        with pytest.raises(ConfigError) as caught:
            Service(parse_config(tree, {}))
        assert caught.value.errors == [
            f"journal.dedup_store.ca_file: cannot load {tmp_path / 'nope.pem'}: No such file or directory"
        ]

    def test_a_reload_keeps_the_store_until_a_restart(self) -> None:
        old = parse_config(BASE_CONFIG, {})
        new = parse_config(self.tree({"type": "redis", "url": "redis://cache"}), {})
        plan = plan_reload(old, new)
        assert plan.needs_restart == ["journal.dedup_store"]
        assert plan.config.journal.dedup_store.type == "journal"

    def test_the_displayed_url_has_no_password(self) -> None:
        shown = dedup_store.display_url(f"rediss://user:{PASSWORD}@cache.internal:6380/2")
        assert shown == "rediss://cache.internal:6380/2"


@pytest.mark.redis
class TestTwoReplicas:
    ROUNDS = 20
    EVENTS = 10

    async def send_to_both(
        self, client: aiohttp.ClientSession, a: Service, b: Service, rounds: int
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """`rounds` new batches, each sent to A and then (a WorkOS retry on another pod) to B."""
        answers_a, answers_b = [], []
        for _ in range(rounds):
            batch = sample_wrappers(self.EVENTS)
            answers_a.append(await post(client, a, batch))
            answers_b.append(await post(client, b, batch))
        return answers_a, answers_b

    async def test_a_batch_sent_to_both_is_delivered_once(
        self, start_service: StartService, client: aiohttp.ClientSession, redis_server: RedisServer
    ) -> None:
        a = await start_service(replica_changes("mem-a", {"url": redis_server.url}))
        b = await start_service(replica_changes("mem-b", {"url": redis_server.url}))
        answers_a, answers_b = await self.send_to_both(client, a, b, self.ROUNDS)
        unique = self.ROUNDS * self.EVENTS
        seen = await delivered(["mem-a", "mem-b"], unique)
        report(
            "Redis up",
            batches_sent_to_both=self.ROUNDS,
            events_delivered=sum(seen.values()),
            unique_events=unique,
            duplicates_delivered=sum(seen.values()) - len(seen),
            answered_duplicate_by_b=sum(answer["duplicates"] for answer in answers_b),
        )
        assert all(answer["accepted"] == self.EVENTS for answer in answers_a)
        assert all(answer == {"accepted": 0, "duplicates": self.EVENTS, "dead_lettered": 0} for answer in answers_b)
        assert len(seen) == unique and set(seen.values()) == {1}
        assert store_errors(a) == store_errors(b) == 0

    async def test_without_a_shared_store_each_replica_delivers_it(
        self, start_service: StartService, client: aiohttp.ClientSession
    ) -> None:
        """What the store is for: replicas that dedup alone deliver a retry landing on the other one twice."""
        a = await start_service(replica_changes("mem-a", None))
        b = await start_service(replica_changes("mem-b", None))
        await self.send_to_both(client, a, b, 5)
        seen = await delivered(["mem-a", "mem-b"], 2 * 5 * self.EVENTS)
        assert len(seen) == 5 * self.EVENTS and set(seen.values()) == {2}

    async def test_keys_are_marked_only_after_the_local_commit(
        self, start_service: StartService, client: aiohttp.ClientSession, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        a = await start_service(replica_changes("mem-a", {"url": redis_server.url}))
        b = await start_service(replica_changes("mem-b", {"url": redis_server.url}))
        # A's next append fails (an I/O error of its disk): the batch is not in A's journal, so it must not be
        # marked seen, or its retry on B would be called a duplicate and the events lost.
        segments = a.journal.segments
        append = segments.append

        def refuse(records: list) -> list:  # type: ignore[type-arg]
            raise OSError(errno.EIO, "disk trouble")

        segments.append = refuse  # type: ignore[method-assign]
        batch = sample_wrappers(self.EVENTS)
        async with client.post(a.url + "/workos", data=orjson.dumps(batch), headers={"Authorization": TOKEN}) as r:
            assert r.status == 503
        keys = redis.Redis.from_url(redis_server.url)
        try:
            assert keys.keys("log-bridge:dedup:/*") == []  # no dedup key (the start-up probe wrote `…:probe`)
            assert (await post(client, b, batch))["accepted"] == self.EVENTS
            marked = keys.keys("log-bridge:dedup:/workos:*")
            assert len(marked) == self.EVENTS
            ttl = keys.pttl(marked[0])
            assert WINDOW * 1000 - 10_000 < ttl <= WINDOW * 1000  # the key expires with the dedup window
        finally:
            keys.close()
            segments.append = append  # type: ignore[method-assign]
        assert (await post(client, a, batch))["duplicates"] == self.EVENTS
        seen = await delivered(["mem-a", "mem-b"], self.EVENTS)
        assert len(seen) == self.EVENTS and set(seen.values()) == {1}

    async def test_redis_stopped_mid_run_then_back(
        self,
        start_service: StartService,
        client: aiohttp.ClientSession,
        redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        monkeypatch.setattr(dedup_store, "RETRY_INTERVAL", 0.2)
        a = await start_service(replica_changes("mem-a", {"url": redis_server.url}))
        b = await start_service(replica_changes("mem-b", {"url": redis_server.url}))
        caplog.set_level(logging.INFO, logger="receiver.dedup_store")
        before = await self.send_to_both(client, a, b, 10)
        redis_server.stop()
        during = await self.send_to_both(client, a, b, 10)
        async with client.get(a.url + "/readyz") as ready_a, client.get(b.url + "/readyz") as ready_b:
            assert ready_a.status == ready_b.status == 200  # refusing WorkOS would be worse than a duplicate
        errors_during = store_errors(a) + store_errors(b)
        redis_server.start()
        await asyncio.sleep(dedup_store.RETRY_INTERVAL + 0.05)
        assert await a.journal.shared.probe() and await b.journal.shared.probe()  # type: ignore[union-attr]
        after = await self.send_to_both(client, a, b, 10)

        unique = 30 * self.EVENTS
        seen = await delivered(["mem-a", "mem-b"], unique + 10 * self.EVENTS)
        duplicates = sum(seen.values()) - len(seen)
        report(
            "Redis stopped for 10 of 30 rounds",
            batches_sent_to_both=30,
            requests=60,
            requests_failed=0,
            events_delivered=sum(seen.values()),
            unique_events=unique,
            duplicates_delivered=duplicates,
            dedup_store_errors=int(errors_during),
        )
        assert len(seen) == unique  # every acknowledged event delivered
        for answers_b, shared in ((before[1], True), (during[1], False), (after[1], True)):
            assert all(answer["duplicates"] == (self.EVENTS if shared else 0) for answer in answers_b)
        assert duplicates == 10 * self.EVENTS  # exactly the batches of the outage, each delivered by both
        assert store_errors(a) >= 1 and store_errors(b) >= 1
        messages = [record.getMessage() for record in caplog.records]
        assert messages.count("dedup store unavailable: deduplicating locally only until it answers") == 2
        assert messages.count("dedup store answers again: deduplication is shared again") == 2
        assert not any(PASSWORD in repr(record.__dict__) for record in caplog.records)

    @pytest.mark.parametrize("refusal", ["oom", "readonly"])
    async def test_a_store_refusing_writes_is_one_outage(
        self,
        start_service: StartService,
        client: aiohttp.ClientSession,
        redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        refusal: str,
    ) -> None:
        """A Redis that answers reads but refuses writes (out of memory under `noeviction`, a replica after a
        failover) is down for deduplication: one warning while it lasts, no "answers again" before a write
        lands, then one line when it takes them again."""
        monkeypatch.setattr(dedup_store, "RETRY_INTERVAL", 0.05)
        a = await start_service(replica_changes("mem-a", {"url": redis_server.url}))
        caplog.set_level(logging.INFO, logger="receiver.dedup_store")
        keys = redis.Redis.from_url(redis_server.url)
        try:
            if refusal == "oom":
                keys.config_set("maxmemory-policy", "noeviction")
                keys.config_set("maxmemory", "1")
            else:
                keys.replicaof("127.0.0.1", "1")  # nothing listens there: a replica, serving reads, refusing writes
            for _ in range(20):
                assert (await post(client, a, sample_wrappers(2)))["accepted"] == 2
                await asyncio.sleep(dedup_store.RETRY_INTERVAL / 2)
            during = [record.getMessage() for record in caplog.records]
            errors_during = store_errors(a)
            if refusal == "oom":
                keys.config_set("maxmemory", "0")
            else:
                keys.replicaof("NO", "ONE")
            await asyncio.sleep(dedup_store.RETRY_INTERVAL + 0.05)
            batch = sample_wrappers(3)
            assert (await post(client, a, batch))["accepted"] == 3
            marked = len(keys.keys("log-bridge:dedup:/workos:*"))
        finally:
            keys.close()
        after = [record.getMessage() for record in caplog.records][len(during) :]
        report(f"refusing writes ({refusal})", requests=20, store_errors=int(errors_during), log_lines=len(during))
        assert errors_during >= 2  # the refused writes count
        assert during == ["dedup store unavailable: deduplicating locally only until it answers"]
        assert after == ["dedup store answers again: deduplication is shared again"]
        assert marked == 3

    async def test_a_large_batch_is_shared_without_holding_the_loop(
        self, start_service: StartService, client: aiohttp.ClientSession, redis_server: RedisServer
    ) -> None:
        """A request of many events (up to `max_events_per_request`) is looked up and marked within the default
        timeout, and its keys are sent without stopping the event loop for long."""
        a = await start_service(replica_changes("mem-a", {"url": redis_server.url}))
        b = await start_service(replica_changes("mem-b", {"url": redis_server.url}))
        count = 30_000
        body = orjson.dumps([{"event": {"id": f"e{i}"}, "keySuffix": f"key-{i:07d}"} for i in range(count)])
        answers = []
        for service in (a, b):  # a WorkOS retry landing on the other replica
            async with client.post(
                service.url + "/workos", data=io.BytesIO(body), headers={"Authorization": TOKEN}
            ) as response:
                assert response.status == 200
                answers.append(await response.json())
        errors = store_errors(a) + store_errors(b)
        assert len(await delivered(["mem-a", "mem-b"], count)) == count  # the sinks are done with the loop

        store = a.journal.shared  # the store's own share of the loop, without the rest of the intake
        assert store is not None
        stalls: list[float] = []
        done = asyncio.Event()

        async def watch() -> None:  # how late the event loop wakes a 2 ms sleep
            while not done.is_set():
                started = time.monotonic()
                await asyncio.sleep(0.002)
                stalls.append(time.monotonic() - started - 0.002)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.01)
        others = [f"other-{i:07d}" for i in range(count)]
        started = time.monotonic()
        marked = await store.mark("/workos", others)
        found = await store.seen("/workos", others)
        took = time.monotonic() - started
        done.set()
        await watcher
        report(
            "one large batch",
            events=count,
            answered_duplicate_by_b=answers[1]["duplicates"],
            store_errors=int(errors),
            store_marked_and_found=len(found) if marked else 0,
            worst_loop_stall_ms=round(max(stalls) * 1000),
            store_took_ms=round(took * 1000),
        )
        assert answers[0]["accepted"] == count
        assert answers[1] == {"accepted": 0, "duplicates": count, "dead_lettered": 0}
        assert errors == 0
        assert marked and len(found) == count
        assert max(stalls) < 0.25  # one round of 30,000 SETs held it about 0.3 s

    async def test_a_hung_store_costs_at_most_its_timeout(
        self, start_service: StartService, client: aiohttp.ClientSession, redis_server: RedisServer
    ) -> None:
        a = await start_service(replica_changes("mem-a", {"url": redis_server.url}))
        await post(client, a, sample_wrappers(2))
        redis_server.pause()
        try:
            started = time.monotonic()
            answer = await post(client, a, sample_wrappers(self.EVENTS))
            took = time.monotonic() - started
            async with client.get(a.url + "/readyz") as ready:
                assert ready.status == 200
        finally:
            redis_server.resume()
        assert answer["accepted"] == self.EVENTS
        assert 0.2 < took < 1.0  # one 250 ms timeout on the lookup; the mark is not tried during the outage
        assert store_errors(a) == 1

    async def test_tls_with_a_private_ca(
        self, start_service: StartService, client: aiohttp.ClientSession, tmp_path: Path
    ) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost")
        cert_file, key_file, ca_file = tmp_path / "redis.pem", tmp_path / "redis.key", tmp_path / "ca.pem"
        cert.cert_chain_pems[0].write_to_path(cert_file)
        cert.private_key_pem.write_to_path(key_file)
        ca.cert_pem.write_to_path(ca_file)
        server = RedisServer(tmp_path / "redis-tls", tls=(cert_file, key_file), password=PASSWORD)
        server.start()
        try:
            assert server.url.startswith("rediss://")
            # The TLS handshake is part of a call's timeout: on a busy machine it alone can take 250 ms (once
            # in a run of the suite beside two busy processes: every lookup of B timed out, nothing was a
            # duplicate). This test is about the CA.
            store = {"url": server.url, "ca_file": str(ca_file), "timeout": "2s"}
            a = await start_service(replica_changes("mem-a", store))
            b = await start_service(replica_changes("mem-b", store))
            untrusting = await start_service(replica_changes("mem-c", {"url": server.url, "timeout": "2s"}))
            answers_a, answers_b = await self.send_to_both(client, a, b, 3)
            assert all(answer["duplicates"] == self.EVENTS for answer in answers_b)
            assert store_errors(a) == store_errors(b) == 0
            # Without the CA the server's certificate is refused: counted, and the request still succeeds.
            assert (await post(client, untrusting, sample_wrappers(2)))["accepted"] == 2
            assert store_errors(untrusting) >= 1
        finally:
            server.stop()


@pytest.mark.redis
class TestCheckCommand:
    async def run_check(self, tmp_path: Path, url: str, command: str = "check") -> tuple[int, str]:
        tree = {
            **BASE_CONFIG,
            "journal": {"path": str(tmp_path / "j.db"), "dedup_store": {"type": "redis", "url": "${REDIS_URL}"}},
            "sinks": {"mem": {"type": "memory"}},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        env = {**os.environ, "REDIS_URL": url, "PYTHONPATH": str(REPO)}
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("log-bridge")), command, "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    async def test_check_reports_the_store(self, tmp_path: Path, redis_server: RedisServer) -> None:
        code, out = await self.run_check(tmp_path, redis_server.url)
        assert code == 0, out
        shown = f"redis://localhost:{redis_server.port}/0"
        assert f"ok     dedup store (redis) {shown} answers" in out
        code, out = await self.run_check(tmp_path, redis_server.url, command="validate")
        assert code == 0 and f"dedup shared through redis at {shown}" in out and PASSWORD not in out
        code, out = await self.run_check(tmp_path, redis_server.url.replace(PASSWORD, "wrong-password"))
        assert code == 1 and "FAILED dedup store" in out and "wrong-password" not in out
        redis_server.stop()
        code, out = await self.run_check(tmp_path, redis_server.url)
        assert code == 1, out
        assert f"FAILED dedup store (redis) {shown}: ConnectionError" in out
        assert "deduplicates locally only" in out and PASSWORD not in out

    @pytest.mark.parametrize("refusal", ["oom", "readonly"])
    async def test_check_fails_a_store_refusing_writes(
        self, tmp_path: Path, redis_server: RedisServer, refusal: str
    ) -> None:
        """A PING is answered by a Redis that cannot take a mark; `check` and the start-up probe write a key."""
        keys = redis.Redis.from_url(redis_server.url)
        try:
            if refusal == "oom":
                keys.config_set("maxmemory-policy", "noeviction")
                keys.config_set("maxmemory", "1")
            else:
                keys.replicaof("127.0.0.1", "1")
            code, out = await self.run_check(tmp_path, redis_server.url)
            if refusal == "oom":
                keys.config_set("maxmemory", "0")
            else:
                keys.replicaof("NO", "ONE")
            after, _ = await self.run_check(tmp_path, redis_server.url)
            left = [key for key in keys.keys("*") if not key.startswith(b"log-bridge:dedup:/")]
            ttl = keys.pttl("log-bridge:dedup:probe")
        finally:
            keys.close()
        error = {"oom": "OutOfMemoryError", "readonly": "ReadOnlyError"}[refusal]
        assert code == 1, out
        assert f"FAILED dedup store (redis) redis://localhost:{redis_server.port}/0: {error}" in out
        assert PASSWORD not in out
        assert after == 0
        assert left == [b"log-bridge:dedup:probe"] and 0 < ttl <= 10_000  # one key, expiring in seconds

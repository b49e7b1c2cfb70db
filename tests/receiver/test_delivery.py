"""The delivery engine through a real service: batching, retries, dead letters, isolation, shutdown, restart."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from receiver.config import RetryConfig
from receiver.delivery import PENDING_MIN_WAIT, action_filter, backoff
from receiver.errors import JournalError
from receiver.journal import list_dead_letters, replay_dead_letters
from receiver.journal.schema import INTAKE
from receiver.server import Service
from sinks.base import Health
from tests.conftest import BASE_CONFIG, TOKEN, StartService, memory, merge

AUTH = {"Authorization": TOKEN}


async def send(service: Service, wrappers: list[dict[str, Any]], path: str = "/workos") -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(service.url + path, data=orjson.dumps(wrappers), headers=AUTH) as response,
    ):
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


def events(count: int, action: str = "user.signed_in", prefix: str = "k") -> list[dict[str, Any]]:
    return [
        {
            "event": {"id": f"{prefix}{i}", "action": action, "occurred_at": "2024-01-15T10:30:00.000Z"},
            "keySuffix": f"{prefix}{i}",
            "timestamp": "2024-01-15T10:30:00.123Z",
        }
        for i in range(count)
    ]


async def until(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def keys(name: str = "mem") -> list[str]:
    return [e.key_suffix or "" for e in memory(name).events]


def two_sinks(**extra: Any) -> dict[str, Any]:
    fast = {"type": "memory", "batch": {"max_wait": "20ms"}, "retry": {"initial": "10ms", "max": "20ms"}}
    return {
        "streams": [{"name": "workos", "path": "/workos", "auth": {"values": [TOKEN]}, "sinks": ["a", "b"]}],
        "sinks": {"a": {**fast, **extra.get("a", {})}, "b": {**fast, **extra.get("b", {})}},
    }


class TestBatching:
    async def test_batches_respect_max_events_and_keep_order(self, start_service: StartService) -> None:
        service = await start_service({"sinks": {"mem": {"batch": {"max_events": 7, "max_wait": "200ms"}}}})
        await send(service, events(30))
        await until(lambda: len(memory().events) == 30)
        assert max(memory().batch_sizes) <= 7
        assert keys() == [f"k{i}" for i in range(30)]

    async def test_max_bytes_splits_batches(self, start_service: StartService) -> None:
        service = await start_service({"sinks": {"mem": {"batch": {"max_bytes": 400, "max_wait": "200ms"}}}})
        await send(service, events(20))
        await until(lambda: len(memory().events) == 20)
        assert max(memory().batch_sizes) < 20
        assert all(size * 100 <= 400 + 200 for size in memory().batch_sizes)

    async def test_partial_batch_waits_at_most_max_wait(self, start_service: StartService) -> None:
        service = await start_service({"sinks": {"mem": {"batch": {"max_events": 1000, "max_wait": "300ms"}}}})
        loop = asyncio.get_running_loop()
        started = loop.time()
        await send(service, events(3))
        await until(lambda: len(memory().events) == 3)
        assert 0.25 <= loop.time() - started < 2.0
        assert memory().batch_sizes == [3]


class TestRetries:
    async def test_retry_until_the_sink_recovers_then_deliver_once(self, start_service: StartService) -> None:
        service = await start_service({"sinks": {"mem": {"fail": "retry"}}})
        await send(service, events(10))
        await until(lambda: len(memory().batch_sizes) >= 3)
        assert memory().events == []
        memory().fail = "none"
        await until(lambda: len(memory().events) == 10)
        await asyncio.sleep(0.1)
        assert sorted(keys()) == sorted(f"k{i}" for i in range(10))
        text = service.metrics.render().decode()
        assert 'log_bridge_sink_events_failed_total{outcome="retry",sink="mem"}' in text
        assert list_dead_letters(service.config.journal.path) == []

    async def test_attempt_limit_dead_letters_with_the_reason(self, start_service: StartService) -> None:
        service = await start_service({"sinks": {"mem": {"fail": "retry", "retry": {"max_attempts": 3}}}})
        await send(service, events(4))
        await until(lambda: len(list_dead_letters(service.config.journal.path, "mem")) == 4)
        assert len(memory().batch_sizes) == 3
        letter = list_dead_letters(service.config.journal.path, "mem")[0]
        assert letter.reason.startswith("gave up after 3 attempts") and "told to fail" in letter.reason

    def test_backoff_is_full_jitter_under_an_exponential_ceiling(self) -> None:
        policy = RetryConfig(initial=1.0, max=60.0)
        assert backoff(1, policy, rng=lambda: 1.0) == 1.0
        assert backoff(4, policy, rng=lambda: 1.0) == 8.0
        assert backoff(30, policy, rng=lambda: 1.0) == 60.0
        assert backoff(3, policy, rng=lambda: 0.0) == 0.0
        assert backoff(3, policy, rng=lambda: 0.5) == 2.0


class TestDeadLetters:
    async def test_permanent_failure_is_dead_lettered_and_replayable(self, start_service: StartService) -> None:
        service = await start_service({"sinks": {"mem": {"fail": "permanent"}}})
        await send(service, events(3))
        path = service.config.journal.path
        await until(lambda: len(list_dead_letters(path, "mem")) == 3)
        assert all(letter.reason == "memory sink told to fail (permanent)" for letter in list_dead_letters(path))
        memory().fail = "none"
        assert replay_dead_letters(Path(path), "mem") == 3
        await until(lambda: len(memory().events) == 3)
        assert sorted(keys()) == ["k0", "k1", "k2"]
        assert list_dead_letters(path) == []

    async def test_only_the_rejected_event_is_dead_lettered(self, start_service: StartService) -> None:
        service = await start_service({"sinks": {"mem": {"reject_actions": ["user.deleted"]}}})
        batch = events(5) + events(1, action="user.deleted", prefix="bad") + events(5, prefix="m")
        await send(service, batch)
        await until(lambda: len(memory().events) == 10)
        await until(lambda: len(list_dead_letters(service.config.journal.path, "mem")) == 1)
        (letter,) = list_dead_letters(service.config.journal.path, "mem")
        assert orjson.loads(letter.data)["keySuffix"] == "bad0"

    async def test_replay_goes_only_to_the_sink_that_failed(self, start_service: StartService) -> None:
        service = await start_service(two_sinks(b={"fail": "permanent"}))
        await send(service, events(2))
        path = service.config.journal.path
        await until(lambda: len(list_dead_letters(path, "b")) == 2 and len(memory("a").events) == 2)
        memory("b").fail = "none"
        replay_dead_letters(Path(path))
        await until(lambda: len(memory("b").events) == 2)
        await asyncio.sleep(0.2)
        assert len(memory("a").events) == 2

    async def test_replays_wait_for_a_configuration_that_feeds_their_sink(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.journal.facade.MAINTAIN_EVERY", 0.05)
        service = await start_service(two_sinks(b={"fail": "permanent"}))
        path = service.config.journal.path
        await send(service, events(3))
        await until(lambda: len(list_dead_letters(path, "b")) == 3 and len(memory("a").events) == 3)
        await service.stop()
        # `dlq replay` given one configuration, the service run with another that lacks b: its replays wait.
        assert replay_dead_letters(Path(path)) == 3
        fast = {"type": "memory", "batch": {"max_wait": "20ms"}, "retry": {"initial": "10ms", "max": "20ms"}}
        without_b = {
            "journal": {"path": str(path)},
            "streams": [{"name": "workos", "path": "/workos", "auth": {"values": [TOKEN]}, "sinks": ["a"]}],
            "sinks": {"a": fast},
        }
        service = await start_service(without_b)
        await send(service, events(2, prefix="later"))
        await until(lambda: len(memory("a").events) == 2)
        await asyncio.sleep(0.3)  # several looks at `replays`, and the mark past everything a was given
        await service.stop()
        service = await start_service(merge(two_sinks(), {"journal": {"path": str(path)}}))
        await until(lambda: sorted(keys("b")) == ["k0", "k1", "k2"])
        assert list_dead_letters(path) == []

    async def test_a_reload_that_feeds_the_sink_again_takes_its_replays(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setattr("receiver.journal.facade.MAINTAIN_EVERY", 0.05)
        service = await start_service(two_sinks(b={"fail": "permanent"}))
        path = service.config.journal.path
        await send(service, events(3))
        await until(lambda: len(list_dead_letters(path, "b")) == 3)
        tree = merge(BASE_CONFIG, merge(two_sinks(b={"fail": "permanent"}), {"journal": {"path": str(path)}}))
        tree["streams"][0]["sinks"] = ["a"]
        service.path = str(tmp_path / "reloaded.yaml")
        Path(service.path).write_text(yaml.safe_dump(tree))
        assert await service.reload()  # b is fed no more
        assert replay_dead_letters(Path(path)) == 3
        await send(service, events(2, prefix="later"))
        await until(lambda: len(memory("a").events) == 5)
        await asyncio.sleep(0.3)  # several looks at `replays`, and the mark past everything a was given
        tree["streams"][0]["sinks"] = ["a", "b"]
        del tree["sinks"]["b"]["fail"]
        Path(service.path).write_text(yaml.safe_dump(tree))
        assert await service.reload()
        await until(lambda: sorted(keys("b")) == ["k0", "k1", "k2"])


class TestIsolation:
    async def test_a_failing_sink_blocks_neither_the_other_nor_the_intake(self, start_service: StartService) -> None:
        service = await start_service(two_sinks(b={"fail": "retry"}))
        for round_ in range(5):
            await send(service, events(20, prefix=f"r{round_}-"))
        await until(lambda: len(memory("a").events) == 100)
        assert memory("b").events == []
        text = service.metrics.render().decode()
        assert 'log_bridge_sink_up{sink="b"} 0.0' in text
        memory("b").fail = "none"
        await until(lambda: len(memory("b").events) == 100)

    async def test_segments_are_dropped_once_every_sink_is_past_them(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.journal.segments.SEGMENT_BYTES", 1)  # a segment per request
        service = await start_service(two_sinks(b={"fail": "retry"}))
        await send(service, events(50))
        await send(service, events(5, prefix="later"))
        await until(lambda: len(memory("a").events) == 55)
        segments = service.journal.segments.directory
        assert len(list(segments.glob("*.seg"))) == 2 and service.journal.size_bytes > 0  # b has not got them yet
        memory("b").fail = "none"
        await until(lambda: len(memory("b").events) == 55)
        await until(lambda: service.journal.size_bytes == 0)
        assert len(list(segments.glob("*.seg"))) == 1  # the newest stays: it takes the next records

    async def test_streams_route_to_their_own_sinks(self, start_service: StartService) -> None:
        fast = {"type": "memory", "batch": {"max_wait": "20ms"}}
        service = await start_service(
            {
                "streams": [
                    {"name": "prod", "path": "/prod", "auth": {"values": [TOKEN]}, "sinks": ["a"]},
                    {"name": "dev", "path": "/dev", "auth": {"values": [TOKEN]}, "sinks": ["b"]},
                ],
                "sinks": {"a": fast, "b": fast},
            }
        )
        await send(service, events(3, prefix="p"), "/prod")
        await send(service, events(2, prefix="d"), "/dev")
        await until(lambda: len(memory("a").events) == 3 and len(memory("b").events) == 2)
        assert {e.stream for e in memory("a").events} == {"prod"} and keys("b") == ["d0", "d1"]

    async def test_include_and_exclude_action_globs(self, start_service: StartService) -> None:
        service = await start_service(
            two_sinks(
                a={"include_actions": ["user.*"], "exclude_actions": ["user.deleted"]},
                b={"exclude_actions": ["role.*"]},
            )
        )
        batch = events(2, "user.signed_in", "u") + events(1, "user.deleted", "d") + events(2, "role.assigned", "r")
        await send(service, batch)
        await until(lambda: len(memory("b").events) == 3 and len(memory("a").events) == 2)
        await asyncio.sleep(0.1)
        assert keys("a") == ["u0", "u1"] and keys("b") == ["u0", "u1", "d0"]

    def test_action_filter(self) -> None:
        wanted = action_filter(["user.*", "role.assigned"], ["user.deleted"])
        assert [wanted(a) for a in ("user.signed_in", "user.deleted", "role.assigned", "role.removed")] == [
            True,
            False,
            True,
            False,
        ]
        assert action_filter([], [])("anything")


class TestShutdownAndRestart:
    async def test_undelivered_events_wait_in_the_journal_for_the_next_start(
        self, start_service: StartService, tmp_path: Path
    ) -> None:
        journal = str(tmp_path / "kept.db")
        first = await start_service(
            {"journal": {"path": journal}, "server": {"shutdown_timeout": "300ms"}, "sinks": {"mem": {"fail": "retry"}}}
        )
        await send(first, events(25))
        drained = await first.stop()
        assert drained is False and memory().events == []
        second = await start_service({"journal": {"path": journal}})
        await until(lambda: len(memory().events) == 25)
        assert sorted(keys()) == sorted(f"k{i}" for i in range(25))
        # And what was delivered is not delivered again after yet another restart.
        await asyncio.sleep(0.1)
        await second.stop()
        await start_service({"journal": {"path": journal}})
        await asyncio.sleep(0.3)
        assert memory().events == []

    async def test_stop_lets_sinks_flush_a_pending_batch(self, start_service: StartService) -> None:
        service = await start_service({"sinks": {"mem": {"batch": {"max_wait": "30s"}}}})
        await send(service, events(4))
        await asyncio.sleep(0.05)
        assert memory().events == []
        assert await service.stop() is True
        assert len(memory().events) == 4 and memory().closed


@pytest.mark.parametrize("outcome", ["retry", "permanent"])
async def test_health_follows_sends(start_service: StartService, outcome: str) -> None:
    service = await start_service({"sinks": {"mem": {"fail": outcome}}})
    await send(service, events(1))
    await until(lambda: 'log_bridge_sink_up{sink="mem"} 0.0' in service.metrics.render().decode())


class TestJournalTrouble:
    async def test_progress_that_cannot_be_recorded_is_retried_not_skipped(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        service = await start_service({"sinks": {"mem": {"reject_actions": ["user.deleted"]}}})
        original = service.journal.commit_progress
        failures = {"left": 3}

        async def flaky(*args: Any, **kwargs: Any) -> None:
            if failures["left"]:
                failures["left"] -= 1
                raise JournalError("database or disk is full")
            await original(*args, **kwargs)

        monkeypatch.setattr(service.journal, "commit_progress", flaky)
        await send(service, events(3) + events(1, action="user.deleted", prefix="bad"))
        path = service.config.journal.path
        await until(lambda: len(list_dead_letters(path, "mem")) == 1)
        assert failures["left"] == 0 and len(memory().events) == 3
        await send(service, events(2, prefix="later"))
        await until(lambda: len(memory().events) == 5)

    async def test_a_sink_behind_reads_a_backlog_of_large_events_a_few_megabytes_at_a_time(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Was a defect: a sink behind read 2 x max_events events at a time whatever their size, so a backlog of
        # 512 KiB events (one a request) was read 24 MiB at once (up to 256 of them: gigabytes at max_body_bytes).
        monkeypatch.setattr("receiver.journal.facade.RECENT_BYTES", 1)  # the sink behind reads the segments
        service = await start_service(two_sinks(b={"fail": "retry"}))
        read_sizes: list[int] = []
        read_rows = service.journal.read_rows

        async def measured(*args: Any) -> Any:
            rows = await read_rows(*args)
            read_sizes.append(sum(row.size for row in rows))
            return rows

        monkeypatch.setattr(service.journal, "read_rows", measured)
        pad = "x" * (1 << 19)
        for i in range(48):
            await send(service, [{"event": {"id": f"e{i}", "action": "a", "pad": pad}, "keySuffix": f"k{i}"}])
        await until(lambda: len(memory("a").events) == 48, 20)
        memory("b").fail = "none"
        await until(lambda: len(memory("b").events) == 48, 20)
        assert [event.raw for event in memory("b").events] == [event.raw for event in memory("a").events]
        assert max(read_sizes) <= (8 << 20) + (1 << 19) + 100  # READ_BYTES, and the event that passed it

    async def test_a_sink_behind_a_segment_cut_short_gets_every_event_around_it(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.journal.facade.RECENT_BYTES", 1)  # the sink behind reads the segments
        monkeypatch.setattr("receiver.journal.segments.SEGMENT_BYTES", 1)  # a segment per request
        service = await start_service(two_sinks(b={"fail": "retry", "batch": {"max_events": 1}}))
        for i in range(6):
            await send(service, events(100, prefix=f"r{i}-"))
        await until(lambda: len(memory("a").events) == 600)
        os.truncate(service.journal.segments.segments[4].path, 10)  # seqs 401-500: the disk lost them
        memory("b").fail = "none"
        for i in range(6, 8):
            await send(service, events(100, prefix=f"r{i}-"))
        await until(lambda: {event.seq for event in memory("b").events} >= set(range(501, 801)), 10)
        sent = {event.seq: event.raw for event in memory("a").events}
        got = {event.seq: event.raw for event in memory("b").events}
        assert set(got) >= set(range(1, 401)) | set(range(501, 801))  # delivery went on past the loss
        assert all(sent[seq] == raw for seq, raw in got.items())  # and nothing came altered
        if not set(got) >= set(range(401, 501)):  # b had not taken them into memory before the loss
            (letter,) = list_dead_letters(service.config.journal.path, INTAKE)
            assert "shorter than it was written" in letter.reason and "(seqs 401-500)" in letter.reason
            counted = service.metrics.registry.get_sample_value(
                "log_bridge_events_dead_lettered_total", {"stage": "intake"}
            )
            assert counted == 1

    async def test_a_sink_whose_events_cannot_be_read_is_shown_down_and_goes_on_once_they_can(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.journal.facade.RECENT_BYTES", 1)  # the sink behind reads the segments
        monkeypatch.setattr("receiver.journal.segments.SEGMENT_BYTES", 1)  # a segment per request
        service = await start_service(two_sinks(b={"fail": "retry", "batch": {"max_events": 1}}))
        for i in range(6):
            await send(service, events(100, prefix=f"r{i}-"))
        await until(lambda: len(memory("a").events) == 600)
        segment = service.journal.segments.segments[4].path  # seqs 401-500, which b has not read yet
        aside = segment.with_name(segment.name + ".aside")
        segment.rename(aside)
        segment.mkdir()  # reading it fails (EISDIR), as a disk failing would (EIO)
        memory("b").fail = "none"
        assert service.engine is not None
        runner = service.engine.runners["b"]
        await until(lambda: not runner.health.ok and "cannot read the journal" in runner.health.message, 10)
        assert 'log_bridge_sink_up{sink="b"} 0.0' in service.metrics.render().decode()
        assert len(memory("b").events) <= 400
        segment.rmdir()
        aside.rename(segment)
        await until(lambda: len(memory("b").events) == 600, 10)
        assert [event.seq for event in memory("b").events] == list(range(1, 601))
        await until(lambda: runner.health.ok)


class TestSinkHealth:
    async def test_a_configuration_problem_keeps_the_sink_red_until_a_send_succeeds(
        self, start_service: StartService
    ) -> None:
        slow = {"fail": "config", "retry": {"initial": "1s", "max": "1s"}}
        service = await start_service({"sinks": {"mem": slow}})
        assert service.engine is not None
        runner = service.engine.runners["mem"]
        await send(service, events(2))
        await until(lambda: not runner.health.ok and "configuration problem" in runner.health.message)
        memory().fail = "none"  # fixed outside; the sink's own check turns green at once
        assert (await memory().healthcheck()).ok
        health = await runner.check_health()
        assert not health.ok and "until a send succeeds" in health.message and "configuration" in health.message
        assert 'log_bridge_sink_up{sink="mem"} 0.0' in service.metrics.render().decode()
        await until(lambda: len(memory().events) == 2)  # the engine's next attempt delivers
        assert (await runner.check_health()).ok

    async def test_pending_events_are_asked_about_again_without_using_attempts(
        self, start_service: StartService
    ) -> None:
        sink = {"pending_asks": 3, "retry": {"initial": "10ms", "max": "20ms", "max_attempts": 1}}
        service = await start_service({"sinks": {"mem": sink}})
        await send(service, events(5))
        await until(lambda: len(memory().events) == 5)
        assert sorted(keys()) == [f"k{i}" for i in range(5)]
        assert len(memory().batch_sizes) == 4  # three PENDING answers, then delivered
        text = service.metrics.render().decode()
        assert 'outcome="retry",sink="mem"' not in text  # PENDING is no failed send
        assert list_dead_letters(service.config.journal.path) == []  # and max_attempts: 1 was never used up
        assert service.engine is not None and service.engine.runners["mem"].health.ok

    async def test_a_pending_answer_that_asks_no_wait_is_asked_about_again_after_a_pause(
        self, start_service: StartService
    ) -> None:
        """A sink answering PENDING without a wait made the engine ask again at once, in a loop that only yielded
        to the event loop: a hundred asks in a few milliseconds, CPU spent for nothing while the peer confirms."""
        service = await start_service({"sinks": {"mem": {"pending_asks": 100, "pending_wait": 0}}})
        await send(service, events(1))
        await until(lambda: len(memory().batch_sizes) >= 2)
        await asyncio.sleep(0.5)
        assert not memory().events
        assert len(memory().batch_sizes) <= 1 + 0.5 / PENDING_MIN_WAIT + 1, memory().batch_sizes

    async def test_a_sink_that_refuses_every_event_is_down_though_its_check_passes(
        self, start_service: StartService
    ) -> None:
        """A send whose every event was dead-lettered did not succeed: the sink is red until one delivers."""
        service = await start_service()
        sink = memory()

        async def green() -> Health:
            return Health(True, "health endpoint answers")

        sink.healthcheck = green  # type: ignore[method-assign]
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 1.0' in service.metrics.render().decode())
        sink.fail = "permanent"
        await send(service, events(3))
        await until(lambda: len(list_dead_letters(service.journal.path, "mem")) == 3)
        assert service.engine is not None
        health = service.engine.runners["mem"].health
        assert not health.ok and "memory sink told to fail (permanent)" in health.message
        assert 'log_bridge_sink_up{sink="mem"} 0.0' in service.metrics.render().decode()
        sink.fail = "none"
        sink.reject_actions = {"user.deleted"}  # one refused among delivered ones: the sink is up
        await send(service, events(2, prefix="later") + events(1, action="user.deleted", prefix="bad"))
        await until(lambda: len(sink.events) == 2 and len(list_dead_letters(service.journal.path, "mem")) == 4)
        assert 'log_bridge_sink_up{sink="mem"} 1.0' in service.metrics.render().decode()

    async def test_a_send_that_does_not_return_shows_the_sink_down_until_it_does(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A sink that never times out its requests (a peer that takes them and never answers) holds its
        events back: that is no silent success."""
        monkeypatch.setattr("receiver.delivery.SEND_STALLED", 0.2, raising=False)
        service = await start_service()
        sink = memory()
        kept = sink.send
        answer = asyncio.Event()

        async def silent(batch: Any) -> Any:
            await answer.wait()
            return await kept(batch)

        sink.send = silent  # type: ignore[method-assign]
        await send(service, events(2))
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 0.0' in service.metrics.render().decode())
        assert any(record.getMessage().startswith("send has not returned") for record in caplog.records)
        answer.set()
        await until(lambda: len(sink.events) == 2)
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 1.0' in service.metrics.render().decode())


class TestHealthWhileIdle:
    """A sink with nothing to send is checked again while it is red: its gauge follows the sink back up."""

    async def test_a_failed_first_check_is_not_red_forever(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.delivery.HEALTH_RECHECK", 0.1, raising=False)
        service = await start_service({"sinks": {"mem": {"fail": "retry"}}})
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 0.0' in service.metrics.render().decode())
        memory().fail = "none"  # the sink answers again; nothing is owed, so no send will say so
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 1.0' in service.metrics.render().decode())

    async def test_a_sink_that_gave_up_and_went_idle_comes_back_up(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.delivery.HEALTH_RECHECK", 0.1, raising=False)
        service = await start_service({"sinks": {"mem": {"retry": {"max_attempts": 2}}}})
        memory().fail = "retry"
        await send(service, events(1))
        await until(lambda: len(list_dead_letters(service.journal.path, "mem")) == 1)
        assert 'log_bridge_sink_up{sink="mem"} 0.0' in service.metrics.render().decode()
        memory().fail = "none"
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 1.0' in service.metrics.render().decode())

    async def test_a_sink_retrying_a_batch_is_not_turned_green_by_its_check(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Its sends are what say it is down: a check that passes between two retries does not hide them."""
        monkeypatch.setattr("receiver.delivery.HEALTH_RECHECK", 0.05, raising=False)
        service = await start_service({"sinks": {"mem": {"retry": {"initial": "1s", "max": "1s"}}}})
        sink = memory()
        sink.fail = "retry"
        checks = {"n": 0}

        async def green() -> Health:
            checks["n"] += 1
            return Health(True, "health endpoint answers")

        sink.healthcheck = green  # type: ignore[method-assign]
        await send(service, events(1))
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 0.0' in service.metrics.render().decode())
        await asyncio.sleep(0.5)
        assert 'log_bridge_sink_up{sink="mem"} 0.0' in service.metrics.render().decode()
        assert checks["n"] == 0

    async def test_a_health_check_that_hangs_is_a_failed_check_and_the_next_one_runs(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.delivery.HEALTH_RECHECK", 0.05)
        monkeypatch.setattr("receiver.delivery.HEALTH_TIMEOUT", 0.2, raising=False)
        service = await start_service({"sinks": {"mem": {"retry": {"max_attempts": 1}}}})
        sink = memory()
        sink.fail = "retry"
        await send(service, events(1))
        await until(lambda: len(list_dead_letters(service.journal.path, "mem")) == 1)  # red, and nothing owed
        kept = sink.healthcheck
        hangs = {"left": 1}

        async def silent() -> Health:  # an endpoint that takes the connection and never answers, once
            if hangs["left"]:
                hangs["left"] -= 1
                await asyncio.Event().wait()
            return await kept()

        sink.healthcheck = silent  # type: ignore[method-assign]
        sink.fail = "none"
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 1.0' in service.metrics.render().decode())
        assert hangs["left"] == 0


class TestRunnerFailure:
    """An error nothing classifies stops no sink for good: its runner starts again at its cursor."""

    async def test_a_sink_that_answers_no_result_is_shown_down_and_delivers_once_it_does(
        self, start_service: StartService, caplog: pytest.LogCaptureFixture
    ) -> None:
        service = await start_service()
        sink = memory()
        kept = sink.send
        broken = {"on": True}

        async def buggy(batch: Any) -> Any:
            if broken["on"]:
                sink.batch_sizes.append(len(batch))
                return None  # a third-party sink's bug: no SendResult
            return await kept(batch)

        sink.send = buggy  # type: ignore[method-assign]
        await send(service, events(3))
        await until(lambda: len(sink.batch_sizes) >= 2)  # tried again, not given up
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 0.0' in service.metrics.render().decode())
        assert any(
            record.getMessage().startswith("sink runner failed") and getattr(record, "sink", None) == "mem"
            for record in caplog.records
        )
        broken["on"] = False
        await send(service, events(2, prefix="later"))
        await until(lambda: len(sink.events) == 5)
        assert sorted(keys()) == ["k0", "k1", "k2", "later0", "later1"]
        await until(lambda: 'log_bridge_sink_up{sink="mem"} 1.0' in service.metrics.render().decode())
        # The backlog is recounted in the background: on a loaded machine the count can lag the delivery.
        await until(
            lambda: service.metrics.registry.get_sample_value("log_bridge_sink_backlog_events", {"sink": "mem"}) == 0
        )

    async def test_a_rebuilt_sink_still_owes_what_it_read_but_did_not_deliver_of_a_stream_moved_away(
        self, start_service: StartService, tmp_path: Path
    ) -> None:
        """What a sink owes of a stream a reload took from it is forgotten once it is delivered, not once read."""
        fast = {"type": "memory", "batch": {"max_wait": "20ms", "max_events": 2}, "retry": {"initial": "10ms"}}
        streams = [
            {"name": "workos", "path": "/workos", "auth": {"values": [TOKEN]}, "sinks": ["a", "b"]},
            {"name": "other", "path": "/other", "auth": {"values": [TOKEN]}, "sinks": ["b"]},
        ]
        tree = {"streams": streams, "sinks": {"a": fast, "b": {**fast, "fail": "retry"}}}
        service = await start_service(tree)
        assert service.engine is not None
        await send(service, events(3))
        await until(lambda: len(memory("a").events) == 3 and len(memory("b").batch_sizes) >= 1)
        service.path = str(tmp_path / "reloaded.yaml")
        tree = merge(BASE_CONFIG, merge(tree, {"journal": {"path": str(service.config.journal.path)}}))
        tree["streams"][0]["sinks"] = ["a"]
        Path(service.path).write_text(yaml.safe_dump(tree))
        assert await service.reload()  # b still owes the three events of `workos`
        await until(lambda: service.engine is not None and service.engine.runners["b"].legacy == {"workos": 3})
        await send(service, events(1, prefix="o"), "/other")
        b = memory("b")
        kept = b.send

        async def once(batch: Any) -> Any:  # one batch goes through, then the sink is down again
            b.fail = "none"
            result = await kept(batch)
            b.fail, b.send = "retry", kept  # type: ignore[method-assign]
            return result

        b.send = once  # type: ignore[method-assign]
        await until(lambda: len(b.events) == 2 and len(b.batch_sizes) >= 3)  # k0, k1 delivered; k2, o0 retried
        del tree["sinks"]["b"]["fail"]  # b changed: rebuilt at its cursor
        Path(service.path).write_text(yaml.safe_dump(tree))
        assert await service.reload()
        await until(lambda: keys("b") == ["k2", "o0"])

    async def test_a_sink_whose_cursor_cannot_be_read_at_once_is_started_when_it_can(
        self, start_service: StartService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A reload adding a sink while the journal's reads fail (locked, an I/O error) waits them out."""
        service = await start_service()
        journal = service.journal
        read = journal._read
        failures = {"left": 2}

        async def locked(fn: Any) -> Any:
            if "cursors" in fn.__qualname__ and failures["left"]:
                failures["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
            return await read(fn)

        monkeypatch.setattr(journal, "_read", locked)
        tree = merge(BASE_CONFIG, {"journal": {"path": str(journal.path)}})
        tree["sinks"]["added"] = tree["sinks"]["mem"]
        tree["streams"][0]["sinks"] = ["mem", "added"]
        service.path = str(tmp_path / "reloaded.yaml")
        Path(service.path).write_text(yaml.safe_dump(tree))
        assert await service.reload()
        assert failures["left"] == 0
        await send(service, events(2))
        await until(lambda: len(memory("added").events) == 2 and len(memory().events) == 2)

"""A full journal disk: delivery recovers by itself once a sink can deliver again (the reserve lets its progress
commit, which frees segments), and dead letters are bounded so that they cannot fill the disk."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from receiver.journal import INTAKE, list_dead_letters
from receiver.samples import encode_body, sample_wrappers
from tests.conftest import TOKEN, StartService, memory, scrape
from tests.receiver.test_unattended import small_disk

AUTH = {"Authorization": TOKEN}


def lines_of(path: Path) -> list[bytes]:
    """The events a file sink wrote (none when it wrote nothing)."""
    try:
        return [line for line in path.read_bytes().split(b"\n") if line]
    except (FileNotFoundError, NotADirectoryError):
        return []


class TestRecoveryFromAFullDisk:
    @pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
    async def test_a_repaired_sink_delivers_every_acknowledged_event_without_more_room(
        self, start_service: StartService, tmp_path: Path, restart: bool
    ) -> None:
        """max_bytes far above the disk, the sink broken until the disk fills, then repaired (while the service
        runs, or before it starts again): its progress commits although the disk is full, the segments behind
        it are freed, and everything acknowledged is delivered."""
        out = tmp_path / "out"
        out.write_bytes(b"")  # a plain file where the sink's directory goes: every write fails (retried)
        with small_disk(tmp_path / "disk", "12m") as disk:
            config = {
                "server": {"max_body_bytes": "256KiB"},
                "journal": {"path": str(disk / "journal.db"), "max_bytes": "1GiB"},
                "streams": [{"name": "workos", "path": "/workos", "auth": {"values": [TOKEN]}, "sinks": ["file"]}],
                "sinks": {
                    "file": {
                        "type": "file",
                        "path": str(out / "events.log"),
                        "batch": {"max_wait": "50ms", "max_events": 500},
                        "retry": {"initial": "10ms", "max": "100ms"},
                    }
                },
            }
            service = await start_service(config)
            accepted: set[bytes] = set()
            async with aiohttp.ClientSession() as session:
                for _ in range(2000):
                    wrappers = sample_wrappers(100)
                    data, content_type = encode_body(wrappers, "json")
                    headers = {**AUTH, "Content-Type": content_type}
                    async with session.post(service.url + "/workos", data=data, headers=headers) as response:
                        if response.status == 503:
                            break
                        assert response.status == 200, await response.text()
                    accepted.update(orjson.dumps(w["event"]["id"]) for w in wrappers)
                assert response.status == 503, "the disk never filled"
                assert len(accepted) > 5000
                if restart:
                    await service.stop()
                out.unlink()  # the sink is repaired; the disk is still full
                if restart:
                    service = await start_service(config)
                deadline = time.monotonic() + 60
                delivered: set[bytes] = set()
                while time.monotonic() < deadline and not accepted <= delivered:
                    await asyncio.sleep(0.5)
                    delivered = {
                        orjson.dumps(orjson.loads(line)["event"]["id"]) for line in lines_of(out / "events.log")
                    }
                missing = len(accepted - delivered)
                assert not missing, f"{missing} of {len(accepted)} acknowledged events not delivered"
                if not restart:  # progress recorded as it went: nothing sent twice
                    assert len(lines_of(out / "events.log")) == len(accepted)
                logged = await service.journal._read(lambda c: c.execute("SELECT keys FROM dedup_log").fetchall())
                kept = {key for (keys,) in logged for key in orjson.loads(keys)}
                assert len(kept) == len(accepted)  # the delivered records' keys, for a restart's dedup index
                # Room again (the delivered segments are freed): requests are taken and delivered.
                wrappers = sample_wrappers(5)
                data, content_type = encode_body(wrappers, "json")
                for _ in range(100):
                    async with session.post(
                        service.url + "/workos", data=data, headers={**AUTH, "Content-Type": content_type}
                    ) as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.1)
                assert response.status == 200
            await service.stop()


def bad_and_good(good: dict[str, object], bad: int, size: int) -> bytes:
    """A request holding one good element, then `bad` elements that are no event (`size` x's each)."""
    return orjson.dumps([good] + [{"notevent": "x" * size}] * bad)


class TestBoundedDeadLetters:
    async def test_intake_dead_letters_cannot_fill_the_disk(self, start_service: StartService, tmp_path: Path) -> None:
        """Requests each carrying ≈ 900 KB of bad elements, 36 MB in all on a 20 MiB disk: past
        max_dead_letter_bytes they are refused (503, Retry-After: the sender retries, nothing lost), the disk
        never fills, requests without bad elements are still taken, and every accepted event is delivered."""
        out = tmp_path / "out" / "events.log"
        with small_disk(tmp_path / "disk", "20m") as disk:
            service = await start_service(
                {
                    "server": {"max_body_bytes": "1MiB"},
                    "journal": {"path": str(disk / "journal.db"), "max_bytes": "1MiB", "max_dead_letter_bytes": "3MiB"},
                    "streams": [{"name": "workos", "path": "/workos", "auth": {"values": [TOKEN]}, "sinks": ["file"]}],
                    "sinks": {"file": {"type": "file", "path": str(out), "batch": {"max_wait": "50ms"}}},
                }
            )
            accepted: set[str] = set()
            refused: list[tuple[str | None, str]] = []
            headers = {**AUTH, "Content-Type": "application/json"}
            async with aiohttp.ClientSession() as session:
                for _ in range(40):
                    good = sample_wrappers(1)[0]
                    data = bad_and_good(good, 100, 9000)
                    async with session.post(service.url + "/workos", data=data, headers=headers) as response:
                        if response.status == 200:
                            accepted.add(good["event"]["id"])
                        else:
                            assert response.status == 503, await response.text()
                            refused.append((response.headers.get("Retry-After"), (await response.json())["error"]))
                    assert not service.journal.disk_full, f"the disk filled after {len(accepted)} requests"
                assert 0 < len(accepted) < 40 and len(refused) == 40 - len(accepted)
                assert all(after and "dead letters are at their cap" in why for after, why in refused), refused[:3]
                good = sample_wrappers(3)
                async with session.post(service.url + "/workos", data=orjson.dumps(good), headers=headers) as response:
                    assert response.status == 200  # no bad element: taken
                accepted.update(wrapper["event"]["id"] for wrapper in good)
                text = await (await session.get(service.url + "/metrics")).text()
            held = scrape(text, "log_bridge_dead_letter_bytes")
            assert held is not None and 0 < held <= 3 * 1024 * 1024
            assert scrape(text, "log_bridge_dead_letter_max_bytes") == 3 * 1024 * 1024
            deadline = time.monotonic() + 20
            delivered: set[str] = set()
            while time.monotonic() < deadline and not accepted <= delivered:
                await asyncio.sleep(0.2)
                delivered = {orjson.loads(line)["event"]["id"] for line in lines_of(out)}
            assert accepted <= delivered
            await service.stop()

    async def test_a_sinks_permanent_failures_are_held_at_the_cap(self, start_service: StartService) -> None:
        """A sink's permanent failures the dead letters have no room for are sent again, not dead-lettered
        nor dropped: once the sink takes them, they are delivered."""
        service = await start_service(
            {"journal": {"max_dead_letter_bytes": "1KiB"}, "sinks": {"mem": {"fail": "permanent"}}}
        )
        wrappers = sample_wrappers(3)  # ≈ 1 KB each: the first already passes the cap
        async with aiohttp.ClientSession() as session:
            headers = {**AUTH, "Content-Type": "application/json"}
            async with session.post(service.url + "/workos", data=b'["bad input"]', headers=headers) as response:
                assert response.status == 200  # one dead letter, of the intake: the cap applies from now on
            data, content_type = encode_body(wrappers, "json")
            headers = {**AUTH, "Content-Type": content_type}
            async with session.post(service.url + "/workos", data=data, headers=headers) as response:
                assert response.status == 200
        await asyncio.sleep(0.5)  # many sends meanwhile (retry.initial 10 ms)
        held = service.journal.dead_letter_bytes
        assert [letter.sink for letter in list_dead_letters(service.config.journal.path)] == [INTAKE]
        memory().fail = "none"
        for _ in range(50):
            if len(memory().events) == 3:
                break
            await asyncio.sleep(0.1)
        assert sorted(event.seq for event in memory().events) == [1, 2, 3]
        assert len(list_dead_letters(service.config.journal.path)) == 1 and service.journal.dead_letter_bytes == held

    async def test_what_passes_the_cap_alone_is_taken_when_there_are_no_dead_letters(
        self, start_service: StartService
    ) -> None:
        """Was a defect: a request whose dead letters alone took more than max_dead_letter_bytes was refused
        (503) for ever, its good events with it, though there were no dead letters at all: the answer said to
        `dlq purge`, which found nothing to delete. A sink's permanent failures of such a size were held, and
        its delivery stopped, for ever too. With no dead letters the cap now takes them; with some, it refuses."""
        service = await start_service({"journal": {"max_dead_letter_bytes": "1KiB"}})
        headers = {**AUTH, "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:
            first, second = sample_wrappers(2)
            async with session.post(
                service.url + "/workos", data=bad_and_good(first, 1, 2000), headers=headers
            ) as response:
                assert response.status == 200, await response.text()
            async with session.post(
                service.url + "/workos", data=bad_and_good(second, 1, 2000), headers=headers
            ) as response:
                assert response.status == 503  # the cap holds once some are there
        assert [len(letter.data) for letter in list_dead_letters(service.config.journal.path)] == [2015]
        for _ in range(50):
            if memory().events:
                break
            await asyncio.sleep(0.1)
        assert [orjson.loads(event.raw)["event"]["id"] for event in memory().events] == [first["event"]["id"]]
